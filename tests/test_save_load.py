"""Saving, loading and registration with stock PEFT and transformers APIs."""

import copy
import json

import pytest
import torch
from conftest import make_inputs, make_model, output_of
from peft import AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification, PeftModel, get_peft_model
from safetensors import safe_open

import peft_alps  # noqa: F401  (registers the method)
from peft_alps import HeadMaskConfig
from peft_alps.tuner.layer import HeadMaskLayer

HEADS = {0: [1], 2: [0, 3]}


def trained_adapter(arch="llama", **kw):
    kw.setdefault("parts", ["q", "k", "v", "o"])
    return get_peft_model(make_model(arch), HeadMaskConfig(heads=HEADS, init_weights=False, **kw))


def test_save_then_from_pretrained_reproduces_outputs(arch, tmp_path):
    pm = trained_adapter(arch)
    inputs = make_inputs()
    with torch.no_grad():
        expected = output_of(pm, inputs)
    pm.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_model(arch), tmp_path)
    with torch.no_grad():
        assert torch.equal(output_of(loaded, inputs), expected)
    assert not any(p.requires_grad for p in loaded.parameters())  # inference mode by default


def test_saved_file_holds_only_the_deltas(arch, tmp_path):
    pm = trained_adapter(arch)
    pm.save_pretrained(tmp_path)
    deltas = {n: p for n, p in pm.named_parameters() if "headmask_" in n}
    delta_bytes = sum(p.numel() * p.element_size() for p in deltas.values())
    file = tmp_path / "adapter_model.safetensors"
    assert delta_bytes <= file.stat().st_size < delta_bytes + 64 * 1024
    with safe_open(file, "pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}
    assert len(saved) == len(deltas)
    assert all("headmask_" in k for k in saved)
    assert sum(t.numel() for t in saved.values()) == sum(p.numel() for p in deltas.values())
    assert not list(tmp_path.glob("*.bin")) and not list(tmp_path.glob("*.pt"))


def test_adapter_config_records_heads_parts_layout(tmp_path):
    pm = trained_adapter("llama", parts=["q", "o"])
    pm.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "HEADMASK"
    assert {int(k): v for k, v in cfg["heads"].items()} == HEADS
    assert cfg["parts"] == ["q", "o"]
    assert cfg["layout"]["num_heads"] == 4 and cfg["layout"]["num_kv_heads"] == 2
    assert cfg["layout"]["modules"]["o"] == "self_attn.o_proj"
    assert sorted(cfg["target_modules"]) == sorted(
        f"model.layers.{li}.self_attn.{m}" for li in HEADS for m in ("q_proj", "o_proj"))
    back = HeadMaskConfig.from_pretrained(tmp_path)
    assert back.heads == HEADS and back.parts == ["q", "o"]


def test_from_pretrained_is_trainable_continues_training(tmp_path):
    trained_adapter().save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_model("llama"), tmp_path, is_trainable=True)
    trainable = [n for n, p in loaded.named_parameters() if p.requires_grad]
    assert trainable and all("headmask_" in n for n in trainable)
    output_of(loaded, make_inputs()).sum().backward()
    assert all(p.grad is not None for p in loaded.parameters() if p.requires_grad)


def test_auto_peft_model_for_causal_lm_from_local_dir(tmp_path):
    base = make_model("llama")
    base.save_pretrained(tmp_path / "base")
    base = type(base).from_pretrained(tmp_path / "base", attn_implementation="eager")
    pm = get_peft_model(base, HeadMaskConfig(heads=HEADS, init_weights=False))
    inputs = make_inputs()
    with torch.no_grad():
        expected = output_of(pm, inputs)
    pm.save_pretrained(tmp_path / "adapter")
    loaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter", attn_implementation="eager")
    with torch.no_grad():
        torch.testing.assert_close(output_of(loaded, inputs), expected, atol=1e-6, rtol=0)


def test_auto_peft_model_for_sequence_classification_with_modules_to_save(tmp_path):
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                            num_attention_heads=4, num_key_value_heads=2, num_labels=3, pad_token_id=0)
    tf.LlamaForSequenceClassification(config).save_pretrained(tmp_path / "base")
    base = tf.LlamaForSequenceClassification.from_pretrained(tmp_path / "base", attn_implementation="eager")
    pm = get_peft_model(base, HeadMaskConfig(heads=HEADS, init_weights=False, task_type="SEQ_CLS",
                                             modules_to_save=["score"]))
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert any("score" in n for n in trainable)
    with torch.no_grad():
        pm.base_model.model.score.modules_to_save["default"].weight.add_(1.0)  # a trained head
        inputs = make_inputs()
        expected = pm(**inputs).logits
    pm.save_pretrained(tmp_path / "adapter")
    loaded = AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "adapter",
                                                                    attn_implementation="eager")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, expected, atol=1e-6, rtol=0)


def test_transformers_load_adapter(tmp_path):
    pm = trained_adapter()
    inputs = make_inputs()
    with torch.no_grad():
        expected = output_of(pm, inputs)
    pm.save_pretrained(tmp_path)
    model = make_model("llama")
    model.load_adapter(str(tmp_path), adapter_name="heads")
    assert any(isinstance(m, HeadMaskLayer) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(output_of(model, inputs), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("shape", [dict(hidden_size=64, num_attention_heads=8), dict(hidden_size=128, head_dim=16)])
def test_load_adapter_onto_mismatched_model_fails_before_modifying(tmp_path, shape):
    trained_adapter().save_pretrained(tmp_path)
    import transformers as tf

    shape.setdefault("num_attention_heads", 4)
    other = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=128, intermediate_size=96, num_hidden_layers=3,
                                               num_key_value_heads=2, **shape))
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match="attention shaped"):
        PeftModel.from_pretrained(other, tmp_path)
    assert not any(isinstance(m, HeadMaskLayer) for m in other.modules())
    assert other.state_dict().keys() == before.keys()
