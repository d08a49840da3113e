"""Caption new images with a trained model folder (same preprocessing and backbone as training)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from captioning.bundle import BACKBONE_FILE, ModelError, load_bundle
from captioning.config import MAX_IMAGE_PIXELS
from captioning.errors import CaptioningError


@dataclass
class Captioned:
    path: Path
    caption: str
    words: list[str]
    attention: np.ndarray  # (len(words), 64)


def _load_images(paths: list[Path], image_size: int, max_pixels: int):
    """Every image checked (header first, then decoded) before any work; one line naming the file if not."""
    import tensorflow as tf

    from captioning.data.archive import FolderImages
    from captioning.features import decode_and_resize, image_problem, why_unreadable

    images = []
    for path in paths:
        if path.exists() and not path.is_dir() and not path.is_file():  # a FIFO or a device reads forever
            raise CaptioningError(f"{path}: not a regular file")
        try:
            data = path.read_bytes()
        except IsADirectoryError:
            raise CaptioningError(f"{path}: a directory, not an image file") from None
        except FileNotFoundError:
            raise CaptioningError(f"{path}: no such image file") from None
        except OSError as exc:
            raise CaptioningError(f"{path}: cannot read the file: {exc.strerror or exc}") from None
        problem = image_problem(data, max_pixels)
        if problem:
            raise CaptioningError(f"{path}: cannot caption it: {problem}")
        try:
            images.append(decode_and_resize(tf.constant(data), image_size))
        except tf.errors.OpError:
            why = why_unreadable(FolderImages(), str(path), max_pixels)
            raise CaptioningError(f"{path}: cannot decode the image ({why})") from None
    return tf.stack(images)


def caption_images(model_path: str | Path, images: list[str | Path], method: str | None = None,
                   beam_width: int | None = None, batch_size: int = 16) -> list[Captioned]:
    from captioning.decode import Decoder, chosen_decoding
    from captioning.features import FeatureExtractor

    bundle = load_bundle(model_path)
    backbone = bundle.meta["backbone"]
    image_size = int(backbone.get("image_size", 299))
    paths = [Path(p) for p in images]
    max_pixels = int(bundle.meta.get("config", {}).get("features", {}).get("max_image_pixels", MAX_IMAGE_PIXELS))
    pixels = _load_images(paths, image_size, max_pixels)  # every image is checked before any work is done

    extractor = FeatureExtractor("none", image_size)
    try:
        extractor.backbone.load_weights(str(bundle.root / BACKBONE_FILE))
    except Exception as exc:
        raise ModelError(f"{bundle.root / BACKBONE_FILE}: cannot load the backbone weights: {exc}") from None
    decoding = chosen = chosen_decoding(bundle.meta)  # what train chose on validation
    if method or beam_width:  # a width alone means beam search; the validated width and penalty fill the gaps
        validated_beam = chosen["decoder"] == "beam"
        decoding = chosen_decoding(bundle.meta, method or "beam",
                                   beam_width or (chosen["beam_width"] if validated_beam else 3),
                                   chosen["length_penalty"] if validated_beam else 0.7)
    decoder = Decoder(bundle.model, bundle.vocab.start_id, bundle.vocab.end_id, bundle.max_length,
                      decoding["decoder"], decoding["beam_width"], banned=bundle.vocab.non_words,
                      length_penalty=decoding["length_penalty"])
    results = []
    for start in range(0, len(paths), batch_size):
        tokens, alphas = decoder(extractor(pixels[start : start + batch_size]))
        for path, row, alpha in zip(paths[start : start + batch_size], tokens, alphas):
            caption = bundle.vocab.decode(row)
            words = bundle.vocab.step_words(row)  # one label per attention map, as decoded
            results.append(Captioned(path, caption, words, alpha[: len(words)]))
    return results
