"""One containerized KFP component per step, made from the step's declaration in ``captioning.workflow``.

A component's signature is written out from that declaration: its artifacts
(typed ``Input``/``Output``), ``upstream_ref`` (the previous step's W&B
reference), ``preset``, and one parameter per pipeline parameter
the step reads (``captioning.parameters``). Those parameters default to None,
"as the preset says": a pod builds its configuration from ``preset`` and what it
was given, so a component used on its own means the same as in the pipeline.

The body is the same for every step: artifacts become paths, the step runs
with its W&B tracker, and the result goes into the artifacts' metadata (what
the KFP UI shows), ``step.json`` and the output parameters. Nothing here
imports TensorFlow, Keras or W&B: compiling stays light.
"""

import functools
import inspect
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import NamedTuple, Optional

from kfp import dsl
from kfp.dsl import Input, Output

from captioning import DEFAULT_IMAGE
from captioning.parameters import PIPELINE_PRESET, PRESET_PARAMETER, PARAMETERS, parameter_type
from captioning.workflow import STEPS, Step, upstream_of

UPSTREAM_REF = "upstream_ref"
# Set by pipeline.py where a volume keeps the COCO archives across runs (the raw-cache PVC) and where one
# keeps train's checkpoints (used when the checkpoint_dir parameter is empty). Environment variables are
# not part of KFP's cache key, so where the volume is mounted does not change it.
DOWNLOAD_CACHE_ENV = "CAPTIONING_DOWNLOAD_CACHE"
CHECKPOINT_DIR_ENV = "CAPTIONING_CHECKPOINT_DIR"
# Every component's own output: its W&B run files when wandb.mode=offline, kept for a later `wandb sync`.
WANDB_RUN = "wandb_run"
# Where a pod writes an offline run before copying it into wandb_run.
OFFLINE_WANDB_ROOT = Path("/tmp/captioning-wandb")


def step_parameters(step: Step) -> list[str]:
    """The pipeline parameters a step's component takes: those whose setting the step reads."""
    return [name for name, key in PARAMETERS.items() if step.reads_key(key)]


@functools.cache
def _signature(name: str) -> inspect.Signature:
    step = STEPS[name]
    def param(name, annotation, default=inspect.Parameter.empty):
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default)

    params = [param(name, Input[getattr(dsl, STEPS[src].outputs[out].kind)])
              for name, (src, out) in step.inputs.items()]
    params += [param(name, Output[getattr(dsl, spec.kind)]) for name, spec in step.outputs.items()]
    params.append(param(WANDB_RUN, Output[dsl.Artifact]))
    if upstream_of(step.name):
        params.append(param(UPSTREAM_REF, str, ""))
    params.append(param(PRESET_PARAMETER, str, PIPELINE_PRESET))
    params += [param(name, Optional[parameter_type(name)], None) for name in step_parameters(step)]
    returns = NamedTuple("Outputs", list(step.returns.items()))
    return inspect.Signature(params, return_annotation=returns)


def _input_path(artifact) -> Path:
    """Where an input artifact is; a Metrics artifact without its file (one written before evaluate
    kept its scores there, e.g. from the KFP cache) is rebuilt from its metadata."""
    import tempfile

    path = Path(artifact.path)
    if artifact.schema_title == "system.Metrics" and not path.is_file():
        path = Path(tempfile.mkdtemp(prefix="metrics-")) / "metrics.json"
        path.write_text(json.dumps({"metrics": dict(artifact.metadata)}))
    return path


