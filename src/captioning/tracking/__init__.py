"""Weights & Biases tracking: one run per step, grouped per pipeline run.

Modes: ``online`` needs an API key and fails at the start of the step without
one; ``offline`` writes runs under ``<workdir>/wandb`` (syncable later with
``wandb sync``: the artifact staging folder ``WANDB_DATA_DIR`` sits beside
them); ``disabled`` logs nothing. ``WANDB_MODE`` in the environment overrides
the setting. The pipeline's data never flows through W&B, so results are the
same in every mode. Calls that need the server live in ``tracking.online``;
what each step logs, in ``captioning.records``.
"""

from __future__ import annotations

import json
import logging
import netrc
import os
import secrets
import time
from pathlib import Path
from typing import Any, Iterable

from captioning.config import Config
from captioning.errors import ConfigError
from captioning.redact import redact_tree

log = logging.getLogger(__name__)


# Where a pod learns which pipeline run it belongs to (never a component input: inputs make up KFP's cache key).
RUN_GROUP_ENV = "CAPTIONING_RUN_GROUP"  # set by the Docker runner for all its containers
KFP_RUN_ID_ENV = "KFP_RUN_ID"  # Kubeflow: the pod label pipeline/runid, through the downward API (pipeline.py)
VERTEX_RUN_LABELS_ENV = "VERTEX_AI_PIPELINES_RUN_LABELS"  # Vertex AI: the run's labels, as JSON
VERTEX_RUN_ID_LABEL = "vertex-ai-pipelines-run-billing-id"  # unique per pipeline run


def new_group() -> str:
    """A group name for the runs of one pipeline run, where the environment names none."""
    return time.strftime("run-%Y%m%d-%H%M%S-") + secrets.token_hex(3)


def pipeline_run_group() -> str:
    """The pipeline run this process belongs to, from the environment; "" when nothing names it."""
    if os.environ.get(RUN_GROUP_ENV):
        return os.environ[RUN_GROUP_ENV]
    if os.environ.get(KFP_RUN_ID_ENV):
        return f"kfp-{os.environ[KFP_RUN_ID_ENV]}"
    try:
        labels = json.loads(os.environ.get(VERTEX_RUN_LABELS_ENV) or "{}")
    except ValueError:
        labels = {}
    run_id = labels.get(VERTEX_RUN_ID_LABEL) if isinstance(labels, dict) else None
    return f"vertex-{run_id}" if run_id else ""


def resolve_mode(cfg: Config) -> str:
    mode = os.environ.get("WANDB_MODE") or cfg.wandb.mode
    if mode in ("dryrun",):
        mode = "offline"
    if mode not in ("online", "offline", "disabled"):
        raise ConfigError(f"WANDB_MODE={mode!r}: use online, offline or disabled")
    return mode


def has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://", 1)[-1].split("/")[0]
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


