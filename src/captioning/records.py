"""What each step logs to W&B: artifacts (with lineage), tables, pictures, history.

Called by both runners (in-process and the KFP components) around the library
steps, which stay free of tracking code. Each ``record_*`` returns the
reference of the artifact it logged, which the next step gets as upstream.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from captioning.config import Config
from captioning.steps.result import StepResult
from captioning.tracking import StepTracker, reference_uri

log = logging.getLogger(__name__)

SAMPLE_IMAGES = 48
EMBEDDING_DIMS = 50  # W&B's projector reads at most 150 dimensions from the run files


def _numbers(metrics: dict) -> dict:
    """Metric values W&B can keep in an artifact's metadata."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) and v is not None}


def record_log_raw_data(t: StepTracker, cfg: Config, result: StepResult, raw_dir: Path, uri: str) -> str:
    """``uri``: where the raw-data artifact stays once the pod is gone (gs://, minio://, s3://, a file URI)."""
    manifest = json.loads((raw_dir / "manifest.json").read_text())
    # The archives are in the artifact, or (with a download cache) only referenced there: then they stay on the
    # cache's volume, which W&B can name but not reach from elsewhere; the checksums below identify them.
    root = reference_uri(manifest.get("archive_root") or uri).rstrip("/")
    refs = {f["path"]: f"{root}/{f['path']}" for f in manifest["files"].values()}
    t.summary(result.metrics)
    t.table("raw_files", ["file", "source", "bytes", "sha256"],
            [[rel, f["source"], f["size"], f["sha256"]] for rel, f in manifest["files"].items()])
    return t.log_artifact("coco-2014-raw", "raw_data", files=[raw_dir / "manifest.json"], references=refs,
                          metadata={"checksums": {k: v["sha256"] for k, v in manifest["files"].items()},
                                    **manifest["counts"]})


def _pca(x: np.ndarray, dims: int) -> np.ndarray:
    x = x - x.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    return x @ vt[: min(dims, vt.shape[0])].T


def _archive_picture(images, key: str):
    """A W&B image of one picture read out of the raw archives; None where it cannot be read."""
    import io

    import wandb
    from PIL import Image

    try:
        with Image.open(io.BytesIO(images.read(key))) as picture:
            picture.thumbnail((640, 640))  # also refuses decompression bombs (PIL's own limit)
            return wandb.Image(picture.convert("RGB"))
    except Exception:  # a picture the decoder dropped too; the table keeps its row
        return None


def record_process_data(t: StepTracker, cfg: Config, result: StepResult, raw_dir: Path,
                        parts: dict[str, Path], uris: dict[str, str], scratch: Path | None = None) -> str:
    """``parts``: process_data's artifacts (train_data, test_data); ``uris``: where they stay for good."""
    from captioning.dataset import ProcessedDataset
    from captioning.steps.process_data import open_raw

    t.summary(result.metrics)
    skipped = result.extra.get("skipped", [])
    t.table("skipped_files", ["file", "reason"], [[s["file"], s["reason"]] for s in skipped])
    train = ProcessedDataset.open(parts["train_data"])
    if t.run is not None:
        # process_data verified the cached archives just now (and copied a bucket's into scratch, off Vertex AI)
        _, images = open_raw(raw_dir, verify_cache=False, scratch=scratch)
        records = train.records("train")[:SAMPLE_IMAGES]
        feats = np.stack([f.numpy().astype(np.float32).mean(axis=0)
                          for f in train.features("train").take(len(records))]) if records else np.zeros((0, 2048))
        reduced = _pca(feats, EMBEDDING_DIMS) if len(records) > 1 else feats[:, :EMBEDDING_DIMS]
        rows = [[record["image_id"], _archive_picture(images, record["file"]), "train",
                 " | ".join(record["captions"]), vector.tolist()] for record, vector in zip(records, reduced)]
        t.table("samples", ["image_id", "image", "split", "captions", "embedding"], rows)
    files = []
    for part, folder in parts.items():
        files += [(f"{part}/{p.name}", p) for p in sorted(folder.glob("*.json"))]
    # GBs of features stay where the pipeline keeps them: referenced by their durable URI, not uploaded.
    references = {f"{part}/features": f"{reference_uri(uris[part]).rstrip('/')}/features" for part in parts}
    return t.log_artifact("coco-2014-processed", "dataset", files=files, references=references,
                          metadata=_numbers(result.metrics))


