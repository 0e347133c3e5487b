"""The head-mask tuner layer: a frozen projection plus trainable updates of the selected heads' channels.

Frame: everything here is in the ``nn.Linear`` frame, ``y = x @ W^T + b`` with
``W`` of shape ``[out, in]``. GPT-2's ``Conv1D`` (``y = x @ W + b``, ``W`` of
shape ``[in, out]``) is handled by viewing its weight transposed.

Per adapter ``a`` the layer holds
* ``headmask_index[a]``: the selected channels, a LongTensor in a non-persistent ``BufferDict`` (it moves with
  ``.to()`` and is rebuilt from the config, never saved),
* ``headmask_axis[a]``: ``"out"`` (rows: q/k/v channels) or ``"in"`` (columns: o),
* ``headmask_kind[a]``: the delta kind (:mod:`peft_alps.heads.delta`), whose trainable tensors live in the
  ``ParameterDict`` attributes ``headmask_<tensor>`` (dense slices: ``headmask_delta`` ``[n, in]`` or
  ``[out, n]`` and ``headmask_bias`` ``[n]`` for the rows of a biased projection),
* ``headmask_<buffer>[a]``: for a kind with buffers (:attr:`~peft_alps.heads.delta.HeadDelta.buffers`, e.g.
  KaSA's truncation term), the tensors it computed from the base slice when the adapter was added, in
  non-persistent ``BufferDict`` attributes (never saved; recomputed whenever the adapter is created or loaded),
* ``headmask_kasa_loss[a]``: a KaSA adapter's regulariser options ``(beta, gamma, add it in forward)``,
* ``headmask_grad_mask_ratio[a]``: GMT ratio; if > 0 the layer is tracked by :mod:`peft_alps.tuner.gmt`, which
  masks the small gradients of ``a``'s tensors before each optimizer step.

A quantized base projection (:mod:`peft_alps.tuner.quantized`) has a PEFT ``quantization_backend``: its adapters
run ``"output_add"`` only, ``get_delta_weight`` reads the dequantized weight, and merging is refused.

Everything that applies an adapter goes through its *slice update* ``(D, bias update)``
(:meth:`HeadMaskLayer.slice_update`): the effective weight is ``W`` with the selected slices replaced by
``merged_slice(W_slice, D)`` (:func:`~peft_alps.heads.delta.merged_slice`); forward, merge and export all use
this one formula (:func:`apply_slices`), so merged outputs equal adapter outputs.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..heads.delta import TENSOR_PREFIX, DenseSlice, delta_kind, delta_kind_of, merged_slice
from ..heads.layout import linear_dim, linear_frame
from ..heads.modules import is_dtensor, is_zero3_partition
from . import gmt
from .mixed_batch import BASE, check_layer_call
from .quantized import dequantized_weight, merge_refusal, quantization_backend


def apply_slices(weight, bias, slices, updates):
    """Return ``(weight, bias)`` with every adapter's slice updates merged in (out of place).

    ``weight``: ``[out, in]`` (nn.Linear frame); ``slices``: tuple of ``(axis, index)``;
    ``updates``: flat tuple ``(D_0, bias update_0 or None, D_1, ...)``.
    """
    for (axis, idx), delta, bias_delta in zip(slices, updates[0::2], updates[1::2]):
        d = linear_dim(axis)
        weight = weight.index_copy(d, idx, merged_slice(weight.index_select(d, idx), delta))
        if bias_delta is not None and bias is not None:  # bias=None: weight only (backward recompute)
            bias = bias.index_copy(0, idx, merged_slice(bias.index_select(0, idx), bias_delta))
    return weight, bias


class _MergedSliceLinear(torch.autograd.Function):
    """``F.linear`` with the slice updates merged into a temporary weight; backward returns ``grad_x`` and the
    updates' gradients only (never a full ``[out, in]`` weight gradient). Autograd carries the updates'
    gradients on to the delta kind's tensors (for dense slices the update is the tensor itself)."""

    @staticmethod
    def forward(ctx, x, weight, bias, slices, *updates):
        w, b = apply_slices(weight, bias, slices, updates)
        ctx.save_for_backward(x, weight, *[u if u is not None else torch.empty(0) for u in updates])
        ctx.slices = slices
        ctx.has_update = [u is not None for u in updates]
        return F.linear(x, w, b)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, *saved = ctx.saved_tensors
        updates = tuple(u if has else None for u, has in zip(saved, ctx.has_update))
        # The matmuls run in the dtype the forward's F.linear computed in, which is grad_out's: the weight's, or
        # autocast's (an fp32 base under torch.autocast computes in bf16/fp16 while x and the weight stay fp32), as
        # autograd would for F.linear under autocast; each gradient then takes its input's dtype.
        dtype = grad_out.dtype
        grad_x = None
        if ctx.needs_input_grad[0]:
            w, _ = apply_slices(weight, None, ctx.slices, updates)  # recomputed: no weight copy kept alive
            grad_x = (grad_out @ w.to(dtype)).to(x.dtype)
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        grads = []
        for (axis, idx), delta, bias_delta in zip(ctx.slices, updates[0::2], updates[1::2]):
            if axis == "out":
                g_sel = g2.index_select(1, idx)
                grads.append((g_sel.t() @ x2).to(delta.dtype))
                grads.append(None if bias_delta is None else g_sel.sum(0).to(bias_delta.dtype))
            else:
                grads.append((g2.t() @ x2.index_select(1, idx)).to(delta.dtype))
                grads.append(None)
        return (grad_x, None, None, None, *grads)


class HeadMaskLayer(BaseTunerLayer):
    """Mixin holding the per-adapter head slices of one projection (see module docstring)."""

    # the dense kind's tensors; a kind with other tensors adds its attributes per instance (as PEFT's DoRA does)
    adapter_layer_names = tuple(TENSOR_PREFIX + t for t in DenseSlice.tensors)
    other_param_names = ("headmask_index", "headmask_axis", "headmask_kind", "headmask_strategy",
                         "headmask_grad_mask_ratio", "headmask_kasa_loss")

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        for attr in self.adapter_layer_names:
            setattr(self, attr, nn.ParameterDict({}))
        self.headmask_index = BufferDict({}, persistent=False)
        self.headmask_axis: dict[str, str] = {}
        self.headmask_kind: dict[str, str] = {}
        self.headmask_strategy: dict[str, str] = {}
        self.headmask_grad_mask_ratio: dict[str, float] = {}
        self.headmask_kasa_loss: dict[str, tuple] = {}  # KaSA adapters: (beta, gamma, add in forward)
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        # stack of (axis, index, original weight slice, original bias slice) for bit-exact unmerge
        self._merge_backup: list[tuple] = []
        base = self.get_base_layer()
        if not isinstance(base, (nn.Linear, Conv1D)):
            raise TypeError(f"HeadMask can wrap nn.Linear or transformers Conv1D modules, got {type(base).__name__}.")
        self.is_conv1d = isinstance(base, Conv1D)
        self.in_features, self.out_features = _get_in_out_features(base)
        self.quantization_backend = quantization_backend(base, get_apply_tensor_subclass=kwargs.get(
            "get_apply_tensor_subclass"))

    def update_layer(self, adapter_name, channels, axis, config, inference_mode=False) -> None:
        """Add adapter ``adapter_name`` training ``channels`` along ``axis`` (``"out"`` rows / ``"in"`` columns),
        as ``config`` (a :class:`~peft_alps.tuner.config.HeadMaskConfig`) asks: delta kind, initialisation,
        forward strategy, GMT ratio."""
        limit = self.out_features if axis == "out" else self.in_features
        if not channels or max(channels) >= limit or min(channels) < 0:
            raise ValueError(f"Head channels {channels[:3]}...{channels[-3:]} do not fit a {axis}-dimension of "
                             f"{limit}.")
        kind = delta_kind_of(config)
        has_bias = axis == "out" and self.get_base_layer().bias is not None
        shapes = kind.shapes(len(channels), axis, self.out_features, self.in_features, has_bias)
        index = torch.tensor(channels, dtype=torch.long)
        buffers = {}
        if kind.buffers:  # computed from the base slice: it must be the base's, not one with an adapter merged in
            if self.merged:
                raise ValueError(f"Adapter {adapter_name!r} (delta kind {kind.name!r}) is computed from the base "
                                 f"weights, but adapters {self.merged_adapters} are merged into them: unmerge first.")
            if is_dtensor(self.get_base_layer().weight) or is_zero3_partition(self.get_base_layer().weight):
                raise ValueError(f"Adapter {adapter_name!r} (delta kind {kind.name!r}) is computed from the whole base "
                                 f"slice, but this weight is a shard (FSDP2 / DeepSpeed ZeRO-3): create the adapter "
                                 f"before sharding, or use kasa_truncate=0.")
            # a quantized base: the slice the model computes with (dequantized), as the forward and merges see it
            weight = dequantized_weight(self.get_base_layer(), self.quantization_backend, self.is_conv1d).detach()
            buffers = kind.prepare(weight.index_select(linear_dim(axis), index.to(weight.device)), axis)
        for tensor, value in kind.init(shapes, config.init_weights).items():
            attr = TENSOR_PREFIX + tensor
            if attr not in self.adapter_layer_names:
                setattr(self, attr, nn.ParameterDict({}))
                self.adapter_layer_names = self.adapter_layer_names + (attr,)
            getattr(self, attr)[adapter_name] = nn.Parameter(value)
        for buffer, value in buffers.items():
            attr = TENSOR_PREFIX + buffer
            if attr not in self.other_param_names:
                setattr(self, attr, BufferDict({}, persistent=False))
                self.other_param_names = self.other_param_names + (attr,)
            getattr(self, attr)[adapter_name] = value
        self.headmask_index[adapter_name] = index
        self.headmask_axis[adapter_name] = axis
        self.headmask_kind[adapter_name] = kind.name
        self.headmask_strategy[adapter_name] = self._strategy(config.forward_strategy)
        self.headmask_grad_mask_ratio[adapter_name] = config.grad_mask_ratio
        if kind.name == "kasa":
            self.headmask_kasa_loss[adapter_name] = (config.kasa_beta, config.kasa_gamma, config.kasa_loss_in_forward)
        if config.grad_mask_ratio > 0:
            gmt.track(self)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def _strategy(self, requested) -> str:
        """The forward strategy of a config's ``forward_strategy``: None means ``"merged"`` on a floating-point base,
        ``"output_add"`` on a quantized one, where ``"merged"`` is refused (it needs the full weight)."""
        if requested is None:
            return "merged" if self.quantization_backend is None else "output_add"
        if requested == "merged" and self.quantization_backend is not None:
            raise ValueError("forward_strategy='merged' needs the full weight, which a quantized base does not have: "
                             "use 'output_add' or leave it unset.")
        return requested

    def _buffer_dicts(self) -> list[BufferDict]:
        """The index and every kind buffer ``BufferDict`` of this layer."""
        return [getattr(self, a) for a in self.other_param_names if isinstance(getattr(self, a, None), BufferDict)]

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device=None) -> None:
        """PEFT's move of the adapter to the base layer's device and dtype, with the buffers only moved: PEFT < 0.21
        casts every BufferDict entry to the base's float dtype, which would round the channel indices (bf16), and
        a kind's buffers (float32, from a float64 computation) keep their precision as the trainable tensors do."""
        held = [(d, d.pop(adapter_name)) for d in self._buffer_dicts() if adapter_name in d]
        super()._move_adapter_to_device_of_base_layer(adapter_name, device)
        for d, value in held:
            d[adapter_name] = value.to(device or self.get_base_layer().weight.device)

    # ----- the seam: an adapter's tensors -> its slice update -----
    def adapter_tensors(self, adapter_name: str) -> dict[str, nn.Parameter]:
        """``{tensor name: parameter}`` of ``adapter_name``'s delta kind in this layer."""
        kind = delta_kind(self.headmask_kind[adapter_name])
        return {t: getattr(self, TENSOR_PREFIX + t)[adapter_name] for t in kind.tensors
                if adapter_name in getattr(self, TENSOR_PREFIX + t, {})}

    def adapter_buffers(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """``{buffer name: tensor}`` of ``adapter_name``'s delta kind in this layer (computed from the base slice;
        empty for the dense kind)."""
        kind = delta_kind(self.headmask_kind[adapter_name])
        return {b: getattr(self, TENSOR_PREFIX + b)[adapter_name] for b in kind.buffers
                if adapter_name in getattr(self, TENSOR_PREFIX + b, {})}

    def slice_update(self, adapter_name: str):
        """``(D, bias update or None)`` of ``adapter_name`` (differentiable; see :mod:`peft_alps.heads.delta`)."""
        kind = delta_kind(self.headmask_kind[adapter_name])
        return kind.update({**self.adapter_tensors(adapter_name), **self.adapter_buffers(adapter_name)},
                           self.headmask_axis[adapter_name])

    def slice_factors(self, adapter_name: str):
        """``(L, R)`` with ``L @ R`` the slice update ``D``, if the kind writes it as a thin product, else None
        (:meth:`~peft_alps.heads.delta.HeadDelta.factors`)."""
        kind = delta_kind(self.headmask_kind[adapter_name])
        return kind.factors({**self.adapter_tensors(adapter_name), **self.adapter_buffers(adapter_name)},
                            self.headmask_axis[adapter_name])

    def _slices(self, adapter_names, detach: bool = False):
        """``(slices, updates)`` for :func:`apply_slices`, of the adapters this layer holds."""
        slices, updates = [], []
        for name in adapter_names:
            if name not in self.headmask_kind:
                continue
            delta, bias_delta = self.slice_update(name)
            if detach:
                delta, bias_delta = delta.detach(), None if bias_delta is None else bias_delta.detach()
            slices.append((self.headmask_axis[name], self.headmask_index[name]))
            updates += [delta, bias_delta]
        return tuple(slices), tuple(updates)

    def linear_weight(self) -> torch.Tensor:
        """Base weight in the nn.Linear frame ``[out, in]`` (a view for Conv1D)."""
        return linear_frame(self.get_base_layer().weight, self.is_conv1d)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """Dense ``[out, in]`` update (nn.Linear frame) that merging ``adapter_name`` adds to the weight."""
        slices, updates = self._slices([adapter_name], detach=True)
        w = dequantized_weight(self.get_base_layer(), self.quantization_backend, self.is_conv1d).detach()
        return apply_slices(w, None, slices, (updates[0], None))[0] - w

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """Whether PEFT's ``convert_to_lora`` (an SVD of :meth:`get_delta_weight`) can convert this layer: for an
        ``nn.Linear`` without a bias update. PEFT reads a Conv1D's delta in the stored frame (ours is the
        ``nn.Linear`` frame) and drops bias updates; ``peft_alps.export_lora`` converts both, exactly."""
        return not self.is_conv1d and self.slice_update(adapter_name)[1] is None

    # ----- merge -----
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Write the adapters' slices into the base weight; the original slices are kept for unmerge. Refused
        (RuntimeError, nothing merged) on a quantized base: :func:`peft_alps.tuner.quantized.merge_refusal`."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if adapter_names and self.quantization_backend is not None:
            raise merge_refusal("this projection")
        base = self.get_base_layer()
        for name in adapter_names:
            if name not in self.headmask_kind:
                continue
            ((axis, idx),), (delta, bias_delta) = self._slices([name], detach=True)
            d = linear_dim(axis)
            weight = self.linear_weight().data
            orig_w = weight.index_select(d, idx)
            new_w = merged_slice(orig_w, delta)
            orig_b = new_b = None
            if bias_delta is not None:
                orig_b = base.bias.data.index_select(0, idx)
                new_b = merged_slice(orig_b, bias_delta)
            if safe_merge and not (torch.isfinite(new_w).all() and (new_b is None or torch.isfinite(new_b).all())):
                raise ValueError(f"NaN or inf in the merged weights of adapter {name!r}; nothing was merged.")
            self._merge_backup.append((axis, idx, orig_w, orig_b))
            weight.index_copy_(d, idx, new_w)
            if new_b is not None:
                base.bias.data.index_copy_(0, idx, new_b)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Restore the original slices, last merged first: the base weights come back bit for bit."""
        base = self.get_base_layer()
        while self.merged_adapters:
            self.merged_adapters.pop()
            axis, idx, orig_w, orig_b = self._merge_backup.pop()
            self.linear_weight().data.index_copy_(linear_dim(axis), idx, orig_w)
            if orig_b is not None:
                base.bias.data.index_copy_(0, idx, orig_b)


class Linear(nn.Module, HeadMaskLayer):
    """Head-mask wrapper around an ``nn.Linear`` or GPT-2 ``Conv1D`` projection."""

    def __init__(self, base_layer, adapter_name, channels, axis, config, inference_mode=False, **kwargs) -> None:
        super().__init__()
        HeadMaskLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, channels, axis, config, inference_mode)

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
        if getattr(self, "_headmask_mixture", None) is not None:
            if adapter_names is not None:
                raise ValueError("Pass either adapter_names (one adapter per sample) or an adapter_mixture (weights "
                                 "per sample), not both.")
            return self._mixture_forward(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        active = [a for a in self.active_adapters if a in self.headmask_kind]
        if not active:
            return self.base_layer(x, *args, **kwargs)
        return head_slice_forward(self, x, active)

    def _mixed_batch_forward(self, x: torch.Tensor, *args, adapter_names, **kwargs) -> torch.Tensor:
        """PEFT mixed batch: the base output once, then each adapter's slices added to its own samples only
        (``adapter_names[i]`` names sample ``i``'s adapter; see :mod:`peft_alps.tuner.mixed_batch`)."""
        y = self.base_layer(x, *args, **kwargs)
        for name in dict.fromkeys(adapter_names):
            if name == BASE or name not in self.headmask_kind:  # no adapter, or one without heads in this layer
                continue
            ((axis, idx),), (delta, bias_delta) = self._slices([name])
            rows = torch.tensor([i for i, n in enumerate(adapter_names) if n == name], device=y.device)
            y[rows] = add_slice_output(y[rows], x[rows], axis, idx, delta, bias_delta)
        return y

    def _mixture_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Output under an adapter mixture (:func:`peft_alps.tuner.mixture.adapter_mixture`, which sets
        ``_headmask_mixture = (adapter names, weights [batch, adapters])``): the base output plus, per adapter,
        each sample's weight times the adapter's slice contribution (the ``output_add`` formula)."""
        if self.merged:
            raise ValueError(f"Cannot run an adapter mixture while adapter(s) {self.merged_adapters} are merged into "
                             f"the base weights: call unmerge_adapter() first.")
        adapters, weights = self._headmask_mixture
        batch = x.shape[0]
        if batch % weights.shape[0]:
            raise ValueError(f"The adapter mixture has weights for {weights.shape[0]} samples but the layer sees a "
                             f"batch of {batch}: pass one row of weights per sample.")
        weights = weights.to(x.device).repeat_interleave(batch // weights.shape[0], dim=0)  # generate's beams
        y = self.base_layer(x, *args, **kwargs)
        for a, name in enumerate(adapters):
            if name not in self.headmask_kind:  # an adapter without heads in this layer
                continue
            ((axis, idx),), (delta, bias_delta) = self._slices([name])
            scale = weights[:, a].reshape(batch, *([1] * (x.dim() - 1)))
            y = add_slice_output(y, x, axis, idx, delta, bias_delta, scale=scale)
        return y

    def __repr__(self) -> str:
        return "headmask." + super().__repr__()

    def extra_repr(self) -> str:
        return "" if self.quantization_backend is None else \
            f"quantization_backend='{self.quantization_backend.backend_name}'"


def head_slice_forward(layer: HeadMaskLayer, x: torch.Tensor, adapter_names: list[str]) -> torch.Tensor:
    """Output of ``layer``'s projection with the adapters' slices applied.

    The one place where the forward strategy is chosen: ``"merged"`` (custom
    autograd over a temporary merged weight) when every adapter asks for it,
    otherwise ``"output_add"`` (base output + ``x @ D^T`` into the channels).
    """
    slices, updates = layer._slices(adapter_names)
    base = layer.get_base_layer()
    if all(layer.headmask_strategy[a] == "merged" for a in adapter_names):
        return _MergedSliceLinear.apply(x, layer.linear_weight(), base.bias, slices, *updates)
    y = base(x)
    for (axis, idx), delta, bias_delta in zip(slices, updates[0::2], updates[1::2]):
        y = add_slice_output(y, x, axis, idx, delta, bias_delta)
    return y


def add_slice_output(y, x, axis, idx, delta, bias_delta, scale=None) -> torch.Tensor:
    """``y`` (the base output for ``x``) plus one adapter's slice contribution: the ``"output_add"`` formula.

    Rows (``axis="out"``): ``x @ D^T (+ bias update)`` added into output channels ``idx``;
    columns (``"in"``): input channels ``x[..., idx] @ D^T`` added to every output channel.
    ``scale`` (optional, broadcasting against the contribution, e.g. ``[batch, 1, 1]``): per-sample weights of the
    contribution (adapter mixtures, :mod:`peft_alps.tuner.mixture`).
    """
    if axis == "out":
        contribution = F.linear(x.to(delta.dtype), delta, bias_delta)
    else:
        contribution = F.linear(x.index_select(-1, idx).to(delta.dtype), delta)
    if scale is not None:
        contribution = contribution * scale.to(contribution.dtype)
    if axis == "out":
        return y.index_add(-1, idx, contribution.to(y.dtype))
    return y + contribution.to(y.dtype)
