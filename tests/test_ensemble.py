"""ELREA ensembles of head adapters (peft_alps.ensemble), each part against an independent computation."""

import math

import pytest
import torch
from conftest import make_model
from peft import get_peft_model

from peft_alps import HeadMaskConfig, HeadMaskLayer
from peft_alps.ensemble import (CountSketch, ExpertEnsemble, add_experts, cluster_features, gradient_features,
                                load_ensemble, routing_weights)

VOCAB = 128


def base_adapter_model(seed=0):
    model = get_peft_model(make_model("llama", seed=seed), HeadMaskConfig(heads={0: [1, 2], 2: [0]},
                                                                          parts=["q", "v", "o"], init_weights=False))
    return model.eval()


def prompts(seed=3, batch=3, seq=7):
    """A left-padded batch: sample i has ``i`` padding positions."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    for i in range(batch):
        ids[i, :i], mask[i, :i] = 0, 0
    return {"input_ids": ids, "attention_mask": mask}


def test_count_sketch_is_a_seeded_linear_projection():
    v, w = torch.randn(1000), torch.randn(1000)
    s = CountSketch(1000, 64, seed=5)
    torch.testing.assert_close(s(v), s.matrix() @ v)
    assert torch.equal(CountSketch(1000, 64, seed=5)(v), s(v))
    assert not torch.equal(CountSketch(1000, 64, seed=6)(v), s(v))
    # inner products are kept in expectation: the mean over seeds is close to <v, w>
    mean = torch.stack([CountSketch(1000, 64, seed=k)(v) @ CountSketch(1000, 64, seed=k)(w) for k in range(400)])
    assert abs(mean.mean() - v @ w) < 4 * mean.std() / math.sqrt(400)


def test_gradient_features_equal_the_projected_autograd_gradient():
    model = base_adapter_model()
    batch = prompts()
    features = gradient_features(model, [batch], dim=32, seed=1)
    params = [p for m in model.modules() if isinstance(m, HeadMaskLayer) for p in m.adapter_tensors("default").values()]
    sketch = CountSketch(sum(p.numel() for p in params), 32, seed=1).matrix()
    for i in range(3):
        keep = batch["attention_mask"][i].bool()
        ids = batch["input_ids"][i : i + 1, keep]
        logits = model(input_ids=ids).logits[0, :-1]
        loss = torch.nn.functional.cross_entropy(logits, ids[0, 1:])  # next-token loss over the prompt
        grads = torch.autograd.grad(loss, params)
        expected = sketch @ torch.cat([g.reshape(-1) for g in grads])
        torch.testing.assert_close(features[i], expected / expected.norm(), atol=1e-5, rtol=1e-4)
    # flags, gradients and mode are restored
    assert all(p.requires_grad for p in params) and all(p.grad is None for p in params) and not model.training
    with torch.no_grad():  # works inside a caller's no_grad
        torch.testing.assert_close(gradient_features(model, [batch], dim=32, seed=1), features)


def test_clustering_is_deterministic_and_finds_separated_directions():
    g = torch.Generator().manual_seed(0)
    directions = torch.nn.functional.normalize(torch.randn(3, 16, generator=g), dim=1)
    truth = torch.arange(30) % 3
    points = torch.nn.functional.normalize(directions[truth] + 0.1 * torch.randn(30, 16, generator=g), dim=1)
    labels, centroids = cluster_features(points, 3, seed=4)
    again = cluster_features(points, 3, seed=4)
    assert torch.equal(labels, again[0]) and torch.equal(centroids, again[1])
    # the clusters are the true groups (up to renaming) ...
    assert len({(int(t), int(c)) for t, c in zip(truth, labels)}) == 3
    # ... and a fixed point of spherical k-means: each centroid is its members' normalised mean
    for c in range(3):
        mean = points[labels == c].mean(0)
        torch.testing.assert_close(centroids[c], mean / mean.norm())
        assert torch.equal((points @ centroids.T).argmax(1), labels)
    with pytest.raises(ValueError, match="N >= k"):
        cluster_features(points[:2], 3)


def test_routing_weights_match_a_hand_computation():
    f = torch.nn.functional.normalize(torch.randn(2, 8), dim=1)
    c = torch.nn.functional.normalize(torch.randn(3, 8), dim=1)
    w = routing_weights(f, c, temperature=0.5)
    for i in range(2):
        logits = [sum(f[i, d].item() * c[k, d].item() for d in range(8)) / 0.5 for k in range(3)]
        z = sum(math.exp(x) for x in logits)
        assert [round(math.exp(x) / z, 5) for x in logits] == [round(v, 5) for v in w[i].tolist()]
    with pytest.raises(ValueError, match="temperature"):
        routing_weights(f, c, temperature=0)


def small_ensemble():
    """Base adapter + 2 experts (copies of the base, then moved apart), centroids from 2 clusters of prompts."""
    model = base_adapter_model()
    names = add_experts(model, 2)
    for m in model.modules():
        if isinstance(m, HeadMaskLayer) and "expert_0" in m.headmask_kind:
            for t in ("expert_0", "expert_1"):  # the experts start as exact copies of the base adapter
                for name, p in m.adapter_tensors(t).items():
                    assert torch.equal(p, m.adapter_tensors("default")[name])
            with torch.no_grad():
                for t, scale in (("expert_0", 3.0), ("expert_1", -2.0)):
                    for p in m.adapter_tensors(t).values():
                        p.mul_(scale)
    features = gradient_features(model, [prompts(seed=s) for s in range(2)], dim=32, seed=1)
    _, centroids = cluster_features(features, 2, seed=0)
    return model, ExpertEnsemble(base="default", experts=names, centroids=centroids, dim=32, seed=1, temperature=0.2)


def test_ensemble_routes_each_sample_to_its_own_mixture():
    model, ensemble = small_ensemble()
    batch = prompts(seed=9)
    weights = ensemble.route(model, [batch])
    torch.testing.assert_close(weights, routing_weights(gradient_features(model, [batch], dim=32, seed=1),
                                                        ensemble.centroids, 0.2))
    with torch.no_grad():
        mixed = ensemble.forward(model, batch).logits
        for i in range(3):
            model.base_model.add_weighted_adapter(ensemble.experts, weights[i].tolist(), f"w{i}")
            model.set_adapter(f"w{i}")
            alone = model(**{k: v[i : i + 1] for k, v in batch.items()}).logits[0]
            keep = batch["attention_mask"][i].bool()
            torch.testing.assert_close(mixed[i, keep], alone[keep], atol=2e-5, rtol=1e-5)
    assert model.active_adapters == ["w2"]


def test_ensemble_save_load_reproduces_outputs_and_generation(tmp_path):
    model, ensemble = small_ensemble()
    batch = prompts(seed=9)
    with torch.no_grad():
        out = ensemble.forward(model, batch).logits
    generated = ensemble.generate(model, **batch, max_new_tokens=4, do_sample=False, pad_token_id=0)
    ensemble.save(model, tmp_path / "ens")
    assert {p.name for p in (tmp_path / "ens").iterdir()} == {"ensemble.json", "centroids.safetensors", "adapters",
                                                              "README.md"}
    loaded, again = load_ensemble(make_model("llama"), tmp_path / "ens")
    assert again.experts == ensemble.experts and torch.equal(again.centroids, ensemble.centroids)
    with torch.no_grad():
        torch.testing.assert_close(again.forward(loaded, batch).logits, out, atol=0, rtol=0)
    assert torch.equal(again.generate(loaded, **batch, max_new_tokens=4, do_sample=False, pad_token_id=0), generated)
    (tmp_path / "ens" / "centroids.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="centroids.safetensors is missing"):
        load_ensemble(make_model("llama"), tmp_path / "ens")


def test_ensemble_checks_its_shapes():
    with pytest.raises(ValueError, match=r"centroids must be \[experts, dim\] = \[2, 8\]"):
        ExpertEnsemble(base="default", experts=["a", "b"], centroids=torch.zeros(3, 8), dim=8, seed=0)


def test_cli_cluster_data_and_route_equal_the_python_api(tmp_path, capsys):
    import json

    import transformers as tf
    from safetensors.torch import load_file
    from test_cli import char_tokenizer, run

    from peft_alps.data import read_texts, text_batches

    base = make_model("llama")
    base.save_pretrained(tmp_path / "base")
    char_tokenizer().save_pretrained(tmp_path / "base")
    model = base_adapter_model()  # the same base weights (seed 0) with a random adapter
    model.save_pretrained(tmp_path / "adapter")
    lines = [json.dumps({"text": f"{w} {i}"}) for i in range(5) for w in ("add", "spell me")]
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    code, out, err = run(capsys, "cluster-data", "--base", tmp_path / "base", "--adapter", tmp_path / "adapter",
                         "--data", tmp_path / "data.jsonl", "--experts", "2", "--dim", "16", "--out",
                         tmp_path / "clusters")
    assert code == 0, err
    texts = read_texts(tmp_path / "data.jsonl")
    tokenizer = tf.AutoTokenizer.from_pretrained(tmp_path / "base")
    features = gradient_features(model, text_batches(tokenizer, texts), dim=16, seed=0)
    labels, centroids = cluster_features(features, 2, seed=0)
    record = json.loads((tmp_path / "clusters" / "clusters.json").read_text())
    assert record["labels"] == labels.tolist() and sum(record["sizes"]) == 10
    torch.testing.assert_close(load_file(tmp_path / "clusters" / "centroids.safetensors")["centroids"], centroids)
    for i in range(2):
        rows = [json.loads(x)["text"] for x in (tmp_path / "clusters" / f"cluster_{i}.jsonl").read_text().split("\n")
                if x]
        assert rows == [t for t, c in zip(texts, labels.tolist()) if c == i]
    # route: an ensemble folder, then one JSON line of weights per example
    experts = add_experts(model, 2)
    ensemble = ExpertEnsemble(base="default", experts=experts, centroids=centroids, dim=16, seed=0)
    ensemble.save(model, tmp_path / "ens")
    code, out, err = run(capsys, "route", tmp_path / "ens", "--base", tmp_path / "base", "--data",
                         tmp_path / "data.jsonl")
    assert code == 0, err
    printed = [json.loads(line)["weights"] for line in out.strip().split("\n")]
    expected = routing_weights(features, centroids, ensemble.temperature)
    assert [[row[e] for e in experts] for row in printed] == [[round(w, 4) for w in r] for r in expected.tolist()]
    code, _, err = run(capsys, "cluster-data", "--base", tmp_path / "base", "--adapter", tmp_path / "adapter",
                       "--data", tmp_path / "data.jsonl", "--experts", "20", "--out", tmp_path / "c2")
    assert code == 2 and "fewer than --experts 20" in err and not (tmp_path / "c2").exists()
