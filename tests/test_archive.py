import stat
import zipfile

import pytest

from captioning.data.archive import ArchiveImages, index_archive
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
    with pytest.raises(UnsafeArchiveError) as err:
        index_archive(archive)
    assert "evil.zip" in str(err.value) and why in str(err.value) and hostile in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.zip"]  # nothing was written anywhere


def test_symlink_entries_are_refused(tmp_path):
    target_name, info = symlink_entry("train2014/link.jpg", "/etc/passwd")
    archive = tmp_path / "link.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr(info, target_name)
    with pytest.raises(UnsafeArchiveError, match="symbolic link"):
        index_archive(archive)


def test_index_counts_files_and_images_per_top_level_folder(tmp_path):
    archive = make_zip(tmp_path / "a.zip", [("train2014/", b""), ("train2014/a.jpg", b"1"), ("train2014/b.PNG", b"2"),
                                            ("train2014/notes.txt", b"3"), ("annotations/c.json", b"{}")])
    assert index_archive(archive) == {"annotations": {"files": 1, "images": 0},
                                      "train2014": {"files": 3, "images": 2}}


def test_images_are_read_by_member_without_extracting(tmp_path):
    archive = make_zip(tmp_path / "a.zip", [("train2014/a.jpg", b"one"), ("train2014/b.jpg", b"two")])
    images = ArchiveImages({"train2014": archive})
    assert images.read("train2014/b.jpg") == b"two" and images.read("train2014/a.jpg") == b"one"
    for missing in ("train2014/c.jpg", "val2014/a.jpg", "train2014/../a.jpg"):
        with pytest.raises(FileNotFoundError):
            images.read(missing)
        assert images.read_or_empty(missing) == b""
    assert images.where("train2014/a.jpg") == "a.zip:train2014/a.jpg"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.zip"]


def test_a_damaged_member_is_an_error_naming_the_archive(tmp_path):
    archive = make_zip(tmp_path / "a.zip", [("train2014/a.jpg", b"x" * 1000)])
    data = bytearray(archive.read_bytes())
    at = data.index(b"x" * 1000)
    data[at:at + 10] = b"y" * 10  # the stored bytes no longer match their CRC
    archive.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"a.zip:train2014/a.jpg"):
        ArchiveImages({"train2014": archive}).read("train2014/a.jpg")


def test_not_a_zip(tmp_path):
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"<html>not a zip</html>")
    with pytest.raises(DataError, match="bad.zip: not a valid zip archive"):
        index_archive(bad)


def test_a_broken_deflate_stream_is_an_error_naming_the_member(tmp_path):
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("train2014/a.jpg", bytes(range(256)) * 64)
    data = bytearray(archive.read_bytes())
    start = 30 + len("train2014/a.jpg")  # the member's deflate stream follows its local header
    data[start:start + 16] = b"\xff" * 16
    archive.write_bytes(bytes(data))
    images = ArchiveImages({"train2014": archive})
    with pytest.raises(DataError, match=r"a.zip:train2014/a.jpg: "):
        images.read("train2014/a.jpg")
    assert images.read_or_empty("train2014/a.jpg") == b""


def test_the_decoding_pipeline_opens_each_archive_once_not_per_image(tmp_path):
    """COCO's train2014.zip has 82,783 entries: parsing its directory per image would cost hours."""
    import io

    from PIL import Image

    from captioning.features import image_dataset

    buf = io.BytesIO()
    Image.new("RGB", (32, 24), (200, 10, 10)).save(buf, format="JPEG")
    archive = make_zip(tmp_path / "a.zip", [(f"train2014/{i}.jpg", buf.getvalue()) for i in range(64)])
    images = ArchiveImages({"train2014": archive})
    seen = sum(int(idx.shape[0]) for idx, _ in image_dataset([f"train2014/{i}.jpg" for i in range(64)], 8,
                                                              source=images))
    assert seen == 64
    assert images.opened == 1


def test_archives_that_expand_too_far_are_refused_naming_them(tmp_path):
    """Issue 14, point 2: a ~200 KB zip of one 200 MB entry (deflated zeros) is refused from its directory,
    before a byte is inflated; a total over data.max_expanded_bytes likewise."""
    bomb = tmp_path / "train2014.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        with zf.open("train2014/zeros.jpg", "w", force_zip64=True) as fh:
            for _ in range(200):
                fh.write(bytes(1 << 20))
    assert bomb.stat().st_size < 300_000
    with pytest.raises(UnsafeArchiveError, match=r"train2014.zip: entry 'train2014/zeros.jpg' expands \d+ bytes to "
                       r"209715200 \(over data.max_expansion_ratio=200\); refusing the archive"):
        index_archive(bomb)
    assert index_archive(bomb, max_ratio=5000) == {"train2014": {"files": 1, "images": 1}}

    plain = make_zip(tmp_path / "val2014.zip", [("val2014/a.jpg", b"x" * 4000), ("val2014/b.jpg", b"y" * 4000)])
    with pytest.raises(UnsafeArchiveError, match=r"val2014.zip: its entries expand to 8000 bytes, over "
                       r"data.max_expanded_bytes=5000; refusing the archive"):
        index_archive(plain, max_bytes=5000)


def test_duplicate_member_names_refuse_the_archive_by_name(tmp_path):
    """Issue 27, case 8: a second member under the same name won silently (zipfile reads the later one), so a
    caption file or an image could be replaced unseen and the counts were wrong."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zipfile's "Duplicate name" warning: that is the point
        archive = make_zip(tmp_path / "dup.zip", [("train2014/a.jpg", b"real"), ("train2014/b.jpg", b"b"),
                                                  ("train2014/a.jpg", b"hijacked")])
    with pytest.raises(UnsafeArchiveError, match=r"dup.zip: entry 'train2014/a.jpg' appears more than once"):
        index_archive(archive)
