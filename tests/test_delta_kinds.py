"""The tuner contract, run for every registered delta kind (peft_alps.heads.delta), and for the dense kind on
the built-in architectures beyond the main matrix of tests/conftest.py.

A kind only says how its tensors make the slice update ``D`` (and the bias update). Everything else must follow
from that, for every kind alike: gradients, merge == forward, bit-exact unmerge, save/load, the streamed file
merge, the LoRA export and GMT. The built-in ``dense`` kind and the test-only ``scaled_test`` kind
(tests/scaled_delta.py: its own module plus one register call) run the same tests. A case of a model with
several attention stacks (T5's encoder, decoder and cross attention) trains its stack's layout, passed as
``layout=`` (conftest.arch_layout); the numbers the tests check against are read from the config by hand
(:func:`attention_numbers`).
"""

import copy
import math
import warnings

import pytest
import torch
from conftest import (MORE_ARCHS, arch_layout, arch_stack, backward_with_merged_reference, make_inputs, make_model,
                      output_of)
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

import scaled_delta  # noqa: F401  (registers the test-only kind)
from peft_alps import HeadMaskConfig, HeadMaskLayer, export_lora, merge_checkpoint
from peft_alps.heads.delta import DELTA_KINDS, delta_kind, delta_kind_of
from peft_alps.heads.layout import linear_dim, linear_frame

KINDS = sorted(DELTA_KINDS)
ARCH_SUBSET = ["llama", "qwen2", "gpt2", "gpt_neox"]  # GQA; biased q/k/v; Conv1D fused blocks; interleaved
# every kind on the subset; the dense kind also on the other built-in architectures (tests/conftest.py MORE_ARCHS)
CASES = [(kind, arch) for kind in KINDS for arch in ARCH_SUBSET] + [("dense", arch) for arch in MORE_ARCHS]
HEADS = {0: [1], 2: [0, 3]}
PARTS = ["q", "k", "v", "o"]


def attention_numbers(arch, config) -> dict:
    """The numbers of the attention a case trains, read from the config by hand (the independent reference for
    the trainable count and the score shape; not peft_alps' layout code): layers, heads, kv heads, head size,
    hidden size."""
    heads = config.num_attention_heads
    numbers = {"layers": config.num_hidden_layers, "heads": heads,
               "kv": getattr(config, "num_key_value_heads", None) or heads,
               "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads,
               "hidden": config.hidden_size}
    if config.model_type == "falcon":  # kv heads from the flags (config.num_kv_heads only counts in the new one)
        numbers["kv"] = (config.num_kv_heads if config.new_decoder_architecture else
                         1 if config.multi_query else heads)
    elif config.model_type == "gpt_bigcode":
        numbers["kv"] = 1 if config.multi_query else heads
    elif config.model_type in ("t5", "mt5"):  # T5's own names: head size d_kv, the decoder's depth num_decoder_layers
        numbers = {"layers": config.num_layers if arch_stack(arch) == "encoder" else config.num_decoder_layers,
                   "heads": config.num_heads, "kv": config.num_heads, "head_dim": config.d_kv,
                   "hidden": config.d_model}
    return numbers


def heads_for(arch, config) -> dict:
    """HEADS, its last layer moved to the last layer of the case's stack (T5's decoder has 2)."""
    last = attention_numbers(arch, config)["layers"] - 1
    return {0: HEADS[0], last: HEADS[2]}


def adapter_model(arch, kind, dtype=torch.float32, **config):
    base = make_model(arch, dtype=dtype)
    pm = get_peft_model(copy.deepcopy(base), HeadMaskConfig(heads=heads_for(arch, base.config), parts=PARTS,
                                                            delta_kind=kind, init_weights=False,
                                                            layout=arch_layout(arch, base.config), **config))
    return base, pm


def layers(pm):
    return {n: m for n, m in pm.base_model.model.named_modules() if isinstance(m, HeadMaskLayer)}


def test_the_test_kind_is_registered():
    assert {"dense", "scaled_test"} <= set(KINDS)


