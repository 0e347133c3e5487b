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
import scipy.spatial.distance
import scipy.special
import scipy.stats
import torch
import transformers as tf
from peft import get_peft_model

import peft_alps
from peft_alps import HeadLayout, HeadMaskConfig, HeadScores, LayoutError, score_heads, select_heads
from peft_alps.scoring import sources
from peft_alps.scoring import weight_scores as localize
from peft_alps.scoring.weight_scores import METRICS, REPRESENTATIONS
from peft_alps.scoring.probe import probe_task_model

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
    monkeypatch.setattr(sources, "safe_open", counter)
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
    monkeypatch.setattr(sources, "safe_open", lambda *a, **k: pytest.fail("read a tensor"))
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


# ----- 6. zero probabilities (softmax underflow at small tau) -----
ZERO_CASES = {  # name: (p, q), each a probability vector with exact zeros
    "zeros in p only": ([0.0, 0.2, 0.3, 0.5, 0.0], [0.1, 0.2, 0.3, 0.3, 0.1]),
    "zeros in q only": ([0.1, 0.2, 0.3, 0.3, 0.1], [0.0, 0.2, 0.3, 0.5, 0.0]),
    "zeros in both, same places": ([0.0, 0.5, 0.0, 0.5, 0.0], [0.0, 0.3, 0.0, 0.7, 0.0]),
    "zeros in both, other places": ([0.0, 0.5, 0.25, 0.25, 0.0], [0.5, 0.5, 0.0, 0.0, 0.0]),
}


def scipy_kl(p, q):
    return float(scipy.special.rel_entr(p, q).sum())  # 0 log(0/q) = 0; +inf where q_i = 0 < p_i


def scipy_js(p, q):
    # scipy's jensenshannon is the square root of 0.5 KL(P||M) + 0.5 KL(Q||M) (natural log by default):
    # squared, it is the definition distance() uses
    js = scipy.spatial.distance.jensenshannon(p, q) ** 2
    m = (np.asarray(p) + np.asarray(q)) / 2
    assert js == pytest.approx(0.5 * scipy_kl(p, m) + 0.5 * scipy_kl(q, m), rel=1e-12, abs=1e-15)
    return js


@pytest.mark.parametrize("case", ZERO_CASES)
def test_kl_and_js_with_zero_entries_match_scipy(case):
    p, q = (torch.tensor(v, dtype=torch.float64) for v in ZERO_CASES[case])
    kl, js = localize.distance(p, q, "kl"), localize.distance(p, q, "js")
    want_kl, want_js = scipy_kl(p.numpy(), q.numpy()), scipy_js(p.numpy(), q.numpy())
    assert not torch.isnan(kl) and not torch.isnan(js)
    assert (kl.item() == want_kl == float("inf")) if case in ("zeros in q only", "zeros in both, other places") \
        else kl.item() == pytest.approx(want_kl, rel=1e-12)
    assert js.item() == pytest.approx(want_js, rel=1e-12) and 0 < js.item() <= np.log(2)
    # batched [B, N] with all cases at once gives the same rows
    ps, qs = (torch.tensor([c[i] for c in ZERO_CASES.values()], dtype=torch.float64) for i in (0, 1))
    row = list(ZERO_CASES).index(case)
    assert localize.distance(ps, qs, "kl")[row].item() == kl.item()
    assert localize.distance(ps, qs, "js")[row].item() == js.item()


def test_identical_inputs_with_zeros_are_exactly_zero_for_every_metric():
    p = torch.tensor([[0.0, 0.25, 0.0, 0.75], [0.5, 0.0, 0.5, 0.0], [1.0, 0.0, 0.0, 0.0],
                      [5e-324, 1e-300, 0.0, 1.0]], dtype=torch.float64)  # the last row: subnormal and tiny entries
    for metric in METRICS:
        got = localize.distance(p, p.clone(), metric)
        assert (got == 0).all(), (metric, got)
        assert (localize.distance(p.clone(), p.clone(), metric, overwrite=True) == 0).all(), metric


