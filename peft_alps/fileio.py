"""Writing files all-or-nothing: a temporary file next to the target, then ``os.replace``."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def umask() -> int:
    """The process umask (read without changing it for longer than two calls)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path, mode: str = "w"):
    """``with atomic_write(path) as f: ...`` writes ``f`` to a temp file and moves it to ``path`` on success.

    On an exception the temp file is removed and ``path`` is untouched. The file gets the usual
    ``0o666 & ~umask`` permissions (``mkstemp`` alone would leave it owner-only).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
