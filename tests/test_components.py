"""Each component's function called directly, with real KFP artifact objects, chained on small data.

The artifacts are given as a cluster's launcher gives them: a durable ``uri`` in the
object store (gs:// on Vertex, minio:// or s3:// on Kubeflow) and a local ``path``
where the pod reads and writes its copy.
"""

import json
from pathlib import Path

import pytest
from kfp.dsl import HTML, Artifact, Dataset, Metrics, Model

from helpers.wandb_offline import leet_records, logged_artifacts, references

pytestmark = pytest.mark.slow

STORES = {"raw": "gs://coco-bucket/pipeline-root/run-1/log-raw-data", "processed": "minio://mlpipeline/v2/run-1"}


def artifact(kind, root: Path, name: str, store: str = ""):
    if not store:
        return kind(name=name, uri=str(root / name), metadata={})
    made = kind(name=name, uri=f"{store}/{name}", metadata={})
    made.custom_path = str(root / name)  # the pod's local copy of the object-store artifact
    return made


def wandb_runs(root: Path) -> dict:
    return {step: artifact(Artifact, root, f"wandb-{step}") for step in
            ("log_raw_data", "process_data", "train", "evaluate", "promote")}


@pytest.fixture(scope="module")
def chain(small_mirror, tmp_path_factory):
    from components.evaluate import evaluate
    from components.log_raw_data import log_raw_data
    from components.process_data import process_data
    from components.promote import promote
    from components.train import train

    root = tmp_path_factory.mktemp("kfp")
    raw = artifact(Dataset, root, "raw", STORES["raw"])
    train_data = artifact(Dataset, root, "train_data", STORES["processed"])
    test_data = artifact(Dataset, root, "test_data", STORES["processed"])
    model = artifact(Model, root, "model")
    metrics, predictions, report = artifact(Metrics, root, "metrics"), artifact(Dataset, root, "pred"), artifact(HTML, root, "report.html")
    runs = wandb_runs(root)
    out = {"raw": log_raw_data.python_func(raw_data=raw, wandb_run=runs["log_raw_data"], base_url=small_mirror["root"],
                                           preset="demo")}
    out["process"] = process_data.python_func(raw_data=raw, train_data=train_data, test_data=test_data,
                                              wandb_run=runs["process_data"], preset="demo", val_images=8,
                                              test_images=8, weights="none", min_count=1)
    out["train"] = train.python_func(train_data=train_data, model=model, wandb_run=runs["train"], preset="demo",
                                     epochs=2, scst_epochs=0, units=32, embedding_dim=16, checkpoint_dir=str(root / "ckpt"))
    # evaluate reads only the model and the test split: everything else is out of its reach meanwhile
    hidden = root / "not-downloaded-by-evaluate"
    hidden.mkdir()
    for name in ("raw", "train_data"):
        (root / name).rename(hidden / name)
    out["evaluate"] = evaluate.python_func(model=model, test_data=test_data, metrics=metrics,
                                           predictions=predictions, report=report, wandb_run=runs["evaluate"],
                                           preset="demo", attention_samples=1, decoder="greedy")
    for name in ("raw", "train_data"):
        (hidden / name).rename(root / name)
    out["promote"] = promote.python_func(model=model, metrics=metrics, wandb_run=runs["promote"], preset="demo",
                                         registry=str(root / "registry"))
    return {"root": root, "raw": raw, "train_data": train_data, "test_data": test_data, "model": model,
            "metrics": metrics, "report": report, "out": out, "runs": runs}


def test_artifact_metadata_shows_what_a_user_wants(chain):
    assert chain["raw"].metadata["train2014_images"] == 39
    assert chain["train_data"].metadata["images"] == 63 and chain["train_data"].metadata["skipped_files"] == 7
    assert chain["model"].metadata["epochs"] == 2
    assert {"BLEU-4", "CIDEr", "METEOR", "baseline_CIDEr"} <= set(chain["metrics"].metadata)
    record = json.loads((Path(chain["train_data"].path) / "step.json").read_text())
    for name in ("train_data", "test_data"):  # what the pod uploads, in the metadata the KFP UI shows
        folder = Path(chain[name].path)
        on_disk = [p for p in folder.rglob("*") if p.is_file() and p.name != "step.json"]
        assert chain[name].metadata["artifact_files"] == len(on_disk)
        assert chain[name].metadata["artifact_bytes"] == sum(p.stat().st_size for p in on_disk)
        assert record["artifacts"]["outputs"][name]["files"] == len(on_disk)
    assert record["artifacts"]["inputs"]["raw_data"]["files"] == chain["raw"].metadata["artifact_files"] <= 10


def test_outputs_are_folders_the_next_step_reads(chain):
    assert (Path(chain["raw"].path) / "manifest.json").is_file()
    assert (Path(chain["train_data"].path) / "dataset.json").is_file()
    assert (Path(chain["test_data"].path) / "dataset.json").is_file()
    assert (Path(chain["model"].path) / "captioner.keras").is_file()
    assert len(list((chain["root"] / "ckpt").glob("train-*/history.csv"))) == 1  # on the volume, not in the artifact
    assert json.loads((Path(chain["model"].path) / "step.json").read_text())["status"] == "ok"


