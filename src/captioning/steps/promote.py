"""promote: make the candidate the production model only if it is better by a margin.

The local registry (for in-process and offline runs) is a folder:

```
<registry>/<collection>/versions/vN/   model files + metrics.json
<registry>/<collection>/aliases.json   {"production": "vN"}
<registry>/<collection>/decisions.jsonl  every decision, promoted or not
```
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import stat
import time
from pathlib import Path

from captioning.config import Config
from captioning.errors import ConfigError, DataError
from captioning.io import file_lock, read_json, removed_on_failure, require_free_space, write_json_atomic
from captioning.steps.result import StepResult

log = logging.getLogger(__name__)


def decide(candidate: float, production: float | None, margin: float) -> bool:
    return production is None or candidate > production + margin


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class LocalRegistry:
    def __init__(self, root: Path, collection: str):
        self.root = Path(root) / collection
        self.aliases_file = self.root / "aliases.json"

    def aliases(self) -> dict[str, str]:
        return read_json(self.aliases_file) if self.aliases_file.exists() else {}

    def holder(self, alias: str) -> tuple[str, dict] | None:
        version = self.aliases().get(alias)
        if not version:
            return None
        return version, read_json(self.root / "versions" / version / "metrics.json", "registered metrics")

    @contextlib.contextmanager
    def transaction(self):
        """versions.lock: promotes sharing a registry take turns for the whole read-decide-write, so two
        promotes started together cannot both decide against the same production model."""
        versions = self.root / "versions"
        versions.mkdir(parents=True, exist_ok=True)
        with file_lock(versions):
            yield

    def register(self, model_dir: Path, metrics: dict, alias: str) -> str:
        with self.transaction():
            return self.register_in_transaction(model_dir, metrics, alias)

    def register_in_transaction(self, model_dir: Path, metrics: dict, alias: str) -> str:
        versions = self.root / "versions"
        number = 1 + max((int(p.name[1:]) for p in versions.glob("v*") if p.name[1:].isdigit()), default=0)
        version = f"v{number}"
        staging = versions / f".{version}.staging"
        shutil.rmtree(staging, ignore_errors=True)  # what a failed promote left
        from captioning.workflow import tree_size

        require_free_space(versions, tree_size(Path(model_dir))["bytes"], f"registering {version}")
        with removed_on_failure(staging):
            shutil.copytree(model_dir, staging)
            write_json_atomic(staging / "metrics.json", metrics)
        staging.rename(versions / version)
        write_json_atomic(self.aliases_file, {**self.aliases(), alias: version})
        return version

    def log_decision(self, decision: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        log_file = self.root / "decisions.jsonl"
        # O_NOFOLLOW and a regular-file check: a FIFO there would block every promote holding the lock
        try:
            fd = os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
        except OSError as exc:  # a symbolic link (ELOOP), a FIFO nobody reads (ENXIO)
            raise DataError(f"{log_file}: cannot append the decision: {exc.strerror or exc}") from None
        with os.fdopen(fd, "a") as fh:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise DataError(f"{log_file}: not a regular file; refusing to append the decision to it")
            fh.write(json.dumps(decision) + "\n")


def promote(cfg: Config, model_dir: str | Path, metrics_file: str | Path, registry_dir: str | Path,
            out_dir: str | Path) -> StepResult:
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    report = read_json(metrics_file, "evaluate metrics")
    metrics = report.get("metrics", report)
    name = cfg.promote.metric
    if name not in metrics:
        raise ConfigError(f"promote.metric={name!r}: not among the evaluated metrics ({', '.join(sorted(metrics))})")
    registry = LocalRegistry(Path(registry_dir), cfg.promote.collection)
    candidate = metrics[name]
    if not isinstance(candidate, (int, float)) or not math.isfinite(candidate):
        raise DataError(f"{metrics_file}: {name} is {candidate!r}, not a finite number; refusing to promote")
    model_digest = _digest(model_dir / "captioner.keras")
    with registry.transaction():  # what is read and what is written, as one: another promote waits
        holder = registry.holder(cfg.promote.alias)
        production = float(holder[1]["metrics"][name]) if holder and name in holder[1].get("metrics", {}) else None
        same_model = bool(holder) and holder[1].get("model_sha256") == model_digest
        promoted = not same_model and decide(candidate, production, cfg.promote.margin)
        version = holder[0] if same_model else None
        if promoted:
            version = registry.register_in_transaction(model_dir, {"metrics": metrics, "model_sha256": model_digest},
                                                       cfg.promote.alias)
        decision = {
            "promoted": promoted, "metric": name, "candidate": candidate, "production": production,
            "margin": cfg.promote.margin, "alias": cfg.promote.alias, "version": version,
            "previous_version": holder[0] if holder else None, "already_production": same_model,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        registry.log_decision(decision)
    write_json_atomic(out_dir / "decision.json", decision)
    if same_model:
        why = "this model already holds the alias"
    elif production is None:
        why = "no production model yet"
    else:
        why = f"{candidate:.4f} vs production {production:.4f} + margin {cfg.promote.margin}"
    log.info("promote: %s (%s %s)", "promoted" if promoted else "kept the production model", name, why)
    result = promote_result(cfg, {**decision, "reason": why})
    result.outputs = {"decision": str(out_dir / "decision.json"), "registry": str(registry.root)}
    return result


def promote_result(cfg: Config, decision: dict) -> StepResult:
    """The step's result from a decision, whichever registry made it (local folder or W&B Registry)."""
    decision = {"metric": cfg.promote.metric, "margin": cfg.promote.margin, "alias": cfg.promote.alias, **decision}
    metrics = {key: decision[key] for key in ("promoted", "candidate", "production", "metric", "registry")
               if key in decision}
    return StepResult(metrics=metrics, extra=decision)
