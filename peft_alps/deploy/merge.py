"""Merge a head-mask adapter into a base checkpoint, file to file, without loading the model.

:func:`merge_checkpoint` reads ``adapter_config.json`` and the deltas of a saved HEADMASK adapter, maps
each delta to the base tensor it changes (by the ``{layers}.{layer}.{module}.weight|bias`` suffix of the
layout recorded in the adapter), and writes a standard transformers checkpoint: the same safetensors
shards (file names, index ``weight_map``), config, tokenizer and generation files. It loads with plain
transformers; peft_alps is not needed to use it.

How the shards are written (byte-level reading and copying: :mod:`peft_alps.io.safetensors`):

* Every header is parsed and validated first (offsets contiguous, sizes consistent, file length exact), so a
  truncated or corrupted shard is reported before anything is written.
* Without a dtype change every tensor keeps its size, so the original header bytes are written
  unchanged and each tensor goes to its original offset. Runs of untouched tensors are copied as raw
  bytes (``os.copy_file_range`` where the OS has it, otherwise 8 MiB chunks): never decoded.
* A tensor the adapter touches is read whole (:func:`_read_tensor`, the one place a base tensor is
  materialised), its head slices are replaced in place with the slice update of the adapter's delta kind
  (:mod:`peft_alps.heads.delta`) and :func:`~peft_alps.heads.delta.merged_slice` (the formula of the layer's
  ``merge``, so the result is bitwise equal to ``merge_and_unload()``), and its buffer is written out.
* With ``dtype``, a new header is built (tensors ordered by element size, then name, as safetensors
  does, so every tensor stays aligned) and untouched floating tensors are cast chunk by chunk.

Adapter tensors saved for ``modules_to_save`` (e.g. a classification head) replace the base tensor of the same
name whole, as ``merge_and_unload()`` does. A ``modules_to_save`` tensor the base lacks (the new classifier of an
encoder checkpoint such as all-MiniLM-L6-v2, saved without a head) is added, in the base's dtype, under its name
in the adapter (``classifier.weight``; transformers adds the ``bert.`` prefix of the encoder's tensors itself) to
the last shard (and the index), and the adapter's ``id2label`` (recorded for classifiers) goes into config.json
with ``label2id``, so ``AutoModelForSequenceClassification.from_pretrained(out)`` loads the trained head with its
label count. Other weight formats (``*.bin``, ...), subfolders, hidden files and
peft_alps' SmolLM2 cache marker are not copied (the report lists them).

Peak memory is therefore about the largest touched tensor (twice that with a dtype cast) plus one copy
chunk and the one module's adapter tensors being applied, whatever the model size. Deltas are applied in the dtype
``PeftModel.from_pretrained`` gives them (the base weight's dtype, float32 for a float16/bfloat16 base),
so a merged bf16 checkpoint equals loading the adapter onto the bf16 base and calling
``merge_and_unload()``. With ``dtype``, tensors are merged in the base's dtype and then cast, i.e. the
result equals ``merge_and_unload().to(dtype)``.

Everything is written into a temporary folder next to ``out_dir`` and renamed into place at the end
(:func:`peft_alps.io.files.staged_folder`); on any error nothing is left behind.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch

from ..heads.delta import DenseSlice, HeadDelta, delta_kind_of, merged_slice
from ..heads.layout import HeadLayout, LayoutError, find_name, resolve_layout
from ..io.adapter import (CONFIG_NAME, PREFIX, WEIGHTS_NAME, AdapterError, expected_tensors, head_tensor_key,
                          read_config, read_heads, read_json, split_head_key, tensor_problem)
from ..io.files import staged_folder
from ..io.integrity import IntegrityError, check_file, check_fingerprint, fingerprint, sketch
from ..io.safetensors import (DTYPES, FLOAT_CODES, Entry, Header, SafetensorsError, copy_cast, copy_range,
                              header_bytes, read_header, read_tensor, tensor_bytes, write_all)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
OUT_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
_CODE_NAMES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".npz")
# not copied: peft_alps' own cache marker (it would claim the merged folder is the unmodified conversion), adapters
_NOT_COPIED = ("peft_alps_source.json", CONFIG_NAME)


class MergeError(AdapterError):
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
    tensors_added: int = 0  # modules_to_save tensors the base lacked (a new classifier), written from the adapter


def _read_tensor(src, shard: Header, entry: Entry) -> torch.Tensor:
    """Decode one base tensor: the only place a base tensor is materialised (tests count the calls)."""
    return read_tensor(src, shard, entry)


def _read_header(path: Path) -> Header:
    try:
        return read_header(path)
    except SafetensorsError as e:
        raise MergeError(str(e)) from None


# ----- the job: which adapter tensors change which base tensor -----
@dataclass
class _Edit:
    """One base tensor's change: a projection's weight or bias slices (or a whole ``modules_to_save`` tensor)."""

    module_tensor: str  # "<module>.weight|bias" as the adapter's base fingerprint names it ("" for whole tensors)
    tensors: dict  # adapter tensor name (the delta kind's, e.g. "delta") -> saved key; whole tensors: {"": key}
    axis: Optional[str] = None  # "out" / "in" (nn.Linear frame); None: replace the whole tensor (modules_to_save)
    stored_dim: Optional[int] = None  # the stored tensor's dimension the channels index
    channels: list = field(default_factory=list)
    kind: HeadDelta = field(default_factory=DenseSlice)  # the adapter's delta kind, configured by its config
    bias: bool = False  # this edit changes the bias (the slice update's bias part)
    transposed: bool = False  # the update is in the nn.Linear frame, the stored weight is [in, out]


@dataclass
class _MergeJob:
    base: Path
    adapter: Path
    index: Optional[dict]  # the base's index json, or None for a single file
    shards: dict  # file name -> Header
    edits: dict  # base tensor name -> _Edit
    adapter_file: Path
    adapter_shard: Header
    out_code: Optional[str]  # safetensors dtype code to cast floating tensors to, or None
    base_config: dict
    fingerprint: Optional[dict] = None  # the base fingerprint recorded with the adapter
    added: dict = field(default_factory=dict)  # shard file -> [Entry] of new tensors (offsets 0..nbytes)
    added_keys: dict = field(default_factory=dict)  # new tensor name -> the adapter key it is written from
    id2label: Optional[dict] = None  # the adapter's, for config.json
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
    """:func:`peft_alps.heads.layout.find_name` (the one name ending with ``suffix``), raising MergeError."""
    try:
        return find_name(names, suffix, where)
    except LayoutError as e:
        raise MergeError(str(e)) from None


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
        shapes = {e.name.removesuffix(".weight"): layout.linear_shape(e.shape)
                  for shard in shards.values() for e in shard.entries.values()
                  if e.name.endswith(".weight") and len(e.shape) == 2}
        layout.check_model(shapes, config, where=f"base {base}")
    except LayoutError as e:
        raise MergeError(f"adapter {adapter} does not fit base {base}: {e}") from None
    return layout


def _read_base(base: Path):
    """``(index json or None, {file name: Header})`` of the base's safetensors weights, all validated."""
    index_path, single = base / INDEX_NAME, base / SINGLE_NAME
    if index_path.is_file():
        index = read_json(index_path, "base weight index", MergeError)
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
            shards[name] = _read_header(base / name)
            listed = {k for k, v in weight_map.items() if v == name}
            if set(shards[name].entries) != listed:
                diff = sorted(set(shards[name].entries) ^ listed)[:3]
                raise MergeError(f"{base / name} does not hold the tensors {index_path.name} assigns to it "
                                 f"(differences: {diff}).")
        return index, shards
    if single.is_file():
        return None, {SINGLE_NAME: _read_header(single)}
    found = sorted(p.name for p in base.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".safetensors"))[:3]
    raise MergeError(f"base {base} has no {SINGLE_NAME} or {INDEX_NAME}"
                     + (f" (found {found}; re-save it with save_pretrained to get safetensors)" if found else "")
                     + ".")


