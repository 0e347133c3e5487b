"""Weighted combinations of head adapters: ``add_weighted_adapter`` and per-sample ``adapter_mixture``."""

import copy

import pytest
import scaled_delta  # noqa: F401  registers the "scaled_test" delta kind
import torch
from conftest import make_inputs, make_model, output_of
from test_mixed_batch import three_adapter_model
from peft import get_peft_model

from peft_alps import HeadMaskConfig, HeadMaskLayer
from peft_alps.tuner.mixture import adapter_mixture

pytestmark = pytest.mark.filterwarnings("ignore:Adapter name 'a' should not be contained in the prefix")

# overlapping selections with different parts; "c" is of another delta kind (its update is delta * scale)
ADAPTERS = {
    "a": dict(heads={0: [1, 2], 1: [3]}, parts=["q", "k", "v", "o"]),
    "b": dict(heads={0: [2], 1: [0, 3]}, parts=["q", "o"]),
    "c": dict(heads={0: [0, 1], 2: [1]}, parts=["v"], delta_kind="scaled_test"),
}
WEIGHTS = [0.7, -1.3, 2.0]


def three_adapters(arch, strategy="merged"):
    return three_adapter_model(arch, strategy, ADAPTERS)


def weighted_reference(model, adapters, weights):
    """The base model with ``sum_a w_a * get_delta_weight(a)`` added to each projection's weight (and the bias
    updates, read from the layers' slices), as plain modules: independent of the combination code."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for layer in (m for m in ref.modules() if isinstance(m, HeadMaskLayer)):
            total = sum(w * layer.get_delta_weight(a) for a, w in zip(adapters, weights) if a in layer.headmask_kind)
            if isinstance(total, int):
                continue
            base = layer.get_base_layer()
            base.weight += total.t() if layer.is_conv1d else total
            for a, w in zip(adapters, weights):
                if a in layer.headmask_kind and layer.slice_update(a)[1] is not None:
                    base.bias.index_add_(0, layer.headmask_index[a], w * layer.slice_update(a)[1])
    return ref.unload()  # the modules with the summed weights, adapters removed


def test_weighted_adapter_is_the_weighted_sum(arch):
    model = three_adapters(arch)
    inputs = make_inputs(batch=2)
    model.add_weighted_adapter(list(ADAPTERS), WEIGHTS, "mix")
    config = model.peft_config["mix"]
    assert config.delta_kind == "dense" and config.parts == ["q", "k", "v", "o"]
    assert config.heads == {0: [0, 1, 2], 1: [0, 3], 2: [1]}
    for layer in (m for m in model.modules() if isinstance(m, HeadMaskLayer)):
        expected = sum(w * layer.get_delta_weight(a) for a, w in zip(ADAPTERS, WEIGHTS) if a in layer.headmask_kind)
        if "mix" in layer.headmask_kind:  # a slice no source trained (union of heads x union of parts) stays zero
            expected = expected if torch.is_tensor(expected) else torch.zeros_like(layer.get_delta_weight("mix"))
            torch.testing.assert_close(layer.get_delta_weight("mix"), expected, atol=1e-6, rtol=0)
    model.set_adapter("mix")
    with torch.no_grad():
        ref = weighted_reference(model, list(ADAPTERS), WEIGHTS)
        torch.testing.assert_close(output_of(model, inputs), output_of(ref, inputs), atol=1e-5, rtol=1e-5)


def test_weighted_adapter_saves_loads_and_is_not_trainable_until_active(tmp_path):
    from peft import PeftModel

    model = three_adapters("llama")
    model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "ab")
    layers = [m for m in model.modules() if isinstance(m, HeadMaskLayer) and "ab" in m.headmask_kind]
    assert layers and not any(p.requires_grad for m in layers for p in m.adapter_tensors("ab").values())
    model.set_adapter("ab")
    inputs = make_inputs()
    with torch.no_grad():
        out = output_of(model, inputs)
    model.save_pretrained(tmp_path, selected_adapters=["ab"])
    loaded = PeftModel.from_pretrained(make_model("llama"), tmp_path / "ab").eval()
    with torch.no_grad():
        torch.testing.assert_close(output_of(loaded, inputs), out, atol=0, rtol=0)
    assert loaded.peft_config["default"].selection["adapters"] == ["a", "b"]


@pytest.mark.parametrize("strategy", ["merged", "output_add"])
def test_each_sample_gets_its_mixture(arch, strategy):
    model = three_adapters(arch, strategy)
    inputs = make_inputs(batch=4)
    weights = torch.tensor([[1.0, 0.0, 0.0], [0.3, -0.5, 1.2], [0.0, 0.0, 0.0], [0.0, 2.0, 0.5]])
    with torch.no_grad():
        plain = output_of(model, inputs)
        with adapter_mixture(model, list(ADAPTERS), weights):
            mixed = output_of(model, inputs)
        torch.testing.assert_close(output_of(model, inputs), plain, atol=0, rtol=0)  # context left nothing behind
        for i in range(4):
            sample = {k: v[i : i + 1] for k, v in inputs.items()}
            model.add_weighted_adapter(list(ADAPTERS), weights[i].tolist(), f"w{i}")
            model.set_adapter(f"w{i}")
            torch.testing.assert_close(mixed[i], output_of(model, sample)[0], atol=2e-5, rtol=1e-5,
                                       msg=lambda m: f"sample {i}: {m}")
        model.set_adapter("a")  # a one-hot row is the adapter itself
        torch.testing.assert_close(mixed[0], output_of(model, {k: v[:1] for k, v in inputs.items()})[0],
                                   atol=2e-5, rtol=1e-5)
        with model.disable_adapter():  # a zero row is the base model
            torch.testing.assert_close(mixed[2], output_of(model, {k: v[2:3] for k, v in inputs.items()})[0],
                                       atol=2e-5, rtol=1e-5)


def test_mixture_generate_with_beams_equals_each_sample_alone():
    model = three_adapters("llama")
    ids = make_inputs(batch=2, seq=6)["input_ids"]
    weights = torch.tensor([[0.5, 1.0, 0.0], [0.0, -1.0, 3.0]])
    kwargs = dict(max_new_tokens=5, do_sample=False, num_beams=2, pad_token_id=0)
    with torch.no_grad(), adapter_mixture(model, list(ADAPTERS), weights):
        mixed = model.generate(input_ids=ids, **kwargs)
    for i in range(2):
        model.add_weighted_adapter(list(ADAPTERS), weights[i].tolist(), f"g{i}")
        model.set_adapter(f"g{i}")
        with torch.no_grad():
            assert torch.equal(model.generate(input_ids=ids[i : i + 1], **kwargs)[0], mixed[i])


def test_refusals_name_the_problem_before_anything_changes():
    model = three_adapters("llama")
    inputs = make_inputs(batch=2)
    names = list(ADAPTERS)
    with pytest.raises(ValueError, match="one weight per adapter"):
        model.add_weighted_adapter(names, [1.0], "x")
    with pytest.raises(ValueError, match=r"Unknown adapter\(s\) \['z'\]"):
        model.add_weighted_adapter(["a", "z"], [1.0, 1.0], "x")
    with pytest.raises(ValueError, match="exists already"):
        model.add_weighted_adapter(["a"], [1.0], "b")
    model.merge_adapter()
    with pytest.raises(ValueError, match=r"merged.*unmerge_adapter\(\)"):
        model.add_weighted_adapter(["a"], [1.0], "x")
    with pytest.raises(ValueError, match=r"merged.*unmerge_adapter\(\)"), torch.no_grad():
        with adapter_mixture(model, names, torch.ones(2, 3)):
            output_of(model, inputs)
    model.unmerge_adapter()
    assert "x" not in model.peft_config
    with pytest.raises(ValueError, match=r"float tensor \[batch, 3\]"):
        with adapter_mixture(model, names, torch.ones(2, 2)):
            pass
    with pytest.raises(ValueError, match="NaN or inf"):
        with adapter_mixture(model, names, torch.full((2, 3), float("nan"))):
            pass
    with pytest.raises(ValueError, match="weights for 3 samples but the layer sees a batch of 2"), torch.no_grad():
        with adapter_mixture(model, names, torch.ones(3, 3)):
            output_of(model, inputs)
    with pytest.raises(ValueError, match="not both"), torch.no_grad():
        with adapter_mixture(model, names, torch.ones(2, 3)):
            model(**inputs, adapter_names=["a", "b"])
    assert all(getattr(m, "_headmask_mixture", None) is None for m in model.modules())  # cleared after errors


def test_adapters_with_modules_to_save_are_refused():
    model = get_peft_model(make_model("llama"), HeadMaskConfig(heads={0: [1]}, modules_to_save=["lm_head"]))
    model.add_adapter("plain", HeadMaskConfig(heads={1: [0]}))
    with pytest.raises(ValueError, match="modules_to_save"):
        model.add_weighted_adapter(["default", "plain"], [1.0, 1.0], "x")
    with pytest.raises(ValueError, match="modules_to_save"):
        with adapter_mixture(model, ["default", "plain"], torch.ones(1, 2)):
            pass
