"""The head-mask tuner layer: a frozen projection plus trainable slices of its weight.

Frame: everything here is in the ``nn.Linear`` frame, ``y = x @ W^T + b`` with
``W`` of shape ``[out, in]``. GPT-2's ``Conv1D`` (``y = x @ W + b``, ``W`` of
shape ``[in, out]``) is handled by viewing its weight transposed.

Per adapter the layer holds
* ``headmask_index[a]``: LongTensor of the selected channels,
* ``headmask_dim[a]``: ``"out"`` (rows: q/k/v channels) or ``"in"`` (columns: o),
* ``headmask_delta[a]``: trainable ``[n, in]`` (rows) or ``[out, n]`` (columns),
* ``headmask_bias[a]``: trainable ``[n]`` bias slice (rows of a biased projection only),
* ``headmask_grad_mask_ratio[a]``: GMT ratio; if > 0 the layer is tracked by :mod:`peft_alps.gmt`, which
  masks the small gradients of ``a``'s delta and bias slice before each optimizer step.

The effective weight is ``W`` with the selected slices replaced by
``(W_slice.to(delta.dtype) + delta).to(W.dtype)``; forward, merge and export
all use this one formula (:func:`apply_slices`), so merged outputs equal adapter
outputs.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

from . import gmt
from .mixed_batch import BASE, check_layer_call


def merged_slice(orig: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``orig + delta`` computed in the delta's dtype and rounded to ``orig``'s: the one merge formula."""
    return (orig.to(delta.dtype) + delta).to(orig.dtype)


def apply_slices(weight, bias, slices, params):
    """Return ``(weight, bias)`` with every adapter's slices added (out of place).

    ``weight``: ``[out, in]`` (nn.Linear frame); ``slices``: tuple of ``(dim, index)``;
    ``params``: flat tuple ``(delta_0, bias_delta_0 or None, delta_1, ...)``.
    """
    for (dim, idx), delta, bias_delta in zip(slices, params[0::2], params[1::2]):
        d = 0 if dim == "out" else 1
        weight = weight.index_copy(d, idx, merged_slice(weight.index_select(d, idx), delta))
        if bias_delta is not None and bias is not None:  # bias=None: weight only (backward recompute)
            bias = bias.index_copy(0, idx, merged_slice(bias.index_select(0, idx), bias_delta))
    return weight, bias


class _MergedSliceLinear(torch.autograd.Function):
    """``F.linear`` with head slices merged into a temporary weight; backward returns
    ``grad_x`` and the slices' gradients only (never a full ``[out, in]`` weight gradient)."""

    @staticmethod
    def forward(ctx, x, weight, bias, slices, *params):
        w, b = apply_slices(weight, bias, slices, params)
        ctx.save_for_backward(x, weight, *[p if p is not None else torch.empty(0) for p in params])
        ctx.slices = slices
        ctx.has_param = [p is not None for p in params]
        return F.linear(x, w, b)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, *saved = ctx.saved_tensors
        params = tuple(p if has else None for p, has in zip(saved, ctx.has_param))
        grad_x = None
        if ctx.needs_input_grad[0]:
            w, _ = apply_slices(weight, None, ctx.slices, params)  # recomputed: no weight copy kept alive
            grad_x = grad_out @ w
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        grads = []
        for (dim, idx), delta, bias_delta in zip(ctx.slices, params[0::2], params[1::2]):
            if dim == "out":
                g_sel = g2.index_select(1, idx)
                grads.append((g_sel.t() @ x2).to(delta.dtype))
                grads.append(None if bias_delta is None else g_sel.sum(0).to(bias_delta.dtype))
            else:
                grads.append((g2.t() @ x2.index_select(1, idx)).to(delta.dtype))
                grads.append(None)
        return (grad_x, None, None, None, *grads)


