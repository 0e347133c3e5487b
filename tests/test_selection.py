"""Head selection: global / per-layer top-K from scores, and the paper's Random and LC baselines."""

import math

import pytest
import torch
from peft import get_peft_model

from peft_alps import HeadMaskConfig, HeadScores, layer_consistent_heads, random_heads, score_heads, select_heads
from peft_alps.scoring.selection import head_count

from conftest import make_inputs, make_model

def test_random_heads_count_range_and_seed():
    heads = random_heads(30, 9, 0.1, seed=3)
    flat = [(layer, h) for layer, hs in heads.items() for h in hs]
    assert len(flat) == 27 == len(set(flat))
    assert all(0 <= layer < 30 and 0 <= h < 9 for layer, h in flat)
    assert heads == random_heads(30, 9, 0.1, seed=3)
    assert heads != random_heads(30, 9, 0.1, seed=4)
    assert len(sum(random_heads(2, 4, 1.0).values(), [])) == 8
    with pytest.raises(ValueError, match="ratio"):
        random_heads(2, 4, 0.0)


def _scores(values):
    return HeadScores(torch.as_tensor(values, dtype=torch.float32), "pad", "product", 1.0, {}, {})


def _flat(heads):
    return [(layer, h) for layer, hs in heads.items() for h in hs]


def test_select_heads_global_top_k():
    values = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    heads = select_heads(_scores(values), ratio=0.1)
    chosen = _flat(heads)
    assert len(chosen) == math.ceil(0.1 * 40) == len(set(chosen))
    assert sorted(values[layer, h].item() for layer, h in chosen) == sorted(values.flatten().tolist())[-4:]
    assert list(heads) == sorted(heads) and all(hs == sorted(hs) for hs in heads.values())
    assert select_heads(_scores(torch.zeros(2, 3)), 0.5) == {0: [0, 1, 2]}  # ties: lower layer, lower head
    assert len(_flat(select_heads(_scores(values), 1.0))) == 40


def test_select_heads_per_layer():
    values = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    heads = select_heads(_scores(values), ratio=0.3, per_layer=True)
    assert list(heads) == list(range(5))
    for layer, hs in heads.items():
        assert hs == sorted(values[layer].topk(3).indices.tolist())


def test_layer_consistent_heads():
    heads = layer_consistent_heads(6, 8, ratio=0.3, seed=2)  # K = ceil(14.4) = 15 over 6 layers: 2 or 3 each
    chosen = _flat(heads)
    assert len(chosen) == 15 == len(set(chosen))
    assert sorted(len(hs) for hs in heads.values()) == [2, 2, 2, 3, 3, 3]
    assert all(0 <= h < 8 for _, h in chosen)
    assert heads == layer_consistent_heads(6, 8, ratio=0.3, seed=2)
    assert heads != layer_consistent_heads(6, 8, ratio=0.3, seed=3)
    assert {len(hs) for hs in layer_consistent_heads(4, 4, 0.5).values()} == {2}
    assert len(_flat(layer_consistent_heads(3, 4, 1.0))) == 12


@pytest.mark.parametrize("fn", [
    lambda r: select_heads(_scores(torch.zeros(2, 2)), r),
    lambda r: select_heads(_scores(torch.zeros(2, 2)), r, per_layer=True),
    lambda r: layer_consistent_heads(2, 2, r),
    lambda r: random_heads(2, 2, r),
])
@pytest.mark.parametrize("ratio", [0, -0.1, 1.5, float("nan")])
def test_ratio_out_of_range(fn, ratio):
    with pytest.raises(ValueError, match="ratio"):
        fn(ratio)


@pytest.mark.parametrize("how", ["global", "per_layer", "lc", "random"])
def test_selection_builds_a_working_adapter(how):
    base, task = make_model("llama", 0), make_model("llama", 1)
    heads = {
        "global": lambda: select_heads(score_heads(base, task), 0.2),
        "per_layer": lambda: select_heads(score_heads(base, task), 0.25, per_layer=True),
        "lc": lambda: layer_consistent_heads(3, 4, 0.2, seed=1),
        "random": lambda: random_heads(3, 4, 0.2, seed=1),
    }[how]()
    assert len(_flat(heads)) == 3
    model = get_peft_model(base, HeadMaskConfig(heads=heads, init_weights=False))
    assert model.get_nb_trainable_parameters()[0] > 0
    assert torch.isfinite(model(**make_inputs()).logits).all()


def test_head_count_is_immune_to_float_noise():
    assert 0.07 * 100 > 7 and head_count(0.07, 100) == 7  # plain ceil would give 8
    assert [head_count(r, 270) for r in (0.1, 0.3, 1.0)] == [27, 81, 270]
    assert head_count(0.1, 144) == 15 == math.ceil(14.4)
    assert len(_flat(random_heads(10, 10, 0.07))) == len(_flat(layer_consistent_heads(10, 10, 0.07))) == 7
