"""Merge a head-mask adapter into a base checkpoint, file to file, without loading the model.

:func:`merge_checkpoint` reads ``adapter_config.json`` and the deltas of a saved HEADMASK adapter, maps
each delta to the base tensor it changes (by the ``{layers}.{layer}.{module}.weight|bias`` suffix of the
layout recorded in the adapter), and writes a standard transformers checkpoint: the same safetensors
shards (file names, index ``weight_map``), config, tokenizer and generation files. It loads with plain
transformers; peft_alps is not needed to use it.

How the shards are written (the safetensors format is an 8-byte little-endian header length, a JSON
header ``{name: {dtype, shape, data_offsets}, "__metadata__": {...}}`` and the raw tensor bytes):

* Headers are parsed and validated here (offsets contiguous, sizes consistent, file length exact), so a
  truncated or corrupted shard is reported before anything is written.
* Without a dtype change every tensor keeps its size, so the original header bytes are written
  unchanged and each tensor goes to its original offset. Runs of untouched tensors are copied as raw
  bytes (``os.copy_file_range`` where the OS has it, otherwise 8 MiB chunks): never decoded.
* A tensor the adapter touches is read whole (:func:`_read_tensor`, the one place a base tensor is
  materialised), its head slices are replaced in place with :func:`~peft_alps.layer.merged_slice`
  (the formula of the layer's ``merge``, so the result is bitwise equal to ``merge_and_unload()``),
  and its buffer is written out.
* With ``dtype``, a new header is built (tensors ordered by element size, then name, as safetensors
  does, so every tensor stays aligned) and untouched floating tensors are cast chunk by chunk.

Adapter tensors saved for ``modules_to_save`` (e.g. a classification head) replace the base tensor of the same
name whole, as ``merge_and_unload()`` does. Other weight formats (``*.bin``, ...), subfolders, hidden files and
peft_alps' SmolLM2 cache marker are not copied (the report lists them).

Peak memory is therefore about the largest touched tensor (twice that with a dtype cast) plus one copy
chunk and the one delta being applied, whatever the model size. Deltas are applied in the dtype
``PeftModel.from_pretrained`` gives them (the base weight's dtype, float32 for a float16/bfloat16 base),
so a merged bf16 checkpoint equals loading the adapter onto the bf16 base and calling
``merge_and_unload()``. With ``dtype``, tensors are merged in the base's dtype and then cast, i.e. the
result equals ``merge_and_unload().to(dtype)``.

Everything is written into a temporary folder next to ``out_dir`` and renamed into place at the end;
on any error nothing is left behind.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch

from .config import normalise_heads
from .fileio import umask
from .integrity import IntegrityError, check_file, check_fingerprint, fingerprint, sketch
from .layer import merged_slice
from .layout import HeadLayout, LayoutError, check_parts, resolve_layout
from .localize import _find as find_name

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

# safetensors dtype code -> (torch dtype or None, bytes per element)
_DTYPES = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2), "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8), "I32": (torch.int32, 4), "I16": (torch.int16, 2), "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1),
    "U16": (getattr(torch, "uint16", None), 2), "U32": (getattr(torch, "uint32", None), 4),
    "U64": (getattr(torch, "uint64", None), 8),
    "F8_E4M3": (getattr(torch, "float8_e4m3fn", None), 1), "F8_E5M2": (getattr(torch, "float8_e5m2", None), 1),
}
FLOAT_CODES = ("F64", "F32", "F16", "BF16")  # the codes ``dtype`` casts (not fp8: those are quantised weights)
OUT_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
_CODE_NAMES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
_MAX_HEADER = 100_000_000  # as safetensors
CHUNK = 8 << 20  # bytes per copy / cast chunk
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".npz")
# not copied: peft_alps' own cache marker (it would claim the merged folder is the unmodified conversion), adapters
_NOT_COPIED = ("peft_alps_source.json", "adapter_config.json")
_DELTA, _BIAS = ".headmask_delta", ".headmask_bias"
_PREFIX = "base_model.model."


class MergeError(ValueError):
    """The inputs cannot be merged (wrong adapter, mismatched base, unreadable files, bad out_dir)."""


@dataclass
class MergeReport:
    """What :func:`merge_checkpoint_report` did."""

    out: Path
    shards: list[str]  # safetensors file names, as in the base
    tensors_changed: int  # base tensors with head slices merged in (or replaced, for modules_to_save)
    tensors_copied: int  # tensors whose bytes were copied through without decoding
    tensors_cast: int  # untouched floating tensors cast to ``dtype``
    deltas: int  # adapter tensors applied
    weight_bytes: int  # bytes of safetensors files written
    files_copied: list[str] = field(default_factory=list)  # non-weight files copied from the base
    skipped: list[str] = field(default_factory=list)  # base entries not copied (other weight formats, folders)
    seconds: float = 0.0


# ----- safetensors headers -----
@dataclass
class _Entry:
    name: str
    dtype: str
    shape: tuple
    begin: int  # offsets relative to the start of the data section
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass
class _Shard:
    path: Path
    header: bytes  # the 8-byte length and the JSON header, verbatim
    metadata: Optional[dict]
    entries: dict  # name -> _Entry, in data order

    @property
    def data_start(self) -> int:
        return len(self.header)


def read_header(path: Path) -> _Shard:
    """Parse and validate a safetensors file's header; MergeError naming the file if it is not sound."""
    def bad(problem: str) -> MergeError:
        return MergeError(f"{path} is not a valid safetensors file: {problem}.")

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise bad(f"only {len(prefix)} bytes long (truncated?)")
            n = int.from_bytes(prefix, "little")
            if n > _MAX_HEADER or n > size - 8:
                raise bad(f"header length {n} does not fit a file of {size} bytes (truncated or corrupted)")
            raw = f.read(n)
    except OSError as e:
        raise MergeError(f"cannot read {path}: {e.strerror or e}.") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise bad(f"header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict)
                                     and all(isinstance(v, str) for v in metadata.values())):
        raise bad("__metadata__ is not a string-to-string map")
    entries = []
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            ok = (isinstance(dtype, str) and all(isinstance(d, int) and d >= 0 for d in shape)
                  and isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end)
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise bad(f"malformed entry for tensor {name!r}: {info!r}")
        item = _DTYPES.get(dtype, (None, None))[1]
        if item is not None and math.prod(shape) * item != end - begin:
            raise bad(f"tensor {name!r} ({dtype} {list(shape)}) spans {end - begin} bytes, expected "
                      f"{math.prod(shape) * item}")
        entries.append(_Entry(name, dtype, shape, begin, end))
    entries.sort(key=lambda e: (e.begin, e.end))
    pos = 0
    for e in entries:
        if e.begin != pos:
            raise bad(f"tensor {e.name!r} starts at byte {e.begin}, expected {pos} (overlapping or missing data)")
        pos = e.end
    if size != 8 + n + pos:
        problem = "truncated" if size < 8 + n + pos else "has trailing bytes"
        raise bad(f"{problem}: the header describes {8 + n + pos} bytes but the file has {size}")
    return _Shard(path, prefix + raw, metadata, {e.name: e for e in entries})


