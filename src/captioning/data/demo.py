"""A small synthetic dataset in exactly the COCO 2014 download layout.

``write_coco_mirror(DIR)`` writes ``annotations/annotations_trainval2014.zip``,
``zips/train2014.zip`` and ``zips/val2014.zip`` with COCO's file names and JSON,
so the demo and the tests go through the real download, extraction and parsing
code. Each 640x480 picture shows one coloured shape on the left or the right;
its five captions say which, in different words, cases and punctuation, so a
model that looks at the image can beat one that does not.

With ``awkward=True`` train2014 also holds the inputs a real crawl meets: a
truncated JPEG, an empty file, a text file named .jpg, a grayscale JPEG, a
CMYK JPEG, PNG bytes named .jpg, a file listed in the annotations but absent
from the zip, and some blank or unicode-laden captions.
"""

from __future__ import annotations

import io
import json
import random
import zipfile
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
UNICODE_CAPTIONS = (
    "A {colour} {shape} — on the “{side}” side…",
    "ＡＮ image: a {colour} {shape} on the {side}",
)

# (file suffix of the case, what it is) for awkward=True
AWKWARD = ("truncated", "empty", "not_an_image", "grayscale", "cmyk", "png_content", "missing")


def coco_file_name(split: str, image_id: int) -> str:
    return f"COCO_{split}_{image_id:012d}.jpg"


def draw_scene(colour: str, shape: str, side: str, rng: random.Random, size=(640, 480)) -> Image.Image:
    width, height = size
    image = Image.new("RGB", size, rng.choice(BACKGROUNDS))
    draw = ImageDraw.Draw(image)
    radius = rng.randint(height // 6, height // 4)
    cx = rng.randint(radius + 10, width // 2 - radius - 10)
    if side == "right":
        cx = width - cx
    cy = rng.randint(radius + 10, height - radius - 10)
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    fill = tuple(min(255, max(0, c + rng.randint(-20, 20))) for c in COLOURS[colour])
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=fill)
    return image


def _jpeg(image: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90, **kwargs)
    return buf.getvalue()


def _captions(colour: str, shape: str, side: str, rng: random.Random) -> list[str]:
    out = [t.format(colour=colour, shape=shape, side=side) for t in TEMPLATES]
    rng.shuffle(out)
    if rng.random() < 0.1:
        out[0] = rng.choice(UNICODE_CAPTIONS).format(colour=colour, shape=shape, side=side)
    return out


def write_coco_mirror(
    dest: str | Path,
    *,
    train_images: int = 900,
    val_images: int = 300,
    seed: int = 0,
    awkward: bool = True,
    image_size: tuple[int, int] = (640, 480),
) -> dict:
    """Write the mirror; returns a description (counts, awkward file names)."""
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
            cases = list(AWKWARD) if (awkward and split == "train2014") else []
            for index in range(count):
                colour, shape, side = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(SIDES)
                name = coco_file_name(split, image_id)
                image = draw_scene(colour, shape, side, rng, image_size)
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
                    buf = io.BytesIO()
                    image.save(buf, format="PNG")
                    payload = buf.getvalue()
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
                captions = _captions(colour, shape, side, rng)
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
    return {
        "root": str(dest),
        "train_images": train_images,
        "val_images": val_images,
        "awkward": awkward_files,
    }


def synthetic_jpegs(dest: str | Path, count: int, seed: int = 0, size=(640, 480)) -> list[Path]:
    """Plain 640x480 scene JPEGs for benchmarks."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for i in range(count):
        image = draw_scene(rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(SIDES), rng, size)
        path = dest / f"bench_{i:06d}.jpg"
        path.write_bytes(_jpeg(image))
        paths.append(path)
    return paths