def _run_in_pod(step: Step, **kwargs):
    """What every component does inside its container."""
    from captioning.parameters import config_from_parameters
    from captioning.tracking import StepTracker
    from captioning.workflow import StepIO, read_result, returned, run_step, scratch_folder, write_result

    from captioning.redact import RedactingFilter, redact

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:  # the pod's log, like the CLI's: no URL password
        handler.addFilter(RedactingFilter())
    sys.argv[:] = [redact(arg) for arg in sys.argv]  # W&B records the command line (KFP's executor input)
    given = {name: kwargs[name] for name in step_parameters(step)}
    cfg = config_from_parameters(kwargs[PRESET_PARAMETER], **given)
    if step.name == "log_raw_data" and os.environ.get(DOWNLOAD_CACHE_ENV):
        cfg.data.download_cache = os.environ[DOWNLOAD_CACHE_ENV]
    if step.name == "train" and not cfg.train.checkpoint_dir and os.environ.get(CHECKPOINT_DIR_ENV):
        cfg.train.checkpoint_dir = os.environ[CHECKPOINT_DIR_ENV]
    artifacts = {name: kwargs[name] for name in (*step.inputs, *step.outputs)}
    inputs = {name: _input_path(kwargs[name]) for name in step.inputs}
    io = StepIO(inputs=inputs, outputs={name: Path(kwargs[name].path) for name in step.outputs},
                scratch=scratch_folder(step.name), produced_by={name: read_result(p) for name, p in inputs.items()},
                uris={name: artifact.uri for name, artifact in artifacts.items()})
    # The W&B group (the pipeline run) comes from the pod's environment: a run-scoped input would be in the cache key.
    tracker = StepTracker(cfg, step.name, io.scratch, upstream=[kwargs.get(UPSTREAM_REF, "")])
    if tracker.mode == "offline":  # a fixed local folder: W&B records its absolute paths, `wandb sync` needs them
        tracker.workdir = OFFLINE_WANDB_ROOT / step.name
        shutil.rmtree(tracker.workdir, ignore_errors=True)
    try:
        with tracker:
            result = run_step(step, cfg, io, tracker)
    except Exception as exc:
        from captioning.errors import CaptioningError
        from captioning.io import disk_full_from, exit_process

        known = exc if isinstance(exc, CaptioningError) else disk_full_from(exc)
        if known is None:
            raise  # a bug: its traceback
        # One line naming the file or setting (no URL password), not a traceback; and after a full disk not
        # HDF5's crash at exit (h5py#914).
        logging.getLogger(__name__).error("step %s failed: %s", step.name, redact(str(known)))
        exit_process(1)
    _keep_offline_run(tracker, kwargs[WANDB_RUN], result)
    if step.result_in:  # the result handed on as a parameter carries the figures too
        result.returns[step.result_in] = json.dumps(result.summary())
    for name, spec in step.outputs.items():
        artifact = artifacts[name]
        if spec.kind == "Metrics":  # the KFP UI's metrics view
            for key, value in result.metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    artifact.log_metric(key, float(value))
            continue
        figures = result.extra["artifacts"]["outputs"][name]  # what the pod uploads, for the KFP UI
        artifact.metadata.update(artifact_files=figures["files"], artifact_bytes=figures["bytes"])
        if name == step.result_output:
            for key, value in {**result.metrics, "wandb_ref": result.extra.get("wandb_ref", "")}.items():
                if isinstance(value, (int, float, str, bool)):
                    artifact.metadata[key] = value
    write_result(step, io, result)
    values = returned(step, result)
    return _signature(step.name).return_annotation(**values)


def _keep_offline_run(tracker, wandb_run, result) -> None:
    """An offline run outlives the pod in the step's wandb_run artifact (the W&B folder, links left out:
    the launcher uploads plain files and folders only); online or disabled, the artifact stays empty."""
    from captioning.io import tree_size

    out = Path(wandb_run.path)
    out.mkdir(parents=True, exist_ok=True)
    local = tracker.workdir / "wandb"
    if tracker.mode == "offline" and local.is_dir():
        shutil.copytree(local, out / "wandb", dirs_exist_ok=True,
                        ignore=lambda folder, names: [n for n in names if os.path.islink(os.path.join(folder, n))])
    figures = tree_size(out)
    result.extra["artifacts"]["outputs"][WANDB_RUN] = figures
    wandb_run.metadata.update(
        mode=tracker.mode, artifact_files=figures["files"], artifact_bytes=figures["bytes"],
        pod_path=str(local) if tracker.mode == "offline" else "",
        sync=(f"put this artifact's wandb/ folder at {local} (a copy or a link), then "
              f"`wandb sync {local}/wandb/offline-run-*`") if tracker.mode == "offline" else "")


def step_component(name: str):
    """The KFP component of one step, on the project's image (``set_container_image`` overrides it per task)."""
    step = STEPS[name]

    signature = _signature(name)

    def component(**kwargs):
        arguments = signature.bind(**kwargs)  # what a written-out signature would do: refuse unknowns, fill defaults
        arguments.apply_defaults()
        return _run_in_pod(step, **arguments.arguments)

    component.__name__ = component.__qualname__ = name
    component.__doc__ = step.summary
    component.__signature__ = signature
    component.__annotations__ = {p.name: p.annotation for p in signature.parameters.values()}
    component.__annotations__["return"] = signature.return_annotation
    return dsl.component(base_image=DEFAULT_IMAGE, target_image=DEFAULT_IMAGE)(component)
