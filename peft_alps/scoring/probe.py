"""Probe fine-tunes: a short, cheap fine-tune that stands in for a task model.

ALPS scores heads by how far a task model moved them (``score_heads``). Without a task model, the paper
(Appendix C, Table 10) fine-tunes the base briefly, e.g. on ~10% of the data or on the attention parameters
only, and scores against that: the head choices and final results were comparable.

:func:`probe_task_model` trains the model in place, keeps a copy of the trained q/k/v weights (all
:func:`score_heads` reads), and restores the model's original weights, so only the attention tensors
exist twice, never two whole models (with ``attention_only=False`` every parameter is backed up).

The probe works on any transformers model whose ``model(**batch).loss`` is the task's loss: a causal LM on text
batches (:func:`peft_alps.data.text_batches`), a sequence or token classifier on labelled batches
(:func:`peft_alps.data.classification_batches`), a masked LM on masked batches
(:func:`peft_alps.data.masked_lm_batches`). A classifier loaded from an encoder checkpoint has a new, randomly
initialised head (``classifier`` on BERT-style models, ``score`` on decoders). The attention-only probe (the
default) leaves that head frozen at its random init: attention alone adapts to a fixed random readout.
``train_head="auto"`` trains the head too (top-level modules named ``classifier`` or ``score``, the names PEFT's
``SEQ_CLS`` / ``TOKEN_CLS`` task types save) and restores it afterwards. Measured on all-MiniLM-L6-v2 with 5 topics
(benchmarks/README.md, ``classify.py``): at the default lr 1e-4 both choose the same heads; at lr 1e-3 the trained
head's probe reaches a much lower loss but chooses 5-6 of the same 8 heads, and the adapters trained on its heads
were slightly worse on both seeds (held-out accuracy 0.750 vs 0.781 and 0.988 vs 0.996), so the head stays
frozen by default.
"""

from __future__ import annotations

import itertools
import time

import torch

from ..heads.layout import PARTS, HeadLayout
from ..heads.modules import TASK_HEADS
from .sources import ModuleSource, ProbeWeights, check_source, scoring_layout


def _attention_parameters(model, layout: HeadLayout, parts: str) -> dict[str, torch.nn.Parameter]:
    """``{name: parameter}`` of the weights (and biases) of the ``parts`` projections in every layer."""
    wanted = {f"{layout.module_name(layer, layout.modules[p])}.{kind}" for layer in range(layout.num_layers)
              for p in parts for kind in ("weight", "bias")}
    return {name: p for name, p in model.named_parameters()
            if name in wanted or any(name.endswith("." + w) for w in wanted)}


def task_head_parameters(model, train_head="auto") -> dict[str, torch.nn.Parameter]:
    """``{name: parameter}`` of the task head a probe trains along with attention.

    ``train_head``: ``"auto"`` (top-level modules named as in ``TASK_HEADS`` that the model has; none on a causal
    LM), ``False`` / ``None`` (none), or a list of top-level module names (ValueError naming the model's modules
    when one is missing)."""
    if train_head is None or train_head is False:
        return {}
    children = dict(model.named_children())
    if train_head == "auto":
        names = [n for n in TASK_HEADS if n in children]
    elif isinstance(train_head, (list, tuple)) and all(isinstance(n, str) for n in train_head):
        missing = [n for n in train_head if n not in children]
        if missing:
            raise ValueError(f"train_head names {missing}, which {type(model).__name__} does not have; its top-level "
                             f"modules are {sorted(children)}.")
        names = list(train_head)
    else:
        raise ValueError(f"train_head must be 'auto', False or a list of module names, got {train_head!r}.")
    return {f"{n}.{k}": p for n in names for k, p in children[n].named_parameters()}


