"""A download cache in a Cloud Storage bucket (``data.download_cache: gs://BUCKET/PREFIX``), for Vertex AI.

On Vertex AI there is no volume that outlives a run; a bucket does. log_raw_data downloads an
archive once, checks it, and uploads it to ``PREFIX/<path>`` with its SHA-256 in the object's
metadata; later runs find it there and only read its central directory. The raw-data artifact
then names the objects (generation and CRC32C each), and process_data reads them where they are:
through Vertex AI's Cloud Storage FUSE mount (``/gcs/BUCKET/...``, lazy reads), or, where no such
mount exists (a workstation), from a copy in the step's scratch folder.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from captioning.errors import DataError

log = logging.getLogger(__name__)

# Vertex AI mounts the project's buckets here (Cloud Storage FUSE); an environment variable moves it (tests).
FUSE_ROOT_ENV = "CAPTIONING_GCS_FUSE_ROOT"
FUSE_ROOT = "/gcs"
SHA256_KEY = "sha256"  # the object's custom metadata: the SHA-256 log_raw_data verified before uploading


def is_bucket(location: str | Path | None) -> bool:
    return str(location or "").startswith("gs://")


@dataclass(frozen=True)
class CachedObject:
    uri: str
    size: int
    crc32c: str  # base64, as Cloud Storage reports it
    generation: int
    sha256: str | None  # what log_raw_data recorded; None for an object it did not upload


def _bucket_and_name(cache_uri: str, rel: str):
    from captioning.gcs import split_uri, storage_client

    bucket_name, prefix = split_uri(cache_uri)
    return storage_client().bucket(bucket_name), f"{prefix}/{rel}".lstrip("/")


def lookup(cache_uri: str, rel: str) -> CachedObject | None:
    bucket, name = _bucket_and_name(cache_uri, rel)
    blob = bucket.get_blob(name)
    if blob is None:
        return None
    return CachedObject(f"gs://{bucket.name}/{name}", blob.size, blob.crc32c, blob.generation,
                        (blob.metadata or {}).get(SHA256_KEY))


def open_object(cached: CachedObject):
    """A seekable reader of exactly that generation (zipfile reads the central directory through it)."""
    from google.cloud.storage import Blob

    from captioning.gcs import split_uri, storage_client

    bucket_name, name = split_uri(cached.uri)
    blob = Blob(name, storage_client().bucket(bucket_name), generation=cached.generation)
    return blob.open("rb", chunk_size=1 << 20)


def upload(local: Path, cache_uri: str, rel: str, sha256: str) -> CachedObject:
    """Store a verified archive in the bucket, its SHA-256 in the metadata; the upload is CRC32C-checked."""
    bucket, name = _bucket_and_name(cache_uri, rel)
    blob = bucket.blob(name)
    blob.metadata = {SHA256_KEY: sha256}
    blob.upload_from_filename(str(local), checksum="crc32c")
    log.info("download cache: stored %s as gs://%s/%s", local.name, bucket.name, name)
    found = lookup(cache_uri, rel)
    if found is None or found.size != local.stat().st_size:
        raise DataError(f"gs://{bucket.name}/{name}: not there after the upload (data.download_cache)")
    return found


def check_referenced(manifest_path: Path, cache_uri: str, files: dict) -> None:
    """Each archive the manifest references is still in the bucket with the size and CRC32C recorded."""
    again = "run log_raw_data again (on Vertex AI: submit with its caching off)"
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
    """A folder where the referenced archives can be opened as files: the FUSE mount where there is one,
    else a copy of each in ``scratch`` (the exact generation recorded, kept for the next call)."""
    from captioning.gcs import split_uri

    bucket_name, prefix = split_uri(cache_uri)
    mounted = Path(os.environ.get(FUSE_ROOT_ENV, FUSE_ROOT)) / bucket_name / prefix
    if all((mounted / entry["path"]).is_file() for entry in files.values()):
        log.info("download cache: reading the archives through the Cloud Storage mount %s", mounted)
        return mounted
    copy = scratch / "download-cache" / bucket_name / prefix
    for entry in files.values():
        target = copy / entry["path"]
        marker = target.with_name(target.name + ".generation")
        if target.is_file() and marker.is_file() and marker.read_text() == str(entry["generation"]):
            continue
        log.info("download cache: no Cloud Storage mount at %s; copying %s into %s", mounted, entry["path"], copy)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        from google.cloud.storage import Blob

        from captioning.gcs import storage_client

        name = f"{prefix}/{entry['path']}".lstrip("/")
        Blob(name, storage_client().bucket(bucket_name), generation=entry["generation"]).download_to_filename(
            str(partial), checksum="crc32c")
        partial.replace(target)
        marker.write_text(str(entry["generation"]))
    return copy


def remove_local(path: Path) -> None:
    """The staging copy (and its verified mark) once the bucket holds it."""
    from captioning.data.fetch import sidecar

    path.unlink(missing_ok=True)
    sidecar(path).unlink(missing_ok=True)
