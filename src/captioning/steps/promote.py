"""promote: make the candidate the production model only if it is better by a margin.

The registry it writes is ``captioning.registry`` (a folder, for in-process and offline runs); on W&B the
Registry collection (``captioning.records.promote_in_wandb_registry``).
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from pathlib import Path

from captioning.config import Config
from captioning.errors import ConfigError, DataError
from captioning.io import read_json, write_json_atomic
from captioning.registry import LocalRegistry, decide
from captioning.steps.result import StepResult

log = logging.getLogger(__name__)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


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
