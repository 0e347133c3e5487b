"""Quantized bases: which quantized projections a head-mask adapter trains on, through PEFT's quantization backends.

PEFT's generic pattern (``peft.utils.quantization_utils``, used by SHiRA, OFT, VeRA): a tuner layer holds
``quantization_backend``, resolved from its base layer, which reads the base weight dequantized. Head-mask layers
use it for what needs the base *values*: the base fingerprint (:mod:`peft_alps.io.integrity`) and
``get_delta_weight``. Training never dequantizes through it: the forward is ``"output_add"`` (the quantized layer's
own forward, plus ``x @ D^T`` into the selected channels, :func:`peft_alps.tuner.layer.add_slice_output`).

Supported: the backends PEFT can dequantize (bitsandbytes 8-bit ``Linear8bitLt`` and 4-bit ``Linear4bit``,
torchao tensor subclasses with ``dequantize()``, e.g. ``Int8WeightOnlyConfig``, HQQ). Refused, naming the module:
PEFT's forward-only backends (GPTQ, AWQ, AQLM, EETQ, ...: no way to read the base slices) and any other
non-float weight. Merging into a quantized weight is refused (:func:`merge_refusal`): a head slice's update is
often smaller than the quantization step, so requantizing would lose part of it; the deployment path is the
streamed merge into the full-precision checkpoint, ``peft_alps.merge_checkpoint``.

No module here imports bitsandbytes or torchao: a plain floating-point weight is told by its type, and PEFT's
resolver (which imports them) only runs for a weight that is not one.
"""

from __future__ import annotations

import torch
from torch import nn

from ..heads.layout import linear_frame
from ..heads.modules import is_dtensor

SUPPORTED = ("bitsandbytes 8-bit (load_in_8bit) or 4-bit (load_in_4bit), torchao tensors that dequantize (e.g. "
             "Int8WeightOnlyConfig), HQQ")


def is_plain_float(weight) -> bool:
    """A real floating-point weight (a tensor, parameter or FSDP2 shard), not a quantized one."""
    plain = type(weight) in (torch.Tensor, nn.Parameter) or is_dtensor(weight)
    return plain and weight.is_floating_point()


def _no_requantize():
    raise RuntimeError("head-mask adapters never requantize a weight (merging into a quantized base is refused).")


def quantization_backend(base: nn.Module, name: str = "this projection", get_apply_tensor_subclass=None):
    """PEFT's ``QuantizationBackend`` of the quantized projection ``base``; None for a plain floating-point one.

    ValueError naming ``name`` for a quantized weight head-mask adapters cannot train on (see the module
    docstring). ``get_apply_tensor_subclass``: torchao's requantization recipe (PEFT's
    ``get_quantization_kwargs(model)``); never called, as nothing is requantized.
    """
    weight = base.weight
    if is_plain_float(weight):
        return None
    from peft.utils.quantization_utils import TorchaoBackend, resolve_quantization_backend

    requantize = get_apply_tensor_subclass or _no_requantize
    try:
        backend = resolve_quantization_backend(base, get_apply_tensor_subclass=requantize)
    except ImportError:  # PEFT 0.20's torchao branch imports a name torchao 0.18 no longer has
        backend = None
    if backend is None and type(weight).__module__.startswith("torchao") and hasattr(weight, "dequantize"):
        backend = TorchaoBackend(requantize)  # PEFT 0.20 knows only torchao's older tensor types
    if backend is None or not backend.supports_merge:  # forward-only backends cannot read the base values
        what = f"a {backend.backend_name} layer" if backend is not None else \
            f"a {type(weight).__name__} weight of dtype {str(weight.dtype).removeprefix('torch.')}"
        raise ValueError(f"{name} is {what}, a quantization head-mask adapters cannot train on: they need the base "
                         f"values of the head slices (fingerprint, delta). Supported: {SUPPORTED}; or load the base "
                         f"in bf16/fp16/fp32. Nothing was wrapped.")
    check_readable(base, name)
    return backend


def check_readable(base: nn.Module, name: str = "this projection") -> None:
    """bitsandbytes 4-bit on a CPU with AVX512-BF16: an eval-mode forward without gradients repacks the weight in
    place for its CPU kernel (scales rounded to bf16); PEFT's dequantization then returns wrong values, and it is
    not the weight the model was loaded with. Refuse reading such a weight."""
    quant_state = getattr(base.weight, "quant_state", None)
    if getattr(quant_state, "packing_format_for_cpu", False):
        raise ValueError(f"{name}: this bitsandbytes 4-bit weight was repacked for bitsandbytes' CPU inference kernel "
                         f"(an eval-mode forward under torch.no_grad on a CPU with AVX512-BF16 does that in place, "
                         f"rounding its scales to bf16); its values can no longer be read back. Create or load the "
                         f"adapter before any such forward (e.g. right after from_pretrained). Nothing was changed.")


def dequantized_weight(base: nn.Module, backend, conv1d: bool = False) -> torch.Tensor:
    """The base weight in the ``nn.Linear`` frame ``[out, in]``: dequantized (a new tensor) when ``backend`` is
    not None, else the weight itself (a view)."""
    if backend is None:
        return linear_frame(base.weight, conv1d)
    check_readable(base)
    return linear_frame(backend.get_base_weight(base), conv1d)


def precision(base: nn.Module) -> str:
    """The fingerprint's name for a quantized weight's precision (:mod:`peft_alps.io.integrity` sets its tolerance
    by it): ``"int8"`` for 8-bit integer storage (bitsandbytes int8, torchao int8), ``"int4"`` for anything else
    (4-bit, or unknown: the coarser tolerance)."""
    weight = base.weight
    if type(weight).__module__.startswith("torchao"):  # its integers in .qdata (int4 types may pack into int8)
        int8 = "Int8" in type(weight).__name__ and getattr(weight, "qdata", weight).dtype == torch.int8
    else:  # bitsandbytes: the weight holds the integers (int8; 4-bit packed into uint8)
        int8 = weight.dtype == torch.int8
    return "int8" if int8 else "int4"


def merge_refusal(name: str) -> RuntimeError:
    """The error of a merge into the quantized weight of ``name``."""
    return RuntimeError(
        f"Cannot merge into a quantized base ({name} is quantized): requantizing the merged weight would round the "
        f"head-slice update to the quantization step, often losing most of it. Save the adapter "
        f"(model.save_pretrained(...)) and merge it into the full-precision checkpoint with "
        f"peft_alps.merge_checkpoint(base_dir, adapter_dir, out_dir) (streamed, file to file; quantize the merged "
        f"checkpoint afterwards if you deploy quantized), or load the base unquantized with the adapter and "
        f"merge_and_unload there. Nothing was merged.")
