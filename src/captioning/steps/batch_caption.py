"""The batch captioning pipeline's steps: resolve the model, plan shards, caption each, merge.

```
resolve_model  which model version batch.model names now (an alias by default): a reference that stays put
fetch_model    that version, copied into the model artifact
list_images    a fingerprint of the images under batch.source now (names, sizes, modification times)
plan_captions  those images, split into shards of batch.shard_images URIs
caption_shard  one shard: JSON lines {uri, caption, score, model_version} (or {uri, error}), in order
merge_captions every shard's lines in plan order -> captions.jsonl, a summary, a W&B table of a sample
```

On Kubeflow only resolve_model and list_images look again every run (an alias moves, a folder fills);
they hand on strings that name what they found, so the steps after them are cached on those: the same
model version and the same images reuse every shard's captions.

An image that cannot be read or decoded is a line with an ``error``, never a failed shard.
Every file is written beside its final name and renamed: a retried pod finds whole files or none.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from captioning.config import Config
from captioning.errors import CaptioningError, DataError
from captioning.io import atomic_path, read_json, write_json_atomic
from captioning.steps.result import StepResult

log = logging.getLogger(__name__)

MODEL_INFO = "model_source.json"  # inside the model artifact: which version answered
PLAN_FILE = "plan.json"
SHARD_INFO = "shard.json"
CAPTIONS = "captions.jsonl"


def shard_file(index: int) -> str:
    return f"shard-{index:05d}.jsonl"


def resolve_model_step(cfg: Config) -> StepResult:
    """The version ``batch.model`` names now, as a reference that names only that version (``model_ref``)."""
    from captioning.bundle import load_bundle
    from captioning.model_source import ALIAS_PATTERN, resolve_model
    from captioning.tracking import resolve_mode

    spec = cfg.batch.model
    collection = cfg.promote.collection
    if resolve_mode(cfg) == "online" and ALIAS_PATTERN.fullmatch(spec) and not Path(spec).exists():
        # Online, promote linked the model into the W&B Registry (not a registry folder): look there.
        if cfg.wandb.api_key_secret:
            from captioning.gcp_secrets import ensure_wandb_key

            ensure_wandb_key(cfg.wandb.api_key_secret, "online")
        collection = ALIAS_PATTERN.fullmatch(spec)["collection"] or collection
        spec = f"wandb:{spec}"
    resolved = resolve_model(spec, cfg.promote.registry, collection, setting="batch.model")
    load_bundle(resolved.path)  # a broken model fails here, once, not in every shard
    if spec.startswith("wandb:"):
        ref = f"wandb:{collection}:{resolved.version}"  # the version itself, not the alias
    elif resolved.path.parent.name == "versions" and resolved.version == resolved.path.name:
        ref = str(resolved.path)  # a registry version folder: written once, never changed
    else:
        ref = spec  # a folder or gs:// prefix: fetch_model checks its content is still this version
    log.info("resolve_model: %s is %s (%s)", resolved.source, resolved.version, ref)
    return StepResult(metrics={"model_version": resolved.version, "model": resolved.source},
                      returns={"model_ref": ref, "model_version": resolved.version})


def fetch_model_step(cfg: Config, model_ref: str, model_version: str, out_dir: Path) -> StepResult:
    """The model version resolve_model found, copied into ``out_dir``; refused if the reference now holds another."""
    from captioning.model_source import resolve_model

    resolved = resolve_model(model_ref, cfg.promote.registry, cfg.promote.collection, setting="model_ref")
    if resolved.version != model_version:
        raise DataError(f"model_ref={model_ref}: now holds {resolved.version}, not {model_version} as resolve_model "
                        "found a moment ago (the folder or prefix was rewritten): run the pipeline again")
    out_dir = Path(out_dir)  # the same version resolve_model loaded: not loaded again
    if out_dir.resolve() != resolved.path.resolve():
        shutil.rmtree(out_dir, ignore_errors=True)
        shutil.copytree(resolved.path, out_dir)
    write_json_atomic(out_dir / MODEL_INFO, {"version": resolved.version, "source": cfg.batch.model,
                                             "ref": model_ref})
    return StepResult(metrics={"model_version": resolved.version}, outputs={"model": str(out_dir)})


def _images(cfg: Config) -> tuple[list[str], str]:
    """``batch.source``'s image URIs and their fingerprint; none is an error."""
    from captioning.images import image_listing

    uris, fingerprint = image_listing(cfg.batch.source)
    if not uris:
        raise DataError(f"batch.source={cfg.batch.source}: no images there (.jpg, .jpeg, .png, .gif, .bmp)")
    return uris, fingerprint


