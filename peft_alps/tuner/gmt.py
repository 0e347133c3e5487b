"""GMT (gradient-mask tuning, Li et al. 2024) inside the trainable head slices.

Before each optimizer step, every trainable head tensor (each of the adapter's delta-kind tensors,
e.g. ``headmask_delta`` and ``headmask_bias``, one tensor at a time) of an adapter with
``grad_mask_ratio`` ``r > 0`` gets its ``floor(r * numel)`` smallest-``|g|``
gradient entries set to zero.

Mechanism: one global ``torch.optim`` step pre-hook, installed the first time a
layer with ``r > 0`` is created, so it runs once per ``optimizer.step()`` of any
torch optimizer (also under the transformers ``Trainer`` / accelerate, which wrap
it and call its ``step``). It therefore masks the *accumulated* gradient with
gradient accumulation. Layers are found through a weak registry (deleted models
are not kept alive); a parameter that is not in the optimizer being stepped, or
whose ``.grad`` is None, is left alone. With ``r = 0`` nothing is registered and
training is bit-identical to a config without the field.

Gradient clipping that a trainer does before ``optimizer.step()`` (the ``Trainer``'s
``max_grad_norm``) sees the unmasked gradient.
"""

from __future__ import annotations

import math
import weakref

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

_LAYERS: "weakref.WeakSet" = weakref.WeakSet()  # HeadMaskLayers with at least one adapter of ratio > 0
_HOOK = None  # RemovableHandle of the global pre-hook, once installed


@torch.no_grad()
def mask_small_gradients_(grad: torch.Tensor, ratio: float) -> torch.Tensor:
    """Zero, in place, exactly ``floor(ratio * grad.numel())`` entries of ``grad``: those with the smallest
    ``|g|`` (ties broken arbitrarily). Any shape and strides; returns ``grad``."""
    k = math.floor(ratio * grad.numel())
    if k == 0:
        return grad
    idx = grad.abs().flatten().topk(k, largest=False, sorted=False).indices
    if grad.is_contiguous():
        grad.view(-1)[idx] = 0
    else:
        grad.copy_(grad.flatten().index_fill_(0, idx, 0).view_as(grad))
    return grad


def track(layer) -> None:
    """Register ``layer`` (a HeadMaskLayer with some ratio > 0) and install the global hook once."""
    global _HOOK
    _LAYERS.add(layer)
    if _HOOK is None:
        _HOOK = register_optimizer_step_pre_hook(_mask_before_step)


def _masked_tensors():
    """``[(param, ratio)]`` of every tracked head-slice tensor whose adapter has ratio > 0."""
    out = []
    for layer in list(_LAYERS):
        for adapter, ratio in layer.headmask_grad_mask_ratio.items():
            if ratio > 0:
                for attr in layer.adapter_layer_names:
                    params = getattr(layer, attr)
                    if adapter in params:
                        out.append((params[adapter], ratio))
    return out


def _mask_before_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """Global optimizer step pre-hook: mask the gradients of this optimizer's tracked head-slice tensors."""
    tensors = [(p, r) for p, r in _masked_tensors() if p.grad is not None]
    if not tensors:
        return
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for p, ratio in tensors:
        if id(p) in in_optimizer:
            mask_small_gradients_(p.grad, ratio)