def _prepare(base_dir, adapter_dir, dtype, force: bool = False) -> _MergeJob:
    """Read and validate every input; raise MergeError before anything is written."""
    out_code = _dtype_code(dtype)
    base, adapter = Path(base_dir), Path(adapter_dir)
    if not base.is_dir():
        raise MergeError(f"base folder {'is not a folder' if base.exists() else 'does not exist'}: {base}")
    if sys.byteorder != "little":
        raise MergeError("streamed merging needs a little-endian machine (safetensors stores little-endian).")
    cfg = read_config(adapter, MergeError)
    heads, parts, recorded = read_heads(cfg, adapter / CONFIG_NAME, MergeError)
    try:
        kind = delta_kind_of(cfg)
    except ValueError as e:
        raise MergeError(f"{adapter / CONFIG_NAME}: {e}") from None
    base_config = read_json(base / "config.json", "base config", MergeError)
    index, shards = _read_base(base)
    layout = _base_layout(base, recorded, adapter, shards)
    where = {name: file for file, shard in shards.items() for name in shard.entries}  # tensor -> shard file
    base_entry = lambda name: shards[where[name]].entries[name]  # noqa: E731

    adapter_file = adapter / WEIGHTS_NAME
    if not adapter_file.is_file():
        raise MergeError(f"adapter {adapter} has no {WEIGHTS_NAME}.")
    adapter_shard = _read_header(adapter_file)  # validated like the base shards
    try:
        check_file(adapter_file, force=force)
        targets = layout.targets(heads, parts)
    except (IntegrityError, LayoutError) as e:
        raise MergeError(f"adapter {adapter} does not fit base {base}: {e}" if isinstance(e, LayoutError)
                         else str(e)) from None

    edits, projections = {}, {}
    # the adapter names modules as in the model it was made on, which may carry a prefix the checkpoint's tensor
    # names lack (an encoder checkpoint's `encoder.layer.0...` is `bert.encoder.layer.0...` in its classifier)
    adapter_modules = {hit[0] for hit in map(split_head_key, adapter_shard.entries) if hit}
    for (layer, module), (channels, axis) in targets.items():
        name = layout.module_name(layer, module)
        weight = _find(where, f"{name}.weight", f"base {base}")
        try:
            full = find_name(adapter_modules, name, f"adapter {adapter}", missing_ok=True)
        except LayoutError as e:
            raise MergeError(str(e)) from None
        full = full or weight.removesuffix(".weight")  # missing from the adapter: tensor_problem below names it
        bias = find_name(where, f"{name}.bias", f"base {base}", missing_ok=True) if axis == "out" else None
        out_f, in_f = layout.linear_shape(base_entry(weight).shape)
        projections[full] = (len(channels), axis, out_f, in_f, bias is not None)
        if bias is not None and kind.shapes(len(channels), axis, out_f, in_f, True) == \
                kind.shapes(len(channels), axis, out_f, in_f, False):
            bias = None  # the kind has no bias update (KaSA): the base bias is copied as it is
        keys = {tensor: head_tensor_key(full, tensor) for tensor in kind.tensors}
        edits[weight] = _Edit(f"{full}.weight", keys, axis, layout.stored_dim(module), channels, kind,
                              transposed=layout.transposed)
        if bias is not None:
            edits[bias] = _Edit(f"{full}.bias", keys, axis, 0, channels, kind, bias=True)
    problem = tensor_problem({k: e.shape for k, e in adapter_shard.entries.items()},
                             expected_tensors(kind, projections))
    if problem:
        raise MergeError(f"The adapter weights {adapter_file} {problem}, or it was made for another base than "
                         f"{base}: the files do not belong together.")
    saved_modules = cfg.get("modules_to_save") or []
    added_keys = {}
    for key, entry in adapter_shard.entries.items():
        if entry.dtype not in FLOAT_CODES:
            raise MergeError(f"adapter tensor {key} has dtype {entry.dtype}; expected a floating dtype.")
        if split_head_key(key):
            continue
        # modules_to_save: a whole tensor replaced, or added when the base has no such module (a new classifier)
        name, what = key.removeprefix(PREFIX), f"base {base} (for the adapter's modules_to_save tensor {key})"
        module = name.rsplit(".", 1)[0]
        if find_name(where, name, what, missing_ok=True) is None \
                and not any(f".{module}." in f".{n}" for n in where) \
                and any(module == m or module.endswith("." + m) for m in saved_modules):
            added_keys[name] = key
            continue
        target = _find(where, name, what)
        if entry.shape != base_entry(target).shape:
            raise MergeError(f"adapter tensor {key} has shape {list(entry.shape)} but base {target} has "
                             f"{list(base_entry(target).shape)}.")
        if target in edits:
            raise MergeError(f"adapter tensor {key} and the head slices both map to base {target}.")
        edits[target] = _Edit("", {"": key})
    for target in edits:
        if base_entry(target).dtype not in FLOAT_CODES:
            raise MergeError(f"base tensor {target} has dtype {base_entry(target).dtype}; cannot merge into it.")
    # new tensors take the dtype of the base tensors the adapter changes (as loading the base and merging does)
    code = base_entry(next(iter(edits))).dtype
    last = sorted(shards)[-1]
    added = {last: [Entry(name, code, adapter_shard.entries[key].shape, 0,
                          math.prod(adapter_shard.entries[key].shape) * DTYPES[code][1])
                    for name, key in added_keys.items()]} if added_keys else {}
    id2label = cfg.get("id2label") or None
    return _MergeJob(base, adapter, index, shards, edits, adapter_file, adapter_shard, out_code, base_config,
                     cfg.get("base_fingerprint"), added, added_keys, id2label)


