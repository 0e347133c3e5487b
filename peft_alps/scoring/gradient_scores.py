"""Data-driven head scores from a few calibration batches (no task model needed).

An alternative to ALPS's weight distance (:mod:`peft_alps.scoring.weight_scores`) when there is no task model:
rank heads by how strongly the task's loss pulls on their weights, as Michel et al. (2019), "Are Sixteen Heads
Really Better than One?", score head importance with first-order terms, and as gradient-mask tuning (GMT; Li et
al., 2024, arXiv 2406.15330; :mod:`peft_alps.tuner.gmt`) keeps the entries with the largest accumulated
gradients. No optimizer step is taken, so it costs one forward and backward per batch; it is not the ALPS paper's
method (benchmarks/README.md compares its choices with probe + PAD). For every batch: forward, loss, backward;
each query head's score is the sum over batches of a reduction of the gradient over the head's weight entries.
Conventions:

* Gradients and weights are read in the ``nn.Linear`` frame ``[out, in]`` (GPT-2 ``Conv1D`` is
  transposed); which entries belong to a head comes only from
  :meth:`~peft_alps.heads.layout.HeadLayout.part_channels`. Weights only, no biases.
* A head's entries: its ``q`` rows, the ``k`` and ``v`` rows of its key/value group and, if ``"o"`` is in
  ``parts``, its input columns of ``o``. Under GQA the group's k/v rows are shared, so every query head of
  the group gets the group's full k/v amount (as ``score_heads`` attributes k/v to each query head).
* ``kind``: ``"grad"`` = ``sum |g|``, ``"grad_x_weight"`` = ``sum |g * w|`` (Michel et al.'s first-order
  importance), ``"fisher"`` = ``sum g^2`` (empirical Fisher, one sample = one batch).
  ``g`` is each batch's gradient of the loss, reduced per batch, then summed over batches.
* The model runs in eval mode (no dropout). Only the scored attention weights require grad during the
  pass; each weight's gradient is reduced to per-head sums as soon as it is accumulated and then freed
  (``register_post_accumulate_grad_hook``), so at most one weight gradient exists at a time. Flags,
  pre-existing ``.grad`` and train/eval modes are restored afterwards, also on error.
* Sums are accumulated in float64 (float32 on MPS); scores are ``float32 [num_layers, num_heads]``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch

from ..heads.layout import check_parts, find_name, linear_frame
from .scores import HeadScores
from .sources import ModuleSource, check_source, scoring_layout

KINDS = ("grad", "grad_x_weight", "fisher")


def _find_module(modules: dict, suffix: str, where: str):
    """``(name, module, in_tuner)`` of the one module named like ``*suffix``; a PEFT layer gives its base."""
    name = find_name(modules, suffix, where)
    module = modules[name]
    if hasattr(module, "get_base_layer"):
        return name, module.get_base_layer(), True
    return name, module, False


class _Target:
    """One scored weight: reduces its gradient to per-head sums of the parts it holds, for one layer."""

    def __init__(self, name, weight, layer, parts, index, layout, kind, acc, in_tuner):
        self.name, self.weight, self.layer, self.in_tuner = name, weight, layer, in_tuner
        self.kind, self.acc, self.transposed = kind, acc, layout.transposed
        self.num_heads, self.head_dim = layout.num_heads, layout.head_dim
        device = weight.device
        self.rows = [index[p].to(device) for p in parts if p != "o"]  # q/k/v: output channels (rows)
        self.cols = [index[p].to(device) for p in parts if p == "o"]  # o: input channels (columns)
        self.hits = 0

    def reduce(self, grad: torch.Tensor) -> torch.Tensor:
        """float64 ``[num_heads]`` sums of this weight's entries owned by each query head."""
        g = linear_frame(grad.float(), self.transposed)  # Conv1D [in, out] -> nn.Linear frame [out, in]
        w = linear_frame(self.weight.detach().float(), self.transposed)
        if self.kind == "grad":
            e = g.abs()
        elif self.kind == "grad_x_weight":
            e = (g * w).abs_()
        else:
            e = g.square()
        out = torch.zeros(self.num_heads, dtype=self.acc, device=e.device)
        shape = (self.num_heads, self.head_dim)
        if self.rows:
            per_row = e.sum(1, dtype=self.acc)  # [out]
            for idx in self.rows:
                out += per_row.index_select(0, idx).view(shape).sum(1)
        if self.cols:
            per_col = e.sum(0, dtype=self.acc)  # [in]
            for idx in self.cols:
                out += per_col.index_select(0, idx).view(shape).sum(1)
        return out


def _loss(model, batch, loss_fn):
    if loss_fn is not None:
        loss = loss_fn(model, batch)
    else:
        out = model(**batch)
        loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
        if loss is None:
            raise ValueError("the model returned no loss: pass batches with labels (e.g. labels=input_ids for a "
                             "causal LM), or loss_fn(model, batch) -> scalar tensor.")
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError(f"the loss must be a scalar tensor, got {type(loss).__name__}"
                         f"{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}.")
    if not loss.requires_grad:
        raise ValueError("the loss does not depend on the scored attention weights (no gradient to score).")
    return loss.reshape(())


