"""The KaSA head delta (``delta_kind="kasa"``, peft_alps.heads.delta.KasaDelta), beyond the shared contract.

tests/test_delta_kinds.py runs the full contract for every registered kind, KaSA included, on its architecture
subset (llama, qwen2, gpt2, gpt_neox): gradients of dU/dsigma/dV equal autograd through the dense formula, merge
== forward, bit-exact unmerge, save/load, streamed merge == merge_and_unload, the LoRA export reproducing the
outputs in stock PEFT, GMT. Here, on every architecture of the matrix (tests/conftest.py ARCHS and MORE_ARCHS), the
cheap checks: the model at init is the base with each selected head slice truncated by an independent SVD, the
trainable count and the adapter file size follow the formula from the config's numbers, and a bf16 base comes
back bit for bit after merge + unmerge. Then what only KaSA has: the truncation term's determinism, the
regulariser against PEFT's own, the loss hook, and mixing with a dense head adapter and with a LoRA adapter.
"""

import copy
import struct
import types
import warnings

import pytest
import torch
from conftest import ARCH_NAMES, MORE_ARCHS, arch_layout, make_inputs, make_model, output_of
from peft import PeftModel, get_peft_model
from peft.tuners.lora.variants import _kasa_layer_regularization_loss
from safetensors.torch import load_file
from test_delta_kinds import PARTS, attention_numbers, heads_for

from peft_alps import HeadMaskConfig, HeadMaskLayer, export_lora
from peft_alps.deploy.export import ExportError
from peft_alps.heads.layout import linear_dim, linear_frame

RANK, TRUNC = 4, 2  # T5's heads have 8 channels: r_t < 8
ALL_ARCHS = ARCH_NAMES + sorted(MORE_ARCHS)


def kasa_config(arch, config, **kw):
    options = dict(heads=heads_for(arch, config), parts=PARTS, delta_kind="kasa", kasa_rank=RANK,
                   kasa_truncate=TRUNC, layout=arch_layout(arch, config))
    return HeadMaskConfig(**{**options, **kw})


def layers(pm):
    return {n: m for n, m in pm.base_model.model.named_modules() if isinstance(m, HeadMaskLayer)}


def truncated(block: torch.Tensor, drop: int) -> torch.Tensor:
    """``block`` without its ``drop`` smallest singular components (float64 SVD)."""
    u, s, vh = torch.linalg.svd(block.double(), full_matrices=False)
    keep = s.shape[0] - drop
    return ((u[:, :keep] * s[:keep]) @ vh[:keep]).to(block.dtype)


