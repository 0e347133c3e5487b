"""PASER data selection (peft_alps.data_selection), each step against an independent computation: per-sample
JSD against scipy's Jensen-Shannon distance on unbatched forwards, the budget against a direct largest-remainder
count, the ranking against a sort by the stated key, the kNN graph against all pairwise distances, the conflict
filter on a hand-made example; plus determinism, the probe / CLI / recovery integrations and the errors."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
import transformers as tf
from scipy.spatial.distance import jensenshannon

from peft_alps.data_selection import allocate_budget, rank_in_cluster, select_data
from peft_alps.data_selection.cluster import knn_graph, spectral_clusters
from peft_alps.data_selection.conflicts import ConceptGraph, rake_phrases
from peft_alps.data_selection.degradation import sample_degradation, token_jsd

VOCAB = 128
TEXTS = ["What is 3 plus 4?", "Add 10 and 12.", "a", "The cat sat on the mat and looked around.",
         "Compute 7 times 8, then subtract 5.", "hello world"]


def char_tokenizer():
    """A character-level tokenizer built offline (ids 2..96 < the tiny models' vocab of 128)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<unk>": 1, **{chr(c): c - 30 for c in range(32, 127)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<pad>")


def tiny_llama(seed: int) -> tf.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2)
    config._attn_implementation = "eager"
    return tf.LlamaForCausalLM(config).eval()


def direct_jsd(model, reference, tokenizer, text, max_length=256) -> float:
    """Mean over the text's positions of JSD(p_t, q_t), each text alone (no padding), via scipy (base e)."""
    ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length).input_ids
    with torch.no_grad():
        p = torch.softmax(model(input_ids=ids).logits[0].double(), -1).numpy()
        q = torch.softmax(reference(input_ids=ids).logits[0].double(), -1).numpy()
    return float(np.mean([jensenshannon(p[t], q[t]) ** 2 for t in range(len(p))]))


def test_token_jsd_equals_scipy_and_handles_exact_zeros():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 30, generator=g) * 3, torch.randn(5, 30, generator=g) * 3
    want = [jensenshannon(torch.softmax(a[i].double(), -1), torch.softmax(b[i].double(), -1)) ** 2 for i in range(5)]
    torch.testing.assert_close(token_jsd(a, b).double(), torch.tensor(want, dtype=torch.float64), rtol=1e-4,
                               atol=1e-7)
    # disjoint supports (exact zeros after softmax): JSD is log 2, not NaN
    inf = float("-inf")
    assert math.isclose(token_jsd(torch.tensor([0.0, inf]), torch.tensor([inf, 0.0])).item(), math.log(2), rel_tol=1e-6)
    assert token_jsd(a, a).abs().max() < 1e-6


def test_sample_jsd_equals_a_direct_computation_whatever_the_batching():
    model, reference, tok = tiny_llama(0), tiny_llama(1), char_tokenizer()
    want = [direct_jsd(model, reference, tok, t) for t in TEXTS]
    for batch_size in (1, 4):  # batches of mixed lengths: padding must not leak in
        got, lengths = sample_degradation(model, tok, TEXTS, reference, batch_size=batch_size, progress=False)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)
        assert lengths.tolist() == [len(t) for t in TEXTS]
    got, lengths = sample_degradation(model, tok, TEXTS, reference, batch_size=3, max_length=5, progress=False)
    np.testing.assert_allclose(got, [direct_jsd(model, reference, tok, t, 5) for t in TEXTS], rtol=1e-4, atol=1e-7)
    assert lengths.tolist() == [min(5, len(t)) for t in TEXTS]


def test_a_peft_model_is_compared_with_its_disabled_adapter():
    from peft import get_peft_model

    from peft_alps import HeadMaskConfig

    base = tiny_llama(0)
    original = copy.deepcopy(base)
    model = get_peft_model(base, HeadMaskConfig(heads={0: [1], 1: [0, 3]}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)
    tok = char_tokenizer()
    got, _ = sample_degradation(model, tok, TEXTS, batch_size=4, progress=False)
    want = [direct_jsd(model, original, tok, t) for t in TEXTS]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)
    assert (got > 0).all()


