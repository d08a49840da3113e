"""Batch captioning: the model holding the alias (or the folder, or gs:// prefix) named by ``model``."""

from kfp import dsl
from kfp.dsl import Model, Output

from captioning import DEFAULT_IMAGE


@dsl.component(base_image=DEFAULT_IMAGE, target_image=DEFAULT_IMAGE)
def resolve_model(resolved: Output[Model], preset: str = "coco2014", model: str = "production",
                  registry: str = "", collection: str = "captioning-model", wandb_mode: str = "online",
                  wandb_secret: str = "") -> str:
    """Copy the model that ``model`` names (an alias by default: in the W&B Registry when wandb_mode is online,
    as promote linked it there; else in the registry folder) into the artifact; return its version."""
    from pathlib import Path

    from captioning.steps.batch_caption import resolve_model_step
    from components.batch_pod import describe, measure, pod_config, run_or_exit

    cfg = pod_config(preset, model=model, registry=registry, collection=collection, wandb_mode=wandb_mode,
                     wandb_secret=wandb_secret)
    result = run_or_exit("resolve_model", lambda: resolve_model_step(cfg, Path(resolved.path)))
    measure(result, {}, {"resolved": resolved})
    describe(resolved, result, "resolved")
    return result.returns["model_version"]
