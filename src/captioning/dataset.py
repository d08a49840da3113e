"""Reading process_data's output back: the manifest, the vocabulary, tf.data pipelines."""

from __future__ import annotations

import logging
import os
import re
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from captioning.errors import DataError
from captioning.features import CHANNELS, GRID, RECORD_BYTES
from captioning.io import atomic_path, read_json, require_free_space
from captioning.text import Vocabulary

log = logging.getLogger(__name__)

# process_data's output; /2: every record carries its raw COCO captions ("references") for scoring.
FORMAT = "captioning-features/2"
GCSFUSE_ROOT = "/gcs/"  # where Vertex AI mounts Cloud Storage in a pod
# Caption inputs are padded to one of these lengths (or to the data's longest): COCO captions are 10-16
# tokens long, far short of the longest, and a run's training step sees one batch shape per length, so
# XLA compiles it at most len(LENGTH_BUCKETS) + 1 times.
LENGTH_BUCKETS = (8, 10, 12, 14, 16, 18, 21, 25, 30, 40)
# The order of the training batches and which captions each image brings: part of the checkpoint key.
BATCHING = "per-image/1"


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

    def image_batches(self, split: str, batch_size: int, captions_per_image: int,
                      memory_budget: int = 0) -> "ImageBatches":
        """The split's per-image batches (``ImageBatches``: ``.dataset(...)`` for Keras); its features held in
        memory when they fit ``memory_budget`` bytes, else read from the shards on disk batch by batch."""
        records = self.records(split)
        if not records:
            raise DataError(f"{self.root}: the {split} split is empty")
        store = FeatureShards(self.shard_files(split), len(records))
        if store.bytes <= memory_budget:
            store = store.in_memory()
        return ImageBatches([r["tokens"] for r in records], store, batch_size, captions_per_image,
                            self.max_length)

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



