"""Downloads against real servers on loopback: an HTTP mirror and a GCS emulator."""

import hashlib
import socket
from pathlib import Path

import pytest

from captioning.data.fetch import download
from captioning.errors import DownloadError

ZIP = "zips/train2014.zip"


def sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_http_download_is_verified_and_idempotent(http_mirror, small_mirror, tmp_path):
    source = Path(small_mirror["root"]) / ZIP
    dest = tmp_path / "train2014.zip"
    record = download(f"{http_mirror.url}/{ZIP}", dest, retries=0)
    assert record.downloaded and record.size == source.stat().st_size
    assert record.sha256 == sha(source) == sha(dest)
    assert not dest.with_name(dest.name + ".part").exists()

    before = len(http_mirror.requests)
    again = download(f"{http_mirror.url}/{ZIP}", dest, retries=0)
    assert not again.downloaded and again.sha256 == record.sha256
    # one HEAD, to see that the ETag is still the one verified; no byte transferred
    assert [(r.method, r.body_bytes) for r in http_mirror.requests[before:]] == [("HEAD", 0)]


def test_interrupted_transfer_resumes_with_range(http_mirror, small_mirror, tmp_path):
    size = (Path(small_mirror["root"]) / ZIP).stat().st_size
    cut = size // 3
    http_mirror.fault(f"/{ZIP}", ("cut", cut))
    dest = tmp_path / "train2014.zip"
    record = download(f"{http_mirror.url}/{ZIP}", dest, retries=2, backoff_s=0)
    assert record.sha256 == sha(Path(small_mirror["root"]) / ZIP)
    gets = [r for r in http_mirror.requests if r.method == "GET"]
    assert len(gets) == 2 and gets[0].range is None and gets[1].status == 206
    resumed_at = int(gets[1].range.removeprefix("bytes=").rstrip("-"))
    assert cut - 65536 < resumed_at <= cut  # kept what arrived, up to one network read
    assert sum(g.body_bytes for g in gets) < size + 65536


def test_transient_errors_are_retried(http_mirror, tmp_path):
    http_mirror.fault("/zips/val2014.zip", ("status", 503), ("status", 502))
    record = download(f"{http_mirror.url}/zips/val2014.zip", tmp_path / "v.zip", retries=3, backoff_s=0)
    assert record.downloaded
    statuses = [r.status for r in http_mirror.requests if r.method == "GET"]
    assert statuses == [503, 502, 200]


def test_retries_run_out_with_a_clear_error(http_mirror, tmp_path):
    http_mirror.fault("/zips/val2014.zip", *[("status", 503)] * 3)
    with pytest.raises(DownloadError, match=r"val2014.zip: giving up after 2 retries: .*HTTP 503"):
        download(f"{http_mirror.url}/zips/val2014.zip", tmp_path / "v.zip", retries=2, backoff_s=0)


def test_missing_file_and_wrong_checksum(http_mirror, tmp_path):
    with pytest.raises(DownloadError, match=r"zips/nope.zip: HTTP 404"):
        download(f"{http_mirror.url}/zips/nope.zip", tmp_path / "n.zip", retries=0)
    with pytest.raises(DownloadError, match="checksum mismatch"):
        download(f"{http_mirror.url}/{ZIP}", tmp_path / "t.zip", expected_sha256="0" * 64, retries=0)
    assert not (tmp_path / "t.zip").exists()


def test_unreachable_host_names_the_url(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DownloadError, match=rf"127.0.0.1:{port}/x.zip: giving up after 1 retries"):
        download(f"http://127.0.0.1:{port}/x.zip", tmp_path / "x.zip", retries=1, backoff_s=0, timeout_s=2)


def test_file_url_and_plain_path_resume(small_mirror, tmp_path):
    source = Path(small_mirror["root"]) / ZIP
    dest = tmp_path / "a.zip"
    part = dest.with_name("a.zip.part")
    part.write_bytes(source.read_bytes()[:1000])  # an earlier, interrupted copy
    record = download(source.as_uri(), dest)
    assert record.sha256 == sha(source)
    record = download(str(source), tmp_path / "b.zip")
    assert record.sha256 == sha(source)
    with pytest.raises(DownloadError, match="nowhere.zip: file not found"):
        download(str(tmp_path / "nowhere.zip"), tmp_path / "c.zip")


def test_gcs_download_through_the_emulator(gcs_emulator, small_mirror, tmp_path):
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    client = storage.Client(project="test", credentials=AnonymousCredentials())
    bucket = client.create_bucket("coco-mirror")
    source = Path(small_mirror["root"]) / ZIP
    bucket.blob(ZIP).upload_from_filename(str(source))

    dest = tmp_path / "g.zip"
    part = dest.with_name("g.zip.part")
    part.write_bytes(source.read_bytes()[:5000])  # resume from an offset
    record = download(f"gs://coco-mirror/{ZIP}", dest)
    assert record.size == source.stat().st_size and record.sha256 == sha(source)
    with pytest.raises(DownloadError, match="gs://coco-mirror/zips/missing.zip: object not found"):
        download("gs://coco-mirror/zips/missing.zip", tmp_path / "m.zip")