# ----- writing -----
def _out_entries(shard: Header, out_code: Optional[str], added=()):
    """``(header bytes, [(entry, out dtype code, out begin)])`` of the output shard, in write order; ``added``:
    Entries of new tensors (their own dtype, offsets ``0..nbytes``), which make a new header as a cast does."""
    entries = list(shard.entries.values()) + list(added)
    if out_code is None and not added:
        return shard.raw, [(e, e.dtype, e.begin) for e in entries]
    code = {e.name: out_code if out_code and e.dtype in FLOAT_CODES else e.dtype for e in entries}
    item = {e.name: DTYPES.get(code[e.name], (None, 1))[1] for e in entries}
    entries.sort(key=lambda e: (-item[e.name], e.name))  # as safetensors: keeps every tensor aligned
    written, rows, pos = [], [], 0
    for e in entries:
        n = e.nbytes if code[e.name] == e.dtype else math.prod(e.shape) * item[e.name]
        written.append(Entry(e.name, code[e.name], e.shape, pos, pos + n))
        rows.append((e, code[e.name], pos))
        pos += n
    return header_bytes(written, shard.metadata), rows


def _apply(t: torch.Tensor, edit: _Edit, adapter, adapter_shard: Header, sketches: dict) -> torch.Tensor:
    """``t`` with the adapter's change merged in (in place), exactly as ``HeadMaskLayer.merge``; the base
    slices' fingerprint sketches go into ``sketches``."""
    read = lambda key: read_tensor(adapter, adapter_shard, adapter_shard.entries[key])  # noqa: E731
    if edit.axis is None:
        return t.copy_(read(edit.tensors[""]).to(t.dtype))
    # PeftModel.from_pretrained keeps adapter tensors in the base weight's dtype, float32 for a float16/bfloat16
    # base: the slice update is computed in that dtype, as the layer computes it
    compute = torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype
    tensors = {name: read(key).to(compute) for name, key in edit.tensors.items() if key in adapter_shard.entries}
    idx = torch.tensor(edit.channels, dtype=torch.long)
    base_slice = t.index_select(edit.stored_dim, idx)
    linear_slice = base_slice.t() if edit.transposed else base_slice
    sketches[edit.module_tensor] = sketch(linear_slice)
    if not edit.bias:  # a kind's buffers come from the weight's base slice, as the layer computes them at load
        tensors.update(edit.kind.prepare(linear_slice, edit.axis))
    delta, bias_delta = edit.kind.update(tensors, edit.axis)
    update = bias_delta if edit.bias else (delta.t() if edit.transposed else delta)
    return t.index_copy_(edit.stored_dim, idx, merged_slice(base_slice, update))


