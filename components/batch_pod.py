"""What every batch-captioning component does in its pod: settings from its parameters, one-line errors.

The components themselves (resolve_model.py, fetch_model.py, list_images.py, plan_captions.py,
caption_shard.py, merge_captions.py) are thin: typed KFP inputs and outputs around
``captioning.steps.batch_caption``. Nothing here imports TensorFlow: compiling stays light.
"""

import json
import logging
import sys
from pathlib import Path


def pod_config(preset: str, **values):
    from captioning.parameters import caption_config
    from captioning.redact import RedactingFilter, redact

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactingFilter())
    sys.argv[:] = [redact(arg) for arg in sys.argv]
    return caption_config(preset, **values)


def run_or_exit(step: str, fn):
    """``fn()``'s result; a known failure is one redacted line and exit 1 (a bug keeps its traceback)."""
    from captioning.errors import CaptioningError
    from captioning.io import disk_full_from, exit_process
    from captioning.redact import redact

    try:
        return fn()
    except Exception as exc:
        known = exc if isinstance(exc, CaptioningError) else disk_full_from(exc)
        if known is None:
            raise
        logging.getLogger(step).error("step %s failed: %s", step, redact(str(known)))
        exit_process(1)


def measure(result, inputs: dict, outputs: dict) -> None:
    """What the pod downloaded and uploads, as the training steps record it (``artifacts``)."""
    from captioning.workflow import StepIO, artifact_figures

    io = StepIO(inputs={k: Path(a.path) for k, a in inputs.items()},
                outputs={k: Path(a.path) for k, a in outputs.items()}, scratch=Path("/tmp"))
    result.extra["artifacts"] = artifact_figures(io)


def describe(artifact, result, name: str) -> None:
    """The KFP UI's view of an output: the step's figures in the artifact's metadata, and its step.json."""
    from captioning.io import write_json_atomic

    for key, value in result.metrics.items():
        if isinstance(value, (int, float, str, bool)):
            artifact.metadata[key] = value
    figures = result.extra.get("artifacts", {}).get("outputs", {}).get(name)
    if figures:
        artifact.metadata.update(artifact_files=figures["files"], artifact_bytes=figures["bytes"])
    folder = Path(artifact.path)
    if folder.is_dir():
        write_json_atomic(folder / "step.json", json.loads(json.dumps(result.summary(), default=str)))
