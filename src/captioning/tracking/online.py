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


# The evaluate metric promote decided on, written into the model artifact's metadata when it is linked: the
# artifact's own metadata is train's (val_CIDEr, loss...), which holds no test metric to compare with.
PROMOTED_METRIC_KEY = "promoted_on"


def registry_holder_metric(collection: str, alias: str, metric: str) -> float | None:
    """The test metric of the model that holds ``alias``; None when there is none (no collection yet, no holder,
    or a holder linked without the metric: it cannot be compared, so it is replaced). Any other W&B error is the
    step's error: a candidate must not replace production because the registry could not be asked."""
    import wandb

    from captioning.errors import CaptioningError

    name = f"wandb-registry-model/{collection}:{alias}"
    try:
        holder = wandb.Api().artifact(name)
    except Exception as exc:  # noqa: BLE001 - the client has no common base; "not found" is the only answer
        if "not found" in str(exc).lower() or "does not exist" in str(exc).lower():
            return None
        raise CaptioningError(f"W&B Registry: cannot read {name} to compare with it: {exc}") from None
    recorded = (holder.metadata or {}).get(PROMOTED_METRIC_KEY) or {}
    value = recorded.get(metric) if isinstance(recorded, dict) else None
    return float(value) if value is not None else None


def link_to_registry(run, model_ref: str, collection: str, alias: str, metrics: dict) -> str:
    """Link the model under the alias, with the evaluate metrics it was promoted on in its metadata."""
    artifact = run.use_artifact(model_ref)
    artifact.metadata = {**(artifact.metadata or {}), PROMOTED_METRIC_KEY: metrics}
    artifact.save()
    target = f"wandb-registry-model/{collection}"
    run.link_artifact(artifact, target, aliases=[alias])
    return f"{target}:{alias}"
