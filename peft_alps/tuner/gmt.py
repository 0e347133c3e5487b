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

Several processes: under DDP the hook sees the all-reduced gradient, the same on every rank, so every rank
masks the same entries. Under FSDP2 (``fully_shard``) a gradient is a DTensor holding one shard: the smallest
entries are chosen over the whole tensor (:func:`mask_small_gradients_` gathers it; a collective, so tensors
are masked in the optimizer's parameter order, the same on every rank), never per shard.
"""

from __future__ import annotations

import math
import weakref

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from ..heads.modules import is_dtensor, is_zero3_partition

_LAYERS: "weakref.WeakSet" = weakref.WeakSet()  # HeadMaskLayers with at least one adapter of ratio > 0
_HOOK = None  # RemovableHandle of the global pre-hook, once installed


@torch.no_grad()
def mask_small_gradients_(grad: torch.Tensor, ratio: float) -> torch.Tensor:
    """Zero, in place, exactly ``floor(ratio * grad.numel())`` entries of ``grad``: those with the smallest
    ``|g|`` (ties broken arbitrarily). Any shape and strides; returns ``grad``. A sharded DTensor (FSDP2) is
    gathered, masked whole, and each rank keeps its own shard of the result (every rank must call this)."""
    k = math.floor(ratio * grad.numel())
    if k == 0:
        return grad
    if is_dtensor(grad):
        from torch.distributed.tensor import distribute_tensor

        full = mask_small_gradients_(grad.full_tensor(), ratio)
        mine = distribute_tensor(full, grad.device_mesh, grad.placements, src_data_rank=None)  # no communication
        grad.to_local().copy_(mine.to_local())
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
    """Global optimizer step pre-hook: mask the gradients of this optimizer's tracked head-slice tensors, in the
    optimizer's parameter order (the same on every rank: sharded gradients are gathered one by one)."""
    tracked = _masked_tensors()
    if not tracked:
        return
    ratios = {id(p): r for p, r in tracked}
    if any(_deepspeed_zero(p) for p, _ in tracked):
        raise RuntimeError("grad_mask_ratio > 0 (GMT) needs the head slices' gradients at optimizer.step(), but "
                           "DeepSpeed ZeRO steps its own flat copies of them: GMT would silently do nothing. Train "
                           "with grad_mask_ratio=0 under DeepSpeed, or use DDP / FSDP2 for GMT.")
    for p in (p for group in optimizer.param_groups for p in group["params"] if id(p) in ratios):
        if p.grad is not None:
            mask_small_gradients_(p.grad, ratios[id(p)])


def _deepspeed_zero(param) -> bool:
    """A parameter handed to a DeepSpeed ZeRO optimizer: stage 1/2 number it in their flat groups
    (``param_idx_in_group``), stage 3 partitions it (``ds_numel``)."""
    return hasattr(param, "param_idx_in_group") or is_zero3_partition(param)
