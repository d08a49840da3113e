"""Training batches (issue 23): B images with K captions each, every image once per epoch in an order
shuffled over the whole split, reproducible from the seed, another order each epoch, a resumed run
taking up its epoch's order, captions in rotation, a bounded set of shapes, one read per image an epoch."""

import json
import math

import numpy as np
import pytest

from captioning.dataset import (FORMAT, LENGTH_BUCKETS, FeatureShards, ProcessedDataset, memory_budget,
                                shuffle_epoch_callback)
from captioning.errors import DataError
from captioning.features import CHANNELS, GRID, RECORD_BYTES
from captioning.text import Vocabulary

IMAGES, K, BATCH = 300, 5, 32  # 6 images of 5 captions a batch
B = BATCH // K


def captions_of(i: int) -> int:
    """3 to 7 captions an image: fewer and more than K."""
    return 3 + i % 5


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A processed split whose image i has features all equal to i (exact in float16 below 2048),
    sorted by image id as process_data writes it, in three shards."""
    root = tmp_path_factory.mktemp("processed")
    rng = np.random.default_rng(0)
    records, shards = [], []
    for k, part in enumerate(np.array_split(np.arange(IMAGES), 3)):
        name = f"train-{k:03d}.f16"
        with open(root / name, "wb") as fh:
            for i in part:
                fh.write(np.full((GRID, CHANNELS), i, np.float16).tobytes())
        shards.append(name)
    for i in range(IMAGES):
        lengths = rng.integers(6, 14, captions_of(i))
        lengths[0] = 30 if i % 50 == 7 else lengths[0]  # a few long captions: another bucket
        records.append({"image_id": 1000 + i, "file": f"{i}.jpg", "references": ["x"] * captions_of(i),
                        "tokens": [[1, *rng.integers(4, 20, n).tolist(), 2] for n in lengths]})
    (root / "train.json").write_text(json.dumps(records))
    Vocabulary.build([[f"w{i}"] for i in range(16)], min_count=1, max_size=20).save(root / "vocab.json")
    (root / "feature_stats.json").write_text(json.dumps({"mean": [0.0] * CHANNELS, "std": [1.0] * CHANNELS}))
    manifest = {"format": FORMAT, "vocab": "vocab.json", "max_length": 34, "record_bytes": RECORD_BYTES,
                "feature_stats": "feature_stats.json",
                "splits": {split: {"images": IMAGES, "captions_file": "train.json", "shards": shards}
                           for split in ("train", "val")}}
    (root / "dataset.json").write_text(json.dumps(manifest))
    return ProcessedDataset.open(root)


def epoch_batches(data, epoch, seed=0, shuffle=True, memory=0):
    """[(image index or -1 per row, [caption tokens per row, () for an empty one])] in training order."""
    seen = []
    for x, tgt in data.image_batches("train", BATCH, K, memory).dataset(shuffle, seed, epoch):
        features, inputs, targets = x["features"].numpy(), x["tokens"].numpy(), tgt.numpy()
        assert features.shape == (B, GRID, CHANNELS) and inputs.shape[:2] == targets.shape[:2] == (B, K)
        images = features[:, 0, 0].astype(int)
        assert (features == images[:, None, None]).all()  # each row is one image's record
        rows = []
        for image, inp, out in zip(images, inputs, targets):
            captions = [tuple(int(t) for t in i[i != 0]) + tuple(int(t) for t in o[o != 0][-1:])
                        for i, o in zip(inp, out)]
            # targets: the inputs shifted by one; <end> is only a target
            assert all((i[1:] == o[:-1] * (o[1:] != 0)).all() for i, o in zip(inp, out))
            rows.append((int(image), captions))
        seen.append(rows)
    return seen


def real_rows(batches):
    """(image, its non-empty captions) of every row that is an image, in order; empty rows (all captions
    empty) dropped."""
    return [(image, [c for c in caps if c]) for rows in batches for image, caps in rows if any(caps)]


def spearman(a, b):
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def test_every_image_once_per_epoch_with_k_of_its_own_captions(dataset):
    records = dataset.records("train")
    for epoch in (0, 1):
        rows = real_rows(epoch_batches(dataset, epoch))
        assert sorted(image for image, _ in rows) == list(range(IMAGES))
        for image, caps in rows:
            own = [tuple(c) for c in records[image]["tokens"]]
            assert len(caps) == min(K, len(own)) and set(caps) <= set(own)
            assert len(set(caps)) == len(caps)  # no caption twice in one epoch
    ds = dataset.image_batches("train", BATCH, K).dataset(True, 0, 0)
    assert int(ds.cardinality()) == sum(1 for _ in ds)  # Keras knows the epoch's length beforehand


def test_each_caption_is_used_within_ceil_n_over_k_epochs_and_fewer_than_k_leave_masked_rows(dataset):
    records = dataset.records("train")
    used: dict[int, set] = {}
    for epoch in range(math.ceil(7 / K)):
        for image, caps in real_rows(epoch_batches(dataset, epoch)):
            used.setdefault(image, set()).update(caps)
    for image in range(IMAGES):
        assert used[image] == {tuple(c) for c in records[image]["tokens"]}, image
    # An image of 3 captions: 3 rows with captions, 2 rows of padding only (all-zero targets: no loss).
    x, tgt = next(iter(dataset.image_batches("train", BATCH, K).dataset(False)))
    targets = tgt.numpy()
    first = x["features"].numpy()[:, 0, 0].astype(int)
    for row, image in enumerate(first):
        empty = [not targets[row, k].any() for k in range(K)]
        assert empty == [k >= captions_of(image) for k in range(K)]


def test_the_order_is_shuffled_over_the_whole_split(dataset):
    order = [image for image, _ in real_rows(epoch_batches(dataset, 0))]
    assert abs(spearman(np.arange(len(order)), order)) < 0.15
    # the sequential order (validation) would correlate fully
    sequential = [image for image, _ in real_rows(epoch_batches(dataset, 0, shuffle=False))]
    assert spearman(np.arange(len(sequential)), sequential) > 0.95


def test_the_order_is_reproducible_from_the_seed_and_differs_per_epoch(dataset):
    first = epoch_batches(dataset, 0)
    assert epoch_batches(dataset, 0) == first
    assert epoch_batches(dataset, 1) != first
    assert epoch_batches(dataset, 0, seed=1) != first


def test_a_bounded_set_of_shapes_and_the_last_batch_of_a_bucket_padded_not_smaller(dataset):
    batches = dataset.image_batches("train", BATCH, K)
    lengths = {x["tokens"].shape[2] for x, _ in batches.dataset(True, 0, 0)}
    assert lengths == {t for _, _, t in batches.shapes}
    assert len(batches.shapes) <= len(LENGTH_BUCKETS) + 1 and len(lengths) >= 2  # the long captions' bucket too
    assert set(lengths) <= set(LENGTH_BUCKETS) | {dataset.max_length - 1}
    images = [image for rows in epoch_batches(dataset, 0) for image, caps in rows if not any(caps)]
    assert images, "some bucket's last batch is filled up with empty rows"
    # at most one partial batch per bucket
    assert math.ceil(IMAGES / B) <= len(epoch_batches(dataset, 0)) <= math.ceil(IMAGES / B) + len(lengths) - 1


def test_an_epoch_reads_each_image_once_from_disk_or_memory_and_both_give_the_same_batches(dataset):
    on_disk = dataset.image_batches("train", BATCH, K, memory_budget=0)
    in_memory = dataset.image_batches("train", BATCH, K, memory_budget=IMAGES * RECORD_BYTES)
    assert not on_disk.in_memory and in_memory.in_memory
    assert dataset.image_batches("train", BATCH, K, IMAGES * RECORD_BYTES - 1).in_memory is False
    for batches in (on_disk, in_memory):
        list(batches.dataset(True, 0, 3))
        assert batches.store.reads.records == IMAGES  # the split's features once, padding rows not re-read
    assert epoch_batches(dataset, 2, memory=IMAGES * RECORD_BYTES) == epoch_batches(dataset, 2)


def test_a_gather_returns_rows_in_the_order_asked_whatever_the_shard(dataset):
    store = FeatureShards(dataset.shard_files("train"), IMAGES)
    asked = [250, 3, 120, 3, 299, 0]
    assert store.gather(asked)[:, 0, 0].astype(int).tolist() == asked


def test_the_memory_budget_setting(monkeypatch, tmp_path):
    import os

    import captioning.dataset as module

    assert memory_budget("off") == 0
    assert memory_budget("2GiB") == 2 * 2**30 and memory_budget("1.5GB") == 1_500_000_000
    machine = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    (tmp_path / "v2").write_text("max\n")  # no limit: the machine's memory
    (tmp_path / "v1").write_text(f"{3 * 2**30}\n")  # a pod limited to 3 GiB
    monkeypatch.setattr(module, "CGROUP_MEMORY_LIMITS", (str(tmp_path / "v2"),))
    assert memory_budget("auto") == int(0.4 * machine)
    monkeypatch.setattr(module, "CGROUP_MEMORY_LIMITS", (str(tmp_path / "v2"), str(tmp_path / "v1")))
    assert memory_budget("auto") == int(0.4 * min(machine, 3 * 2**30))


def test_a_resumed_fit_takes_up_the_order_of_its_epoch_not_the_first(dataset):
    """Keras fit(initial_epoch=2), as BackupAndRestore resumes: the first batches are epoch 2's."""
    import keras
    import tensorflow as tf

    seen = []

    class Recorder(keras.Model):
        def __init__(self):
            super().__init__()
            self.w = self.add_weight(shape=(), initializer="zeros")

        def train_step(self, data):
            seen.append(data[0]["features"].numpy()[:, 0, 0].astype(int).tolist())
            return {"batches": len(seen)}

    def images_of(epoch):
        return [[image for image, _ in rows] for rows in epoch_batches(dataset, epoch)]

    variable = tf.Variable(0, dtype=tf.int64, trainable=False)
    ds = dataset.image_batches("train", BATCH, K).dataset(True, seed=0, epoch=variable)
    model = Recorder()
    model.compile(run_eagerly=True)
    model.fit(ds, initial_epoch=2, epochs=3, callbacks=[shuffle_epoch_callback(variable)], verbose=0,
              shuffle=False)
    assert seen == images_of(2)
    assert seen != images_of(0)


