"""Bad input raises a clear error before anything is modified."""

import copy
import warnings

import pytest
import torch
import transformers as tf
from conftest import make_inputs, make_model, output_of
from peft import get_peft_model

import peft_alps
from peft_alps import HeadLayout, HeadMaskConfig, LayoutError
from peft_alps.tuner.layer import HeadMaskLayer


def assert_untouched(model, snapshot):
    assert not any(isinstance(m, HeadMaskLayer) for m in model.modules())
    assert not hasattr(model, "peft_config")
    state = model.state_dict()
    assert state.keys() == snapshot.keys()
    assert all(torch.equal(state[k], snapshot[k]) for k in state)


@pytest.mark.parametrize("heads, match", [
    ({3: [0]}, r"layer\(s\) \[3\].*3 layers"),
    ({0: [4]}, r"4 query heads"),
    ({0: [0], 2: [1, 7]}, r"heads\[2\]"),
])
def test_out_of_range_selection(heads, match):
    model = make_model("llama")
    snapshot = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=match):
        get_peft_model(model, HeadMaskConfig(heads=heads))
    assert_untouched(model, snapshot)


@pytest.mark.parametrize("kwargs, match", [
    (dict(heads={}), "heads is empty"),
    (dict(heads={0: []}), r"heads\[0\] is empty"),
    (dict(heads={0: [-1]}), "non-negative"),
    (dict(heads={"x": [0]}), "non-integer layer"),
    (dict(heads={0: [0]}, parts=["q", "z"]), r"Unknown part\(s\) \['z'\]"),
    (dict(heads={0: [0]}, parts=[]), "parts is empty"),
    (dict(heads={0: [0]}, parts="qkv"), "must be a list"),
    (dict(heads={0: [0]}, forward_strategy="fast"), "forward_strategy"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HeadMaskConfig(**kwargs)


def biogpt():
    """A tiny BioGPT: an architecture peft_alps has no built-in layout for (layers.N.self_attn.{q,k,v,out}_proj)."""
    torch.manual_seed(0)
    return tf.BioGptForCausalLM(tf.BioGptConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                                                num_attention_heads=4, intermediate_size=96,
                                                max_position_embeddings=64))


def test_unknown_architecture_is_inferred_with_a_warning_or_refused_clearly():
    layout = dict(model_type="biogpt", num_layers=2, num_heads=4, num_kv_heads=4, head_dim=16, hidden_size=64,
                  layers="layers", modules={"q": "self_attn.q_proj", "k": "self_attn.k_proj",
                                            "v": "self_attn.v_proj", "o": "self_attn.out_proj"})
    model = biogpt()
    assert model.config.model_type not in peft_alps.ARCHITECTURES
    with pytest.warns(UserWarning, match="no built-in layout for model_type='biogpt': inferred"):
        pm = get_peft_model(copy.deepcopy(model), HeadMaskConfig(heads={0: [1]}, parts=["q", "o"]))
    assert pm.peft_config["default"].layout == HeadLayout.from_dict(layout).to_dict()
    assert pm.get_nb_trainable_parameters()[0] == 16 * 64 + 16 + 64 * 16  # q rows + q bias rows + o columns

    odd = biogpt()  # projections named so that no inference rule finds them: refused, nothing modified
    for block in odd.biogpt.layers:
        block.self_attn.alpha = block.self_attn.q_proj
        del block.self_attn.q_proj
    snapshot = copy.deepcopy(odd.state_dict())
    with pytest.raises(LayoutError, match=r"Cannot infer the attention layout of biogpt: no block holds q, k and v"
                                          r".*Pass HeadMaskConfig\(layout="):
        get_peft_model(odd, HeadMaskConfig(heads={0: [1]}))
    assert_untouched(odd, snapshot)

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a layout passed: no inference, no warning
        pm = get_peft_model(model, HeadMaskConfig(heads={0: [1]}, layout=layout, parts=["q", "o"]))
    assert pm.get_nb_trainable_parameters()[0] == 16 * 64 + 16 + 64 * 16


def test_custom_layout_with_wrong_module_names_fails_cleanly():
    model = biogpt()
    snapshot = copy.deepcopy(model.state_dict())
    layout = dict(model_type="biogpt", num_layers=2, num_heads=4, num_kv_heads=4, head_dim=16, hidden_size=64,
                  layers="layers", modules={"q": "attn.q", "k": "attn.k", "v": "attn.v", "o": "attn.o"})
    with pytest.raises(LayoutError, match="Could not find the attention module"):
        get_peft_model(model, HeadMaskConfig(heads={0: [1]}, layout=layout))
    assert_untouched(model, snapshot)


def test_adding_a_bad_second_adapter_leaves_the_first_intact():
    pm = get_peft_model(make_model("llama"), HeadMaskConfig(heads={0: [0]}, init_weights=False))
    inputs = make_inputs()
    with torch.no_grad():
        before = output_of(pm, inputs)
    with pytest.raises(ValueError, match="query heads"):
        pm.add_adapter("bad", HeadMaskConfig(heads={1: [9]}))
    assert "bad" not in pm.peft_config
    with torch.no_grad():
        assert torch.equal(output_of(pm, inputs), before)
    assert peft_alps.HeadMaskConfig is HeadMaskConfig


def test_an_unsupported_quantized_base_is_refused_before_wrapping():
    """A projection whose weight no supported quantization backend reads (here raw int8 storage without a
    backend's module or tensor type: nothing says how to dequantize it) is refused by name, with what is supported:
    the slices would otherwise be read from and trained beside packed storage. Supported backends:
    tests/test_quantized.py."""
    model = make_model("llama")
    q_proj = model.model.layers[1].self_attn.q_proj
    q_proj.weight = torch.nn.Parameter(torch.zeros(q_proj.weight.shape, dtype=torch.int8), requires_grad=False)
    snapshot = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"model.layers.1.self_attn.q_proj is a Parameter weight of dtype int8.*"
                                         r"Supported: bitsandbytes 8-bit"):
        get_peft_model(model, HeadMaskConfig(heads={1: [0]}))
    assert_untouched(model, snapshot)
    get_peft_model(model, HeadMaskConfig(heads={0: [0]}))  # layers with float weights still wrap
