"""Reading process_data's output back: the manifest, the vocabulary, tf.data pipelines."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from captioning.errors import DataError
from captioning.io import read_json
from captioning.text import Vocabulary

# Captions are batched with others of similar length and padded only to their own
# longest; COCO captions are 10-16 tokens long, far short of the longest.
# process_data's output; /2: every record carries its raw COCO captions ("references") for scoring.
FORMAT = "captioning-features/2"
LENGTH_BUCKETS = (8, 10, 12, 14, 16, 18, 21, 25, 30, 40)
CACHE_LIMIT_BYTES = 4 << 30  # keep features in memory across epochs below this


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

    def feature_bytes(self, split: str) -> int:
        return self.manifest["splits"][split]["images"] * self.manifest["record_bytes"]

    def features(self, split: str):
        from captioning.features import read_features

        return read_features(self.shard_files(split))

    def caption_pairs(self, split: str, batch_size: int, shuffle: bool, seed: int = 0):
        """Batches of ({"features", "tokens"}, targets): teacher forcing, padded per batch."""
        import tensorflow as tf

        records = self.records(split)
        if not records:
            raise DataError(f"{self.root}: the {split} split is empty")
        captions = tf.ragged.constant([r["tokens"] for r in records], dtype=tf.int32)
        features = self.features(split)
        if self.feature_bytes(split) < CACHE_LIMIT_BYTES:
            features = features.cache()
        images = tf.data.Dataset.zip(features, tf.data.Dataset.from_tensor_slices(captions))
        if shuffle:
            images = images.shuffle(min(len(records), 1024), seed=seed, reshuffle_each_iteration=True)
        pairs = images.flat_map(
            lambda f, caps: tf.data.Dataset.from_tensor_slices(caps).map(lambda c: (f, c[:-1], c[1:])))
        if shuffle:
            pairs = pairs.shuffle(2048, seed=seed + 1, reshuffle_each_iteration=True)
        batches = pairs.bucket_by_sequence_length(
            lambda f, inp, tgt: tf.shape(inp)[0],
            bucket_boundaries=list(LENGTH_BUCKETS),
            bucket_batch_sizes=[batch_size] * (len(LENGTH_BUCKETS) + 1),
            padded_shapes=([None, None], [None], [None]),
        )
        return batches.map(lambda f, inp, tgt: ({"features": f, "tokens": inp}, tgt)).prefetch(2)

    def pair_count(self, split: str) -> int:
        return sum(len(r["tokens"]) for r in self.records(split))