# ------------------------------------------------------------------ issue 14, point 3: nothing unverified is trusted


def _zip_check(path):
    from captioning.data.archive import check_archive

    check_archive(path)


def test_a_page_served_as_a_zip_is_never_marked_verified_and_a_fixed_source_is_fetched(http_mirror, small_mirror,
                                                                                       tmp_path):
    import json

    bad_root = tmp_path / "bad-mirror" / "zips"
    bad_root.mkdir(parents=True)
    (bad_root / "train2014.zip").write_text("<html><body>Please log in</body></html>")
    dest = tmp_path / "cache" / "train2014.zip"
    for _ in range(2):  # the failure repeats: nothing of it was kept
        with pytest.raises(DownloadError, match=r"train2014.zip: downloaded as train2014.zip, but it failed the "
                           r"check: .*not a valid zip archive"):
            download(str(bad_root / "train2014.zip"), dest, retries=0, check=_zip_check)
        assert sorted(p.name for p in dest.parent.iterdir()) == []
    record = download(f"{http_mirror.url}/{ZIP}", dest, retries=0, check=_zip_check)  # base_url fixed
    assert record.downloaded and record.sha256 == sha(Path(small_mirror["root"]) / ZIP)
    side = json.loads(dest.with_name(dest.name + ".verified.json").read_text())
    assert side["source"] == f"{http_mirror.url}/{ZIP}" and side["validators"]["etag"].startswith('"')
    assert "last_modified" in side["validators"]


def test_a_changed_source_or_another_source_downloads_again(small_mirror, tmp_path):
    from helpers.http_mirror import HttpMirror

    root = tmp_path / "mirror"
    (root / "zips").mkdir(parents=True)
    served = root / ZIP
    served.write_bytes((Path(small_mirror["root"]) / ZIP).read_bytes())
    dest = tmp_path / "train2014.zip"
    with HttpMirror(root) as server:
        download(f"{server.url}/{ZIP}", dest, retries=0, check=_zip_check)
        served.write_bytes((Path(small_mirror["root"]) / "zips/val2014.zip").read_bytes())  # a new version
        record = download(f"{server.url}/{ZIP}", dest, retries=0, check=_zip_check)
        assert record.downloaded and sha(dest) == sha(served)
    other = tmp_path / "elsewhere.zip"
    other.write_bytes((Path(small_mirror["root"]) / ZIP).read_bytes())
    record = download(str(other), dest, retries=0, check=_zip_check)  # same name, another source
    assert record.downloaded and sha(dest) == sha(other)