class ImageBatches:
    """Teacher-forcing batches of B images with K captions each (COCO has 5 an image), as the reference
    implementations batch them (``seq_per_img``): each image's features are read once per batch and encoded
    once by the model, for all its K captions.

    - Every image once per epoch, in an order permuted over the whole split by ``(seed, epoch)``; ``epoch``
      is an int or a ``tf.Variable`` that ``ShuffleEpoch`` sets as each epoch begins, so a resumed run
      takes up its epoch's order.
    - An image with n > K captions brings K of them in rotation, captions (e·K + k) mod n in epoch e, so
      each is used within ⌈n/K⌉ epochs. An image with n < K brings all n every epoch; its other K − n rows
      are empty and masked out of the loss, so no caption counts twice.
    - Images are grouped by their longest caption into length buckets (``LENGTH_BUCKETS``) and a batch is
      padded to its bucket's length: with B fixed, a run has one batch shape per bucket at most. A bucket's
      last batch is filled up with empty rows (masked) instead of being a smaller shape.
    - One read per batch, its indices sorted (``FeatureShards.gather``): an epoch reads each image once.
    """

    def __init__(self, captions: list[list[list[int]]], store, batch_size: int, captions_per_image: int,
                 max_length: int):
        self.store = store
        self.captions_per_image = captions_per_image
        self.images_per_batch = max(1, batch_size // captions_per_image)
        counts = np.array([len(c) for c in captions], np.int64)
        if not len(counts) or (counts == 0).any():
            raise DataError(f"image {int(np.argmin(counts)) if len(counts) else 0} of the split has no caption; "
                            "run process_data again")
        self.counts, self.first = counts, np.concatenate([[0], np.cumsum(counts)[:-1]])
        flat = [tokens for image in captions for tokens in image]
        lengths = np.array([len(t) for t in flat], np.int64)  # <start> ... <end>
        width = max(int(lengths.max()), max_length, 2)
        self.tokens = np.zeros((len(flat), width), np.int32)
        for row, tokens in enumerate(flat):
            self.tokens[row, : len(tokens)] = tokens
        self.pad_lengths = np.array(sorted({b for b in LENGTH_BUCKETS if b < width - 1} | {width - 1}))
        longest_input = np.maximum.reduceat(lengths, self.first) - 1
        self.bucket = np.searchsorted(self.pad_lengths, longest_input)  # the shortest pad length that fits
        self.in_memory = isinstance(store, FeatureTable)
        sizes = np.bincount(self.bucket, minlength=len(self.pad_lengths))
        self.batches_per_epoch = int(sum(-(-n // self.images_per_batch) for n in sizes))

    @property
    def shapes(self) -> list[tuple[int, int, int]]:
        """Every (B, K, T) batch shape this split gives, in any epoch."""
        return [(self.images_per_batch, self.captions_per_image, int(self.pad_lengths[b]))
                for b in np.unique(self.bucket)]

    def plan(self, epoch: int, shuffle: bool, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """One epoch's batches: image indices (batches, B), -1 for an empty row, and each batch's length.
        A batch comes when its bucket has B images of the epoch's order (the rest at the end, in order)."""
        n, size = len(self.counts), self.images_per_batch
        order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
        rank = np.empty(n, np.int64)
        rank[order] = np.arange(n)
        batches, complete_at, lengths = [], [], []
        for bucket in np.unique(self.bucket):
            members = np.flatnonzero(self.bucket == bucket)
            members = members[np.argsort(rank[members])]
            for start in range(0, len(members), size):
                chunk = members[start : start + size]
                batches.append(np.pad(chunk, (0, size - len(chunk)), constant_values=-1))
                complete_at.append(rank[chunk[-1]])
                lengths.append(self.pad_lengths[bucket])
        sequence = np.argsort(complete_at, kind="stable")
        return np.stack(batches)[sequence], np.asarray(lengths, np.int32)[sequence]

    def assemble(self, images: np.ndarray, length: int, epoch: int):
        """One batch: features (B, P, C) float16, inputs and targets (B, K, length) int32 (0: padding)."""
        real = images >= 0
        images = np.where(real, images, images[real][0])  # an empty row repeats a read image: no extra read
        features = self.store.gather(images, count=int(real.sum()))
        k = np.arange(self.captions_per_image)
        counts = self.counts[images][:, None]
        rows = self.first[images][:, None] + (int(epoch) * self.captions_per_image + k) % counts
        used = real[:, None] & (k < counts)
        tokens = self.tokens[rows, : int(length) + 1] * used[..., None]
        targets = tokens[..., 1:]
        return features, tokens[..., :-1] * (targets != 0), targets  # <end> is a target, never an input

    def dataset(self, shuffle: bool, seed: int = 0, epoch=0):
        import tensorflow as tf

        def plan(epoch_value):
            images, lengths = self.plan(int(epoch_value), shuffle, seed)
            return images, lengths, np.full(len(lengths), epoch_value, np.int64)

        def batch(images, length, epoch_value):
            features, inputs, targets = tf.numpy_function(
                self.assemble, [images, length, epoch_value], [tf.float16, tf.int32, tf.int32], stateful=False)
            features.set_shape((self.images_per_batch, GRID, CHANNELS))
            inputs.set_shape((self.images_per_batch, self.captions_per_image, None))
            targets.set_shape((self.images_per_batch, self.captions_per_image, None))
            return {"features": features, "tokens": inputs}, targets

        # The plan is made as each pass over the dataset begins, for the epoch the variable holds then.
        epochs = tf.data.Dataset.from_tensors(0).map(lambda _: tuple(tf.numpy_function(
            plan, [tf.cast(tf.convert_to_tensor(epoch), tf.int64)], [tf.int64, tf.int32, tf.int64], stateful=True)))
        batches = epochs.flat_map(lambda *plan_: tf.data.Dataset.from_tensor_slices(plan_))
        batches = batches.map(batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        # Keras knows the epoch's length beforehand: it neither warns that the data "ran out" nor guesses.
        return batches.apply(tf.data.experimental.assert_cardinality(self.batches_per_epoch)).prefetch(
            tf.data.AUTOTUNE)


    def image_dataset(self, shuffle: bool, seed: int = 0, epoch=0):
        """The same batches of B images without their captions: ``{"features": (B, P, C), "images": (B,),
        "serial": ()}``, the split's image indices (-1: an empty row) and the batch's number over the run
        (epoch · batches + batch: a seed that a resumed run draws again), for training that draws its own
        captions (self-critical)."""
        import tensorflow as tf

        def plan(epoch_value):
            images, _ = self.plan(int(epoch_value), shuffle, seed)
            return images, int(epoch_value) * self.batches_per_epoch + np.arange(len(images), dtype=np.int64)

        def batch(images, serial):
            def read(images):
                real = images >= 0
                return self.store.gather(np.where(real, images, images[real][0]), count=int(real.sum()))

            features = tf.numpy_function(read, [images], tf.float16, stateful=False)
            features.set_shape((self.images_per_batch, GRID, CHANNELS))
            inputs = {"features": features, "images": tf.cast(images, tf.int32), "serial": tf.cast(serial, tf.int32)}
            return inputs, tf.zeros((self.images_per_batch,))

        epochs = tf.data.Dataset.from_tensors(0).map(lambda _: tuple(tf.numpy_function(
            plan, [tf.cast(tf.convert_to_tensor(epoch), tf.int64)], [tf.int64, tf.int64], stateful=True)))
        batches = epochs.flat_map(lambda *plan_: tf.data.Dataset.from_tensor_slices(plan_))
        batches = batches.map(batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return batches.apply(tf.data.experimental.assert_cardinality(self.batches_per_epoch)).prefetch(
            tf.data.AUTOTUNE)


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
        self.bytes = int(self.starts[-1]) * RECORD_BYTES
        self.reads = ReadCounter()  # records read: an epoch reads each image once
        self._maps: dict[int, np.ndarray] = {}

    def _shard(self, k: int) -> np.ndarray:
        if k not in self._maps:
            self._maps[k] = np.memmap(self.files[k], np.float16, "r").reshape(-1, GRID, CHANNELS)
        return self._maps[k]

    def gather(self, indices, count: int | None = None) -> np.ndarray:
        """Image indices of the split -> their (n, 64, 2048) float16 features, read in ascending order
        within each shard (one pass over the disk); ``count``: how many of them are distinct reads."""
        indices = np.asarray(indices, np.int64)
        order = np.argsort(indices, kind="stable")
        ascending = indices[order]
        shards = np.searchsorted(self.starts, ascending, side="right") - 1
        out = np.empty((len(indices), GRID, CHANNELS), np.float16)
        for k in np.unique(shards):
            rows = shards == k
            out[order[rows]] = self._shard(int(k))[ascending[rows] - self.starts[k]]
        self.reads.add(len(indices) if count is None else count)
        return out

    def close(self) -> None:
        """Unmap the shards (tf.data may keep this object alive): the page cache can then drop them."""
        self._maps.clear()

    def in_memory(self) -> "FeatureTable":
        """The whole split read once, shard by shard in file order, into memory."""
        table = np.empty((int(self.starts[-1]), GRID, CHANNELS), np.float16)
        for k, name in enumerate(self.files):
            part = memoryview(table[self.starts[k] : self.starts[k + 1]]).cast("B")
            with open(name, "rb") as fh:
                if fh.readinto(part) != len(part):
                    raise DataError(f"{name}: shorter than when it was opened; the shard changed while being read")
        log.info("features: %s and the rest of its split, %d records (%.1f GiB), held in memory",
                 Path(self.files[0]).name, len(table), self.bytes / 2**30)
        return FeatureTable(table)


class ReadCounter:
    """Records read, added to from tf.data's parallel calls."""

    def __init__(self):
        self.records, self._lock = 0, threading.Lock()

    def add(self, records: int) -> None:
        with self._lock:
            self.records += records


class FeatureTable:
    """A split's features in memory: the same ``gather`` as ``FeatureShards``, without the disk."""

    def __init__(self, table: np.ndarray):
        self.table, self.bytes, self.reads = table, table.nbytes, ReadCounter()

    def gather(self, indices, count: int | None = None) -> np.ndarray:
        self.reads.add(len(indices) if count is None else count)
        return np.take(self.table, np.asarray(indices, np.int64), axis=0)


# A pod's memory limit: cgroup v2, then v1 ("max" or a huge number where there is none).
CGROUP_MEMORY_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def memory_budget(setting: str) -> int:
    """``train.feature_memory`` in bytes. ``auto``: 40 % of the memory this process may use (its cgroup's
    limit in a pod, else the machine's), leaving the rest to TensorFlow, the model and the page cache."""
    if setting == "off":
        return 0
    if setting != "auto":
        number, unit = re.fullmatch(r"([0-9.]+)\s*([KMGT]i?B)", setting.strip()).groups()
        scale = {"K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}[unit[0]]
        return int(float(number) * (2 ** (10 * "KMGT".index(unit[0]) + 10) if "i" in unit else scale))
    limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in CGROUP_MEMORY_LIMITS:
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            limit = min(limit, int(text))
    return int(0.4 * limit)


def shuffle_epoch_callback(epoch_variable):
    """A Keras callback that gives ``image_batches`` the number of the epoch that begins."""
    import keras

    class ShuffleEpoch(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            epoch_variable.assign(epoch)

    return ShuffleEpoch()
