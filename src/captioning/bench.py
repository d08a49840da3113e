"""Benchmarks behind ``captioning bench``: medians over repeats, one JSON line out."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path


COCO_TRAIN_ENTRIES = 82_783  # members of train2014.zip


def bench_features(images: int = 128, batch: int = 32, repeats: int = 3, weights: str = "none",
                   source: str = "zip") -> dict:
    """JPEGs read as process_data reads them (out of a zip, or files on disk) -> features written,
    against the backbone alone on in-memory tensors."""
    import zipfile

    import tensorflow as tf

    from captioning.data.archive import ArchiveImages, FolderImages
    from captioning.data.demo import synthetic_jpegs
    from captioning.features import IMAGE_SIZE, FeatureExtractor, extract_to_shards, plan_shards

    extractor = FeatureExtractor(weights)
    tensor = tf.random.uniform((batch, IMAGE_SIZE, IMAGE_SIZE, 3), -1.0, 1.0)
    extractor(tensor).numpy()  # trace and warm up once
    batches = -(-images // batch)
    with tempfile.TemporaryDirectory() as tmp:
        paths = synthetic_jpegs(Path(tmp) / "bench", images)
        if source == "zip":  # the COCO layout: one archive, a folder inside, read by member
            with zipfile.ZipFile(Path(tmp) / "bench.zip", "w", compression=zipfile.ZIP_DEFLATED) as zf:
                for path in paths:
                    zf.write(path, f"bench/{path.name}")
                for k in range(COCO_TRAIN_ENTRIES - len(paths)):  # a directory as large as train2014.zip's
                    zf.writestr(f"bench/padding_{k:06d}.jpg", b"")
            reader, keys = ArchiveImages({"bench": Path(tmp) / "bench.zip"}), [f"bench/{p.name}" for p in paths]
        else:
            reader, keys = FolderImages(), [str(p) for p in paths]
        end_to_end, model_only, stored = [], [], 0
        for r in range(repeats):
            started = time.perf_counter()
            for _ in range(batches):
                extractor(tensor).numpy()
            model_only.append(batches * batch / (time.perf_counter() - started))

            out = Path(tmp) / f"shards-{r}"
            plans = plan_shards({"bench": list(enumerate(keys))}, shard_images=max(images // 2, 1))
            started = time.perf_counter()
            extract_to_shards(plans, out, extractor, batch, source=reader)
            end_to_end.append(images / (time.perf_counter() - started))
            stored = sum(f.stat().st_size for f in out.glob("*.f16"))
    npy_float32 = 524_416  # np.save of one (64, 2048) float32 array, header included
    result = {
        "bench": "features", "source": source, "images": images, "batch": batch, "repeats": repeats,
        "weights": weights,
        "images_per_s": round(statistics.median(end_to_end), 2),
        "model_only_images_per_s": round(statistics.median(model_only), 2),
        "bytes_per_image": stored / images,
        "npy_float32_bytes_per_image": npy_float32,
        "runs": {"images_per_s": [round(v, 2) for v in end_to_end],
                 "model_only_images_per_s": [round(v, 2) for v in model_only]},
    }
    result["overlap_ratio"] = round(result["images_per_s"] / result["model_only_images_per_s"], 3)
    return result


# ------------------------------------------------------------------ model benchmarks

# The tutorial's sizes; the context at the embedding width, as the tutorial's encoder has it, so both do the same work.
BENCH_SIZES = {"vocab_size": 5000, "embedding_dim": 256, "units": 512, "context_dim": 256, "batch": 64}


def coco_like_lengths(count: int, rng):
    """Token counts with <start>/<end> like COCO's captions: mean about 12.5, at most 50."""
    import numpy as np

    words = 7 + rng.poisson(3.5, count)
    long = rng.random(count) < 0.01
    words[long] = rng.integers(16, 49, long.sum())
    return np.minimum(words + 2, 50)


