"""Head-mask adapters on quantized bases (peft_alps.tuner.quantized): torchao int8 weight-only, bitsandbytes int8
and nf4 on CPU, each loaded the way users load them (``from_pretrained(..., quantization_config=...)``).

The reference is independent of the package: the same model as plain float modules whose weights are the
quantized layers' dequantized weights (PEFT's backend), with the head slices added by direct indexing; autograd
through it gives the slices' gradients. Training-mode forwards throughout: bitsandbytes computes differently in
eval mode (int8 activations for 8-bit; a bf16 CPU kernel for 4-bit)."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest
import torch
import transformers as tf
from peft import PeftModel, get_peft_model
from torch.func import functional_call

from peft_alps import HeadMaskConfig, merge_checkpoint
from peft_alps.tuner.layer import HeadMaskLayer

BACKENDS = ("torchao_int8", "bnb_int8", "bnb_nf4")
HEADS = {0: [1], 1: [0, 3]}
PARTS = ["q", "k", "v", "o"]


def tiny_config():
    # attention biases: the bias slices are trained too; intermediate 128: bitsandbytes' 4-bit CPU kernel needs
    # in_features divisible by its block size (64)
    return tf.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, attention_bias=True)


def quantization_config(backend):
    if backend == "torchao_int8":
        pytest.importorskip("torchao")
        from torchao.quantization import Int8WeightOnlyConfig

        return tf.TorchAoConfig(Int8WeightOnlyConfig())
    pytest.importorskip("bitsandbytes")
    if backend == "bnb_int8":
        return tf.BitsAndBytesConfig(load_in_8bit=True)
    return tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)


def save_base(folder, seed=0):
    torch.manual_seed(seed)
    model = tf.LlamaForCausalLM(tiny_config())
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and m.bias is not None:
                m.bias.normal_(0, 0.02)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_base(tmp_path_factory.mktemp("tiny-base"))


def load(folder, backend=None):
    kwargs = {} if backend is None else {"quantization_config": quantization_config(backend)}
    return tf.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager", **kwargs)


def inputs(seed=1):
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids}


def dequantized_weights(model):
    """``{parameter name: plain float tensor}`` of ``model``'s base weights, quantized ones dequantized by PEFT's
    backend (names without PEFT's wrappers)."""
    from peft_alps.tuner.quantized import quantization_backend  # PEFT's backend (dequantization is PEFT's)

    base = model.get_base_model() if isinstance(model, PeftModel) else model
    out = {}
    for name, module in base.named_modules():
        if "headmask_" in name:  # the adapter's own tensors
            continue
        for pname, p in module.named_parameters(recurse=False):
            full = f"{name}.{pname}".replace(".base_layer", "") if name else pname
            if pname == "weight" and not (type(p) in (torch.Tensor, torch.nn.Parameter) and p.is_floating_point()):
                p = quantization_backend(module).get_base_weight(module)
            out[full] = p.detach().float()
    return out


def reference_output(float_model, weights, pm, x):
    """``float_model`` run with ``weights`` (dequantized base) plus every head slice of ``pm`` added by direct
    indexing; returns ``(logits, {layer name: (delta leaf, bias leaf)})``."""
    weights = dict(weights)
    leaves = {}
    for name, module in pm.get_base_model().named_modules():
        if not isinstance(module, HeadMaskLayer):
            continue
        idx = module.headmask_index["default"]
        delta = module.headmask_delta["default"].detach().clone().requires_grad_(True)
        w = weights[f"{name}.weight"].clone()
        if module.headmask_axis["default"] == "out":
            w[idx] = w[idx] + delta
            bias = module.headmask_bias["default"].detach().clone().requires_grad_(True)
            b = weights[f"{name}.bias"].clone()
            b[idx] = b[idx] + bias
            weights[f"{name}.bias"] = b
        else:
            w[:, idx] = w[:, idx] + delta
            bias = None
        weights[f"{name}.weight"] = w
        leaves[name] = (delta, bias)
    return functional_call(float_model, weights, args=(), kwargs=x).logits, leaves


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_matches_the_dequantized_reference(backend, base_dir):
    """Outputs and the slices' gradients equal autograd through the dequantized float model with the slices
    added; the forward is output_add (the quantized layer's own forward plus the slices)."""
    pm = get_peft_model(load(base_dir, backend), HeadMaskConfig(heads=HEADS, parts=PARTS, init_weights=False))
    pm.train()
    layers = {n: m for n, m in pm.get_base_model().named_modules() if isinstance(m, HeadMaskLayer)}
    assert layers and all(m.quantization_backend is not None for m in layers.values())
    assert {m.headmask_strategy["default"] for m in layers.values()} == {"output_add"}
    float_model = load(base_dir).train()
    x = inputs()
    ref, leaves = reference_output(float_model, dequantized_weights(pm), pm, x)
    out = pm(**x).logits
    # bitsandbytes dequantizes and runs F.linear (fp32); torchao runs its int8 kernel: rounding differs slightly
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4), (out - ref).abs().max()
    probe = torch.randn_like(ref)
    (out * probe).sum().backward()
    (ref * probe).sum().backward()
    for name, (delta, bias) in leaves.items():
        layer = layers[name]
        got, want = layer.headmask_delta["default"].grad, delta.grad
        assert want.abs().max() > 0
        assert torch.allclose(got, want, atol=1e-4 * want.abs().max(), rtol=1e-3), (name, (got - want).abs().max())
        if bias is not None:
            got_b = layer.headmask_bias["default"].grad
            assert torch.allclose(got_b, bias.grad, atol=1e-4 * bias.grad.abs().max(), rtol=1e-3), name
    # the frozen quantized base gets no gradient
    assert all(p.grad is None for n, p in pm.named_parameters() if "headmask_" not in n)


