"""A small synthetic dataset in exactly the COCO 2014 download layout.

``write_coco_mirror(DIR)`` writes ``annotations/annotations_trainval2014.zip``,
``zips/train2014.zip`` and ``zips/val2014.zip`` with COCO's file names and JSON,
so the demo and the tests go through the real download, extraction and parsing
code. Each 640x480 picture shows either one coloured shape on the left or the
right, or two shapes of different colours with one beside or above the other;
its five captions say which, in different words, cases and punctuation (a pair
from either side: "a red circle left of a blue square" is also "a blue square
right of a red circle"). A pair's caption is right only if both objects and the
relation are: what attention is for. ``scene_of`` reads a caption back into the
scene it describes, so evaluate can count the captions that get all of it right.

With ``awkward=True`` train2014 also holds the inputs a real crawl meets: a
truncated JPEG, an empty file, a text file named .jpg, a grayscale JPEG, a
CMYK JPEG, PNG bytes named .jpg, a file listed in the annotations but absent
from the zip, and some blank or unicode-laden captions. With ``hostile=True`` it
also holds what an attacker sends: a tiny PNG whose header declares 20000x20000
pixels (a decompression bomb), a TIFF named .jpg, and a real 1200x1000 PNG (over a
lowered ``features.max_image_pixels``).
"""

from __future__ import annotations

import io
import json
import random
import re
import zipfile
from collections import Counter
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 210, 20),
}
SHAPES = ("circle", "square", "triangle")
SIDES = ("left", "right")
BACKGROUNDS = [(235, 235, 235), (200, 200, 200), (245, 240, 225), (215, 225, 235)]

TEMPLATES = (
    "a {colour} {shape} on the {side}",
    "A {colour} {shape} on the {side} side of the picture.",
    "there is a {colour} {shape} at the {side}",
    "A {shape}, coloured {colour}, sits on the {side}!",
    "the {side} half of the image shows a {colour} {shape}",
)
RELATIONS = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}
INVERSE = {"left": "right", "right": "left", "above": "below", "below": "above"}
PAIR_TEMPLATES = (
    "a {c1} {s1} {rel} a {c2} {s2}",
    "A {c1} {s1} is {rel} a {c2} {s2}.",
    "there is a {c1} {s1} {rel} a {c2} {s2}",
    "a {c2} {s2} {inv} a {c1} {s1}",
    "Two shapes: a {c1} {s1} {rel} a {c2} {s2}!",
)
PAIR_SHARE = 0.5  # of the scenes
UNICODE_CAPTIONS = (
    "A {colour} {shape} — on the “{side}” side…",
    "ＡＮ image: a {colour} {shape} on the {side}",
)

# (file suffix of the case, what it is) for awkward=True
AWKWARD = ("truncated", "empty", "not_an_image", "grayscale", "cmyk", "png_content", "missing")
HOSTILE = ("bomb_header", "tiff", "oversized", "gif_frames")


