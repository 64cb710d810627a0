"""Atomic writes: a file or folder appears whole under its final name, or not at all.

Each helper writes beside the target (same folder, so the final rename stays on one filesystem),
then renames over it. `durable=True` also fsyncs the data and the folder, for writes whose
callers promise they survive a power cut (index versions, the CURRENT pointer, checkpoints).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

# mkstemp makes 0600; the files written here are read by services that may run as another user
FILE_MODE = 0o644


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a platform without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike, durable: bool = False) -> Iterator[Path]:
    """A temporary path beside `path` for a writer that wants a file name (torch.onnx.export,
    np.save); renamed over `path` when the block ends without an error, removed otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the name cut short: a temp name must fit the 255-byte limit that `path.name` may already fill
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name[:32]}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, FILE_MODE)
        if durable:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if durable:
            _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb",
                durable: bool = False) -> Iterator[IO]:
    """An open file beside `path` ('wb' or 'w'), renamed over `path` when the block ends without
    an error."""
    with atomic_path(path, durable=durable) as tmp, open(tmp, mode) as f:
        yield f
        f.flush()


def write_atomic(path: str | os.PathLike, data: bytes | str, durable: bool = False) -> None:
    """`data` as the whole content of `path`, atomically."""
    with atomic_file(path, "w" if isinstance(data, str) else "wb", durable=durable) as f:
        f.write(data)


@contextmanager
def atomic_dir(path: str | os.PathLike, durable: bool = False,
               replace: bool = False) -> Iterator[Path]:
    """A temporary folder beside `path`, renamed to `path` when the block ends without an error,
    removed otherwise. replace=True removes an existing `path` first (an incomplete leftover);
    otherwise an existing `path` is an error (OSError from the rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=".tmp-"))
    try:
        yield tmp
        if durable:
            for p in tmp.rglob("*"):
                if p.is_file():
                    with open(p, "rb") as f:
                        os.fsync(f.fileno())
        if replace and path.exists():
            shutil.rmtree(path)
        os.rename(tmp, path)
        if durable:
            _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
