"""process_data: captions -> clean tokens, images -> InceptionV3 grid features.

Reads log_raw_data's manifest and its zips (images are read straight out of
them, never extracted) and writes two artifacts, so that each later step
downloads only what it reads:

``train_data`` (train reads it): the train and val splits, and the backbone
``test_data`` (evaluate reads it): the test split, a few of its images, the blind baseline

Both hold, for their splits:

- ``dataset.json``: the manifest later steps read (splits, shards, shapes, vocabulary, lengths)
- ``vocab.json``, ``feature_stats.json`` (per-channel mean/std of the training features)
- ``features/<split>-NNNNN.f16`` + ``.json``: fixed-length float16 records and their image ids
- ``<split>.captions.json``: per record, the image, its cleaned captions and token ids

and ``train_data`` keeps ``report.json``: every file that was skipped, with the reason.
"""

from __future__ import annotations

import logging
import random
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path, PurePosixPath

import numpy as np

from captioning.config import ATTENTION_SAMPLE_LIMIT, MAX_CAPTION_WORDS, Config
from captioning.data import bucket_cache
from captioning.errors import DataError
from captioning.features import CHANNELS, GRID, RECORD_BYTES, FeatureExtractor, extract_to_shards, plan_shards
from captioning.io import atomic_path, read_json, save_weights_atomic, write_json_atomic
from captioning.data.archive import (MAX_EXPANDED_BYTES, MAX_EXPANSION_RATIO, ArchiveImages, index_archive,
                                     read_json_member)
from captioning.dataset import FORMAT
from captioning.steps.log_raw_data import MANIFEST
from captioning.steps.result import StepResult
from captioning.text import Vocabulary, clean_caption, length_at_percentile

log = logging.getLogger(__name__)

DATASET = "dataset.json"
SPLITS = ("train", "val", "test")
PARTS = {"train_data": ("train", "val"), "test_data": ("test",)}  # artifact -> the splits it holds
SAMPLES = "samples"  # in test_data: the test images evaluate draws attention on
# Karpathy's split: 5000 validation and 5000 test images out of val2014's 40504.
KARPATHY_HELD_OUT, VAL2014_IMAGES = 5000, 40504


def _confined(image_dir: str, name) -> str | None:
    """``<image_dir>/<name>`` when ``name`` is a plain relative path that stays inside ``image_dir``; else None."""
    if not isinstance(name, str) or not name or "\\" in name or "\0" in name:
        return None
    try:
        name.encode("utf-8")  # a lone surrogate names no member and no file can hold it (the report included)
    except UnicodeEncodeError:
        return None
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or (len(name) > 1 and name[1] == ":"):
        return None
    return f"{image_dir}/{path}"


# Far above any real caption (COCO's are single sentences of a few dozen words), so scoring equals COCOEvalCap's
# on real data; a longer one is cut there, and reported.
MAX_REFERENCE_CHARS = 10_000


