"""Batch captioning: the images under ``source``, split into shards."""

from typing import List

from kfp import dsl
from kfp.dsl import Dataset, Output

from captioning import DEFAULT_IMAGE


@dsl.component(base_image=DEFAULT_IMAGE, target_image=DEFAULT_IMAGE)
def plan_captions(plan: Output[Dataset], preset: str = "coco2014", source: str = "", shard_images: int = 1000,
                  listing: str = "") -> List[int]:
    """List the images (folder, gs:// prefix or .jsonl of URIs) into shard files; return the shard numbers.
    Cached on ``listing`` (list_images' fingerprint), refused if the images no longer match it."""
    from pathlib import Path

    from captioning.steps.batch_caption import plan_captions as plan_step
    from components.batch_pod import describe, measure, pod_config, run_or_exit

    cfg = pod_config(preset, source=source, shard_images=shard_images)
    result = run_or_exit("plan_captions", lambda: plan_step(cfg, Path(plan.path), listing))
    measure(result, {}, {"plan": plan})
    describe(plan, result, "plan")
    return result.returns["shards"]
