"""Streamed, resumable, verified downloads from http(s)://, gs://, file:// or a path.

A transfer writes ``NAME.part`` and resumes it after an interruption (HTTP
Range with If-Range, a GCS read at an offset, a seek in a local file), but only
while the source still has the same validators (ETag/Last-Modified, a GCS
generation, a file's size and mtime): a changed source restarts from zero. A
finished file gets a sidecar ``NAME.verified.json`` (source URL without its
password, validators, size, SHA-256) only after it passes the caller's check
(for the COCO zips: the archive check); a later run that finds the same source
with the same validators downloads nothing, and one that finds another source
or a changed validator downloads again. A whole transfer has a time limit.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import unquote, urlparse

import requests
import urllib3

from captioning.errors import CaptioningError, DownloadError
from captioning.io import disk_full_error, is_disk_full, require_free_space, write_json_atomic
from captioning.redact import redact

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


class TransferTooSlow(Exception):
    """The transfer ran past its deadline: not retried, a trickling server would only trickle again."""


class Source:
    """One remote file: its size and validators, and its bytes from an offset."""

    def __init__(self, url: str, timeout: float):
        self.url = url
        self.shown = redact(url)  # for messages and records: no password
        self.timeout = timeout
        self.validators: dict = {}

    def size(self) -> int:
        """The size, and ``self.validators``: what changes when the file does."""
        raise NotImplementedError

    def stream(self, offset: int, deadline: float) -> Iterator[bytes]:
        raise NotImplementedError


class HttpSource(Source):
    def __init__(self, url: str, timeout: float):
        super().__init__(url, timeout)
        self.session = requests.Session()
        # The bytes as stored: a compressed transfer would make the size on disk differ from Content-Length.
        self.session.headers["Accept-Encoding"] = "identity"

    def _check(self, resp: requests.Response) -> None:
        if resp.status_code >= 500 or resp.status_code == 429:
            raise TransientError(f"{self.shown}: HTTP {resp.status_code}")
        if resp.status_code >= 400:
            raise DownloadError(f"{self.shown}: HTTP {resp.status_code} {resp.reason}")

    def size(self) -> int:
        try:
            resp = self.session.head(self.url, timeout=self.timeout, allow_redirects=True)
        except requests.RequestException as exc:
            raise TransientError(f"{self.shown}: {redact(str(exc))}") from exc
        self._check(resp)
        length = resp.headers.get("Content-Length")
        if length is None:
            raise SizeUnknown(f"{self.shown}: the server sends no Content-Length, so the size cannot be verified")
        if not re.fullmatch(r"[0-9]+", length.strip()):  # "12.5", "-1", "²": a broken proxy or server, retried
            raise TransientError(f"{self.shown}: the server sends a malformed Content-Length {length!r}")
        self.validators = {key: resp.headers[header] for key, header in
                           (("etag", "ETag"), ("last_modified", "Last-Modified")) if header in resp.headers}
        return int(length)

    def stream(self, offset: int, deadline: float) -> Iterator[bytes]:
        headers = {}
        if offset:
            headers["Range"] = f"bytes={offset}-"
            # Only the version the partial copy came from may continue it; else the server sends all (200).
            # A weak ETag never matches in If-Range (RFC 9110 13.1.5): the date is used instead.
            etag = self.validators.get("etag", "")
            if_range = (etag if etag and not etag.startswith("W/") else "") or self.validators.get("last_modified")
            if if_range:
                headers["If-Range"] = if_range
        try:
            resp = self.session.get(self.url, headers=headers, stream=True, timeout=self.timeout)
        except requests.RequestException as exc:
            raise TransientError(f"{self.shown}: {redact(str(exc))}") from exc
        with resp:
            if offset and resp.status_code == 416:  # the range is not satisfiable: the partial copy is no use
                raise RangeIgnored()
            self._check(resp)
            if offset and resp.status_code != 206:
                # The server ignored Range, or the file changed (If-Range): the caller must start over.
                raise RangeIgnored()
            # read1: whatever one socket read brings (iter_content waits to fill its chunk), so a server
            # sending a byte now and then is seen, and stopped, at the deadline.
            try:
                while chunk := resp.raw.read1(NET_CHUNK, decode_content=True):
                    yield chunk
                    if time.monotonic() > deadline:
                        raise TransferTooSlow()
            except (requests.RequestException, ConnectionError, urllib3.exceptions.HTTPError) as exc:
                raise TransientError(f"{self.shown}: transfer interrupted: {redact(str(exc))}") from exc


MAX_BACKOFF_S = 600.0  # the doubling back-off stops growing at ten minutes


class RangeIgnored(Exception):
    pass


class SizeUnknown(DownloadError):
    """No Content-Length: an archive cannot be verified by size, an image is read up to its limit instead."""


class Oversized(Exception):
    pass


class LocalSource(Source):
    def __init__(self, url: str, timeout: float):
        super().__init__(url, timeout)
        self.path = Path(unquote(urlparse(url).path) if url.startswith("file://") else url)

    def size(self) -> int:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            raise DownloadError(f"{self.path}: file not found") from None
        self.validators = {"mtime_ns": stat.st_mtime_ns}
        return stat.st_size

    def stream(self, offset: int, deadline: float) -> Iterator[bytes]:
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
        self.validators = {"generation": str(blob.generation)}  # the etag also changes on metadata edits
        return int(blob.size)

    def stream(self, offset: int, deadline: float) -> Iterator[bytes]:
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
    raise DownloadError(f"{redact(url)}: unsupported scheme {scheme!r}")


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


def unverify(dest: Path) -> None:
    """Withdraw a file's verified mark (it failed a later check): the next run downloads it again. The
    file's mtime moves too, so no other record of it (a hard link's, in a shared download cache) matches."""
    with contextlib.suppress(OSError):  # a read-only input (Vertex's /gcs mount) keeps its marks
        sidecar(dest).unlink(missing_ok=True)
    try:
        os.utime(dest)
    except OSError as exc:
        if dest.exists() and dest.stat().st_nlink > 1:  # a shared cache's link may still carry a valid mark
            log.warning("%s: cannot move its mtime (%s); delete %s in the download cache by hand",
                        dest, exc.strerror, dest.name)


def download(
    url: str,
    dest: Path,
    *,
    expected_sha256: str | None = None,
    retries: int = 5,
    backoff_s: float = 1.0,
    timeout_s: float = 60.0,
    transfer_timeout_s: float = 6 * 3600.0,
    progress: ProgressHook | None = None,
    check: Callable[[Path], None] | None = None,
) -> FileRecord:
    """Fetch ``url`` to ``dest``: resumable, retried, verified, idempotent. ``check(path)`` (e.g. the archive
    check) must pass before the file is marked verified; what it raises is reported with the URL."""
    dest = Path(dest)
    source = open_source(url, timeout_s)
    record = verified_record(dest)
    if record and record.get("source") == source.shown and expected_sha256 in (None, record["sha256"]):
        try:
            size = source.size()
        except Exception as exc:  # noqa: BLE001 - offline, or a HEAD refused: the verified copy is the best there is
            log.warning("%s: cannot ask the source whether it changed (%s); using the copy verified earlier",
                        dest, redact(str(exc)))
            return FileRecord(source.shown, str(dest), record["size"], record["sha256"], downloaded=False)
        if size == record["size"] and "validators" not in record:  # verified by an earlier version: adopt it
            write_json_atomic(sidecar(dest), {**record, "validators": source.validators})
            record["validators"] = source.validators
        if size == record["size"] and source.validators == record.get("validators"):
            log.info("%s: already present and verified, not downloading", dest)
            return FileRecord(source.shown, str(dest), record["size"], record["sha256"], downloaded=False)
        log.info("%s changed at the source (%s); downloading it again", source.shown, source.validators)
    elif record:
        log.info("%s was verified from %s; downloading it from %s", dest, record.get("source"), source.shown)
    unverify(dest)

    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    deadline = time.monotonic() + transfer_timeout_s
    attempt = 0

    def too_slow() -> DownloadError:
        got = part.stat().st_size if part.exists() else 0
        return DownloadError(f"{source.shown}: not finished within data.transfer_timeout_s={transfer_timeout_s:g}s "
                             f"({got} bytes received); the partial copy is kept for the next run")

    while True:
        try:
            if time.monotonic() > deadline:  # the limit holds across retries and their waits
                raise TransferTooSlow()
            total = source.size()
            _transfer(source, part, total, dest.name, progress, deadline)
            break
        except TransferTooSlow:
            raise too_slow() from None
        except TransientError as exc:
            attempt += 1
            if attempt > retries:
                raise DownloadError(f"{source.shown}: giving up after {retries} retries: {exc}") from None
            left = deadline - time.monotonic()
            if left <= 0:
                raise too_slow() from None
            wait = min(backoff_s * (2 ** (attempt - 1)), MAX_BACKOFF_S, left)
            log.warning("%s; retry %d/%d in %.1fs (resuming)", exc, attempt, retries, wait)
            time.sleep(wait)

    size = part.stat().st_size
    if size != total:
        raise DownloadError(f"{source.shown}: size mismatch: got {size} bytes, the source says {total}")
    digest = sha256_file(part)
    if expected_sha256 and digest != expected_sha256:
        _discard(part)
        raise DownloadError(f"{source.shown}: checksum mismatch: sha256 {digest}, expected {expected_sha256}")
    if check:
        try:
            check(part)
        except Exception as exc:  # noqa: BLE001 - whatever a damaged file makes the check raise
            _discard(part)  # never kept, never verified: the next run fetches it afresh
            why = exc if isinstance(exc, CaptioningError) else f"{type(exc).__name__}: {exc}"
            raise DownloadError(f"{source.shown}: downloaded as {dest.name}, but it failed the check: {why}") from None
    os.replace(part, dest)
    _part_meta(part).unlink(missing_ok=True)
    write_json_atomic(sidecar(dest), {"source": source.shown, "validators": source.validators, "size": size,
                                "sha256": digest, "mtime_ns": dest.stat().st_mtime_ns})
    return FileRecord(source.shown, str(dest), size, digest, downloaded=True)


def _part_meta(part: Path) -> Path:
    return part.with_name(part.name + ".json")


def _discard(part: Path) -> None:
    part.unlink(missing_ok=True)
    _part_meta(part).unlink(missing_ok=True)


def _transfer(source: Source, part: Path, total: int, name: str, progress: ProgressHook | None,
              deadline: float) -> None:
    origin = {"source": source.shown, "validators": source.validators, "size": total}
    meta = _part_meta(part)
    if part.exists():
        try:
            same = json.loads(meta.read_text()) == origin
        except (OSError, ValueError):
            same = False
        if not same or part.stat().st_size > total:  # a partial copy of another version or source
            log.info("%s: the partial copy came from another version of the file; starting over", name)
            _discard(part)
    offset = part.stat().st_size if part.exists() else 0
    if offset == total:
        return
    require_free_space(part.parent, total - offset,
                       f"the rest of {name} (from byte {offset})" if offset else f"downloading {name}")
    if not part.exists():
        write_json_atomic(meta, origin)
    try:
        chunks = source.stream(offset, deadline)
        mode = "ab" if offset else "wb"
        with open(part, mode) as fh:
            done = offset
            for chunk in chunks:
                if done + len(chunk) > total:  # never more than the source declared: a full disk otherwise
                    raise Oversized()
                fh.write(chunk)
                done += len(chunk)
                if progress:
                    progress(name, done, total)
                if time.monotonic() > deadline:
                    raise TransferTooSlow()
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        # The volume filled during the transfer (something else wrote to it): what arrived is resumable.
        raise disk_full_error(part, kept=f"the partial download ({part.stat().st_size} bytes) is kept to resume "
                                         "from; delete it to get the space back") from None
    except Oversized:
        _discard(part)
        raise DownloadError(f"{source.shown}: sends more than the {total} bytes it declared; nothing kept") from None
    except RangeIgnored:  # the server ignored the range (200) or refused it (416): start over, once
        log.info("%s: the server does not continue the partial copy from byte %d; starting over", name, offset)
        part.unlink()
        _transfer(source, part, total, name, progress, deadline)
        return
    if part.stat().st_size < total:
        raise TransientError(f"{source.shown}: connection closed at {part.stat().st_size} of {total} bytes")


def record_dict(record: FileRecord) -> dict:
    return asdict(record)
