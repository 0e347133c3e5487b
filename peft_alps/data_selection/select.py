"""``select_data``: PASER's capability-aware data selection (He et al. 2025), scaled to tens of thousands of
samples. Steps, each replaceable by precomputed inputs:

1. embed the texts (:func:`~.embed.embed_texts`, all-MiniLM-L6-v2; or ``embed=``, or ``embeddings=``);
2. cluster them into capability groups (:func:`~.cluster.spectral_clusters`: sparse kNN spectral clustering);
3. score each sample's degradation (:func:`~.degradation.sample_degradation`; or ``degradation=``);
4. give every cluster a share of the budget proportional to its mean degradation (:func:`allocate_budget`);
5. inside a cluster, take samples by ``degradation / log(length^2)``, best first (:func:`rank_in_cluster`),
   skipping those the concept-graph filter rejects (:mod:`.conflicts`); clusters are visited in decreasing
   mean degradation. If rejections leave budget unused, a second pass over the clusters in the same order
   offers it to their next consistent samples.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np

from .cluster import spectral_clusters
from .conflicts import ConceptGraph, rake_phrases, stop_words
from .degradation import degradation_mode, sample_degradation
from .embed import embed_texts


@dataclass
class ClusterStats:
    """One capability group: ``size`` samples, their ``mean_degradation``, the cluster's ``share`` of the summed
    means, its allocated ``budget``, how many samples were ``selected`` and how many the conflict filter
    ``rejected`` (and were not taken later)."""
    cluster: int
    size: int
    mean_degradation: float
    share: float
    budget: int
    selected: int = 0
    rejected: int = 0


@dataclass
class DataSelection:
    """What :func:`select_data` chose. ``indices``: positions in ``texts``, in the order they were taken;
    ``labels`` ``[N]``: cluster of every text; ``degradation`` ``[N]`` and ``lengths`` ``[N]`` (tokens, or
    words when no model was given): what the ranking used; ``clusters``: per-cluster statistics;
    ``mode``: ``"jsd"``, ``"jsd-base"``, ``"loss"`` or ``"given"``; ``seconds``: time per step."""
    indices: list[int]
    budget: int
    labels: np.ndarray
    degradation: np.ndarray
    lengths: np.ndarray
    clusters: list[ClusterStats]
    mode: str
    seconds: dict[str, float] = field(default_factory=dict)

    def texts(self, texts: list[str]) -> list[str]:
        """The selected items of ``texts``, in selection order."""
        return [texts[i] for i in self.indices]

    def to_dict(self) -> dict:
        """JSON-ready summary (indices, per-cluster statistics, mode, seconds; no per-sample arrays)."""
        return {"indices": list(map(int, self.indices)), "budget": self.budget, "selected": len(self.indices),
                "samples": int(len(self.labels)), "mode": self.mode, "seconds": self.seconds,
                "clusters": [asdict(c) for c in self.clusters]}


def allocate_budget(mean_degradation, sizes, budget: int) -> list[int]:
    """Samples per cluster: proportional to ``mean_degradation``, capped by ``sizes``, summing to ``budget``.

    Rounding: largest remainder (Hamilton). Each cluster's exact quota ``budget * d_c / sum(d)`` is rounded
    down, and the units left go one each to the largest fractional parts (ties: lower cluster index). A
    cluster whose quota reaches its size gets its size, and the rest of the budget is shared again among
    the other clusters by the same rule. All means zero: shares follow the sizes instead.
    Requires ``0 <= budget <= sum(sizes)`` and non-negative means."""
    d = np.asarray(mean_degradation, dtype=np.float64)
    sizes = np.asarray(sizes, dtype=np.int64)
    if d.shape != sizes.shape or (d < 0).any() or not np.isfinite(d).all():
        raise ValueError("mean_degradation must be finite, >= 0 and have one entry per cluster.")
    if not 0 <= budget <= sizes.sum():
        raise ValueError(f"budget {budget} is outside [0, {int(sizes.sum())}] (the number of samples).")
    alloc = np.zeros(len(d), dtype=np.int64)
    active = np.flatnonzero(sizes > 0)
    remaining = int(budget)
    while remaining and len(active):
        weights = d[active] if d[active].sum() > 0 else sizes[active].astype(np.float64)
        quotas = remaining * weights / weights.sum()
        full = quotas >= sizes[active]
        if full.any():
            alloc[active[full]] = sizes[active[full]]
            remaining -= int(sizes[active[full]].sum())
            active = active[~full]
            continue
        floors = np.floor(quotas).astype(np.int64)
        left = remaining - int(floors.sum())
        order = np.lexsort((active, -(quotas - floors)))  # largest fraction first, then lower index
        floors[order[:left]] += 1
        alloc[active] = floors
        remaining = 0
    return alloc.tolist()


def rank_in_cluster(degradation, lengths, members) -> np.ndarray:
    """``members`` (indices) sorted by PASER's efficiency ``degradation / log(length^2)``, best first (ties:
    lower index). Lengths below 2 count as 2 (``log(1) = 0``)."""
    members = np.asarray(members, dtype=np.int64)
    length = np.maximum(np.asarray(lengths, dtype=np.float64)[members], 2.0)
    efficiency = np.asarray(degradation, dtype=np.float64)[members] / np.log(length ** 2)
    return members[np.lexsort((members, -efficiency))]


def _budget_count(budget, n: int) -> int:
    if isinstance(budget, bool) or not isinstance(budget, (int, float, np.integer, np.floating)):
        raise TypeError(f"budget must be an int (samples) or a float in (0, 1] (fraction), got {budget!r}.")
    if isinstance(budget, (float, np.floating)):
        if not 0 < budget <= 1:
            raise ValueError(f"a fractional budget must be in (0, 1], got {budget}; pass an int for a count.")
        return max(1, round(budget * n))
    if not 1 <= budget <= n:
        raise ValueError(f"budget must be in [1, {n}] (the number of texts), got {budget}.")
    return int(budget)


def _array(value, n: int, name: str, dims: int) -> np.ndarray:
    a = np.asarray(value, dtype=np.float64 if dims == 1 else np.float32)
    if a.ndim != dims or a.shape[0] != n:
        raise ValueError(f"{name} must have shape {'[N]' if dims == 1 else '[N, d]'} with N = {n} texts, "
                         f"got {list(a.shape)}.")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} holds NaN or infinite values.")
    return a


def select_data(texts: list[str], model=None, tokenizer=None, reference=None, *, budget=0.1, clusters: int = 10,
                seed: int = 0, embed=None, embeddings=None, degradation=None, lengths=None, neighbors: int = 15,
                conflicts: bool = True, max_concepts: int | None = None, batch_size: int = 4,
                max_length: int = 256, progress: bool | None = None) -> DataSelection:
    """Choose ``budget`` of ``texts`` where ``model`` degraded most, spread over capability groups (PASER).

    ``texts``: N strings. ``model``/``tokenizer``: a causal LM scored on the texts (module docstring of
    :mod:`.degradation`): with ``reference`` (the original model) by per-sample JSD; a PeftModel without
    ``reference`` against its own disabled adapter; any other model by its own loss. ``budget``: an int
    (samples) or a float in (0, 1] (fraction of N, rounded, at least 1). ``clusters``: capability groups
    (PASER's default 10). ``seed``: the clustering's (the only random step). ``embed``: ``texts -> [N, d]``
    (default MiniLM, :func:`~.embed.embed_texts`); ``embeddings``: ``[N, d]`` precomputed instead.
    ``degradation`` ``[N]`` (>= 0) precomputed instead of a model, with optional ``lengths`` ``[N]`` (default:
    words per text). ``neighbors``: k of the kNN graph. ``conflicts``: apply the concept-graph filter;
    ``max_concepts``: keep each sample's best RAKE phrases only (None: all, as the authors do).
    Returns a :class:`DataSelection`; deterministic for a given ``seed``.
    """
    if isinstance(texts, str) or not len(texts):
        raise ValueError("texts must be a non-empty list of strings.")
    n = len(texts)
    count = _budget_count(budget, n)
    if not isinstance(clusters, int) or clusters < 1:
        raise ValueError(f"clusters must be a positive int, got {clusters!r}.")
    if not isinstance(neighbors, int) or neighbors < 1:
        raise ValueError(f"neighbors must be a positive int, got {neighbors!r}.")
    if embeddings is not None and embed is not None:
        raise ValueError("pass embed (a function) or embeddings (an array), not both.")
    if degradation is None and (model is None or tokenizer is None):
        raise ValueError("pass model and tokenizer (to score degradation), or a precomputed degradation=[N].")
    if degradation is not None and (model is not None or reference is not None):
        raise ValueError("degradation= is precomputed: do not pass model or reference as well.")
    if embeddings is not None:
        embeddings = _array(embeddings, n, "embeddings", 2)
    if degradation is not None:
        degradation = _array(degradation, n, "degradation", 1)
        if (degradation < 0).any():
            raise ValueError("degradation must be >= 0.")
    if lengths is not None:
        lengths = _array(lengths, n, "lengths", 1)

    seconds = {}
    t = time.perf_counter()
    if embeddings is None:
        embeddings = _array((embed or (lambda xs: embed_texts(xs, progress=progress)))(list(texts)), n,
                            "embed(texts)", 2)
        seconds["embed"] = time.perf_counter() - t
        t = time.perf_counter()
    labels = spectral_clusters(embeddings, clusters, neighbors=neighbors, seed=seed)
    seconds["cluster"] = time.perf_counter() - t
    t = time.perf_counter()
    if degradation is None:
        mode = degradation_mode(model, reference)
        degradation, token_lengths = sample_degradation(model, tokenizer, texts, reference, batch_size=batch_size,
                                                        max_length=max_length, progress=progress)
        lengths = token_lengths if lengths is None else lengths
        seconds["degradation"] = time.perf_counter() - t
        t = time.perf_counter()
    else:
        mode = "given"
    if lengths is None:
        lengths = np.array([len(s.split()) for s in texts], dtype=np.float64)

    ids = np.arange(labels.max() + 1)
    members = [np.flatnonzero(labels == c) for c in ids]
    means = np.array([degradation[m].mean() for m in members])
    alloc = allocate_budget(means, [len(m) for m in members], count)
    total = means.sum()
    stats = [ClusterStats(int(c), len(members[c]), float(means[c]), float(means[c] / total) if total else 0.0,
                          alloc[c]) for c in ids]
    visit = sorted(ids, key=lambda c: (-means[c], c))
    ranked = {c: rank_in_cluster(degradation, lengths, members[c]) for c in ids}

    graph, stops = ConceptGraph(), stop_words()
    chosen, taken = [], np.zeros(n, dtype=bool)
    position = {c: 0 for c in ids}
    rejected = set()

    def take(c, quota):
        got = 0
        order = ranked[c]
        while got < quota and position[c] < len(order):
            i = int(order[position[c]])
            position[c] += 1
            if taken[i]:
                continue
            if conflicts:
                concepts = rake_phrases(texts[i], stops)[:max_concepts]
                if not graph.consistent(concepts):
                    rejected.add(i)
                    continue
                graph.add(concepts)
            taken[i] = True
            rejected.discard(i)
            chosen.append(i)
            got += 1

    for c in visit:
        take(c, stats[c].budget)
    if len(chosen) < count and conflicts:  # budget left by rejections: next consistent samples, same order
        for c in visit:
            position[c] = 0
            take(c, count - len(chosen))
    for c in ids:
        stats[c].selected = int(taken[members[c]].sum())
        stats[c].rejected = sum(1 for i in members[c] if i in rejected)
    seconds["select"] = time.perf_counter() - t
    return DataSelection(indices=chosen, budget=count, labels=labels, degradation=degradation,
                     lengths=np.asarray(lengths), clusters=stats, mode=mode, seconds=seconds)


__all__ = ["ClusterStats", "DataSelection", "allocate_budget", "rank_in_cluster", "select_data"]
