"""Atomic file writes and hashing: nothing a stage produces is ever left half-written."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from pipeline.errors import NoSpaceError, is_no_space


def file_mode() -> int:
    """The mode a new file gets under the process's umask (`open` gives it; mkstemp and
    safetensors' writer give 0600 instead)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def _disk_full_named(path: Path) -> Iterator[None]:
    """A full disk while writing `path` surfaces as NoSpaceError naming `path` (one line for the
    user), whichever library reported it."""
    try:
        yield
    except NoSpaceError:
        raise  # already names the file being written (a writer nested in atomic_directory)
    except Exception as exc:
        if is_no_space(exc):
            raise NoSpaceError(path) from exc
        raise


@contextmanager
def atomic_open(path: Path | str, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary sibling of `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    with _disk_full_named(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, file_mode())  # mkstemp makes 0600; outputs should be shareable
    try:
        with _disk_full_named(path), os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    with atomic_open(path, "wb") as handle:
        handle.write(data)


def atomic_write_text(path: Path | str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path | str, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path | str, chunk_size: int = 1 << 20) -> str:
    return sha256_files([path], chunk_size)


def sha256_files(paths: Iterable[Path | str], chunk_size: int = 1 << 20) -> str:
    """One sha256 of the files' bytes end to end: a stream kept in shards hashes the same
    however it is cut."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            while chunk := handle.read(chunk_size):
                digest.update(chunk)
    return digest.hexdigest()


def fsync_path(path: Path | str) -> None:
    """Flush a file's or directory's entry to disk (a rename is durable only after this)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def old_sibling(target: Path) -> Path:
    """Where `atomic_directory` parks the previous directory during a swap."""
    return target.with_name(f".{target.name}.old")


@contextmanager
def atomic_directory(target: Path | str) -> Iterator[Path]:
    """Yield an empty temporary sibling to fill; if the block succeeds it replaces `target`,
    its files given the umask's mode whatever wrote them.

    The swap is two renames (target -> `.NAME.old`, temp -> target), so at every moment a
    complete directory exists: `target`, or `.NAME.old` if killed between the renames.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        with _disk_full_named(target):
            tmp.mkdir()
            yield tmp
            mode = file_mode()
            for path in tmp.rglob("*"):
                if path.is_file():
                    path.chmod(mode)  # libraries (safetensors) may write 0600
                fsync_path(path)
            fsync_path(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = old_sibling(target)
    if target.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(target, old)
    os.replace(tmp, target)
    fsync_path(target.parent)
    shutil.rmtree(old, ignore_errors=True)