def synthetic_processed(root: Path, images: int, captions_per_image: int, vocab_size: int, rng,
                        shard_images: int = 256):
    """A processed split written as process_data writes it (float16 feature shards, captions as token ids of
    COCO-like lengths), for the training benchmarks: ``ProcessedDataset.open(root)`` reads it."""
    import json

    import numpy as np

    from captioning.dataset import FORMAT
    from captioning.features import CHANNELS, GRID, RECORD_BYTES
    from captioning.text import Vocabulary

    root.mkdir(parents=True, exist_ok=True)
    shards = []
    for k, start in enumerate(range(0, images, shard_images)):
        name = f"train-{k:03d}.f16"
        count = min(shard_images, images - start)
        rng.standard_normal((count, GRID, CHANNELS), dtype=np.float32).astype(np.float16).tofile(root / name)
        shards.append(name)
    lengths = coco_like_lengths(images * captions_per_image, rng).reshape(images, captions_per_image)
    records = [{"image_id": i, "file": f"{i}.jpg", "references": [],
                "tokens": [[1, *rng.integers(4, vocab_size, n - 2).tolist(), 2] for n in lengths[i]]}
               for i in range(images)]
    (root / "train.json").write_text(json.dumps(records))
    words = ["<pad>", "<start>", "<end>", "<unk>"] + [f"w{i}" for i in range(vocab_size - 4)]
    Vocabulary(words, min_count=1, max_size=len(words)).save(root / "vocab.json")
    (root / "stats.json").write_text(json.dumps({"mean": [0.0] * CHANNELS, "std": [1.0] * CHANNELS}))
    split = {"images": images, "captions_file": "train.json", "shards": shards}
    (root / "dataset.json").write_text(json.dumps({
        "format": FORMAT, "vocab": "vocab.json", "max_length": 50, "record_bytes": RECORD_BYTES,
        "feature_stats": "stats.json", "splits": {"train": split, "val": split}}))
    return root