def list_images_step(cfg: Config) -> StepResult:
    """The images under ``batch.source`` now, as a fingerprint (``listing``) plan_captions checks again."""
    uris, fingerprint = _images(cfg)
    log.info("list_images: %d images, listing %s", len(uris), fingerprint)
    return StepResult(metrics={"images": len(uris)}, returns={"listing": fingerprint, "images": len(uris)})


def plan_captions(cfg: Config, out_dir: Path, listing: str = "") -> StepResult:
    """The images split into shards; with ``listing`` (list_images' fingerprint), refused if they changed since."""
    uris, fingerprint = _images(cfg)
    if listing and listing != fingerprint:
        raise DataError(f"batch.source={cfg.batch.source}: the images changed since list_images looked "
                        f"({len(uris)} now, listing {fingerprint} against {listing}): run the pipeline again")
    size = cfg.batch.shard_images
    shards = [uris[i:i + size] for i in range(0, len(uris), size)]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for index, shard in enumerate(shards):
        with atomic_path(out_dir / shard_file(index)) as tmp:
            tmp.write_text("".join(json.dumps({"uri": uri}) + "\n" for uri in shard))
    write_json_atomic(out_dir / PLAN_FILE, {"source": cfg.batch.source, "images": len(uris), "shards": len(shards),
                                            "shard_images": size, "listing": fingerprint})
    log.info("plan_captions: %d images in %d shards", len(uris), len(shards))
    return StepResult(metrics={"images": len(uris), "shards": len(shards)}, outputs={"plan": str(out_dir)},
                      returns={"shards": list(range(len(shards)))})


def caption_shard(cfg: Config, model_dir: Path, plan_dir: Path, index: int, out_dir: Path) -> StepResult:
    """Caption one shard's images in batches; attention figures for the first ``batch.sample`` of shard 0."""
    from captioning.caption import CaptionModel
    from captioning.images import ImageUnavailable, read_image

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    shard = Path(plan_dir) / shard_file(index)
    if not shard.is_file():
        raise DataError(f"{shard}: no such shard in the plan")
    uris = [json.loads(line)["uri"] for line in shard.read_text().splitlines() if line.strip()]
    info = read_json(model_dir / MODEL_INFO, "model source") if (model_dir / MODEL_INFO).is_file() else {}
    model = CaptionModel(model_dir, version=info.get("version", ""))
    version = model.version
    out_dir.mkdir(parents=True, exist_ok=True)
    lines: list[dict] = [{} for _ in uris]
    pending: list[tuple[int, object, bytes]] = []  # (position, prepared image, bytes for a figure)
    sample = cfg.batch.sample if index == 0 else 0
    figures = []

    def flush():
        results = model.caption([pixels for _, pixels, _ in pending])
        for (position, _, data), result in zip(pending, results):
            lines[position] = {"uri": uris[position], "caption": result.caption, "score": round(result.score, 6),
                               "model_version": version}
            if len(figures) < sample:
                figures.append(_figure(data, result, out_dir / "attention" / f"{position:05d}.png"))
                lines[position]["attention"] = f"attention/{position:05d}.png"
        pending.clear()

    for position, uri in enumerate(uris):
        try:
            data = read_image(uri, cfg.batch.max_image_bytes, cfg.batch.timeout_s)
            pending.append((position, model.prepare(data), data))
        except (ImageUnavailable, CaptioningError) as exc:
            lines[position] = {"uri": uri, "caption": None, "score": None, "model_version": version,
                               "error": str(exc)}
        if len(pending) >= cfg.batch.batch_size:
            flush()
    if pending:
        flush()
    with atomic_path(out_dir / CAPTIONS) as tmp:
        tmp.write_text("".join(json.dumps(line) + "\n" for line in lines))
    skipped = sum(1 for line in lines if line.get("error"))
    metrics = {"shard": index, "images": len(uris), "captioned": len(uris) - skipped, "skipped": skipped}
    write_json_atomic(out_dir / SHARD_INFO, {**metrics, "model_version": version})
    log.info("caption_shard %d: %d captioned, %d skipped", index, len(uris) - skipped, skipped)
    return StepResult(metrics=metrics, outputs={"captions": str(out_dir / CAPTIONS)})


