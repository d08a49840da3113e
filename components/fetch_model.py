"""Batch captioning: the model version resolve_model found, copied into the model artifact."""

from kfp import dsl
from kfp.dsl import Model, Output

from captioning import DEFAULT_IMAGE


@dsl.component(base_image=DEFAULT_IMAGE, target_image=DEFAULT_IMAGE)
def fetch_model(resolved: Output[Model], model_ref: str, model_version: str, preset: str = "coco2014",
                registry: str = "", collection: str = "captioning-model", wandb_mode: str = "online",
                wandb_secret: str = ""):
    """Cached on (model_ref, model_version): the same version is the same artifact, so the shards after it are
    cached too. Refuses a reference that now holds another version."""
    from pathlib import Path

    from captioning.steps.batch_caption import fetch_model_step
    from components.batch_pod import describe, measure, pod_config, run_or_exit

    cfg = pod_config(preset, registry=registry, collection=collection, wandb_mode=wandb_mode,
                     wandb_secret=wandb_secret)
    result = run_or_exit("fetch_model", lambda: fetch_model_step(cfg, model_ref, model_version, Path(resolved.path)))
    measure(result, {}, {"resolved": resolved})
    describe(resolved, result, "resolved")
