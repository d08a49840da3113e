"""The five steps as every runner runs them: what each reads and writes, and one function each.

``STEPS[name].run(cfg, io, tracker)`` runs the library step (``captioning.steps``)
and logs it to W&B (``captioning.records``). The in-process runner
calls it with folders under the work dir; the KFP components (in pods, or in
Docker under kfp.local) call it with their artifacts' paths. The declarations
here are the wiring: ``inputs`` say which step's output feeds which input (the
DAG in ``pipeline.py`` and the in-process runner both follow them), ``reads``
says which settings a step uses (so which pipeline parameters its component
takes), ``outputs`` name the artifacts and where the in-process runner puts them.
"""

from __future__ import annotations

import html
import json
import logging
import shutil
import tempfile
from base64 import b64encode
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from captioning.config import Config
from captioning.errors import ConfigError
from captioning.io import read_json, tree_size, write_json_atomic
from captioning.steps.result import StepResult
from captioning.tracking import StepTracker

log = logging.getLogger(__name__)

# Every step reads the W&B settings.
TRACKING_KEYS = ("wandb",)
# Where a step writes its StepResult: into its first artifact folder, as this file.
RESULT_FILE = "step.json"


@dataclass(frozen=True)
class Output:
    kind: str  # the KFP artifact type: Dataset, Model, Metrics (a file), HTML (a file)
    local: str  # where the in-process runner puts it, relative to the work dir


@dataclass(frozen=True)
class StepIO:
    """The paths one run of a step works on."""

    inputs: dict[str, Path]
    outputs: dict[str, Path]
    scratch: Path  # the step's own working folder; never an artifact
    # Per input, the summary of the step that produced it (e.g. the model's W&B reference for promote).
    produced_by: dict[str, dict] = field(default_factory=dict)
    # Per artifact, where it stays once the step is over (gs://, minio://, s3:// in a pod): what W&B references.
    uris: dict[str, str] = field(default_factory=dict)

    def uri(self, name: str) -> str:
        return self.uris.get(name) or (self.inputs.get(name) or self.outputs[name]).resolve().as_uri()


@dataclass(frozen=True)
class Step:
    name: str
    summary: str  # one line: the component's description
    run: Callable[[Config, StepIO, StepTracker], StepResult]
    reads: tuple[str, ...]  # configuration keys or whole sections
    inputs: dict[str, tuple[str, str]] = field(default_factory=dict)  # input -> (step, output)
    outputs: dict[str, Output] = field(default_factory=dict)
    returns: dict[str, type] = field(default_factory=lambda: {"wandb_ref": str})  # KFP output parameters
    result_in: str = ""  # the output parameter holding the StepResult when the step has no artifact

    def reads_key(self, key: str) -> bool:
        return any(key == r or key.startswith(r + ".") for r in (*self.reads, *TRACKING_KEYS))

    @property
    def result_output(self) -> str:
        return self.result_in or next(iter(self.outputs))


def run_step(step: Step, cfg: Config, io: StepIO, tracker: StepTracker) -> StepResult:
    """Run a step and record what it moved: every runner goes through here."""
    result = step.run(cfg, io, tracker)
    result.extra["artifacts"] = artifact_figures(io)
    if step.result_in:  # a step without artifacts hands its whole result on as an output parameter
        result.returns[step.result_in] = json.dumps(result.summary())
    return result


def artifact_figures(io: StepIO) -> dict[str, dict[str, dict[str, int]]]:
    """Files and bytes of each artifact the step read and wrote: what a cluster copies in and out of its pod.

    An output folder's figures leave out the step's other outputs inside it (in-process, evaluate's
    metrics.json and report.html sit in its predictions folder); the step.json a pod adds is not counted.
    """
    outputs = list(io.outputs.values())
    return {
        "inputs": {name: tree_size(path, [path / RESULT_FILE]) for name, path in io.inputs.items()},
        "outputs": {name: tree_size(path, [path / RESULT_FILE] + [o for o in outputs if o != path
                                                                    and o.is_relative_to(path)])
                    for name, path in io.outputs.items()},
    }


def write_result(step: Step, io: StepIO, result: StepResult) -> None:
    """In a pod: the StepResult inside the step's first artifact, for the next steps and the Docker runner."""
    if not step.result_in:
        write_json_atomic(io.outputs[step.result_output] / RESULT_FILE, {"step": step.name, **result.summary()})


def read_result(folder: Path) -> dict:
    """The StepResult a pod left in an artifact folder; empty where none was written."""
    path = Path(folder) / RESULT_FILE
    return read_json(path, "step result") if path.is_file() else {}