def test_a_partial_copy_of_an_older_version_is_not_resumed(small_mirror, tmp_path):
    """The server's If-Range check and our own record of where the .part came from: a changed file restarts
    from zero instead of gluing two versions together (which once passed the size check and failed with CRC
    errors on every later run)."""
    from helpers.http_mirror import HttpMirror

    root = tmp_path / "mirror"
    (root / "zips").mkdir(parents=True)
    served = root / ZIP
    old = (Path(small_mirror["root"]) / ZIP).read_bytes()
    served.write_bytes(old)
    dest = tmp_path / "train2014.zip"
    with HttpMirror(root) as server:
        server.fault(f"/{ZIP}", ("cut", len(old) // 2))
        with pytest.raises(DownloadError, match="giving up after 0 retries"):
            download(f"{server.url}/{ZIP}", dest, retries=0, check=_zip_check)
        assert dest.with_name(dest.name + ".part").stat().st_size > 0
        new = bytearray(old)
        new[len(old) // 2 + 10 :] = bytes(len(old) - len(old) // 2 - 10)  # same size, later half changed
        served.write_bytes(bytes(new))
        with pytest.raises(DownloadError, match="failed the check"):  # the new version is not a valid zip...
            download(f"{server.url}/{ZIP}", dest, retries=0, check=_zip_check)
        gets = [r for r in server.requests if r.method == "GET"]
        assert gets[-1].range is None  # ...but it was fetched whole: the old half was not resumed
        assert gets[-1].body_bytes == len(old)

        # The server alone also guards it: a Range with a stale If-Range gets the whole file.
        served.write_bytes(old)
        server.fault(f"/{ZIP}", ("cut", len(old) // 2))
        with pytest.raises(DownloadError):
            download(f"{server.url}/{ZIP}", dest, retries=0, check=_zip_check)
        served.write_bytes(bytes(new))
        part_meta = dest.with_name(dest.name + ".part.json")
        import json

        meta = json.loads(part_meta.read_text())
        meta["validators"] = {}  # as a record that could not tell: only If-Range is left
        part_meta.write_text(json.dumps(meta))
        served.write_bytes(old)  # back to the version the .part holds: resumed with If-Range, which matches
        record = download(f"{server.url}/{ZIP}", dest, retries=0, check=_zip_check)
        assert record.downloaded and sha(dest) == sha(served)


def test_a_trickling_server_is_stopped_by_the_transfer_time_limit(http_mirror, tmp_path):
    import time

    http_mirror.fault("/zips/val2014.zip", ("trickle", 50))
    started = time.monotonic()
    with pytest.raises(DownloadError, match=r"val2014.zip: not finished within data.transfer_timeout_s=2s "
                       r"\(\d+ bytes received\)"):
        download(f"{http_mirror.url}/zips/val2014.zip", tmp_path / "v.zip", retries=3, timeout_s=30,
                 transfer_timeout_s=2)
    assert time.monotonic() - started < 15


def test_a_verified_copy_is_used_when_the_source_cannot_be_asked_and_old_records_are_adopted(small_mirror,
                                                                                           tmp_path):
    import json

    source = tmp_path / "mirror.zip"
    source.write_bytes((Path(small_mirror["root"]) / ZIP).read_bytes())
    dest = tmp_path / "cache" / "train2014.zip"
    first = download(str(source), dest, retries=0, check=_zip_check)
    side_path = dest.with_name(dest.name + ".verified.json")
    side = json.loads(side_path.read_text())
    side.pop("validators")  # as a version before validators wrote it
    side_path.write_text(json.dumps(side))
    again = download(str(source), dest, retries=0, check=_zip_check)
    assert not again.downloaded and "validators" in json.loads(side_path.read_text())  # adopted, not fetched
    source.unlink()  # the mirror is gone (or refuses the HEAD): the verified copy still serves
    offline = download(str(source), dest, retries=0, check=_zip_check)
    assert not offline.downloaded and offline.sha256 == first.sha256


def test_whatever_the_check_raises_the_download_is_discarded(small_mirror, tmp_path):
    def library_bug(path):
        raise NotImplementedError("zip version 200")  # what zipfile raises for some damaged directories

    dest = tmp_path / "train2014.zip"
    with pytest.raises(DownloadError, match="failed the check: NotImplementedError: zip version 200"):
        download(str(Path(small_mirror["root"]) / ZIP), dest, retries=0, check=library_bug)
    assert list(tmp_path.iterdir()) == []


def test_passwords_with_at_signs_and_quotes_are_redacted():
    from captioning.redact import redact

    assert redact("http://u:p@ss@host/x") == "http://u:***@host/x"
    assert redact("fetch http://u:pa\"s's@h:80/x failed") == "fetch http://u:***@h:80/x failed"
    assert redact("gs://bucket/a@b and http://h/x@y") == "gs://bucket/a@b and http://h/x@y"


def test_an_archive_damaged_after_its_check_loses_its_mark_everywhere_and_is_fetched_again(small_mirror, tmp_path):
    """Issue 14, point 3: a member failing to read later (the file rotted or was changed in place, its mtime
    put back) skips that image, names the archive, and withdraws the verified mark of every hard link
    (the shared download cache's copy too): the next download fetches it afresh."""
    import os
    import zipfile

    from captioning.data.archive import ArchiveImages, read_member
    from captioning.data.fetch import verified_record
    from captioning.errors import DataError

    source = Path(small_mirror["root"]) / ZIP
    cached = tmp_path / "cache" / "train2014.zip"
    download(str(source), cached, retries=0, check=_zip_check)
    artifact = tmp_path / "raw" / "train2014.zip"
    artifact.parent.mkdir()
    os.link(cached, artifact)  # what log_raw_data places from a cache on the same volume
    (artifact.parent / (artifact.name + ".verified.json")).write_bytes(
        (cached.parent / (cached.name + ".verified.json")).read_bytes())
    assert verified_record(cached) and verified_record(artifact)

    with zipfile.ZipFile(artifact) as zf:
        info = next(i for i in zf.infolist() if i.file_size > 1000)
    stat = artifact.stat()
    data = bytearray(artifact.read_bytes())
    at = info.header_offset + 30 + len(info.filename) + len(info.extra) + 200
    data[at:at + 8] = bytes(b ^ 0xFF for b in data[at:at + 8])  # bit rot inside one member
    artifact.write_bytes(bytes(data))
    os.utime(artifact, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and nothing to see from outside
    assert verified_record(cached) and verified_record(artifact)

    images = ArchiveImages({"train2014": artifact})
    with pytest.raises(DataError, match=rf"train2014.zip:{info.filename}: "):
        images.read(info.filename)
    assert verified_record(artifact) is None and verified_record(cached) is None
    with pytest.raises(DataError, match=rf"{artifact}: cannot read {info.filename} \(caption file\): .*; "
                       "train2014.zip is damaged; its verified mark is withdrawn, so the next log_raw_data "
                       "downloads it again"):
        read_member(artifact, info.filename, "caption file")
    record = download(str(source), cached, retries=0, check=_zip_check)
    assert record.downloaded and sha(cached) == sha(source)


def test_a_server_with_weak_etags_resumes_by_its_last_modified_date(small_mirror, tmp_path):
    """A weak ETag (W/"...") never matches in If-Range, so sending it would restart every resume from zero."""
    from helpers.http_mirror import HttpMirror

    size = (Path(small_mirror["root"]) / ZIP).stat().st_size
    with HttpMirror(Path(small_mirror["root"])) as server:
        server.state.weak_etags = True
        server.fault(f"/{ZIP}", ("cut", size // 2))
        record = download(f"{server.url}/{ZIP}", tmp_path / "train2014.zip", retries=1, backoff_s=0)
        gets = [r for r in server.requests if r.method == "GET"]
    assert record.sha256 == sha(Path(small_mirror["root"]) / ZIP)
    assert len(gets) == 2 and gets[1].status == 206
    assert gets[1].if_range.endswith(" GMT")  # the Last-Modified date, not W/"..."
    assert sum(g.body_bytes for g in gets) < size + 65536


def test_a_server_sending_more_than_it_declared_is_stopped_at_the_declared_size(http_mirror, small_mirror, tmp_path):
    """Review of issue 14: the free-space check trusts HEAD's Content-Length, so a GET may never write more."""
    size = (Path(small_mirror["root"]) / ZIP).stat().st_size
    http_mirror.fault(f"/{ZIP}", ("pad", 8 << 20))
    dest = tmp_path / "train2014.zip"
    with pytest.raises(DownloadError, match=rf"train2014.zip: sends more than the {size} bytes it declared; "
                                            "nothing kept"):
        download(f"{http_mirror.url}/{ZIP}", dest, retries=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    assert {r.accept_encoding for r in http_mirror.requests} == {"identity"}  # the bytes as stored, uncompressed


def test_the_transfer_time_limit_counts_the_retries_and_their_waits(http_mirror, tmp_path):
    """Review of issue 14: ten failures with a doubling back-off from 5 s would wait over an hour."""
    import time

    http_mirror.fault(f"/{ZIP}", *[("status", 503)] * 10)
    started = time.monotonic()
    with pytest.raises(DownloadError, match=r"not finished within data.transfer_timeout_s=2s \(0 bytes received\)"):
        download(f"{http_mirror.url}/{ZIP}", tmp_path / "train2014.zip", retries=10, backoff_s=5,
                 transfer_timeout_s=2)
    assert time.monotonic() - started < 4


def test_a_416_on_resume_discards_the_partial_copy_and_starts_over_once(http_mirror, small_mirror, tmp_path):
    """Issue 27, case 7: a server refusing the resume's range (416) used to fail every rerun with the .part kept."""
    size = (Path(small_mirror["root"]) / ZIP).stat().st_size
    dest = tmp_path / "train2014.zip"
    http_mirror.fault(f"/{ZIP}", ("cut", size // 3))
    with pytest.raises(DownloadError):
        download(f"{http_mirror.url}/{ZIP}", dest, retries=0)
    assert dest.with_name(dest.name + ".part").exists()
    http_mirror.fault(f"/{ZIP}", ("status", 416))
    before = len(http_mirror.requests)
    record = download(f"{http_mirror.url}/{ZIP}", dest, retries=0)
    assert record.sha256 == sha(Path(small_mirror["root"]) / ZIP)
    gets = [r for r in http_mirror.requests[before:] if r.method == "GET"]
    assert [(g.status, g.range is None) for g in gets] == [(416, False), (200, True)]


def test_a_malformed_content_length_is_a_named_and_retried_error(tmp_path):
    """Issue 27, case 6: "12.5" or "abc" as Content-Length raised ValueError without the URL, never retried."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    body = b"x" * 1000
    lengths = ["12.5", "abc"]  # the first two HEADs; then the true length

    class Server(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_HEAD(self):
            self.send_response(200)
            self.send_header("Content-Length", lengths.pop(0) if lengths else str(len(body)))
            self.end_headers()

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Server)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/f.bin"
    try:
        assert download(url, tmp_path / "f.bin", retries=2, backoff_s=0).size == 1000
        lengths.extend(["-1", "\u00b2", "9 9"])  # "²" passes str.isdigit() but not int()
        with pytest.raises(DownloadError, match=rf"{url}: giving up after 2 retries: .*malformed Content-Length"):
            download(url, tmp_path / "g.bin", retries=2, backoff_s=0)
    finally:
        server.shutdown()
