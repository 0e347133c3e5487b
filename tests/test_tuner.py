"""The HeadMask tuner on tiny random models of every supported architecture."""

import copy

import pytest
import torch
from conftest import ARCHS, backward_with_merged_reference, block_module, expected_masks, linear_frame, make_inputs, make_model, output_of
from peft import get_peft_model

import peft_alps
from peft_alps import HeadMaskConfig
from peft_alps.tuner.layer import HeadMaskLayer

HEADS = {0: [1], 2: [0, 3]}  # heads 0 and 1 share kv group 0 under GQA (4 heads / 2 kv)
ALL_PARTS = ["q", "k", "v", "o"]


def wrapped_layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, HeadMaskLayer)}


def scatter_dense(layer, tensor_by_adapter_param, adapter="default"):
    """Dense [out, in] tensor with the delta-shaped tensor written at the layer's slice."""
    idx, dim = layer.headmask_index[adapter], layer.headmask_axis[adapter]
    dense = torch.zeros(layer.out_features, layer.in_features, dtype=tensor_by_adapter_param.dtype)
    return dense.index_copy(0 if dim == "out" else 1, idx, tensor_by_adapter_param)


@pytest.mark.parametrize("parts", [["q", "k", "v"], ALL_PARTS])
def test_trainable_count_matches_formula(arch, parts):
    model = make_model(arch)
    cfg = model.config
    nh = cfg.num_attention_heads
    nkv = getattr(cfg, "num_key_value_heads", None) or nh
    d, hidden = cfg.hidden_size // nh, cfg.hidden_size
    bias = {p: block_module(model, arch, 0, p).bias is not None for p in "qkv"}
    expected = 0
    for hs in HEADS.values():
        groups = {h * nkv // nh for h in hs}
        n_rows = {"q": len(hs) * d, "k": len(groups) * d, "v": len(groups) * d}
        for p in "qkv":
            if p in parts:
                expected += n_rows[p] * (hidden + bias[p])
        if "o" in parts:
            expected += hidden * len(hs) * d
    pm = get_peft_model(model, HeadMaskConfig(heads=HEADS, parts=parts))
    trainable, _ = pm.get_nb_trainable_parameters()
    assert trainable == expected
    assert sum(p.numel() for p in pm.parameters() if p.requires_grad) == expected
    assert all(not p.requires_grad for n, p in pm.named_parameters() if "headmask_" not in n)


def test_identity_at_init(arch):
    model = make_model(arch)
    inputs = make_inputs()
    with torch.no_grad():
        ref = output_of(model, inputs)
        pm = get_peft_model(model, HeadMaskConfig(heads=HEADS, parts=ALL_PARTS))
        assert torch.equal(output_of(pm, inputs), ref)


@pytest.mark.parametrize("strategy", ["merged", "output_add"])
def test_gradients_equal_masked_full_gradient(arch, strategy):
    base = make_model(arch).double()  # float64: the two matmul orders agree far below atol, on any thread count
    pm = get_peft_model(copy.deepcopy(base),
                        HeadMaskConfig(heads=HEADS, parts=ALL_PARTS, init_weights=False, forward_strategy=strategy))
    # the unwrapped reference is the same function: base weights with the random deltas merged in
    ref = backward_with_merged_reference(pm, make_inputs())

    masks = expected_masks(base, arch, HEADS, ALL_PARTS)
    layers = wrapped_layers(pm)
    assert len(layers) == len(masks)
    for (layer_idx, path), mask in masks.items():
        (name,) = [n for n in layers if n.endswith(f".{layer_idx}.{path}")]
        layer = layers[name]
        delta = layer.headmask_delta["default"]
        assert delta.numel() == int(mask.sum())
        part = next(p for p, m in ARCHS[arch][2].items() if m == path)
        ref_mod = block_module(ref, arch, layer_idx, part)
        full_grad = linear_frame(ref_mod.weight.grad, ref_mod)
        got = scatter_dense(layer, delta.grad)
        torch.testing.assert_close(got, full_grad * mask, atol=1e-5, rtol=1e-5)
        if "default" in layer.headmask_bias:
            rows = mask.any(1)
            got_b = torch.zeros(layer.out_features, dtype=torch.float64).index_copy(0, layer.headmask_index["default"],
                                                               layer.headmask_bias["default"].grad)
            torch.testing.assert_close(got_b, ref_mod.bias.grad * rows, atol=1e-5, rtol=1e-5)


def test_adamw_with_weight_decay_touches_only_selected_slices(arch):
    base = make_model(arch)
    pm = get_peft_model(copy.deepcopy(base), HeadMaskConfig(heads=HEADS, parts=ALL_PARTS))
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for step in range(3):
        loss = output_of(pm, make_inputs(seed=step)).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    merged = pm.merge_and_unload()
    masks = expected_masks(base, arch, HEADS, ALL_PARTS)
    changed_somewhere = False
    base_params = dict(base.named_parameters())
    for name, p in merged.named_parameters():
        diff = p.detach() != base_params[name].detach()
        mask = next((m for (li, path), m in masks.items() if name.endswith(f".{li}.{path}.weight")), None)
        if mask is not None:
            mod = dict(merged.named_modules())[name.rsplit(".", 1)[0]]
            diff = linear_frame(diff, mod)
            assert not (diff & ~mask).any(), name
            changed_somewhere |= bool(diff.any())
        elif name.endswith(".bias") and any(name.endswith(f".{li}.{path}.bias") for li, path in masks):
            (li, path), mask = next(((k, m) for k, m in masks.items() if name.endswith(f".{k[0]}.{k[1]}.bias")))
            rows = mask.any(1) if path != ARCHS[arch][2]["o"] else torch.zeros(mask.shape[0], dtype=torch.bool)
            assert not (diff & ~rows).any(), name
        else:
            assert not diff.any(), f"{name} changed but holds no selected head"
    assert changed_somewhere


@pytest.mark.parametrize("strategy", ["merged", "output_add"])
def test_merged_outputs_equal_adapter_outputs(arch, strategy):
    pm = get_peft_model(make_model(arch),
                        HeadMaskConfig(heads=HEADS, parts=ALL_PARTS, init_weights=False, forward_strategy=strategy))
    inputs = make_inputs()
    with torch.no_grad():
        adapter_out = output_of(pm, inputs)
        pm.merge_adapter()
        merged_out = output_of(pm, inputs)
    torch.testing.assert_close(merged_out, adapter_out, atol=1e-5, rtol=0)
    assert not torch.allclose(adapter_out, output_of(make_model(arch), inputs), atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_unmerge_restores_base_weights_bitwise(arch, dtype):
    base = make_model(arch, dtype=dtype)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    pm = get_peft_model(base, HeadMaskConfig(heads=HEADS, parts=ALL_PARTS, init_weights=False))
    pm.add_adapter("second", HeadMaskConfig(heads={1: [2], 2: [0]}, parts=ALL_PARTS, init_weights=False))
    pm.base_model.set_adapter(["default", "second"])
    pm.merge_adapter()
    merged = {k.replace(".base_layer", ""): v for k, v in pm.get_base_model().state_dict().items()}
    assert any(not torch.equal(merged[k], before[k]) for k in before)
    pm.unmerge_adapter()
    unloaded = pm.unload()
    after = unloaded.state_dict()
    assert after.keys() == before.keys()
    for k in before:
        assert torch.equal(after[k], before[k]), k


def test_bf16_base_keeps_fp32_delta_and_merge_matches_forward():
    base = make_model("llama", dtype=torch.bfloat16)
    pm = get_peft_model(base, HeadMaskConfig(heads=HEADS, init_weights=False))
    deltas = [p for n, p in pm.named_parameters() if "headmask_" in n]
    assert deltas and all(p.dtype == torch.float32 for p in deltas)
    inputs = make_inputs()
    with torch.no_grad():
        adapter_out = output_of(pm, inputs)
        pm.merge_adapter()
        assert torch.equal(output_of(pm, inputs), adapter_out)  # same rounding formula in forward and merge


def test_several_active_adapters_sum_and_switching():
    model = make_model("llama")
    inputs = make_inputs()
    pm = get_peft_model(model, HeadMaskConfig(heads={0: [0], 1: [1]}, parts=ALL_PARTS, init_weights=False))
    pm.add_adapter("b", HeadMaskConfig(heads={1: [1, 2]}, parts=["q", "o"], init_weights=False))
    with torch.no_grad():
        out_a = output_of(pm, inputs)
        pm.set_adapter("b")
        out_b = output_of(pm, inputs)
        assert not torch.allclose(out_a, out_b)
        assert [n for n, p in pm.named_parameters() if p.requires_grad and n.endswith(".b")]
        assert not [n for n, p in pm.named_parameters() if p.requires_grad and n.endswith(".default")]
        pm.base_model.set_adapter(["default", "b"])
        out_ab = output_of(pm, inputs)
        # reference: both merged into the weights one after the other
        ref = copy.deepcopy(pm).merge_and_unload(adapter_names=["default", "b"])
        torch.testing.assert_close(out_ab, output_of(ref, inputs), atol=1e-5, rtol=0)
        with pm.disable_adapter():
            torch.testing.assert_close(output_of(pm, inputs), output_of(make_model("llama"), inputs), atol=0,
                                       rtol=0)
        pm.delete_adapter("b")
        assert not any(n.endswith(".b") for n, _ in pm.named_parameters())
        pm.set_adapter("default")
        assert torch.equal(output_of(pm, inputs), out_a)


@pytest.mark.parametrize("how", ["merge_adapter", "merge_and_unload"])
def test_safe_merge_refuses_nan_before_touching_any_weight(how):
    pm = get_peft_model(make_model("llama"), HeadMaskConfig(heads=HEADS, init_weights=False))
    before = {k: v.clone() for k, v in pm.get_base_model().state_dict().items()}
    assert any(".base_layer." in k for k in before)
    last = list(wrapped_layers(pm).values())[-1]  # earlier layers would be merged first
    with torch.no_grad():
        last.headmask_delta["default"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        getattr(pm, how)(safe_merge=True)
    assert wrapped_layers(pm)
    for k, v in pm.get_base_model().state_dict().items():
        assert torch.equal(v, before[k]) or "headmask" in k, k


def test_plain_merge_and_unload_returns_base_class():
    model = make_model("gpt2")
    pm = get_peft_model(model, HeadMaskConfig(heads=HEADS, parts=ALL_PARTS))
    merged = pm.merge_and_unload()
    assert type(merged).__name__ == "GPT2LMHeadModel"
    assert not wrapped_layers(merged)
    assert peft_alps.HeadMaskLayer is HeadMaskLayer


@pytest.mark.parametrize("strategy", ["merged", "output_add"])
@pytest.mark.parametrize("arch_name", ["llama", "gpt2", "gpt_neox"])
def test_backward_computes_no_full_weight_gradient(arch_name, strategy):
    """Record every matmul of the backward pass: none produces a weight-shaped [out, in] result."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class MatmulShapes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket.__name__ in ("mm", "addmm", "bmm", "matmul"):
                self.shapes.append(tuple(out.shape))
            return out

    model = make_model(arch_name)
    weight_shapes = {tuple(m.weight.shape) for m in model.modules() if getattr(m, "weight", None) is not None
                     and m.weight.dim() == 2}
    weight_shapes |= {s[::-1] for s in weight_shapes}
    # one head: delta gradients are [16, 64] / [64, 16], and 14 tokens: nothing legitimate is weight-shaped
    pm = get_peft_model(model, HeadMaskConfig(heads={1: [2]}, parts=ALL_PARTS, forward_strategy=strategy))
    loss = output_of(pm, make_inputs(batch=2, seq=7)).pow(2).mean()
    recorder = MatmulShapes()
    with recorder:
        loss.backward()
    assert recorder.shapes, "no matmul recorded"
    assert not weight_shapes & set(recorder.shapes), weight_shapes & set(recorder.shapes)
    # the delta gradients are there, and only they
    assert all(p.grad is not None for n, p in pm.named_parameters() if "headmask_" in n)
    assert all(p.grad is None for n, p in pm.named_parameters() if "headmask_" not in n)