# ------------------------------------------------------------------ the steps


def _log_raw_data(cfg: Config, io: StepIO, t: StepTracker) -> StepResult:
    from captioning.steps.log_raw_data import log_raw_data
    from captioning.records import record_log_raw_data

    out = io.outputs["raw_data"]
    result = log_raw_data(cfg.data, out, io.scratch)
    return _tracked(result, record_log_raw_data(t, cfg, result, out, io.uri("raw_data")))


def _process_data(cfg: Config, io: StepIO, t: StepTracker) -> StepResult:
    from captioning.steps.process_data import process_data
    from captioning.records import record_process_data

    parts = {name: io.outputs[name] for name in ("train_data", "test_data")}
    result = process_data(cfg, io.inputs["raw_data"], parts["train_data"], parts["test_data"], scratch=io.scratch)
    return _tracked(result, record_process_data(t, cfg, result, io.inputs["raw_data"], parts,
                                                {name: io.uri(name) for name in parts}, io.scratch))


def _train(cfg: Config, io: StepIO, t: StepTracker) -> StepResult:
    from captioning.steps.train import train
    from captioning.records import record_train, train_callbacks

    dataset, model = io.inputs["train_data"], io.outputs["model"]
    # Checkpoints on a volume or bucket (train.checkpoint_dir) survive a pre-empted pod; otherwise the step's folder.
    result = train(cfg, dataset, io.scratch, callbacks=train_callbacks(t, cfg, dataset, io.scratch), model_dir=model)
    return _tracked(result, record_train(t, result, model))


def _evaluate(cfg: Config, io: StepIO, t: StepTracker) -> StepResult:
    from captioning.steps.evaluate import evaluate
    from captioning.records import record_evaluate

    out = io.outputs["predictions"]
    result = evaluate(cfg, io.inputs["model"], io.inputs["test_data"], out)
    metric = cfg.promote.metric
    if metric not in result.metrics:
        raise ConfigError(f"promote.metric={metric!r}: not among the evaluated metrics "
                          f"({', '.join(sorted(result.metrics))})")
    if io.outputs["metrics"] != out / "metrics.json":
        shutil.copyfile(out / "metrics.json", io.outputs["metrics"])  # promote reads the scores from here
    io.outputs["report"].write_text(html_report(out, result.extra["figures"]))
    result.outputs["report"] = str(io.outputs["report"])
    tracked = _tracked(result, record_evaluate(t, result, out, io.inputs["test_data"]))
    tracked.returns["Output"] = float(result.metrics[metric])  # what the pipeline's promote gate compares
    return tracked


def _promote(cfg: Config, io: StepIO, t: StepTracker) -> StepResult:
    from captioning.steps.promote import promote, promote_result
    from captioning.records import promote_in_wandb_registry, record_promote

    model = io.inputs["model"]
    deploying = cfg.promote.deploy
    if deploying:  # an impossible deployment is refused before the alias moves
        from captioning.deploy.after_promote import check_deployment

        check_deployment(cfg, io.uri("model"))
    if t.online:  # the W&B Registry holds the production model
        metrics = read_json(io.inputs["metrics"], "evaluate metrics")["metrics"]
        model_ref = io.produced_by.get("model", {}).get("wandb_ref", "")
        result = promote_result(cfg, promote_in_wandb_registry(t, cfg, metrics, model_ref))
    else:
        if not cfg.promote.registry:
            raise ConfigError("promote.registry: no registry folder given (the pipeline parameter 'registry'), "
                              "and wandb.mode is not online")
        result = promote(cfg, model, io.inputs["metrics"], Path(cfg.promote.registry), io.scratch)
    if deploying and result.metrics["promoted"] and not t.online and not _still_holds(cfg, result):
        # A promote that ran meanwhile moved the alias on (to a better model): it deploys that one; this one must
        # not replace it.
        log.warning("promote.deploy: the alias %s moved on from %s meanwhile; not deploying this model",
                    cfg.promote.alias, result.extra.get("version"))
        result.extra["deployed"] = None
        result.metrics["deployed"] = False
    elif deploying and result.metrics["promoted"]:
        from captioning.deploy.after_promote import deploy_promoted

        result.extra["deployed"] = deploy_promoted(cfg, io.uri("model"), result.extra.get("version") or "")
        result.metrics["deployed"] = True
    elif deploying:
        result.extra["deployed"] = None  # the production model did not change: nothing to serve anew
        result.metrics["deployed"] = False
    record_promote(t, result)
    result.returns["promoted"] = bool(result.metrics["promoted"])
    return result


