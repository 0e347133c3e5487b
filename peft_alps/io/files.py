"""Writing files and folders all-or-nothing: a temporary file or folder next to the target, then a rename."""

from __future__ import annotations

import contextlib
import os
import shutil
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


@contextlib.contextmanager
def staged_folder(out, stale=(), whole: bool = False):
    """``with staged_folder(out) as stage:`` write files into ``stage``, a temp folder next to ``out``.

    On success they land in ``out`` together: ``stage`` is renamed to ``out`` if ``out`` does not exist. An
    existing ``out`` is, with ``whole``, swapped out as a whole (moved aside, replaced by ``stage``, deleted only
    once the new one is in place); without, each staged file replaces its namesake in ``out`` (other files stay;
    the names in ``stale`` are removed, for files that would no longer match). On an exception ``out`` is
    untouched and ``stage`` is removed.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield stage
        names = sorted(p.name for p in stage.iterdir())
        mask = umask()
        os.chmod(stage, 0o777 & ~mask)  # mkdtemp/mkstemp create owner-only entries
        for name in names:  # folders made inside the stage with mkdir already have the umask's permissions
            if not (stage / name).is_dir():
                os.chmod(stage / name, 0o666 & ~mask)
        if not out.exists():
            os.rename(stage, out)
        elif whole:
            _swap_folder(stage, out)
        else:
            for name in names:
                os.replace(stage / name, out / name)
            for name in stale:
                with contextlib.suppress(FileNotFoundError):
                    (out / name).unlink()
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _swap_folder(stage: Path, out: Path) -> None:
    """Rename ``stage`` to the existing folder ``out``, which is moved aside first and deleted only on success."""
    trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
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
