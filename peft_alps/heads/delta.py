"""Kinds of head delta: how an adapter's trainable tensors make the update of a projection's selected channels.

The seam, in the spirit of PEFT's ``LoraVariant``: everything that applies an adapter (the layer's forward in
both strategies, ``merge``/``unmerge``, ``get_delta_weight``, the streamed file merge, the LoRA export, GMT and
the model card's counts) works on the *slice update* a kind computes from its tensors, never on the tensors
themselves. A new kind (a low-rank per-head update, a scaled slice, ...) is one :class:`HeadDelta` subclass
and one :func:`register_delta_kind` call; ``HeadMaskConfig(delta_kind=...)`` chooses it.

Frame (``nn.Linear``, ``y = x @ W^T + b``, ``W`` of shape ``[out, in]``), for ``n`` selected channels ``idx``
on ``axis`` (:meth:`~peft_alps.heads.layout.HeadLayout.head_axis`):

* ``axis="out"`` (q/k/v rows): the update ``D`` is ``[n, in]``, the bias update ``[n]`` (biased projections);
* ``axis="in"`` (o columns): ``D`` is ``[out, n]``, no bias update.

The effective weight is ``W`` with ``W[idx] := merged_slice(W[idx], D)`` along the axis (:func:`merged_slice`,
the one merge formula), so merged outputs equal adapter outputs.

A kind's tensors are saved as ``<module>.headmask_<tensor name>`` (:data:`TENSOR_PREFIX`); the layer holds
each in a ``ParameterDict`` attribute of that name.
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch

TENSOR_PREFIX = "headmask_"  # layer attributes and saved tensor names: headmask_delta, headmask_bias, ...


def merged_slice(orig: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``orig + delta`` computed in the delta's dtype and rounded to ``orig``'s: the one merge formula."""
    return (orig.to(delta.dtype) + delta).to(orig.dtype)


class HeadDelta:
    """One kind of head delta (see the module docstring). Subclasses set :attr:`name` and :attr:`tensors` and
    implement the three static methods; instances hold no state."""

    name: str = ""
    tensors: tuple[str, ...] = ()  # names of the trainable tensors (a subset may be absent, e.g. a bias)

    @staticmethod
    def shapes(n: int, axis: str, out_features: int, in_features: int, bias: bool) -> dict[str, tuple[int, ...]]:
        """Shapes of the tensors of one projection: ``n`` channels on ``axis``; ``bias``: the slice has a bias part
        (rows, ``axis="out"``, of a projection with a bias; never for columns)."""
        raise NotImplementedError

    @staticmethod
    def init(shapes: Mapping[str, tuple[int, ...]], init_weights: bool) -> dict[str, torch.Tensor]:
        """Initial values (float32). ``init_weights=True``: the update is exactly zero (the model is unchanged)."""
        raise NotImplementedError

    @staticmethod
    def update(tensors: Mapping[str, torch.Tensor], axis: str) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(D, bias update or None)`` from the tensors, differentiably (gradients flow back to them)."""
        raise NotImplementedError


class DenseSlice(HeadDelta):
    """Every entry of the selected slices is trainable: ``D`` is the ``delta`` tensor itself (ALPS)."""

    name = "dense"
    tensors = ("delta", "bias")

    @staticmethod
    def shapes(n, axis, out_features, in_features, bias):
        if axis == "out":
            return {"delta": (n, in_features), **({"bias": (n,)} if bias else {})}
        return {"delta": (out_features, n)}

    @staticmethod
    def init(shapes, init_weights):
        make = torch.zeros if init_weights else (lambda *s: torch.randn(*s) * 0.02)
        return {name: make(*shape) for name, shape in shapes.items()}

    @staticmethod
    def update(tensors, axis):
        return tensors["delta"], tensors.get("bias")


DELTA_KINDS: dict[str, HeadDelta] = {}


def register_delta_kind(kind: HeadDelta) -> HeadDelta:
    """Make ``kind`` available as ``HeadMaskConfig(delta_kind=kind.name)``; returns it."""
    if not isinstance(kind, HeadDelta) or not kind.name or not kind.tensors:
        raise TypeError(f"register_delta_kind takes a HeadDelta instance with a name and tensors, got {kind!r}.")
    DELTA_KINDS[kind.name] = kind
    return kind


def delta_kind(name: str) -> HeadDelta:
    """The registered kind called ``name``; ValueError listing the known ones otherwise."""
    if name not in DELTA_KINDS:
        raise ValueError(f"delta_kind must be one of {sorted(DELTA_KINDS)}, got {name!r}.")
    return DELTA_KINDS[name]


register_delta_kind(DenseSlice())