def test_without_a_reference_the_degradation_is_the_models_own_loss():
    model, tok = tiny_llama(0), char_tokenizer()
    got, _ = sample_degradation(model, tok, TEXTS, batch_size=4, progress=False)
    for text, score in zip(TEXTS, got):
        ids = tok(text, return_tensors="pt").input_ids
        want = model(input_ids=ids, labels=ids).loss.item() if ids.shape[1] > 1 else 0.0
        assert math.isclose(score, want, rel_tol=1e-4, abs_tol=1e-6)


def hamilton(means, budget):
    """Largest-remainder apportionment without caps, written directly."""
    quotas = [budget * m / sum(means) for m in means]
    counts = [math.floor(q) for q in quotas]
    by_fraction = sorted(range(len(means)), key=lambda c: (-(quotas[c] - counts[c]), c))
    for c in by_fraction[:budget - sum(counts)]:
        counts[c] += 1
    return counts, quotas


def test_budget_follows_degradation_shares_by_largest_remainder():
    rng = np.random.default_rng(0)
    for _ in range(50):
        c = int(rng.integers(1, 12))
        means = rng.random(c) + 0.01
        budget = int(rng.integers(0, 200))
        got = allocate_budget(means, [10_000] * c, budget)  # sizes never bind
        want, quotas = hamilton(list(means), budget)
        assert got == want and sum(got) == budget
        assert all(abs(g - q) < 1 for g, q in zip(got, quotas))


def test_budget_is_capped_by_cluster_size_and_the_rest_redistributed():
    # cluster 0 would get 20 * 10/12 = 16.7 but holds 2: the other 18 go 9 / 9 by their equal means
    assert allocate_budget([10, 1, 1], [2, 50, 50], 20) == [2, 9, 9]
    # cascading caps; all samples wanted -> every cluster full
    assert allocate_budget([5, 4, 1], [1, 2, 30], 33) == [1, 2, 30]
    assert allocate_budget([5, 4, 1], [1, 2, 30], 10) == [1, 2, 7]
    # all means zero: shares follow the sizes; an empty cluster gets nothing
    assert allocate_budget([0, 0, 0], [10, 30, 0], 8) == [2, 6, 0]
    rng = np.random.default_rng(1)
    for _ in range(50):
        c = int(rng.integers(1, 10))
        sizes = rng.integers(0, 20, c)
        budget = int(rng.integers(0, sizes.sum() + 1))
        got = allocate_budget(rng.random(c), sizes, budget)
        assert sum(got) == budget and all(0 <= g <= s for g, s in zip(got, sizes))
    with pytest.raises(ValueError, match="outside"):
        allocate_budget([1, 1], [2, 2], 5)


def test_ranking_inside_a_cluster_is_degradation_over_log_length_squared():
    rng = np.random.default_rng(0)
    degradation, lengths = rng.random(40), rng.integers(1, 300, 40)
    degradation[[3, 7]] = degradation[5]  # ties broken by index
    lengths[[3, 7]] = lengths[5]
    members = rng.permutation(40)[:25]
    want = sorted(members, key=lambda i: (-degradation[i] / math.log(max(lengths[i], 2) ** 2), i))
    assert rank_in_cluster(degradation, lengths, members).tolist() == [int(i) for i in want]


def test_knn_graph_equals_all_pairwise_distances():
    x = np.random.default_rng(0).standard_normal((70, 5)).astype(np.float32)
    x[10] = x[11]  # a duplicate (distance 0)
    idx, d2 = knn_graph(x, 6, block_bytes=4 * 70 * 8)  # blocks of 8 rows
    full = ((x[:, None].astype(np.float64) - x[None]) ** 2).sum(-1)
    np.fill_diagonal(full, np.inf)
    want = np.argsort(full, axis=1, kind="stable")[:, :6]
    assert (np.sort(idx, 1) == np.sort(want, 1)).all()
    np.testing.assert_allclose(d2, np.take_along_axis(full, idx, 1), rtol=1e-4, atol=1e-5)


