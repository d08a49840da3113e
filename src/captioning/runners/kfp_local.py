"""``captioning run --runner docker``: the compiled pipeline in containers, with kfp.local.

The same DAG as on a cluster, run by kfp.local's DockerRunner on the project's
image: every step in its own container, artifacts passed through the pipeline
root (a host folder mounted into each container). The summary is read back
from the ``step.json`` each step writes into its output, not from the runner's
status, because DockerRunner can report success for a failed container
(kubeflow/pipelines#13332).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from captioning import STEPS
from captioning.config import Config
from captioning.errors import CaptioningError
from captioning.params import parameters_from_config

log = logging.getLogger(__name__)

# The artifact each step writes its step.json into.
MAIN_OUTPUT = {"log_raw_data": "raw_data", "process_data": "processed", "train": "model",
               "evaluate": "predictions"}


def _latest_run(root: Path, since: float) -> Path | None:
    runs = [p for p in root.glob("captioning-*") if p.is_dir() and p.stat().st_mtime >= since - 1]
    return max(runs, key=lambda p: p.stat().st_mtime) if runs else None


def collect_summary(run_dir: Path | None, registry: Path, cfg: Config, started: float) -> dict:
    steps: dict[str, dict] = {}
    for name in STEPS:
        if name == "promote":
            decision_file = registry / "last_decision.json"
            if decision_file.exists() and decision_file.stat().st_mtime >= started:
                d = json.loads(decision_file.read_text())
                steps[name] = {"status": "ok", "metrics": {"promoted": d["promoted"], "candidate": d["candidate"],
                                                           "production": d["production"], "metric": d["metric"]},
                               "outputs": {"registry": str(registry)}, "version": d["version"]}
            else:
                steps[name] = {"status": "skipped" if steps.get("evaluate", {}).get("status") == "ok" else "failed",
                               "reason": "the gate did not open or the step did not finish", "metrics": {},
                               "outputs": {}}
            continue
        found = sorted(run_dir.glob(f"{name.replace('_', '-')}/{MAIN_OUTPUT[name]}/step.json")) if run_dir else []
        if found:
            data = json.loads(found[-1].read_text())
            data.pop("step", None)
            steps[name] = data
        else:
            steps[name] = {"status": "failed", "error": "the container left no step.json (see its log above)",
                           "metrics": {}, "outputs": {}}
    failed = any(s["status"] == "failed" for s in steps.values())
    return {"runner": "docker", "run_dir": str(run_dir) if run_dir else None, "config": cfg.model_dump(mode="json"),
            "steps": steps, "status": "failed" if failed else "ok"}


def run_in_docker(cfg: Config, workdir: str | Path, image: str, preset: str) -> dict:
    import docker
    from kfp import local

    from pipeline import BuildOptions, build_pipeline

    work = Path(workdir).resolve()
    root = work / "kfp-root"
    registry = root / "registry"
    registry.mkdir(parents=True, exist_ok=True)
    try:
        client = docker.from_env()
        client.ping()
        client.images.get(image)
    except docker.errors.ImageNotFound:
        raise CaptioningError(f"--image {image}: not in the local Docker engine; build it with `captioning image build`") from None
    except Exception as exc:
        raise CaptioningError(f"no Docker engine reachable ({exc}); start dockerd or set DOCKER_HOST") from None

    # Offline W&B runs land beside the artifacts, on the host (syncable later with `wandb sync`).
    env = {"WANDB_MODE": os.environ.get("WANDB_MODE") or cfg.wandb.mode, "HOME": "/tmp",
           "CAPTIONING_WANDB_DIR": str(root)}
    if os.environ.get("WANDB_API_KEY") and cfg.wandb.mode == "online":
        env["WANDB_API_KEY"] = os.environ["WANDB_API_KEY"]
    local.init(runner=local.DockerRunner(user=f"{os.getuid()}:{os.getgid()}", environment=env),
               pipeline_root=str(root), raise_on_error=False)
    pipeline_func = build_pipeline(BuildOptions(image=image, preset=preset))
    params = parameters_from_config(cfg)
    started = time.time()
    log.info("running the pipeline in containers of %s (pipeline root %s)", image, root)
    pipeline_func(preset=preset, registry=str(registry), **params)
    return collect_summary(_latest_run(root, started), registry, cfg, started)
