from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Metrics, Model, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, target_image=IMAGE)
def evaluate(
    model: Input[Model],
    processed: Input[Dataset],
    raw_data: Input[Dataset],
    metrics: Output[Metrics],
    predictions: Output[Dataset],
    report: Output[HTML],
    upstream_ref: str = "",
    preset: str = "coco2014",
    run_group: str = "",
    decoder: str = "beam",
    beam_width: int = 3,
    attention_samples: int = 4,
    promote_metric: str = "CIDEr",
    wandb_project: str = "captioning",
    wandb_entity: str = "",
    wandb_mode: str = "online",
    wandb_secret: str = "",
) -> NamedTuple("Outputs", [("Output", float), ("wandb_ref", str)]):
    """Caption the test split, score it (BLEU, METEOR, ROUGE-L, CIDEr-D, blind baseline), draw attention.

    ``Output`` is the score the promote gate reads (``promote_metric``). It keeps KFP's default
    name because kfp.local 2.17 resolves only ``<task>-Output`` channels in ``dsl.If`` conditions.
    """
    from collections import namedtuple

    from captioning.kfp_steps import run_evaluate

    score, ref = run_evaluate(
        model, processed, raw_data, metrics, predictions, report, upstream_ref, preset, run_group,
        decoder=decoder, beam_width=beam_width, attention_samples=attention_samples,
        promote_metric=promote_metric, wandb_project=wandb_project, wandb_entity=wandb_entity,
        wandb_mode=wandb_mode, wandb_secret=wandb_secret)
    return namedtuple("Outputs", ["Output", "wandb_ref"])(score, ref)
