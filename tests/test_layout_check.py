"""A layout proves itself (peft_alps.heads.check), unknown architectures get an inferred layout
(peft_alps.heads.infer), and the README's architecture table is the code's.

The check's reference is the architecture's own forward pass: one perturbed q/k/v row may change only its
head's (kv group's) columns of the output projection's input. Wrong layouts must fail naming the field.
"""

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as tf
from conftest import ARCHS, MORE_ARCHS, arch_layout, arch_stack, make_inputs, make_model, output_of
from peft import get_peft_model

from peft_alps import HeadLayout, HeadMaskConfig, LayoutError, architecture_table, check_layout, infer_layout
from peft_alps.heads import layout as layout_module
from peft_alps.heads.layout import ARCHITECTURES, arch_spec

ALL_CASES = list(ARCHS) + list(MORE_ARCHS)
README = Path(__file__).resolve().parents[1] / "README.md"


def forget(monkeypatch, model_type):
    """peft_alps without the built-in entry of ``model_type`` for one test (the table's order kept)."""
    monkeypatch.setattr(layout_module, "ARCHITECTURES", {k: v for k, v in ARCHITECTURES.items() if k != model_type})


def built_in(model, arch):
    return arch_layout(arch, model.config) or HeadLayout.from_model_config(model.config)


@pytest.mark.parametrize("arch", ALL_CASES)
def test_every_built_in_layout_proves_itself(arch):
    """Every built-in layout passes, the coupling it reports is the table's, and the model is left bit for bit."""
    model = make_model(arch)
    before = copy.deepcopy(model.state_dict())
    layout = built_in(model, arch)
    result = check_layout(model, layout)
    assert result.layout == layout
    assert result.probes > 2 * layout.num_heads
    assert result.coupled == arch_spec(model.config.model_type, arch_stack(arch)).coupled
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_check_runs_through_an_adapter_and_leaves_it_untouched():
    model = make_model("llama")
    pm = get_peft_model(model, HeadMaskConfig(heads={0: [1]}, parts=["q", "k", "v", "o"], init_weights=False))
    inputs = make_inputs()
    before = output_of(pm, inputs)
    assert check_layout(pm).layout == HeadLayout.from_model_config(model.config)
    assert torch.equal(output_of(pm, inputs), before)


# (case, change to the built-in layout, the field the error must name as wrong)
WRONG = [
    ("gpt_neox", {"fused": "blocks"}, "fused='blocks' is wrong.*fused='interleaved'"),
    ("gpt2", {"fused": "interleaved"}, "fused='interleaved' is wrong.*fused='blocks'"),
    ("phi3", {"fused": "interleaved"}, "fused='interleaved' is wrong.*fused='blocks'"),
    ("falcon_new", {"fused": "blocks"}, "fused='blocks' is wrong.*fused='interleaved'"),
    ("llama", {"num_kv_heads": 4}, "num_kv_heads=4 is wrong.*num_kv_heads=2"),
    ("qwen3", {"head_dim": 16}, "head_dim=16 is wrong.*head_dim=32"),
    ("bert", {"num_heads": 8, "num_kv_heads": 8, "head_dim": 8}, "says num_heads=4: fix the layout's num_heads"),
    ("llama", {"modules": {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                           "o": "mlp.down_proj"}}, "mlp.down_proj"),
]


@pytest.mark.parametrize("arch, change, match", WRONG, ids=[f"{a}-{sorted(c)[0]}" for a, c, _ in WRONG])
def test_wrong_layouts_fail_naming_the_field(arch, change, match):
    model = make_model(arch)
    before = copy.deepcopy(model.state_dict())
    wrong = HeadLayout.from_dict({**built_in(model, arch).to_dict(), **change})
    with pytest.raises(LayoutError, match=match):
        check_layout(model, wrong)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_fused_order_is_invisible_to_shapes_but_not_to_the_check():
    """The wrong fused order has the right shapes (check_model accepts it): only the forward passes catch it."""
    model = make_model("gpt_neox")
    wrong = HeadLayout.from_dict({**HeadLayout.from_model_config(model.config).to_dict(), "fused": "blocks"})
    from peft_alps.tuner.model import projection_shapes

    wrong.check_model(projection_shapes(model), model.config)  # shapes agree
    with pytest.raises(LayoutError, match="q row 16, which the layout gives to query head 1, changed 16 context "
                                          r"columns of heads \[0\]"):
        check_layout(model, wrong)


def test_a_coupled_architecture_is_reported_not_refused():
    result = check_layout(make_model("olmo2"))
    assert result.coupled == ("q", "k")
    assert "q and k couple the heads" in result.summary()


# ----- inference -----
INFERRED = ["llama", "gpt2", "gpt_neox", "bert", "phi3", "falcon_new", "falcon_mq", "opt", "modernbert",
            "distilbert", "qwen3", "gpt_bigcode_mq"]


