"""PEFT mixed-batch inference (``adapter_names=[...]``, one adapter per sample) with head-mask adapters."""

import pytest
import torch
from conftest import make_inputs, make_model, output_of
from peft import get_peft_model

from peft_alps import HeadMaskConfig

# the brief's adapter names; "a" is a substring of the "headmask_" prefix, which PEFT warns about (harmless here)
pytestmark = pytest.mark.filterwarnings("ignore:Adapter name 'a' should not be contained in the prefix")

# overlapping selections; layer 2 is touched by "c" only, every adapter trains some "o" columns
ADAPTERS = {
    "a": dict(heads={0: [1, 2], 1: [3]}, parts=["q", "k", "v", "o"]),
    "b": dict(heads={0: [2], 1: [0, 3]}, parts=["q", "o"]),
    "c": dict(heads={0: [0, 1], 2: [1]}, parts=["v", "o"]),
}


def three_adapter_model(arch, strategy="merged", adapters=ADAPTERS):
    """A model of ``arch`` holding ``adapters`` (name -> HeadMaskConfig keywords) with random deltas; the first set
    active, in eval mode."""
    model = None
    for name, kw in adapters.items():
        cfg = HeadMaskConfig(**kw, init_weights=False, forward_strategy=strategy)
        if model is None:
            model = get_peft_model(make_model(arch), cfg, adapter_name=name)
        else:
            model.add_adapter(name, cfg)
    model.set_adapter(next(iter(adapters)))
    return model.eval()


def alone(model, inputs, i, adapter):
    """Output of sample ``i`` run on its own with ``adapter`` set active (``"__base__"``: adapters disabled)."""
    sample = {k: v[i : i + 1] for k, v in inputs.items()}
    if adapter == "__base__":
        with model.disable_adapter():
            return output_of(model, sample)[0]
    model.set_adapter(adapter)
    return output_of(model, sample)[0]


@pytest.mark.parametrize("strategy", ["merged", "output_add"])
def test_each_sample_gets_its_adapter(arch, strategy):
    model = three_adapter_model(arch, strategy)
    inputs = make_inputs(batch=4)
    with torch.no_grad():
        all_active = output_of(model, inputs)  # every sample with the active adapter "a"
        for names in (["a", "__base__", "b", "c"], ["c", "b", "a", "__base__"]):
            mixed = output_of(model, {**inputs, "adapter_names": names})
            for i, name in enumerate(names):
                torch.testing.assert_close(mixed[i], alone(model, inputs, i, name), atol=1e-5, rtol=0,
                                           msg=lambda m: f"sample {i} ({name}): {m}")
            assert not torch.allclose(mixed, all_active, atol=1e-4), "mixed batch ran every sample with 'a'"
            differs = [not torch.allclose(mixed[i], all_active[i], atol=1e-4) for i in range(4)]
            assert differs == [n != "a" for n in names]
        # plain calls afterwards are untouched by the mixed ones
        model.set_adapter("a")
        torch.testing.assert_close(output_of(model, inputs), all_active, atol=0, rtol=0)


def test_refusals_name_the_problem_and_the_fix():
    model = three_adapter_model("llama")
    inputs = make_inputs(batch=2)
    with torch.no_grad():
        ref = output_of(model, inputs)

        model.train()
        with pytest.raises(ValueError, match=r"training mode.*model\.eval\(\)"):
            model(**inputs, adapter_names=["a", "b"])
        model.eval()

        model.merge_adapter()
        with pytest.raises(ValueError, match=r"merged.*unmerge_adapter\(\)"):
            model(**inputs, adapter_names=["a", "b"])
        model.unmerge_adapter()

        with pytest.raises(ValueError, match=r"unknown adapter 'x'; this model has \['a', 'b', 'c'\] and '__base__'"):
            model(**inputs, adapter_names=["a", "x"])

        with pytest.raises(ValueError, match=r"3 adapter names for a batch of 2"):
            model(**inputs, adapter_names=["a", "b", "c"])

        # nothing left behind by the refused calls
        torch.testing.assert_close(output_of(model, inputs), ref, atol=0, rtol=0)


def test_generate_beam_search_per_sample():
    model = three_adapter_model("llama")
    inputs = make_inputs(batch=3, seq=6)
    names = ["b", "__base__", "c"]
    gen = dict(num_beams=2, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        mixed = model.generate(**inputs, adapter_names=names, **gen)
        all_active = model.generate(**inputs, **gen)  # every sample with the active adapter "a"
        per_sample = []
        for i, name in enumerate(names):
            sample = {k: v[i : i + 1] for k, v in inputs.items()}
            if name == "__base__":
                with model.disable_adapter():
                    per_sample.append(model.generate(**sample, **gen)[0])
            else:
                model.set_adapter(name)
                per_sample.append(model.generate(**sample, **gen)[0])
    assert torch.equal(mixed, torch.stack(per_sample))
    assert not torch.equal(mixed, all_active)


def test_modules_to_save_follow_the_sample():
    """A ``modules_to_save`` copy (here ``lm_head``) is also chosen per sample, as with LoRA."""
    model = get_peft_model(make_model("llama"), HeadMaskConfig(heads={0: [1]}, init_weights=False,
                                                               modules_to_save=["lm_head"]), adapter_name="p")
    model.add_adapter("q", HeadMaskConfig(heads={1: [2]}, init_weights=False, modules_to_save=["lm_head"]))
    model.eval()
    inputs = make_inputs(batch=3)
    names = ["q", "__base__", "p"]
    with torch.no_grad():
        for name in ("p", "q"):
            model.base_model.model.lm_head.modules_to_save[name].weight.normal_()
        model.set_adapter("p")
        mixed = output_of(model, {**inputs, "adapter_names": names})
        for i, name in enumerate(names):
            torch.testing.assert_close(mixed[i], alone(model, inputs, i, name), atol=1e-5, rtol=0)
