"""Choosing which heads to train. A head selection is ``{layer: [query heads]}``
(layers sorted, heads sorted), the format of ``HeadMaskConfig(heads=...)``."""

from __future__ import annotations

import math
import random


def _check_selection_ratio(ratio: float) -> None:
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}.")


def head_count(ratio: float, n: int) -> int:
    """``K = ceil(ratio * n)``, immune to float noise (``0.07 * 100`` is ``7.000000000000001``, K is 7)."""
    return math.ceil(round(ratio * n, 9))


def _as_selection(pairs) -> dict[int, list[int]]:
    heads: dict[int, list[int]] = {}
    for layer, head in pairs:
        heads.setdefault(int(layer), []).append(int(head))
    return {layer: sorted(hs) for layer, hs in sorted(heads.items())}


def random_heads(num_layers: int, num_heads: int, ratio: float = 0.1, seed: int = 0) -> dict[int, list[int]]:
    """``ceil(ratio * num_layers * num_heads)`` query heads drawn uniformly over all layers (seeded).

    The ALPS paper's "Random" baseline. Returns ``{layer: sorted heads}`` with layers sorted.
    """
    _check_selection_ratio(ratio)
    total = num_layers * num_heads
    picks = random.Random(seed).sample(range(total), head_count(ratio, total))
    return _as_selection(divmod(i, num_heads) for i in picks)


def select_heads(scores, ratio: float = 0.1, per_layer: bool = False) -> dict[int, list[int]]:
    """The best-scoring heads of a :class:`~peft_alps.scoring.scores.HeadScores`.

    ``per_layer=False`` (ALPS): the ``K = ceil(ratio * num_layers * num_heads)`` highest scores over all
    layers. ``per_layer=True``: the ``ceil(ratio * num_heads)`` highest scores in every layer.
    Ties go to the lower layer, then the lower head.
    """
    _check_selection_ratio(ratio)
    num_layers, num_heads = scores.scores.shape
    if scores.scores.isnan().any():
        raise ValueError("HeadScores contain NaN; cannot rank heads.")
    if not per_layer:
        return _as_selection((layer, head) for layer, head, _ in scores.top(head_count(ratio, num_layers * num_heads)))
    k = head_count(ratio, num_heads)
    rows = scores.scores.tolist()
    return _as_selection((layer, head) for layer, row in enumerate(rows)
                         for head in sorted(range(num_heads), key=lambda h: (-row[h], h))[:k])


def layer_consistent_heads(num_layers: int, num_heads: int, ratio: float = 0.1, seed: int = 0) -> dict[int, list[int]]:
    """The paper's "LC" baseline: random heads spread evenly over layers (seeded).

    The total is the same as ALPS and :func:`random_heads`, ``K = ceil(ratio * num_layers * num_heads)``.
    Every layer gets ``K // num_layers`` heads and ``K % num_layers`` randomly chosen layers get one more,
    so per-layer counts differ by at most 1 and the total is exactly ``K``. Heads within a layer are random.
    """
    _check_selection_ratio(ratio)
    rng = random.Random(seed)
    total = head_count(ratio, num_layers * num_heads)
    extra = set(rng.sample(range(num_layers), total % num_layers))
    counts = [total // num_layers + (layer in extra) for layer in range(num_layers)]
    return _as_selection((layer, head) for layer, n in enumerate(counts) for head in rng.sample(range(num_heads), n))