def drop_from_page_cache(files) -> None:
    """Make the next read of these files come from the disk (``posix_fadvise(DONTNEED)`` after an fsync)."""
    import os

    for name in files:
        fd = os.open(name, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def bench_train(steps: int = 20, repeats: int = 3, baseline: bool = True, input_only: bool = False,
                captions_per_image: int = 5) -> dict:
    """The per-image training step with its input pipeline in the loop (feature shards on disk, as train
    reads them), captions/s and images/s, with train.deterministic on (op determinism, no XLA: the CPU
    default) and off (XLA-compiled steps: the GPU default), against the tutorial's step on the same
    captions; and the input pipeline alone from a cold page cache, batches/s and bytes read per epoch."""
    import gc

    import numpy as np

    from captioning.config import Config
    from captioning.dataset import ProcessedDataset
    from captioning.features import RECORD_BYTES
    from captioning.steps.train import build_model, use_determinism

    import keras

    rng = np.random.default_rng(0)
    s = BENCH_SIZES
    per_batch = max(1, s["batch"] // captions_per_image)
    # Three times the images the timed steps take: the first third of an epoch's batches is mostly full ones
    # (a length bucket's last, partial batch comes when its last image does), as in a COCO epoch, where
    # partial batches are one per bucket in thousands.
    images = 3 * steps * per_batch
    cfg = Config.model_validate({"train": {k: s[k] for k in ("embedding_dim", "units", "context_dim")}})
    result = {"bench": "train", "steps": steps, "repeats": repeats, **s, "images_per_batch": per_batch,
              "captions_per_image": captions_per_image, "images": images}
    with tempfile.TemporaryDirectory() as tmp:
        # a few more images than the timed steps read: the input pipeline's figure is over whole epochs
        data = ProcessedDataset.open(synthetic_processed(Path(tmp) / "data", images, captions_per_image,
                                                          s["vocab_size"], rng))

        def batches():
            return data.image_batches("train", s["batch"], captions_per_image)  # from disk: no memory budget

        plan = batches()
        result.update({"batches_per_epoch": plan.batches_per_epoch, "batch_shapes": len(plan.shapes),
                       "mean_tokens": round(float((plan.tokens != 0).sum(1).mean()), 2),
                       "feature_bytes": plan.store.bytes})
        input_runs, bytes_read = [], 0
        for _ in range(repeats):
            plan.store.close()
            del plan
            gc.collect()  # no memory map of the shards left: the page cache can drop them
            drop_from_page_cache(data.shard_files("train"))
            plan = batches()
            started = time.perf_counter()
            for _ in plan.dataset(shuffle=True, seed=0, epoch=0):
                pass
            input_runs.append(plan.batches_per_epoch / (time.perf_counter() - started))
            bytes_read = plan.store.reads.records * RECORD_BYTES
        result.update({"input_batches_per_s": round(statistics.median(input_runs), 1),
                       "input_runs": [round(r, 1) for r in input_runs], "bytes_read_per_epoch": bytes_read})
        if input_only:
            return result
        timed, _ = plan.plan(0, shuffle=True, seed=0)
        timed = timed[:steps]
        real = timed >= 0
        captions = int(np.minimum(plan.counts[timed[real]], captions_per_image).sum())
        result.update({"timed_captions": captions, "timed_images": int(real.sum()),
                       "empty_rows_share": round(1 - real.mean(), 3)})
        for setting, key in (("on", ""), ("off", "xla_")):
            deterministic = use_determinism(setting)
            model = build_model(cfg, s["vocab_size"])
            model.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=not deterministic)
            dataset = batches().dataset(shuffle=True, seed=0, epoch=0)
            model.fit(dataset, epochs=1, verbose=0)  # every shape traced (and compiled) before timing
            first = dataset.take(steps)
            runs = _time_runs(lambda: model.fit(first, epochs=1, verbose=0), repeats, captions)
            result[f"{key}captions_per_s"] = round(statistics.median(runs), 1)
            result[f"{key}images_per_s"] = round(statistics.median(runs) * real.sum() / captions, 1)
            result[f"{key}steps_per_s"] = round(statistics.median(runs) / captions * steps, 2)
            result[f"{key}runs"] = [round(r, 1) for r in runs]
        use_determinism("auto")
        result["input_over_model_steps"] = round(result["input_batches_per_s"] / result["steps_per_s"], 1)
    if baseline:
        from captioning.tutorial_baseline import make_tutorial, pad_to

        # The same captions, as the tutorial batches them: 64 pairs a step, each padded to 50 tokens.
        tokens = [np.asarray(t, np.int32) for image in plan.tokens.reshape(images, -1, plan.tokens.shape[1])
                  for t in image]
        features = rng.standard_normal((s["batch"], 64, 2048)).astype(np.float16)
        padded = [pad_to(np.stack(tokens[k : k + s["batch"]])) for k in range(0, len(tokens) - s["batch"] + 1,
                                                                            s["batch"])]
        _, train_step, _ = make_tutorial(s["vocab_size"], s["embedding_dim"], s["units"])
        train_step(features, padded[0])  # trace
        base = _time_runs(lambda: [train_step(features, t) for t in padded], repeats, len(padded) * s["batch"])
        result["baseline_captions_per_s"] = round(statistics.median(base), 1)
        result["speedup"] = round(result["captions_per_s"] / result["baseline_captions_per_s"], 2)
        result["xla_speedup"] = round(result["xla_captions_per_s"] / result["baseline_captions_per_s"], 2)
    return result


def bench_decode(captions: int = 256, repeats: int = 3, baseline: bool = True, baseline_captions: int = 8) -> dict:
    """Greedy decoding of up to 50 tokens: batched and compiled, against one image at a time, eagerly."""
    import numpy as np

    from captioning.config import Config
    from captioning.decode import Decoder
    from captioning.steps.train import build_model

    rng = np.random.default_rng(0)
    s = BENCH_SIZES
    cfg = Config.model_validate({"train": {k: s[k] for k in ("embedding_dim", "units", "context_dim")}})
    model = build_model(cfg, s["vocab_size"])
    # end id outside the vocabulary: every caption runs the full 50 steps, the worst case
    decoder = Decoder(model, start_id=1, end_id=-1, max_length=50, method="greedy")
    batch = min(captions, 256)
    features = rng.standard_normal((batch, 64, 2048)).astype(np.float16)
    decoder(features)  # trace

    def ours():
        for start in range(0, captions, batch):
            decoder(features[: min(batch, captions - start)])

    runs = _time_runs(ours, repeats, captions)
    result = {"bench": "decode", "captions": captions, "max_tokens": 50, "repeats": repeats, **s, "batch": batch,
              "captions_per_s": round(statistics.median(runs), 1), "runs": [round(r, 1) for r in runs]}
    if baseline:
        from captioning.tutorial_baseline import make_tutorial

        _, _, caption_one = make_tutorial(s["vocab_size"], s["embedding_dim"], s["units"])
        caption_one(features[0], 1, -1, max_length=2)  # build the layers
        base = _time_runs(lambda: [caption_one(features[i % batch], 1, -1) for i in range(baseline_captions)],
                          repeats, baseline_captions)
        result["baseline_captions_per_s"] = round(statistics.median(base), 2)
        result["speedup"] = round(result["captions_per_s"] / result["baseline_captions_per_s"], 1)
    return result


def _time_runs(fn, repeats: int, items: int) -> list[float]:
    runs = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        runs.append(items / (time.perf_counter() - started))
    return runs


def bench_model(dest: Path) -> Path:
    """A model folder at the bench sizes with untrained weights (the backbone's too): what a served model
    costs, not what it says. Its captions never end early, so each runs the full 50 steps (the worst case)."""
    import numpy as np

    from captioning.bundle import save_bundle
    from captioning.config import Config
    from captioning.features import IMAGE_SIZE, FeatureExtractor
    from captioning.steps.train import build_model
    from captioning.text import Vocabulary

    s = BENCH_SIZES
    cfg = Config.model_validate({"train": {k: s[k] for k in ("embedding_dim", "units", "context_dim")}})
    tokens = ["<pad>", "<start>", "<end>", "<unk>"] + [f"w{i}" for i in range(s["vocab_size"] - 4)]
    vocab = Vocabulary(tokens, min_count=1, max_size=len(tokens))
    model = build_model(cfg, len(vocab))
    model.set_feature_stats(np.zeros(2048, np.float32), np.ones(2048, np.float32))
    backbone = dest / "backbone.weights.h5"
    dest.mkdir(parents=True, exist_ok=True)
    FeatureExtractor("none", IMAGE_SIZE).backbone.save_weights(str(backbone))
    meta = {"max_length": 50, "backbone": {"image_size": IMAGE_SIZE, "weights": "none"}, "config": {}}
    return save_bundle(dest / "model", model, vocab, meta, backbone, [])


def bench_serve(requests: int = 64, concurrency: int = 16, repeats: int = 3, model: str = "", url: str = "",
                registry: str = "", max_batch: int = 32, window_ms: float = 50.0, name: str = "") -> dict:
    """One-image requests to the server over loopback HTTP: ``concurrency`` at a time (batched by the server)
    against one at a time; captions/s and latency percentiles, medians over repeats. Without ``url`` the
    server runs here, on ``model`` (default: an untrained model at the bench sizes)."""
    import base64
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import requests as http

    from captioning.data.demo import synthetic_jpegs
    from captioning.serving import DEFAULT_NAME

    name = name or DEFAULT_NAME
    with tempfile.TemporaryDirectory() as tmp:
        images = [base64.b64encode(p.read_bytes()).decode() for p in synthetic_jpegs(Path(tmp) / "images", 8)]
        server = None
        if not url:
            server, url = _start_server(model or str(bench_model(Path(tmp))), registry, max_batch, window_ms)
        base = url.rstrip("/")
        http.get(f"{base}/v1/models/{name}", timeout=30).raise_for_status()  # the model is there and named so
        served = _served(base, name) if server is None else {
            "model": model or "untrained, bench sizes", "max_batch": max_batch, "window_ms": window_ms}
        local = threading.local()

        def one(i: int) -> float:
            session = getattr(local, "session", None) or http.Session()
            local.session = session
            started = time.perf_counter()
            resp = session.post(f"{base}/v1/models/{name}:predict",
                                json={"instances": [{"b64": images[i % len(images)]}]}, timeout=600)
            resp.raise_for_status()
            return time.perf_counter() - started

        def run(parallel: int) -> tuple[float, list[float]]:
            started = time.perf_counter()
            with ThreadPoolExecutor(parallel) as pool:
                latencies = list(pool.map(one, range(requests)))
            return requests / (time.perf_counter() - started), latencies

        run(concurrency), run(1)  # warm up: the compiled decoder traces each batch size once
        before = _batch_sizes(base, name)
        rows = {"concurrent": [], "sequential": []}
        for _ in range(repeats):
            rows["concurrent"].append(run(concurrency))
            rows["sequential"].append(run(1))
        after = _batch_sizes(base, name)
        if server:
            server.should_exit = True
    sizes = {k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k, 0) - before.get(k, 0)}

    def figures(kind: str) -> dict:
        rates = [rate for rate, _ in rows[kind]]
        p50 = [statistics.median(lat) for _, lat in rows[kind]]
        p95 = [statistics.quantiles(lat, n=20)[-1] if len(lat) > 1 else lat[0] for _, lat in rows[kind]]
        return {"captions_per_s": round(statistics.median(rates), 2),
                "p50_ms": round(1000 * statistics.median(p50), 1), "p95_ms": round(1000 * statistics.median(p95), 1),
                "runs_captions_per_s": [round(r, 2) for r in rates]}

    concurrent, sequential = figures("concurrent"), figures("sequential")
    return {"bench": "serve", "requests": requests, "concurrency": concurrency, "repeats": repeats,
            **({"url": url} if server is None else {}), **served,
            "concurrent": concurrent, "one_at_a_time": sequential,
            "speedup": round(concurrent["captions_per_s"] / sequential["captions_per_s"], 2),
            "batch_sizes": dict(sorted(sizes.items(), key=lambda kv: int(kv[0])))}