def truncated_base(base, pm, head_dim, drop):
    """A copy of ``base`` with every selected head unit's slice truncated: the reference of the model at init."""
    ref = copy.deepcopy(base)
    modules = dict(ref.named_modules())
    for name, layer in layers(pm).items():
        axis, idx = layer.headmask_axis["default"], layer.headmask_index["default"].tolist()
        w = linear_frame(modules[name].weight.data, layer.is_conv1d)  # a view: writes reach the module
        for start in range(0, len(idx), head_dim):
            unit = torch.tensor(idx[start:start + head_dim])
            block = w.index_select(linear_dim(axis), unit)
            w.index_copy_(linear_dim(axis), unit, truncated(block, drop) if axis == "out"
                          else truncated(block.t(), drop).t())
    return ref


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_init_count_file_size_and_bf16_unmerge(arch, tmp_path):
    base = make_model(arch)
    config, inputs = base.config, make_inputs()
    numbers = attention_numbers(arch, config)
    with torch.no_grad():
        # no truncation: the model is the base model, bit for bit (the trainable part is zero at init)
        plain = get_peft_model(copy.deepcopy(base), kasa_config(arch, config, kasa_truncate=0))
        assert torch.equal(output_of(plain, inputs), output_of(base, inputs))
        # truncation: the base with each selected head slice truncated, by an SVD computed here
        pm = get_peft_model(copy.deepcopy(base), kasa_config(arch, config))
        want = output_of(truncated_base(base, pm, numbers["head_dim"], TRUNC), inputs)
        assert (want - output_of(base, inputs)).abs().max() > 1e-4  # the truncation does something
        torch.testing.assert_close(output_of(pm, inputs), want, atol=1e-5, rtol=1e-4)
    # trainable count: r * (head_dim + hidden + 1) per head unit and part, from the config's numbers
    heads, kv = heads_for(arch, config), numbers["kv"]
    units = sum(len(hs) * 2 + 2 * len({h // (numbers["heads"] // kv) for h in hs}) for hs in heads.values())
    params = units * RANK * (numbers["head_dim"] + numbers["hidden"] + 1)
    assert sum(p.numel() for p in pm.parameters() if p.requires_grad) == params
    # the file holds dU, dsigma, dV only: 4 bytes (fp32) per parameter plus the safetensors header
    pm.save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    assert {k.rsplit(".headmask_", 1)[1] for k in load_file(weights)} == {"dU", "dsigma", "dV"}
    header = 8 + struct.unpack("<Q", weights.read_bytes()[:8])[0]
    assert weights.stat().st_size == header + 4 * params
    # bf16: merge + unmerge gives the base back bit for bit
    bf16 = make_model(arch, dtype=torch.bfloat16)
    original = {k: v.clone() for k, v in bf16.state_dict().items()}
    pm = get_peft_model(bf16, kasa_config(arch, bf16.config, init_weights=False))
    pm.merge_adapter()
    assert any(not torch.equal(pm.base_model.model.state_dict()[k.replace(".weight", ".base_layer.weight")], v)
               for k, v in original.items() if k.replace(".weight", ".base_layer.weight")
               in pm.base_model.model.state_dict())
    pm.unmerge_adapter()
    restored = {k.replace("base_layer.", ""): v for k, v in pm.base_model.model.state_dict().items()}
    assert all(torch.equal(restored[k], v) for k, v in original.items())


def test_the_truncation_term_is_deterministic_and_drops_the_smallest_components(tmp_path):
    base = make_model("llama")
    config = kasa_config("llama", base.config)
    a = get_peft_model(copy.deepcopy(base), config)
    b = get_peft_model(copy.deepcopy(base), copy.deepcopy(config))
    a.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    head_dim = attention_numbers("llama", base.config)["head_dim"]
    for name, layer in layers(a).items():
        buffers = layer.adapter_buffers("default")
        assert set(buffers) == {"trunc_U", "trunc_V"}
        for other in (layers(b)[name], layers(loaded)[name]):  # same base -> same term, bit for bit
            assert all(torch.equal(buffers[k], v) for k, v in other.adapter_buffers("default").items())
        assert "headmask_trunc_U" not in str(list(a.state_dict()))  # never saved
        # W_h - T has W_h's largest singular values; T has rank r_t
        axis, idx = layer.headmask_axis["default"], layer.headmask_index["default"]
        w = layer.linear_weight().detach().index_select(linear_dim(axis), idx).double()
        term = -layer.slice_update("default")[0].detach().double()  # dU = 0 at init: D = -T
        for start in range(0, len(idx), head_dim):
            cut = slice(start, start + head_dim)
            w_h, t_h = (w[cut], term[cut]) if axis == "out" else (w[:, cut], term[:, cut])
            s = torch.linalg.svdvals(w_h)
            torch.testing.assert_close(torch.linalg.svdvals(w_h - t_h)[:-TRUNC], s[:-TRUNC], atol=1e-5, rtol=1e-5)
            assert int(torch.linalg.matrix_rank(t_h, atol=1e-5)) == TRUNC
    # another base is caught by the fingerprint
    with pytest.warns(UserWarning, match="differ"):
        PeftModel.from_pretrained(make_model("llama", seed=1), tmp_path)


def test_kasa_loss_equals_peft_per_head_and_the_forward_hook_adds_it():
    base = make_model("qwen2")
    pm = get_peft_model(copy.deepcopy(base), kasa_config("qwen2", base.config, init_weights=False, kasa_beta=0.3,
                                                         kasa_gamma=0.7, kasa_loss_in_forward=True))
    want = 0.0
    for layer in layers(pm).values():
        t = layer.adapter_tensors("default")
        for h in range(t["dU"].shape[0]):  # PEFT's per-layer regulariser on each head unit as its own LoRA layer
            unit = types.SimpleNamespace(lora_diag={"a": t["dsigma"][h]},
                                         lora_A={"a": types.SimpleNamespace(weight=t["dV"][h].t())},
                                         lora_B={"a": types.SimpleNamespace(weight=t["dU"][h])})
            want = want + _kasa_layer_regularization_loss(unit, "a", beta=0.3, gamma=0.7)
    got = pm.kasa_loss()
    torch.testing.assert_close(got, want)
    got.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in pm.named_parameters() if p.requires_grad)
    pm.zero_grad()
    ids = make_inputs()["input_ids"]
    pm.eval()  # no regulariser in eval mode
    task = pm(input_ids=ids, labels=ids).loss
    pm.train()
    torch.testing.assert_close(pm(input_ids=ids, labels=ids).loss, task + pm.kasa_loss())
    assert pm(input_ids=ids).get("loss") is None  # no labels: nothing added


def test_the_default_does_not_truncate_and_none_means_the_rank():
    base, inputs = make_model("llama"), make_inputs()
    with torch.no_grad():
        plain = get_peft_model(copy.deepcopy(base), HeadMaskConfig(heads={0: [1]}, delta_kind="kasa", kasa_rank=3))
        assert torch.equal(output_of(plain, inputs), output_of(base, inputs))  # the model at init is the base
        paper = get_peft_model(copy.deepcopy(base), HeadMaskConfig(heads={0: [1]}, delta_kind="kasa", kasa_rank=3,
                                                                   kasa_truncate=None))
        q = paper.base_model.model.model.layers[0].self_attn.q_proj
        assert q.adapter_tensors("default")["dU"].shape[-1] == 3
        trunc_u = [v for k, v in q.named_buffers() if "trunc_U" in k]
        assert len(trunc_u) == 1 and trunc_u[0].shape[-1] == 3  # r_t = r
        assert not any("trunc" in k for k, _ in plain.named_buffers())


def test_bad_options_are_refused_before_anything_is_built():
    with pytest.raises(ValueError, match="kasa_rank"):
        HeadMaskConfig(heads={0: [0]}, delta_kind="kasa", kasa_rank=0)
    base = make_model("llama")  # head_dim 16
    with pytest.raises(ValueError, match="kasa_truncate=16"):
        get_peft_model(base, HeadMaskConfig(heads={0: [0]}, delta_kind="kasa", kasa_truncate=16))
    assert not any(isinstance(m, HeadMaskLayer) for m in base.modules())


def test_a_folder_export_needs_the_base_and_a_model_export_is_exact(tmp_path):
    base = make_model("llama")
    pm = get_peft_model(copy.deepcopy(base), kasa_config("llama", base.config, init_weights=False))
    pm.save_pretrained(tmp_path / "adapter")
    with pytest.raises(ExportError, match="export_lora\\(PeftModel.from_pretrained"):
        export_lora(tmp_path / "adapter", tmp_path / "lora")
    assert not (tmp_path / "lora").exists()
    export_lora(pm, tmp_path / "lora")
    import json

    ranks = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    per_module = {m: ranks["rank_pattern"].get(m, ranks["r"]) for m in ranks["target_modules"]}
    for name, layer in layers(pm).items():  # rank r + r_t per head unit
        assert per_module[name] == layer.adapter_tensors("default")["dU"].shape[0] * (RANK + TRUNC)
    # without truncation: rank r per head unit, and a folder export works
    plain = get_peft_model(copy.deepcopy(base), kasa_config("llama", base.config, init_weights=False,
                                                            kasa_truncate=0))
    plain.save_pretrained(tmp_path / "plain")
    export_lora(tmp_path / "plain", tmp_path / "plain_lora")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lora = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "plain_lora")
    torch.testing.assert_close(output_of(lora, make_inputs()), output_of(plain, make_inputs()), atol=1e-5,
                               rtol=1e-5)


def test_mixing_with_a_dense_head_adapter_and_with_a_lora_adapter(tmp_path):
    base = make_model("llama", dtype=torch.bfloat16)
    original = {k: v.clone() for k, v in base.state_dict().items()}
    inputs = make_inputs()
    dense_cfg = HeadMaskConfig(heads={0: [1, 2], 2: [0]}, parts=PARTS, init_weights=False)
    kasa_cfg = kasa_config("llama", base.config, init_weights=False)
    torch.manual_seed(0)
    pm = get_peft_model(copy.deepcopy(base), dense_cfg)  # the dense adapter first, then KaSA on overlapping heads
    pm.add_adapter("kasa", kasa_cfg)
    torch.manual_seed(1)
    alone = get_peft_model(copy.deepcopy(base), copy.deepcopy(kasa_cfg))
    alone.load_state_dict({k.replace(".kasa", ".default"): v for k, v in pm.state_dict().items() if ".kasa" in k},
                          strict=False)
    for name, layer in layers(pm).items():  # the term comes from the base, whatever adapter came first
        if "kasa" in layer.headmask_kind:
            mine, theirs = layer.adapter_buffers("kasa"), layers(alone)[name].adapter_buffers("default")
            assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
    with torch.no_grad():
        pm.set_adapter("kasa")
        torch.testing.assert_close(output_of(pm, inputs), output_of(alone, inputs), atol=0, rtol=0)
        pm.base_model.set_adapter(["default", "kasa"])  # both at once, merged and unmerged
        both = output_of(pm, inputs)
        pm.merge_adapter(["default", "kasa"])
        torch.testing.assert_close(output_of(pm, inputs), both, atol=0.05, rtol=0.02)  # bf16 rounding of a merge
        pm.unmerge_adapter()
    restored = {k.replace("base_layer.", ""): v for k, v in pm.base_model.model.state_dict().items()}
    assert all(torch.equal(restored[k], v) for k, v in original.items())  # both undone, bit for bit
    # a LoRA adapter on the same base: the exported KaSA LoRA and a stock LoRA side by side in PEFT
    fp32 = make_model("llama")
    kasa32 = get_peft_model(copy.deepcopy(fp32), kasa_config("llama", fp32.config, init_weights=False))
    export_lora(kasa32, tmp_path / "kasa_lora")
    from peft import LoraConfig

    torch.manual_seed(2)
    other = get_peft_model(copy.deepcopy(fp32), LoraConfig(target_modules=["q_proj", "v_proj"],
                                                            init_lora_weights=False))
    other.save_pretrained(tmp_path / "other")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mixed = PeftModel.from_pretrained(copy.deepcopy(fp32), tmp_path / "kasa_lora", adapter_name="kasa")
        mixed.load_adapter(tmp_path / "other", adapter_name="other")
        mixed.base_model.set_adapter(["kasa", "other"])
        reference = PeftModel.from_pretrained(kasa32.merge_and_unload(), tmp_path / "other")
    with torch.no_grad():
        torch.testing.assert_close(output_of(mixed, inputs), output_of(reference, inputs), atol=1e-5, rtol=1e-4)
    assert all(torch.equal(v, fp32.state_dict()[k]) for k, v in
               {k.replace("base_layer.", ""): v for k, v in mixed.base_model.model.state_dict().items()
                if "lora_" not in k}.items())  # the base under both adapters is the original