class HeadMaskLayer(BaseTunerLayer):
    """Mixin holding the per-adapter head slices of one projection (see module docstring)."""

    adapter_layer_names = ("headmask_delta", "headmask_bias")
    other_param_names = ("headmask_index", "headmask_dim", "headmask_strategy", "headmask_grad_mask_ratio")

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.headmask_delta = nn.ParameterDict({})
        self.headmask_bias = nn.ParameterDict({})
        self.headmask_index: dict[str, torch.Tensor] = {}
        self.headmask_dim: dict[str, str] = {}
        self.headmask_strategy: dict[str, str] = {}
        self.headmask_grad_mask_ratio: dict[str, float] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        # stack of (adapter, dim, index, original weight slice, original bias slice) for bit-exact unmerge
        self._merge_backup: list[tuple] = []
        base = self.get_base_layer()
        if isinstance(base, nn.Linear):
            self.is_conv1d = False
            self.in_features, self.out_features = base.in_features, base.out_features
        elif isinstance(base, Conv1D):
            self.is_conv1d = True
            self.in_features, self.out_features = base.weight.shape
        else:
            raise TypeError(f"HeadMask can wrap nn.Linear or transformers Conv1D modules, got {type(base).__name__}.")

    def update_layer(self, adapter_name, channels, dim, init_weights=True, forward_strategy="merged",
                     grad_mask_ratio=0.0, inference_mode=False) -> None:
        """Add adapter ``adapter_name`` training ``channels`` along ``dim`` (``"out"`` rows / ``"in"`` columns)."""
        limit = self.out_features if dim == "out" else self.in_features
        if not channels or max(channels) >= limit or min(channels) < 0:
            raise ValueError(f"Head channels {channels[:3]}...{channels[-3:]} do not fit a {dim}-dimension of {limit}.")
        n = len(channels)
        shape = (n, self.in_features) if dim == "out" else (self.out_features, n)
        init = torch.zeros if init_weights else (lambda *s: torch.randn(*s) * 0.02)
        self.headmask_delta[adapter_name] = nn.Parameter(init(*shape))
        base_bias = self.get_base_layer().bias
        if dim == "out" and base_bias is not None:
            self.headmask_bias[adapter_name] = nn.Parameter(init(n))
        self.headmask_index[adapter_name] = torch.tensor(channels, dtype=torch.long)
        self.headmask_dim[adapter_name] = dim
        self.headmask_strategy[adapter_name] = forward_strategy
        self.headmask_grad_mask_ratio[adapter_name] = grad_mask_ratio
        if grad_mask_ratio > 0:
            gmt.track(self)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    # ----- helpers -----
    def _weight(self) -> torch.Tensor:
        """Base weight in the nn.Linear frame ``[out, in]`` (a view for Conv1D)."""
        w = self.get_base_layer().weight
        return w.t() if self.is_conv1d else w

    def _slices_and_params(self, adapter_names):
        """``(slices, params)`` for :func:`apply_slices`, indices moved to the weight's device."""
        device = self.get_base_layer().weight.device
        slices, params = [], []
        for name in adapter_names:
            if name not in self.headmask_delta:
                continue
            if self.headmask_index[name].device != device:
                self.headmask_index[name] = self.headmask_index[name].to(device)
            slices.append((self.headmask_dim[name], self.headmask_index[name]))
            params += [self.headmask_delta[name], self.headmask_bias[name] if name in self.headmask_bias else None]
        return tuple(slices), tuple(params)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """Dense ``[out, in]`` update (nn.Linear frame) that merging ``adapter_name`` adds to the weight."""
        slices, params = self._slices_and_params([adapter_name])
        w = self._weight().detach()
        return apply_slices(w, None, slices, (params[0].detach(), None))[0] - w

    # ----- merge -----
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Write the adapters' slices into the base weight; the original slices are kept for unmerge."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        base = self.get_base_layer()
        for name in adapter_names:
            if name not in self.headmask_delta:
                continue
            dim, idx = self._slices_and_params([name])[0][0]
            d = 0 if dim == "out" else 1
            weight = self._weight().data
            orig_w = weight.index_select(d, idx)
            new_w = merged_slice(orig_w, self.headmask_delta[name].detach())
            orig_b = new_b = None
            if name in self.headmask_bias:
                orig_b = base.bias.data.index_select(0, idx)
                new_b = merged_slice(orig_b, self.headmask_bias[name].detach())
            if safe_merge and not (torch.isfinite(new_w).all() and (new_b is None or torch.isfinite(new_b).all())):
                raise ValueError(f"NaN or inf in the merged weights of adapter {name!r}; nothing was merged.")
            self._merge_backup.append((dim, idx, orig_w, orig_b))
            weight.index_copy_(d, idx, new_w)
            if new_b is not None:
                base.bias.data.index_copy_(0, idx, new_b)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Restore the original slices, last merged first: the base weights come back bit for bit."""
        base = self.get_base_layer()
        while self.merged_adapters:
            self.merged_adapters.pop()
            dim, idx, orig_w, orig_b = self._merge_backup.pop()
            self._weight().data.index_copy_(0 if dim == "out" else 1, idx, orig_w)
            if orig_b is not None:
                base.bias.data.index_copy_(0, idx, orig_b)


class Linear(nn.Module, HeadMaskLayer):
    """Head-mask wrapper around an ``nn.Linear`` or GPT-2 ``Conv1D`` projection."""

    def __init__(self, base_layer, adapter_name, channels, dim, init_weights=True, forward_strategy="merged",
                 grad_mask_ratio=0.0, inference_mode=False, **kwargs) -> None:
        super().__init__()
        HeadMaskLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, channels, dim, init_weights, forward_strategy, grad_mask_ratio,
                          inference_mode)

    def __setstate__(self, state) -> None:
        """Deep copies and unpickled layers are tracked for GMT like the original."""
        super().__setstate__(state)
        if any(r > 0 for r in getattr(self, "headmask_grad_mask_ratio", {}).values()):
            gmt.track(self)

    def forward(self, x: torch.Tensor, *args, adapter_names=None, **kwargs) -> torch.Tensor:
        if adapter_names is not None:
            check_layer_call(self, x, adapter_names)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        active = [a for a in self.active_adapters if a in self.headmask_delta]
        if not active:
            return self.base_layer(x, *args, **kwargs)
        return head_slice_forward(self, x, active)

    def _mixed_batch_forward(self, x: torch.Tensor, *args, adapter_names, **kwargs) -> torch.Tensor:
        """PEFT mixed batch: the base output once, then each adapter's slices added to its own samples only
        (``adapter_names[i]`` names sample ``i``'s adapter; see :mod:`peft_alps.mixed_batch`)."""
        y = self.base_layer(x, *args, **kwargs)
        for name in dict.fromkeys(adapter_names):
            slices, params = self._slices_and_params([name])
            if name == BASE or not slices:  # no adapter, or one that selects no head in this layer
                continue
            rows = torch.tensor([i for i, n in enumerate(adapter_names) if n == name], device=y.device)
            (dim, idx), (delta, bias_delta) = slices[0], params
            y[rows] = add_slice_output(y[rows], x[rows], dim, idx, delta, bias_delta)
        return y

    def __repr__(self) -> str:
        return "headmask." + super().__repr__()


def head_slice_forward(layer: HeadMaskLayer, x: torch.Tensor, adapter_names: list[str]) -> torch.Tensor:
    """Output of ``layer``'s projection with the adapters' slices applied.

    The one place where the forward strategy is chosen: ``"merged"`` (custom
    autograd over a temporary merged weight) when every adapter asks for it,
    otherwise ``"output_add"`` (base output + ``x @ delta^T`` into the channels).
    """
    slices, params = layer._slices_and_params(adapter_names)
    base = layer.get_base_layer()
    if all(layer.headmask_strategy[a] == "merged" for a in adapter_names):
        return _MergedSliceLinear.apply(x, layer._weight(), base.bias, slices, *params)
    y = base(x)
    for (dim, idx), delta, bias_delta in zip(slices, params[0::2], params[1::2]):
        y = add_slice_output(y, x, dim, idx, delta, bias_delta)
    return y


def add_slice_output(y, x, dim, idx, delta, bias_delta) -> torch.Tensor:
    """``y`` (the base output for ``x``) plus one adapter's slice contribution: the ``"output_add"`` formula.

    Rows (``dim="out"``): ``x @ delta^T (+ bias_delta)`` added into output channels ``idx``;
    columns (``"in"``): input channels ``x[..., idx] @ delta^T`` added to every output channel.
    """
    if dim == "out":
        return y.index_add(-1, idx, F.linear(x.to(delta.dtype), delta, bias_delta).to(y.dtype))
    return y + F.linear(x.index_select(-1, idx).to(delta.dtype), delta).to(y.dtype)