def png_declaring(width: int, height: int) -> bytes:
    """A valid, tiny PNG whose header declares ``width`` x ``height`` RGB pixels: a decompression bomb."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def gif_of_frames(image: Image.Image, frames: int) -> bytes:
    """An animated GIF of ``frames`` full-size frames, each a flat colour (so every frame covers the whole
    picture and compresses to almost nothing): TensorFlow decodes them all, even when only the first is
    wanted (a frame bomb)."""
    first = image.convert("P")
    rest = [Image.new("P", image.size, 1 + n % 2) for n in range(frames - 1)]
    buf = io.BytesIO()
    first.save(buf, format="GIF", save_all=True, append_images=rest, duration=20, optimize=False)
    return buf.getvalue()


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def coco_file_name(split: str, image_id: int) -> str:
    return f"COCO_{split}_{image_id:012d}.jpg"


def random_scene(rng: random.Random) -> dict:
    """One shape and its side, or two shapes (never the same colour and shape) and how the first lies
    relative to the second."""
    first = (rng.choice(list(COLOURS)), rng.choice(SHAPES))
    if rng.random() >= PAIR_SHARE:
        return {"objects": [first], "side": rng.choice(SIDES)}
    second = first
    while second[0] == first[0]:
        second = (rng.choice(list(COLOURS)), rng.choice(SHAPES))
    return {"objects": [first, second], "relation": rng.choice(list(RELATIONS))}


def _draw_shape(draw: ImageDraw.ImageDraw, colour: str, shape: str, cx: int, cy: int, radius: int,
                rng: random.Random, placed: list | None) -> None:
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if placed is not None:
        placed.append({"colour": colour, "shape": shape, "box": box})
    fill = tuple(min(255, max(0, c + rng.randint(-20, 20))) for c in COLOURS[colour])
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=fill)


def draw_scene(scene: dict, rng: random.Random, size=(640, 480), placed: list | None = None) -> Image.Image:
    """The scene's picture; ``placed``, if given, receives each object's colour, shape and bounding box."""
    width, height = size
    image = Image.new("RGB", size, rng.choice(BACKGROUNDS))
    draw = ImageDraw.Draw(image)
    if len(scene["objects"]) == 1:
        (colour, shape), side = scene["objects"][0], scene["side"]
        radius = rng.randint(height // 6, height // 4)
        cx = rng.randint(radius + 10, width // 2 - radius - 10)
        if side == "right":
            cx = width - cx
        cy = rng.randint(radius + 10, height - radius - 10)
        _draw_shape(draw, colour, shape, cx, cy, radius, rng, placed)
        return image
    # Two shapes, each in its own half (left/right or top/bottom) of the picture.
    relation = scene["relation"]
    horizontal = relation in ("left", "right")
    radius = rng.randint(height // 9, height // 6)
    along = (width if horizontal else height) // 2
    across = height if horizontal else width
    centres = []
    for half in (0, 1):
        a = half * along + rng.randint(radius + 10, along - radius - 10)
        b = rng.randint(radius + 10, across - radius - 10)
        centres.append((a, b) if horizontal else (b, a))
    if relation in ("right", "below"):  # the first object lies in the second half
        centres.reverse()
    for (colour, shape), (cx, cy) in zip(scene["objects"], centres):
        _draw_shape(draw, colour, shape, cx, cy, radius, rng, placed)
    return image


def _jpeg(image: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90, **kwargs)
    return buf.getvalue()


def _captions(scene: dict, rng: random.Random) -> list[str]:
    if len(scene["objects"]) == 1:
        (colour, shape), side = scene["objects"][0], scene["side"]
        out = [t.format(colour=colour, shape=shape, side=side) for t in TEMPLATES]
        rng.shuffle(out)
        if rng.random() < 0.1:
            out[0] = rng.choice(UNICODE_CAPTIONS).format(colour=colour, shape=shape, side=side)
        return out
    (c1, s1), (c2, s2) = scene["objects"]
    relation = scene["relation"]
    out = [t.format(c1=c1, s1=s1, c2=c2, s2=s2, rel=RELATIONS[relation], inv=RELATIONS[INVERSE[relation]])
           for t in PAIR_TEMPLATES]
    rng.shuffle(out)
    return out


def scene_of(caption: str) -> tuple | None:
    """The scene a caption describes, in one normal form (a pair as "left" or "above"), or None when it
    names no whole scene: ("one", colour, shape, side) or ("two", (colour, shape), relation, (colour, shape))."""
    words = re.findall(r"[a-z]+", caption.lower())
    colours = [w for w in words if w in COLOURS]
    shapes = [w for w in words if w in SHAPES]
    if len(colours) == 1 and len(shapes) == 1:
        sides = [w for w in words if w in SIDES]
        return ("one", colours[0], shapes[0], sides[0]) if len(sides) == 1 else None
    relations = [w for w in words if w in RELATIONS]
    if len(colours) == 2 and len(shapes) == 2 and len(relations) == 1:
        a, b, relation = (colours[0], shapes[0]), (colours[1], shapes[1]), relations[0]
        if relation in ("right", "below"):
            a, b, relation = b, a, INVERSE[relation]
        return ("two", a, relation, b)
    return None


def scene_accuracy(predictions: dict, references: dict) -> dict[str, float] | None:
    """Share of captions that name every object and the side or relation of their image's scene (the one
    most of its references describe); by kind too. None when the references are not demo scenes."""
    right: dict[str, list[bool]] = {"one": [], "two": []}
    for key, caption in predictions.items():
        refs = references[key]
        truth, votes = Counter(scene_of(r) for r in refs).most_common(1)[0] if refs else (None, 0)
        if truth is None or 2 * votes <= len(refs):
            return None
        right[truth[0]].append(scene_of(caption) == truth)
    every = right["one"] + right["two"]
    if not every:
        return None
    share = lambda flags: sum(flags) / len(flags) if flags else 0.0
    return {"scenes_correct": share(every), "one_object_scenes_correct": share(right["one"]),
            "two_object_scenes_correct": share(right["two"]), "two_object_scenes": len(right["two"])}


# The demo's size: val2014 holds the 200 validation and 360 test images and 10 more that train. 360 test
# images hold 162 two-object scenes with seed 0 (half the scenes have two, by a seeded draw), so their share correct has a
# standard error of about 0.04 rather than the 0.075 of 43.
DEMO_TRAIN_IMAGES, DEMO_VAL_IMAGES = 900, 570


def write_coco_mirror(
    dest: str | Path,
    *,
    train_images: int = DEMO_TRAIN_IMAGES,
    val_images: int = DEMO_VAL_IMAGES,
    seed: int = 0,
    awkward: bool = True,
    hostile: bool = False,
    image_size: tuple[int, int] = (640, 480),
    karpathy_split: bool = False,
) -> dict:
    """Write the mirror; returns a description (counts, awkward file names). With ``karpathy_split`` also a
    ``caption_datasets.zip`` at its root in the layout of Karpathy's (see ``write_karpathy_split``)."""
    dest = Path(dest)
    rng = random.Random(seed)
    (dest / "annotations").mkdir(parents=True, exist_ok=True)
    (dest / "zips").mkdir(parents=True, exist_ok=True)
    annotations: dict[str, dict] = {}
    awkward_files: dict[str, str] = {}
    next_caption_id = 1
    image_id = 1
    for split, count in (("train2014", train_images), ("val2014", val_images)):
        images, anns = [], []
        zip_path = dest / "zips" / f"{split}.zip"
        tmp = zip_path.with_suffix(".zip.tmp")
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
            zf.writestr(f"{split}/", b"")
            cases = (list(AWKWARD) if (awkward and split == "train2014") else []) + (
                list(HOSTILE) if (hostile and split == "train2014") else [])
            for index in range(count):
                scene = random_scene(rng)
                name = coco_file_name(split, image_id)
                image = draw_scene(scene, rng, image_size)
                case = cases[index] if index < len(cases) else None
                payload: bytes | None = _jpeg(image)
                if case == "truncated":
                    payload = payload[: len(payload) // 3]
                elif case == "empty":
                    payload = b""
                elif case == "not_an_image":
                    payload = b"<html><body>404 Not Found</body></html>\n"
                elif case == "grayscale":
                    payload = _jpeg(image.convert("L"))
                elif case == "cmyk":
                    payload = _jpeg(image.convert("CMYK"))
                elif case == "png_content":
                    payload = _encoded(image, "PNG")
                elif case == "bomb_header":
                    payload = png_declaring(20000, 20000)
                elif case == "tiff":
                    payload = _encoded(image, "TIFF")
                elif case == "oversized":
                    payload = _encoded(image.resize((1200, 1000)), "PNG")
                elif case == "gif_frames":
                    payload = gif_of_frames(image, 200)
                elif case == "missing":
                    payload = None
                if case:
                    awkward_files[name] = case
                if payload is not None:
                    zf.writestr(f"{split}/{name}", payload)
                images.append(
                    {"license": 1, "file_name": name, "coco_url": "", "height": image_size[1],
                     "width": image_size[0], "date_captured": "2013-11-14 16:28:13", "flickr_url": "",
                     "id": image_id}
                )
                captions = _captions(scene, rng)
                if awkward and split == "train2014" and index % 50 == 7:
                    captions.append("   ")  # a blank caption, as COCO has a few
                for caption in captions:
                    anns.append({"image_id": image_id, "id": next_caption_id, "caption": caption})
                    next_caption_id += 1
                image_id += 1
        tmp.replace(zip_path)
        annotations[split] = {
            "info": {"description": "captioning demo data in the COCO 2014 layout", "version": "1.0",
                     "year": 2014},
            "licenses": [{"id": 1, "name": "CC0", "url": ""}],
            "images": images,
            "annotations": anns,
        }
    ann_zip = dest / "annotations" / "annotations_trainval2014.zip"
    tmp = ann_zip.with_suffix(".zip.tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for split, data in annotations.items():
            zf.writestr(f"annotations/captions_{split}.json", json.dumps(data))
    tmp.replace(ann_zip)
    info = {
        "root": str(dest),
        "train_images": train_images,
        "val_images": val_images,
        "awkward": awkward_files,
    }
    if karpathy_split:
        info["karpathy"] = write_karpathy_split(dest / "caption_datasets.zip", annotations, seed)
    return info


def write_karpathy_split(path: Path, annotations: dict[str, dict], seed: int) -> dict[int, str]:
    """A split zip in the layout of Karpathy's ``caption_datasets.zip``: ``dataset_coco.json`` lists images
    with ``filepath``, ``filename``, ``cocoid``, ``split`` (train2014: train; val2014: a quarter val, a quarter
    test, the rest restval, all but its last image, which it leaves out) and ``sentences``, and one image the
    annotations lack. Returns cocoid -> split as written."""
    rng = random.Random(seed + 1)
    entries, split_of = [], {}
    for folder, data in annotations.items():
        captions: dict[int, list[str]] = {}
        for ann in data["annotations"]:
            captions.setdefault(ann["image_id"], []).append(ann["caption"])
        images = data["images"] if folder == "train2014" else data["images"][:-1]
        kinds = ["train"] * len(images) if folder == "train2014" else (
            ["val"] * (len(images) // 4) + ["test"] * (len(images) // 4))
        kinds += ["restval"] * (len(images) - len(kinds))
        rng.shuffle(kinds)
        for image, kind in zip(images, kinds):
            split_of[image["id"]] = kind
            entries.append({"filepath": folder, "filename": image["file_name"], "cocoid": image["id"], "split": kind,
                            "sentences": [{"raw": c, "tokens": c.lower().split()} for c in captions.get(image["id"], [])]})
    absent = max(split_of) + 1000
    split_of[absent] = "train"
    entries.append({"filepath": "train2014", "filename": coco_file_name("train2014", absent), "cocoid": absent,
                    "split": "train", "sentences": []})
    tmp = path.with_suffix(".zip.tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("dataset_coco.json", json.dumps({"images": entries, "dataset": "coco"}))
        zf.writestr("dataset_flickr8k.json", json.dumps({"images": [], "dataset": "flickr8k"}))
    tmp.replace(path)
    return split_of


def synthetic_jpegs(dest: str | Path, count: int, seed: int = 0, size=(640, 480)) -> list[Path]:
    """Plain 640x480 scene JPEGs for benchmarks."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for i in range(count):
        image = draw_scene(random_scene(rng), rng, size)
        path = dest / f"bench_{i:06d}.jpg"
        path.write_bytes(_jpeg(image))
        paths.append(path)
    return paths
