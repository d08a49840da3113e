"""A download cache in a Cloud Storage bucket (``data.download_cache: gs://BUCKET/PREFIX``), for Vertex AI.

On Vertex AI no volume outlives a run; a bucket does (``--raw-cache-bucket`` sets it on the
log_raw_data task). log_raw_data downloads an archive once, checks it, and uploads it to
``PREFIX/<path>`` with its source and SHA-256 in the object's metadata; a later run from the
same source finds it there and reads only what it needs in place (the central directory, the
caption files). The raw-data artifact names the objects (size, SHA-256, CRC32C each), and
process_data reads them where they are: through Vertex AI's Cloud Storage FUSE mount
(``/gcs/BUCKET/...``, lazy reads), or, where there is no such mount (a workstation), from a copy
in the step's scratch folder.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from captioning.errors import ConfigError, DataError

log = logging.getLogger(__name__)

SETTING = "data.download_cache"
# Vertex AI mounts the buckets the pipeline's service account reads here (Cloud Storage FUSE); tests move it.
FUSE_ROOT_ENV = "CAPTIONING_GCS_FUSE_ROOT"
FUSE_ROOT = "/gcs"
# The object's custom metadata: what log_raw_data verified before uploading, and where it came from.
SHA256_KEY, SOURCE_KEY = "sha256", "source"


def is_bucket(location: str | Path | None) -> bool:
    return str(location or "").startswith("gs://")


@dataclass(frozen=True)
class CachedObject:
    uri: str
    size: int
    crc32c: str  # base64, as Cloud Storage reports it
    generation: int
    sha256: str | None  # what log_raw_data recorded; None for an object it did not upload
    source: str | None


@contextlib.contextmanager
def _named(cache_uri: str, what: str):
    """Cloud Storage's errors (no bucket, no permission, no network) as one line naming the setting."""
    from google.api_core import exceptions as gexc
    from google.auth import exceptions as auth_exc

    try:
        yield
    except (gexc.GoogleAPIError, auth_exc.GoogleAuthError) as exc:
        message = getattr(exc, "message", None) or str(exc)
        raise DataError(f"{SETTING}={cache_uri}: {what}: {type(exc).__name__}: {message}") from None


def _object(blob, source_default: str | None = None) -> CachedObject:
    meta = blob.metadata or {}
    return CachedObject(f"gs://{blob.bucket.name}/{blob.name}", blob.size, blob.crc32c, blob.generation,
                        meta.get(SHA256_KEY), meta.get(SOURCE_KEY, source_default))


def _locate(cache_uri: str, rel: str):
    from captioning.gcs import split_uri, storage_client

    bucket_name, prefix = split_uri(cache_uri)
    return storage_client().bucket(bucket_name), f"{prefix}/{rel}".lstrip("/")


def check_bucket(cache_uri: str) -> None:
    """Before anything is downloaded: the bucket is there and this identity can read it."""
    from google.api_core import exceptions as gexc

    bucket, _ = _locate(cache_uri, "")
    with _named(cache_uri, "cannot use the bucket"):
        try:
            bucket.reload()
        except gexc.NotFound:
            raise ConfigError(f"{SETTING}={cache_uri}: no bucket {bucket.name!r}; create it in the pipeline's "
                              "project and region, or correct the name") from None


def lookup(cache_uri: str, rel: str) -> CachedObject | None:
    bucket, name = _locate(cache_uri, rel)
    with _named(cache_uri, f"cannot read {name}"):
        blob = bucket.get_blob(name)
    return _object(blob) if blob is not None else None


def reusable(found: CachedObject | None, source: str, expected_sha256: str | None) -> bool:
    """An object log_raw_data uploaded from this very source, and (when pinned) with the expected checksum:
    another mirror's or another preset's archive under the same name is not this one."""
    return bool(found and found.sha256 and found.source == source and expected_sha256 in (None, found.sha256))


def open_object(cache_uri: str, cached: CachedObject):
    """A seekable reader of exactly that generation (zipfile reads the central directory through it)."""
    from google.cloud.storage import Blob

    from captioning.gcs import split_uri, storage_client

    bucket_name, name = split_uri(cached.uri)
    with _named(cache_uri, f"cannot read {name}"):
        blob = Blob(name, storage_client().bucket(bucket_name), generation=cached.generation)
        return blob.open("rb", chunk_size=1 << 20)