def load_coco_captions(data, where: str, image_dir: str, source: str, max_words: int = MAX_CAPTION_WORDS):
    """{image_id: {"file": key, "captions": [clean...], "references": [raw...]}}, the count of dropped blank
    captions, the skipped images and bad entries (each ``{"file", "reason"}``) and the count of captions
    truncated to ``max_words`` for training. The cleaned text trains and builds the vocabulary; the raw
    captions, as COCO has them, are what evaluate scores against (coco-caption's protocol).

    ``data`` is a parsed COCO caption file (``where`` names it in errors). A file that is not one fails;
    an entry that is wrong (an id that is not an integer, one image id twice, a ``file_name`` leaving
    ``image_dir``, a caption that is not a string) is skipped with the file and the id named.
    """
    images_in = data.get("images") if isinstance(data, dict) else None
    annotations = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(images_in, list) or not isinstance(annotations, list):
        raise DataError(f"{where}: not a COCO caption file (it needs lists 'images' and 'annotations')")
    skipped: list[dict] = []

    def bad(what: str, reason: str) -> None:
        skipped.append({"file": f"{where} {what}", "reason": reason})

    files: dict[int, str] = {}
    seen: Counter = Counter(img["id"] for img in images_in if isinstance(img, dict) and type(img.get("id")) is int)
    for n, img in enumerate(images_in):
        image_id = img.get("id") if isinstance(img, dict) else None
        if type(image_id) is not int:  # ids name files later (samples, figures): integers only, as COCO has
            bad(f"images[{n}]", f"image id {image_id!r} is not an integer")
        elif seen[image_id] > 1:
            bad(f"images[{n}]", f"image id {image_id} appears {seen[image_id]} times; its captions could belong "
                "to either, so none is used")
        elif (key := _confined(image_dir, img.get("file_name"))) is None:
            bad(f"image {image_id}", f"file_name {img.get('file_name')!r} is not a plain path inside {image_dir}/")
        else:
            files[image_id] = key
    captions: dict[int, list[str]] = defaultdict(list)
    raw: dict[int, list[str]] = defaultdict(list)
    blank = truncated = 0
    for n, ann in enumerate(annotations):
        image_id = ann.get("image_id") if isinstance(ann, dict) else None
        caption = ann.get("caption") if isinstance(ann, dict) else None
        if type(image_id) is not int:
            bad(f"annotations[{n}]", f"image_id {image_id!r} is not an integer")
            continue
        if not isinstance(caption, str):
            bad(f"annotations[{n}] (image {image_id})", f"caption {caption!r} is not a string")
            continue
        if len(caption) > MAX_REFERENCE_CHARS:  # scoring one of 20 MB took minutes and gigabytes
            bad(f"annotations[{n}] (image {image_id})", f"caption of {len(caption)} characters; its first "
                f"{MAX_REFERENCE_CHARS} are kept")
            caption = caption[:MAX_REFERENCE_CHARS]
        try:
            caption.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate ("\ud800" is legal JSON): no file could hold it
            caption = caption.encode("utf-8", errors="replace").decode("utf-8")
            bad(f"annotations[{n}] (image {image_id})", "caption holds text that is not valid Unicode (a lone "
                "surrogate); kept with '?' in its place")
        words = clean_caption(caption).split()
        if len(words) > max_words:
            words, truncated = words[:max_words], truncated + 1
        if words:
            captions[image_id].append(" ".join(words))
            raw[image_id].append(caption)
        else:
            blank += 1
    images = {}
    for image_id, key in sorted(files.items()):
        if not captions.get(image_id):
            skipped.append({"file": key, "reason": "no usable caption"})
            continue
        images[image_id] = {"file": key, "captions": captions[image_id], "references": raw[image_id],
                            "source": source}
    return images, blank, skipped, truncated


def archive_at(raw_dir: Path, manifest: dict, path: str, what: str = "archive") -> Path:
    """Where an archive the manifest names lies: in the raw-data artifact, or in the download cache it references
    (``archive_root``: the same volume, mounted at the same path). Nothing may lead out of that folder."""
    root = Path(manifest["archive_root"]) if manifest.get("archive_root") else raw_dir
    if not (root / path).resolve().is_relative_to(root.resolve()):
        raise DataError(f"{raw_dir / MANIFEST}: {what} {path!r} is outside "
                        f"{'the download cache ' + str(root) if manifest.get('archive_root') else 'the raw-data artifact'}")
    return root / path


def _check_referenced(raw_dir: Path, manifest: dict) -> None:
    """Archives the manifest only references were verified by log_raw_data, perhaps runs ago (KFP's cache): each
    must still be there with the size and SHA-256 it recorded."""
    from captioning.data.fetch import sha256_file

    for entry in manifest["files"].values():
        path = archive_at(raw_dir, manifest, entry["path"])
        again = "run log_raw_data again (a pipeline run with caching off, enable_caching=False)"
        if not path.is_file():
            raise DataError(f"{path}: the download cache no longer holds this archive, which {raw_dir / MANIFEST} "
                            f"references; {again}")
        if path.stat().st_size != entry["size"] or sha256_file(path) != entry["sha256"]:
            raise DataError(f"{path}: changed in the download cache since log_raw_data verified it (size or SHA-256 "
                            f"differs from {raw_dir / MANIFEST}); {again}")


def open_raw(raw_dir: Path, limits: tuple[int, float] = (MAX_EXPANDED_BYTES, MAX_EXPANSION_RATIO),
             verify_cache: bool = True, scratch: Path | None = None) -> tuple[dict, ArchiveImages]:
    """log_raw_data's manifest and a reader of its archives, each checked entry by entry first (and, when only
    referenced in a download cache, against its recorded size and SHA-256 (CRC32C in a bucket) unless
    ``verify_cache`` is off). A bucket's archives are read through Vertex AI's mount, else copied into
    ``scratch`` (default: a temporary folder)."""
    manifest = read_json(raw_dir / MANIFEST, "log_raw_data manifest")
    if manifest.get("format") != "coco-archives/1":
        raise DataError(f"{raw_dir / MANIFEST}: not a log_raw_data manifest of this version "
                        f"(format {manifest.get('format')!r}); run log_raw_data again")
    if bucket_cache.is_bucket(manifest.get("archive_root")):
        root = manifest["archive_root"]
        if verify_cache:
            bucket_cache.check_referenced(raw_dir / MANIFEST, root, manifest["files"])
        scratch = Path(scratch) if scratch else Path(tempfile.mkdtemp(prefix="raw-data-"))
        manifest = {**manifest, "archive_root": str(bucket_cache.local_root(root, manifest["files"], scratch))}
    elif manifest.get("archive_root") and verify_cache:
        _check_referenced(raw_dir, manifest)
    for path in sorted(set(manifest["members"].values())):
        index_archive(archive_at(raw_dir, manifest, path), *limits)
    return manifest, ArchiveImages({top: archive_at(raw_dir, manifest, path)
                                    for top, path in manifest["members"].items()})