def test_spectral_clusters_find_separated_groups():
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((3, 8)) * 10
    truth = np.repeat([0, 1, 2], [30, 50, 20])
    x = centres[truth] + rng.standard_normal((100, 8))
    labels = spectral_clusters(x, 3, neighbors=8, seed=0)
    # the same partition (up to renaming)
    assert len({(a, b) for a, b in zip(truth, labels)}) == 3 and len(set(labels)) == 3


def test_rake_phrases_and_the_conflict_graph_on_a_hand_made_example():
    # "and" and "for" are stop words; words score degree / frequency
    assert rake_phrases("Fresh red apples and pears, for sale") == ["fresh red apples", "pears", "sale"]
    g = ConceptGraph()
    g.add(["neural networks", "machine learning"])
    assert g.consistent(["machine learning", "neural networks", "gpus"])  # connected, or new
    g.add(["protein folding", "gpus"])
    assert g.consistent(["protein folding", "new idea"])
    assert not g.consistent(["machine learning", "protein folding"])     # both known, never together
    g.add(["single"])  # one concept adds no node (the authors' graph only grows by edges)
    assert g.consistent(["single", "machine learning"])


def test_select_data_skips_a_conflicting_sample_and_takes_the_next():
    texts = ["machine learning is about data", "protein folding is about compute",
             "machine learning, protein folding", "quiet gardens"]
    degradation = np.array([4.0, 3.0, 2.0, 1.0])
    emb = np.eye(4, dtype=np.float32)
    assert rake_phrases(texts[0]) == ["machine learning", "data"]
    sel = select_data(texts, embeddings=emb, degradation=degradation, lengths=[10] * 4, budget=3, clusters=1)
    assert sel.indices == [0, 1, 3]  # 2 pairs "machine learning" with "protein folding": rejected
    assert sel.clusters[0].rejected == 1 and sel.clusters[0].selected == 3
    off = select_data(texts, embeddings=emb, degradation=degradation, lengths=[10] * 4, budget=3, clusters=1,
                      conflicts=False)
    assert off.indices == [0, 1, 2]


def blob_embed(texts):
    """A tiny injectable embedding: three well-separated groups by the text's first letter."""
    centre = {"a": 0, "b": 1, "c": 2}
    rng = np.random.default_rng(len(texts))
    x = rng.standard_normal((len(texts), 6)) * 0.1
    for i, t in enumerate(texts):
        x[i, centre[t[0]]] += 5
    return x


def test_select_data_spends_the_budget_by_degradation_and_is_deterministic():
    texts = [f"{g} item number {i}" for g in "abc" for i in range(20)]
    rng = np.random.default_rng(0)
    degradation = np.concatenate([rng.random(20) * 3, rng.random(20), rng.random(20) * 0.2]) + 0.01
    lengths = rng.integers(5, 50, 60)
    sel = select_data(texts, embed=blob_embed, degradation=degradation, lengths=lengths, budget=0.25, clusters=3,
                      conflicts=False, seed=3)
    assert sel.budget == 15 and len(sel.indices) == 15 and len(set(sel.indices)) == 15
    groups = [[i for i in range(60) if sel.labels[i] == c] for c in range(3)]
    assert sorted(map(len, groups)) == [20, 20, 20] and all(len({texts[i][0] for i in g}) == 1 for g in groups)
    means = [degradation[g].mean() for g in groups]
    assert [c.budget for c in sel.clusters] == hamilton(means, 15)[0]
    for c, g in zip(sel.clusters, groups):  # each cluster's best-ranked samples, its budget's worth
        assert set(sel.indices) & set(g) == set(rank_in_cluster(degradation, lengths, g)[:c.budget].tolist())
        assert c.selected == c.budget and math.isclose(c.mean_degradation, degradation[g].mean())
    again = select_data(texts, embed=blob_embed, degradation=degradation, lengths=lengths, budget=0.25, clusters=3,
                        conflicts=False, seed=3)
    assert again.indices == sel.indices and (again.labels == sel.labels).all()
    json.dumps(sel.to_dict())


