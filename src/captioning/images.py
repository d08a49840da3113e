"""Images to caption, named by URI: a path, ``file://``, ``http(s)://`` or ``gs://``.

``read_image`` fetches one image's bytes with a size bound (the same sources as the
COCO downloads); ``list_images`` expands what the batch pipeline is pointed at: a
folder, a ``gs://`` prefix, or a JSON-lines file of URIs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from urllib.parse import urlparse

from captioning.errors import CaptioningError, ConfigError, DownloadError
from captioning.redact import redact

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".bmp")
MAX_LIST_LINE = 64 * 1024  # one URI per line; a longer line is not a URI


class ImageUnavailable(CaptioningError):
    """This image cannot be captioned; the message is the reason (a skipped line, a 400, an error)."""


def read_image(uri: str, max_bytes: int, timeout_s: float = 30.0, follow_redirects: bool = True) -> bytes:
    """The image's bytes, refused past ``max_bytes`` (declared or received). ``follow_redirects=False``:
    a server answering with a redirect is refused (the online endpoint must not be led elsewhere)."""
    from captioning.data.fetch import (HttpSource, LocalSource, SizeUnknown, TransferTooSlow, TransientError,
                                       open_source)

    try:
        source = open_source(uri, timeout_s)
        if isinstance(source, LocalSource) and source.path.exists() and not source.path.is_file() \
                and not source.path.is_dir():
            raise ImageUnavailable("not a regular file")  # a FIFO or a device reads forever
        if isinstance(source, HttpSource) and not follow_redirects:
            source.session.max_redirects = 0
        try:
            size = source.size()
        except SizeUnknown:  # a chunked answer: read it, up to the limit
            size = 0
        if size > max_bytes:
            raise ImageUnavailable(f"{size} bytes, more than the limit of {max_bytes}")
        data = bytearray()
        for chunk in source.stream(0, time.monotonic() + timeout_s):
            data += chunk
            if len(data) > max_bytes:
                raise ImageUnavailable(f"more than the limit of {max_bytes} bytes")
        return bytes(data)
    except (DownloadError, TransientError) as exc:
        raise ImageUnavailable(_without_uri(str(exc), uri)) from None
    except TransferTooSlow:
        raise ImageUnavailable(f"not received within {timeout_s:g} s") from None
    except IsADirectoryError:
        raise ImageUnavailable("a directory, not an image file") from None
    except OSError as exc:
        raise ImageUnavailable(f"cannot read it: {exc.strerror or exc}") from None
    except ImageUnavailable:
        raise
    except ValueError as exc:  # a malformed URI ("http://[::1")
        raise ImageUnavailable(f"not a usable URI: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - e.g. a GCS object deleted after listing: this image, not the batch
        raise ImageUnavailable(f"cannot fetch it: {type(exc).__name__}") from None


def _without_uri(message: str, uri: str) -> str:
    """The reason alone: callers put the URI beside it."""
    for shown in (redact(uri), uri, str(Path(uri))):
        if message.startswith(shown + ": "):
            return message[len(shown) + 2:]
    return redact(message)


def list_images(source: str, setting: str = "batch.source") -> list[str]:
    """Every image URI under a folder or ``gs://`` prefix (sorted), or listed in a ``.jsonl`` file (in order)."""
    return [uri for uri, _ in _listing(source, setting)]


def image_listing(source: str, setting: str = "batch.source") -> tuple[list[str], str]:
    """``list_images`` and a fingerprint of what it found: each URI with its size and modification time (a
    folder) or generation (a bucket). A ``.jsonl`` list is known by its URIs: what they point at is not read."""
    import hashlib

    found = _listing(source, setting)
    digest = hashlib.sha256("".join(f"{uri}\t{stamp}\n" for uri, stamp in found).encode())
    return [uri for uri, _ in found], f"sha256:{digest.hexdigest()[:32]}"


def _listing(source: str, setting: str) -> list[tuple[str, str]]:
    """(URI, what changes when its content does) for every image of ``source``."""
    source = source.strip()
    if not source:
        raise ConfigError(f"{setting}: empty; name a folder, a gs:// prefix or a .jsonl list of image URIs")
    if source.endswith(".jsonl"):
        return [(uri, "") for uri in _read_list(source, setting)]
    if source.startswith("gs://"):
        return _list_bucket(source, setting)
    scheme = urlparse(source).scheme if "://" in source else ""
    if scheme not in ("", "file"):
        raise ConfigError(f"{setting}={redact(source)}: a folder or gs:// prefix to list, or a .jsonl file of URIs "
                          f"(http(s) URIs go in the list)")
    folder = Path(urlparse(source).path if scheme == "file" else source)
    if not folder.is_dir():
        raise ConfigError(f"{setting}={source}: no such folder")
    found = []
    for p in folder.rglob("*"):
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file():
            st = p.stat()
            found.append((str(p), f"{st.st_size}:{st.st_mtime_ns}"))
    return sorted(found)


def _list_bucket(prefix: str, setting: str) -> list[tuple[str, str]]:
    from google.api_core import exceptions as gexc

    from captioning.gcs import split_uri, storage_client

    bucket, path = split_uri(prefix)
    try:
        blobs = [(b.name, f"{b.size}:{b.generation}") for b in storage_client().list_blobs(bucket, prefix=path)]
    except (gexc.NotFound, gexc.Forbidden, gexc.Unauthorized) as exc:
        raise ConfigError(f"{setting}={prefix}: cannot list it: {getattr(exc, 'message', exc)}") from None
    return sorted((f"gs://{bucket}/{n}", stamp) for n, stamp in blobs if Path(n).suffix.lower() in IMAGE_SUFFIXES)


def _read_list(source: str, setting: str) -> list[str]:
    """Lines of ``{"uri": ...}`` or a JSON string; blank lines are allowed; relative paths are the list's."""
    if source.startswith("gs://"):
        from captioning.gcs import split_uri, storage_client

        bucket, path = split_uri(source)
        try:
            text = storage_client().bucket(bucket).blob(path).download_as_text()
        except Exception as exc:  # noqa: BLE001 - NotFound, Forbidden, transport: all one answer here
            raise ConfigError(f"{setting}={source}: cannot read it: {getattr(exc, 'message', exc)}") from None
        base = source.rsplit("/", 1)[0]  # gs://bucket/dir: relative URIs are the list's neighbours
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"{setting}={source}: no such file")
        text = path.read_text(encoding="utf-8", errors="replace")
        base = path.parent
    uris = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            if len(line) > MAX_LIST_LINE:
                raise ValueError("line too long")
            item = json.loads(line)
            uri = item["uri"] if isinstance(item, dict) else item
            if not isinstance(uri, str) or not uri:
                raise ValueError("no uri")
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f"{setting}={source}: line {number} is not {{\"uri\": \"...\"}} or a JSON "
                              "string") from None
        if "://" not in uri and not Path(uri).is_absolute():
            uri = f"{base}/{uri}" if isinstance(base, str) else str(base / uri)
        uris.append(uri)
    return uris