def held_out_sizes(pool: int, val: int | None, test: int | None) -> tuple[int, int]:
    """Validation and test sizes: as set, else Karpathy-proportional; the rest of val2014 trains."""
    def proportional(n):
        return max(1, round(pool * KARPATHY_HELD_OUT / VAL2014_IMAGES)) if n is None else n

    n_val, n_test = proportional(val), proportional(test)
    if n_val + n_test >= pool:
        raise DataError(
            f"data.val_images={n_val} + data.test_images={n_test} need more than the {pool} "
            "val2014 images available; lower them or raise data.max_images"
        )
    return n_val, n_test


KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}


def read_karpathy_split(raw_dir: Path, manifest: dict, limits: tuple[int, float] = (MAX_EXPANDED_BYTES,
                                                                                      MAX_EXPANSION_RATIO)) -> dict[int, str]:
    """COCO image id -> train, val or test, from Karpathy's ``dataset_coco.json`` (restval trains)."""
    if "split_file" not in manifest:
        raise DataError(f"{raw_dir / MANIFEST}: records no split file; run log_raw_data again with data.split=karpathy")
    where = f"{manifest['split_file']['archive']}:{manifest['split_file']['member']}"
    archive = archive_at(raw_dir, manifest, manifest["split_file"]["archive"], "split file")
    index_archive(archive, *limits)  # its entries checked before one is read
    data = read_json_member(archive, manifest["split_file"]["member"], "Karpathy split file")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{where}: not Karpathy's split file (it needs a list 'images')")
    split_of: dict[int, str] = {}
    for n, entry in enumerate(data["images"]):
        cocoid = entry.get("cocoid") if isinstance(entry, dict) else None
        kind = entry.get("split") if isinstance(entry, dict) else None
        if type(cocoid) is not int or kind not in KARPATHY_SPLITS:
            raise DataError(f"{where}: images[{n}] needs an integer 'cocoid' and a 'split' of "
                            f"{', '.join(KARPATHY_SPLITS)} (has cocoid {cocoid!r}, split {kind!r})")
        if split_of.setdefault(cocoid, KARPATHY_SPLITS[kind]) != KARPATHY_SPLITS[kind]:
            raise DataError(f"{where}: image {cocoid} is listed in two splits")
    return split_of


def karpathy_splits(split_of: dict[int, str], images: set[int]) -> tuple[dict[str, list[int]], dict[str, int]]:
    """The split file's train/val/test over the images at hand, and what did not match: images the file lists
    that the annotations lack (or were skipped), and images it does not list (unused)."""
    splits = {name: sorted(i for i, s in split_of.items() if s == name and i in images)
              for name in ("train", "val", "test")}
    return splits, {"split_file_images_absent": sum(i not in images for i in split_of),
                    "images_outside_split_file": sum(i not in split_of for i in images)}


def split_images(train_pool: list[int], val_pool: list[int], n_val: int, n_test: int, seed: int):
    rng = random.Random(seed)
    held = sorted(val_pool)
    rng.shuffle(held)
    return {
        "val": sorted(held[:n_val]),
        "test": sorted(held[n_val : n_val + n_test]),
        "train": sorted(train_pool + held[n_val + n_test :]),
    }


BACKBONE_FILE = "backbone.weights.h5"


def save_backbone(extractor: FeatureExtractor, out_dir: Path) -> None:
    """Keep the exact backbone beside its features: captioning new images needs the same one."""
    path, identity = out_dir / BACKBONE_FILE, out_dir / (BACKBONE_FILE + ".identity")
    if path.exists() and identity.exists() and identity.read_text() == extractor.weights:
        return
    save_weights_atomic(extractor.backbone, path)
    with atomic_path(identity) as tmp:
        tmp.write_text(extractor.weights)


def _json_member(raw_dir: Path, manifest: dict, rel: str):
    return read_json_member(archive_at(raw_dir, manifest, manifest["members"][rel.split("/", 1)[0]]), rel,
                            "COCO caption file")


