"""Reading and writing safetensors files byte by byte, without loading them.

The format: an 8-byte little-endian header length, a JSON header ``{name: {dtype, shape, data_offsets},
"__metadata__": {...}}`` and the raw tensor bytes. :func:`read_header` parses and validates a header (offsets
contiguous, sizes consistent, file length exact), so a truncated or corrupted file is reported before anything
reads its data; the copy helpers move raw bytes (``os.copy_file_range`` where the OS has it) or cast floating
tensors chunk by chunk, so no whole file is ever in memory. Used by the streamed merge, the adapter-file checks
and the checksum stamp.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

# safetensors dtype code -> (torch dtype or None, bytes per element)
DTYPES = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2), "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8), "I32": (torch.int32, 4), "I16": (torch.int16, 2), "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1),
    "U16": (getattr(torch, "uint16", None), 2), "U32": (getattr(torch, "uint32", None), 4),
    "U64": (getattr(torch, "uint64", None), 8),
    "F8_E4M3": (getattr(torch, "float8_e4m3fn", None), 1), "F8_E5M2": (getattr(torch, "float8_e5m2", None), 1),
}

FLOAT_CODES = ("F64", "F32", "F16", "BF16")  # the codes a dtype cast converts (not fp8: those are quantised)
_MAX_HEADER = 100_000_000  # as safetensors
CHUNK = 8 << 20  # bytes per copy / cast chunk


class SafetensorsError(ValueError):
    """A safetensors file is unreadable, truncated or malformed."""


@dataclass
class Entry:
    """One tensor of a safetensors file, as its header describes it."""

    name: str
    dtype: str
    shape: tuple
    begin: int  # offsets relative to the start of the data section
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass
class Header:
    """A validated safetensors header: where each tensor's bytes are in the file."""

    path: Path
    raw: bytes  # the 8-byte length and the JSON header, verbatim
    metadata: Optional[dict]
    entries: dict  # name -> Entry, in data order

    @property
    def data_start(self) -> int:
        return len(self.raw)


def read_header(path) -> Header:
    """Parse and validate a safetensors file's header; SafetensorsError naming the file if it is not sound."""
    path = Path(path)

    def bad(problem: str) -> SafetensorsError:
        return SafetensorsError(f"{path} is not a valid safetensors file: {problem}.")

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
        raise SafetensorsError(f"cannot read {path}: {e.strerror or e}.") from None
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
        item = DTYPES.get(dtype, (None, None))[1]
        if item is not None and math.prod(shape) * item != end - begin:
            raise bad(f"tensor {name!r} ({dtype} {list(shape)}) spans {end - begin} bytes, expected "
                      f"{math.prod(shape) * item}")
        entries.append(Entry(name, dtype, shape, begin, end))
    entries.sort(key=lambda e: (e.begin, e.end))
    pos = 0
    for e in entries:
        if e.begin != pos:
            raise bad(f"tensor {e.name!r} starts at byte {e.begin}, expected {pos} (overlapping or missing data)")
        pos = e.end
    if size != 8 + n + pos:
        problem = "truncated" if size < 8 + n + pos else "has trailing bytes"
        raise bad(f"{problem}: the header describes {8 + n + pos} bytes but the file has {size}")
    return Header(path, prefix + raw, metadata, {e.name: e for e in entries})


# ----- reading and writing bytes -----
def read_into(f, offset: int, buf) -> None:
    view, done = memoryview(buf), 0
    f.seek(offset)
    while done < len(view):
        got = f.readinto(view[done:])
        if not got:
            raise SafetensorsError(f"{f.name} ended early at byte {offset + done} (truncated while merging?).")
        done += got


def write_all(f, data) -> None:
    view = memoryview(data).cast("B")
    while len(view):
        view = view[f.write(view):]


def read_tensor(src, shard: Header, entry: Entry) -> torch.Tensor:
    """The tensor ``entry`` of ``shard`` read from the open file ``src`` into a fresh buffer."""
    dtype = DTYPES[entry.dtype][0]
    buf = bytearray(entry.nbytes)
    if not buf:
        return torch.empty(entry.shape, dtype=dtype)
    read_into(src, shard.data_start + entry.begin, buf)
    return torch.frombuffer(buf, dtype=dtype).view(entry.shape)


def tensor_bytes(t: torch.Tensor):
    return t.contiguous().reshape(-1).view(torch.uint8).numpy() if t.numel() else b""


def copy_range(src, dst, offset: int, count: int) -> None:
    """Copy ``count`` raw bytes from ``src`` at ``offset`` to ``dst``'s position, without decoding them."""
    copy_file_range = getattr(os, "copy_file_range", None)
    if copy_file_range is not None:
        try:
            while count:
                n = copy_file_range(src.fileno(), dst.fileno(), min(count, 1 << 30), offset)
                if n == 0:
                    raise SafetensorsError(f"{src.name} ended early at byte {offset} (truncated while merging?).")
                offset, count = offset + n, count - n
            return
        except OSError:  # not supported here (file system, kernel): copy through a buffer
            dst.seek(0, os.SEEK_END)
    buf = bytearray(min(count, CHUNK))
    while count:
        view = memoryview(buf)[:min(count, len(buf))]
        read_into(src, offset, view)
        write_all(dst, view)
        offset, count = offset + len(view), count - len(view)


def copy_cast(src, dst, shard: Header, entry: Entry, out_dtype: torch.dtype) -> None:
    """Cast a floating tensor chunk by chunk (never the whole tensor in memory)."""
    dtype, item = DTYPES[entry.dtype]
    per_chunk = max(CHUNK // item, 1)
    total = entry.nbytes // item
    buf = bytearray(min(total, per_chunk) * item)
    for start in range(0, total, per_chunk):
        n = min(per_chunk, total - start)
        view = memoryview(buf)[:n * item]
        read_into(src, shard.data_start + entry.begin + start * item, view)
        write_all(dst, tensor_bytes(torch.frombuffer(view, dtype=dtype).to(out_dtype)))


def header_bytes(entries, metadata: Optional[dict]) -> bytes:
    """The 8-byte length and JSON header for ``entries`` (``Entry`` objects, offsets as given) and ``metadata``,
    padded with spaces to a multiple of 8 bytes as safetensors writes it (keeps the data aligned)."""
    header = {} if metadata is None else {"__metadata__": metadata}
    header.update({e.name: {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [e.begin, e.end]}
                   for e in entries})
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw
