"""Fetch the pipeline's source files: local mirrors first, then the URL, sha256 always checked."""

from __future__ import annotations

import io
import logging
import urllib.request
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from pipeline.errors import InputError
from pipeline.io import atomic_write_bytes, sha256_bytes, sha256_file
from pipeline.settings import Source

log = logging.getLogger("pipeline.data")


class DownloadError(RuntimeError):
    """No location gave a file with the expected sha256."""


def _extract_member(blob: bytes, member: str, origin: str) -> bytes:
    try:
        with zipfile.ZipFile(io.BytesIO(blob)) as archive:
            try:
                return archive.read(member)
            except KeyError:
                names = ", ".join(archive.namelist())
                raise InputError(
                    f"{origin}: zip has no member {member!r} (members: {names})"
                ) from None
    except zipfile.BadZipFile:
        raise InputError(f"{origin}: expected a zip archive holding {member!r}") from None


def _read_url(url: str, timeout: float) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def candidate_locations(
    source: Source, mirrors: Sequence[Path]
) -> list[tuple[str, Path | str, bool]]:
    """(description, path-or-url, is_zip) in the order they are tried."""
    name, url, member = source.name, source.url, source.member
    candidates: list[tuple[str, Path | str, bool]] = []
    for mirror in mirrors:
        candidates.append((f"mirror {Path(mirror) / name}", Path(mirror) / name, False))
        if member:
            archive = Path(mirror) / url.rstrip("/").rsplit("/", 1)[-1]
            candidates.append((f"mirror {archive}", archive, True))
    candidates.append((f"URL {url}", url, bool(member)))
    return candidates


def fetch_source(
    source: Source, dest: Path, mirrors: Sequence[Path] = (), timeout: float = 60.0
) -> Path:
    """Put the source's file at `dest`, verified against its sha256, written atomically.

    A mirror file with the wrong hash is reported and skipped, so a corrupted mirror falls through
    to the URL; when nothing matches, the error lists every location with its actual hash.
    """
    name, expected, member = source.name, source.sha256, source.member
    dest = Path(dest)
    if dest.is_file() and sha256_file(dest) == expected:
        return dest
    failures: list[str] = []
    for description, location, is_zip in candidate_locations(source, mirrors):
        if isinstance(location, Path) and not location.is_file():
            continue
        try:
            blob = (
                location.read_bytes()
                if isinstance(location, Path)
                else _read_url(location, timeout)
            )
            if is_zip:
                assert member is not None  # is_zip: the source names a zip member
                blob = _extract_member(blob, member, description)
        except (OSError, ValueError) as exc:
            failures.append(f"{description}: {exc}")
            log.warning("%s: %s", name, failures[-1])
            continue
        actual = sha256_bytes(blob)
        if actual != expected:
            what = f" (zip member {member})" if is_zip else ""
            failures.append(
                f"{description}{what}: sha256 mismatch: expected {expected}, got {actual}"
            )
            log.warning("%s: %s", name, failures[-1])
            continue
        atomic_write_bytes(dest, blob)
        log.info("%s: %s (%d bytes, sha256 ok) -> %s", name, description, len(blob), dest)
        return dest
    tried = "\n".join(f"  - {f}" for f in failures) or "  - no mirror holds it and no URL was tried"
    raise DownloadError(f"{dest}: could not get {name!r} with sha256 {expected}:\n{tried}")


def download_all(
    sources: Iterable[Source], raw_dir: Path, mirrors: Sequence[Path] = ()
) -> list[Path]:
    """Fetch every source into `raw_dir/<name>`; stops at the first source that fails."""
    return [fetch_source(s, Path(raw_dir) / s.name, mirrors) for s in sources]
