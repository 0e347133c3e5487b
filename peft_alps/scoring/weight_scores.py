"""ALPS "localize" step: score every attention head by how far a task model moved it.

ALPS (Attention Localization and Pruning Strategy; Chen et al., ACL 2025, arXiv 2505.18799) compares a base
model ``M_B`` with a task model ``M_T`` of the same architecture, from weights alone. ``M_T`` can be a full
fine-tune, a domain variant (e.g. a coder model), or a cheap probe: a short fine-tune of the attention only, or on
~10% of the data (the paper's Appendix C: comparable head choices; :func:`peft_alps.scoring.probe.probe_task_model`).
For every query head ``h`` (key/value group ``g(h) = h // (n_q // n_kv)`` under GQA) both models' head weights
become a distribution ``P^h = softmax(vec(W^h) / tau)``; the head's score is a distance between ``P_B^h`` and
``P_T^h`` (default PAD: Wasserstein-1 on the support ``i / (N-1)``, which beat KL, Euclidean and cosine in the
paper's ablation, Table 2). :func:`peft_alps.select_heads` then keeps ``K = ceil(ratio * n)`` heads ranked over
all layers (ratio 0.1 in the paper) and a head-mask adapter trains only their q rows and their group's k/v rows.
Conventions:

* Weights are read in the ``nn.Linear`` frame ``[out, in]`` (GPT-2 ``Conv1D``
  weights, stored ``[in, out]``, are transposed on read). Which rows belong to a
  head comes only from :class:`~peft_alps.heads.layout.HeadLayout.part_channels`.
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
* Which modules and rows hold a head comes from a :class:`~peft_alps.heads.layout.HeadLayout`:
  derived from the model config, or passed as ``layout=`` (any architecture).

Both models can be ``nn.Module`` objects or local safetensors checkpoints; from
a checkpoint only the q/k/v weight tensors of one layer are read at a time.
"""

from __future__ import annotations

import torch

from ..heads.layout import HeadLayout, linear_frame
from .scores import HeadScores
from .sources import check_source, open_model, scoring_layout

METRICS = ("pad", "wasserstein", "kl", "js", "cosine", "euclidean")
REPRESENTATIONS = ("product", "concat")


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
        self.index = {p: torch.tensor(layout.part_index(p)) for p in "qkv"}
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
                w = source.get(f"{layout.module_name(layer, module)}.weight")
                weights[module] = linear_frame(w, layout.transposed).float()  # [out, in]
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
    checkpoint folder, or :class:`~peft_alps.scoring.sources.ProbeWeights` (a probe fine-tune, as ``task``).
    ``metric``: one of :data:`METRICS` (see :func:`distance`; ``"kl"`` gives ``+inf`` for a head whose task
    distribution has an exact 0 where the base's has not, which happens at small ``tau``).

    ``layout``: ``None`` derives the attention layout from the models' configs (the architectures in
    :data:`peft_alps.heads.layout.ARCHITECTURES`); for any other it is inferred from base or task if one is an
    in-memory model (:func:`~peft_alps.heads.infer.infer_layout`, with a warning), else LayoutError. Or pass a
    :class:`~peft_alps.heads.layout.HeadLayout` or its dict form (``HeadLayout.to_dict()`` keys); it is used for
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
    (cfg_b, open_b, desc_b), (cfg_t, open_t, desc_t) = open_model(base), open_model(task)
    given = layout  # an unknown architecture without one: inferred from an in-memory model, used for both
    live = next((m for m in (base, task) if isinstance(m, torch.nn.Module)), None)
    layout = scoring_layout(cfg_b, given, "score_heads", model=live)
    layout_t = scoring_layout(cfg_t, given, "score_heads", infer=lambda: layout)
    if (layout.model_type, layout.shape_key()) != (layout_t.model_type, layout_t.shape_key()):
        raise ValueError(f"base and task models differ in shape: base {layout.model_type} {layout.shape_key()} "
                         f"vs task {layout_t.model_type} {layout_t.shape_key()}.")
    src_b, src_t = open_b(), open_t()
    check_source(layout, src_b, cfg_b, "qkv", f"the base model ({desc_b})")
    check_source(layout, src_t, cfg_t, "qkv", f"the task model ({desc_t})")
    score_layer = _LayerScorer(layout, representation, metric, tau)
    layers = range(layout.num_layers)
    if progress:
        from tqdm.auto import tqdm

        layers = tqdm(layers, desc="Scoring heads", unit="layer")
    scores = torch.stack([score_layer(src_b, src_t, i) for i in layers])
    return HeadScores(scores=scores, metric=metric, representation=representation, tau=float(tau),
                      layout=layout.to_dict(), sources={"base": desc_b, "task": desc_t})