def _served(base: str, name: str) -> dict:
    """What a remote server says of itself (its v2 model metadata): the model version and its batching; None for
    what it does not say, never this command's own defaults."""
    import requests as http

    resp = http.get(f"{base}/v2/models/{name}", timeout=30)
    meta = resp.json() if resp.ok and "json" in resp.headers.get("content-type", "") else {}
    params = meta.get("parameters") if isinstance(meta.get("parameters"), dict) else {}
    versions = meta.get("versions") or []
    return {"model": f"{name} {versions[-1]}" if versions else None, "max_batch": params.get("max_batch"),
            "window_ms": params.get("window_ms")}


def _batch_sizes(base: str, name: str) -> dict:
    import requests as http

    resp = http.get(f"{base}/v2/models/{name}/stats", timeout=30)
    return resp.json().get("batch_sizes", {}) if resp.ok else {}


def _start_server(model: str, registry: str, max_batch: int, window_ms: float):
    """uvicorn on a free loopback port in a thread of this process; (server, url) once it answers."""
    import socket
    import threading

    import requests as http
    import uvicorn

    from captioning.caption import CaptionModel
    from captioning.model_source import resolve_model
    from captioning.serving import Limits, create_app, server_config

    resolved = resolve_model(model, registry)
    app = create_app(CaptionModel(resolved.path, version=resolved.version),
                     limits=Limits(max_batch=max_batch, window_ms=window_ms))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(server_config(app, "127.0.0.1", port))
    threading.Thread(target=server.run, daemon=True).start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if http.get(f"{url}/v2/health/ready", timeout=2).ok:
                return server, url
        except http.ConnectionError:
            time.sleep(0.1)
    raise RuntimeError(f"the server on {url} did not become ready in 120 s")
