"""InceptionV3 grid features: 299x299 image -> 8x8x2048 -> 64x2048 float16.

Features are stored in shards of fixed-length raw records (one record of
64*2048 float16 per image, read back with ``tf.data.FixedLengthRecordDataset``):
half the bytes of a float32 ``.npy`` per image and no per-file overhead.
Each shard is written to a temporary name and renamed when complete, with a
sidecar naming the images it holds, so a restarted step reuses finished shards.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from captioning.config import MAX_IMAGE_PIXELS
from captioning.errors import ConfigError, DataError
from captioning.io import atomic_path, disk_full_error, is_disk_full, require_free_space

log = logging.getLogger(__name__)

GRID = 64  # 8x8 positions
CHANNELS = 2048
RECORD_BYTES = GRID * CHANNELS * 2  # float16
IMAGE_SIZE = 299
# How an image becomes the backbone's input; part of the features' identity, so a change re-extracts them.
PREPROCESSING = "antialiased-bilinear"


def backbone_identity(weights: str, seed: int) -> str:
    """What determines the features: the weights setting (and the seed of a random init) and the resizing."""
    return (f"none(seed={seed})" if weights == "none" else weights) + f"+{PREPROCESSING}"


def build_backbone(weights: str, image_size: int = IMAGE_SIZE, seed: int = 0):
    """InceptionV3 without its classifier, ending at the 8x8x2048 grid."""
    import keras

    if weights == "none":
        resolved = None
        keras.utils.set_random_seed(seed)  # the same random backbone on every run and restart
    elif weights == "imagenet":
        resolved = "imagenet"
    else:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise ConfigError(f"features.weights: {weights!r} is neither 'imagenet', 'none' nor an existing weights file")
        resolved = str(path)
    try:
        return keras.applications.InceptionV3(
            include_top=False, weights=resolved, input_shape=(image_size, image_size, 3)
        )
    except Exception as exc:  # download failures, wrong files
        if resolved == "imagenet":
            raise ConfigError(
                f"features.weights=imagenet: could not fetch the ImageNet weights ({exc}); "
                "without internet access use features.weights=none or a path to a local weights file"
            ) from None
        if resolved is not None:
            raise ConfigError(f"features.weights: {weights}: cannot load as InceptionV3 weights: {exc}") from None
        raise


def decode_and_resize(contents, image_size: int = IMAGE_SIZE):
    """Bytes of a JPEG/PNG/GIF/BMP (gray, RGB or CMYK) -> InceptionV3 input in [-1, 1]."""
    import tensorflow as tf

    image = tf.io.decode_image(contents, channels=3, expand_animations=False)
    # Antialiased: COCO's 640-pixel images shrink about 2x, and plain bilinear resizing would alias.
    image = tf.image.resize(image, (image_size, image_size), antialias=True)
    image.set_shape((image_size, image_size, 3))
    return image / 127.5 - 1.0


class FeatureExtractor:
    """The backbone as one compiled function: float images -> (B, 64, 2048) float16."""

    def __init__(self, weights: str, image_size: int = IMAGE_SIZE, seed: int = 0):
        import tensorflow as tf

        self.weights = backbone_identity(weights, seed)
        self.image_size = image_size
        self.backbone = build_backbone(weights, image_size, seed)

        @tf.function(reduce_retracing=True)
        def embed(images):
            grid = self.backbone(images, training=False)
            return tf.cast(tf.reshape(grid, (-1, GRID, CHANNELS)), tf.float16)

        self._embed = embed

    def __call__(self, images):
        return self._embed(images)


# What tf.io.decode_image reads; anything else is refused by name before decoding.
DECODABLE_FORMATS = ("JPEG", "MPO", "PNG", "GIF", "BMP")  # MPO: a phone's JPEG with extra frames


def gif_frames(data: bytes) -> tuple[int, int, int, int]:
    """(frames, their pixels in all, widest, tallest) of a GIF from its block structure, nothing decoded.
    TensorFlow's decoder (gif_io.cc) ignores the declared screen: it decodes every frame at its own size,
    even when only the first is wanted, onto a canvas of the widest by the tallest frame."""
    frames = pixels = width = height = 0
    at = 13
    if len(data) > 10 and data[10] & 0x80:  # global colour table
        at += 3 << ((data[10] & 7) + 1)

    def skip_sub_blocks(at: int) -> int:
        while at < len(data) and data[at]:
            at += data[at] + 1
        return at + 1

    while at < len(data):
        block = data[at]
        if block == 0x21:  # extension: label, then sub-blocks
            at = skip_sub_blocks(at + 2)
        elif block == 0x2C and at + 10 <= len(data):  # image descriptor
            w, h = (int.from_bytes(data[at + k:at + k + 2], "little") for k in (5, 7))
            frames, pixels = frames + 1, pixels + w * h
            width, height = max(width, w), max(height, h)
            packed = data[at + 9]
            at += 10 + ((3 << ((packed & 7) + 1)) if packed & 0x80 else 0)
            at = skip_sub_blocks(at + 1)  # LZW code size, then the image data
        else:  # the trailer, or a damaged stream: what was counted stands
            break
    return frames, pixels, width, height


def image_problem(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> str | None:
    """Why these bytes are not an image to hand to the decoder, from the header alone (nothing is
    decoded, so a 20000x20000 declaration costs nothing); None when they are."""
    import warnings
    from io import BytesIO

    from PIL import Image, UnidentifiedImageError

    if not data:
        return "empty file"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(BytesIO(data)) as image:  # reads the header only
                fmt, (width, height) = image.format, image.size
                frames = 1
    except Image.DecompressionBombError as exc:
        return f"decompression bomb: {exc}"
    except UnidentifiedImageError:
        return "not an image"
    except Exception as exc:  # noqa: BLE001 - any header a plugin cannot parse
        return f"unreadable image header: {type(exc).__name__}: {exc}"
    if fmt not in DECODABLE_FORMATS:
        return f"a {fmt} image; only {', '.join(DECODABLE_FORMATS)} are read"
    frames = pixels = 0
    if fmt == "GIF":  # TensorFlow decodes every frame, even for the first, onto the largest frame's canvas
        frames, pixels, width, height = gif_frames(data)
    if width * height > max_pixels:
        return (f"decompression bomb: declares {width}x{height} pixels, more than "
                f"features.max_image_pixels={max_pixels}")
    if fmt in JPEG_FORMATS and (scans := jpeg_scans(data)) > MAX_JPEG_SCANS:
        return (f"a JPEG of {scans} scans (a scan bomb: each scan is decoded over the whole image); at most "
                f"{MAX_JPEG_SCANS} are read")
    if pixels > max_pixels:
        return (f"decompression bomb: {frames} frames of {pixels} pixels in all, more than "
                f"features.max_image_pixels={max_pixels}")
    return None


# A progressive JPEG is decoded scan by scan, each over the whole image: encoders write about 10 (libjpeg's
# default script), and thousands make one small file take minutes. PIL calls a JPEG with an MPF segment "MPO";
# TensorFlow decodes it as the JPEG it starts with.
MAX_JPEG_SCANS = 100
JPEG_FORMATS = ("JPEG", "MPO")


def jpeg_scans(data: bytes) -> int:
    """The scans (SOS segments) of the first image in a JPEG, found by walking its segments by their lengths
    (a 0xFFDA inside a comment or an EXIF thumbnail is not one); up to its EOI or where the file breaks off."""
    scans, at, end = 0, 2, len(data)
    while at < end:
        if data[at] != 0xFF:
            return scans  # not at a marker: a broken file (the decoder says so)
        while at < end and data[at] == 0xFF:  # fill bytes may precede a marker
            at += 1
        if at >= end:
            return scans
        marker, at = data[at], at + 1
        if marker == 0xD9:  # EOI
            return scans
        if 0xD0 <= marker <= 0xD7 or marker in (0x01, 0xD8):  # no length field
            continue
        if at + 2 > end:
            return scans
        at += int.from_bytes(data[at:at + 2], "big")
        if marker == 0xDA:  # entropy-coded data follows, up to the next marker that is not a restart
            scans += 1
            while True:
                at = data.find(b"\xff", at)
                if at < 0 or at >= end - 1:
                    return scans
                following = data[at + 1]
                if following == 0x00 or 0xD0 <= following <= 0xD7:  # a stuffed 0xFF, or a restart marker
                    at += 2
                elif following == 0xFF:  # fill before a marker
                    at += 1
                else:
                    break
    return scans

# What decoding costs at its peak, per declared pixel: TensorFlow's RGB image (3 bytes) and the decoder's own
# buffers; measured at 3.5 to 3.9 for a 7000x7000 PNG (170-190 MiB). A progressive JPEG also keeps every
# coefficient of the whole image (2 bytes per component sample) until its last scan.
DECODE_BYTES_PER_PIXEL = 4
COEFFICIENT_BYTES = 2


def decode_cost(data: bytes) -> int:
    """The memory decoding these bytes will take, from the header alone (0 for what cannot be read: the
    decoder refuses it before allocating)."""
    import warnings
    from io import BytesIO

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(BytesIO(data)) as image:  # the header only
                fmt, (width, height) = image.format, image.size
                progressive = fmt in JPEG_FORMATS and bool(image.info.get("progressive") or
                                                           image.info.get("progression"))
                components = len(image.getbands())
    except Exception:  # noqa: BLE001 - not an image: image_problem says why
        return 0
    if fmt == "GIF":  # one canvas of the widest by the tallest frame, and each frame's own pixels
        _, pixels, width, height = gif_frames(data)
        return width * height * DECODE_BYTES_PER_PIXEL + pixels
    if progressive:
        return width * height * (DECODE_BYTES_PER_PIXEL + COEFFICIENT_BYTES * components)
    return width * height * DECODE_BYTES_PER_PIXEL


def why_unreadable(source, key: str, max_pixels: int = MAX_IMAGE_PIXELS) -> str:
    """A human reason for an image the decoder refused or was never given (looked at only on failure)."""
    from io import BytesIO

    from PIL import Image

    from captioning.errors import DataError

    try:
        data = source.read(key)
    except FileNotFoundError:
        return "missing file"
    except DataError as exc:
        return f"unreadable archive entry: {exc}"
    except OSError as exc:
        return f"unreadable file: {exc.strerror or exc}"
    problem = image_problem(data, max_pixels)
    if problem:
        return problem
    try:  # the header was sane and small: a full decode is safe
        with Image.open(BytesIO(data)) as image:
            fmt = image.format
            image.load()
    except Exception as exc:  # noqa: BLE001 - whatever the decoder raises, the reason names it
        return f"truncated or corrupt image: {exc}"
    return f"{fmt} image the decoder cannot read"


@dataclass
class ShardPlan:
    name: str  # e.g. "train-00000"
    split: str
    items: list[tuple[int, str]]  # (image_id, key of the image in the source)
    digest: str = ""

    def __post_init__(self):
        ids = ",".join(str(i) for i, _ in self.items)
        self.digest = hashlib.sha256(ids.encode()).hexdigest()[:16]


@dataclass
class ShardResult:
    name: str
    split: str
    file: str
    image_ids: list[int]
    skipped: list[dict]
    feature_sum: list[float]
    feature_sumsq: list[float]
    positions: int
    reused: bool = False


def plan_shards(split_items: dict[str, list[tuple[int, str]]], shard_images: int) -> list[ShardPlan]:
    plans = []
    for split, items in split_items.items():
        for k, start in enumerate(range(0, len(items), shard_images)):
            plans.append(ShardPlan(f"{split}-{k:05d}", split, items[start : start + shard_images]))
    return plans


def _sidecar(out_dir: Path, name: str) -> Path:
    return out_dir / f"{name}.json"


def _finished(out_dir: Path, plan: ShardPlan, weights: str) -> ShardResult | None:
    side = _sidecar(out_dir, plan.name)
    if not side.exists() or not (out_dir / f"{plan.name}.f16").exists():
        return None
    data = json.loads(side.read_text())
    if data.get("digest") != plan.digest or data.get("weights") != weights:
        return None
    if (out_dir / f"{plan.name}.f16").stat().st_size != RECORD_BYTES * len(data["image_ids"]):
        return None
    return ShardResult(plan.name, plan.split, f"{plan.name}.f16", data["image_ids"], data["skipped"],
                       data["sum"], data["sumsq"], data["positions"], reused=True)


class _Aborted(Exception):
    pass


_DONE, _ABORT = object(), object()  # the end of the batches: finish the shards, or drop the one being written


class _ShardWriter(threading.Thread):
    """Writes batches to shard files off the main thread, so the backbone never waits on disk. A shard is
    finished (renamed into place, with its sidecar) only when its images are all through or the extraction
    ended normally; an aborted extraction keeps no shard that lacks images it should hold."""

    def __init__(self, out_dir: Path, plans: list[ShardPlan], weights: str, source, max_pixels: int):
        super().__init__(daemon=True)
        self.out_dir, self.plans, self.weights, self.source = out_dir, plans, weights, source
        self.max_pixels = max_pixels
        self.inbox: queue.Queue = queue.Queue(maxsize=8)
        self.results: list[ShardResult] = []
        self.error: BaseException | None = None
        self.writing = None  # (file, path) of the shard being written
        self.owner = {}  # global index -> (plan number, position in plan)
        offset = 0
        for p, plan in enumerate(plans):
            for j in range(len(plan.items)):
                self.owner[offset + j] = (p, j)
            offset += len(plan.items)

    def send(self, message) -> bool:
        """Queue a message; False once the writer has died (its queue is no longer read: never block on it)."""
        while self.is_alive():
            try:
                self.inbox.put(message, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def run(self):
        try:
            self._run()
        except BaseException as exc:  # raised by extract_to_shards
            self.error = exc  # first: whatever the cleanup below meets, the failure is never lost
            writing, self.writing = self.writing, None
            with contextlib.suppress(OSError):  # the shard being written is lost: no half of it stays behind
                if writing is not None:
                    with contextlib.suppress(OSError):  # closing flushes, and the disk may still be full
                        writing[0].close()
                    writing[1].unlink(missing_ok=True)
                if is_disk_full(exc):
                    self.error = disk_full_error(writing[1].with_suffix("") if writing else self.out_dir)
            if isinstance(exc, _Aborted):
                self.error = None

    def _run(self):
        current, fh, seen = -1, None, []
        total = sumsq = None
        while True:
            msg = self.inbox.get()
            if msg is _ABORT:
                raise _Aborted()
            if msg is _DONE:
                break
            indices, feats = msg
            for index, feat in zip(indices, feats):
                p, j = self.owner[int(index)]
                if p != current:
                    if fh is not None:
                        self._close(current, fh, seen, total, sumsq)
                    for skipped in range(current + 1, p):  # shards with no readable image at all
                        self._close(skipped, None, [], None, None)
                    current, seen = p, []
                    fh = open(self.out_dir / f"{self.plans[p].name}.f16.tmp", "wb")
                    self.writing = (fh, self.out_dir / f"{self.plans[p].name}.f16.tmp")
                    total = np.zeros(CHANNELS, np.float64)
                    sumsq = np.zeros(CHANNELS, np.float64)
                fh.write(np.ascontiguousarray(feat, dtype="<f2").tobytes())
                f32 = feat.astype(np.float32)
                total += f32.sum(axis=0)
                sumsq += np.square(f32).sum(axis=0)
                seen.append(j)
        if fh is not None:
            self._close(current, fh, seen, total, sumsq)
        for skipped in range(current + 1, len(self.plans)):
            self._close(skipped, None, [], None, None)

    def _close(self, p, fh, seen, total, sumsq):
        plan = self.plans[p]
        tmp = self.out_dir / f"{plan.name}.f16.tmp"
        if fh is None:
            tmp.write_bytes(b"")
        else:
            fh.close()
            self.writing = None
        seen_set = set(seen)
        skipped = [
            {"file": self.source.where(key), "reason": why_unreadable(self.source, key, self.max_pixels)}
            for j, (_, key) in enumerate(plan.items) if j not in seen_set
        ]
        result = ShardResult(
            plan.name, plan.split, f"{plan.name}.f16", [plan.items[j][0] for j in seen], skipped,
            (total if total is not None else np.zeros(CHANNELS)).tolist(),
            (sumsq if sumsq is not None else np.zeros(CHANNELS)).tolist(), len(seen) * GRID,
        )
        os.replace(tmp, self.out_dir / result.file)
        side = {"digest": plan.digest, "weights": self.weights, "image_ids": result.image_ids,
                "skipped": skipped, "sum": result.feature_sum, "sumsq": result.feature_sumsq,
                "positions": result.positions}
        with atomic_path(_sidecar(self.out_dir, plan.name)) as tmp_side:
            tmp_side.write_text(json.dumps(side))
        self.results.append(result)


def image_dataset(keys: list[str], batch_size: int, image_size: int = IMAGE_SIZE, source=None,
                  max_pixels: int = MAX_IMAGE_PIXELS):
    """(index, image) batches read from ``source`` (zips or folders); images that fail ``image_problem``
    never reach the decoder, and those and undecodable ones are dropped here and reported by index later."""
    import tensorflow as tf

    from captioning.data.archive import FolderImages

    source = source or FolderImages()

    def fetch(key):
        data = source.read_or_empty(key.numpy().decode())
        return b"" if image_problem(data, max_pixels) else data

    def load(index, key):
        contents = tf.py_function(fetch, [key], tf.string)
        return index, decode_and_resize(contents, image_size)

    ds = tf.data.Dataset.from_tensor_slices((tf.range(len(keys), dtype=tf.int64), tf.constant(keys)))
    ds = ds.map(load, num_parallel_calls=os.cpu_count() or 2, deterministic=True)
    ds = ds.ignore_errors(log_warning=False).batch(batch_size).prefetch(2)
    # Fixed parallelism: on small CPU hosts tf.data's autotuner competes with the
    # backbone for the cores (measured: end-to-end speed halved on 2 cores).
    options = tf.data.Options()
    options.autotune.enabled = False
    return ds.with_options(options)


def extract_to_shards(
    plans: list[ShardPlan],
    out_dir: Path,
    extractor: FeatureExtractor,
    batch_size: int,
    progress: Callable[[int, int], None] | None = None,
    source=None,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> list[ShardResult]:
    """Run the backbone over every image of the plans, read from ``source`` (default: files by path);
    finished shards are reused."""
    from captioning.data.archive import FolderImages

    source = source or FolderImages()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    done = {p.name: r for p in plans if (r := _finished(out_dir, p, extractor.weights))}
    pending = [p for p in plans if p.name not in done]
    if done:
        log.info("reusing %d finished feature shards", len(done))
    results = list(done.values())
    if pending:
        keys = [key for plan in pending for _, key in plan.items]
        # Each new shard replaces an old one of its name (other settings), one at a time: what the volume
        # must hold beyond today is the growth, plus the largest shard while it sits beside its old version.
        replaced = [p for p in pending if (out_dir / f"{p.name}.f16").exists()]
        old = sum((out_dir / f"{p.name}.f16").stat().st_size for p in replaced)
        largest = max((RECORD_BYTES * len(p.items) for p in replaced), default=0)
        require_free_space(out_dir, max(RECORD_BYTES * len(keys) - old, 0) + largest,
                           f"the features of {len(keys)} images")
        writer = _ShardWriter(out_dir, pending, extractor.weights, source, max_pixels)
        writer.start()
        processed, finished = 0, False
        try:
            for indices, images in image_dataset(keys, batch_size, extractor.image_size, source, max_pixels):
                feats = extractor(images)
                if not writer.send((indices.numpy(), feats.numpy())):
                    break  # the writer failed: its error is raised below
                processed += int(indices.shape[0])
                if progress:
                    progress(processed, len(keys))
            finished = writer.error is None and writer.is_alive()
        finally:
            writer.send(_DONE if finished else _ABORT)  # an interrupted run finishes no shard it did not fill
            writer.join()
        if writer.error:
            raise writer.error
        if len(writer.results) != len(pending):  # never a partial result passed off as the whole
            raise DataError(f"{out_dir}: the feature writer stopped after {len(writer.results)} of "
                            f"{len(pending)} shards")
        results.extend(writer.results)
    order = {p.name: k for k, p in enumerate(plans)}
    return sorted(results, key=lambda r: order[r.name])


def read_features(files: list[str]):
    """A tf.data dataset of (64, 2048) float16 feature grids, in file order."""
    import tensorflow as tf

    ds = tf.data.FixedLengthRecordDataset(files, RECORD_BYTES)
    return ds.map(
        lambda rec: tf.reshape(tf.io.decode_raw(rec, tf.float16, little_endian=True), (GRID, CHANNELS)),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
