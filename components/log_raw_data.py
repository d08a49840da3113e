from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Dataset, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, target_image=IMAGE)
def log_raw_data(
    raw_data: Output[Dataset],
    base_url: str = "http://images.cocodataset.org",
    preset: str = "coco2014",
    run_group: str = "",
    wandb_project: str = "captioning",
    wandb_entity: str = "",
    wandb_mode: str = "online",
    wandb_secret: str = "",
) -> NamedTuple("Outputs", [("wandb_ref", str)]):
    """Fetch, verify and extract the COCO 2014 archives; the artifact is the extracted data and its manifest."""
    from collections import namedtuple

    from captioning.kfp_steps import run_log_raw_data

    ref = run_log_raw_data(raw_data, preset, run_group, base_url=base_url, wandb_project=wandb_project,
                           wandb_entity=wandb_entity, wandb_mode=wandb_mode, wandb_secret=wandb_secret)
    return namedtuple("Outputs", ["wandb_ref"])(ref)