class StepTracker:
    """``with StepTracker(cfg, "train", workdir, group, upstream) as t: ...``"""

    def __init__(self, cfg: Config, step: str, workdir: str | Path, group: str = "", upstream: Iterable[str] = ()):
        self.cfg, self.step, self.workdir = cfg, step, Path(workdir)
        self.group = group or pipeline_run_group() or new_group()
        self.upstream = [u for u in upstream if u]
        self.mode = resolve_mode(cfg)
        self.run = None

    @property
    def online(self) -> bool:
        return self.mode == "online"

    def __enter__(self) -> "StepTracker":
        if self.mode == "disabled":
            return self
        if self.cfg.wandb.api_key_secret:  # Vertex AI: the key is read from Secret Manager when needed
            from captioning.gcp_secrets import ensure_wandb_key

            ensure_wandb_key(self.cfg.wandb.api_key_secret, self.mode)
        if self.online and not has_api_key():
            raise ConfigError(
                "wandb.mode=online but no W&B API key: set WANDB_API_KEY (on Kubeflow, the 'wandb' Secret) "
                "or run with wandb.mode=offline")
        import wandb

        wandb_dir = self.workdir / "wandb"
        # Offline artifacts are staged under WANDB_DATA_DIR: keep it beside the runs so `wandb sync` finds them.
        os.environ["WANDB_DIR"] = str(wandb_dir)
        os.environ["WANDB_DATA_DIR"] = str(wandb_dir / "artifact-staging")
        (wandb_dir / "artifact-staging").mkdir(parents=True, exist_ok=True)
        config = redact_tree(self.cfg.model_dump(mode="json"))
        if not self.online:
            config["upstream_artifacts"] = self.upstream  # lineage, recorded where use_artifact cannot run
        try:
            self.run = wandb.init(
                project=self.cfg.wandb.project, entity=self.cfg.wandb.entity or None, group=self.group,
                job_type=self.step, name=f"{self.step}-{self.group}", config=config, mode=self.mode,
                dir=str(wandb_dir), settings=wandb.Settings(silent=True, console="off"),
            )
        except Exception as exc:
            raise ConfigError(f"W&B refused to start the {self.step} run ({type(exc).__name__}: {exc}); "
                              "check WANDB_API_KEY, wandb.entity and wandb.project") from None
        if self.online:
            from captioning.tracking import online as wandb_online

            wandb_online.use_artifacts(self.run, self.upstream)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.run is None:
            return
        run, self.run = self.run, None
        if exc_type is None:
            run.finish(exit_code=0)
            return
        try:  # the step's own error is the one to report: W&B failing to close (e.g. on the same full disk) is not
            run.finish(exit_code=1)
        except Exception as closing:  # noqa: BLE001 - any W&B failure here
            log.warning("%s: the W&B run did not close cleanly after the step failed: %s", self.step, closing)

    # -------------------------------------------------------------- logging

    def log(self, data: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.log(data)

    def summary(self, metrics: dict[str, Any]) -> None:
        if self.run is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float, str, bool)) or value is None:
                    self.run.summary[key] = value

    def table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        if self.run is not None:
            import wandb

            self.log({key: wandb.Table(columns=columns, data=rows)})

    def log_artifact(self, name: str, kind: str, files: Iterable[Path | tuple[str, Path]] = (),
                     dirs: Iterable[Path] = (), references: dict[str, str] | None = None,
                     metadata: dict | None = None) -> str:
        """Log an artifact; returns its reference (``entity/project/name:vN`` online).

        ``files``: paths, or (name in the artifact, path); ``references``: name in the artifact -> URI of
        data that stays where it is (gs://, s3://, minio://, file://).
        """
        if self.run is None:
            return ""
        import wandb
        from wandb.sdk.artifacts.artifact_manifest_entry import ArtifactManifestEntry

        from captioning.io import require_free_space
        from captioning.io import tree_size

        files = list(files)
        dirs = list(dirs)
        staged = sum(tree_size(Path(item[1] if isinstance(item, tuple) else item))["bytes"] for item in (*files, *dirs))
        # W&B copies what it uploads into its staging folder first: refuse now what that volume cannot hold.
        require_free_space(os.environ.get("WANDB_DATA_DIR") or self.workdir, staged, f"W&B's copy of artifact {name}")
        artifact = wandb.Artifact(name, type=kind, metadata=metadata or {})
        for item in files:
            name_in, path = item if isinstance(item, tuple) else (None, item)
            artifact.add_file(str(path), name=name_in)
        for path in dirs:
            artifact.add_dir(str(path), name=Path(path).name)
        for name_in, uri in (references or {}).items():
            # The entry add_reference(uri, checksum=False) makes, without its storage handler: the gs:// and
            # s3:// handlers open a cloud client (and fail without credentials) even when they read nothing.
            artifact.manifest.add_entry(ArtifactManifestEntry(path=name_in, ref=uri, digest=uri))
        logged = self.run.log_artifact(artifact)
        if self.online:
            from captioning.tracking import online as wandb_online

            return wandb_online.qualified_name(logged)
        return f"{self.cfg.wandb.project}/{name}@offline-run-{self.run.id}"


def reference_uri(location: str | Path) -> str:
    """A W&B reference for data that stays where it is."""
    text = str(location)
    if "://" in text:
        return text
    return Path(text).resolve().as_uri()