def gradient_head_scores(model, batches, kind: str = "grad", parts=("q", "k", "v"), loss_fn=None,
                         progress: bool = False, layout=None) -> HeadScores:
    """Score each query head by the gradient of a loss on ``batches`` w.r.t. its attention weights.

    ``model``: a transformers model (``.config`` of an architecture :class:`~peft_alps.heads.layout.HeadLayout`
    knows) or a PeftModel (the base layers' weights are scored; a PEFT layer whose forward bypasses the base
    weight's gradient raises). ``batches``: non-empty iterable of batches, each a dict for ``model(**batch)``
    (see :func:`peft_alps.data.text_batches`); ``loss_fn(model, batch) -> scalar`` replaces
    ``model(**batch).loss``. ``kind``: one of :data:`KINDS` (module docstring). ``parts``: non-empty subset of
    ``("q", "k", "v", "o")``. ``layout``: ``None`` derives it from the model's config (for an architecture
    without a built-in layout: inferred from the model, :func:`~peft_alps.heads.infer.infer_layout`); else a
    :class:`~peft_alps.heads.layout.HeadLayout` or its dict form, which must agree with the config's layout on
    ``shape_key()`` if there is one, and is checked against the q/k/v/o weight shapes before anything runs
    (LayoutError naming the module and the field), as in :func:`~peft_alps.scoring.weight_scores.score_heads`.
    Returns :class:`~peft_alps.scoring.scores.HeadScores` with ``representation="gradient"``, ``metric=kind``,
    ``tau=None`` and the layout used, ready for :func:`peft_alps.select_heads`.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}.")
    parts = check_parts(parts)
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable(model, batch) -> scalar, got {type(loss_fn).__name__}.")
    batches = list(batches)
    if not batches:
        raise ValueError("batches is empty: pass a list of batches (peft_alps.data.text_batches makes them).")
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(inner, "config", None)
    layout = scoring_layout(config, layout, "gradient_head_scores", model=inner)
    check_source(layout, ModuleSource(inner), config, parts, type(inner).__name__)

    h = layout.num_heads
    index = {p: torch.tensor(layout.part_index(p)) for p in parts}
    modules = dict(model.named_modules())
    targets: dict[int, list[_Target]] = {}  # id(weight) -> targets (one per layer a weight serves)
    weights = {}
    for layer in range(layout.num_layers):
        for module_path in layout.module_names(parts):
            held = [p for p in parts if layout.modules[p] == module_path]
            name, module, in_tuner = _find_module(modules, layout.module_name(layer, module_path),
                                                  type(model).__name__)
            weight = getattr(module, "weight", None)
            if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
                raise ValueError(f"{name} has no 2-D weight to score.")
            if not weight.is_floating_point():
                raise ValueError(f"{name}.weight has dtype {weight.dtype}: gradients need a floating-point weight "
                                 f"(quantized weights are not supported).")
            acc = torch.float32 if weight.device.type == "mps" else torch.float64
            targets.setdefault(id(weight), []).append(
                _Target(name, weight, layer, held, index, layout, kind, acc, in_tuner))
            weights[id(weight)] = weight

    scores = torch.zeros(layout.num_layers, h, dtype=torch.float64)

    def hook(param):
        grad, param.grad = param.grad, None  # free the full-size gradient right after reduction
        if grad is None:  # called with no gradient, e.g. a custom autograd Function returned None for it
            return
        for target in targets[id(param)]:
            target.hits += 1
            scores[target.layer] += target.reduce(grad).to("cpu", torch.float64)

    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    old_grads = {i: w.grad for i, w in weights.items()}
    modes = [(m, m.training) for m in model.modules()]
    handles = []
    try:
        for p in params:
            p.requires_grad_(False)
        for i, w in weights.items():
            w.grad = None
            w.requires_grad_(True)
            handles.append(w.register_post_accumulate_grad_hook(hook))
        model.eval()
        items = batches
        if progress:
            from tqdm.auto import tqdm

            items = tqdm(batches, desc="Gradient head scores", unit="batch")
        with torch.enable_grad():
            for batch in items:
                _loss(model, batch, loss_fn).backward()
    finally:
        for handle in handles:
            handle.remove()
        for i, w in weights.items():
            w.grad = old_grads[i]
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        for m, training in modes:
            m.training = training

    missed = [t.name for ts in targets.values() for t in ts if t.hits == 0]
    if any(t.in_tuner and t.hits == 0 for ts in targets.values() for t in ts):
        raise RuntimeError(
            f"no gradient reached the base weights of PEFT layers {missed[:3]}: the adapter's forward does not "
            f"pass a gradient to the frozen base weight (e.g. HeadMask's 'merged' strategy). Score the base model "
            f"(model.get_base_model() after unload, or before wrapping) or merge the adapter first.")
    if missed:
        warnings.warn(f"{len(missed)} scored weights received no gradient from the loss, their heads score 0: "
                      f"{missed[:3]}{' ...' if len(missed) > 3 else ''}", stacklevel=2)
    return HeadScores(scores=scores.float(), metric=kind, representation="gradient", tau=None,
                      layout=layout.to_dict(),
                      sources={"model": type(model).__name__, "batches": len(batches), "parts": list(parts)})
