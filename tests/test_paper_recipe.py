"""The ALPS paper's training recipe against HeadMask, on tiny models of every supported architecture.

The paper's recipe (``paper_recipe_hooks`` in benchmarks/common.py, shared with benchmarks/training_cost.py)
makes the whole q/k/v projections trainable and zeroes the gradient rows of the heads not selected. Those
"frozen" heads get zero gradients, so Adam's moments stay zero for them, but AdamW's decoupled weight decay
still shrinks them at every step. HeadMask trains only the selected slices: after ``merge_and_unload`` every
other weight entry is bitwise the base model's.
"""

import copy
import sys
from pathlib import Path

import pytest
import torch
from conftest import ARCHS, block_module, expected_masks, linear_frame, make_inputs, make_model, output_of
from peft import get_peft_model

from peft_alps import HeadMaskConfig

# benchmarks/ is a folder of scripts, not a package: put it on sys.path to share the recipe with the benchmark
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from common import paper_recipe_hooks  # noqa: E402

HEADS = {0: [1], 2: [0, 3]}  # layer 1 has no selected head
LR, WD, STEPS = 1e-2, 0.1, 3
PARTS = [["q", "k", "v"], ["q", "k", "v", "o"]]


def selected_masks(model, arch, parts) -> tuple[dict, set]:
    """``({param name: bool mask of the selected heads' entries (storage frame)}, names of the weights (and q/k/v
    biases) of every module holding ``parts``)``; other parameters are not in the dict."""
    names = {id(m): n for n, m in model.named_modules()}
    linear = expected_masks(model, arch, HEADS, parts)
    modules = ARCHS[arch][2]
    masks, attention = {}, set()
    for layer in range(model.config.num_hidden_layers):
        for part in parts:
            mod = block_module(model, arch, layer, part)
            name, path = names[id(mod)], modules[part]
            w = linear_frame(mod.weight, mod)
            m = linear.get((layer, path), torch.zeros_like(w, dtype=torch.bool))
            masks[f"{name}.weight"] = linear_frame(m, mod).contiguous()
            attention.add(f"{name}.weight")
            if mod.bias is not None and path != modules["o"]:  # q/k/v rows own their bias entries; o's bias
                masks[f"{name}.bias"] = m.any(1)                # belongs to no head and stays frozen
                attention.add(f"{name}.bias")
    return masks, attention


def train(model, params, steps=STEPS):
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=WD)
    inputs = make_inputs()
    for _ in range(steps):
        (output_of(model, inputs).float() ** 2).mean().backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("parts", PARTS, ids="".join)
def test_paper_recipe_masks_gradients(arch, parts):
    model = make_model(arch)
    paper_recipe_hooks(model, HEADS, parts)
    masks, attention = selected_masks(model, arch, parts)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == attention  # the whole projections, in every layer, and nothing else
    (output_of(model, make_inputs()).float() ** 2).mean().backward()
    for name, p in model.named_parameters():
        if name in trainable:
            assert torch.count_nonzero(p.grad[~masks[name]]) == 0, name
            if masks[name].any() and name.endswith("weight"):
                assert torch.count_nonzero(p.grad[masks[name]]) > 0, name


@pytest.mark.parametrize("parts", PARTS, ids="".join)
def test_paper_recipe_weight_decay_moves_frozen_heads(arch, parts):
    base = make_model(arch)
    model = copy.deepcopy(base)
    paper_recipe_hooks(model, HEADS, parts)
    train(model, [p for p in model.parameters() if p.requires_grad])
    masks, _ = selected_masks(base, arch, parts)
    after = dict(model.named_parameters())
    moved = 0
    for name, p in base.named_parameters():
        if name not in masks:
            assert torch.equal(after[name], p), name  # not trainable
            continue
        frozen = ~masks[name]
        before, now = p[frozen], after[name].detach()[frozen]
        # zero gradients: Adam's moments stay zero, only the decoupled decay w *= 1 - lr * wd acts
        decayed = before.clone()
        for _ in range(STEPS):
            decayed.mul_(1 - LR * WD)
        torch.testing.assert_close(now, decayed, rtol=1e-6, atol=0)
        moved += int(torch.count_nonzero(now != before))
    assert moved > 0  # the "frozen" heads are not frozen


@pytest.mark.parametrize("parts", PARTS, ids="".join)
def test_headmask_merge_leaves_other_heads_bitwise(arch, parts):
    base = make_model(arch)
    model = get_peft_model(copy.deepcopy(base), HeadMaskConfig(heads=HEADS, parts=parts))
    train(model, [p for p in model.parameters() if p.requires_grad])
    merged = dict(model.merge_and_unload().named_parameters())
    masks, _ = selected_masks(base, arch, parts)
    changed = 0
    for name, p in base.named_parameters():
        keep = ~masks[name] if name in masks else torch.ones_like(p, dtype=torch.bool)
        assert torch.equal(merged[name][keep], p[keep]), name
        changed += int(torch.count_nonzero(merged[name][~keep] != p[~keep]))
    assert changed > 0  # the selected heads did train
