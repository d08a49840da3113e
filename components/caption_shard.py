"""Batch captioning: one shard's images captioned on the device."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from captioning import DEFAULT_IMAGE


@dsl.component(base_image=DEFAULT_IMAGE, target_image=DEFAULT_IMAGE)
def caption_shard(model: Input[Model], plan: Input[Dataset], shard: int, captions: Output[Dataset],
                  preset: str = "coco2014", caption_batch_size: int = 32, sample: int = 16):
    """JSON lines {uri, caption, score, model_version}, or {uri, error} for an image that cannot be read."""
    from pathlib import Path

    from captioning.steps.batch_caption import caption_shard as shard_step
    from components.batch_pod import describe, measure, pod_config, run_or_exit

    cfg = pod_config(preset, caption_batch_size=caption_batch_size, sample=sample)
    result = run_or_exit("caption_shard", lambda: shard_step(cfg, Path(model.path), Path(plan.path), shard,
                                                             Path(captions.path)))
    measure(result, {"model": model, "plan": plan}, {"captions": captions})
    describe(captions, result, "captions")