def _still_holds(cfg: Config, result: StepResult) -> bool:
    from captioning.registry import LocalRegistry

    registry = LocalRegistry(Path(cfg.promote.registry), cfg.promote.collection)
    return registry.aliases().get(cfg.promote.alias) == result.extra.get("version")


def _tracked(result: StepResult, wandb_ref: str) -> StepResult:
    result.extra["wandb_ref"] = wandb_ref
    result.returns["wandb_ref"] = wandb_ref
    return result


def html_report(out_dir: Path, figures: list[str]) -> str:
    """evaluate's page for the KFP UI: metrics, attention figures, the first predictions."""
    report, predictions = read_json(out_dir / "metrics.json"), read_json(out_dir / "predictions.json")
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.4f}</td></tr>" for k, v in report["metrics"].items())
    images = "".join(
        f'<figure><img src="data:image/png;base64,{b64encode(Path(f).read_bytes()).decode()}" '
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


ARCHIVE_LIMIT_KEYS = ("data.max_expanded_bytes", "data.max_expansion_ratio")  # checked on download and extraction
DOWNLOAD_KEYS = ("data.base_url", "data.files", "data.sha256", "data.verify_sha256", "data.retries", "data.retry_backoff_s",
                 "data.timeout_s", "data.transfer_timeout_s", "data.download_cache", "data.split", "data.split_url",
                 "data.split_sha256", *ARCHIVE_LIMIT_KEYS)
SPLIT_KEYS = ("data.split", "data.max_images", "data.seed", "data.val_images", "data.test_images")

STEPS: dict[str, Step] = {s.name: s for s in (
    Step("log_raw_data", "Fetch and verify the COCO 2014 archives; the artifact is the archives, unextracted, "
         "and their manifest.", _log_raw_data, reads=DOWNLOAD_KEYS,
         outputs={"raw_data": Output("Dataset", "raw")}),
    Step("process_data", "Clean and split the captions, build the vocabulary, extract InceptionV3 grid features "
         "from the zips; train_data holds train+val and the backbone, test_data the test split.",
         _process_data, reads=(*SPLIT_KEYS, *ARCHIVE_LIMIT_KEYS, "features", "text"),
         inputs={"raw_data": ("log_raw_data", "raw_data")},
         outputs={"train_data": Output("Dataset", "processed/train"),
                  "test_data": Output("Dataset", "processed/test")}),
    Step("train", "Train the captioner; checkpoints go to checkpoint_dir (a volume or bucket) so a retried pod "
         "resumes.", _train, reads=("train",),
         inputs={"train_data": ("process_data", "train_data")},
         outputs={"model": Output("Model", "train/model")}),
    Step("evaluate", "Caption the test split, score it (BLEU, METEOR, ROUGE-L, CIDEr-D, blind baseline), draw "
         "attention. ``Output`` is the score the promote gate reads (promote_metric); it keeps KFP's default name "
         "because kfp.local 2.17 resolves only ``<task>-Output`` channels in ``dsl.If`` conditions.",
         _evaluate, reads=("evaluate", "promote.metric"),
         inputs={"model": ("train", "model"), "test_data": ("process_data", "test_data")},
         outputs={"predictions": Output("Dataset", "evaluate"),
                  "metrics": Output("Metrics", "evaluate/metrics.json"),
                  "report": Output("HTML", "evaluate/report.html")},
         returns={"Output": float, "wandb_ref": str}),
    Step("promote", "Promote the candidate if it beats the production model by the margin.", _promote,
         reads=("promote.metric", "promote.margin", "promote.alias", "promote.collection", "promote.registry",
                "promote.deploy", "promote.deploy_name", "promote.deploy_namespace", "promote.deploy_project",
                "promote.deploy_region", "promote.deploy_gpu"),
         inputs={"model": ("train", "model"), "metrics": ("evaluate", "metrics")},
         returns={"promoted": bool, "decision": str}, result_in="decision"),
)}


def scratch_folder(step: str) -> Path:
    """A pod's working folder for a step (lost with the pod)."""
    return Path(tempfile.mkdtemp(prefix=f"{step}-"))


def upstream_of(step: str) -> str:
    """The step whose W&B artifact this step's run records as its upstream (the previous one)."""
    names = list(STEPS)
    return names[names.index(step) - 1] if names.index(step) else ""


def returned(step: Step, result: StepResult) -> dict[str, Any]:
    missing = set(step.returns) - set(result.returns)
    if missing:
        raise RuntimeError(f"{step.name} returned no {', '.join(sorted(missing))}")
    return {name: result.returns[name] for name in step.returns}
