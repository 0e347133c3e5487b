"""ALPS "localize" step: score every attention head by how far a task model moved it.

See ``/work/shared/docs/METHOD.md`` section 1. Conventions:

* Weights are read in the ``nn.Linear`` frame ``[out, in]`` (GPT-2 ``Conv1D``
  weights, stored ``[in, out]``, are transposed on read). Which rows belong to a
  head comes only from :class:`~peft_alps.layout.HeadLayout.part_channels`.
* The paper's head matrices use the ``x @ W`` convention: ``W_q^h`` is
  ``[d_model, d_head]``, the transpose of the head's ``d_head`` rows of the
  ``nn.Linear`` weight. Query head ``h`` reads key/value group ``g(h)`` (GQA).
* ``product`` (paper eq. 5): ``W^h = W_q^h ((W_k^g)^T W_v^g)``, ``[d_model, d_head]``
  (inner factor ``[d_head, d_head]`` first: cheap), flattened row-major.
  ``concat`` (the authors' released script): the head's ``nn.Linear`` rows of
  q, k and v (each ``[d_head, d_model]``) flattened row-major and concatenated,
  i.e. ``cat(W_q[rows].flatten(), W_k[rows_g].flatten(), W_v[rows_g].flatten())``
  as the script does, but with k/v rows of the head's kv group. The flatten order
  matters for the Wasserstein metrics (their support is the position).
* ``P^h = softmax(vec(W^h) / tau)``; head matrices are computed in float32, the
  distributions and metrics in float64. Scores are ``float32 [num_layers, num_heads]``.
* At small tau softmax entries underflow to exactly 0. KL and JS use ``0 log 0 = 0``
  and never give NaN; ``KL(P_B || P_T) = +inf`` where some ``P_T`` entry is 0 and the
  ``P_B`` entry is not (the exact value, not an epsilon-smoothed one). Infinite scores
  rank first in :meth:`HeadScores.top` (ties by layer, then head), NaN is refused.
* Which modules and rows hold a head comes from a :class:`~peft_alps.layout.HeadLayout`:
  derived from the model config, or passed as ``layout=`` (any architecture).

Both models can be ``nn.Module`` objects or local safetensors checkpoints; from
a checkpoint only the q/k/v weight tensors of one layer are read at a time.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open

from .fileio import atomic_write
from .layout import HeadLayout, LayoutError
from .probe import ProbeWeights

METRICS = ("pad", "wasserstein", "kl", "js", "cosine", "euclidean")
REPRESENTATIONS = ("product", "concat")


@dataclass
class HeadScores:
    """Per-head scores, higher = more task-relevant: weight distances between a base and a task model
    (:func:`score_heads`), or gradient importance (:func:`peft_alps.gradient_scores.gradient_head_scores`).

    ``metric``/``representation``/``tau`` record how the scores were made (``representation="gradient"``
    and ``tau=None`` for gradient scores); ``layout`` is the ``HeadLayout.to_dict()`` the scores were made
    with (derived from the model config, or the ``layout=`` passed in); ``sources`` describes the inputs.
    Scores may be ``+inf`` (KL at small tau, see :func:`distance`): they rank first. NaN cannot be ranked.
    """

    scores: torch.Tensor  # float32 [num_layers, num_heads] (query heads)
    metric: str
    representation: str
    tau: Optional[float]
    layout: dict
    sources: dict = field(default_factory=dict)

    def __post_init__(self):
        self.scores = torch.as_tensor(self.scores, dtype=torch.float32)
        if self.scores.dim() != 2:
            raise ValueError(f"scores must be [num_layers, num_heads], got shape {tuple(self.scores.shape)}.")

    def save(self, path) -> None:
        """Write JSON (scores as nested lists plus metadata) atomically."""
        path = Path(path)
        data = {"format": "peft_alps.HeadScores", "version": 1, "metric": self.metric,
                "representation": self.representation, "tau": self.tau, "layout": self.layout,
                "sources": self.sources, "scores": self.scores.tolist()}
        with atomic_write(path) as f:
            json.dump(data, f, indent=1)

    @classmethod
    def load(cls, path) -> "HeadScores":
        data = json.loads(Path(path).read_text())
        if data.get("format") != "peft_alps.HeadScores":
            raise ValueError(f"{path} is not a peft_alps HeadScores file.")
        return cls(scores=torch.tensor(data["scores"], dtype=torch.float32), metric=data["metric"],
                   representation=data["representation"], tau=data["tau"], layout=data["layout"],
                   sources=data.get("sources", {}))

    def top(self, k: int) -> list[tuple[int, int, float]]:
        """The ``k`` best heads as ``(layer, head, score)``, best first; ties go to the lower layer, then head.

        ``+inf`` scores come first (several ``+inf`` are ties); ValueError if any score is NaN.
        """
        if torch.isnan(self.scores).any():
            raise ValueError("HeadScores contain NaN; cannot rank heads.")
        num_heads = self.scores.shape[1]
        flat = self.scores.flatten().tolist()
        order = sorted(range(len(flat)), key=lambda i: (-flat[i], i))[:k]
        return [(i // num_heads, i % num_heads, flat[i]) for i in order]


# ----- distances -----
def distance(p: torch.Tensor, q: torch.Tensor, metric: str = "pad", overwrite: bool = False) -> torch.Tensor:
    """Distance between probability vectors ``p, q`` of shape ``[..., N]``; returns ``[...]``.

    Every metric is exactly 0 for identical inputs, also with zero entries. Zero probabilities (softmax
    underflow at small tau) never give NaN: KL and JS use ``0 log(0 / x) = 0``.

    * ``"kl"``: ``KL(P || Q) = sum_i p_i log(p_i / q_i)``; ``+inf`` if some ``q_i == 0 < p_i`` (its exact
      value; no epsilon smoothing). Finite otherwise.
    * ``"js"``: ``0.5 KL(P || M) + 0.5 KL(Q || M)``, ``M = (P + Q) / 2``, natural log: always finite, in
      ``[0, log 2]`` up to rounding (the square of ``scipy.spatial.distance.jensenshannon(p, q)``, which
      differs only where ``(p_i + q_i) / 2`` underflows to 0 and scipy gives inf).

    ``overwrite=True`` lets the W1 metrics reuse ``p``'s memory (saves a large allocation per layer when
    scoring).
    """
    n = p.shape[-1]
    if metric in ("pad", "wasserstein"):  # W1 on a shared 1-D grid = L1 distance of the CDFs x grid step
        cdf_diff = (p.sub_(q) if overwrite else p - q).cumsum_(-1)
        w1 = cdf_diff[..., :-1].abs_().sum(-1)  # the last CDF difference is 0
        return w1 / max(n - 1, 1) if metric == "pad" else w1
    if metric == "kl":  # KL(P || Q): xlogy(0, y) = 0 (also for y = 0); p log p - p log 0 = +inf if p > 0
        return torch.xlogy(p, p).sub_(torch.xlogy(p, q)).sum(-1)  # p == q: the same number twice, exactly 0
    if metric == "js":  # 0.5 KL(P||M) + 0.5 KL(Q||M), M = (P + Q) / 2, natural log
        # p / m written as 2p / (p + q): p + q of subnormals is exact, (p + q) / 2 can round a p > 0 to m = 0.
        # 2p / (p + q) is exactly 1 where p == q (those terms are exactly 0) and 0 where p == 0 < q. Where
        # p == q == 0 the ratio would be 0 / 0: the sum is set to 1 there, xlogy(0, 0) = 0.
        s = p + q
        s.masked_fill_(s == 0, 1.0)
        return 0.5 * (torch.xlogy(p, (2 * p).div_(s)) + torch.xlogy(q, (2 * q).div_(s))).sum(-1)
    if metric == "cosine":  # 1 - cos(P, Q) = |P/|P| - Q/|Q||^2 / 2 (no cancellation near 0)
        diff = p / p.norm(dim=-1, keepdim=True) - q / q.norm(dim=-1, keepdim=True)
        return 0.5 * (diff * diff).sum(-1)
    if metric == "euclidean":
        return (p - q).norm(dim=-1)
    raise ValueError(f"metric must be one of {METRICS}, got {metric!r}.")


def _softmax_(x: torch.Tensor, tau: float) -> torch.Tensor:
    """In-place ``softmax(x / tau)`` over the last dimension."""
    if tau != 1:
        x.div_(tau)
    x.sub_(x.amax(-1, keepdim=True)).exp_()
    return x.div_(x.sum(-1, keepdim=True))


# ----- reading weights -----
def _find(names, suffix: str, where: str, missing_ok: bool = False) -> Optional[str]:
    """The one name equal to ``suffix`` or ending with ``"." + suffix`` (None if there is none and
    ``missing_ok``)."""
    hits = [n for n in names if n == suffix or n.endswith("." + suffix)]
    if missing_ok and not hits:
        return None
    if len(hits) != 1:
        problem = "no tensor" if not hits else f"{len(hits)} tensors ({hits[:3]})"
        raise ValueError(f"{where}: {problem} named like '*{suffix}'.")
    return hits[0]


class _ModuleSource:
    """Weights of an in-memory model. PEFT tuner layers give base weight + active unmerged adapters."""

    def __init__(self, model):
        self.modules = dict(model.named_modules())
        self.where = type(model).__name__

    def shape(self, name: str):
        """``(full module name, stored weight shape)`` of the module ``name`` (no ``.weight``), or None."""
        key = _find(self.modules, name, self.where, missing_ok=True)
        if key is None:
            return None
        module = self.modules[key]
        module = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        weight = getattr(module, "weight", None)
        return key, tuple(weight.shape) if isinstance(weight, torch.Tensor) else None

    def get(self, name: str) -> torch.Tensor:
        module = self.modules[_find(self.modules, name.removesuffix(".weight"), self.where)]
        if not hasattr(module, "get_base_layer"):
            return module.weight.detach()
        weight = module.get_base_layer().weight.detach()
        if module.merged or module.disable_adapters:
            return weight
        for adapter in module.active_adapters:
            if any(adapter in getattr(module, n) for n in module.adapter_layer_names):
                delta = module.get_delta_weight(adapter).detach()
                # HeadMask deltas are in the nn.Linear frame; other PEFT layers use the stored frame
                weight = weight + (delta.t() if getattr(module, "is_conv1d", False) else delta)
        return weight


class _CheckpointSource:
    """Weights of a local safetensors checkpoint (single file or sharded with an index), read lazily."""

    def __init__(self, path: Path):
        self.path = path
        index = path / "model.safetensors.index.json"
        single = path / "model.safetensors"
        if index.is_file():
            self.files = json.loads(index.read_text())["weight_map"]
        elif single.is_file():
            with safe_open(single, framework="pt") as f:
                self.files = {k: single.name for k in f.keys()}
        else:
            raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json.")

    def shape(self, name: str):
        """``(tensor name, shape)`` of ``name + ".weight"`` (read from the header, no data), or None."""
        key = _find(self.files, name + ".weight", str(self.path), missing_ok=True)
        if key is None:
            return None
        with safe_open(self.path / self.files[key], framework="pt") as f:
            return key, tuple(f.get_slice(key).get_shape())

    def get(self, name: str) -> torch.Tensor:
        key = _find(self.files, name, str(self.path))
        with safe_open(self.path / self.files[key], framework="pt") as f:
            return f.get_tensor(key)


class _DictSource:
    """Weights held in a ``{name: tensor}`` dict (a :class:`~peft_alps.probe.ProbeWeights`)."""

    def __init__(self, tensors: dict):
        self.tensors = tensors

    def shape(self, name: str):
        """``(tensor name, shape)`` of ``name + ".weight"``, or None (probe weights hold q/k/v only)."""
        key = _find(self.tensors, name + ".weight", "probe weights", missing_ok=True)
        return None if key is None else (key, tuple(self.tensors[key].shape))

    def get(self, name: str) -> torch.Tensor:
        return self.tensors[_find(self.tensors, name, "probe weights")]


def _open(model):
    """``(config, tensor source, description)`` of a model object, probe weights or a checkpoint folder."""
    if isinstance(model, ProbeWeights):
        return model.config, lambda: _DictSource(model.tensors), f"probe fine-tune ({len(model.losses)} steps)"
    if isinstance(model, (str, os.PathLike)):
        from transformers import AutoConfig

        path = Path(model)
        return AutoConfig.from_pretrained(path), lambda: _CheckpointSource(path), str(model)
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(inner, "config", None), lambda: _ModuleSource(inner), type(model).__name__


# ----- layouts -----
def resolve_layout(config, layout, caller: str, what: str = "model") -> HeadLayout:
    """The layout to score with: ``layout`` (a HeadLayout or its dict form) if given, else derived from
    ``config``. LayoutError if neither exists, or if both exist and disagree on
    :meth:`~peft_alps.layout.HeadLayout.shape_key`."""
    given = None if layout is None else HeadLayout.coerce(layout)
    try:
        derived = HeadLayout.from_model_config(config)
    except LayoutError as e:
        if given is not None:
            return given  # an architecture without a built-in layout
        raise LayoutError(f"{e} Here: pass {caller}(..., layout={{...}}) with those keys (or a HeadLayout).") from None
    if given is not None and given.shape_key() != derived.shape_key():
        raise LayoutError(f"layout= does not match the {what}'s config: layout {given.shape_key()} vs "
                          f"{derived.model_type} config {derived.shape_key()}.")
    return given if given is not None else derived


def check_layout_fits(layout: HeadLayout, shape_of, parts=("q", "k", "v")) -> None:
    """LayoutError, naming the module and the layout field, if the modules found do not fit ``layout``.

    ``shape_of(name)`` gives ``(full name, stored weight shape)`` of the module ``name`` (a block path such as
    ``"layers.0.self_attn.q_proj"``) or None if there is none. The modules of ``parts`` must exist in every
    layer ``0 .. num_layers - 1`` and not in layer ``num_layers``; any module of another part is checked only
    where present. In the ``nn.Linear`` frame (``[out, in]``; ``transposed`` layouts swap the stored shape):
    a q/k/v module needs ``in == hidden_size`` and more outputs than the highest channel the layout gives its
    parts; the o module needs ``in == num_heads * head_dim``.
    """
    # TODO(layout-check): swap for the shared layout-vs-model check (peft_alps/layout.py / model.py) when it lands.
    nh, nkv, d = layout.num_heads, layout.num_kv_heads, layout.head_dim
    first = f"{layout.layers}.{layout.num_layers}.{layout.modules[parts[0]]}"
    extra = shape_of(first)
    if extra is not None:
        raise LayoutError(f"the model has {extra[0]} but layout num_layers={layout.num_layers}: the layout does not "
                          f"match this model.")
    for layer in range(layout.num_layers):
        for module in layout.module_names(("q", "k", "v", "o")):
            name = f"{layout.layers}.{layer}.{module}"
            found = shape_of(name)
            if found is None:
                if any(layout.modules[p] == module for p in parts):
                    raise LayoutError(f"no module {name!r} in the model (layout layers={layout.layers!r}, "
                                      f"modules={layout.modules}, num_layers={layout.num_layers}).")
                continue
            full, shape = found
            if shape is None or len(shape) != 2:
                raise LayoutError(f"{full} has no 2-D weight (layout modules={layout.modules}).")
            out_f, in_f = shape[::-1] if layout.transposed else shape
            held = [p for p in "qkv" if layout.modules[p] == module]
            if held:
                top = max(layout.part_channels(p, h)[-1] for p in held for h in range(nh))
                if out_f <= top:
                    raise LayoutError(f"{full} has {out_f} output features, but layout num_heads={nh}, "
                                      f"num_kv_heads={nkv}, head_dim={d}, fused={layout.fused!r} put its {held} "
                                      f"channels up to {top}: the layout does not match this model.")
                if in_f != layout.hidden_size:
                    raise LayoutError(f"{full} has {in_f} input features but layout hidden_size="
                                      f"{layout.hidden_size}: the layout does not match this model.")
            if module == layout.modules["o"] and in_f != nh * d:
                raise LayoutError(f"{full} has {in_f} input features but layout num_heads * head_dim = {nh} * {d} = "
                                  f"{nh * d}: the layout does not match this model.")


# ----- scoring -----
class _LayerScorer:
    """Scores the heads of one layer at a time, all heads batched (no loop over heads).

    Work tensors are allocated once and reused for every layer: fresh multi-MB allocations page-fault,
    which costs more than the arithmetic here.
    """

    def __init__(self, layout: HeadLayout, representation: str, metric: str, tau: float):
        self.layout, self.representation, self.metric, self.tau = layout, representation, metric, tau
        h, d, d_model = layout.num_heads, layout.head_dim, layout.hidden_size
        # nn.Linear rows of each query head, [H * d_head] per part (k/v: the head's kv group's rows)
        self.index = {p: torch.tensor([c for i in range(h) for c in layout.part_channels(p, i)]) for p in "qkv"}
        self.rows = {p: torch.empty(h * d, d_model) for p in "qkv"}  # float32 [H * d_head, d_model]
        self.product = torch.empty(h, d_model, d) if representation == "product" else None
        n = d_model * d * (1 if representation == "product" else 3)
        self.dists = [torch.empty(h, n, dtype=torch.float64) for _ in range(2)]  # P_base, P_task [H, N]

    def head_vectors(self, source, layer: int, out: torch.Tensor) -> torch.Tensor:
        """Write the float64 ``[H, N]`` head representations of ``layer`` into ``out``."""
        layout, weights = self.layout, {}
        for part in "qkv":
            module = layout.modules[part]
            if module not in weights:  # fused q/k/v: read the tensor once
                w = source.get(f"{layout.layers}.{layer}.{module}.weight")
                weights[module] = (w.t() if layout.transposed else w).float()  # [out, in]
        h = layout.num_heads
        q, k, v = (torch.index_select(weights[layout.modules[p]], 0, self.index[p], out=self.rows[p]).view(h, -1,
                   layout.hidden_size) for p in "qkv")  # [H, d_head, d_model]
        if self.product is not None:  # x @ W frame: W_q^h = q[h].T, so W_q ((W_k)^T W_v) = q.T (k v.T)
            return out.copy_(torch.matmul(q.transpose(1, 2), k @ v.transpose(1, 2), out=self.product).view(h, -1))
        start = 0
        for rows in (q, k, v):
            out[:, start:start + rows[0].numel()] = rows.reshape(h, -1)
            start += rows[0].numel()
        return out

    def __call__(self, src_base, src_task, layer: int) -> torch.Tensor:
        """float32 ``[H]`` scores of ``layer``."""
        p = _softmax_(self.head_vectors(src_base, layer, self.dists[0]), self.tau)
        q = _softmax_(self.head_vectors(src_task, layer, self.dists[1]), self.tau)
        return distance(p, q, self.metric, overwrite=True).float()


def score_heads(base, task, metric: str = "pad", representation: str = "product", tau: float = 1.0,
                progress: bool = False, layout=None) -> HeadScores:
    """Score each query head by the distance between its weight distributions in ``base`` and ``task``.

    ``base``/``task``: ``nn.Module`` (transformers model or PeftModel), path to a local safetensors
    checkpoint folder, or :class:`~peft_alps.probe.ProbeWeights` (a probe fine-tune, as ``task``).
    ``metric``: one of :data:`METRICS` (see :func:`distance`; ``"kl"`` gives ``+inf`` for a head whose task
    distribution has an exact 0 where the base's has not, which happens at small ``tau``).

    ``layout``: ``None`` derives the attention layout from the models' configs (the architectures in
    :data:`peft_alps.layout.ARCHITECTURES`; LayoutError for any other). For another architecture pass a
    :class:`~peft_alps.layout.HeadLayout` or its dict form (``HeadLayout.to_dict()`` keys); it is used for
    both models. If a model's config has a built-in layout too, the two must agree on ``shape_key()``. A
    given layout is checked against both models' q/k/v/o weight shapes before scoring (LayoutError naming
    the module and the field); shapes cannot tell a layout from another one with the same module sizes
    (e.g. 8 heads of 8 vs 4 heads of 16). The returned ``HeadScores.layout`` is the layout used.

    Raises ValueError if the two models' attention shapes differ.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}.")
    if representation not in REPRESENTATIONS:
        raise ValueError(f"representation must be one of {REPRESENTATIONS}, got {representation!r}.")
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}.")
    (cfg_b, open_b, desc_b), (cfg_t, open_t, desc_t) = _open(base), _open(task)
    given = None if layout is None else HeadLayout.coerce(layout)
    layout = resolve_layout(cfg_b, given, "score_heads", "base model")
    layout_t = resolve_layout(cfg_t, given, "score_heads", "task model")
    if (layout.model_type, layout.shape_key()) != (layout_t.model_type, layout_t.shape_key()):
        raise ValueError(f"base and task models differ in shape: base {layout.model_type} {layout.shape_key()} "
                         f"vs task {layout_t.model_type} {layout_t.shape_key()}.")
    src_b, src_t = open_b(), open_t()
    if given is not None:
        for src in (src_b, src_t):
            check_layout_fits(layout, src.shape)
    score_layer = _LayerScorer(layout, representation, metric, tau)
    layers = range(layout.num_layers)
    if progress:
        from tqdm.auto import tqdm

        layers = tqdm(layers, desc="Scoring heads", unit="layer")
    scores = torch.stack([score_layer(src_b, src_t, i) for i in layers])
    return HeadScores(scores=scores, metric=metric, representation=representation, tau=float(tau),
                      layout=layout.to_dict(), sources={"base": desc_b, "task": desc_t})
