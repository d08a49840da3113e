from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Dataset, Input, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, target_image=IMAGE)
def process_data(
    raw_data: Input[Dataset],
    processed: Output[Dataset],
    upstream_ref: str = "",
    preset: str = "coco2014",
    run_group: str = "",
    max_images: int = 0,
    val_images: int = 5000,
    test_images: int = 5000,
    data_seed: int = 0,
    weights: str = "imagenet",
    feature_batch_size: int = 64,
    min_count: int = 5,
    max_vocab: int = 10000,
    wandb_project: str = "captioning",
    wandb_entity: str = "",
    wandb_mode: str = "online",
    wandb_secret: str = "",
) -> NamedTuple("Outputs", [("wandb_ref", str)]):
    """Clean and split the captions, build the vocabulary, extract InceptionV3 grid features."""
    from collections import namedtuple

    from captioning.kfp_steps import run_process_data

    ref = run_process_data(
        raw_data, processed, upstream_ref, preset, run_group, max_images=max_images, val_images=val_images,
        test_images=test_images, data_seed=data_seed, weights=weights, feature_batch_size=feature_batch_size,
        min_count=min_count, max_vocab=max_vocab, wandb_project=wandb_project, wandb_entity=wandb_entity,
        wandb_mode=wandb_mode, wandb_secret=wandb_secret)
    return namedtuple("Outputs", ["wandb_ref"])(ref)