def test_a_shard_of_a_partial_record_is_refused_by_name(tmp_path):
    shard = tmp_path / "train-000.f16"
    shard.write_bytes(b"\0" * (RECORD_BYTES + 10))
    with pytest.raises(DataError, match="train-000.f16: .* not a whole number"):
        FeatureShards([str(shard)], 1)


def test_shards_on_a_gcsfuse_mount_are_read_from_a_local_copy(dataset, tmp_path, monkeypatch):
    """Vertex AI gives inputs as /gcs/... paths; random reads there are one range request each."""
    import captioning.dataset as module

    assert dataset.staged(tmp_path / "scratch") is dataset  # a local folder is read in place
    monkeypatch.setattr(module, "GCSFUSE_ROOT", str(dataset.root.resolve().parent) + "/")
    staged = dataset.staged(tmp_path / "scratch")
    assert staged.root == tmp_path / "scratch" / "staged-features"
    assert all(f.startswith(str(staged.root)) for f in staged.shard_files("train"))
    assert epoch_batches(staged, 1) == epoch_batches(dataset, 1)


def test_checkpoints_of_another_batching_are_never_resumed(dataset, monkeypatch):
    """Epochs trained one (image, caption) pair a row are another run: the batching is part of the key."""
    import captioning.steps.train as train_step
    from captioning.config import load_config

    cfg = load_config()
    ours = train_step._signature(cfg, dataset)
    monkeypatch.setattr(train_step, "BATCHING", "per-pair/0")
    assert train_step._signature(cfg, dataset) != ours


