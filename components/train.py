from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, target_image=IMAGE)
def train(
    processed: Input[Dataset],
    model: Output[Model],
    upstream_ref: str = "",
    preset: str = "coco2014",
    run_group: str = "",
    checkpoint_dir: str = "",
    epochs: int = 20,
    batch_size: int = 64,
    embedding_dim: int = 256,
    units: int = 512,
    learning_rate: float = 1e-3,
    dropout: float = 0.3,
    train_seed: int = 0,
    wandb_project: str = "captioning",
    wandb_entity: str = "",
    wandb_mode: str = "online",
    wandb_secret: str = "",
) -> NamedTuple("Outputs", [("wandb_ref", str)]):
    """Train the captioner; checkpoints go to checkpoint_dir (a volume or bucket) so a retried pod resumes."""
    from collections import namedtuple

    from captioning.kfp_steps import run_train

    ref = run_train(
        processed, model, upstream_ref, preset, run_group, checkpoint_dir, epochs=epochs, batch_size=batch_size,
        embedding_dim=embedding_dim, units=units, learning_rate=learning_rate, dropout=dropout,
        train_seed=train_seed, wandb_project=wandb_project, wandb_entity=wandb_entity,
        wandb_mode=wandb_mode, wandb_secret=wandb_secret)
    return namedtuple("Outputs", ["wandb_ref"])(ref)
