"""Silent wrong answers and corrupted state found by trying peft-alps as a new user would, each pinned.

Every case here was accepted silently (or crashed with a raw traceback) before the fix: wrong layouts that
trained the wrong rows, config keys that selected other heads, loads that dropped tensors, adapters on the
wrong base, bit flips in the weights file, half-added adapters.
"""

import copy
import json
import warnings

import numpy as np
import pytest
import torch
import transformers as tf
from conftest import make_inputs, make_model, output_of
from peft import PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file

import peft_alps
from peft_alps import HeadLayout, HeadMaskConfig, LayoutError, merge_checkpoint
from peft_alps.tuner.layer import HeadMaskLayer

HEADS = {0: [1], 2: [0, 3]}


def untouched(model, snapshot) -> bool:
    state = model.state_dict()
    return (not any(isinstance(m, HeadMaskLayer) for m in model.modules()) and not hasattr(model, "peft_config")
            and state.keys() == snapshot.keys() and all(torch.equal(state[k], snapshot[k]) for k in state))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A llama base checkpoint and a trained-looking (random) head-mask adapter saved from it."""
    root = tmp_path_factory.mktemp("trust")
    base = make_model("llama")
    base.save_pretrained(root / "base")
    pm = get_peft_model(copy.deepcopy(base), HeadMaskConfig(heads=HEADS, init_weights=False))
    pm.save_pretrained(root / "adapter")
    return root


def copy_adapter(saved, tmp_path, edit_config=None):
    import shutil

    folder = tmp_path / "adapter"
    shutil.copytree(saved / "adapter", folder)
    if edit_config:
        cfg = json.loads((folder / "adapter_config.json").read_text())
        edit_config(cfg)
        (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return folder


# ----- item 2: every tensor lands, every module finds its tensor -----
@pytest.mark.parametrize("edit, match", [
    (lambda c: c.update(parts=["q"]), "does not select"),
    (lambda c: c["heads"].pop("2"), "does not select"),
    (lambda c: c["heads"].update({"1": [2]}), "has no tensor"),
])
def test_loading_refuses_weights_that_do_not_fit_the_config(saved, tmp_path, edit, match):
    folder = copy_adapter(saved, tmp_path, edit)
    base = make_model("llama")
    snapshot = copy.deepcopy(base.state_dict())
    with pytest.raises(ValueError, match=match):
        PeftModel.from_pretrained(base, folder)
    assert untouched(base, snapshot)  # checked before anything was wrapped


@pytest.mark.parametrize("parts, heads, match", [
    (["q"], HEADS, "no module of the model takes"),  # k/v tensors would land nowhere
    (["q", "k", "v"], {0: [1], 1: [0], 2: [0, 3]}, "have no tensor for"),  # layer 1 would keep its init
])
def test_every_loader_refuses_partial_loads(saved, parts, heads, match):
    """The same guarantee for loaders that bypass PeftModel.from_pretrained (the load hooks)."""
    state = load_file(saved / "adapter" / "adapter_model.safetensors")
    pm = get_peft_model(make_model("llama"), HeadMaskConfig(heads=heads, parts=parts))
    with pytest.raises(ValueError, match=match):
        set_peft_model_state_dict(pm, state)


# ----- item 3: wrong base and flipped bits are detected -----
def flip_a_bit(folder):
    path = folder / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x10  # inside the last tensor's bytes
    path.write_bytes(bytes(data))


def test_the_right_base_loads_without_warnings_also_in_bf16(saved):
    for dtype in (torch.float32, torch.bfloat16):
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            PeftModel.from_pretrained(make_model("llama", dtype=dtype), saved / "adapter")


def test_a_different_base_is_reported(saved, tmp_path):
    with pytest.warns(UserWarning, match="base weights differ"):
        PeftModel.from_pretrained(make_model("llama", seed=7), saved / "adapter")
    make_model("llama", seed=7).save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="base weights differ"):
        merge_checkpoint(tmp_path / "other", saved / "adapter", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.warns(UserWarning, match="base weights differ"):
        merge_checkpoint(tmp_path / "other", saved / "adapter", tmp_path / "out", force=True)


def test_a_flipped_bit_is_reported(saved, tmp_path):
    folder = copy_adapter(saved, tmp_path)
    flip_a_bit(folder)
    with pytest.warns(UserWarning, match="modified or corrupted"):
        PeftModel.from_pretrained(make_model("llama"), folder)
    with pytest.raises(ValueError, match="modified or corrupted"):
        merge_checkpoint(saved / "base", folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="modified or corrupted"):
        peft_alps.export_lora(folder, tmp_path / "lora")
    assert not (tmp_path / "lora").exists()


def test_saved_files_carry_checksum_and_fingerprint(saved):
    from peft_alps.io.integrity import CHECKSUM_KEY, file_checksum, recorded_checksum

    path = saved / "adapter" / "adapter_model.safetensors"
    assert recorded_checksum(path) == file_checksum(path)
    fp = json.loads((saved / "adapter" / "adapter_config.json").read_text())["base_fingerprint"]
    # the sketch's norm equals the norm of the base slice, computed independently
    base = make_model("llama")
    q = base.model.layers[2].self_attn.q_proj.weight.detach().double()
    rows = torch.cat([q[0:16], q[48:64]])  # heads 0 and 3, head_dim 16
    assert fp["modules"]["model.layers.2.self_attn.q_proj.weight"][0] == pytest.approx(rows.norm().item(), rel=1e-7)
    assert CHECKSUM_KEY not in json.dumps(fp)


# ----- item 4: layouts are checked against the real modules -----
def falcon():
    torch.manual_seed(0)
    return tf.FalconForCausalLM(tf.FalconConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                                                num_attention_heads=4, new_decoder_architecture=False,
                                                multi_query=True))


FALCON = dict(model_type="falcon", num_layers=2, num_heads=4, num_kv_heads=1, head_dim=16, hidden_size=64,
              layers="h", modules={"q": "self_attention.query_key_value", "k": "self_attention.query_key_value",
                                   "v": "self_attention.query_key_value", "o": "self_attention.dense"},
              fused="blocks")


def glm():
    """A tiny GLM: separate q/k/v/o, GQA and a config head_dim, and no built-in layout in peft_alps."""
    torch.manual_seed(0)
    return tf.GlmForCausalLM(tf.GlmConfig(vocab_size=128, hidden_size=64, intermediate_size=96, head_dim=16,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                          pad_token_id=0, bos_token_id=1, eos_token_id=1))


GLM = dict(model_type="glm", num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, hidden_size=64,
           layers="layers", modules={p: f"self_attn.{p}_proj" for p in "qkvo"})


def test_the_custom_layout_examples_are_not_built_in():
    assert {"glm", "bart"}.isdisjoint(peft_alps.ARCHITECTURES)


@pytest.mark.parametrize("make, layout, change, match", [
    (falcon, FALCON, dict(fused=None), "fused is None"),
    (glm, GLM, dict(num_kv_heads=1), "num_kv_heads"),
    (glm, GLM, dict(num_heads=8, head_dim=8), "num_heads"),
    (glm, GLM, dict(num_layers=1), "num_layers=2"),
    (glm, GLM, dict(num_layers=3), r"Could not find"),
    (glm, GLM, dict(hidden_size=32), "hidden_size"),
])
def test_wrong_layouts_are_refused_before_wrapping(make, layout, change, match):
    model = make()
    snapshot = copy.deepcopy(model.state_dict())
    with pytest.raises(LayoutError, match=match):
        get_peft_model(model, HeadMaskConfig(heads={0: [3]}, layout={**layout, **change}))
    assert untouched(model, snapshot)


@pytest.mark.parametrize("make, layout, want", [
    (falcon, FALCON, {"query_key_value": list(range(48, 80))}),  # q rows of head 3, then the one shared k head
    (glm, GLM, {"q_proj": list(range(48, 64)), "k_proj": list(range(16, 32))}),  # head 3 reads kv group 1
])
def test_right_layouts_train_the_right_rows(make, layout, want):
    pm = get_peft_model(make(), HeadMaskConfig(heads={0: [3]}, layout=layout, parts=["q", "k"]))
    got = {n.rsplit(".", 1)[-1]: m.headmask_index["default"].tolist()
           for n, m in pm.named_modules() if isinstance(m, HeadMaskLayer)}
    assert got == want


# ----- item 5: config keys -----
@pytest.mark.parametrize("heads, match", [
    ({1.5: [0]}, "non-integer layer key 1.5"),
    ({True: [0]}, "non-integer layer key True"),
    ({0: [0], "0": [1]}, "layer 0 twice"),
    ({0: [True]}, "non-negative integers"),
    ([[0, 1], [2]], r"dict\(enumerate"),
])
def test_heads_keys_that_would_select_other_heads_are_refused(heads, match):
    with pytest.raises(ValueError, match=match):
        HeadMaskConfig(heads=heads)


def test_integer_like_heads_are_accepted():
    cfg = HeadMaskConfig(heads={np.int64(2): [np.int64(1), torch.tensor(3)], "4": torch.tensor([0, 1]), 0: 2})
    assert cfg.heads == {0: [2], 2: [1, 3], 4: [0, 1]}
    assert all(type(k) is int and all(type(h) is int for h in v) for k, v in cfg.heads.items())
    json.dumps(cfg.to_dict())  # still serialisable


# ----- item 7: a failed add_adapter leaves the model usable -----
@pytest.mark.parametrize("name", ["a.b", "../x", "", "__base__"])
def test_a_bad_adapter_name_is_refused_and_the_model_stays_usable(name):
    pm = get_peft_model(make_model("llama"), HeadMaskConfig(heads={0: [0]}, init_weights=False))
    inputs = make_inputs()
    with torch.no_grad():
        before = output_of(pm, inputs)
    with pytest.raises(ValueError, match="Invalid adapter name"):
        pm.add_adapter(name, HeadMaskConfig(heads={1: [1]}))
    pm.add_adapter("ok", HeadMaskConfig(heads={1: [1]}))
    pm.delete_adapter("ok")
    with torch.no_grad():
        assert torch.equal(output_of(pm, inputs), before)
    assert not any(name in m.headmask_delta or name in m.headmask_index
                   for m in pm.modules() if isinstance(m, HeadMaskLayer))


# ----- item 8: a corrupt adapter file leaves the caller's model as it was -----
@pytest.mark.parametrize("damage", ["truncate", "header"])
def test_a_corrupt_adapter_file_is_one_clear_error_and_the_model_stays_unwrapped(saved, tmp_path, damage):
    folder = copy_adapter(saved, tmp_path)
    path = folder / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-10] if damage == "truncate" else data[:8] + b"#garbage" + data[16:])
    base = make_model("llama")
    snapshot = copy.deepcopy(base.state_dict())
    with pytest.raises(ValueError, match="adapter_model.safetensors is not a valid safetensors file.*Nothing was"):
        PeftModel.from_pretrained(base, folder)
    assert untouched(base, snapshot)


# ----- item 10: several layer stacks (an encoder-decoder without a built-in layout: BART; T5's stacks are built
# in and run through the shared contract in test_delta_kinds.py) -----
def bart():
    torch.manual_seed(0)
    return tf.BartForConditionalGeneration(tf.BartConfig(
        vocab_size=128, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=96, decoder_ffn_dim=96, max_position_embeddings=64, pad_token_id=0,
        bos_token_id=1, eos_token_id=1, decoder_start_token_id=1, forced_eos_token_id=None)).eval()


BART = dict(model_type="bart", num_layers=2, num_heads=4, num_kv_heads=4, head_dim=16, hidden_size=64,
            layers="layers", modules={"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                                      "o": "self_attn.out_proj"})


def test_an_ambiguous_layer_stack_is_refused_with_the_fix():
    model = bart()
    snapshot = copy.deepcopy(model.state_dict())
    with pytest.raises(LayoutError, match=r"several layer stacks.*'model.decoder.layers', 'model.encoder.layers'"):
        get_peft_model(model, HeadMaskConfig(heads={0: [1]}, layout=BART))
    assert untouched(model, snapshot)


@pytest.mark.parametrize("stack", ["encoder.layers", "decoder.layers"])
def test_one_stack_of_an_encoder_decoder_trains_merges_and_streams(stack, tmp_path):
    base = bart()
    base.save_pretrained(tmp_path / "base")
    pm = get_peft_model(copy.deepcopy(base), HeadMaskConfig(heads={1: [1, 2]}, layout={**BART, "layers": stack},
                                                            parts=["q", "v", "o"], init_weights=False))
    assert all(stack in n for n, m in pm.named_modules() if isinstance(m, HeadMaskLayer))
    pm.save_pretrained(tmp_path / "adapter")
    inputs = {"input_ids": make_inputs()["input_ids"], "decoder_input_ids": make_inputs(seed=2)["input_ids"]}
    with torch.no_grad():
        want = pm(**inputs).logits
        merged = merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged")
        got = tf.BartForConditionalGeneration.from_pretrained(merged)(**inputs).logits
    assert not torch.allclose(want, base(**inputs).logits)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


# ----- item 14: smaller -----
def test_a_layout_object_is_accepted_and_bad_layout_keys_are_named():
    model = glm()
    pm = get_peft_model(model, HeadMaskConfig(heads={0: [3]}, layout=HeadLayout.from_dict(GLM)))
    assert pm.peft_config["default"].layout == HeadLayout.from_dict(GLM).to_dict()
    with pytest.raises(LayoutError, match=r"unknown key\(s\) \['head_size'\].*'model_type'"):
        HeadMaskConfig(heads={0: [0]}, layout={**GLM, "head_size": 16})
    with pytest.raises(LayoutError, match=r"no \['model_type'\]"):
        HeadMaskConfig(heads={0: [0]}, layout={k: v for k, v in GLM.items() if k != "model_type"})


def test_cli_merge_and_export_refuse_a_flipped_bit_unless_forced(saved, tmp_path):
    import subprocess
    import sys

    folder = copy_adapter(saved, tmp_path)
    flip_a_bit(folder)
    for args in (["merge", "--base", str(saved / "base"), "--adapter", str(folder), "--out", str(tmp_path / "m")],
                 ["export-lora", str(folder), str(tmp_path / "l")]):
        run = subprocess.run([sys.executable, "-m", "peft_alps", *args], capture_output=True, text=True)
        assert run.returncode == 2 and "modified or corrupted" in run.stderr, run.stderr
        assert run.stderr.count("\n") == 1 and not (tmp_path / args[-1]).exists()
        forced = subprocess.run([sys.executable, "-m", "peft_alps", *args, "--force"], capture_output=True, text=True)
        assert forced.returncode == 0, forced.stderr