# ----- reading and writing bytes -----
def _read_into(f, offset: int, buf) -> None:
    view, done = memoryview(buf), 0
    f.seek(offset)
    while done < len(view):
        got = f.readinto(view[done:])
        if not got:
            raise MergeError(f"{f.name} ended early at byte {offset + done} (truncated while merging?).")
        done += got


def _write_all(f, data) -> None:
    view = memoryview(data).cast("B")
    while len(view):
        view = view[f.write(view):]


def _read_tensor(src, shard: _Shard, entry: _Entry) -> torch.Tensor:
    """Decode one base tensor: the only place a base tensor is materialised (tests count the calls)."""
    return _decode(src, shard, entry)


def _decode(src, shard: _Shard, entry: _Entry) -> torch.Tensor:
    """The tensor ``entry`` of ``shard`` read from the open file ``src`` into a fresh buffer."""
    dtype = _DTYPES[entry.dtype][0]
    buf = bytearray(entry.nbytes)
    if not buf:
        return torch.empty(entry.shape, dtype=dtype)
    _read_into(src, shard.data_start + entry.begin, buf)
    return torch.frombuffer(buf, dtype=dtype).view(entry.shape)


def _tensor_bytes(t: torch.Tensor):
    return t.contiguous().reshape(-1).view(torch.uint8).numpy() if t.numel() else b""