def test_js_is_finite_for_subnormal_against_zero():
    # p_0 is the smallest subnormal: (p_0 + q_0) / 2 rounds to 0, a naive M = (P + Q) / 2 would give inf
    p = torch.tensor([5e-324, 1.0], dtype=torch.float64)
    q = torch.tensor([0.0, 1.0], dtype=torch.float64)
    js = localize.distance(p, q, "js").item()
    assert 0 <= js <= np.log(2) and np.isfinite(js)
    assert localize.distance(p, q, "kl").item() == float("inf")


@pytest.mark.parametrize("representation", REPRESENTATIONS)
def test_tiny_tau_scores_have_no_nan_and_self_scores_are_zero(representation):
    base = make_model("llama", 0)
    nearby = copy.deepcopy(base)  # overlapping distributions: finite and infinite KL, JS below log 2
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, w in nearby.named_parameters():
            if "self_attn" in name:
                w.add_(1e-4 * torch.randn(w.shape, generator=g))
    # weights ~ N(0, 0.02), head vectors span ~0.002 (product) / ~0.14 (concat): at these tau over a quarter of
    # the softmax entries underflow to exactly 0 (real models get there at tau ~ 0.3 / 0.01)
    tau = {"product": 1e-6, "concat": 1e-4}[representation]
    for task in (make_model("llama", 1), nearby):
        dists = [(softmax(ref_vector(base, "llama", 0, h, representation) / tau),
                  softmax(ref_vector(task, "llama", 0, h, representation) / tau)) for h in range(4)]
        assert all((p == 0).mean() > 0.25 and (q == 0).mean() > 0.25 for p, q in dists)  # the case under test
        got = {metric: score_heads(base, task, metric, representation, tau=tau).scores for metric in METRICS}
        for metric, s in got.items():
            assert not torch.isnan(s).any(), metric
            assert (s >= 0).all(), metric  # kl may be +inf (some q_i == 0 < p_i), never NaN
        # the product is computed in float32: at tau 1e-6 its rounding moves the logits by ~1e-4, so only
        # concat (exact float32 weights, no arithmetic) is compared with the float64 reference
        for head, (p, q) in enumerate(dists if representation == "concat" else []):
            assert got["kl"][0, head].item() == pytest.approx(scipy_kl(p, q), rel=1e-5, abs=1e-15)  # inf or finite
            # scipy's M = (P + Q) / 2 rounds a subnormal p_i > 0 = q_i to m_i = 0 (JS = inf): flush subnormals
            # to 0 for the reference, which moves JS by < 1e-300
            flush = [np.where(x < np.finfo(np.float64).tiny, 0.0, x) for x in (p, q)]
            assert got["js"][0, head].item() == pytest.approx(scipy_js(*flush), rel=1e-5, abs=1e-15)
    # the last task was `nearby`: both kinds of KL occur, and JS is not saturated at log 2
    assert torch.isinf(got["kl"]).any() and torch.isfinite(got["kl"]).any() and (got["js"] < 0.5).all()
    for metric in METRICS:  # the base scored against itself (same object, or a copy): exactly 0
        for other in (base, copy.deepcopy(base)):
            assert (score_heads(base, other, metric, representation, tau=tau).scores == 0).all(), metric


def test_infinite_scores_rank_first_and_nan_is_refused(tmp_path):
    inf = float("inf")
    s = HeadScores(torch.tensor([[0.1, inf], [inf, 0.2]]), "kl", "product", 0.01, {}, {})
    assert s.top(3) == [(0, 1, inf), (1, 0, inf), (1, 1, pytest.approx(0.2))]
    assert select_heads(s, 0.5) == {0: [1], 1: [0]}
    assert select_heads(s, 0.5, per_layer=True) == {0: [1], 1: [0]}
    s.save(tmp_path / "scores.json")  # JSON has no inf: Python's json writes Infinity and reads it back
    assert torch.equal(HeadScores.load(tmp_path / "scores.json").scores, s.scores)
    nan = HeadScores(torch.tensor([[0.1, float("nan")], [inf, 0.2]]), "kl", "product", 0.01, {}, {})
    with pytest.raises(ValueError, match="NaN"):
        nan.top(1)
    with pytest.raises(ValueError, match="NaN"):
        select_heads(nan, 0.5)