def _write_shard(shard: Header, out_path: Path, job: _MergeJob, adapter, counts: dict) -> int:
    """Write one output shard (streamed); return its size in bytes."""
    header, rows = _out_entries(shard, job.out_code, job.added.get(out_path.name, ()))
    pending = None  # (source offset, length) of untouched bytes still to copy
    with open(shard.path, "rb", buffering=0) as src, open(out_path, "wb", buffering=0) as dst:
        write_all(dst, header)

        def flush():
            nonlocal pending
            if pending:
                copy_range(src, dst, *pending)
            pending = None

        for entry, code, _ in rows:
            out_dtype = DTYPES[code][0] if code != entry.dtype else None
            if entry.name in job.added_keys:  # a new tensor, from the adapter
                flush()
                key = job.added_keys[entry.name]
                t = read_tensor(adapter, job.adapter_shard, job.adapter_shard.entries[key])
                write_all(dst, tensor_bytes(t.to(DTYPES[code][0])))
                counts["added"] += 1
            elif entry.name in job.edits:
                flush()
                t = _apply(_read_tensor(src, shard, entry), job.edits[entry.name], adapter, job.adapter_shard,
                           job.sketches)
                write_all(dst, tensor_bytes(t if out_dtype is None else t.to(out_dtype)))
                counts["changed"] += 1
            elif out_dtype is not None:
                flush()
                copy_cast(src, dst, shard, entry, out_dtype)
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
    expected = sum(_out_sizes(shard, job.out_code, job.added.get(out_path.name, ())))
    if size != expected:
        raise MergeError(f"wrote {size} bytes to {out_path.name}, expected {expected}.")
    return size