@pytest.mark.parametrize("kind, arch", CASES)
@pytest.mark.parametrize("strategy", ["merged", "output_add"])
def test_gradients_follow_the_full_weight_gradient(kind, arch, strategy):
    """Each tensor's gradient is the chain rule through the kind's update of the slice of the full weight
    gradient of the merged model (an independent computation: plain nn.Linear / Conv1D, no adapter)."""
    _, pm = adapter_model(arch, kind, torch.float64, forward_strategy=strategy)
    ref = backward_with_merged_reference(pm, make_inputs())
    ref_modules = dict(ref.named_modules())
    for name, layer in layers(pm).items():
        axis, idx = layer.headmask_axis["default"], layer.headmask_index["default"]
        ref_mod = ref_modules[name]
        full = linear_frame(ref_mod.weight.grad, layer.is_conv1d)
        tensors = {t: p.detach().clone().requires_grad_(True) for t, p in layer.adapter_tensors("default").items()}
        delta, bias = delta_kind(kind).update({**tensors, **layer.adapter_buffers("default")}, axis)
        objective = (delta * full.index_select(linear_dim(axis), idx)).sum()
        if bias is not None:
            objective = objective + (bias * ref_mod.bias.grad.index_select(0, idx)).sum()
        want = dict(zip(tensors, torch.autograd.grad(objective, list(tensors.values()))))
        for t, p in layer.adapter_tensors("default").items():
            # float64 models, but eager attention takes its softmax in float32: rounding flips there reach ~1e-8
            torch.testing.assert_close(p.grad, want[t], atol=1e-7, rtol=1e-5, msg=lambda m: f"{name}.{t}: {m}")


@pytest.mark.parametrize("kind, arch", CASES)
def test_merge_equals_forward_and_unmerge_is_bit_exact(kind, arch):
    base, pm = adapter_model(arch, kind)
    inputs = make_inputs()
    with torch.no_grad():
        adapter_out = output_of(pm, inputs)
        assert (adapter_out - output_of(base, inputs)).abs().max() > 1e-3  # the adapter does something
        pm.merge_adapter()
        torch.testing.assert_close(output_of(pm, inputs), adapter_out, atol=1e-5, rtol=1e-5)
        pm.unmerge_adapter()
    restored = {k.replace("base_layer.", ""): v for k, v in pm.base_model.model.state_dict().items()
                if "headmask_" not in k}
    for key, value in base.state_dict().items():
        assert torch.equal(restored[key], value), key