def test_evaluate_returns_the_gate_score_and_an_html_report(chain):
    score, ref = chain["out"]["evaluate"]
    assert score == pytest.approx(chain["metrics"].metadata["CIDEr"])
    page = Path(chain["report"].path).read_text()
    assert "<table" in page and "data:image/png;base64," in page and "Blind baseline" in page


def test_promote_decides_against_the_registry(chain):
    promoted, decision = chain["out"]["promote"]
    assert promoted is True and json.loads(decision)["production"] is None
    assert json.loads(decision)["artifacts"]["inputs"]["model"]["files"] == chain["model"].metadata["artifact_files"]
    aliases = json.loads((chain["root"] / "registry" / "captioning-model" / "aliases.json").read_text())
    assert aliases == {"production": "v1"}


def test_bad_parameters_fail_with_the_setting_named(tmp_path):
    from captioning.errors import ConfigError
    from components.train import train

    with pytest.raises(ConfigError, match="train.epochs: Input should be greater than or equal to 1"):
        train.python_func(train_data=artifact(Dataset, tmp_path, "p"), model=artifact(Model, tmp_path, "m"),
                          wandb_run=artifact(Artifact, tmp_path, "w"), preset="demo", epochs=0)


def test_wandb_references_point_at_the_durable_artifact_uris(chain):
    """A pod's /gcs/... or /minio/... path is gone with the pod: W&B must record gs:// and minio:// URIs."""
    def run_artifacts(step):
        (run_dir,) = (Path(chain["runs"][step].path) / "wandb" / "wandb").glob("offline-run-*")
        return logged_artifacts(leet_records(run_dir))

    raw = run_artifacts("log_raw_data")["coco-2014-raw"]
    assert sorted(references(raw)) == [f"{STORES['raw']}/raw/archives/{rel}" for rel in (
        "annotations/annotations_trainval2014.zip", "zips/train2014.zip", "zips/val2014.zip")]
    processed = run_artifacts("process_data")["coco-2014-processed"]
    assert sorted(references(processed)) == [f"{STORES['processed']}/{name}/features"
                                             for name in ("test_data", "train_data")]
    local = str(chain["root"])
    assert not any(local in ref or ref.startswith(("file:", "/")) for ref in references(raw) + references(processed))


def test_offline_runs_are_kept_in_each_steps_wandb_run_artifact(chain):
    for step, run in chain["runs"].items():
        (run_dir,) = (Path(run.path) / "wandb" / "wandb").glob("offline-run-*")
        assert (run_dir / f"run-{run_dir.name.rsplit('-', 1)[1]}.wandb").is_file()
        assert run.metadata["mode"] == "offline" and "wandb sync" in run.metadata["sync"]
        files = [p for p in Path(run.path).rglob("*") if p.is_file()]
        assert run.metadata["artifact_files"] == len(files)
        # plain files and folders only: the KFP launcher uploads nothing else
        assert not [p for p in Path(run.path).rglob("*") if p.is_symlink()]
    # the files W&B staged for the step's artifacts travel with the run, so `wandb sync` can upload them
    assert any((Path(chain["runs"]["train"].path) / "wandb" / "artifact-staging").rglob("*"))


def test_a_fetched_offline_run_resolves_where_the_docs_say(chain, tmp_path):
    """Fetched elsewhere and put back at the pod's path (docs/tracking.md: put the fetched folder back at pod_path), every file W&B
    recorded by absolute path is there."""
    import shutil

    run = chain["runs"]["train"]
    pod_path = Path(run.metadata["pod_path"])
    fetched = tmp_path / "runs" / "train"
    shutil.copytree(run.path, fetched)  # as `gsutil cp -r` / `mc cp --recursive` would
    shutil.rmtree(pod_path)  # the pod is gone
    pod_path.symlink_to(fetched / "wandb", target_is_directory=True)
    try:
        (run_dir,) = (fetched / "wandb" / "wandb").glob("offline-run-*")
        paths = {e["local_path"] for a in logged_artifacts(leet_records(run_dir)).values()
                 for e in a["manifest"]["contents"] if e.get("local_path")}
        assert paths and all(p.startswith(str(pod_path)) for p in paths)
        assert all(Path(p).is_file() for p in paths), sorted(p for p in paths if not Path(p).is_file())
    finally:
        pod_path.unlink()


def test_a_step_failing_in_a_pod_logs_one_line_without_the_password_and_exits_1(tmp_path, caplog):
    """A pod's log is read by many: a step's error is one line naming the problem, its URL without the
    password (Python's traceback would print the exception text as it is)."""
    from components.log_raw_data import log_raw_data

    with pytest.raises(SystemExit) as exited:
        log_raw_data.python_func(raw_data=artifact(Dataset, tmp_path, "raw"), wandb_run=artifact(Artifact, tmp_path, "w"),
                                 preset="demo", base_url=f"file://user:s3cret@{tmp_path}/no-mirror",
                                 wandb_mode="disabled")
    assert exited.value.code == 1
    assert "s3cret" not in caplog.text
    assert "step log_raw_data failed: " in caplog.text
    assert "no-mirror/annotations/annotations_trainval2014.zip: file not found" in caplog.text
