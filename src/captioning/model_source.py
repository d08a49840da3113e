"""Where a model to caption with comes from: a folder, an alias in a registry, or a bucket.

``captioning serve``, ``captioning caption`` and the batch captioning pipeline all
name their model one of these ways:

- a model folder (the train step's ``model`` output, or ``<registry>/<collection>/versions/vN``);
- an alias (``production``) or ``collection:alias`` in the local registry folder that promote wrote;
- ``wandb:ALIAS`` or ``wandb:COLLECTION:ALIAS``: the W&B Registry promote linked the model into (online);
- ``gs://bucket/prefix``: a model folder in a bucket (Vertex AI hands one over as ``AIP_STORAGE_URI``);
- ``s3://bucket/prefix``: the same in S3 or an S3-compatible store (KFP's artifact store), read with boto3's
  standard environment: ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``.

The version says which model answered: ``vN`` from a registry, else the model file's digest.
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from captioning.bundle import MODEL_FILE
from captioning.errors import ConfigError

log = logging.getLogger(__name__)

ALIAS_PATTERN = re.compile(r"(?:(?P<collection>[A-Za-z0-9][A-Za-z0-9_.-]*):)?(?P<alias>[A-Za-z0-9][A-Za-z0-9_.-]*)")


@dataclass(frozen=True)
class ResolvedModel:
    path: Path  # a local model folder
    version: str  # vN (registry) or sha256:<12 hex> (a folder)
    source: str  # what was asked for, for the records


def model_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    with open(folder / MODEL_FILE, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _folder_version(folder: Path) -> str:
    """A registry version folder is named vN; anything else is known by its content."""
    if re.fullmatch(r"v\d+", folder.name) and folder.parent.name == "versions":
        return folder.name
    return f"sha256:{model_digest(folder)[:12]}" if (folder / MODEL_FILE).is_file() else "unknown"


def resolve_model(spec: str, registry: str = "", collection: str = "captioning-model", cache: Path | None = None,
                  setting: str = "--model") -> ResolvedModel:
    """A local model folder for ``spec`` (see the module's doc); ``setting`` names the option in errors."""
    spec = spec.strip()
    if not spec:
        raise ConfigError(f"{setting}: empty; name a model folder, an alias such as production, gs://... or s3://...")
    if spec.startswith(("gs://", "s3://")):
        folder = _download_bucket_folder(spec, cache, setting)
        return ResolvedModel(folder, _folder_version(folder), spec)
    if spec.startswith("wandb:"):
        return _from_wandb_registry(spec, collection, cache, setting)
    folder = Path(spec).expanduser()
    if folder.exists() or "/" in spec or spec.startswith("."):
        if not folder.is_dir():
            raise ConfigError(f"{setting}={spec}: no such model folder")
        return ResolvedModel(folder, _folder_version(folder), spec)
    match = ALIAS_PATTERN.fullmatch(spec)
    if not match:
        raise ConfigError(f"{setting}={spec!r}: neither a folder nor an alias (letters, digits, _ . -)")
    if not registry:
        raise ConfigError(f"{setting}={spec}: an alias needs the registry folder promote wrote (--registry, or "
                          "promote.registry); or pass the model folder itself")
    from captioning.registry import LocalRegistry

    local = LocalRegistry(Path(registry), match["collection"] or collection)
    if not local.root.is_dir():
        raise ConfigError(f"{setting}={spec}: no collection {local.root.name!r} in the registry {registry}")
    version = local.aliases().get(match["alias"])
    if not version:
        held = ", ".join(sorted(local.aliases())) or "none"
        raise ConfigError(f"{setting}={spec}: no model holds the alias {match['alias']!r} in {local.root} "
                          f"(aliases: {held}); promote a model first")
    return ResolvedModel(local.root / "versions" / version, version, spec)


def _gcs_objects(uri: str, prefix: str) -> list[tuple[str, Callable[[str], None]]]:
    from captioning.gcs import split_uri, storage_client

    blobs = storage_client().list_blobs(split_uri(uri)[0], prefix=prefix)
    return [(b.name, b.download_to_filename) for b in blobs]


def _s3_objects(uri: str, prefix: str) -> list[tuple[str, Callable[[str], None]]]:
    import boto3

    from captioning.gcs import split_uri

    bucket = split_uri(uri)[0]
    s3 = boto3.client("s3")  # endpoint and credentials from the environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID...)
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            for o in page.get("Contents", [])]
    return [(key, lambda path, key=key: s3.download_file(bucket, key, path)) for key in keys]


def _bucket_errors() -> tuple[type[BaseException], ...]:
    """What an unreadable bucket raises: a missing bucket, no permission, no credentials, no endpoint."""
    from google.api_core import exceptions as gexc

    errors: tuple[type[BaseException], ...] = (gexc.NotFound, gexc.Forbidden, gexc.Unauthorized)
    try:
        from botocore import exceptions as bexc
    except ImportError:
        return errors
    return errors + (bexc.ClientError, bexc.BotoCoreError)  # no credentials, no endpoint, a bad CA bundle...


def _download_bucket_folder(uri: str, cache: Path | None, setting: str) -> Path:
    """Every object under the gs:// or s3:// prefix into a local folder (a model is a handful of files)."""
    import tempfile

    from captioning.gcs import split_uri

    prefix = split_uri(uri)[1]
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    dest = Path(cache or tempfile.mkdtemp(prefix="model-")) / "model"
    staging = dest.with_name(".model.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        lister = _gcs_objects if uri.startswith("gs://") else _s3_objects
        objects = [(name, fetch) for name, fetch in lister(uri, prefix) if not name.endswith("/")]
        for name, fetch in objects:
            target = (staging / name[len(prefix):].lstrip("/")).resolve()
            if not target.is_relative_to(staging.resolve()):  # "..", or a name that is an absolute path
                raise ConfigError(f"{setting}={uri}: the object {name!r} would land outside the model folder")
            target.parent.mkdir(parents=True, exist_ok=True)
            fetch(str(target))
    except _bucket_errors() as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise ConfigError(f"{setting}={uri}: cannot read the bucket: {getattr(exc, 'message', None) or exc}") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if not objects:
        shutil.rmtree(staging, ignore_errors=True)
        raise ConfigError(f"{setting}={uri}: no objects under this prefix")
    shutil.rmtree(dest, ignore_errors=True)
    staging.rename(dest)
    log.info("model: %d files from %s", len(objects), uri)
    return dest


def _from_wandb_registry(spec: str, collection: str, cache: Path | None, setting: str) -> ResolvedModel:
    """Online only: the model linked into the W&B Registry under an alias (what an online promote did)."""
    import tempfile

    import wandb

    match = ALIAS_PATTERN.fullmatch(spec[len("wandb:"):])
    if not match:
        raise ConfigError(f"{setting}={spec!r}: expected wandb:ALIAS or wandb:COLLECTION:ALIAS")
    name = f"wandb-registry-model/{match['collection'] or collection}:{match['alias']}"
    try:
        artifact = wandb.Api().artifact(name)
        path = Path(artifact.download(root=str(Path(cache or tempfile.mkdtemp(prefix="model-")) / "model")))
    except Exception as exc:  # the W&B client's errors have no common base
        raise ConfigError(f"{setting}={spec}: cannot fetch {name} from W&B: {exc}") from None
    return ResolvedModel(path, artifact.version, spec)
