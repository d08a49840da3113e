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
    assert len(http_mirror.requests) == before  # nothing was even asked of the server


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