def upload(local: Path, cache_uri: str, rel: str, sha256: str, source: str) -> CachedObject:
    """Store a verified archive, its checksum and source in the metadata (the upload is CRC32C-checked). Only
    where nothing is yet, or over what was there when this run looked: two runs racing keep one copy."""
    from google.api_core import exceptions as gexc

    bucket, name = _locate(cache_uri, rel)
    before = lookup(cache_uri, rel)
    blob = bucket.blob(name)
    blob.metadata = {SHA256_KEY: sha256, SOURCE_KEY: source}
    with _named(cache_uri, f"cannot upload {local.name} to {name}"):
        try:
            blob.upload_from_filename(str(local), checksum="crc32c",
                                      if_generation_match=before.generation if before else 0)
        except gexc.PreconditionFailed:
            raced = lookup(cache_uri, rel)  # another run stored it meanwhile: the same archive is as good
            if raced is None or raced.sha256 != sha256:
                raise DataError(f"{SETTING}={cache_uri}: {name} was replaced by another run while this one "
                                "uploaded a different archive; run log_raw_data again") from None
            return raced
    log.info("download cache: stored %s as gs://%s/%s", local.name, bucket.name, name)
    return _object(blob, source)


def check_referenced(manifest_path: Path, cache_uri: str, files: dict) -> None:
    """Each archive the manifest references is still in the bucket with the size and CRC32C recorded."""
    again = "run log_raw_data again (a pipeline run with caching off, enable_caching=False)"
    for entry in files.values():
        found = lookup(cache_uri, entry["path"])
        uri = f"{cache_uri.rstrip('/')}/{entry['path']}"
        if found is None:
            raise DataError(f"{uri}: the download cache no longer holds this archive, which {manifest_path} "
                            f"references; {again}")
        if found.size != entry["size"] or found.crc32c != entry["crc32c"]:
            raise DataError(f"{uri}: changed in the download cache since log_raw_data verified it (size or CRC32C "
                            f"differs from {manifest_path}); {again}")


def local_root(cache_uri: str, files: dict, scratch: Path) -> Path:
    """A folder where the referenced archives open as files: the FUSE mount where there is one, else a copy
    of each in ``scratch`` (checked against the recorded CRC32C, kept for the next call)."""
    from captioning.gcs import split_uri
    from captioning.io import require_free_space

    bucket_name, prefix = split_uri(cache_uri)
    mounted = Path(os.environ.get(FUSE_ROOT_ENV, FUSE_ROOT)) / bucket_name / prefix
    missing = [e["path"] for e in files.values() if not (mounted / e["path"]).is_file()]
    if not missing:
        log.info("download cache: reading the archives through the Cloud Storage mount %s", mounted)
        return mounted
    if mounted.is_dir():  # a mount without them: the copy below still reads the objects the manifest names
        log.warning("download cache: %s does not show %s; copying from the bucket", mounted, ", ".join(missing))
    copy = scratch / "download-cache" / bucket_name / prefix
    todo = []
    for entry in files.values():
        target = copy / entry["path"]
        marker = target.with_name(target.name + ".crc32c")
        if not (target.is_file() and marker.is_file() and marker.read_text() == entry["crc32c"]):
            todo.append(entry)
    if todo:
        log.info("download cache: no Cloud Storage mount at %s; copying %d archives into %s", mounted, len(todo), copy)
        copy.mkdir(parents=True, exist_ok=True)
        require_free_space(copy, sum(e["size"] for e in todo), f"the copy of {cache_uri}'s archives")
    for entry in todo:
        target = copy / entry["path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        bucket, name = _locate(cache_uri, entry["path"])
        with _named(cache_uri, f"cannot copy {name}"):
            blob = bucket.get_blob(name)
            if blob is None or blob.crc32c != entry["crc32c"]:
                raise DataError(f"{cache_uri}/{entry['path']}: changed in the download cache while being read; "
                                "run log_raw_data again")
            blob.download_to_filename(str(partial), checksum="crc32c", if_generation_match=blob.generation)
        partial.replace(target)
        target.with_name(target.name + ".crc32c").write_text(entry["crc32c"])
    return copy


def remove_local(path: Path) -> None:
    """The staging copy (and its verified mark) once the bucket holds it."""
    from captioning.data.fetch import sidecar

    path.unlink(missing_ok=True)
    sidecar(path).unlink(missing_ok=True)
