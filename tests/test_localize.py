"""Head scoring (ALPS localize) and head selection.

References are independent of peft_alps' layout code: weight slices come from
conftest's ``head_mask`` (tensor views), distances from scipy / numpy.
"""

import copy
import json
import re
import weakref

import numpy as np
import pytest
import safetensors
import safetensors.torch
import scipy.stats
import torch
import transformers as tf
from peft import get_peft_model

import peft_alps
from peft_alps import HeadMaskConfig, HeadScores, score_heads
from peft_alps import localize
from peft_alps.localize import METRICS, REPRESENTATIONS

from conftest import ARCH_NAMES, ARCHS, _DEC, block_module, head_mask, linear_frame, make_model

LAYER, HEAD = 1, 3  # the planted head (kv group 1 of 2 under GQA: heads 2 and 3 share it)


# ----- independent references -----
def ref_distance(p, q, metric):
    """Distance between probability vectors p, q (numpy / scipy)."""
    n = len(p)
    if metric in ("pad", "wasserstein"):
        support = np.arange(n) / (n - 1 if metric == "pad" else 1)
        return scipy.stats.wasserstein_distance(u_values=support, v_values=support, u_weights=p, v_weights=q)
    if metric == "kl":
        return float(np.sum(p * np.log(p / q)))
    if metric == "js":
        m = (p + q) / 2
        return float(0.5 * np.sum(p * np.log(p / m)) + 0.5 * np.sum(q * np.log(q / m)))
    if metric == "cosine":
        return float(1 - p @ q / (np.linalg.norm(p) * np.linalg.norm(q)))
    return float(np.linalg.norm(p - q))


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def head_slice(model, arch, layer, part, head):
    """``[d_model, d_head]`` slice of ``part`` for query ``head`` in the x @ W frame, as float64 numpy."""
    mod = block_module(model, arch, layer, part)
    w = linear_frame(mod.weight, mod).detach()
    rows = w[head_mask(arch, part, head, w.shape[0], w.shape[1], model.config)].reshape(-1, w.shape[1])
    return rows.double().numpy().T


def ref_vector(model, arch, layer, head, representation):
    wq, wk, wv = (head_slice(model, arch, layer, p, head) for p in "qkv")
    if representation == "product":
        return (wq @ wk.T @ wv).reshape(-1)
    # the released script flattens nn.Linear rows ([d_head, d_model]), i.e. the x @ W slices transposed
    return np.concatenate([wq.T.reshape(-1), wk.T.reshape(-1), wv.T.reshape(-1)])


def perturb(model, arch, layer, parts, head, seed=0):
    """Add noise to the entries of ``parts`` owned by ``head`` (conftest mask, not layout code)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for part in parts:
            mod = block_module(model, arch, layer, part)
            w = linear_frame(mod.weight, mod)
            m = head_mask(arch, part, head, w.shape[0], w.shape[1], model.config)
            w[m] += 0.5 * torch.randn(int(m.sum()), generator=g)


def group_heads(config, head):
    """Query heads sharing ``head``'s key/value group."""
    nh = config.num_attention_heads
    nkv = getattr(config, "num_key_value_heads", None) or nh
    return [h for h in range(nh) if h * nkv // nh == head * nkv // nh]


# ----- 1. metrics -----
@pytest.mark.parametrize("metric", METRICS)
def test_metric_matches_reference(metric):
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(6, 37, generator=g, dtype=torch.float64), -1)
    q = torch.softmax(torch.randn(6, 37, generator=g, dtype=torch.float64), -1)
    want = [ref_distance(a, b, metric) for a, b in zip(p.numpy(), q.numpy())]
    np.testing.assert_allclose(localize.distance(p, q, metric).numpy(), want, rtol=1e-6, atol=0)
    assert (localize.distance(p, p.clone(), metric) == 0).all()
    np.testing.assert_allclose(localize.distance(p.clone(), q, metric, overwrite=True).numpy(), want, rtol=1e-6)


def test_wasserstein_is_n_minus_1_times_pad():
    p, q = (torch.softmax(torch.randn(3, 11, dtype=torch.float64), -1) for _ in range(2))
    torch.testing.assert_close(localize.distance(p, q, "wasserstein"), 10 * localize.distance(p, q, "pad"))


