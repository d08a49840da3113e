"""evaluate: caption the test split deterministically and score it with the COCO metrics.

Outputs ``metrics.json``, ``predictions.json`` (per image: caption, references,
BLEU-4, CIDEr) and ``attention/<image_id>.png`` for a sample of test images.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from captioning.bundle import load_bundle
from captioning.config import Config
from captioning.data.demo import scene_accuracy
from captioning.dataset import ProcessedDataset
from captioning.errors import DataError
from captioning.decode import Decoder, chosen_decoding, decode_all
from captioning.io import write_json_atomic
from captioning.metrics import caption_cider, score
from captioning.steps.result import StepResult

log = logging.getLogger(__name__)


def caption_split(decoder: Decoder, data: ProcessedDataset, split: str, batch_size: int, vocab):
    """Captions, attention and the token of each step for every image of a split, in record order."""
    [(tokens, alphas)] = decode_all(decoder, data.features(split), batch_size)
    return [vocab.decode(row) for row in tokens], list(alphas), [vocab.step_words(row) for row in tokens]


def evaluate(cfg: Config, model_dir: str | Path, dataset_dir: str | Path, out_dir: str | Path) -> StepResult:
    """``dataset_dir`` is process_data's test_data: the test split, its sample images, the blind baseline."""
    from captioning.attention import plot_attention, read_rgb

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bundle = load_bundle(model_dir)
    data = ProcessedDataset.open(dataset_dir)
    vocab = bundle.vocab
    e = cfg.evaluate
    decoding = chosen_decoding(bundle.meta, e.decoder, e.beam_width, e.length_penalty)
    decoder = Decoder(bundle.model, vocab.start_id, vocab.end_id, bundle.max_length, decoding["decoder"],
                      decoding["beam_width"], banned=vocab.non_words, length_penalty=decoding["length_penalty"])
    records = data.records("test")
    if not records:
        raise DataError(f"{dataset_dir}: the test split holds no image (process_data skipped every test image: "
                        "see its skipped_files); nothing to evaluate")
    captions, attention, steps = caption_split(decoder, data, "test", cfg.evaluate.batch_size, vocab)
    refs = {r["image_id"]: r["references"] for r in records}  # raw COCO captions, PTB-tokenized by score()
    predictions = {r["image_id"]: c for r, c in zip(records, captions)}
    metrics, per_image = score(refs, predictions)

    baseline_caption = data.manifest["blind_baseline"]["caption"]  # chosen by process_data on train and val
    baseline_cider = caption_cider(refs, baseline_caption)
    metrics["baseline_CIDEr"] = baseline_cider
    scenes = scene_accuracy(predictions, refs)  # the demo's scenes only: every object and relation right
    if scenes is not None:
        metrics.update(scenes)

    rows = []
    for r, caption in zip(records, captions):
        rows.append({"image_id": r["image_id"], "file": r["file"], "sample": r.get("sample", ""),
                     "caption": caption, "references": r["references"],
                     "BLEU-4": per_image["BLEU-4"][r["image_id"]], "CIDEr": per_image["CIDEr"][r["image_id"]]})
    write_json_atomic(out_dir / "predictions.json", rows)

    figures = []
    for r, caption, alpha, words in list(zip(records, captions, attention, steps))[: cfg.evaluate.attention_samples]:
        if not r.get("sample"):
            log.warning("evaluate: no sample image of %s in the test data; no attention figure for it", r["file"])
            continue
        image_path = data.root / r["sample"]
        png = plot_attention(read_rgb(image_path), words, np.asarray(alpha)[: len(words)],
                             out_dir / "attention" / f"{r['image_id']}.png", title=caption)
        figures.append(str(png))

    report = {
        "metrics": metrics,
        **decoding,
        "test_images": len(records), "baseline_caption": baseline_caption,
        "mean_caption_words": float(np.mean([len(c.split()) for c in captions])) if captions else 0.0,
        "distinct_captions": len(set(captions)),
    }
    write_json_atomic(out_dir / "metrics.json", report)
    log.info("evaluate: CIDEr %.3f (blind baseline %.3f, %r), BLEU-4 %.3f", metrics["CIDEr"], baseline_cider,
             baseline_caption, metrics["BLEU-4"])
    return StepResult(
        metrics={**metrics, "test_images": len(records), "distinct_captions": report["distinct_captions"]},
        outputs={"metrics": str(out_dir / "metrics.json"), "predictions": str(out_dir / "predictions.json"),
                 "attention": str(out_dir / "attention")},
        extra={"baseline_caption": baseline_caption, "figures": figures},
    )