def _copy_range(src, dst, offset: int, count: int) -> None:
    """Copy ``count`` raw bytes from ``src`` at ``offset`` to ``dst``'s position, without decoding them."""
    copy_file_range = getattr(os, "copy_file_range", None)
    if copy_file_range is not None:
        try:
            while count:
                n = copy_file_range(src.fileno(), dst.fileno(), min(count, 1 << 30), offset)
                if n == 0:
                    raise MergeError(f"{src.name} ended early at byte {offset} (truncated while merging?).")
                offset, count = offset + n, count - n
            return
        except OSError:  # not supported here (file system, kernel): copy through a buffer
            dst.seek(0, os.SEEK_END)
    buf = bytearray(min(count, CHUNK))
    while count:
        view = memoryview(buf)[:min(count, len(buf))]
        _read_into(src, offset, view)
        _write_all(dst, view)
        offset, count = offset + len(view), count - len(view)


def _copy_cast(src, dst, shard: _Shard, entry: _Entry, out_dtype: torch.dtype) -> None:
    """Cast a floating tensor chunk by chunk (never the whole tensor in memory)."""
    dtype, item = _DTYPES[entry.dtype]
    per_chunk = max(CHUNK // item, 1)
    total = entry.nbytes // item
    buf = bytearray(min(total, per_chunk) * item)
    for start in range(0, total, per_chunk):
        n = min(per_chunk, total - start)
        view = memoryview(buf)[:n * item]
        _read_into(src, shard.data_start + entry.begin + start * item, view)
        _write_all(dst, _tensor_bytes(torch.frombuffer(view, dtype=dtype).to(out_dtype)))


# ----- the plan: which adapter tensor changes which base tensor -----
@dataclass
class _Edit:
    key: str  # adapter tensor name
    module_tensor: str  # "<module>.weight|bias" as the adapter's base fingerprint names it ("" for whole tensors)
    dim: Optional[int]  # stored dim the channels index; None: replace the whole tensor (modules_to_save)
    channels: list
    transposed: bool = False  # the delta is in the nn.Linear frame, the stored weight is [in, out]


@dataclass
class _Plan:
    base: Path
    adapter: Path
    index: Optional[dict]  # the base's index json, or None for a single file
    shards: dict  # file name -> _Shard
    edits: dict  # base tensor name -> list of _Edit
    adapter_file: Path
    adapter_shard: _Shard
    out_code: Optional[str]  # safetensors dtype code to cast floating tensors to, or None
    base_config: dict
    fingerprint: Optional[dict] = None  # the base fingerprint recorded with the adapter
    sketches: dict = field(default_factory=dict)  # the same, of this base's slices, filled while merging


def _dtype_code(dtype) -> Optional[str]:
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    if dtype not in OUT_DTYPES:
        raise MergeError(f"dtype must be one of {list(OUT_DTYPES)} or None, got {dtype!r}.")
    return OUT_DTYPES[dtype]


def _find(names, suffix: str, where: str) -> str:
    """:func:`peft_alps.localize._find` (the one name ending with ``suffix``), raising MergeError."""
    try:
        return find_name(names, suffix, where)
    except ValueError as e:
        raise MergeError(str(e)) from None


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MergeError(f"{what}: {path} does not exist.") from None
    except (OSError, ValueError) as e:
        raise MergeError(f"{what}: cannot read {path} ({e}).") from None
    if not isinstance(data, dict):
        raise MergeError(f"{what}: {path} is not a JSON object.")
    return data


def _base_layout(base: Path, recorded: Optional[HeadLayout], adapter: Path, shards: dict) -> HeadLayout:
    """The adapter's layout, resolved and checked against the base's config and tensor shapes exactly as
    ``get_peft_model`` / ``PeftModel.from_pretrained`` check it against a loaded model."""
    import transformers
    from transformers import AutoConfig

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        config = AutoConfig.from_pretrained(base, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise MergeError(f"cannot read the base config {base / 'config.json'}: {' '.join(str(e).split())}") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
    try:
        layout = resolve_layout(recorded, config)
        shapes = {e.name.removesuffix(".weight"): e.shape[::-1] if layout.transposed else e.shape
                  for shard in shards.values() for e in shard.entries.values()
                  if e.name.endswith(".weight") and len(e.shape) == 2}
        layout.check_model(shapes, config, where=f"base {base}")
    except LayoutError as e:
        raise MergeError(f"adapter {adapter} does not fit base {base}: {e}") from None
    return layout


def _read_base(base: Path):
    """``(index json or None, {file name: _Shard})`` of the base's safetensors weights, all validated."""
    index_path, single = base / INDEX_NAME, base / SINGLE_NAME
    if index_path.is_file():
        index = _read_json(index_path, "base weight index")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise MergeError(f"{index_path} has no weight_map.")
        files = sorted(set(weight_map.values()))
        for name in files:
            if not isinstance(name, str) or Path(name).name != name or name.startswith("."):
                raise MergeError(f"{index_path} names the shard {name!r}: expected a plain file name in {base}.")
        shards = {}
        for name in files:
            if not (base / name).is_file():
                raise MergeError(f"{index_path} lists {name}, which is missing from {base}.")
            shards[name] = read_header(base / name)
            listed = {k for k, v in weight_map.items() if v == name}
            if set(shards[name].entries) != listed:
                diff = sorted(set(shards[name].entries) ^ listed)[:3]
                raise MergeError(f"{base / name} does not hold the tensors {index_path.name} assigns to it "
                                 f"(differences: {diff}).")
        return index, shards
    if single.is_file():
        return None, {SINGLE_NAME: read_header(single)}
    found = sorted(p.name for p in base.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".safetensors"))[:3]
    raise MergeError(f"base {base} has no {SINGLE_NAME} or {INDEX_NAME}"
                     + (f" (found {found}; re-save it with save_pretrained to get safetensors)" if found else "")
                     + ".")


def _plan(base_dir, adapter_dir, dtype, force: bool = False) -> _Plan:
    """Read and validate every input; raise MergeError before anything is written."""
    out_code = _dtype_code(dtype)
    base, adapter = Path(base_dir), Path(adapter_dir)
    for what, path in (("base", base), ("adapter", adapter)):
        if not path.is_dir():
            raise MergeError(f"{what} folder {'is not a folder' if path.exists() else 'does not exist'}: {path}")
    if sys.byteorder != "little":
        raise MergeError("streamed merging needs a little-endian machine (safetensors stores little-endian).")
    cfg = _read_json(adapter / ADAPTER_CONFIG, "adapter config")
    if cfg.get("peft_type") != "HEADMASK":
        raise MergeError(f"{adapter} holds a {cfg.get('peft_type')!r} adapter, not a HEADMASK (peft_alps) adapter.")
    try:
        heads, parts = normalise_heads(cfg.get("heads")), check_parts(cfg.get("parts") or ())
        recorded = HeadLayout.from_dict(cfg["layout"]) if cfg.get("layout") else None
    except (ValueError, TypeError) as e:
        raise MergeError(f"{adapter / ADAPTER_CONFIG}: {e}") from None
    base_config = _read_json(base / "config.json", "base config")
    index, shards = _read_base(base)
    layout = _base_layout(base, recorded, adapter, shards)
    where = {name: file for file, shard in shards.items() for name in shard.entries}  # tensor -> shard file

    adapter_file = adapter / ADAPTER_WEIGHTS
    if not adapter_file.is_file():
        raise MergeError(f"adapter {adapter} has no {ADAPTER_WEIGHTS}.")
    adapter_shard = read_header(adapter_file)  # validated like the base shards
    try:
        check_file(adapter_file, force=force)
    except IntegrityError as e:
        raise MergeError(str(e)) from None
    bad_layers = [layer for layer in heads if layer >= layout.num_layers]
    bad_heads = [layer for layer, hs in heads.items() if hs[-1] >= layout.num_heads]
    if bad_layers or bad_heads:
        raise MergeError(f"the adapter's heads {heads} do not fit the base's {layout.num_layers} layers x "
                         f"{layout.num_heads} heads.")

    edits, expected = {}, {(layer, m) for layer in heads for m in layout.module_names(parts)}
    seen = set()
    for key, entry in adapter_shard.entries.items():
        name = key.removeprefix(_PREFIX)
        if entry.dtype not in FLOAT_CODES:
            raise MergeError(f"adapter tensor {key} has dtype {entry.dtype}; expected a floating dtype.")
        if name.endswith(_DELTA) or name.endswith(_BIAS):
            is_bias = name.endswith(_BIAS)
            module_name = name[:-len(_BIAS if is_bias else _DELTA)]
            found = layout.locate(module_name, parts)
            if found is None or found[0] not in heads:
                raise MergeError(f"adapter tensor {key} belongs to no module of the adapter's heads/parts.")
            layer, module = found
            seen.add((layer, module, is_bias))
            target = _find(where, f"{layout.layers}.{layer}.{module}.{'bias' if is_bias else 'weight'}",
                           f"base {base}")
            base_entry = shards[where[target]].entries[target]
            shape = base_entry.shape
            dim = layout.slice_dim(module)
            channels = layout.channels(module, parts, heads[layer])
            if is_bias:
                if dim != "out" or len(shape) != 1:
                    raise MergeError(f"adapter tensor {key} is a bias slice but base {target} has shape {list(shape)}.")
                out_f, in_f, want, stored_dim = shape[0], None, (len(channels),), 0
            else:
                if len(shape) != 2:
                    raise MergeError(f"base {target} has shape {list(shape)}; expected a 2-D projection weight.")
                out_f, in_f = (shape[1], shape[0]) if layout.transposed else shape
                want = (len(channels), in_f) if dim == "out" else (out_f, len(channels))
                stored_dim = (0 if dim == "out" else 1) ^ int(layout.transposed)
            limit = out_f if dim == "out" else in_f
            if channels[-1] >= limit or entry.shape != want:
                raise MergeError(f"adapter tensor {key} has shape {list(entry.shape)} but base {target} "
                                 f"({list(shape)}) needs {list(want)} for heads {heads[layer]} of layer {layer}.")
            edit = _Edit(key, f"{module_name}.{'bias' if is_bias else 'weight'}", stored_dim, channels,
                         transposed=layout.transposed and not is_bias)
        else:  # modules_to_save: a whole tensor replaced
            target = _find(where, name, f"base {base} (for the adapter's modules_to_save tensor {key})")
            shape = shards[where[target]].entries[target].shape
            if entry.shape != shape:
                raise MergeError(f"adapter tensor {key} has shape {list(entry.shape)} but base {target} has "
                                 f"{list(shape)}.")
            edit = _Edit(key, "", None, [])
        base_entry = shards[where[target]].entries[target]
        if base_entry.dtype not in FLOAT_CODES:
            raise MergeError(f"base tensor {target} has dtype {base_entry.dtype}; cannot merge into it.")
        if target in edits:
            raise MergeError(f"adapter tensors {edits[target][0].key} and {key} both map to base {target}.")
        edits[target] = [edit]
    missing = sorted(expected - {(layer, m) for layer, m, is_bias in seen if not is_bias})
    if missing:
        raise MergeError(f"adapter {adapter_file} has no delta for (layer, module) {missing[:4]} although its "
                         f"config selects them.")
    return _Plan(base, adapter, index, shards, edits, adapter_file, adapter_shard, out_code, base_config,
                 cfg.get("base_fingerprint"))


# ----- writing -----
def _out_entries(shard: _Shard, out_code: Optional[str]):
    """``(header bytes, [(entry, out dtype code, out begin)])`` of the output shard, in write order."""
    entries = list(shard.entries.values())
    if out_code is None:
        return shard.header, [(e, e.dtype, e.begin) for e in entries]
    code = {e.name: out_code if e.dtype in FLOAT_CODES else e.dtype for e in entries}
    item = {e.name: _DTYPES.get(code[e.name], (None, 1))[1] for e in entries}
    entries.sort(key=lambda e: (-item[e.name], e.name))  # as safetensors: keeps every tensor aligned
    header, rows, pos = {}, [], 0
    if shard.metadata is not None:
        header["__metadata__"] = shard.metadata
    for e in entries:
        n = e.nbytes if code[e.name] == e.dtype else math.prod(e.shape) * item[e.name]
        header[e.name] = {"dtype": code[e.name], "shape": list(e.shape), "data_offsets": [pos, pos + n]}
        rows.append((e, code[e.name], pos))
        pos += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw, rows


def _apply(t: torch.Tensor, edits, adapter, adapter_shard: _Shard, sketches: dict) -> torch.Tensor:
    """``t`` with the adapter's slices merged in (in place), exactly as ``HeadMaskLayer.merge``; the base
    slices' fingerprint sketches go into ``sketches``."""
    for edit in edits:
        value = _decode(adapter, adapter_shard, adapter_shard.entries[edit.key])  # one delta in memory at a time
        if edit.dim is None:
            t.copy_(value.to(t.dtype))
            continue
        # PeftModel.from_pretrained keeps deltas in the base weight's dtype, float32 for a float16/bfloat16 base
        compute = torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype
        delta = value.to(compute)
        if edit.transposed:
            delta = delta.t()
        idx = torch.tensor(edit.channels, dtype=torch.long)
        base_slice = t.index_select(edit.dim, idx)
        sketches[edit.module_tensor] = sketch(base_slice.t() if edit.transposed else base_slice)
        t.index_copy_(edit.dim, idx, merged_slice(base_slice, delta))
    return t


def _write_shard(shard: _Shard, out_path: Path, plan: _Plan, adapter, counts: dict) -> int:
    """Write one output shard (streamed); return its size in bytes."""
    header, rows = _out_entries(shard, plan.out_code)
    pending = None  # (source offset, length) of untouched bytes still to copy
    with open(shard.path, "rb", buffering=0) as src, open(out_path, "wb", buffering=0) as dst:
        _write_all(dst, header)

        def flush():
            nonlocal pending
            if pending:
                _copy_range(src, dst, *pending)
            pending = None

        for entry, code, _ in rows:
            out_dtype = _DTYPES[code][0] if code != entry.dtype else None
            if entry.name in plan.edits:
                flush()
                t = _apply(_read_tensor(src, shard, entry), plan.edits[entry.name], adapter, plan.adapter_shard,
                           plan.sketches)
                _write_all(dst, _tensor_bytes(t if out_dtype is None else t.to(out_dtype)))
                counts["changed"] += 1
                counts["deltas"] += len(plan.edits[entry.name])
            elif out_dtype is not None:
                flush()
                _copy_cast(src, dst, shard, entry, out_dtype)
                counts["cast"] += 1
            else:
                start = shard.data_start + entry.begin
                if pending and pending[0] + pending[1] == start:
                    pending = (pending[0], pending[1] + entry.nbytes)
                else:
                    flush()
                    pending = (start, entry.nbytes)
                counts["copied"] += 1
        flush()
        size = dst.seek(0, os.SEEK_END)
    expected = sum(_out_sizes(shard, plan.out_code))
    if size != expected:
        raise MergeError(f"wrote {size} bytes to {out_path.name}, expected {expected}.")
    return size


def _check_out(out: Path, plan: _Plan, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise MergeError(f"out exists and is not a folder: {out}")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise MergeError(f"out folder is not empty: {out} (pass overwrite=True / --overwrite to replace it)")
    real = out.resolve()
    for what, path in (("base", plan.base), ("adapter", plan.adapter)):
        p = path.resolve()
        if real == p or real in p.parents:
            raise MergeError(f"out {out} is (or contains) the {what} folder {path}: choose another folder.")


def _out_sizes(shard: _Shard, out_code: Optional[str]) -> tuple[int, int]:
    """``(header bytes, data bytes)`` of the output shard."""
    header, rows = _out_entries(shard, out_code)
    return len(header), sum(e.nbytes if c == e.dtype else math.prod(e.shape) * _DTYPES[c][1] for e, c, _ in rows)


def merge_checkpoint_report(base_dir, adapter_dir, out_dir, dtype=None, overwrite: bool = False,
                            force: bool = False) -> MergeReport:
    """:func:`merge_checkpoint`, returning a :class:`MergeReport` of what was written."""
    t0 = time.perf_counter()
    plan = _plan(base_dir, adapter_dir, dtype, force)
    out = Path(out_dir)
    _check_out(out, plan, overwrite)
    parent = out.absolute().parent
    existing = next(p for p in (parent, *parent.parents) if p.exists())
    need = sum(sum(_out_sizes(s, plan.out_code)) for s in plan.shards.values())
    free = shutil.disk_usage(existing).free
    if need > free:
        raise MergeError(f"the merged weights need {need / 2**20:.0f} MB but {existing} has {free / 2**20:.0f} MB "
                         f"free.")

    parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=parent))
    counts = dict(changed=0, copied=0, cast=0, deltas=0)
    files, skipped, weight_bytes = [], [], 0
    try:
        with open(plan.adapter_file, "rb", buffering=0) as adapter, _one_thread():
            for name, shard in plan.shards.items():
                weight_bytes += _write_shard(shard, stage / name, plan, adapter, counts)
        try:  # the base slices were read while merging; nothing is in place yet
            check_fingerprint(plan.fingerprint, fingerprint(plan.sketches, _merge_dtype(plan)),
                              f"Merging {plan.adapter} into {plan.base}", force=force)
        except IntegrityError as e:
            raise MergeError(str(e)) from None
        weights = set(plan.shards) | {INDEX_NAME}
        if plan.index is not None:
            if plan.out_code is None:
                shutil.copyfile(plan.base / INDEX_NAME, stage / INDEX_NAME)
            else:
                index = dict(plan.index)
                total = sum(_out_sizes(s, plan.out_code)[1] for s in plan.shards.values())
                index["metadata"] = {**(index.get("metadata") or {}), "total_size": total}
                (stage / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        for entry in sorted(plan.base.iterdir()):
            if entry.name in weights:
                continue
            if entry.name.startswith(".") or entry.is_dir() or entry.suffix in _WEIGHT_SUFFIXES \
                    or entry.name.endswith(".index.json") or entry.name in _NOT_COPIED:
                skipped.append(entry.name)
                continue
            if entry.name == "config.json" and plan.out_code is not None:
                config = dict(plan.base_config)
                for key in [k for k in ("torch_dtype", "dtype") if k in config] or ["dtype"]:
                    config[key] = _CODE_NAMES[plan.out_code]
                (stage / entry.name).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            else:
                shutil.copyfile(entry, stage / entry.name)
            files.append(entry.name)
        mask = umask()
        os.chmod(stage, 0o777 & ~mask)  # mkdtemp creates an owner-only folder
        for p in stage.iterdir():
            os.chmod(p, 0o666 & ~mask)
        _move_into_place(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return MergeReport(out=out, shards=list(plan.shards), tensors_changed=counts["changed"],
                       tensors_copied=counts["copied"], tensors_cast=counts["cast"], deltas=counts["deltas"],
                       weight_bytes=weight_bytes, files_copied=files, skipped=skipped,
                       seconds=time.perf_counter() - t0)


def _merge_dtype(plan: _Plan) -> torch.dtype:
    """The dtype of the base tensors the adapter changes (the first one's)."""
    name = next(iter(plan.edits), None)
    shard = next((s for s in plan.shards.values() if name in s.entries), None)
    return _DTYPES[shard.entries[name].dtype][0] if shard is not None else torch.float32


@contextlib.contextmanager
def _one_thread():
    """Run the slice arithmetic on one thread: the slices are small, and on a busy machine torch's thread pool
    made each ``index_select`` 100x slower (24 ms instead of 0.06 ms for a 576 x 64 slice on 2 loaded cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _move_into_place(stage: Path, out: Path) -> None:
    """Rename ``stage`` to ``out``; an existing ``out`` is moved aside first and deleted only on success."""
    if not out.exists():
        os.rename(stage, out)
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.absolute().parent))
    try:
        os.rename(out, trash / "old")
        try:
            os.rename(stage, out)
        except BaseException:
            os.rename(trash / "old", out)
            raise
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(trash)


def merge_checkpoint(base_dir: Union[str, os.PathLike], adapter_dir: Union[str, os.PathLike],
                     out_dir: Union[str, os.PathLike], dtype=None, overwrite: bool = False,
                     force: bool = False) -> Path:
    """Merge the HEADMASK adapter in ``adapter_dir`` into the checkpoint in ``base_dir``, file to file.

    Writes a standard transformers checkpoint to ``out_dir`` (loads without peft_alps): the base's
    safetensors shards with the adapter's head slices merged in, bitwise equal to
    ``PeftModel.from_pretrained(base, adapter).merge_and_unload()``, plus the base's config, tokenizer and
    generation files. The model is never loaded: see the module docstring for how, and the memory bound.

    ``dtype``: ``"float32"``, ``"bfloat16"``, ``"float16"`` (or the torch dtype) to cast the floating tensors
    on output (merged in the base dtype first; config.json's dtype is updated), None to keep them.
    ``overwrite``: replace a non-empty ``out_dir`` (it is swapped out only when the new one is complete).
    ``force``: merge even if the adapter file fails its checksum or the base's slices differ from the base
    fingerprint recorded with the adapter (:mod:`peft_alps.integrity`); without it either is a MergeError and
    nothing is written.

    Everything is validated first (HEADMASK adapter, layout matching the base config, every delta mapping to
    exactly one base tensor of the right shape, base safetensors intact, ``out_dir`` usable); a
    :class:`MergeError` (a ValueError) names the problem and nothing is written. Returns ``out_dir`` as a Path.
    """
    return merge_checkpoint_report(base_dir, adapter_dir, out_dir, dtype=dtype, overwrite=overwrite,
                                   force=force).out
