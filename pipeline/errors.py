"""What the command line reports as one line instead of a traceback.

`InputError` is every check of ours that rejects a value: a config key, a data record, a
checkpoint, an argument. It is a `ValueError`, so callers may catch it as one; a `ValueError`
that is not an `InputError` (raised inside a library, or by a bug) keeps its traceback.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path


class InputError(ValueError):
    """A value given to the pipeline (config, data, checkpoint, argument) that it rejects; the
    message names the key, file or record and what was expected."""


class NoSpaceError(OSError):
    """The disk filled up while writing `path`: said in one line with the free space left, not
    as the OSError or safetensors' SafetensorError (not an OSError) that reported it."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    def __str__(self) -> str:
        """Read when shown, after the writer has removed its partial file."""
        free_bytes = _free_bytes(Path(self.filename))
        free = f" ({free_bytes / 1e6:,.1f} MB free there)" if free_bytes is not None else ""
        return (
            f"no space left on device writing {self.filename}{free}; free some space there, or "
            "write to another disk (paths.* for the stages), and run again"
        )


def _free_bytes(path: Path) -> int | None:
    """Free bytes on the file system holding `path` (its nearest existing parent)."""
    for folder in (path, *path.parents):
        if folder.exists():
            try:
                return shutil.disk_usage(folder).free
            except OSError:
                return None
    return None


def is_no_space(exc: BaseException) -> bool:
    """Whether `exc` reports a full disk: an ENOSPC OSError, or safetensors' SafetensorError
    (which wraps the OS error in its message)."""
    if isinstance(exc, OSError):
        return exc.errno == errno.ENOSPC
    return type(exc).__name__ == "SafetensorError" and "No space left on device" in str(exc)


def last_error_line(log: str | os.PathLike[str]) -> str | None:
    """Why a failed command's `log` says it failed: its last `error:` line (the one line
    `cli.main` prints for what the user can fix), else its last line (a bug's traceback ends
    with the exception); None for a log that is missing or empty."""
    try:
        text = Path(log).read_text(errors="replace")
    except OSError:
        return None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    return (errors or lines)[-1] if lines else None