@pytest.mark.parametrize("kind, arch", CASES)
def test_save_load_streamed_merge_and_export(kind, arch, tmp_path):
    base, pm = adapter_model(arch, kind)
    inputs = make_inputs()
    base.save_pretrained(tmp_path / "base")
    pm.save_pretrained(tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    tensor_names = {k.rsplit(".headmask_", 1)[1] for k in saved}
    assert tensor_names <= set(delta_kind(kind).tensors) and set(delta_kind(kind).tensors[:1]) <= tensor_names
    with torch.no_grad():
        want = output_of(pm, inputs)
        # save / load
        loaded = PeftModel.from_pretrained(make_model(arch), tmp_path / "adapter")
        assert torch.equal(output_of(loaded, inputs), want)
        # streamed merge == merge_and_unload, bit for bit
        merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged")
        merged_file = {}
        for f in (tmp_path / "merged").glob("*.safetensors"):
            merged_file.update(load_file(f))
        in_memory = copy.deepcopy(pm).merge_and_unload().state_dict()
        targets = {f"{m}.weight" for m in pm.peft_config["default"].target_modules}
        assert targets <= set(merged_file) & set(in_memory)
        for key in set(merged_file) & set(in_memory):  # GPT-NeoX's tied embed_out is saved under one name only
            assert torch.equal(merged_file[key], in_memory[key]), key
        # export: a stock LoRA with the same outputs (a kind computed from the base exports from the model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            export_lora(loaded if delta_kind_of(pm.peft_config["default"]).buffers else tmp_path / "adapter",
                        tmp_path / "lora")
            lora = PeftModel.from_pretrained(make_model(arch), tmp_path / "lora")
        torch.testing.assert_close(output_of(lora, inputs), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_gmt_masks_every_tensor_of_the_kind(kind):
    _, pm = adapter_model("qwen2", kind, grad_mask_ratio=0.25)
    params = [p for n, p in pm.named_parameters() if "headmask_" in n]
    assert {n.rsplit("headmask_", 1)[1].split(".")[0] for n, _ in pm.named_parameters() if "headmask_" in n} \
        == set(delta_kind(kind).tensors)
    optimizer = torch.optim.SGD(params, lr=0.0)
    (output_of(pm, make_inputs()) ** 2).mean().backward()
    nonzero_before = [int(p.grad.ne(0).sum()) for p in params]
    optimizer.step()
    for p, before in zip(params, nonzero_before):
        assert int(p.grad.eq(0).sum()) >= math.floor(0.25 * p.numel())
        assert int(p.grad.ne(0).sum()) >= before - math.floor(0.25 * p.numel())


@pytest.mark.parametrize("arch", sorted(MORE_ARCHS))
def test_more_architectures_identity_count_and_bf16_unmerge(arch):
    """The rest of the contract on the other built-in architectures: the model is unchanged at init, the trainable
    count is the formula from the config's numbers (not from the layout code), and a bf16 base comes back bit for
    bit after merge + unmerge."""
    base = make_model(arch)
    config, inputs = base.config, make_inputs()
    numbers, heads, layout = attention_numbers(arch, config), heads_for(arch, config), arch_layout(arch, config)
    heads_, kv, head_dim = numbers["heads"], numbers["kv"], numbers["head_dim"]
    with torch.no_grad():
        pm = get_peft_model(copy.deepcopy(base), HeadMaskConfig(heads=heads, parts=PARTS, layout=layout))
        assert torch.equal(output_of(pm, inputs), output_of(base, inputs))
    biased = {p: next(m for n, m in pm.named_modules() if isinstance(m, HeadMaskLayer) and n.endswith(path))
              .get_base_layer().bias is not None for p, path in pm.peft_config["default"].layout["modules"].items()}
    want = 0
    for layer, hs in heads.items():
        groups = {h // (heads_ // kv) for h in hs}
        for part, units in (("q", len(hs)), ("k", len(groups)), ("v", len(groups)), ("o", len(hs))):
            want += units * head_dim * numbers["hidden"] + (units * head_dim if part != "o" and biased[part] else 0)
    assert sum(p.numel() for p in pm.parameters() if p.requires_grad) == want
    bf16 = make_model(arch, dtype=torch.bfloat16)
    original = {k: v.clone() for k, v in bf16.state_dict().items()}
    pm = get_peft_model(bf16, HeadMaskConfig(heads=heads, parts=PARTS, init_weights=False, layout=layout))
    pm.merge_adapter()
    pm.unmerge_adapter()
    restored = {k.replace("base_layer.", ""): v for k, v in pm.base_model.model.state_dict().items()
                if "headmask_" not in k}
    assert all(torch.equal(restored[k], v) for k, v in original.items())


@pytest.mark.parametrize("arch", sorted(MORE_ARCHS))
def test_more_architectures_score_heads(arch):
    """ALPS scoring reads the new layouts: a model against itself scores exactly 0, against another seed > 0."""
    from peft_alps import score_heads

    base, other = make_model(arch), make_model(arch, seed=1)
    layout, numbers = arch_layout(arch, base.config), attention_numbers(arch, base.config)
    same = score_heads(base, copy.deepcopy(base), layout=layout).scores
    moved = score_heads(base, other, layout=layout).scores
    assert same.shape == moved.shape == (numbers["layers"], numbers["heads"])
    assert torch.equal(same, torch.zeros_like(same)) and bool((moved > 0).all())
