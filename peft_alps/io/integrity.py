"""Is this the base the adapter was trained on, and is the adapter file intact?

Two records, both written when an adapter is made or saved and checked when it is used:

* **Base fingerprint** (``HeadMaskConfig.base_fingerprint``, in ``adapter_config.json``): for every base
  tensor the adapter changes (``<module>.weight``, ``<module>.bias``), a sketch of the slice it trains (the
  selected rows or columns in the ``nn.Linear`` frame): ``[norm, <v, r_1>, <v, r_2>]`` of the flattened slice
  ``v`` in float64, with fixed pseudo-random +-1 vectors ``r_k``. A sketch, not a hash, so that the same base in
  another dtype still matches: two fingerprints agree when every value differs by at most ``tol * norm``,
  ``tol`` = 1e-6 for equal dtypes and 4x the unit roundoff of the coarser dtype otherwise (bf16: 1.6e-2,
  fp16: 2e-3). A base that differs by less than that (a fine-tune that barely moved these slices) passes.
  A quantized base (:mod:`peft_alps.tuner.quantized`) is sketched from its dequantized slices, its dtype recorded
  as ``"int8"`` or ``"int4"``; fingerprints with one of those agree within 2^-4 (int8) or 2^-1 (int4), about
  twice the largest deviation measured between SmolLM2-135M's fp32 slices and their quantized copies (0.033
  bitsandbytes int8, 0.026 torchao int8, 0.26 bitsandbytes nf4), so an adapter trained on a quantized base
  merges into the full-precision checkpoint it was quantized from, and the same quantization of the same base
  matches exactly. Another base (another checkpoint, seed) deviates by about 1 in most slices and is still caught.
* **Delta checksum** (``peft_alps_delta_sha256`` in the safetensors ``__metadata__`` of
  ``adapter_model.safetensors``): SHA-256 of the tensor entries (names, dtypes, shapes, offsets) and the data
  bytes. Any flipped bit in the tensors, or a renamed/reshaped tensor, changes it. Stamped by
  ``HeadMaskConfig.save_pretrained`` when the weights file is already written (PEFT's ``save_pretrained``);
  files written otherwise (transformers' ``save_pretrained`` writes the weights after the config) carry none.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import torch

from .files import atomic_write
from .safetensors import header_bytes, read_header

CHECKSUM_KEY = "peft_alps_delta_sha256"
_UNIT_ROUNDOFF = {"float64": 2.0 ** -53, "float32": 2.0 ** -24, "float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}
# quantized bases (module docstring): relative deviation allowed against any other precision
_QUANTIZED_TOLERANCE = {"int8": 2.0 ** -4, "int4": 2.0 ** -1}


class IntegrityError(ValueError):
    """The adapter does not belong to this base, or its file was changed after saving."""


# ----- base fingerprint -----
def _signs(n: int, k: int) -> torch.Tensor:
    """Deterministic +-1 float64 vector of length ``n`` (an integer hash of the position; no RNG involved)."""
    h = (torch.arange(n, dtype=torch.int64) * 0x9E3779B1 + k * 0x85EBCA77) & 0xFFFFFFFF
    h ^= h >> 15
    h = (h * 0x2C1B3C6D) & 0xFFFFFFFF
    h ^= h >> 12
    return 1.0 - 2.0 * ((h >> 7) & 1).to(torch.float64)


def sketch(base_slice: torch.Tensor) -> list[float]:
    """``[norm, <v, r_1>, <v, r_2>]`` of ``v = base_slice.flatten()`` (float64, rounded to 8 digits)."""
    v = base_slice.detach().reshape(-1).to("cpu", torch.float64)
    values = [v.norm().item()] + [torch.dot(v, _signs(v.numel(), k)).item() for k in (1, 2)]
    return [float(f"{x:.8g}") for x in values]


def fingerprint(sketches: dict, dtype) -> dict:
    """The record stored in the config: ``{"dtype": ..., "modules": {module name: sketch}}``; ``dtype``: a torch
    dtype, or ``"int8"`` / ``"int4"`` for a quantized base."""
    return {"dtype": str(dtype).removeprefix("torch."), "modules": dict(sorted(sketches.items()))}


def mismatches(recorded: dict, current: dict) -> list[str]:
    """Modules whose base slices differ between two fingerprints, each as ``"name (deviation x)"``; [] if they
    agree. Modules present in only one of them are ignored (the caller checks the module set)."""
    dtypes = {recorded.get("dtype"), current.get("dtype")}
    if dtypes & set(_QUANTIZED_TOLERANCE):
        tol = max(_QUANTIZED_TOLERANCE.get(d, 0.0) for d in dtypes)
    else:
        tol = 1e-6 if len(dtypes) == 1 else max(4 * max(_UNIT_ROUNDOFF.get(d, 2.0 ** -8) for d in dtypes), 1e-6)
    out = []
    for name, mine in current["modules"].items():
        theirs = recorded.get("modules", {}).get(name)
        if theirs is None:
            continue
        scale = max(abs(theirs[0]), abs(mine[0]), 1e-30)
        deviation = max(abs(a - b) for a, b in zip(mine, theirs)) / scale
        if not deviation <= tol:
            out.append(f"{name} (relative deviation {deviation:.2g} > {tol:.2g})")
    return out


def check_fingerprint(recorded, current: dict, what: str, force: bool = False, warn: bool = False) -> None:
    """Compare a recorded fingerprint with the base's; IntegrityError (or a warning) naming the modules that
    differ. Nothing to check when nothing was recorded."""
    if not recorded:
        return
    bad = mismatches(recorded, current)
    if not bad:
        return
    message = (f"{what}: the base weights differ from the ones the adapter was trained on in {len(bad)} of "
               f"{len(current['modules'])} projections, e.g. {bad[0]}. The adapter was made for another base (another "
               f"checkpoint, seed or fine-tune); its outputs on this base are not what was trained.")
    _report(message, "Use the right base, or pass force=True (--force) to merge anyway.", force or warn)


# ----- delta checksum -----
def file_checksum(path) -> str:
    """SHA-256 of a safetensors file's tensor entries (names, dtypes, shapes, offsets) and data bytes."""
    return _checksum(read_header(Path(path)))


