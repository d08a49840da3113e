"""The in-process runner: every step in order, in this Python process.

It wires each step's outputs to the next step's inputs as ``captioning.workflow``
declares them (the same wiring ``pipeline.py`` compiles for the cluster), with
every artifact a folder or file under the work dir, and writes the summary JSON.
"""

from __future__ import annotations

import logging
import time
import traceback
from pathlib import Path

from captioning.config import Config
from captioning.errors import CaptioningError
from captioning.io import disk_full_from, write_json_atomic
from captioning.steps.result import StepResult
from captioning.tracking import StepTracker, new_group
from captioning.workflow import STEPS, StepIO, run_step, upstream_of

log = logging.getLogger(__name__)


def step_io(name: str, work: Path, done: dict[str, StepResult]) -> StepIO:
    step = STEPS[name]
    inputs = {i: work / STEPS[src].outputs[out].local for i, (src, out) in step.inputs.items()}
    return StepIO(inputs=inputs, outputs={o: work / spec.local for o, spec in step.outputs.items()},
                  scratch=work / name, produced_by={i: done[src].summary() for i, (src, _) in step.inputs.items()})


def run_pipeline(cfg: Config, workdir: str | Path, group: str = "") -> dict:
    work = Path(workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    group = group or new_group()
    summary: dict = {"workdir": str(work), "wandb_group": group, "config": cfg.model_dump(mode="json"), "steps": {}}
    if not cfg.promote.registry:  # the local model registry lives beside the steps
        cfg = cfg.model_copy(deep=True)
        cfg.promote.registry = str(work / "registry")
    done: dict[str, StepResult] = {}

    def step_run(name: str):
        def run() -> StepResult:
            upstream = done[upstream_of(name)].returns.get("wandb_ref", "") if upstream_of(name) else ""
            with StepTracker(cfg, name, work, group, [upstream]) as tracker:
                return run_step(STEPS[name], cfg, step_io(name, work, done), tracker)
        return run

    run_in_order(summary, {name: step_run(name) for name in STEPS}, done)
    return summary


def run_in_order(summary: dict, runs: dict, done: dict[str, StepResult]) -> None:
    """Each step in turn into ``summary``; after a failure the rest are skipped, naming it. Both pipelines."""
    failed = None
    for name, run in runs.items():
        if failed:
            summary["steps"][name] = {"status": "skipped", "reason": f"{failed} failed", "metrics": {}, "outputs": {}}
            continue
        log.info("step %s: starting", name)
        started = time.monotonic()
        try:
            result = run()
        except CaptioningError as exc:
            result = StepResult(status="failed", extra={"error": str(exc)})
        except Exception as exc:  # keep the summary honest even on a bug
            log.debug("%s", traceback.format_exc())
            error = disk_full_from(exc) or f"{type(exc).__name__}: {exc}"
            result = StepResult(status="failed", extra={"error": str(error)})
        result.extra["seconds"] = round(time.monotonic() - started, 2)
        summary["steps"][name] = result.summary()
        if result.status == "failed":
            failed = name
            log.error("step %s failed: %s", name, result.extra["error"])
        else:
            done[name] = result
            log.info("step %s: %s in %.1fs", name, result.status, result.extra["seconds"])
    summary["status"] = "failed" if failed else "ok"


def write_summary(summary: dict, path: str | Path) -> Path:
    from captioning.redact import redact_tree

    return write_json_atomic(path, redact_tree(summary))


CAPTION_STEPS = ("resolve_model", "fetch_model", "list_images", "plan_captions", "caption_shards", "merge_captions")


def run_caption_pipeline(cfg: Config, workdir: str | Path, group: str = "") -> dict:
    """The batch captioning pipeline in this process: the shards one after another, as the pods would run
    them side by side; the same folders and summary as ``run_pipeline``."""
    from captioning.steps import batch_caption as steps

    work = Path(workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    group = group or new_group()
    if not cfg.promote.registry:  # where the training pipeline run in the same work dir promoted to
        cfg = cfg.model_copy(deep=True)
        cfg.promote.registry = str(work / "registry")
    summary: dict = {"pipeline": "caption", "workdir": str(work), "wandb_group": group,
                     "config": cfg.model_dump(mode="json"), "steps": {}}
    folders = {"model": work / "caption" / "model", "plan": work / "caption" / "plan",
               "merged": work / "caption" / "captions"}
    done: dict[str, StepResult] = {}

    shards_root = work / "caption" / "shards"

    def measured(result: StepResult, inputs: dict, outputs: dict) -> StepResult:
        """What the step's pod would download and upload (the training steps' ``artifacts``)."""
        from captioning.workflow import artifact_figures

        result.extra["artifacts"] = artifact_figures(StepIO(inputs=inputs, outputs=outputs, scratch=work))
        return result

    def resolve():
        return steps.resolve_model_step(cfg)

    def fetch():
        found = done["resolve_model"].returns
        return measured(steps.fetch_model_step(cfg, found["model_ref"], found["model_version"], folders["model"]),
                        {}, {"resolved": folders["model"]})

    def listing():
        return steps.list_images_step(cfg)

    def plan():
        return measured(steps.plan_captions(cfg, folders["plan"], done["list_images"].returns["listing"]), {},
                        {"plan": folders["plan"]})

    def shards():
        results = [steps.caption_shard(cfg, folders["model"], folders["plan"], index, shards_root / f"{index:05d}")
                   for index in done["plan_captions"].returns["shards"]]
        result = StepResult(metrics={"shards": len(results), "skipped": sum(r.metrics["skipped"] for r in results)},
                            outputs={"shards": str(shards_root)})
        # every shard's pod downloads the model and the plan: N times
        measured(result, {"model": folders["model"], "plan": folders["plan"]}, {"captions": shards_root})
        for figures in result.extra["artifacts"]["inputs"].values():
            figures.update(files=figures["files"] * len(results), bytes=figures["bytes"] * len(results))
        return result

    def merge():
        # the plan's shards, not whatever an earlier run left in the folder
        shard_dirs = [shards_root / f"{index:05d}" for index in done["plan_captions"].returns["shards"]]
        with StepTracker(cfg, "caption", work, group, []) as tracker:
            result = steps.merge_captions(cfg, folders["plan"], shard_dirs, folders["merged"])
            result.extra["wandb_ref"] = steps.record_captions(tracker, result, folders["merged"])
        return measured(result, {"plan": folders["plan"], "shards": shards_root}, {"captions": folders["merged"]})

    run_in_order(summary, dict(zip(CAPTION_STEPS, (resolve, fetch, listing, plan, shards, merge))), done)
    return summary