def test_select_data_with_a_model_is_deterministic_and_matches_its_parts():
    model, tok = tiny_llama(0), char_tokenizer()
    texts = [f"{g}{i} " * (1 + i % 4) for g in "abc" for i in range(6)]
    runs = [select_data(texts, model, tok, budget=5, clusters=3, embed=blob_embed, seed=1, progress=False)
            for _ in range(2)]
    assert runs[0].indices == runs[1].indices and len(runs[0].indices) == 5 and runs[0].mode == "loss"
    scores, lengths = sample_degradation(model, tok, texts, progress=False)
    np.testing.assert_allclose(runs[0].degradation, scores)
    assert runs[0].lengths.tolist() == lengths.tolist()


def test_bad_input_is_refused_with_the_fix():
    texts = ["a b", "c d", "e f"]
    with pytest.raises(ValueError, match="budget must be in"):
        select_data(texts, degradation=[1, 1, 1], embeddings=np.eye(3), budget=4)
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        select_data(texts, degradation=[1, 1, 1], embeddings=np.eye(3), budget=1.5)
    with pytest.raises(ValueError, match="embeddings must have shape"):
        select_data(texts, degradation=[1, 1, 1], embeddings=np.eye(2))
    with pytest.raises(ValueError, match="pass model and tokenizer"):
        select_data(texts, embeddings=np.eye(3))
    with pytest.raises(ValueError, match="NaN"):
        select_data(texts, degradation=[1, float("nan"), 1], embeddings=np.eye(3))


def test_probe_trains_on_the_selected_items_only():
    from peft_alps.data import text_batches
    from peft_alps.scoring.probe import probe_task_model

    model, tok = tiny_llama(0), char_tokenizer()
    texts = [t for t in TEXTS if len(t) > 1]  # a one-token text has no next-token loss
    batches = text_batches(tok, texts, batch_size=1)
    sel = select_data(texts, embeddings=np.eye(len(texts)), degradation=np.arange(len(texts)) + 1.0, budget=3,
                      clusters=2, conflicts=False)
    got = probe_task_model(model, batches, steps=3, lr=1e-2, select=sel)
    want = probe_task_model(model, [batches[i] for i in sel.indices], steps=3, lr=1e-2)
    assert got.losses == want.losses
    for name in want.tensors:
        torch.testing.assert_close(got.tensors[name], want.tensors[name], rtol=0, atol=0)
    with pytest.raises(ValueError, match="indices into data"):
        probe_task_model(model, batches, steps=1, select=[0, 99])


def test_recovery_texts_are_the_selection_against_the_base():
    from peft import get_peft_model

    from peft_alps import HeadMaskConfig
    from peft_alps.data import recovery_texts

    texts = [f"{g} general text {i}" for g in "abc" for i in range(5)]
    model = get_peft_model(tiny_llama(0), HeadMaskConfig(heads={0: [1]}))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    tok = char_tokenizer()
    got = recovery_texts(model, tok, texts, budget=4, clusters=3, embed=blob_embed, progress=False)
    sel = select_data(texts, model, tok, budget=4, clusters=3, embed=blob_embed, progress=False)
    assert sel.mode == "jsd-base" and got == sel.texts(texts) and len(got) == 4
    with pytest.raises(ValueError, match="PeftModel, or reference"):
        recovery_texts(tiny_llama(0), tok, texts)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("select")
    tiny_llama(0).save_pretrained(root / "model")
    char_tokenizer().save_pretrained(root / "model")
    tiny_llama(1).save_pretrained(root / "reference")
    texts = [f"{g}{i} and more words here {i * i}" for g in "abc" for i in range(6)]
    (root / "texts.txt").write_text("\n".join(texts) + "\n")
    return root, texts


