"""Scoring and inspection on every built-in architecture beyond the main matrix, and on an inferred layout.

The tuner contract itself (gradients, merge, unmerge, save/load, streamed merge, LoRA export) runs on these
cases in test_delta_kinds.py; the layouts are proven by test_layout_check.py. Here: gradient head scores equal
a full backward of a plain copy summed over each head's rows, the probe fine-tune and ALPS scoring run through,
and ``inspect`` / the model card describe a saved adapter with the config's numbers.
"""

import copy
import warnings

import pytest
import torch
import transformers as tf
from conftest import MORE_ARCHS, arch_layout, make_inputs, make_model, output_of
from peft import get_peft_model

from peft_alps import HeadLayout, HeadMaskConfig, gradient_head_scores, probe_task_model, score_heads
from peft_alps.heads.layout import linear_frame
from peft_alps.io.card import summarize

PARTS = ("q", "k", "v", "o")


def biogpt():  # no built-in layout: inferred (with a warning)
    torch.manual_seed(0)
    return tf.BioGptForCausalLM(tf.BioGptConfig(vocab_size=128, hidden_size=64, intermediate_size=96,
                                                num_hidden_layers=2, num_attention_heads=4)).eval()


CASES = sorted(MORE_ARCHS) + ["biogpt (inferred)"]


def case(arch):
    if arch == "biogpt (inferred)":
        return biogpt(), None
    model = make_model(arch)
    return model, arch_layout(arch, model.config)


def loss(model, batch):
    return output_of(model, batch).pow(2).mean()


def batches(n=2):
    return [make_inputs(seed=20 + i) for i in range(n)]


def reference_scores(model, layout, data):
    """Sum over batches of |dL/dW| over each head's rows (columns for o), from a full backward of a plain copy."""
    ref = copy.deepcopy(model)
    for p in ref.parameters():
        p.requires_grad_(True)
    modules = dict(ref.named_modules())
    names = {key: next(n for n in modules if n.endswith(f"{layout.layers}.{key[0]}.{key[1]}"))
             for key in ((i, layout.modules[p]) for i in range(layout.num_layers) for p in PARTS)}
    scores = torch.zeros(layout.num_layers, layout.num_heads, dtype=torch.float64)
    for batch in data:
        ref.zero_grad(set_to_none=True)
        loss(ref, batch).backward()
        for layer in range(layout.num_layers):
            for part in PARTS:
                module = modules[names[layer, layout.modules[part]]]
                grad = linear_frame(module.weight.grad, layout.transposed).double()
                for head in range(layout.num_heads):
                    rows = list(layout.part_channels(part, head))
                    scores[layer, head] += (grad[:, rows] if part == "o" else grad[rows]).abs().sum()
    return scores


@pytest.mark.parametrize("arch", CASES)
def test_gradient_scores_probe_and_alps_scores(arch):
    model, layout = case(arch)
    data = batches()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the inferred-layout notice
        got = gradient_head_scores(model, data, "grad", PARTS, loss_fn=loss, layout=layout)
        used = HeadLayout.from_dict(got.layout)
        torch.testing.assert_close(got.scores.double(), reference_scores(model, used, data), rtol=1e-5, atol=0)
        probe = probe_task_model(model, data, steps=2, lr=1e-2, loss_fn=loss, layout=layout)
        scores = score_heads(model, probe, layout=layout or used)
    assert scores.scores.shape == (used.num_layers, used.num_heads)
    assert torch.isfinite(scores.scores).all() and (scores.scores > 0).all()  # every head's q/k/v moved


@pytest.mark.parametrize("arch", CASES)
def test_inspect_describes_a_saved_adapter(arch, tmp_path):
    model, layout = case(arch)
    heads = {0: [1], 1: [0, 3]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pm = get_peft_model(model, HeadMaskConfig(heads=heads, parts=list(PARTS), layout=layout))
    pm.save_pretrained(tmp_path)
    info = summarize(tmp_path)
    recorded = HeadLayout.from_dict(pm.peft_config["default"].layout)
    assert info["heads"] == heads and info["num_heads"] == recorded.num_heads
    assert info["num_layers"] == recorded.num_layers and info["model_type"] == recorded.model_type
    assert info["delta_params"] == sum(p.numel() for p in pm.parameters() if p.requires_grad)
    assert (tmp_path / "README.md").is_file()