def probe_task_model(model, data, steps: int = 50, lr: float = 1e-4, attention_only: bool = True,
                     weight_decay: float = 0.0, loss_fn=None, progress: bool = False, layout=None,
                     select=None, train_head=False) -> ProbeWeights:
    """Fine-tune ``model`` for ``steps`` AdamW steps on ``data``; return its trained q/k/v weights and put
    the model back as it was (weights, ``requires_grad`` flags, train/eval mode), also on error.

    ``model``: a transformers model. ``data``: a non-empty list of batches (dicts for
    ``model(**batch)``; see :func:`peft_alps.data.text_batches`), cycled in order.
    ``loss_fn(model, batch) -> scalar`` replaces ``model(**batch).loss``. ``attention_only=True`` trains the
    q/k/v/o projections only (the paper's cheap probe); ``False`` trains every parameter.
    ``train_head``: with ``attention_only``, also train the task head (a classifier's new, random head; see the
    module docstring and :func:`task_head_parameters`): ``False`` (default: frozen), ``"auto"``, or module names.
    ``layout``: as in :func:`~peft_alps.scoring.weight_scores.score_heads` (``None``: from ``model.config``, or
    inferred from the model for an architecture without a built-in layout; else a
    HeadLayout or its dict, checked against the config's layout if there is one and against the module
    shapes). It names the q/k/v/o weights; pass the same ``layout`` to ``score_heads`` with the result
    (``ProbeWeights`` does not record it).
    ``select``: train on these items of ``data`` only, in this order: indices, or a
    :class:`~peft_alps.data_selection.DataSelection` (its ``indices``) from ``select_data`` on the texts that
    ``data`` batches one per batch (the paper's probe on ~10% of the data; see the README's PASER section).
    """
    if hasattr(model, "get_base_model"):
        raise TypeError("probe_task_model needs the plain transformers model, not a PeftModel: pass "
                        "peft_model.get_base_model() with no adapter active, or the base model itself.")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}.")
    data = list(data)
    if not data:
        raise ValueError("data is empty: pass a list of batches (peft_alps.data.text_batches makes them).")
    if select is not None:
        chosen = list(getattr(select, "indices", select))
        bad = [i for i in chosen if isinstance(i, bool) or not hasattr(i, "__index__") or not 0 <= i < len(data)]
        if not chosen or bad:
            raise ValueError(f"select must be non-empty indices into data (0..{len(data) - 1}); got "
                             f"{bad[:3] if bad else 'none'}.")
        data = [data[int(i)] for i in chosen]
    config = getattr(model, "config", None)
    layout = scoring_layout(config, layout, "probe_task_model", model=model)
    check_source(layout, ModuleSource(model), config, PARTS, type(model).__name__)
    scored = _attention_parameters(model, layout, "qkv")
    if attention_only:
        trained = {**_attention_parameters(model, layout, "qkvo"), **task_head_parameters(model, train_head)}
    else:
        trained = dict(model.named_parameters())
    if not scored:
        raise ValueError(f"found no q/k/v weights named '*{layout.layers}.N.<module>.weight' in the model.")

    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    backup = {name: (p.detach().clone(), p.grad) for name, p in trained.items()}
    losses = []
    start = time.perf_counter()
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in trained.values():
            p.requires_grad_(True)
        optimizer = torch.optim.AdamW(list(trained.values()), lr=lr, weight_decay=weight_decay)
        model.train()
        batches = itertools.islice(itertools.cycle(data), steps)
        if progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, total=steps, desc="Probe fine-tune", unit="step")
        for batch in batches:
            loss = loss_fn(model, batch) if loss_fn is not None else model(**batch).loss
            if loss is None:
                raise ValueError("the model returned no loss: pass batches with labels, or a loss_fn.")
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        result = {name: p.detach().clone() for name, p in scored.items() if name.endswith(".weight")}
    finally:
        with torch.no_grad():
            for name, p in trained.items():
                p.copy_(backup[name][0])
                p.grad = backup[name][1]
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
        model.train(was_training)
    return ProbeWeights(config=model.config, tensors=result, losses=losses, seconds=time.perf_counter() - start)
