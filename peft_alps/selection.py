"""Choosing which heads to train. A head selection is ``{layer: [query heads]}``,
the format of ``HeadMaskConfig(heads=...)``."""

from __future__ import annotations

import math
import random


def random_heads(num_layers: int, num_heads: int, ratio: float = 0.1, seed: int = 0) -> dict[int, list[int]]:
    """``ceil(ratio * num_layers * num_heads)`` query heads drawn uniformly over all layers (seeded).

    The ALPS paper's "Random" baseline. Returns ``{layer: sorted heads}`` with layers sorted.
    """
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}.")
    total = num_layers * num_heads
    heads: dict[int, list[int]] = {}
    for i in random.Random(seed).sample(range(total), math.ceil(ratio * total)):
        heads.setdefault(i // num_heads, []).append(i % num_heads)
    return {layer: sorted(hs) for layer, hs in sorted(heads.items())}
