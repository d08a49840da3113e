"""The W&B calls that need the server (they fail offline), kept in one place.

Callers go through ``StepTracker`` and the promote step, which only call these
when the mode is online; everything else is tested offline.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def use_artifacts(run, references: list[str]) -> None:
    """Declare the upstream artifacts so W&B's lineage graph shows the chain."""
    for ref in references:
        if ref and "@offline-run-" not in ref:
            run.use_artifact(ref)


def qualified_name(artifact) -> str:
    artifact.wait()
    return f"{artifact.entity}/{artifact.project}/{artifact.name}"


def registry_holder_metric(collection: str, alias: str, metric: str) -> float | None:
    """The metric recorded in the metadata of the model that holds ``alias``, if any."""
    import wandb

    try:
        holder = wandb.Api().artifact(f"wandb-registry-model/{collection}:{alias}")
    except Exception:  # no collection yet, or no holder of the alias
        return None
    value = (holder.metadata or {}).get(metric)
    return float(value) if value is not None else None


def link_to_registry(run, model_ref: str, collection: str, alias: str) -> str:
    artifact = run.use_artifact(model_ref)
    target = f"wandb-registry-model/{collection}"
    run.link_artifact(artifact, target, aliases=[alias])
    return f"{target}:{alias}"
