"""Batch captioning: which model version ``model`` names now (the alias, folder or gs:// prefix)."""

from typing import NamedTuple

from kfp import dsl

from captioning import DEFAULT_IMAGE


@dsl.component(base_image=DEFAULT_IMAGE, target_image=DEFAULT_IMAGE)
def resolve_model(preset: str = "coco2014", model: str = "production", registry: str = "",
                  collection: str = "captioning-model", wandb_mode: str = "online", wandb_secret: str = ""
                  ) -> NamedTuple("Outputs", [("model_ref", str), ("model_version", str)]):
    """Look the model up (an alias by default: in the W&B Registry when wandb_mode is online, as promote linked
    it there; else in the registry folder) and load it once; return a reference to that version alone and the
    version. Uncached (an alias moves); fetch_model, cached on these two strings, copies the model."""
    from collections import namedtuple

    from captioning.steps.batch_caption import resolve_model_step
    from components.batch_pod import pod_config, run_or_exit

    cfg = pod_config(preset, model=model, registry=registry, collection=collection, wandb_mode=wandb_mode,
                     wandb_secret=wandb_secret)
    result = run_or_exit("resolve_model", lambda: resolve_model_step(cfg))
    return namedtuple("Outputs", ["model_ref", "model_version"])(result.returns["model_ref"],
                                                                 result.returns["model_version"])