def test_cli_select_data_equals_the_python_api(folder, tmp_path, monkeypatch, capsys):
    from peft_alps import cli
    from peft_alps.data_selection import select as select_module

    root, texts = folder
    monkeypatch.setattr(select_module, "embed_texts", lambda xs, **kw: blob_embed(xs))  # no MiniLM in unit tests
    code = cli.main(["select-data", str(root / "texts.txt"), "--model", str(root / "model"), "--reference",
                     str(root / "reference"), "--budget", "0.3", "--clusters", "3", "--out", str(tmp_path / "o")])
    out, err = capsys.readouterr()
    assert code == 0, err
    record = json.loads((tmp_path / "o" / "selection.json").read_text())
    model = tf.AutoModelForCausalLM.from_pretrained(root / "model", attn_implementation="eager")
    reference = tf.AutoModelForCausalLM.from_pretrained(root / "reference", attn_implementation="eager")
    tok = tf.AutoTokenizer.from_pretrained(root / "model")
    want = select_data(texts, model, tok, reference, budget=0.3, clusters=3, embed=blob_embed, progress=False)
    assert record["indices"] == want.indices and record["mode"] == "jsd"
    assert [json.loads(line)["text"] for line in (tmp_path / "o" / "selected.jsonl").read_text().splitlines()] \
        == want.texts(texts)
    assert "Selected 5 of 18 texts" in out
    # refused before anything is written
    for argv, message in ((["--budget", "1.5"], "whole count"), (["--budget", "99"], "more than the 18"),
                          (["--clusters", "0"], "--clusters must be >= 1")):
        code = cli.main(["select-data", str(root / "texts.txt"), "--model", str(root / "model"), "--out",
                         str(tmp_path / "bad"), *argv])
        assert code == 2 and message in capsys.readouterr().err
        assert not (tmp_path / "bad").exists()


def test_cli_localize_select_probes_on_the_selection(folder, tmp_path, monkeypatch, capsys):
    from peft_alps import HeadScores, cli, score_heads
    from peft_alps.data import text_batches
    from peft_alps.data_selection import select as select_module
    from peft_alps.scoring.probe import probe_task_model

    root, texts = folder
    monkeypatch.setattr(select_module, "embed_texts", lambda xs, **kw: blob_embed(xs))
    code = cli.main(["localize", str(root / "model"), "--data", str(root / "texts.txt"), "--select", "6",
                     "--steps", "2", "--lr", "1e-2", "--no-heatmap", "--out", str(tmp_path / "h")])
    assert code == 0, capsys.readouterr().err
    got = HeadScores.load(tmp_path / "h" / "scores.json")
    assert got.sources["select"] == 6 and got.sources["examples"] == 6
    model = tf.AutoModelForCausalLM.from_pretrained(root / "model", attn_implementation="eager")
    tok = tf.AutoTokenizer.from_pretrained(root / "model")
    chosen = select_data(texts, model, tok, budget=6, embed=blob_embed, progress=False).texts(texts)
    want = score_heads(str(root / "model"), probe_task_model(model, text_batches(tok, chosen, 4, 256), steps=2,
                                                             lr=1e-2))
    torch.testing.assert_close(got.scores, want.scores, rtol=1e-5, atol=0)


def test_select_data_help_loads_no_torch():
    import subprocess
    import sys

    code = ("import sys; from peft_alps import cli; assert cli.main(['select-data', '--help']) == 0; "
            "assert 'torch' not in sys.modules, 'torch loaded'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "--budget" in out.stdout and "--adapter" in out.stdout


def test_embeddings_are_mean_pooled_and_normalised_whatever_the_batching():
    from peft_alps.data_selection.embed import embed_texts

    torch.manual_seed(0)
    encoder = tf.BertModel(tf.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=48, max_position_embeddings=64)).eval()
    tok = char_tokenizer()
    got = embed_texts(TEXTS, encoder, tok, batch_size=4, progress=False)
    for text, row in zip(TEXTS, got):  # each text alone: no padding, a plain mean over its tokens
        with torch.no_grad():
            hidden = encoder(**tok(text, return_tensors="pt")).last_hidden_state[0]
        want = hidden.mean(0) / hidden.mean(0).norm()
        np.testing.assert_allclose(row, want.numpy(), rtol=1e-4, atol=1e-5)
