"""Reading process_data's output back: the manifest, the vocabulary, tf.data pipelines."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import shutil

import numpy as np

from captioning.errors import DataError
from captioning.features import CHANNELS, GRID, RECORD_BYTES
from captioning.io import atomic_path, read_json, require_free_space
from captioning.text import Vocabulary

# Captions are batched with others of similar length and padded only to their own
# longest; COCO captions are 10-16 tokens long, far short of the longest.
# process_data's output; /2: every record carries its raw COCO captions ("references") for scoring.
FORMAT = "captioning-features/2"
GCSFUSE_ROOT = "/gcs/"  # where Vertex AI mounts Cloud Storage in a pod
LENGTH_BUCKETS = (8, 10, 12, 14, 16, 18, 21, 25, 30, 40)


@dataclass
class ProcessedDataset:
    root: Path
    manifest: dict
    vocab: Vocabulary

    @classmethod
    def open(cls, root: str | Path) -> "ProcessedDataset":
        root = Path(root)
        manifest = read_json(root / "dataset.json", "process_data manifest")
        if manifest.get("format") != FORMAT:
            raise DataError(f"{root / 'dataset.json'}: dataset format {manifest.get('format')!r}, this version "
                            f"reads {FORMAT!r} (records with raw references); run process_data again")
        return cls(root, manifest, Vocabulary.load(root / manifest["vocab"]))

    @property
    def max_length(self) -> int:
        return int(self.manifest["max_length"])

    def records(self, split: str) -> list[dict]:
        return read_json(self.root / self.manifest["splits"][split]["captions_file"], f"{split} captions")

    def shard_files(self, split: str) -> list[str]:
        return [str(self.root / s) for s in self.manifest["splits"][split]["shards"]]

    def feature_stats(self) -> dict:
        return read_json(self.root / self.manifest["feature_stats"], "feature statistics")

    def features(self, split: str):
        from captioning.features import read_features

        return read_features(self.shard_files(split))

    def caption_pairs(self, split: str, batch_size: int, shuffle: bool, seed: int = 0, epoch=0):
        """Batches of ({"features", "tokens"}, targets): teacher forcing, padded per batch.

        With ``shuffle`` every epoch visits each (image, caption) pair once, in an order permuted over
        the whole split (a stateless permutation of the pair index, keyed by ``seed`` and ``epoch``:
        an int, or a ``tf.Variable`` that ``ShuffleEpoch`` sets as each epoch begins, so a resumed run
        takes up its epoch's order). Features are read by index from the memory-mapped shards, so memory
        does not grow with the split; pairs are then batched with others of similar length."""
        import tensorflow as tf

        records = self.records(split)
        if not records:
            raise DataError(f"{self.root}: the {split} split is empty")
        pair_image = [i for i, r in enumerate(records) for _ in r["tokens"]]
        captions = tf.ragged.constant([c for r in records for c in r["tokens"]], dtype=tf.int32)
        images = tf.constant(pair_image, tf.int32)
        store = FeatureShards(self.shard_files(split), len(records))
        count = len(pair_image)
        order = tf.data.Dataset.range(count)
        if shuffle:
            def permute(j):
                key = tf.stack([tf.cast(seed, tf.int64), tf.cast(tf.convert_to_tensor(epoch), tf.int64)])
                return tf.random.experimental.index_shuffle(j, key, count - 1)
            order = order.batch(4096).map(permute).unbatch()
        pairs = order.map(lambda j: (tf.gather(images, j), captions[j][:-1], captions[j][1:]),
                          num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        batches = pairs.bucket_by_sequence_length(
            lambda image, inp, tgt: tf.shape(inp)[0],
            bucket_boundaries=list(LENGTH_BUCKETS),
            bucket_batch_sizes=[batch_size] * (len(LENGTH_BUCKETS) + 1),
            padded_shapes=([], [None], [None]),
        )

        def with_features(image, inp, tgt):
            features = tf.numpy_function(store.gather, [image], tf.float16, stateful=False)
            features.set_shape((None, GRID, CHANNELS))
            return {"features": features, "tokens": inp}, tgt

        # The batch count is known (pairs per length bucket, each bucket's last batch partial): Keras then
        # neither warns that the data "ran out" nor guesses the epoch's length from the first one.
        lengths = np.array([len(c) - 1 for r in records for c in r["tokens"]])
        per_bucket = np.bincount(np.searchsorted(LENGTH_BUCKETS, lengths, side="right"))
        n_batches = int(sum(-(-n // batch_size) for n in per_bucket))
        batches = batches.apply(tf.data.experimental.assert_cardinality(n_batches))
        return batches.map(with_features, num_parallel_calls=2).prefetch(2)

    def staged(self, scratch: Path) -> "ProcessedDataset":
        """This dataset with its feature shards on local disk when they are on a gcsfuse mount (Vertex AI
        gives inputs as /gcs/...): training reads records in random order, one range request each there."""
        if not str(self.root.resolve()).startswith(GCSFUSE_ROOT):
            return self
        local = Path(scratch) / "staged-features"
        for split in self.manifest["splits"]:
            for name in self.manifest["splits"][split]["shards"]:
                source, target = self.root / name, local / name
                if not target.exists() or target.stat().st_size != source.stat().st_size:
                    require_free_space(local, source.stat().st_size, f"a local copy of {source}")
                    with atomic_path(target, f"{target.stem}.part") as tmp:
                        shutil.copyfile(source, tmp)
        for name in (self.manifest["vocab"], self.manifest["feature_stats"],
                     *(info["captions_file"] for info in self.manifest["splits"].values()), "dataset.json"):
            shutil.copyfile(self.root / name, local / name)
        return ProcessedDataset(local, self.manifest, self.vocab)



class FeatureShards:
    """Random access into a split's feature shards (fixed-length records, memory-mapped: the page
    cache holds what is read, not the process)."""

    def __init__(self, files: list[str], images: int):
        counts = []
        for name in files:
            size = Path(name).stat().st_size
            if size % RECORD_BYTES:
                raise DataError(f"{name}: {size} bytes is not a whole number of {RECORD_BYTES}-byte feature "
                                "records; the shard is damaged, run process_data again")
            counts.append(size // RECORD_BYTES)
        if sum(counts) != images:
            raise DataError(f"{Path(files[0]).parent if files else '?'}: the shards hold {sum(counts)} feature "
                            f"records for {images} images; run process_data again")
        self.files = files
        self.starts = np.cumsum([0, *counts])
        self._maps: dict[int, np.ndarray] = {}

    def _shard(self, k: int) -> np.ndarray:
        if k not in self._maps:
            self._maps[k] = np.memmap(self.files[k], np.float16, "r").reshape(-1, GRID, CHANNELS)
        return self._maps[k]

    def gather(self, indices) -> np.ndarray:
        """Image indices of the split -> their (n, 64, 2048) float16 features."""
        indices = np.asarray(indices, np.int64)
        shards = np.searchsorted(self.starts, indices, side="right") - 1
        out = np.empty((len(indices), GRID, CHANNELS), np.float16)
        for k in np.unique(shards):
            rows = shards == k
            out[rows] = self._shard(int(k))[indices[rows] - self.starts[k]]
        return out


def shuffle_epoch_callback(epoch_variable):
    """A Keras callback that gives ``caption_pairs`` the number of the epoch that begins."""
    import keras

    class ShuffleEpoch(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            epoch_variable.assign(epoch)

    return ShuffleEpoch()
