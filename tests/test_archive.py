import stat
import zipfile

import pytest

from captioning.data.archive import safe_extract
from captioning.errors import DataError, UnsafeArchiveError


def make_zip(path, entries):
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in entries:
            if isinstance(data, zipfile.ZipInfo):
                zf.writestr(data, name)
            else:
                zf.writestr(name, data)
    return path


def symlink_entry(name, target):
    info = zipfile.ZipInfo(name)
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return target, info


@pytest.mark.parametrize(
    "hostile, why",
    [
        ("../escape.txt", "points outside the target folder"),
        ("train2014/../../escape.txt", "points outside the target folder"),
        ("/tmp/absolute.txt", "absolute path"),
        ("C:/windows.txt", "absolute path"),
    ],
)
def test_hostile_entries_refuse_the_whole_archive(tmp_path, hostile, why):
    archive = make_zip(tmp_path / "evil.zip", [("train2014/ok.jpg", b"fine"), (hostile, b"pwned")])
    target = tmp_path / "work" / "extracted"
    with pytest.raises(UnsafeArchiveError) as err:
        safe_extract(archive, target, "sha")
    assert "evil.zip" in str(err.value) and why in str(err.value) and hostile in str(err.value)
    # nothing was written: not the good entry, not the hostile one
    assert not (target / "train2014").exists()
    assert not (tmp_path / "work" / "escape.txt").exists() and not (tmp_path / "escape.txt").exists()


def test_symlink_entries_are_refused(tmp_path):
    target_name, info = symlink_entry("train2014/link.jpg", "/etc/passwd")
    archive = tmp_path / "link.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr(info, target_name)
    with pytest.raises(UnsafeArchiveError, match="symbolic link"):
        safe_extract(archive, tmp_path / "out", "sha")


def test_extraction_is_idempotent(tmp_path):
    archive = make_zip(tmp_path / "a.zip", [("train2014/a.jpg", b"1"), ("train2014/b.jpg", b"2")])
    target = tmp_path / "out"
    assert safe_extract(archive, target, "sha-1") == ["train2014"]
    (target / "train2014" / "a.jpg").write_bytes(b"touched")
    safe_extract(archive, target, "sha-1")  # same archive: nothing extracted again
    assert (target / "train2014" / "a.jpg").read_bytes() == b"touched"
    safe_extract(archive, target, "sha-2")  # another archive version: extracted afresh
    assert (target / "train2014" / "a.jpg").read_bytes() == b"1"
    assert not list(target.glob(".staging*"))


def test_not_a_zip(tmp_path):
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"<html>not a zip</html>")
    with pytest.raises(DataError, match="bad.zip: not a valid zip archive"):
        safe_extract(bad, tmp_path / "out", "sha")
