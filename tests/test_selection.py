from peft_alps import random_heads
import pytest


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
