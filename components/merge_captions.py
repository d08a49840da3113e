"""Batch captioning: every shard's captions in plan order, one file, one W&B run."""

from typing import List, NamedTuple

from kfp import dsl
from kfp.dsl import Dataset, Input, Output

from captioning import DEFAULT_IMAGE


@dsl.component(base_image=DEFAULT_IMAGE, target_image=DEFAULT_IMAGE)
def merge_captions(plan: Input[Dataset], shards: Input[List[Dataset]], captions: Output[Dataset],
                   preset: str = "coco2014", wandb_project: str = "captioning", wandb_entity: str = "",
                   wandb_mode: str = "online", wandb_secret: str = ""
                   ) -> NamedTuple("Outputs", [("captioned", int), ("skipped", int), ("wandb_ref", str)]):
    """captions.jsonl in plan order; a W&B table of the sample with its attention figures."""
    import tempfile
    from collections import namedtuple
    from pathlib import Path

    from captioning.steps.batch_caption import merge_captions as merge_step, record_captions
    from captioning.tracking import StepTracker
    from components.batch_pod import describe, pod_config, run_or_exit

    cfg = pod_config(preset, wandb_project=wandb_project, wandb_entity=wandb_entity, wandb_mode=wandb_mode,
                     wandb_secret=wandb_secret)
    out = Path(captions.path)

    def merge():
        with StepTracker(cfg, "caption", Path(tempfile.mkdtemp(prefix="caption-"))) as tracker:
            result = merge_step(cfg, Path(plan.path), [Path(s.path) for s in shards], out)
            result.metrics["wandb_ref"] = record_captions(tracker, result, out)
        return result

    result = run_or_exit("merge_captions", merge)
    describe(captions, result)
    outputs = namedtuple("Outputs", ["captioned", "skipped", "wandb_ref"])
    return outputs(result.metrics["captioned"], result.metrics["skipped"], result.metrics["wandb_ref"])
