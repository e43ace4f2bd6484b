import errno
import os

import pytest

from pipeline.errors import NoSpaceError
from pipeline.io import atomic_directory, atomic_open, atomic_write_text, sha256_file, sha256_files


def test_atomic_files_get_the_umask_mode_not_0600(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "a.txt"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError), atomic_open(target, "w") as handle:
        handle.write("half of the new cont")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_atomic_directory_replaces_only_on_success(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_directory(target) as tmp:
        (tmp / "f").write_text("1")
    with pytest.raises(RuntimeError), atomic_directory(target) as tmp:
        (tmp / "f").write_text("2")
        raise RuntimeError("killed")
    assert (target / "f").read_text() == "1"
    with atomic_directory(target) as tmp:
        (tmp / "f").write_text("3")
    assert (target / "f").read_text() == "3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_a_full_disk_is_one_error_naming_the_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    atomic_write_text(target, "old")

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(NoSpaceError) as raised:
        atomic_write_text(target, "new")
    message = str(raised.value)
    assert message.startswith(f"no space left on device writing {target} (")
    assert message.endswith(
        "MB free there); free some space there, or write to another disk (paths.* for the "
        "stages), and run again"
    )
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == [target.name]

    def io_error(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", io_error)
    with pytest.raises(OSError) as other:
        atomic_write_text(target, "new")
    assert not isinstance(other.value, NoSpaceError)  # only a full disk is reworded


def test_a_full_disk_inside_an_atomic_directory_names_the_innermost_file(tmp_path, monkeypatch):
    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(NoSpaceError) as raised, atomic_directory(tmp_path / "tokens") as tmp:
        monkeypatch.setattr(os, "fsync", disk_full)
        atomic_write_text(tmp / "meta.json", "{}")
    assert raised.value.filename == str(tmp / "meta.json")
    assert not (tmp_path / "tokens").exists() and not list(tmp_path.iterdir())


def test_a_stream_in_shards_hashes_the_same_however_it_is_cut(tmp_path):
    """The val tokens' identity (`eval_data_sha256`) does not depend on `prepare.shard_tokens`."""
    data = bytes(range(256)) * 5000
    whole, cut = tmp_path / "whole.bin", [tmp_path / f"part-{i}.bin" for i in range(3)]
    whole.write_bytes(data)
    for path, start, end in zip(cut, (0, 7, 1 << 20), (7, 1 << 20, len(data)), strict=True):
        path.write_bytes(data[start:end])
    assert sha256_files(cut) == sha256_files([whole]) == sha256_file(whole)
    assert sha256_files(cut[::-1]) != sha256_file(whole)