@pytest.mark.parametrize("arch", ["llama", "phi3", "gpt2", "gpt_neox", "bert"])
@pytest.mark.parametrize("representation", REPRESENTATIONS)
def test_score_matches_hand_computation(arch, representation):
    base, task = make_model(arch, seed=0), make_model(arch, seed=1)
    tau = 0.5
    for metric in METRICS:
        scores = score_heads(base, task, metric, representation, tau=tau).scores
        for layer, head in [(0, 0), (LAYER, HEAD)]:
            p = softmax(ref_vector(base, arch, layer, head, representation) / tau)
            q = softmax(ref_vector(task, arch, layer, head, representation) / tau)
            assert scores[layer, head].item() == pytest.approx(ref_distance(p, q, metric), rel=1e-6)


# ----- 2. planted change -----
@pytest.mark.parametrize("arch", ARCH_NAMES)
@pytest.mark.parametrize("representation", REPRESENTATIONS)
@pytest.mark.parametrize("parts", ["q", "kv"])
def test_planted_change_is_found(arch, representation, parts):
    base = make_model(arch)
    task = copy.deepcopy(base)
    perturb(task, arch, LAYER, parts, HEAD)
    changed = [HEAD] if parts == "q" else group_heads(base.config, HEAD)
    assert (parts == "kv" and arch in ("llama", "mistral", "qwen2", "phi3")) == (len(changed) == 2)
    for metric in METRICS:
        s = score_heads(base, task, metric, representation).scores
        assert s.shape == (3, 4)
        nonzero = {(layer, head) for layer, head in (s != 0).nonzero().tolist()}
        assert nonzero == {(LAYER, h) for h in changed}, metric
        if parts == "q":
            assert s.flatten().argmax().item() == LAYER * 4 + HEAD, metric


# ----- 3. checkpoints -----
class CountingSafeOpen:
    """Wraps ``safe_open``: records every tensor read and the peak bytes of read tensors alive at once."""

    def __init__(self, real):
        self.real, self.reads, self.alive, self.peak = real, [], 0, 0

    def __call__(self, filename, *args, **kwargs):
        return _Handle(self.real(filename, *args, **kwargs), str(filename), self)

    def _release(self, nbytes):
        self.alive -= nbytes


class _Handle:
    def __init__(self, inner, filename, counter):
        self.inner, self.filename, self.counter = inner, filename, counter

    def __enter__(self):
        self.inner.__enter__()
        return self

    def __exit__(self, *exc):
        return self.inner.__exit__(*exc)

    def keys(self):
        return self.inner.keys()

    def get_tensor(self, name):
        t = self.inner.get_tensor(name)
        c = self.counter
        c.reads.append((self.filename, name))
        c.alive += t.nbytes
        c.peak = max(c.peak, c.alive)
        weakref.finalize(t.untyped_storage(), c._release, t.nbytes)  # storage: views keep it alive
        return t


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_checkpoints_equal_modules_and_read_one_layer_at_a_time(arch, tmp_path, monkeypatch):
    base, task = make_model(arch, seed=0), make_model(arch, seed=1)
    dirs = []
    for name, model in [("base", base), ("task", task)]:
        model.save_pretrained(tmp_path / name, max_shard_size="50KB")
        assert (tmp_path / name / "model.safetensors.index.json").is_file()
        assert len(list((tmp_path / name).glob("model-*.safetensors"))) > 1
        dirs.append(tmp_path / name)
    from_modules = score_heads(base, task, "pad", "concat").scores

    counter = CountingSafeOpen(safetensors.safe_open)
    monkeypatch.setattr(localize, "safe_open", counter)
    for fn in ("load_file", "load"):
        monkeypatch.setattr(safetensors.torch, fn, lambda *a, **k: pytest.fail("whole-file load"))
    from_paths = score_heads(str(dirs[0]), dirs[1], "pad", "concat")
    assert torch.equal(from_paths.scores, from_modules)
    assert from_paths.sources == {"base": str(dirs[0]), "task": str(dirs[1])}

    # only attention q/k/v weights, each once per model
    _, _, modules, blocks, _ = ARCHS[arch]
    qkv = "|".join(re.escape(m) for m in {modules[p] for p in "qkv"})
    pattern = re.compile(rf"(^|\.){blocks}\.\d+\.({qkv})\.weight$")
    assert all(pattern.search(name) for _, name in counter.reads), counter.reads
    names = [(f.split("/")[-2], name) for f, name in counter.reads]
    assert len(names) == len(set(names)) == 2 * 3 * len({modules[p] for p in "qkv"})
    # peak bytes of read tensors alive at once <= one layer's q/k/v tensors of each model
    layer_bytes = sum({modules[p]: block_module(base, arch, 0, p).weight.nbytes for p in "qkv"}.values())
    assert layer_bytes <= counter.peak <= 2 * layer_bytes  # measured: exactly one layer (base freed first)
    assert counter.alive == 0