# ----- 7. custom layout (an architecture peft_alps has no built-in layout for) -----
BIOGPT_LAYOUT = dict(model_type="biogpt", num_layers=2, num_heads=4, num_kv_heads=4, head_dim=16, hidden_size=64,
                     layers="layers", modules={"q": "self_attn.q_proj", "k": "self_attn.k_proj",
                                               "v": "self_attn.v_proj", "o": "self_attn.out_proj"})


def make_biogpt(seed=0):
    """A tiny BioGPT (layers.N.self_attn.{q,k,v,out}_proj): an architecture without a built-in layout."""
    torch.manual_seed(seed)
    config = tf.BioGptConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=96, max_position_embeddings=64)
    return tf.BioGptForCausalLM(config).eval()


def test_the_custom_layout_example_is_not_built_in():
    assert make_biogpt().config.model_type == "biogpt" and "biogpt" not in peft_alps.ARCHITECTURES


def biogpt_head_vector(model, layer, head, representation):
    """A head's representation built by hand from BioGPT's q/k/v nn.Linear rows (no layout code)."""
    attn = model.biogpt.layers[layer].self_attn
    rows = [m.weight.detach()[head * 16:(head + 1) * 16].double().numpy() for m in
            (attn.q_proj, attn.k_proj, attn.v_proj)]  # [d_head, d_model] each
    if representation == "concat":
        return np.concatenate([r.reshape(-1) for r in rows])
    wq, wk, wv = (r.T for r in rows)  # x @ W frame [d_model, d_head]
    return (wq @ wk.T @ wv).reshape(-1)


def wrong_layouts():
    """(layout dict, error pattern) pairs that do not fit the 2-layer 4 x 16 BioGPT model.

    num_heads=8, head_dim=8 has exactly the same q/k/v/o sizes as 4 x 16: no shape check can catch it.
    """
    q = r"q_proj(\.weight)? has 64"  # module (nn.Module input) or tensor name (checkpoint)
    return [({**BIOGPT_LAYOUT, "head_dim": 32}, q + r" output features.*head_dim=32"),
            ({**BIOGPT_LAYOUT, "num_heads": 8, "num_kv_heads": 8}, q + r" output features.*num_heads=8"),
            ({**BIOGPT_LAYOUT, "hidden_size": 32}, q + r" input features.*hidden_size=32"),
            ({**BIOGPT_LAYOUT, "num_heads": 2, "num_kv_heads": 2},
             q + r" output features.*check num_heads and head_dim.*num_heads=2"),  # exact features: caught at q
            ({**BIOGPT_LAYOUT, "num_layers": 3}, r"layers\.2\.self_attn\.q_proj.*num_layers=3"),
            ({**BIOGPT_LAYOUT, "num_layers": 1}, r"layers\.1\.self_attn\.q_proj.*num_layers=1"),
            ({**BIOGPT_LAYOUT, "modules": {**BIOGPT_LAYOUT["modules"], "q": "self_attn.query"}}, r"self_attn\.query"),
            ({**BIOGPT_LAYOUT, "layers": "h"}, r"h\.0\.self_attn\.q_proj"),
            ({**BIOGPT_LAYOUT, "bogus": 1}, r"unknown key\(s\) \['bogus'\]")]