@pytest.mark.parametrize("arch", INFERRED)
def test_inferred_layout_equals_the_built_in_one(arch, monkeypatch):
    model = make_model(arch)
    want = HeadLayout.from_model_config(model.config)
    forget(monkeypatch, model.config.model_type)
    assert infer_layout(model) == want


def test_get_peft_model_infers_an_unknown_architecture_and_records_the_layout(monkeypatch):
    """Without a built-in entry, get_peft_model infers the layout (with a warning showing it), trains the same
    slices as with the built-in layout, and saves the layout with the adapter."""
    forget(monkeypatch, "gpt_neox")
    config = HeadMaskConfig(heads={1: [2]}, parts=["q", "k", "v", "o"], init_weights=False)
    with pytest.warns(UserWarning, match="inferred one from the model's modules"):
        pm = get_peft_model(make_model("gpt_neox"), copy.deepcopy(config))
    monkeypatch.undo()
    want = get_peft_model(make_model("gpt_neox"), config)
    assert pm.peft_config["default"].layout == want.peft_config["default"].layout
    inputs = make_inputs()
    assert torch.equal(output_of(pm, inputs), output_of(want, inputs))


def biogpt():
    return tf.BioGptForCausalLM(tf.BioGptConfig(vocab_size=128, hidden_size=64, intermediate_size=96,
                                                num_hidden_layers=2, num_attention_heads=4)).eval()


def test_an_architecture_peft_alps_never_saw_is_inferred():
    model = biogpt()
    assert model.config.model_type not in ARCHITECTURES
    layout = infer_layout(model)
    assert layout.modules == {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                              "o": "self_attn.out_proj"}
    assert (layout.layers, layout.num_layers, layout.num_heads, layout.head_dim) == ("layers", 2, 4, 16)


def test_inference_fails_saying_what_it_could_not_determine(monkeypatch):
    forget(monkeypatch, "t5")
    with pytest.raises(LayoutError, match=r"3 attention stacks \(encoder.block.N.layer.0.SelfAttention.q, "
                                          r"decoder.block.N.layer.0.SelfAttention.q, "
                                          r"decoder.block.N.layer.1.EncDecAttention.q\)"):
        infer_layout(make_model("t5_encoder"))
    model = biogpt()
    for layer in model.biogpt.layers:  # names no inference rule knows
        layer.self_attn.alpha, layer.self_attn.beta = layer.self_attn.q_proj, layer.self_attn.k_proj
        del layer.self_attn.q_proj, layer.self_attn.k_proj
    with pytest.raises(LayoutError, match=r"no block holds q, k and v projections.*"
                                          r"biogpt.layers.0: .*self_attn.alpha 64x64"):
        infer_layout(model)


def test_t5_needs_a_stack():
    model = make_model("t5_cross")
    with pytest.raises(LayoutError, match="several attention stacks.*'encoder'.*'decoder'.*'cross'.*stack="):
        get_peft_model(model, HeadMaskConfig(heads={0: [1]}))
    with pytest.raises(LayoutError, match="no stack 'middle'"):
        HeadLayout.from_model_config(model.config, stack="middle")


# ----- the command -----
def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "peft_alps", "check-layout", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_check_layout_command(tmp_path):
    make_model("falcon_new").config.save_pretrained(tmp_path / "falcon")
    done = run_cli(tmp_path / "falcon", "--json")
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    assert got["layout"] == HeadLayout.from_model_config(make_model("falcon_new").config).to_dict()
    assert got["coupled"] == []
    wrong = {**got["layout"], "fused": "blocks"}
    (tmp_path / "wrong.json").write_text(json.dumps(wrong))
    done = run_cli(tmp_path / "falcon" / "config.json", "--layout", tmp_path / "wrong.json")
    assert done.returncode == 1
    assert "fused='blocks' is wrong" in done.stderr
    done = run_cli(tmp_path / "nowhere")
    assert done.returncode == 2 and "config.json" in done.stderr


# ----- README -----
def test_readme_architecture_table_is_generated_from_the_code():
    text = README.read_text()
    found = re.search(r"<!-- architectures: generated by peft_alps.architecture_table\(\) -->\n"
                      r"(.*?)<!-- /architectures -->", text, re.S)
    assert found, "README.md lost the generated architecture table markers"
    assert found.group(1) == architecture_table(), "README table is stale: paste peft_alps.architecture_table()"
    for model_type in ARCHITECTURES:
        assert model_type in found.group(1)


def test_the_check_runs_in_eval_mode_and_restores_the_mode():
    """Dropout in train mode would change every head: the check switches to eval and puts the mode back."""
    model = make_model("bert").train()
    assert model.config.attention_probs_dropout_prob > 0
    assert check_layout(model).coupled == ()
    assert all(m.training for m in model.modules())