def process_data(cfg: Config, raw_dir: str | Path, train_dir: str | Path, test_dir: str | Path,
                 extractor: FeatureExtractor | None = None, scratch: str | Path | None = None) -> StepResult:
    raw_dir, train_dir, test_dir = Path(raw_dir), Path(train_dir), Path(test_dir)
    outs = {"train_data": train_dir, "test_data": test_dir}
    for folder in outs.values():
        folder.mkdir(parents=True, exist_ok=True)
    manifest, source_images = open_raw(raw_dir, (cfg.data.max_expanded_bytes, cfg.data.max_expansion_ratio),
                                       scratch=scratch)

    images: dict[int, dict] = {}
    pools: dict[str, list[int]] = {}
    skipped: list[dict] = []
    blank = truncated = 0
    for source, rel in manifest["annotations"].items():
        where = f"{manifest['members'][rel.split('/', 1)[0]]}:{rel}"
        found, dropped, missing_caps, cut = load_coco_captions(_json_member(raw_dir, manifest, rel), where,
                                                               manifest["image_dirs"][source], source,
                                                               cfg.text.max_caption_words)
        truncated += cut
        in_both = images.keys() & found.keys()  # in two files: neither's captions can be trusted
        pools = {name: [i for i in pool if i not in in_both] for name, pool in pools.items()}
        for image_id in sorted(in_both):
            first = images.pop(image_id)
            del found[image_id]
            skipped.append({"file": f"{where} image {image_id}", "reason": f"image id {image_id} also appears in "
                            f"{first['source']}'s caption file; its captions could belong to either, so none is used"})
        images.update(found)
        pools[source] = sorted(found)
        blank += dropped
        skipped += missing_caps

    if cfg.data.max_images is not None and cfg.data.max_images < len(images):
        rng = random.Random(cfg.data.seed)
        keep = set(rng.sample(sorted(images), cfg.data.max_images))
        pools = {s: [i for i in ids if i in keep] for s, ids in pools.items()}

    train_pool, val_pool = pools.get("train2014", []), pools.get("val2014", [])
    unmatched: dict[str, int] = {}
    if cfg.data.split == "karpathy":
        split_of = read_karpathy_split(raw_dir, manifest, (cfg.data.max_expanded_bytes, cfg.data.max_expansion_ratio))
        splits, unmatched = karpathy_splits(split_of, set(train_pool + val_pool))
        n_val, n_test = len(splits["val"]), len(splits["test"])
        if not (splits["train"] and n_val and n_test):
            raise DataError(f"{raw_dir}: the split file leaves {len(splits['train'])} training, {n_val} validation "
                            f"and {n_test} test images of these archives; each needs at least one")
        log.info("process_data: Karpathy's split: %d train, %d val, %d test images; %d listed images absent, "
                 "%d images not listed (unused)", len(splits["train"]), n_val, n_test,
                 unmatched["split_file_images_absent"], unmatched["images_outside_split_file"])
    else:
        n_val, n_test = held_out_sizes(len(val_pool), cfg.data.val_images, cfg.data.test_images)
        splits = split_images(train_pool, val_pool, n_val, n_test, cfg.data.seed)

    words = {i: [c.split() for c in images[i]["captions"]] for ids in splits.values() for i in ids}
    vocab = Vocabulary.build((w for i in splits["train"] for w in words[i]), cfg.text.min_count, cfg.text.max_vocab)
    lengths = [len(w) + 2 for i in splits["train"] for w in words[i]]
    max_length = length_at_percentile(lengths, cfg.text.max_length_percentile)

    extractor = extractor or FeatureExtractor(cfg.features.weights, seed=cfg.features.seed)
    save_backbone(extractor, train_dir)  # train bundles it with the model
    started = time.monotonic()

    def progress(done: int, of: int) -> None:
        if done == of or done % (cfg.features.batch_size * 20) < cfg.features.batch_size:
            log.info("features: %d/%d images (%.1f images/s)", done, of, done / (time.monotonic() - started))

    shards = []
    for part, splits_here in PARTS.items():
        plans = plan_shards({s: [(i, images[i]["file"]) for i in splits[s]] for s in splits_here},
                            cfg.features.shard_images)
        shards += extract_to_shards(plans, outs[part] / "features", extractor, cfg.features.batch_size, progress,
                                    source=source_images, max_pixels=cfg.features.max_image_pixels)

    split_info, records_of = {}, {}
    positions, feat_sum, feat_sumsq = 0, np.zeros(CHANNELS), np.zeros(CHANNELS)
    for split in SPLITS:
        mine = [s for s in shards if s.split == split]
        records = []
        for shard in mine:
            skipped += shard.skipped
            for image_id in shard.image_ids:
                info = images[image_id]
                records.append({
                    "image_id": image_id, "file": info["file"], "source": info["source"],
                    "captions": info["captions"], "references": info["references"],
                    "tokens": [vocab.encode(w, max_length) for w in words[image_id]],
                })
            if split == "train":
                positions += shard.positions
                feat_sum += np.asarray(shard.feature_sum)
                feat_sumsq += np.asarray(shard.feature_sumsq)
        records_of[split] = records
        split_info[split] = {
            "images": len(records),
            "captions": sum(len(r["captions"]) for r in records),
            "shards": [f"features/{s.file}" for s in mine],
            "captions_file": f"{split}.captions.json",
        }
    if positions == 0:
        raise DataError(f"{raw_dir}: no training image could be read; see {train_dir / 'report.json'}")
    for record in records_of["test"][:ATTENTION_SAMPLE_LIMIT]:  # evaluate draws attention on these
        record["sample"] = _save_sample(source_images, record, test_dir / SAMPLES)
    baseline = choose_blind_caption([c for r in records_of["train"] for c in r["captions"]],
                                    {r["image_id"]: r["references"] for r in records_of["val"]})
    mean = feat_sum / positions
    std = np.sqrt(np.maximum(feat_sumsq / positions - mean**2, 0.0))

    dataset = {
        "format": FORMAT,
        "feature_shape": [GRID, CHANNELS], "feature_dtype": "float16", "record_bytes": RECORD_BYTES,
        "backbone": {"name": "InceptionV3", "weights": cfg.features.weights, "identity": extractor.weights,
                     "image_size": cfg.features.image_size, "weights_file": BACKBONE_FILE},
        "vocab": "vocab.json", "vocab_size": len(vocab), "max_length": max_length,
        "feature_stats": "feature_stats.json",
        "split": {"kind": cfg.data.split, "seed": cfg.data.seed, "max_images": cfg.data.max_images,
                  "val_images": n_val, "test_images": n_test, **unmatched},
    }
    for part, splits_here in PARTS.items():
        out = outs[part]
        for split in splits_here:
            write_json_atomic(out / split_info[split]["captions_file"], records_of[split])
        write_json_atomic(out / "feature_stats.json", {"mean": mean.tolist(), "std": std.tolist(),
                                                        "positions": positions})
        vocab.save(out / "vocab.json")
        extra = {"blind_baseline": baseline} if part == "test_data" else {}
        write_json_atomic(out / DATASET, {**dataset, **extra, "splits": {s: split_info[s] for s in splits_here}})
    write_json_atomic(train_dir / "report.json", {"skipped": skipped, "blank_captions_dropped": blank,
                                                  "captions_truncated": truncated})

    kept_images = sum(v["images"] for v in split_info.values())
    kept_captions = sum(v["captions"] for v in split_info.values())
    log.info("process_data: %d images, %d captions kept; %d files skipped", kept_images, kept_captions, len(skipped))
    metrics = {
        "images": kept_images, "captions": kept_captions,
        **{f"{s}_images": split_info[s]["images"] for s in SPLITS},
        "skipped_files": len(skipped), "blank_captions_dropped": blank, "captions_truncated": truncated,
        "vocab_size": len(vocab), "max_length": max_length, **unmatched,
        "feature_bytes": sum(RECORD_BYTES * v["images"] for v in split_info.values()),
        "shards_reused": sum(1 for s in shards if s.reused),
    }
    return StepResult(metrics=metrics, outputs={"train_data": str(train_dir), "test_data": str(test_dir)},
                      extra={"skipped": skipped})


def _save_sample(source: ArchiveImages, record: dict, folder: Path) -> str:
    """One test image, copied out of its archive, for evaluate's attention figures."""
    folder.mkdir(parents=True, exist_ok=True)
    name = f"{int(record['image_id'])}{Path(record['file']).suffix.lower()}"
    if not (folder / name).exists():
        with atomic_path(folder / name) as tmp:
            tmp.write_bytes(source.read(record["file"]))
    return f"{SAMPLES}/{name}"


def choose_blind_caption(train_captions: list[str], val_refs: dict[int, list[str]]) -> dict:
    """The blind baseline, chosen here on train and val so that evaluate reads nothing of them."""
    from captioning.metrics import choose_blind_caption as choose

    caption, val_cider = choose(train_captions, val_refs)
    return {"caption": caption, "val_CIDEr": val_cider, "chosen_on": "val"}
