import zipfile
from dataclasses import replace

import pytest

from pipeline.data.download import DownloadError, download_all, fetch_source
from pipeline.io import sha256_file
from pipeline.settings.load import typed_config


def test_mirror_file_is_copied_and_verified(tmp_path, mirror, sources):
    dest = tmp_path / "raw" / "the-verdict.txt"
    fetch_source(sources["the-verdict.txt"], dest, [tmp_path / "absent", mirror])
    assert sha256_file(dest) == sources["the-verdict.txt"].sha256
    assert [p.name for p in dest.parent.iterdir()] == ["the-verdict.txt"]  # no temp files left


def test_nested_names_and_all_sources(tmp_path, mirror, default_config):
    files = download_all(typed_config(default_config).data.sources, tmp_path, [mirror])
    assert (tmp_path / "gpt2-bpe" / "vocab.bpe") in files
    assert all(f.is_file() for f in files)


def test_corrupted_mirror_names_file_and_both_hashes(tmp_path, sources):
    source = replace(sources["the-verdict.txt"], url=(tmp_path / "nowhere.txt").as_uri())
    bad_mirror = tmp_path / "mirror"
    bad_mirror.mkdir()
    (bad_mirror / "the-verdict.txt").write_text("not the verdict")
    dest = tmp_path / "raw" / "the-verdict.txt"
    with pytest.raises(DownloadError) as err:
        fetch_source(source, dest, [bad_mirror])
    message = str(err.value)
    assert str(dest) in message
    assert str(bad_mirror / "the-verdict.txt") in message
    assert f"expected {source.sha256}" in message
    assert f"got {sha256_file(bad_mirror / 'the-verdict.txt')}" in message
    assert "nowhere.txt" in message  # the URL was tried after the mirror
    assert not dest.exists()


def test_corrupted_mirror_falls_through_to_url(tmp_path, mirror, sources):
    bad_mirror = tmp_path / "mirror"
    bad_mirror.mkdir()
    (bad_mirror / "the-verdict.txt").write_text("corrupted")
    source = replace(sources["the-verdict.txt"], url=(mirror / "the-verdict.txt").as_uri())
    dest = fetch_source(source, tmp_path / "out.txt", [bad_mirror])
    assert sha256_file(dest) == source.sha256


def test_zip_member_from_url_is_extracted_and_verified(tmp_path, mirror, sources):
    archive = tmp_path / "sms+spam+collection.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.write(mirror / "SMSSpamCollection", "SMSSpamCollection")
        z.write(mirror / "SMSSpamCollection.readme", "readme")
    source = replace(sources["SMSSpamCollection"], url=archive.as_uri())
    dest = fetch_source(source, tmp_path / "raw" / "SMSSpamCollection", mirrors=[])
    assert sha256_file(dest) == source.sha256
    # the zip itself found in a mirror under its URL's file name works too
    dest2 = fetch_source(
        replace(source, url="https://example.invalid/sms+spam+collection.zip"),
        tmp_path / "raw2" / "SMSSpamCollection",
        mirrors=[tmp_path],
    )
    assert sha256_file(dest2) == source.sha256


def test_zip_without_the_member_lists_members(tmp_path, sources):
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("other.txt", "x")
    source = replace(sources["SMSSpamCollection"], url=archive.as_uri())
    with pytest.raises(
        DownloadError, match=r"no member 'SMSSpamCollection' \(members: other.txt\)"
    ):
        fetch_source(source, tmp_path / "x", mirrors=[])


def test_existing_good_file_is_kept_and_bad_one_replaced(tmp_path, mirror, sources):
    source = sources["the-verdict.txt"]
    dest = fetch_source(source, tmp_path / "v.txt", [mirror])
    mtime = dest.stat().st_mtime_ns
    fetch_source(source, dest, [mirror])
    assert dest.stat().st_mtime_ns == mtime
    dest.write_text("damaged")
    fetch_source(source, dest, [mirror])
    assert sha256_file(dest) == source.sha256


def test_failed_fetch_keeps_the_previous_file(tmp_path, sources):
    dest = tmp_path / "v.txt"
    dest.write_text("previous content")
    source = replace(sources["the-verdict.txt"], url=(tmp_path / "missing").as_uri())
    with pytest.raises(DownloadError):
        fetch_source(source, dest, [])
    assert dest.read_text() == "previous content"
