"""The data plane as the data grows: the whole pipeline on two COCO-layout mirrors, 60 and 240 images.

What a cluster copies in and out of each pod is what the summary's ``artifacts`` figures say
(the same figures the components put in the KFP metadata). Raw data stays a few archives,
processed data grows by shards (not by images), and evaluate downloads only the test split.
"""

import pytest

from captioning.config import load_config
from captioning.features import RECORD_BYTES

pytestmark = pytest.mark.slow

SIZES = {"small": (30, 30), "large": (120, 120)}  # (train2014, val2014) images
SHARD_IMAGES = 50
TINY = ["data.val_images=10", "data.test_images=10", f"features.shard_images={SHARD_IMAGES}",
        "features.weights=none", "train.epochs=1", "train.embedding_dim=8", "train.units=16", "train.batch_size=64",
        "evaluate.decoder=greedy", "evaluate.attention_samples=1", "wandb.mode=disabled", "train.scst_epochs=0"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from captioning.data.demo import write_coco_mirror
    from captioning.runners.inprocess import run_pipeline

    out = {}
    for size, (train, val) in SIZES.items():
        mirror = tmp_path_factory.mktemp(f"mirror-{size}")
        write_coco_mirror(mirror, train_images=train, val_images=val, seed=5, awkward=False)
        cfg = load_config(overrides=[f"data.base_url={mirror}", *TINY])
        summary = run_pipeline(cfg, tmp_path_factory.mktemp(f"work-{size}"))
        assert summary["status"] == "ok", summary
        out[size] = summary["steps"]
    return out


def shards(steps, split):
    return -(-steps["process_data"]["metrics"][f"{split}_images"] // SHARD_IMAGES)


def test_raw_data_is_the_same_few_files_whatever_the_number_of_images(runs):
    small, large = (runs[s]["log_raw_data"]["artifacts"]["outputs"]["raw_data"] for s in SIZES)
    assert small["files"] == large["files"] <= 10
    assert large["bytes"] > 3 * small["bytes"]  # the bytes grow with the images, the objects do not
    assert runs["large"]["process_data"]["metrics"]["images"] == 4 * runs["small"]["process_data"]["metrics"]["images"]


def test_processed_files_grow_with_shards_not_images(runs):
    fixed = {}
    for size, steps in runs.items():
        out = steps["process_data"]["artifacts"]["outputs"]
        train_shards, test_shards = shards(steps, "train") + shards(steps, "val"), shards(steps, "test")
        # per shard: its records and its sidecar; the rest is a fixed set of metadata files
        fixed[size] = (out["train_data"]["files"] - 2 * train_shards, out["test_data"]["files"] - 2 * test_shards)
    assert fixed["small"] == fixed["large"]
    assert shards(runs["large"], "train") >= 4 * shards(runs["small"], "train") - 1
    images = runs["large"]["process_data"]["metrics"]["images"]
    assert runs["large"]["process_data"]["artifacts"]["outputs"]["train_data"]["files"] < images / 10


def test_each_step_downloads_only_what_it_reads(runs):
    for size, steps in runs.items():
        produced = steps["process_data"]["artifacts"]["outputs"]
        model = steps["train"]["artifacts"]["outputs"]["model"]
        assert steps["train"]["artifacts"]["inputs"] == {"train_data": produced["train_data"]}
        evaluate = steps["evaluate"]["artifacts"]["inputs"]
        assert evaluate == {"model": model, "test_data": produced["test_data"]}
        test_features = steps["process_data"]["metrics"]["test_images"] * RECORD_BYTES
        # the test split's features plus the model (with its backbone) plus metadata and a few sample JPEGs
        assert sum(a["bytes"] for a in evaluate.values()) <= test_features + model["bytes"] + (2 << 20), size
    # evaluate's download does not grow with the training data
    small, large = (sum(a["bytes"] for a in runs[s]["evaluate"]["artifacts"]["inputs"].values()) for s in SIZES)
    assert abs(large - small) < (1 << 20)
    # train's download grows by the features of the added training images (the backbone and metadata stay put)
    added = sum(runs["large"]["process_data"]["metrics"][f"{s}_images"] - runs["small"]["process_data"]["metrics"][f"{s}_images"]
                for s in ("train", "val"))
    grew = (runs["large"]["train"]["artifacts"]["inputs"]["train_data"]["bytes"]
            - runs["small"]["train"]["artifacts"]["inputs"]["train_data"]["bytes"])
    assert added * RECORD_BYTES <= grew <= added * RECORD_BYTES + (1 << 20)
