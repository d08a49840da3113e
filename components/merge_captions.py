"""Batch captioning: every shard's captions in plan order, one file, one W&B run."""

from typing import List, NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Output

from captioning import DEFAULT_IMAGE


@dsl.component(base_image=DEFAULT_IMAGE, target_image=DEFAULT_IMAGE)
def merge_captions(plan: Input[Dataset], shards: Input[List[Dataset]], captions: Output[Dataset],
                   wandb_run: Output[Artifact], preset: str = "coco2014", wandb_project: str = "captioning",
                   wandb_entity: str = "", wandb_mode: str = "online", wandb_secret: str = ""
                   ) -> NamedTuple("Outputs", [("captioned", int), ("skipped", int), ("wandb_ref", str)]):
    """captions.jsonl in plan order; a W&B table of the sample with its attention figures. An offline W&B run
    is kept in ``wandb_run``, as the training steps keep theirs."""
    import shutil
    import tempfile
    from collections import namedtuple
    from pathlib import Path

    from captioning.steps.batch_caption import merge_captions as merge_step, record_captions
    from captioning.tracking import StepTracker
    from components.batch_pod import describe, measure, pod_config, run_or_exit
    from components.factory import OFFLINE_WANDB_ROOT, _keep_offline_run

    cfg = pod_config(preset, wandb_project=wandb_project, wandb_entity=wandb_entity, wandb_mode=wandb_mode,
                     wandb_secret=wandb_secret)
    out = Path(captions.path)
    tracker = StepTracker(cfg, "caption", Path(tempfile.mkdtemp(prefix="caption-")))
    if tracker.mode == "offline":  # a fixed folder: W&B records its absolute paths, `wandb sync` needs them
        tracker.workdir = OFFLINE_WANDB_ROOT / "merge_captions"
        shutil.rmtree(tracker.workdir, ignore_errors=True)

    def merge():
        with tracker:
            result = merge_step(cfg, Path(plan.path), [Path(s.path) for s in shards], out)
            result.metrics["wandb_ref"] = record_captions(tracker, result, out)
        return result

    result = run_or_exit("merge_captions", merge)
    measure(result, {"plan": plan}, {"captions": captions})
    _keep_offline_run(tracker, wandb_run, result)
    describe(captions, result, "captions")
    outputs = namedtuple("Outputs", ["captioned", "skipped", "wandb_ref"])
    return outputs(result.metrics["captioned"], result.metrics["skipped"], result.metrics["wandb_ref"])