def _figure(data: bytes, result, out_png: Path) -> str:
    from io import BytesIO

    import numpy as np
    from PIL import Image

    from captioning.attention import plot_attention

    with Image.open(BytesIO(data)) as image:
        rgb = np.asarray(image.convert("RGB"))
    return str(plot_attention(rgb, result.words, result.attention, out_png, title=result.caption))


def merge_captions(cfg: Config, plan_dir: Path, shard_dirs: list[Path], out_dir: Path) -> StepResult:
    """Every shard's lines in plan order (the shards may arrive in any order) into one file."""
    plan = read_json(Path(plan_dir) / PLAN_FILE, "caption plan")
    by_index = {}
    for folder in map(Path, shard_dirs):
        info = read_json(folder / SHARD_INFO, "shard result")
        by_index[int(info["shard"])] = folder
    missing = sorted(set(range(plan["shards"])) - set(by_index))
    if missing:
        raise DataError(f"{plan_dir}: shards {missing} of {plan['shards']} left no captions")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, figures = [], {}
    for index in range(plan["shards"]):
        for line in (by_index[index] / CAPTIONS).read_text().splitlines():
            row = json.loads(line)
            if row.get("attention"):
                figures[row["uri"]] = by_index[index] / row.pop("attention")
            rows.append(row)
    with atomic_path(out_dir / CAPTIONS) as tmp:
        tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
    captioned = [r for r in rows if not r.get("error")]
    versions = sorted({r["model_version"] for r in rows})
    metrics = {"images": len(rows), "captioned": len(captioned), "skipped": len(rows) - len(captioned),
               "shards": plan["shards"], "model_version": ",".join(versions),
               "mean_score": round(sum(r["score"] for r in captioned) / len(captioned), 6) if captioned else None}
    log.info("merge_captions: %d captioned, %d skipped, from %d shards", metrics["captioned"], metrics["skipped"],
             metrics["shards"])
    skipped = [{"uri": r["uri"], "reason": r["error"]} for r in rows if r.get("error")]
    return StepResult(metrics=metrics, outputs={"captions": str(out_dir / CAPTIONS)},
                      extra={"skipped": skipped[:100], "figures": {uri: str(p) for uri, p in figures.items()}})


def record_captions(tracker, result: StepResult, out_dir: Path) -> str:
    """The W&B run of the merge: the summary, a table of the sample with its attention figures, the file."""
    tracker.summary({k: v for k, v in result.metrics.items() if v is not None})
    if tracker.run is not None:
        import wandb

        rows = [json.loads(line) for line in (Path(out_dir) / CAPTIONS).read_text().splitlines()]
        figures = result.extra.get("figures", {})
        sample = [r for r in rows if r["uri"] in figures] or rows[:16]
        tracker.table("captions", ["uri", "caption", "score", "model_version", "attention"],
                      [[r["uri"], r.get("caption"), r.get("score"), r["model_version"],
                        wandb.Image(figures[r["uri"]]) if r["uri"] in figures else None] for r in sample])
        if result.extra.get("skipped"):
            tracker.table("skipped", ["uri", "reason"], [[s["uri"], s["reason"]] for s in result.extra["skipped"]])
    return tracker.log_artifact("captions", "captions", files=[Path(out_dir) / CAPTIONS],
                                metadata={k: v for k, v in result.metrics.items() if v is not None})
