"""Benchmarks behind ``captioning bench``: medians over repeats, one JSON line out."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path


def bench_features(images: int = 128, batch: int = 32, repeats: int = 3, weights: str = "none") -> dict:
    """JPEG files on disk -> features written, against the backbone alone on in-memory tensors."""
    import tensorflow as tf

    from captioning.data.demo import synthetic_jpegs
    from captioning.features import IMAGE_SIZE, FeatureExtractor, extract_to_shards, plan_shards

    extractor = FeatureExtractor(weights)
    tensor = tf.random.uniform((batch, IMAGE_SIZE, IMAGE_SIZE, 3), -1.0, 1.0)
    extractor(tensor).numpy()  # trace and warm up once
    batches = -(-images // batch)
    with tempfile.TemporaryDirectory() as tmp:
        paths = [str(p) for p in synthetic_jpegs(Path(tmp) / "jpegs", images)]
        end_to_end, model_only, stored = [], [], 0
        for r in range(repeats):
            started = time.perf_counter()
            for _ in range(batches):
                extractor(tensor).numpy()
            model_only.append(batches * batch / (time.perf_counter() - started))

            out = Path(tmp) / f"shards-{r}"
            plans = plan_shards({"bench": [(i, p) for i, p in enumerate(paths)]}, shard_images=max(images // 2, 1))
            started = time.perf_counter()
            extract_to_shards(plans, out, extractor, batch)
            end_to_end.append(images / (time.perf_counter() - started))
            stored = sum(f.stat().st_size for f in out.glob("*.f16"))
    npy_float32 = 524_416  # np.save of one (64, 2048) float32 array, header included
    result = {
        "bench": "features", "images": images, "batch": batch, "repeats": repeats, "weights": weights,
        "images_per_s": round(statistics.median(end_to_end), 2),
        "model_only_images_per_s": round(statistics.median(model_only), 2),
        "bytes_per_image": stored / images,
        "npy_float32_bytes_per_image": npy_float32,
        "runs": {"images_per_s": [round(v, 2) for v in end_to_end],
                 "model_only_images_per_s": [round(v, 2) for v in model_only]},
    }
    result["overlap_ratio"] = round(result["images_per_s"] / result["model_only_images_per_s"], 3)
    return result
