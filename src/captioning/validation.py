"""Choosing on validation with caption metrics: the best epoch, early stopping and the decoding.

The paper selected on BLEU, not on the loss: a lower loss can still decode to worse
captions. Every epoch the model greedily captions a fixed validation subset
(``train.select_images``) and the subset's CIDEr (or BLEU-4: ``train.select_metric``)
goes into the epoch's logs, so the CSV history, early stopping and W&B all see it.
After training, beam width and length penalty are chosen the same way, on
validation, never on test.
"""

from __future__ import annotations

import logging

from captioning.data.demo import scene_accuracy
from captioning.dataset import ProcessedDataset
from captioning.decode import Decoder, decode_all
from captioning.metrics import metric_on, tokenize

log = logging.getLogger(__name__)


class ValidationCaptions:
    """The first ``images`` validation images (the split is already a seeded random draw), their
    PTB-tokenized raw references, and scoring of a model's captions on them."""

    def __init__(self, data: ProcessedDataset, images: int, metric: str, batch_size: int = 128):
        records = data.records("val")[:images]
        self.data, self.metric, self.batch_size = data, metric, batch_size
        self.ids = [r["image_id"] for r in records]
        self.raw_references = {r["image_id"]: r["references"] for r in records}
        self.references = tokenize(self.raw_references)

    def captions(self, decoder: Decoder, length_penalties=(None,)) -> list[dict[int, str]]:
        """The subset's captions for each length penalty (None: the decoder's own), from one search."""
        decoded = decode_all(decoder, self.data.features("val").take(len(self.ids)), self.batch_size,
                             length_penalties)
        return [dict(zip(self.ids, map(self.data.vocab.decode, tokens))) for tokens, _ in decoded]

    def decoder(self, model, method: str = "greedy", width: int = 1, length_penalties=(0.0,)) -> Decoder:
        vocab = self.data.vocab
        return Decoder(model, vocab.start_id, vocab.end_id, self.data.max_length, method, width,
                       banned=vocab.non_words, length_penalty=length_penalties[0], length_penalties=length_penalties)

    def score(self, decoder: Decoder, length_penalties=(None,)) -> list[float]:
        """The metric of the subset's captions, for each length penalty."""
        return [metric_on(self.references, captions, self.metric)
                for captions in self.captions(decoder, length_penalties)]

    def epoch_logs(self, decoder: Decoder) -> dict[str, float]:
        """``val_<metric>`` of the decoder's captions and, on the demo's scenes, the share of two-object
        scenes captioned right (``val_two_object_scenes_correct``): what the recipe is chosen on."""
        [captions] = self.captions(decoder)
        logs = {f"val_{self.metric}": metric_on(self.references, captions, self.metric)}
        scenes = scene_accuracy(captions, self.raw_references)
        if scenes is not None and scenes["two_object_scenes"]:
            logs["val_two_object_scenes_correct"] = scenes["two_object_scenes_correct"]
        return logs


def caption_metric_callback(validation: ValidationCaptions):
    """Adds ``val_<metric>`` of greedy decoding (and the demo's ``val_two_object_scenes_correct``) to each
    epoch's logs; place it before the callbacks that read them."""
    import keras

    class CaptionMetric(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.decoder = validation.decoder(self.model)  # traced once, reads the weights as they train

        def on_epoch_end(self, epoch, logs=None):
            values = validation.epoch_logs(self.decoder)
            if logs is not None:
                logs.update(values)
            scenes = values.get("val_two_object_scenes_correct")
            log.info("train: epoch %d, validation %s %.4f%s (greedy, %d images)", epoch + 1, validation.metric,
                     values[f"val_{validation.metric}"],
                     "" if scenes is None else f", two-object scenes right {scenes:.3f}", len(validation.ids))

    return CaptionMetric()


def choose_decoding(model, validation: ValidationCaptions, widths: list[int], penalties: list[float]) -> dict:
    """Greedy and each (beam width, length penalty) on the validation subset; the best by the metric
    (ties: the first, so the cheaper setting)."""
    trials = []
    beams = sorted(w for w in set(widths) if w > 1) if penalties else []
    searches = [(1, [0.0])] + [(width, list(penalties)) for width in beams]
    for width, width_penalties in searches:  # one search per width, ranked by every penalty
        method = "greedy" if width == 1 else "beam"
        values = validation.score(validation.decoder(model, method, width, width_penalties), width_penalties)
        for penalty, value in zip(width_penalties, values):
            trials.append({"decoder": method, "beam_width": width, "length_penalty": penalty,
                           f"val_{validation.metric}": value})
            log.info("train: decoding %s width %d penalty %.2f: validation %s %.4f", method, width, penalty,
                     validation.metric, value)
    best = max(trials, key=lambda t: t[f"val_{validation.metric}"])
    return {**best, "metric": validation.metric, "images": len(validation.ids), "trials": trials}
