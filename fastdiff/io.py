"""Durable, atomic file writes: write a temporary file in the same folder, fsync it, os.replace it over the
target, fsync the folder. A reader (or a run killed at any instant, or a power cut) sees the old file or the
new one, never half of one. A full disk or a folder that turned read-only becomes a one-line FastdiffError
naming the file and the space it needs; the old file is left as it was.
"""
from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from fastdiff.errors import FastdiffError

# errno values that mean "this folder cannot take the write", as opposed to a bug
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def write_error(path: Path, err: OSError, needed: int | None) -> FastdiffError:
    """The one-line error for an OSError while writing `path` (`needed` bytes, when known)."""
    try:
        free = shutil.disk_usage(path.parent if path.parent.exists() else Path.cwd()).free
    except OSError:
        free = None
    what = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
            errno.EROFS: "the folder is on a read-only filesystem"}.get(err.errno, err.strerror or str(err))
    space = "" if needed is None else f" (needs {_mb(needed)}" + ("" if free is None else f", {_mb(free)} free") + ")"
    return FastdiffError(f"cannot write {str(path)!r}: {what}{space}; free space or make it writable and re-run "
                         "the same command (the previous checkpoint and every finished row are intact)")


def fsync_dir(folder: Path) -> None:
    """Make a rename or a new file in `folder` durable (no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory; the rename itself is still atomic
    finally:
        os.close(fd)


@contextmanager
def write_errors(path: str | os.PathLike, needed: int | None = None):
    """Turn an OSError of a full or read-only disk inside the block into the one-line FastdiffError for `path`
    (`needed` bytes, when known); other OSErrors pass through."""
    try:
        yield
    except OSError as err:
        if err.errno in WRITE_ERRNOS:
            raise write_error(Path(path), err, needed) from None
        raise


@contextmanager
def atomic_path(path: str | os.PathLike, needed: int | None = None, previous: Path | None = None):
    """Yield a temporary path next to `path`; on success it is fsynced and replaces `path` atomically.

    `needed` (bytes) goes into the message if the write fails for lack of space. With `previous`, the file being
    replaced is first moved there, once the new one is complete on disk (a kill in between leaves `previous` and
    the temporary file, never half a file).
    """
    path = Path(path)
    tmp = None
    try:
        with write_errors(path, needed):
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            os.close(fd)
            os.chmod(tmp, 0o644)  # mkstemp makes 0600; results and checkpoints are meant to be shared
            yield Path(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            if previous is not None and path.exists():
                os.replace(path, previous)
            os.replace(tmp, path)
            fsync_dir(path.parent)
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def write_bytes(path, data: bytes) -> None:
    with atomic_path(path, needed=len(data)) as tmp:
        tmp.write_bytes(data)


def write_text(path, text: str) -> None:
    write_bytes(path, text.encode())


def sha256_file(path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextmanager
def staged_folder(path: str | os.PathLike):
    """Yield a temporary folder beside `path`; on success it replaces `path` (an older folder there is removed
    first), on any error it is removed: a reader never sees half a folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(path, err, None) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def cache_dir() -> Path:
    """Where fastdiff caches what it measures or trains once per machine (classifier weights, reference statistics,
    the attention dispatch table): $FASTDIFF_CACHE or ~/.cache/fastdiff."""
    return Path(os.environ.get("FASTDIFF_CACHE") or Path.home() / ".cache" / "fastdiff")