def _checksum(shard) -> str:
    """:func:`file_checksum` of the file whose validated header is ``shard``."""
    entries = {e.name: [e.dtype, list(e.shape), e.begin, e.end] for e in shard.entries.values()}
    digest = hashlib.sha256(json.dumps(entries, sort_keys=True, separators=(",", ":")).encode())
    with open(shard.path, "rb") as f:
        f.seek(shard.data_start)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def recorded_checksum(path) -> str | None:
    """The checksum stamped in the file's metadata, or None."""
    return (read_header(Path(path)).metadata or {}).get(CHECKSUM_KEY)


def check_file(path, force: bool = False, warn: bool = False) -> None:
    """Recompute the checksum of the adapter weights ``path`` and compare it with the stamped one (if any)."""
    shard = read_header(Path(path))
    recorded = (shard.metadata or {}).get(CHECKSUM_KEY)
    if recorded is None or recorded == _checksum(shard):
        return
    message = (f"{path}: the tensors do not match the checksum written when the adapter was saved: the file was "
               f"modified or corrupted after saving.")
    _report(message, "Re-download or re-save it, or pass force=True (--force) to use it anyway.", force or warn)


def _report(message: str, fix: str, warn: bool) -> None:
    """A failed check: a UserWarning (loading, or forced), else IntegrityError with the fix."""
    if warn:
        warnings.warn(message, UserWarning, stacklevel=4)
        return
    raise IntegrityError(f"{message} {fix}")


def stamp_checksum(path) -> None:
    """Write the checksum into the file's ``__metadata__`` (atomically; the tensor bytes are copied as they are)."""
    path = Path(path)
    shard = read_header(path)
    checksum = _checksum(shard)
    metadata = dict(shard.metadata or {})
    if metadata.get(CHECKSUM_KEY) == checksum:
        return
    metadata[CHECKSUM_KEY] = checksum
    with open(path, "rb") as src, atomic_write(path, "wb") as dst:
        dst.write(header_bytes(shard.entries.values(), metadata))
        src.seek(shard.data_start)
        for chunk in iter(lambda: src.read(1 << 20), b""):
            dst.write(chunk)


__all__ = ["CHECKSUM_KEY", "IntegrityError", "check_file", "check_fingerprint", "file_checksum", "fingerprint",
           "mismatches", "sketch", "stamp_checksum"]
