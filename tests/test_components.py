"""Each component's function called directly, with real KFP artifact objects, chained on small data."""

import json
from pathlib import Path

import pytest
from kfp.dsl import HTML, Dataset, Metrics, Model

pytestmark = pytest.mark.slow


def artifact(kind, root: Path, name: str):
    return kind(name=name, uri=str(root / name), metadata={})


@pytest.fixture(scope="module")
def chain(small_mirror, tmp_path_factory):
    from components.evaluate import evaluate
    from components.log_raw_data import log_raw_data
    from components.process_data import process_data
    from components.promote import promote
    from components.train import train

    root = tmp_path_factory.mktemp("kfp")
    raw, processed, model = artifact(Dataset, root, "raw"), artifact(Dataset, root, "processed"), artifact(Model, root, "model")
    metrics, predictions, report = artifact(Metrics, root, "metrics"), artifact(Dataset, root, "pred"), artifact(HTML, root, "report.html")
    out = {"raw": log_raw_data.python_func(raw_data=raw, base_url=small_mirror["root"], preset="demo")}
    out["process"] = process_data.python_func(raw_data=raw, processed=processed, preset="demo", val_images=8,
                                              test_images=8, weights="none", min_count=1)
    out["train"] = train.python_func(processed=processed, model=model, preset="demo", epochs=2, units=32,
                                     embedding_dim=16, checkpoint_dir=str(root / "ckpt"))
    out["evaluate"] = evaluate.python_func(model=model, processed=processed, raw_data=raw, metrics=metrics,
                                           predictions=predictions, report=report, preset="demo",
                                           attention_samples=1, decoder="greedy")
    out["promote"] = promote.python_func(model=model, metrics=metrics, preset="demo",
                                         registry=str(root / "registry"))
    return {"root": root, "raw": raw, "processed": processed, "model": model, "metrics": metrics,
            "report": report, "out": out}


def test_artifact_metadata_shows_what_a_user_wants(chain):
    assert chain["raw"].metadata["train2014_images"] == 39
    assert chain["processed"].metadata["images"] == 66 and chain["processed"].metadata["skipped_files"] == 4
    assert chain["model"].metadata["epochs"] == 2
    assert {"BLEU-4", "CIDEr", "METEOR", "baseline_CIDEr"} <= set(chain["metrics"].metadata)
    processed = Path(chain["processed"].path)  # what the pod uploads, in the metadata the KFP UI shows
    on_disk = [p for p in processed.rglob("*") if p.is_file() and p.name != "step.json"]
    assert chain["processed"].metadata["artifact_files"] == len(on_disk)
    assert chain["processed"].metadata["artifact_bytes"] == sum(p.stat().st_size for p in on_disk)
    record = json.loads((processed / "step.json").read_text())
    assert record["artifacts"]["outputs"]["processed"]["files"] == len(on_disk)
    assert record["artifacts"]["inputs"]["raw_data"]["files"] == chain["raw"].metadata["artifact_files"]


def test_outputs_are_folders_the_next_step_reads(chain):
    assert (Path(chain["raw"].path) / "manifest.json").is_file()
    assert (Path(chain["processed"].path) / "dataset.json").is_file()
    assert (Path(chain["model"].path) / "captioner.keras").is_file()
    assert (chain["root"] / "ckpt" / "history.csv").is_file()  # checkpoints on the volume, not in the artifact
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
        train.python_func(processed=artifact(Dataset, tmp_path, "p"), model=artifact(Model, tmp_path, "m"),
                          preset="demo", epochs=0)