def test_the_decodings_tried_after_training_are_not_part_of_the_checkpoint_key(dataset):
    from captioning.config import load_config
    from captioning.steps.train import _signature

    base = load_config()
    other_grid = load_config(overrides=["train.decode_beam_widths=[2]", "train.decode_length_penalties=[0.3]"])
    other_model = load_config(overrides=["train.dropout=0.3"])
    # The self-critical stage keys a folder of its own inside the cross-entropy key's (train._scst_key).
    other_scst = load_config(overrides=["train.scst_learning_rate=0.001", "train.scst_epochs=2"])
    other_memory = load_config(overrides=["train.feature_memory=off"])  # the same batches, from disk
    other_k = load_config(overrides=["train.captions_per_image=3"])
    assert _signature(base, dataset) == _signature(other_grid, dataset) == _signature(other_memory, dataset) == \
        _signature(other_scst, dataset)
    assert len({_signature(base, dataset), _signature(other_model, dataset), _signature(other_k, dataset)}) == 3
    # More self-critical epochs extend that stage's folder (a constant rate); other SCST settings get another.
    from captioning.steps.train import _result_signature, _scst_key

    longer = load_config(overrides=["train.scst_learning_rate=0.001", "train.scst_epochs=5"])
    assert _scst_key(other_scst) == _scst_key(longer) != _scst_key(base)
    assert _result_signature(other_scst, "k") != _result_signature(longer, "k")


XLA_FIT = """
import sys
import keras
from captioning.dataset import ProcessedDataset
from captioning.model import Captioner
from captioning.steps.train import use_determinism

use_determinism("off")  # op determinism rules XLA out
data = ProcessedDataset.open(sys.argv[1])
train, val = (data.image_batches(split, int(sys.argv[2]), int(sys.argv[3])) for split in ("train", "val"))
model = Captioner(20, 8, 8, 0.0, 1.0, context_dim=8)
model.build()
model.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=True)
model.fit(train.dataset(True, 0, 0), validation_data=val.dataset(False), epochs=2, verbose=0)
print(len(train.shapes), len(val.shapes), model.step_traces.train, model.step_traces.val)
"""


@pytest.mark.slow  # trains: the slow tier
def test_xla_compiles_each_step_once_per_batch_shape_over_a_whole_run(dataset, tmp_path):
    """jit_compile on, two epochs with validation: XLA's own dump of every module it compiled (one file per
    compilation) shows each step compiled once per shape the data gives, the second epoch compiling nothing."""
    import subprocess
    import sys

    dump = tmp_path / "xla"
    proc = subprocess.run([sys.executable, "-c", XLA_FIT, str(dataset.root), str(BATCH), str(K)],
                          capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "XLA_FLAGS": f"--xla_dump_to={dump}"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    train_shapes, val_shapes, train_traces, val_traces = map(int, proc.stdout.split()[-4:])
    compiled: dict[str, int] = {}
    for path in dump.glob("module_*.a_inference_one_step_on_data_*.before_optimizations.txt"):
        function = path.name.split(".")[1]  # one per traced step function
        compiled[function] = compiled.get(function, 0) + 1
    assert 2 <= train_shapes <= len(LENGTH_BUCKETS) + 1
    assert sorted(compiled.values()) == sorted([train_shapes, val_shapes]), compiled
    assert 1 <= train_traces <= 2 and val_traces >= 1  # the loss is built per trace, not per batch
