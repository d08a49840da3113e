"""Training order (issue 13, point 3): every pair once per epoch, shuffled over the whole split,
reproducible from the seed, another order each epoch, and a resumed run takes up its epoch's order."""

import json

import numpy as np
import pytest

from captioning.dataset import FORMAT, FeatureShards, ProcessedDataset, shuffle_epoch_callback
from captioning.errors import DataError
from captioning.features import CHANNELS, GRID, RECORD_BYTES
from captioning.text import Vocabulary

IMAGES, CAPTIONS_PER_IMAGE, BATCH = 300, 5, 32


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
        lengths = rng.integers(6, 14, CAPTIONS_PER_IMAGE)
        records.append({"image_id": 1000 + i, "file": f"{i}.jpg", "references": ["x"] * CAPTIONS_PER_IMAGE,
                        "tokens": [[1, *rng.integers(4, 20, n).tolist(), 2] for n in lengths]})
    (root / "train.json").write_text(json.dumps(records))
    Vocabulary.build([[f"w{i}"] for i in range(16)], min_count=1, max_size=20).save(root / "vocab.json")
    (root / "feature_stats.json").write_text(json.dumps({"mean": [0.0] * CHANNELS, "std": [1.0] * CHANNELS}))
    manifest = {"format": FORMAT, "vocab": "vocab.json", "max_length": 16, "record_bytes": RECORD_BYTES,
                "feature_stats": "feature_stats.json",
                "splits": {split: {"images": IMAGES, "captions_file": "train.json", "shards": shards}
                           for split in ("train", "val")}}
    (root / "dataset.json").write_text(json.dumps(manifest))
    return ProcessedDataset.open(root)


def epoch_pairs(data, epoch, seed=0, shuffle=True):
    """(image index, caption tokens) in the order training sees them."""
    seen = []
    for x, tgt in data.caption_pairs("train", BATCH, shuffle=shuffle, seed=seed, epoch=epoch):
        images = x["features"].numpy()[:, 0, 0].astype(int)
        assert (x["features"].numpy() == images[:, None, None]).all()  # each row is one image's record
        for image, inp, out in zip(images, x["tokens"].numpy(), tgt.numpy()):
            seen.append((int(image), tuple(int(t) for t in inp if t) + (int(out[out != 0][-1]),)))
        assert len(images) <= BATCH
    return seen


def batches_of(data, epoch):
    return [x["features"].numpy()[:, 0, 0].astype(int)
            for x, _ in data.caption_pairs("train", BATCH, shuffle=True, seed=0, epoch=epoch)]


def spearman(a, b):
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def test_every_pair_once_per_epoch_and_the_features_belong_to_the_caption(dataset):
    expected = sorted((i, tuple(c)) for i, r in enumerate(dataset.records("train")) for c in r["tokens"])
    for epoch in (0, 1):
        assert sorted(epoch_pairs(dataset, epoch)) == expected
    ds = dataset.caption_pairs("train", BATCH, shuffle=True, epoch=0)
    assert int(ds.cardinality()) == sum(1 for _ in ds)  # Keras knows the epoch's length beforehand


def test_the_order_is_shuffled_over_the_whole_split(dataset):
    order = [image for image, _ in epoch_pairs(dataset, 0)]
    assert abs(spearman(np.arange(len(order)), order)) < 0.1
    # the sequential order (validation) would correlate fully
    assert spearman(np.arange(len(order)), [i for i, _ in epoch_pairs(dataset, 0, shuffle=False)]) > 0.95


def test_same_image_captions_per_batch_are_as_rare_as_in_a_random_shuffle(dataset):
    def repeats(batch):
        return len(batch) - len(set(batch.tolist()))

    ours = np.mean([repeats(b) for b in batches_of(dataset, 0)])
    rng = np.random.default_rng(1)
    pairs = np.repeat(np.arange(IMAGES), CAPTIONS_PER_IMAGE)
    random = np.mean([repeats(p[k:k + BATCH]) for _ in range(20)
                      for p in [rng.permutation(pairs)] for k in range(0, len(p), BATCH)])
    assert ours <= random * 1.3 + 0.05, (ours, random)


def test_the_order_is_reproducible_from_the_seed_and_differs_per_epoch(dataset):
    first = epoch_pairs(dataset, 0)
    assert epoch_pairs(dataset, 0) == first
    assert epoch_pairs(dataset, 1) != first
    assert epoch_pairs(dataset, 0, seed=1) != first


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

    variable = tf.Variable(0, dtype=tf.int64, trainable=False)
    ds = dataset.caption_pairs("train", BATCH, shuffle=True, seed=0, epoch=variable)
    model = Recorder()
    model.compile(run_eagerly=True)
    model.fit(ds, initial_epoch=2, epochs=3, callbacks=[shuffle_epoch_callback(variable)], verbose=0,
              shuffle=False)
    assert seen == [b.tolist() for b in batches_of(dataset, 2)]
    assert seen != [b.tolist() for b in batches_of(dataset, 0)]


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
    assert [b.tolist() for b in batches_of(staged, 1)] == [b.tolist() for b in batches_of(dataset, 1)]


def test_the_decodings_tried_after_training_are_not_part_of_the_checkpoint_key(dataset):
    from captioning.config import load_config
    from captioning.steps.train import _signature

    base = load_config()
    other_grid = load_config(overrides=["train.decode_beam_widths=[2]", "train.decode_length_penalties=[0.3]"])
    other_model = load_config(overrides=["train.dropout=0.1"])
    assert _signature(base, dataset) == _signature(other_grid, dataset) != _signature(other_model, dataset)
