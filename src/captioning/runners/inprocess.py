"""The in-process runner: every step in order, in this Python process.

It wires each step's outputs to the next step's inputs exactly as
``pipeline.py`` does between pods, and writes the summary JSON.
"""

from __future__ import annotations

import logging
import time
import traceback
from pathlib import Path
from typing import Callable

from captioning import STEPS
from captioning.config import Config
from captioning.errors import CaptioningError
from captioning.io import write_json_atomic
from captioning.steps.result import StepResult
from captioning.tracking import StepTracker, new_group

log = logging.getLogger(__name__)


def _log_raw_data(cfg: Config, work: Path, done: dict[str, StepResult], t: StepTracker) -> StepResult:
    from captioning.steps.log_raw_data import log_raw_data
    from captioning.tracked import record_log_raw_data

    result = log_raw_data(cfg.data, work / "raw")
    result.extra["wandb_ref"] = record_log_raw_data(t, cfg, result, work / "raw")
    return result


def _process_data(cfg: Config, work: Path, done: dict[str, StepResult], t: StepTracker) -> StepResult:
    from captioning.steps.process_data import process_data
    from captioning.tracked import record_process_data

    result = process_data(cfg, done["log_raw_data"].outputs["raw_data"], work / "processed")
    result.extra["wandb_ref"] = record_process_data(t, cfg, result, work / "processed")
    return result


def _train(cfg: Config, work: Path, done: dict[str, StepResult], t: StepTracker) -> StepResult:
    from captioning.steps.train import train
    from captioning.tracked import record_train, train_callbacks

    dataset = Path(done["process_data"].outputs["dataset"])
    result = train(cfg, dataset, work / "train", callbacks=train_callbacks(t, cfg, dataset, work / "train"))
    result.extra["wandb_ref"] = record_train(t, result, Path(result.outputs["model"]))
    return result


def _evaluate(cfg: Config, work: Path, done: dict[str, StepResult], t: StepTracker) -> StepResult:
    from captioning.steps.evaluate import evaluate
    from captioning.tracked import record_evaluate

    result = evaluate(cfg, done["train"].outputs["model"], done["process_data"].outputs["dataset"], work / "evaluate")
    result.extra["wandb_ref"] = record_evaluate(t, result, work / "evaluate")
    return result


def _promote(cfg: Config, work: Path, done: dict[str, StepResult], t: StepTracker) -> StepResult:
    from captioning.steps.promote import promote
    from captioning.tracked import promote_in_wandb_registry, record_promote

    if t.online:  # the W&B Registry holds the production model
        candidate = float(done["evaluate"].metrics[cfg.promote.metric])
        decision = promote_in_wandb_registry(t, cfg, candidate, done["train"].extra["wandb_ref"])
        result = StepResult(metrics={**decision, "metric": cfg.promote.metric})
    else:
        registry = Path(cfg.promote.registry) if cfg.promote.registry else work / "registry"
        result = promote(cfg, done["train"].outputs["model"], done["evaluate"].outputs["metrics"], registry,
                         work / "promote")
    record_promote(t, result)
    return result


STEP_FUNCTIONS: dict[str, Callable[[Config, Path, dict[str, StepResult], StepTracker], StepResult]] = {
    "log_raw_data": _log_raw_data,
    "process_data": _process_data,
    "train": _train,
    "evaluate": _evaluate,
    "promote": _promote,
}


def run_pipeline(cfg: Config, workdir: str | Path, group: str = "") -> dict:
    work = Path(workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    group = group or new_group()
    done: dict[str, StepResult] = {}
    summary: dict = {"workdir": str(work), "wandb_group": group, "config": cfg.model_dump(mode="json"), "steps": {}}
    failed = None
    upstream = ""
    for name in STEPS:
        fn = STEP_FUNCTIONS.get(name)
        if fn is None:
            summary["steps"][name] = {"status": "skipped", "reason": "not implemented yet", "metrics": {}, "outputs": {}}
            continue
        if failed:
            summary["steps"][name] = {"status": "skipped", "reason": f"{failed} failed", "metrics": {}, "outputs": {}}
            continue
        log.info("step %s: starting", name)
        started = time.monotonic()
        try:
            with StepTracker(cfg, name, work, group, [upstream]) as tracker:
                result = fn(cfg, work, done, tracker)
        except CaptioningError as exc:
            result = StepResult(status="failed", extra={"error": str(exc)})
        except Exception as exc:  # keep the summary honest even on a bug
            log.debug("%s", traceback.format_exc())
            result = StepResult(status="failed", extra={"error": f"{type(exc).__name__}: {exc}"})
        result.extra["seconds"] = round(time.monotonic() - started, 2)
        summary["steps"][name] = result.summary()
        if result.status == "failed":
            failed = name
            log.error("step %s failed: %s", name, result.extra["error"])
        else:
            done[name] = result
            upstream = result.extra.get("wandb_ref", "") or upstream
            log.info("step %s: %s in %.1fs", name, result.status, result.extra["seconds"])
    summary["status"] = "failed" if failed else "ok"
    return summary


def write_summary(summary: dict, path: str | Path) -> Path:
    return write_json_atomic(path, summary)