@pytest.mark.parametrize("backend", BACKENDS)
def test_save_and_reload_into_a_fresh_quantized_base(backend, base_dir, tmp_path):
    """One training step, save; a freshly quantized base with the saved adapter gives the same outputs, its
    fingerprint matches (no warning), and the fingerprint records the quantized precision."""
    pm = get_peft_model(load(base_dir, backend), HeadMaskConfig(heads=HEADS, parts=PARTS))
    pm.train()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    x = inputs()
    pm(**x, labels=x["input_ids"]).loss.backward()
    opt.step()
    out = pm(**x).logits.detach()
    pm.save_pretrained(tmp_path / "heads")
    recorded = json.loads((tmp_path / "heads" / "adapter_config.json").read_text())
    assert recorded["base_fingerprint"]["dtype"] == ("int4" if backend == "bnb_nf4" else "int8")
    assert recorded["forward_strategy"] is None
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*base weights differ.*")
        loaded = PeftModel.from_pretrained(load(base_dir, backend), tmp_path / "heads")
    loaded.train()
    assert torch.equal(loaded(**x).logits, out)


@pytest.mark.parametrize("backend", BACKENDS)
def test_merging_into_a_quantized_base_is_refused_and_the_streamed_merge_works(backend, base_dir, tmp_path):
    """merge_and_unload / merge_adapter refuse before writing (outputs unchanged, unmerge a no-op); unload gives the
    quantized base back untouched. The adapter merges into the full-precision checkpoint with merge_checkpoint: the
    merged model's logits equal the adapter on the fp32 base."""
    pm = get_peft_model(load(base_dir, backend), HeadMaskConfig(heads=HEADS, parts=PARTS, init_weights=False))
    pm.train()
    x = inputs()
    before = pm(**x).logits.detach()
    base_weights = {k: v.clone() for k, v in dequantized_weights(pm).items()}
    with pytest.raises(RuntimeError, match=r"Cannot merge into a quantized base .*merge_checkpoint"):
        pm.merge_and_unload()
    with pytest.raises(RuntimeError, match=r"Cannot merge into a quantized base"):
        pm.merge_adapter()
    layer = next(m for m in pm.modules() if isinstance(m, HeadMaskLayer))
    with pytest.raises(RuntimeError, match=r"Cannot merge into a quantized base"):
        layer.merge()
    pm.unmerge_adapter()
    assert not any(m.merged for m in pm.modules() if isinstance(m, HeadMaskLayer))
    assert torch.equal(pm(**x).logits, before)
    after = dequantized_weights(pm)
    assert all(torch.equal(after[k], v) for k, v in base_weights.items())
    pm.save_pretrained(tmp_path / "heads")

    merged_dir = merge_checkpoint(base_dir, tmp_path / "heads", tmp_path / "merged")
    merged = load(merged_dir).eval()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*base weights differ.*")  # int8/int4 vs fp32: within tolerance
        on_fp32 = PeftModel.from_pretrained(load(base_dir), tmp_path / "heads").eval()
    with torch.no_grad():
        assert torch.allclose(merged(**x).logits, on_fp32(**x).logits, atol=1e-5, rtol=1e-5)

    unloaded = pm.unload()
    assert not any(isinstance(m, HeadMaskLayer) for m in unloaded.modules())
    assert all(torch.equal(v, base_weights[k]) for k, v in dequantized_weights(unloaded).items())


