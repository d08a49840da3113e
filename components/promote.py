from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Input, Metrics, Model

from components.image import IMAGE


@dsl.component(base_image=IMAGE, target_image=IMAGE)
def promote(
    model: Input[Model],
    metrics: Input[Metrics],
    upstream_ref: str = "",
    preset: str = "coco2014",
    run_group: str = "",
    registry: str = "",
    promote_metric: str = "CIDEr",
    promote_margin: float = 0.0,
    promote_alias: str = "production",
    wandb_project: str = "captioning",
    wandb_entity: str = "",
    wandb_mode: str = "online",
    wandb_secret: str = "",
) -> NamedTuple("Outputs", [("promoted", bool), ("decision", str)]):
    """Promote the candidate if it beats the production model by the margin."""
    from collections import namedtuple

    from captioning.kfp_steps import run_promote

    promoted, decision = run_promote(
        model, metrics, upstream_ref, preset, run_group, registry, promote_metric=promote_metric,
        promote_margin=promote_margin, promote_alias=promote_alias, wandb_project=wandb_project,
        wandb_entity=wandb_entity,
        wandb_mode=wandb_mode, wandb_secret=wandb_secret)
    return namedtuple("Outputs", ["promoted", "decision"])(promoted, decision)
