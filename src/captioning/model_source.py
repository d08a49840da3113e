"""Where a model to caption with comes from: a folder, an alias in a registry, or a bucket.

``captioning serve``, ``captioning caption`` and the batch captioning pipeline all
name their model one of these ways:

- a model folder (the train step's ``model`` output, or ``<registry>/<collection>/versions/vN``);
- an alias (``production``) or ``collection:alias`` in the local registry folder that promote wrote;
- ``wandb:ALIAS`` or ``wandb:COLLECTION:ALIAS``: the W&B Registry promote linked the model into (online);
- ``gs://bucket/prefix``: a model folder in a bucket (Vertex AI hands one over as ``AIP_STORAGE_URI``).

The version says which model answered: ``vN`` from a registry, else the model file's digest.
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

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
        raise ConfigError(f"{setting}: empty; name a model folder, an alias such as production, or gs://...")
    if spec.startswith("gs://"):
        folder = _download_gcs_folder(spec, cache, setting)
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
    from captioning.steps.promote import LocalRegistry

    local = LocalRegistry(Path(registry), match["collection"] or collection)
    if not local.root.is_dir():
        raise ConfigError(f"{setting}={spec}: no collection {local.root.name!r} in the registry {registry}")
    version = local.aliases().get(match["alias"])
    if not version:
        held = ", ".join(sorted(local.aliases())) or "none"
        raise ConfigError(f"{setting}={spec}: no model holds the alias {match['alias']!r} in {local.root} "
                          f"(aliases: {held}); promote a model first")
    return ResolvedModel(local.root / "versions" / version, version, spec)


def _download_gcs_folder(uri: str, cache: Path | None, setting: str) -> Path:
    """Every object under the prefix into a local folder (a model is a handful of files)."""
    import tempfile

    from google.api_core import exceptions as gexc

    from captioning.gcs import split_uri, storage_client

    bucket_name, prefix = split_uri(uri)
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    dest = Path(cache or tempfile.mkdtemp(prefix="model-")) / "model"
    staging = dest.with_name(".model.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        blobs = [b for b in storage_client().list_blobs(bucket_name, prefix=prefix) if not b.name.endswith("/")]
        for blob in blobs:
            target = (staging / blob.name[len(prefix):].lstrip("/")).resolve()
            if not target.is_relative_to(staging.resolve()):  # "..", or a name that is an absolute path
                raise ConfigError(f"{setting}={uri}: the object {blob.name!r} would land outside the model folder")
            target.parent.mkdir(parents=True, exist_ok=True)
            blob.download_to_filename(str(target))
    except (gexc.NotFound, gexc.Forbidden, gexc.Unauthorized) as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise ConfigError(f"{setting}={uri}: cannot read the bucket: {getattr(exc, 'message', exc)}") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if not blobs:
        shutil.rmtree(staging, ignore_errors=True)
        raise ConfigError(f"{setting}={uri}: no objects under this prefix")
    shutil.rmtree(dest, ignore_errors=True)
    staging.rename(dest)
    log.info("model: %d files from %s", len(blobs), uri)
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
