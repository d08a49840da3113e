"""What each KFP component does inside its container, kept out of ``components/``.

The functions take KFP artifact objects (anything with ``.path``, ``.uri`` and
``.metadata``) and the component's parameters, build the validated ``Config``
from them, run the library step, and fill in the artifact metadata the KFP UI
shows. Every step also writes its ``StepResult`` as ``step.json`` into its main
output, which the local Docker runner reads back into the summary JSON.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import os
from pathlib import Path
from typing import Any

from captioning.io import write_json_atomic
from captioning.params import config_from_parameters
from captioning.steps.result import StepResult

log = logging.getLogger(__name__)

STEP_FILE = "step.json"
# Set by pipeline.py where a volume keeps the COCO archives across runs (the raw-cache PVC).
DOWNLOAD_CACHE_ENV = "CAPTIONING_DOWNLOAD_CACHE"


def _setup() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _tracker(cfg, step: str, run_group: str, upstream_ref: str = ""):
    """W&B run of this pod; offline files go to CAPTIONING_WANDB_DIR (e.g. a volume) or /tmp."""
    import tempfile

    from captioning.tracking import StepTracker

    workdir = Path(os.environ.get("CAPTIONING_WANDB_DIR") or tempfile.gettempdir())
    return StepTracker(cfg, step, workdir, run_group, [upstream_ref])


def _record(artifact, name: str, result: StepResult) -> None:
    """Scalar metrics become artifact metadata; the whole result goes to step.json."""
    for key, value in result.metrics.items():
        if isinstance(value, (int, float, str, bool)):
            artifact.metadata[key] = value
    write_json_atomic(Path(artifact.path) / STEP_FILE, {"step": name, **result.summary()})


def run_log_raw_data(raw_data, preset: str, run_group: str, **params: Any) -> str:
    from captioning.steps.log_raw_data import log_raw_data

    _setup()
    from captioning.tracked import record_log_raw_data

    cfg = config_from_parameters(preset, **params)
    if os.environ.get(DOWNLOAD_CACHE_ENV):
        cfg.data.download_cache = os.environ[DOWNLOAD_CACHE_ENV]
    with _tracker(cfg, "log_raw_data", run_group) as t:
        result = log_raw_data(cfg.data, Path(raw_data.path))
        ref = record_log_raw_data(t, cfg, result, Path(raw_data.path))
    _record(raw_data, "log_raw_data", result)
    return ref


def run_process_data(raw_data, processed, upstream_ref: str, preset: str, run_group: str, **params: Any) -> str:
    from captioning.steps.process_data import process_data

    _setup()
    from captioning.tracked import record_process_data

    cfg = config_from_parameters(preset, **params)
    with _tracker(cfg, "process_data", run_group, upstream_ref) as t:
        result = process_data(cfg, Path(raw_data.path), Path(processed.path))
        ref = record_process_data(t, cfg, result, Path(processed.path))
    _record(processed, "process_data", result)
    return ref


def run_train(processed, model, upstream_ref: str, preset: str, run_group: str, checkpoint_dir: str,
              **params: Any) -> str:
    import tempfile

    from captioning.steps.train import train

    _setup()
    cfg = config_from_parameters(preset, **params)
    # A checkpoint folder on a volume survives a pre-empted pod; without one, a retry starts over.
    from captioning.tracked import record_train, train_callbacks

    work = Path(checkpoint_dir) if checkpoint_dir else Path(tempfile.mkdtemp(prefix="train-"))
    with _tracker(cfg, "train", run_group, upstream_ref) as t:
        callbacks = train_callbacks(t, cfg, Path(processed.path), work)
        result = train(cfg, Path(processed.path), work, callbacks=callbacks, model_dir=Path(model.path))
        ref = record_train(t, result, Path(model.path))
    _record(model, "train", result)
    model.metadata["wandb_ref"] = ref  # promote links this version into the W&B Registry
    return ref


def _html_report(report: dict, predictions: list[dict], figures: list[str]) -> str:
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.4f}</td></tr>" for k, v in report["metrics"].items())
    images = "".join(
        f'<figure><img src="data:image/png;base64,{base64.b64encode(Path(f).read_bytes()).decode()}" '
        f'style="max-width:100%"></figure>' for f in figures)
    preds = "".join(
        f"<tr><td>{p['image_id']}</td><td>{html.escape(p['caption'])}</td>"
        f"<td>{html.escape(' | '.join(p['references'][:3]))}</td><td>{p['CIDEr']:.3f}</td></tr>"
        for p in predictions[:50])
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>Captioning evaluation</title></head><body>"
        f"<h1>Test split: {report['test_images']} images, {html.escape(report['decoder'])} decoding</h1>"
        f"<table border=1><tr><th>metric</th><th>value</th></tr>{rows}</table>"
        f"<p>Blind baseline caption: <em>{html.escape(report['baseline_caption'])}</em></p>"
        f"<h2>Attention</h2>{images}"
        f"<h2>Predictions</h2><table border=1><tr><th>image</th><th>caption</th><th>references</th>"
        f"<th>CIDEr</th></tr>{preds}</table></body></html>")


def run_evaluate(model, processed, raw_data, metrics, predictions, report, upstream_ref: str, preset: str,
                 run_group: str, promote_metric: str, **params: Any) -> tuple[float, str]:
    from captioning.io import read_json
    from captioning.steps.evaluate import evaluate

    _setup()
    cfg = config_from_parameters(preset, promote_metric=promote_metric, **params)
    from captioning.tracked import record_evaluate

    out = Path(predictions.path)
    with _tracker(cfg, "evaluate", run_group, upstream_ref) as t:
        result = evaluate(cfg, Path(model.path), Path(processed.path), out, raw_dir=Path(raw_data.path))
        ref = record_evaluate(t, result, out)
    _record(predictions, "evaluate", result)
    for key, value in result.metrics.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics.log_metric(key, float(value))
    full = read_json(out / "metrics.json")
    Path(report.path).write_text(_html_report(full, read_json(out / "predictions.json"), result.extra["figures"]))
    if promote_metric not in result.metrics:
        from captioning.errors import ConfigError

        raise ConfigError(f"promote_metric={promote_metric!r}: not an evaluated metric")
    return float(result.metrics[promote_metric]), ref


def run_promote(model, metrics, upstream_ref: str, preset: str, run_group: str, registry: str,
                **params: Any) -> tuple[bool, str]:
    import tempfile

    from captioning.steps.promote import promote
    from captioning.tracked import promote_in_wandb_registry, record_promote

    _setup()
    cfg = config_from_parameters(preset, **params)
    scores = {"metrics": dict(metrics.metadata)}
    with _tracker(cfg, "promote", run_group, upstream_ref) as t:
        if t.online:  # the W&B Registry holds the production model
            model_ref = model.metadata.get("wandb_ref", "")
            decision = promote_in_wandb_registry(t, cfg, float(scores["metrics"][cfg.promote.metric]), model_ref)
            decision.update(metric=cfg.promote.metric, margin=cfg.promote.margin, alias=cfg.promote.alias)
            return bool(decision["promoted"]), json.dumps(decision)
        if not registry:
            raise ValueError("promote: no registry folder given (set the pipeline parameter 'registry')")
        with tempfile.TemporaryDirectory() as tmp:
            metrics_file = Path(tmp) / "metrics.json"
            metrics_file.write_text(json.dumps(scores))
            result = promote(cfg, Path(model.path), metrics_file, Path(registry), Path(tmp) / "out")
            decision = (Path(tmp) / "out" / "decision.json").read_text()
            record_promote(t, result)
    write_json_atomic(Path(registry) / "last_decision.json", json.loads(decision))
    return bool(result.metrics["promoted"]), decision