def test_the_fingerprint_still_catches_another_base(base_dir, tmp_path):
    """An adapter made on a quantized base is refused by the streamed merge into another checkpoint of the same
    shapes (another seed), and loading it onto that base, quantized, warns."""
    pm = get_peft_model(load(base_dir, "torchao_int8"), HeadMaskConfig(heads=HEADS, parts=PARTS, init_weights=False))
    pm.save_pretrained(tmp_path / "heads")
    other = save_base(tmp_path / "other-base", seed=1)
    with pytest.raises(Exception, match=r"base weights differ"):
        merge_checkpoint(other, tmp_path / "heads", tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    with pytest.warns(UserWarning, match=r"base weights differ"):
        PeftModel.from_pretrained(load(other, "torchao_int8"), tmp_path / "heads")


def test_forward_strategy_on_a_quantized_base(base_dir):
    """Unset: 'merged' on a float base, 'output_add' on a quantized one; an explicit 'merged' on a quantized base
    is refused by name before anything is wrapped."""
    quantized = load(base_dir, "torchao_int8")
    with pytest.raises(ValueError, match=r"forward_strategy='merged'.*model.layers.0.self_attn.q_proj.*output_add"):
        get_peft_model(quantized, HeadMaskConfig(heads=HEADS, forward_strategy="merged"))
    assert not any(isinstance(m, HeadMaskLayer) for m in quantized.modules())
    pm = get_peft_model(load(base_dir), HeadMaskConfig(heads=HEADS))
    assert {m.headmask_strategy["default"] for m in pm.modules() if isinstance(m, HeadMaskLayer)} == {"merged"}
    pm = get_peft_model(quantized, HeadMaskConfig(heads=HEADS, forward_strategy="output_add"))
    assert {m.headmask_strategy["default"] for m in pm.modules() if isinstance(m, HeadMaskLayer)} == {"output_add"}


def test_a_repacked_4bit_weight_is_refused(base_dir):
    """bitsandbytes 4-bit on an AVX512-BF16 CPU: an eval forward under no_grad repacks the weights in place
    (scales rounded to bf16); their values cannot be read back, so making an adapter on it is refused."""
    model = load(base_dir, "bnb_nf4").eval()
    with torch.no_grad():
        model(**inputs())
    q_proj = model.model.layers[0].self_attn.q_proj
    if not getattr(q_proj.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("bitsandbytes did not repack the 4-bit weights on this CPU (no AVX512-BF16)")
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj: this bitsandbytes 4-bit weight was "
                                         r"repacked"):
        get_peft_model(model, HeadMaskConfig(heads=HEADS))
    assert not any(isinstance(m, HeadMaskLayer) for m in model.modules())


def test_neither_quantization_package_is_needed_nor_imported():
    """With bitsandbytes and torchao unavailable (as when not installed), peft_alps and PEFT import and a head-mask
    adapter trains and merges on a float base; importing peft_alps alone loads neither."""
    code = """
import sys
sys.modules["bitsandbytes"] = None
sys.modules["torchao"] = None
import torch, transformers as tf
import peft_alps
from peft import get_peft_model
model = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96,
                                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
pm = get_peft_model(model, peft_alps.HeadMaskConfig(heads={0: [1]}))
ids = torch.randint(0, 128, (1, 8))
pm(input_ids=ids, labels=ids).loss.backward()
pm.merge_and_unload()
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
    code = "import sys, peft_alps; print([m for m in ('bitsandbytes', 'torchao') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr[-2000:]


@pytest.mark.real_model
def test_smollm2_8bit_trains_saves_and_reloads(tmp_path):
    """SmolLM2-135M-Instruct loaded in 8 bits (bitsandbytes, CPU): a few head-mask steps lower the loss on a fixed
    batch; the saved adapter on a freshly quantized SmolLM2 gives the same outputs."""
    pytest.importorskip("bitsandbytes")
    import peft_alps
    from peft_alps.pretrained import load_smollm2

    model, tok = load_smollm2(quantization_config=tf.BitsAndBytesConfig(load_in_8bit=True))
    layout = peft_alps.HeadLayout.from_model_config(model.config)
    heads = peft_alps.random_heads(layout.num_layers, layout.num_heads, ratio=0.05, seed=0)
    pm = get_peft_model(model, HeadMaskConfig(heads=heads, parts=PARTS))
    pm.train()
    batch = tok(["The capital of France is Paris. The capital of Italy is Rome."], return_tensors="pt")
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(4):
        loss = pm(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    out = pm(**batch).logits.detach()
    pm.save_pretrained(tmp_path / "heads")
    fresh, _ = load_smollm2(quantization_config=tf.BitsAndBytesConfig(load_in_8bit=True))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*base weights differ.*")
        loaded = PeftModel.from_pretrained(fresh, tmp_path / "heads")
    loaded.train()
    assert torch.equal(loaded(**batch).logits, out)


@pytest.mark.parametrize("backend", ["torchao_int8", "bnb_int8"])
def test_kasa_truncation_comes_from_the_dequantized_slice(backend, base_dir):
    """KaSA removes a head slice's smallest singular components: on a quantized base, those of the slice the model
    computes with (dequantized), here against an SVD of the dequantized q rows of head 1 of layer 0."""
    pm = get_peft_model(load(base_dir, backend), HeadMaskConfig(heads={0: [1]}, parts=["q"], delta_kind="kasa",
                                                                 kasa_rank=2, kasa_truncate=3))
    weight = dequantized_weights(pm)["model.layers.0.self_attn.q_proj.weight"].double()
    d = 64 // 4
    u, s, vh = torch.linalg.svd(weight[d:2 * d], full_matrices=False)
    removed = u[:, -3:] @ torch.diag(s[-3:]) @ vh[-3:]
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    delta, _ = layer.slice_update("default")  # dU = 0 at init: the update is minus the removed components
    torch.testing.assert_close(delta.double(), -removed, atol=1e-5, rtol=0)