def _check_out(out: Path, job: _MergeJob, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise MergeError(f"out exists and is not a folder: {out}")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise MergeError(f"out folder is not empty: {out} (pass overwrite=True / --overwrite to replace it)")
    real = out.resolve()
    for what, path in (("base", job.base), ("adapter", job.adapter)):
        p = path.resolve()
        if real == p or real in p.parents:
            raise MergeError(f"out {out} is (or contains) the {what} folder {path}: choose another folder.")


def _out_sizes(shard: Header, out_code: Optional[str], added=()) -> tuple[int, int]:
    """``(header bytes, data bytes)`` of the output shard."""
    header, rows = _out_entries(shard, out_code, added)
    return len(header), sum(e.nbytes if c == e.dtype else math.prod(e.shape) * DTYPES[c][1] for e, c, _ in rows)


def merge_checkpoint_report(base_dir, adapter_dir, out_dir, dtype=None, overwrite: bool = False,
                            force: bool = False) -> MergeReport:
    """:func:`merge_checkpoint`, returning a :class:`MergeReport` of what was written."""
    t0 = time.perf_counter()
    job = _prepare(base_dir, adapter_dir, dtype, force)
    out = Path(out_dir)
    _check_out(out, job, overwrite)
    parent = out.absolute().parent
    existing = next(p for p in (parent, *parent.parents) if p.exists())
    need = sum(sum(_out_sizes(s, job.out_code, job.added.get(n, ()))) for n, s in job.shards.items())
    free = shutil.disk_usage(existing).free
    if need > free:
        raise MergeError(f"the merged weights need {need / 2**20:.0f} MB but {existing} has {free / 2**20:.0f} MB "
                         f"free.")

    counts = dict(changed=0, copied=0, cast=0, added=0)
    files, skipped, weight_bytes = [], [], 0
    with staged_folder(out, whole=True) as stage:
        try:
            with open(job.adapter_file, "rb", buffering=0) as adapter, _one_thread():
                for name, shard in job.shards.items():
                    weight_bytes += _write_shard(shard, stage / name, job, adapter, counts)
        except SafetensorsError as e:  # a file changed while merging
            raise MergeError(str(e)) from None
        try:  # the base slices were read while merging; nothing is in place yet
            check_fingerprint(job.fingerprint, fingerprint(job.sketches, _merge_dtype(job)),
                              f"Merging {job.adapter} into {job.base}", force=force)
        except IntegrityError as e:
            raise MergeError(str(e)) from None
        weights = set(job.shards) | {INDEX_NAME}
        if job.index is not None:
            if job.out_code is None and not job.added:
                shutil.copyfile(job.base / INDEX_NAME, stage / INDEX_NAME)
            else:
                index = dict(job.index)
                total = sum(_out_sizes(s, job.out_code, job.added.get(n, ()))[1] for n, s in job.shards.items())
                index["metadata"] = {**(index.get("metadata") or {}), "total_size": total}
                index["weight_map"] = {**index["weight_map"],
                                       **{e.name: file for file, new in job.added.items() for e in new}}
                (stage / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        for entry in sorted(job.base.iterdir()):
            if entry.name in weights:
                continue
            if entry.name.startswith(".") or entry.is_dir() or entry.suffix in _WEIGHT_SUFFIXES \
                    or entry.name.endswith(".index.json") or entry.name in _NOT_COPIED:
                skipped.append(entry.name)
                continue
            if entry.name == "config.json" and (job.out_code is not None or job.id2label):
                config = dict(job.base_config)
                if job.out_code is not None:
                    for key in [k for k in ("torch_dtype", "dtype") if k in config] or ["dtype"]:
                        config[key] = _CODE_NAMES[job.out_code]
                if job.id2label:  # a classifier's labels (their count sizes the head when loading)
                    config["id2label"] = {str(k): v for k, v in job.id2label.items()}
                    config["label2id"] = {v: int(k) for k, v in job.id2label.items()}
                (stage / entry.name).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            else:
                shutil.copyfile(entry, stage / entry.name)
            files.append(entry.name)
    return MergeReport(out=out, shards=list(job.shards), tensors_changed=counts["changed"],
                       tensors_copied=counts["copied"], tensors_cast=counts["cast"], deltas=len(job.adapter_shard.entries),
                       weight_bytes=weight_bytes, files_copied=files, skipped=skipped,
                       seconds=time.perf_counter() - t0, tensors_added=counts["added"])


def _merge_dtype(job: _MergeJob) -> torch.dtype:
    """The dtype of the base tensors the adapter changes (the first one's)."""
    name = next(iter(job.edits), None)
    shard = next((s for s in job.shards.values() if name in s.entries), None)
    return DTYPES[shard.entries[name].dtype][0] if shard is not None else torch.float32


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
    fingerprint recorded with the adapter (:mod:`peft_alps.io.integrity`); without it either is a MergeError and
    nothing is written.

    Everything is validated first (HEADMASK adapter, layout matching the base config, every delta mapping to
    exactly one base tensor of the right shape, base safetensors intact, ``out_dir`` usable); a
    :class:`MergeError` (a ValueError) names the problem and nothing is written. Returns ``out_dir`` as a Path.
    """
    return merge_checkpoint_report(base_dir, adapter_dir, out_dir, dtype=dtype, overwrite=overwrite,
                                   force=force).out