@pytest.mark.parametrize("representation", REPRESENTATIONS)
def test_custom_layout_scores_an_unknown_architecture(representation, tmp_path):
    base, task = make_biogpt(0), make_biogpt(1)
    with pytest.warns(UserWarning, match="inferred"):  # in-memory models: the layout is inferred from them
        inferred = score_heads(base, task, "pad", representation)
    assert inferred.layout == HeadLayout.from_dict(BIOGPT_LAYOUT).to_dict()
    for layout in (BIOGPT_LAYOUT, HeadLayout.from_dict(BIOGPT_LAYOUT)):
        got = score_heads(base, task, "pad", representation, layout=layout)
        assert got.layout == HeadLayout.from_dict(BIOGPT_LAYOUT).to_dict()
        assert got.scores.shape == (2, 4) and (got.scores > 0).all()
        for layer, head in [(0, 0), (1, 3)]:
            p = softmax(biogpt_head_vector(base, layer, head, representation))
            q = softmax(biogpt_head_vector(task, layer, head, representation))
            assert got.scores[layer, head].item() == pytest.approx(ref_distance(p, q, "pad"), rel=1e-6)
    # checkpoint folders: same layout, same scores
    base.save_pretrained(tmp_path / "base")
    task.save_pretrained(tmp_path / "task")
    from_paths = score_heads(tmp_path / "base", tmp_path / "task", "pad", representation, layout=BIOGPT_LAYOUT)
    assert torch.equal(from_paths.scores, got.scores) and from_paths.layout == got.layout
    assert torch.equal(inferred.scores, got.scores)
    with pytest.raises(LayoutError, match="model_type='biogpt'.*infer_layout.*layout="):  # no model to infer from
        score_heads(tmp_path / "base", tmp_path / "task", layout=None)


def test_custom_layout_with_a_probe_fine_tune():
    base = make_biogpt(0)
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": ids, "labels": ids} for ids in (torch.randint(2, 128, (2, 12), generator=g)
                                                             for _ in range(2))]
    base.train()  # the probe trains with dropout: same seed, same steps
    with pytest.warns(UserWarning, match="inferred"):
        torch.manual_seed(0)
        inferred = probe_task_model(base, batches, steps=2, lr=1e-2)
    assert base.training  # the layout check ran in eval mode and put the mode back
    torch.manual_seed(0)
    probe = probe_task_model(base, batches, steps=2, lr=1e-2, layout=BIOGPT_LAYOUT)
    assert sorted(probe.tensors) == sorted(f"biogpt.layers.{i}.self_attn.{p}_proj.weight"
                                           for i in range(2) for p in "qkv")
    assert all(torch.equal(inferred.tensors[k], v) for k, v in probe.tensors.items())
    got = score_heads(base, probe, layout=BIOGPT_LAYOUT)
    assert (got.scores > 0).all() and got.layout == HeadLayout.from_dict(BIOGPT_LAYOUT).to_dict()
    with pytest.warns(UserWarning, match="inferred"):  # from the in-memory base, used for the probe weights too
        assert torch.equal(score_heads(base, probe).scores, got.scores)
    with pytest.raises(LayoutError, match="head_dim=32"):  # probe weights hold q/k/v only: checked all the same
        score_heads(base, probe, layout={**BIOGPT_LAYOUT, "head_dim": 32})
    with pytest.raises(LayoutError, match="head_dim=32"):
        probe_task_model(base, batches, steps=1, layout={**BIOGPT_LAYOUT, "head_dim": 32})


def test_wrong_custom_layout_raises(tmp_path):
    base, task = make_biogpt(0), make_biogpt(1)
    base.save_pretrained(tmp_path / "base")
    for layout, match in wrong_layouts():
        with pytest.raises(LayoutError, match=match):
            score_heads(base, task, layout=layout)
        with pytest.raises(LayoutError, match=match):
            score_heads(tmp_path / "base", task, layout=layout)


def test_layout_given_for_a_known_architecture_must_agree():
    base, task = make_model("llama", 0), make_model("llama", 1)
    derived = HeadLayout.from_model_config(base.config)
    assert torch.equal(score_heads(base, task, layout=derived.to_dict()).scores, score_heads(base, task).scores)
    other = {**derived.to_dict(), "num_heads": 8, "num_kv_heads": 4, "head_dim": 8}  # same q/k/v/o sizes
    with pytest.raises(LayoutError, match="does not match.*num_heads"):
        score_heads(base, task, layout=other)
