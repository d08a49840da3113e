"""Batch captioning: what images ``source`` holds now, as a fingerprint."""

from typing import NamedTuple

from kfp import dsl

from captioning import DEFAULT_IMAGE


@dsl.component(base_image=DEFAULT_IMAGE, target_image=DEFAULT_IMAGE)
def list_images(preset: str = "coco2014", source: str = ""
                ) -> NamedTuple("Outputs", [("listing", str), ("images", int)]):
    """The fingerprint of the images under ``source`` (URIs with sizes and modification times or generations).
    Uncached (a folder fills); plan_captions, cached on it, splits the same images into the same shards."""
    from collections import namedtuple

    from captioning.steps.batch_caption import list_images_step
    from components.batch_pod import pod_config, run_or_exit

    cfg = pod_config(preset, source=source)
    result = run_or_exit("list_images", lambda: list_images_step(cfg))
    return namedtuple("Outputs", ["listing", "images"])(result.returns["listing"], result.returns["images"])