def test_single_file_checkpoint_and_progress(tmp_path, capsys):
    base, task = make_model("gpt2", 0), make_model("gpt2", 1)
    task.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and not list(tmp_path.glob("*.index.json"))
    got = score_heads(base, tmp_path, "kl", progress=True)
    assert torch.equal(got.scores, score_heads(base, task, "kl").scores)
    assert "Scoring heads" in capsys.readouterr().err


def test_half_precision_weights_are_scored_in_float32():
    base, task = make_model("qwen2", 0), make_model("qwen2", 1)
    for dtype in (torch.bfloat16, torch.float16):
        half_b, half_t = copy.deepcopy(base).to(dtype), copy.deepcopy(task).to(dtype)
        want = score_heads(copy.deepcopy(half_b).float(), copy.deepcopy(half_t).float()).scores
        assert torch.equal(score_heads(half_b, half_t).scores, want)


def test_peft_model_task_uses_adapter_weights():
    base = make_model("llama")
    peft = get_peft_model(copy.deepcopy(base), HeadMaskConfig(heads={LAYER: [HEAD]}, init_weights=False))
    got = score_heads(base, peft).scores
    merged = score_heads(base, copy.deepcopy(peft).merge_and_unload()).scores
    torch.testing.assert_close(got, merged, rtol=1e-5, atol=0)
    assert {tuple(x) for x in (got != 0).nonzero().tolist()} == {(LAYER, h) for h in group_heads(base.config, HEAD)}


# ----- 5. errors, save / load -----
def test_mismatched_shapes_raise_before_reading(tmp_path, monkeypatch):
    monkeypatch.setattr(localize, "safe_open", lambda *a, **k: pytest.fail("read a tensor"))
    tf.LlamaConfig(**_DEC, num_key_value_heads=2).save_pretrained(tmp_path / "a")  # configs only, no weights
    tf.LlamaConfig(**{**_DEC, "num_hidden_layers": 2}, num_key_value_heads=2).save_pretrained(tmp_path / "b")
    with pytest.raises(ValueError, match="differ in shape.*num_layers': 3.*num_layers': 2"):
        score_heads(tmp_path / "a", tmp_path / "b")
    with pytest.raises(ValueError, match="base llama .* vs task gpt2"):
        score_heads(make_model("llama"), make_model("gpt2"))
    for kwargs in ({"metric": "l1"}, {"representation": "sum"}, {"tau": 0}):
        with pytest.raises(ValueError):
            score_heads(tmp_path / "a", tmp_path / "a", **kwargs)


def test_head_scores_save_load_round_trip(tmp_path):
    s = score_heads(make_model("phi3", 0), make_model("phi3", 1), "js", "concat", tau=2.0)
    s.save(tmp_path / "scores.json")
    assert [p.name for p in tmp_path.iterdir()] == ["scores.json"]  # no temp file left behind
    t = HeadScores.load(tmp_path / "scores.json")
    assert torch.equal(t.scores, s.scores) and t.scores.dtype == torch.float32
    assert (t.metric, t.representation, t.tau, t.layout, t.sources) == (
        "js", "concat", 2.0, s.layout, {"base": "Phi3ForCausalLM", "task": "Phi3ForCausalLM"})
    assert t.layout == peft_alps.HeadLayout.from_model_config(make_model("phi3").config).to_dict()
    assert json.loads((tmp_path / "scores.json").read_text())["scores"] == s.scores.tolist()


def test_top_orders_by_score_then_layer_then_head():
    s = HeadScores(torch.tensor([[0.1, 0.5], [0.5, 0.2]]), "pad", "product", 1.0, {}, {})
    assert s.top(3) == [(0, 1, 0.5), (1, 0, 0.5), (1, 1, pytest.approx(0.2))]
