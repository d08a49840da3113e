"""Streamed, resumable, verified downloads from http(s)://, gs://, file:// or a path.

A transfer writes ``NAME.part`` and resumes it after an interruption (HTTP
Range, a GCS read at an offset, a seek in a local file). A finished file gets
a sidecar ``NAME.verified.json`` with its size and SHA-256; a later run that
finds the file unchanged downloads nothing and contacts nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import unquote, urlparse

import requests

from captioning.errors import DownloadError

log = logging.getLogger(__name__)

CHUNK = 1 << 20
# Network reads are small so that an interrupted transfer keeps nearly all it received.
NET_CHUNK = 1 << 16


@dataclass
class FileRecord:
    source: str
    path: str
    size: int
    sha256: str
    downloaded: bool  # False when an earlier verified copy was reused


class TransientError(Exception):
    """A failure worth retrying: the next attempt resumes where this one stopped."""


# ---------------------------------------------------------------- sources


class Source:
    """One remote file: its size, and its bytes from an offset."""

    def __init__(self, url: str, timeout: float):
        self.url = url
        self.timeout = timeout

    def size(self) -> int:
        raise NotImplementedError

    def stream(self, offset: int) -> Iterator[bytes]:
        raise NotImplementedError


class HttpSource(Source):
    def __init__(self, url: str, timeout: float):
        super().__init__(url, timeout)
        self.session = requests.Session()

    def _check(self, resp: requests.Response) -> None:
        if resp.status_code >= 500 or resp.status_code == 429:
            raise TransientError(f"{self.url}: HTTP {resp.status_code}")
        if resp.status_code >= 400:
            raise DownloadError(f"{self.url}: HTTP {resp.status_code} {resp.reason}")

    def size(self) -> int:
        try:
            resp = self.session.head(self.url, timeout=self.timeout, allow_redirects=True)
        except requests.RequestException as exc:
            raise TransientError(f"{self.url}: {exc}") from exc
        self._check(resp)
        length = resp.headers.get("Content-Length")
        if length is None:
            raise DownloadError(f"{self.url}: the server sends no Content-Length, so the size cannot be verified")
        return int(length)

    def stream(self, offset: int) -> Iterator[bytes]:
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        try:
            resp = self.session.get(self.url, headers=headers, stream=True, timeout=self.timeout)
        except requests.RequestException as exc:
            raise TransientError(f"{self.url}: {exc}") from exc
        with resp:
            self._check(resp)
            if offset and resp.status_code != 206:
                # The server ignored Range: the caller must start over.
                raise RangeIgnored()
            try:
                yield from resp.iter_content(NET_CHUNK)
            except (requests.RequestException, ConnectionError) as exc:
                raise TransientError(f"{self.url}: transfer interrupted: {exc}") from exc


class RangeIgnored(Exception):
    pass


class LocalSource(Source):
    def __init__(self, url: str, timeout: float):
        super().__init__(url, timeout)
        self.path = Path(unquote(urlparse(url).path) if url.startswith("file://") else url)

    def size(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            raise DownloadError(f"{self.path}: file not found") from None

    def stream(self, offset: int) -> Iterator[bytes]:
        with open(self.path, "rb") as fh:
            fh.seek(offset)
            while chunk := fh.read(CHUNK):
                yield chunk


class GcsSource(Source):
    def __init__(self, url: str, timeout: float):
        super().__init__(url, timeout)
        parsed = urlparse(url)
        self.bucket_name, self.blob_name = parsed.netloc, parsed.path.lstrip("/")
        self._blob = None

    def _get_blob(self):
        if self._blob is None:
            from captioning.gcs import storage_client

            self._blob = storage_client().bucket(self.bucket_name).blob(self.blob_name)
        return self._blob

    def size(self) -> int:
        from google.api_core import exceptions as gexc

        blob = self._get_blob()
        try:
            blob.reload(timeout=self.timeout)
        except gexc.NotFound:
            raise DownloadError(f"{self.url}: object not found") from None
        except (gexc.Forbidden, gexc.Unauthorized) as exc:
            raise DownloadError(f"{self.url}: access denied: {exc.message}") from None
        except (gexc.ServerError, gexc.TooManyRequests, requests.RequestException) as exc:
            raise TransientError(f"{self.url}: {exc}") from exc
        return int(blob.size)

    def stream(self, offset: int) -> Iterator[bytes]:
        from google.api_core import exceptions as gexc

        try:
            with self._get_blob().open("rb", chunk_size=CHUNK * 8) as reader:
                reader.seek(offset)
                while chunk := reader.read(CHUNK):
                    yield chunk
        except (gexc.ServerError, gexc.TooManyRequests, requests.RequestException) as exc:
            raise TransientError(f"{self.url}: {exc}") from exc


def open_source(url: str, timeout: float = 60.0) -> Source:
    scheme = urlparse(url).scheme if "://" in url else ""
    if scheme in ("http", "https"):
        return HttpSource(url, timeout)
    if scheme == "gs":
        return GcsSource(url, timeout)
    if scheme in ("", "file"):
        return LocalSource(url, timeout)
    raise DownloadError(f"{url}: unsupported scheme {scheme!r}")


def join_url(base: str, relative: str) -> str:
    return f"{base.rstrip('/')}/{relative.lstrip('/')}"


# ---------------------------------------------------------------- download


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sidecar(dest: Path) -> Path:
    return dest.with_name(dest.name + ".verified.json")


def verified_record(dest: Path) -> dict | None:
    """The sidecar's record if ``dest`` is unchanged since it was verified."""
    side = sidecar(dest)
    if not (dest.exists() and side.exists()):
        return None
    try:
        record = json.loads(side.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    stat = dest.stat()
    if record.get("size") != stat.st_size or record.get("mtime_ns") != stat.st_mtime_ns:
        return None
    return record


ProgressHook = Callable[[str, int, int], None]  # (name, done, total)


def download(
    url: str,
    dest: Path,
    *,
    expected_sha256: str | None = None,
    retries: int = 5,
    backoff_s: float = 1.0,
    timeout_s: float = 60.0,
    progress: ProgressHook | None = None,
) -> FileRecord:
    """Fetch ``url`` to ``dest``: resumable, retried, verified, idempotent."""
    dest = Path(dest)
    record = verified_record(dest)
    if record and (expected_sha256 is None or record["sha256"] == expected_sha256):
        log.info("%s: already present and verified, not downloading", dest)
        return FileRecord(url, str(dest), record["size"], record["sha256"], downloaded=False)

    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    source = open_source(url, timeout_s)
    attempt = 0
    while True:
        try:
            total = source.size()
            _transfer(source, part, total, dest.name, progress)
            break
        except TransientError as exc:
            attempt += 1
            if attempt > retries:
                raise DownloadError(f"{url}: giving up after {retries} retries: {exc}") from None
            wait = backoff_s * (2 ** (attempt - 1))
            log.warning("%s; retry %d/%d in %.1fs (resuming)", exc, attempt, retries, wait)
            time.sleep(wait)

    size = part.stat().st_size
    if size != total:
        raise DownloadError(f"{url}: size mismatch: got {size} bytes, the source says {total}")
    digest = sha256_file(part)
    if expected_sha256 and digest != expected_sha256:
        part.unlink()
        raise DownloadError(f"{url}: checksum mismatch: sha256 {digest}, expected {expected_sha256}")
    os.replace(part, dest)
    stat = dest.stat()
    side = {"source": url, "size": size, "sha256": digest, "mtime_ns": stat.st_mtime_ns}
    tmp = sidecar(dest).with_suffix(".tmp")
    tmp.write_text(json.dumps(side, indent=1))
    os.replace(tmp, sidecar(dest))
    return FileRecord(url, str(dest), size, digest, downloaded=True)


def _transfer(source: Source, part: Path, total: int, name: str, progress: ProgressHook | None) -> None:
    offset = part.stat().st_size if part.exists() else 0
    if offset > total:  # a stale partial file of some other version
        offset = 0
        part.unlink()
    if offset == total:
        return
    try:
        chunks = source.stream(offset)
        mode = "ab" if offset else "wb"
        with open(part, mode) as fh:
            done = offset
            for chunk in chunks:
                fh.write(chunk)
                done += len(chunk)
                if progress:
                    progress(name, done, total)
    except RangeIgnored:
        part.unlink()
        _transfer(source, part, total, name, progress)
        return
    if part.stat().st_size < total:
        raise TransientError(f"{source.url}: connection closed at {part.stat().st_size} of {total} bytes")


def record_dict(record: FileRecord) -> dict:
    return asdict(record)
