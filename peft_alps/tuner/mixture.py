"""Weighted combinations of head adapters: a new adapter that is their weighted sum, and per-sample mixtures.

Every adapter's effect on a projection is its slice update ``D`` on its channels (:mod:`peft_alps.heads.delta`),
and the output of a projection is linear in ``D``. So for adapters ``a`` with weights ``w_a``:

* :func:`weighted_adapter` (``model.add_weighted_adapter``): a new *dense* adapter whose update is
  ``sum_a w_a D_a`` on the union of the adapters' channels (zero where an adapter has no slice). Exact for every
  delta kind, since it sums the updates the kinds compute (a KaSA or scaled adapter becomes a dense one). Its
  heads are the union of the adapters' heads and its parts the union of their parts, so it may hold slices that
  none of the adapters trained (they stay zero).
* :func:`adapter_mixture` (a context manager): each sample ``i`` of a batch gets its own weights ``w[i, a]``;
  every head-mask layer adds ``sum_a w[i, a] * (x_i @ D_a^T)`` to the base output of sample ``i``. Sample ``i``'s
  output equals running it alone with the weighted-sum adapter of weights ``w[i]`` (to float rounding): the
  per-input routing of ELREA (:mod:`peft_alps.ensemble`).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace

import torch
from torch import nn

from ..heads.layout import check_parts
from .layer import HeadMaskLayer
from .mixed_batch import BASE


def _check_sources(tuner, adapters) -> None:
    """The adapters must exist, be distinct, hold head slices only and share one head layout."""
    if not adapters or len(set(adapters)) != len(adapters):
        raise ValueError(f"Pass a list of distinct adapter names, got {adapters!r}.")
    if BASE in adapters:
        raise ValueError(f"{BASE!r} is not an adapter; for the base model give a sample zero weights.")
    unknown = [a for a in adapters if a not in tuner.peft_config]
    if unknown:
        raise ValueError(f"Unknown adapter(s) {unknown}; this model has {sorted(tuner.peft_config)}.")
    saved = [a for a in adapters if tuner.peft_config[a].modules_to_save]
    if saved:
        raise ValueError(f"Adapter(s) {saved} train whole modules (modules_to_save), which do not add linearly: "
                         f"combine adapters of head slices only.")
    layouts = {str(tuner.peft_config[a].layout) for a in adapters}
    if len(layouts) > 1:
        raise ValueError(f"Adapters {adapters} were made for different head layouts; they cannot be combined.")


def weighted_adapter(tuner, adapters: list[str], weights: list[float], adapter_name: str) -> None:
    """Add ``adapter_name`` to ``tuner`` (a :class:`~peft_alps.tuner.model.HeadMaskModel`): the dense adapter
    whose slice update is ``sum_a weights[a] * D_a`` on the union of the adapters' channels (module docstring).

    Raises before anything is modified for unknown or repeated names, a weight count that does not match,
    adapters with ``modules_to_save``, and while adapters are merged (their updates are in the base weights)."""
    _check_sources(tuner, adapters)
    if len(weights) != len(adapters):
        raise ValueError(f"Pass one weight per adapter: got {len(adapters)} adapters and {len(weights)} weights.")
    weights = [float(w) for w in weights]
    if adapter_name in tuner.peft_config:
        raise ValueError(f"An adapter named {adapter_name!r} exists already; choose a new name.")
    layers = [m for m in tuner.model.modules() if isinstance(m, HeadMaskLayer)]
    if any(layer.merged for layer in layers):
        raise ValueError("Cannot combine adapters while adapters are merged into the base weights: call "
                         "unmerge_adapter() first.")
    configs = [tuner.peft_config[a] for a in adapters]
    heads: dict[int, set] = {}
    for config in configs:
        for layer, hs in config.heads.items():
            heads.setdefault(layer, set()).update(hs)
    parts = check_parts(sorted({p for c in configs for p in c.parts}, key="qkvo".index))
    tuner.peft_config[adapter_name] = replace(
        configs[0], heads={layer: sorted(hs) for layer, hs in heads.items()}, parts=parts, delta_kind="dense",
        init_weights=True, grad_mask_ratio=0.0, base_fingerprint=None, target_modules=None,
        selection={"method": "weighted sum", "adapters": list(adapters), "weights": weights})
    tuner.inject_adapter(tuner.model, adapter_name)
    with torch.no_grad():
        for layer in (m for m in tuner.model.modules() if isinstance(m, HeadMaskLayer)):
            if adapter_name not in layer.headmask_kind:
                continue
            target = layer.adapter_tensors(adapter_name)
            position = {int(c): i for i, c in enumerate(layer.headmask_index[adapter_name].tolist())}
            for source, weight in zip(adapters, weights):
                if source not in layer.headmask_kind:
                    continue
                delta, bias_delta = layer.slice_update(source)
                rows = torch.tensor([position[int(c)] for c in layer.headmask_index[source].tolist()],
                                    device=delta.device)
                dim = 0 if layer.headmask_axis[source] == "out" else 1
                target["delta"].index_add_(dim, rows, weight * delta.to(target["delta"].dtype))
                if bias_delta is not None:
                    target["bias"].index_add_(0, rows, weight * bias_delta.to(target["bias"].dtype))
    if adapter_name not in tuner.active_adapters:
        for layer in (m for m in tuner.model.modules() if isinstance(m, HeadMaskLayer)):
            for param in layer.adapter_tensors(adapter_name).values() if adapter_name in layer.headmask_kind else ():
                param.requires_grad_(False)


@contextmanager
def adapter_mixture(model: nn.Module, adapters: list[str], weights: torch.Tensor):
    """Within the context, every forward (and ``generate``) of ``model`` runs sample ``i`` with the mixture
    ``sum_a weights[i, a] * adapter a`` of the head adapters ``adapters`` (module docstring).

    ``model``: a ``PeftModel`` (or its ``HeadMaskModel``) holding the adapters; ``weights``: ``[batch, len(
    adapters)]``, any real numbers (ELREA uses softmax routing weights; a row of zeros is the base model). When a
    forward sees ``k * batch`` samples (``generate`` with ``num_beams=k`` repeats each sample ``k`` times), each
    row of weights is repeated ``k`` times. The active adapters are ignored inside the context. Refused (before
    anything runs): unknown adapters, adapters with ``modules_to_save``, a weight shape that does not match, and
    non-finite weights; merged adapters are refused by the first layer the forward reaches.
    """
    tuner = getattr(model, "base_model", model)
    weights = torch.as_tensor(weights)
    _check_sources(tuner, adapters)
    if weights.ndim != 2 or weights.shape[1] != len(adapters) or not weights.is_floating_point():
        raise ValueError(f"weights must be a float tensor [batch, {len(adapters)}] (one row of adapter weights per "
                         f"sample), got {tuple(weights.shape)} {weights.dtype}.")
    if not torch.isfinite(weights).all():
        raise ValueError("weights hold NaN or inf.")
    layers = [m for m in tuner.model.modules() if isinstance(m, HeadMaskLayer)]
    for layer in layers:
        layer._headmask_mixture = (list(adapters), weights)
    try:
        yield
    finally:
        for layer in layers:
            layer._headmask_mixture = None