def train_callbacks(t: StepTracker, cfg: Config, dataset_dir: Path, out_dir: Path) -> list:
    if t.run is None:
        return []
    import keras
    from wandb.integration.keras import WandbMetricsLogger, WandbModelCheckpoint

    from captioning.dataset import ProcessedDataset
    from captioning.decode import Decoder
    from captioning.steps.train import free_space_guard

    data = ProcessedDataset.open(dataset_dir)
    sample = data.records("val")[:8]
    features = np.stack([f.numpy() for f in data.features("val").take(len(sample))]) if sample else None

    class ExampleCaptions(keras.callbacks.Callback):
        """Captions of a fixed validation sample after every epoch, as a table."""

        def on_epoch_end(self, epoch, logs=None):
            if features is None:
                return
            decoder = Decoder(self.model, data.vocab.start_id, data.vocab.end_id, data.max_length, "greedy",
                              banned=data.vocab.non_words)
            tokens, _ = decoder(features)
            rows = [[epoch + 1, r["image_id"], data.vocab.decode(tok), r["captions"][0]] for r, tok in zip(sample, tokens)]
            t.table("examples", ["epoch", "image_id", "generated", "reference"], rows)

    staging = Path(os.environ.get("WANDB_DATA_DIR") or out_dir)
    return [
        WandbMetricsLogger(log_freq=10),  # per-batch and per-epoch loss, and the learning rate
        free_space_guard([(out_dir, 1), (staging, 1)]),  # the W&B checkpoint and the copy staged for upload
        # save_best_only stays off: it raises on the first epoch that does not improve (wandb#8842).
        WandbModelCheckpoint(str(out_dir / "wandb-checkpoint.weights.h5"), save_weights_only=True),
        ExampleCaptions(),
    ]


def record_train(t: StepTracker, result: StepResult, model_dir: Path) -> str:
    t.summary(result.metrics)
    return t.log_artifact("captioner", "model", dirs=[model_dir],
                          metadata=_numbers(result.metrics))


def record_evaluate(t: StepTracker, result: StepResult, out_dir: Path, test_dir: Path) -> str:
    t.summary(result.metrics)
    predictions = json.loads((out_dir / "predictions.json").read_text())
    if t.run is not None:
        import wandb

        rows = [[p["image_id"], wandb.Image(str(test_dir / p["sample"])) if p.get("sample") else None, p["caption"],
                 " | ".join(p["references"]), p["BLEU-4"], p["CIDEr"]] for p in predictions[:500]]
        t.table("predictions", ["image_id", "image", "caption", "references", "BLEU-4", "CIDEr"], rows)
        figures = result.extra.get("figures", [])
        if figures:
            t.log({"attention": [wandb.Image(f, caption=Path(f).stem) for f in figures]})
    files = [out_dir / "metrics.json", out_dir / "predictions.json"]
    return t.log_artifact("evaluation", "evaluation", files=files,
                          metadata=_numbers(result.metrics))


def record_promote(t: StepTracker, result: StepResult) -> str:
    t.summary({k: v for k, v in result.metrics.items() if v is not None})
    return ""


def promote_in_wandb_registry(t: StepTracker, cfg: Config, metrics: dict, model_ref: str) -> dict:
    """Online: the W&B Registry is the registry; the holder's test metric comes from the metadata promote wrote
    when it linked it. W&B offers no lock: two promotes racing may both link (the last one holds the alias)."""
    from captioning.tracking import online as wandb_online
    from captioning.registry import decide

    candidate = float(metrics[cfg.promote.metric])
    production = wandb_online.registry_holder_metric(cfg.promote.collection, cfg.promote.alias, cfg.promote.metric)
    promoted = decide(candidate, production, cfg.promote.margin)
    target = (wandb_online.link_to_registry(t.run, model_ref, cfg.promote.collection, cfg.promote.alias,
                                            _numbers(metrics)) if promoted else None)
    return {"promoted": promoted, "candidate": candidate, "production": production, "registry": target}
