"""Caption new images with a trained model folder (same preprocessing and backbone as training)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from captioning.bundle import BACKBONE_FILE, ModelError, load_bundle
from captioning.config import MAX_IMAGE_PIXELS
from captioning.errors import CaptioningError


class UndecodableImage(CaptioningError):
    """The header was sane but the decoder refused the image."""


@dataclass
class Captioned:
    path: Path | str
    caption: str
    words: list[str]
    attention: np.ndarray  # (len(words), 64)
    score: float = 0.0  # mean log-probability per token of the caption (teacher-forced), <= 0


MAX_IMAGE_BYTES = 16 << 20  # as `serve --max-image-mb`: no real photo comes near it


def read_image_file(path: Path, max_bytes: int = MAX_IMAGE_BYTES) -> bytes:
    """A local image's bytes; one line naming the file if it is not one, or is larger than ``max_bytes`` (said
    before a byte is read: a 3 GB file is not loaded to learn it is no image)."""
    try:
        if path.exists() and not path.is_dir() and not path.is_file():  # a FIFO or a device reads forever
            raise CaptioningError(f"{path}: not a regular file")
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size > max_bytes:
                raise CaptioningError(f"{path}: {size} bytes, more than the limit of {max_bytes} (--max-image-mb)")
            data = fh.read(max_bytes + 1)  # a file that grows meanwhile is still bounded
        if len(data) > max_bytes:
            raise CaptioningError(f"{path}: more than the limit of {max_bytes} bytes (--max-image-mb)")
        return data
    except IsADirectoryError:
        raise CaptioningError(f"{path}: a directory, not an image file") from None
    except FileNotFoundError:
        raise CaptioningError(f"{path}: no such image file") from None
    except OSError as exc:
        raise CaptioningError(f"{path}: cannot read the file: {exc.strerror or exc}") from None


class CaptionModel:
    """A model folder loaded once: images' bytes in, captions with their scores and attention out.

    ``captioning caption``, the server and the batch pipeline all caption through this, so they
    give the same caption for the same image.
    """

    def __init__(self, model_path: str | Path, method: str | None = None, beam_width: int | None = None,
                 version: str = ""):
        from captioning.decode import Decoder, chosen_decoding
        from captioning.features import FeatureExtractor

        self.bundle = bundle = load_bundle(model_path)
        self.version = version
        self.image_size = int(bundle.meta["backbone"].get("image_size", 299))
        self.max_pixels = int(bundle.meta.get("config", {}).get("features", {}).get("max_image_pixels",
                                                                                   MAX_IMAGE_PIXELS))
        self.extractor = FeatureExtractor("none", self.image_size)
        try:
            self.extractor.backbone.load_weights(str(bundle.root / BACKBONE_FILE))
        except Exception as exc:
            raise ModelError(f"{bundle.root / BACKBONE_FILE}: cannot load the backbone weights: {exc}") from None
        self.decoding = chosen = chosen_decoding(bundle.meta)  # what train chose on validation
        if method or beam_width:  # a width alone means beam search; the validated width and penalty fill the gaps
            validated_beam = chosen["decoder"] == "beam"
            self.decoding = chosen_decoding(bundle.meta, method or "beam",
                                            beam_width or (chosen["beam_width"] if validated_beam else 3),
                                            chosen["length_penalty"] if validated_beam else 0.7)
        self.decoder = Decoder(bundle.model, bundle.vocab.start_id, bundle.vocab.end_id, bundle.max_length,
                               self.decoding["decoder"], self.decoding["beam_width"], banned=bundle.vocab.non_words,
                               length_penalty=self.decoding["length_penalty"])

    def prepare(self, data: bytes):
        """Checked (header first, then decoded) model input for one image; the problem as a
        ``CaptioningError`` whose message is the reason alone."""
        import tensorflow as tf

        from captioning.features import decode_and_resize, image_problem, why_unreadable

        problem = image_problem(data, self.max_pixels)
        if problem:
            raise CaptioningError(problem)
        try:
            return decode_and_resize(tf.constant(data), self.image_size)
        except tf.errors.OpError:
            raise UndecodableImage(why_unreadable(_Bytes(data), "image", self.max_pixels)) from None

    def caption(self, pixels: list, names: list | None = None) -> list[Captioned]:
        """One caption per prepared image, decoded as one batch."""
        import tensorflow as tf

        if not pixels:
            return []
        features = self.extractor(tf.stack(pixels))
        tokens, alphas = self.decoder(features)
        scores = self.scores(features, tokens)
        vocab = self.bundle.vocab
        names = names or [""] * len(pixels)
        return [Captioned(name, vocab.decode(row), vocab.step_words(row), alpha[: len(vocab.step_words(row))],
                          float(score))
                for name, row, alpha, score in zip(names, tokens, alphas, scores)]

    def scores(self, features, tokens) -> np.ndarray:
        """Mean log-probability per token of each decoded caption (``<end>`` included), teacher-forced:
        how sure the model is of what it said, comparable across captions of different lengths."""
        from keras import ops

        tokens = np.asarray(tokens, np.int32)
        start = np.full((len(tokens), 1), self.bundle.vocab.start_id, np.int32)
        inputs = np.concatenate([start, tokens[:, :-1]], axis=1)
        logits = self.bundle.model({"features": features, "tokens": inputs}, training=False)["logits"]
        logp = ops.convert_to_numpy(ops.log_softmax(ops.cast(logits, "float32"), axis=-1))
        picked = np.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]
        mask = tokens != 0  # padding after <end>
        return (picked * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1)


class _Bytes:
    """``why_unreadable`` reads through a source; these bytes are one."""

    def __init__(self, data: bytes):
        self.data = data

    def read(self, key: str) -> bytes:
        return self.data


def _pixel_limit(model_path: Path) -> int:
    """The model's max_image_pixels from its meta.json, read without loading the model; the default when the
    file cannot be read (loading the model then names what is wrong with it)."""
    import json

    try:
        meta = json.loads((Path(model_path) / "meta.json").read_text())
        return int(meta.get("config", {}).get("features", {}).get("max_image_pixels", MAX_IMAGE_PIXELS))
    except (OSError, ValueError, TypeError, AttributeError):
        return MAX_IMAGE_PIXELS


def caption_images(model_path: str | Path, images: list[str | Path], method: str | None = None,
                   beam_width: int | None = None, batch_size: int = 16,
                   max_bytes: int = MAX_IMAGE_BYTES) -> list[Captioned]:
    from captioning.features import image_problem

    paths = [Path(p) for p in images]
    limit, contents = _pixel_limit(Path(model_path)), []
    for path in paths:  # every file is read and its header checked before the model loads (seconds of work)
        data = read_image_file(path, max_bytes)
        problem = image_problem(data, limit)
        if problem:
            raise CaptioningError(f"{path}: cannot caption it: {problem}")
        contents.append(data)
    model = CaptionModel(model_path, method, beam_width)
    pixels = []
    for path, data in zip(paths, contents):  # then decoded: a body that breaks only when decoded
        try:
            pixels.append(model.prepare(data))
        except UndecodableImage as exc:
            raise CaptioningError(f"{path}: cannot decode the image ({exc})") from None
        except CaptioningError as exc:
            raise CaptioningError(f"{path}: cannot caption it: {exc}") from None
    results = []
    for start in range(0, len(paths), batch_size):
        results += model.caption(pixels[start : start + batch_size], paths[start : start + batch_size])
    return results
