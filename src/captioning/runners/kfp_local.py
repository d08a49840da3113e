"""``captioning run --runner docker``: the compiled pipeline in containers, with kfp.local.

The same DAG as on a cluster, run by kfp.local's DockerRunner on the project's
image: every step in its own container, artifacts passed through the pipeline
root (a host folder mounted into each container). The containers run as the
image's own user, as pods do on a cluster, so the pipeline root is made
writable for it (what they write stays readable by everyone). The summary is read back
from what each step wrote (its ``step.json``, or the output parameter that holds
its result), not from the runner's status, because DockerRunner can report
success for a failed container (kubeflow/pipelines#13332).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path

from captioning.config import Config
from captioning.errors import CaptioningError
from captioning.parameters import parameters_from_config
from captioning.workflow import STEPS, Step, read_result

log = logging.getLogger(__name__)

EXECUTOR_OUTPUT = "executor_output.json"  # where kfp.local keeps a task's output parameters


def _latest_run(root: Path, since: float) -> Path | None:
    runs = [p for p in root.glob("captioning-*") if p.is_dir() and p.stat().st_mtime >= since - 1]
    return max(runs, key=lambda p: p.stat().st_mtime) if runs else None


def _output_parameter(task_dir: Path, name: str):
    output = task_dir / EXECUTOR_OUTPUT
    return json.loads(output.read_text()).get("parameterValues", {}).get(name) if output.is_file() else None


def _step_result(step: Step, task_dir: Path) -> dict | None:
    if step.result_in:
        value = _output_parameter(task_dir, step.result_in)
        return json.loads(value) if value else None
    return read_result(task_dir / step.result_output) or None


def collect_summary(run_dir: Path | None, cfg: Config) -> dict:
    steps: dict[str, dict] = {}
    failed = None
    for name, step in STEPS.items():
        task_dir = run_dir / name.replace("_", "-") if run_dir else None
        found = _step_result(step, task_dir) if task_dir else None
        if found:
            found.pop("step", None)
            steps[name] = found
            continue
        if failed:
            steps[name] = {"status": "failed", "reason": f"{failed} failed", "metrics": {}, "outputs": {}}
            continue
        if name == "promote":  # behind the gate: skipped when evaluate's score did not exceed min_score
            score = _output_parameter(run_dir / "evaluate", "Output")
            if score is not None and float(score) <= cfg.promote.min_metric:
                steps[name] = {"status": "skipped", "reason": f"the gate did not open ({cfg.promote.metric} "
                               f"{float(score):.4f} <= min_score {cfg.promote.min_metric})", "metrics": {},
                               "outputs": {}}
                continue
        failed = name
        steps[name] = {"status": "failed", "error": "the container left no result (see its log above)",
                       "metrics": {}, "outputs": {}}
    status = "failed" if any(s["status"] == "failed" for s in steps.values()) else "ok"
    return {"runner": "docker", "run_dir": str(run_dir) if run_dir else None, "config": cfg.model_dump(mode="json"),
            "steps": steps, "status": status}


def container_user(image_user: str, user: str) -> str:
    """The ``--user`` of the containers: the image's own (``image``), the caller's (``host``) or as given."""
    if user == "image":
        return image_user or "0"
    if user == "host":
        return f"{os.getuid()}:{os.getgid()}"
    if not re.fullmatch(r"\d+(:\d+)?", user):
        raise CaptioningError(f"--user {user!r}: use image, host or UID[:GID]")
    return user


def _open_to_all(folder: Path) -> None:
    """Any uid may create files here (the containers' user need not be the caller)."""
    for path in (folder, *[p for p in folder.rglob("*") if p.is_dir()]):
        if path.stat().st_uid == os.getuid():
            path.chmod(0o777)


def run_in_docker(cfg: Config, workdir: str | Path, image: str, preset: str, user: str = "image",
                  pipeline: str = "train") -> dict:
    import docker
    from kfp import local

    from captioning.tracking import RUN_GROUP_ENV, new_group
    from pipeline import BuildOptions, build_pipeline

    work = Path(workdir).resolve()
    root = work / "kfp-root"
    registry = root / "registry"
    registry.mkdir(parents=True, exist_ok=True)
    # Only the pipeline root is mounted into the containers: a folder elsewhere would be written inside one.
    mounted = [("promote.registry", cfg.promote.registry), ("train.checkpoint_dir", cfg.train.checkpoint_dir)]
    if pipeline == "caption":
        mounted.append(("batch.source", cfg.batch.source))
    for key, value in mounted:
        if value and "://" not in value and not Path(value).resolve().is_relative_to(root):
            raise CaptioningError(f"{key}={value}: with --runner docker only {root} is mounted into the "
                                  f"containers; leave it empty or put it under that folder")
    try:
        client = docker.from_env()
        client.ping()
        image_user = client.images.get(image).attrs.get("Config", {}).get("User") or ""
    except docker.errors.ImageNotFound:
        raise CaptioningError(f"--image {image}: not in the local Docker engine; build it with `captioning image build`") from None
    except Exception as exc:
        raise CaptioningError(f"no Docker engine reachable ({exc}); start dockerd or set DOCKER_HOST") from None

    # Offline W&B runs land in each task's wandb_run artifact, on the host (syncable later with `wandb sync`).
    # One W&B group for the run's steps, as the pod label gives on Kubeflow.
    env = {"WANDB_MODE": os.environ.get("WANDB_MODE") or cfg.wandb.mode, "HOME": "/tmp", RUN_GROUP_ENV: new_group()}
    if os.environ.get("WANDB_API_KEY") and cfg.wandb.mode == "online":
        env["WANDB_API_KEY"] = os.environ["WANDB_API_KEY"]
    as_user = container_user(image_user, user)
    _open_to_all(root)
    local.init(runner=local.DockerRunner(user=as_user, environment=env), pipeline_root=str(root), raise_on_error=False)
    # kfp.local mounts no PVC, so no step is pointed at one; and a failed step fails the run at once.
    options = BuildOptions(image=image, preset=preset, raw_cache_pvc="", checkpoint_pvc="", retries=0,
                           pipeline=pipeline)
    if pipeline == "caption":
        from captioning.parameters import caption_parameters_from_config
        from pipeline import build_caption_pipeline

        pipeline_func, params = build_caption_pipeline(options), caption_parameters_from_config(cfg)
    else:
        pipeline_func, params = build_pipeline(options), parameters_from_config(cfg)
    params["registry"] = params["registry"] or str(registry)  # the local registry lives beside the artifacts
    started = time.time()
    log.info("running the pipeline in containers of %s as user %s (pipeline root %s)", image, as_user, root)
    try:
        pipeline_func(preset=preset, **params)
    finally:
        if as_user != f"{os.getuid()}:{os.getgid()}":
            _hand_back(client, image, as_user, root)
    run_dir = _latest_run(root, started)
    return collect_caption_summary(run_dir, cfg) if pipeline == "caption" else collect_summary(run_dir, cfg)


def _summed(figures) -> dict:
    """Files and bytes per artifact name, added up over the shards' pods."""
    total: dict[str, dict[str, int]] = {}
    for by_name in figures:
        for name, f in by_name.items():
            total.setdefault(name, {"files": 0, "bytes": 0})
            total[name]["files"] += f["files"]
            total[name]["bytes"] += f["bytes"]
    return total


# The steps that write an artifact, with its name; resolve_model and list_images hand on strings only (their
# failure shows as fetch_model's or plan_captions' missing result, their log above it).
CAPTION_OUTPUTS = {"fetch_model": "resolved", "plan_captions": "plan", "caption_shard": "captions",
                   "merge_captions": "captions"}


def collect_caption_summary(run_dir: Path | None, cfg: Config) -> dict:
    """The batch pipeline's steps from the step.json each wrote into its output (shards: one per iteration);
    as for the training pipeline, a step after a failed one is skipped, naming it."""
    found: dict[str, list[dict]] = {name: [] for name in CAPTION_OUTPUTS}
    for name, output in CAPTION_OUTPUTS.items():
        task = name.replace("_", "-")
        for path in sorted(run_dir.glob(f"**/{task}/{output}/step.json")) if run_dir else []:  # loops nest tasks
            found[name].append(json.loads(path.read_text()))
    planned = found["plan_captions"][0]["metrics"]["shards"] if found["plan_captions"] else None
    shards = found.pop("caption_shard")
    if shards or planned is not None:
        found["caption_shards"] = [{
            "status": "ok" if len(shards) == planned else "failed", "outputs": {},
            "metrics": {"shards": len(shards), "skipped": sum(r["metrics"].get("skipped", 0) for r in shards)},
            "artifacts": {"inputs": _summed(r["artifacts"]["inputs"] for r in shards),
                          "outputs": _summed(r["artifacts"]["outputs"] for r in shards)},
            **({} if len(shards) == planned else {"error": f"{len(shards)} of {planned} shards left captions"})}]
    steps: dict[str, dict] = {}
    failed = None
    for name in ("fetch_model", "plan_captions", "caption_shards", "merge_captions"):
        results = found.get(name) or []
        if results and results[0]["status"] == "ok":
            steps[name] = results[0]
        elif failed:
            steps[name] = {"status": "skipped", "reason": f"{failed} failed", "metrics": {}, "outputs": {}}
        else:
            failed = name
            steps[name] = results[0] if results else {"status": "failed", "error": "the container left no result "
                                                      "(see its log above)", "metrics": {}, "outputs": {}}
    status = "failed" if failed else "ok"
    return {"runner": "docker", "pipeline": "caption", "run_dir": str(run_dir) if run_dir else None,
            "config": cfg.model_dump(mode="json"), "steps": steps, "status": status}


def _hand_back(client, image: str, as_user: str, root: Path) -> None:
    """What the containers wrote belongs to the image's user: open it to the caller, who may delete it then."""
    client.containers.run(image, ["sh", "-c", 'find "$0" -user "$(id -u)" -exec chmod a+rwX {} +', str(root)],
                          user=as_user, remove=True, volumes={str(root): {"bind": str(root), "mode": "rw"}})
