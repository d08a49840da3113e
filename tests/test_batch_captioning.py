"""The batch captioning pipeline: in-process on a real promoted model, compiled for the clusters."""

import json
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import captioning_cli
from helpers.http_mirror import HttpMirror
from helpers.wandb_offline import leet_records, logged_artifacts

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> dict:
    from captioning.data.demo import synthetic_jpegs

    root = tmp_path_factory.mktemp("scenes")
    paths = synthetic_jpegs(root / "images", 5, seed=11)
    (root / "images" / "zz_broken.jpg").write_bytes(paths[0].read_bytes()[:300])  # truncated: a skipped line
    return {"root": root, "images": paths}


@pytest.fixture(scope="module")
def cli_captions(promoted_model, scenes) -> dict:
    proc = captioning_cli("caption", "--model", str(promoted_model["model"]), *map(str, scenes["images"]))
    assert proc.returncode == 0, proc.stderr
    return dict(line.split("\t") for line in proc.stdout.strip().splitlines())


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_folder_is_captioned_in_shards_with_the_production_model(promoted_model, scenes, cli_captions, tmp_path):
    work = tmp_path / "work"
    proc = captioning_cli("run", "--pipeline", "caption", "--workdir", str(work),
                          "--set", f"batch.source={scenes['root'] / 'images'}", "--set", "batch.shard_images=2",
                          "--set", "batch.sample=3", "--set", f"promote.registry={promoted_model['registry']}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((work / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["pipeline"] == "caption"
    assert summary["steps"]["plan_captions"]["metrics"] == {"images": 6, "shards": 3}
    assert summary["steps"]["merge_captions"]["metrics"]["captioned"] == 5
    assert summary["steps"]["merge_captions"]["metrics"]["skipped"] == 1
    # what each step's pod would download and upload: the model and the plan once per shard
    model_files = len([p for p in promoted_model["model"].rglob("*") if p.is_file()]) + 1  # + model_source.json
    shard_inputs = summary["steps"]["caption_shards"]["artifacts"]["inputs"]
    assert shard_inputs["model"]["files"] == 3 * model_files and shard_inputs["plan"]["files"] == 3 * 4
    assert summary["steps"]["merge_captions"]["artifacts"]["outputs"]["captions"]["files"] == 1

    lines = read_lines(work / "caption" / "captions" / "captions.jsonl")
    assert [line["uri"] for line in lines] == sorted(str(p) for p in (scenes["root"] / "images").iterdir())
    for line in lines[:5]:  # the same captions as `captioning caption`, a score, the registry's version
        assert line["caption"] == cli_captions[line["uri"]]
        assert line["model_version"] == promoted_model["version"] and -50 < line["score"] <= 0
    broken = lines[5]
    assert broken["caption"] is None and "Truncated File Read" in broken["error"]
    # attention figures for the sample, and a W&B run holding the table and the file
    assert len(list((work / "caption" / "shards" / "00000" / "attention").glob("*.png"))) == 2  # shard 0 has 2
    [run] = (work / "wandb" / "wandb").glob("offline-run-*")
    records = leet_records(run)
    assert any(k.startswith("captions") for r in records if r["type"] == "history" for k in r["history"]["item"])
    artifacts = [r["artifact"] for r in records if r["type"] == "artifact"]
    table = next(a for a in artifacts if any(e["path"].startswith("captions") and e["path"].endswith(".table.json")
                                              for e in a["manifest"]["contents"]))
    assert len([e for e in table["manifest"]["contents"] if e["path"].endswith(".png")]) == 2  # the figures
    assert "captions" in logged_artifacts(records)  # the merged file


def test_a_list_of_uris_mixes_sources_and_reports_each_failure(promoted_model, scenes, cli_captions, tmp_path):
    images = scenes["images"]
    with HttpMirror(scenes["root"]) as mirror:
        listing = tmp_path / "list" / "images.jsonl"
        listing.parent.mkdir()
        shutil.copy(images[1], listing.parent / "local.jpg")
        listing.write_text("\n".join([
            json.dumps({"uri": f"{mirror.url}/images/{images[0].name}"}),
            json.dumps("local.jpg"),  # relative to the list
            "",
            json.dumps({"uri": f"{mirror.url}/images/missing.jpg"}),
            json.dumps({"uri": str(tmp_path / "nowhere.jpg")}),
        ]) + "\n")
        work = tmp_path / "work"
        proc = captioning_cli("run", "--pipeline", "caption", "--workdir", str(work),
                              "--set", f"batch.source={listing}", "--set", "batch.model=production",
                              "--set", f"promote.registry={promoted_model['registry']}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = read_lines(work / "caption" / "captions" / "captions.jsonl")
    assert len(lines) == 4
    assert lines[0]["caption"] == cli_captions[str(images[0])]
    assert lines[1]["uri"] == str(listing.parent / "local.jpg") and lines[1]["caption"] == cli_captions[str(images[1])]
    assert "HTTP 404" in lines[2]["error"] and "file not found" in lines[3]["error"]


def test_bad_settings_fail_before_any_captioning(promoted_model, tmp_path):
    bad_list = tmp_path / "bad.jsonl"
    bad_list.write_text('{"uri": "a.jpg"}\nnot json\n')
    cases = [
        ([f"batch.source={tmp_path / 'none'}"], "batch.source=", "no such folder"),
        ([f"batch.source={bad_list}"], "bad.jsonl: line 2 is not", ""),
        ([f"batch.source={tmp_path}", "batch.model=staging"], "batch.model=staging: no model holds the alias", ""),
    ]
    for overrides, message, more in cases:
        work = tmp_path / f"work{len(message)}"
        args = sum((["--set", o] for o in [*overrides, f"promote.registry={promoted_model['registry']}"]), [])
        proc = captioning_cli("run", "--pipeline", "caption", "--workdir", str(work), *args)
        assert proc.returncode == 1, proc.stderr
        summary = json.loads((work / "summary.json").read_text())
        errors = " ".join(s.get("error", "") for s in summary["steps"].values())
        assert message in errors and more in errors, errors


def test_the_model_and_the_images_can_come_from_a_bucket(promoted_model, scenes, gcs_emulator, tmp_path):
    """Vertex AI hands a model over as a gs:// folder; images under a gs:// prefix."""
    from captioning.gcs import storage_client
    from captioning.model_source import resolve_model

    bucket = storage_client().create_bucket("captions")
    for path in promoted_model["model"].rglob("*"):
        if path.is_file():
            bucket.blob(f"models/prod/{path.relative_to(promoted_model['model'])}").upload_from_filename(str(path))
    for path in scenes["images"][:3]:
        bucket.blob(f"in/{path.name}").upload_from_filename(str(path))
    resolved = resolve_model("gs://captions/models/prod", cache=tmp_path / "cache")
    assert resolved.version == f"sha256:{__import__('captioning.model_source').model_source.model_digest(promoted_model['model'])[:12]}"

    from captioning.config import load_config
    from captioning.runners.inprocess import run_caption_pipeline

    cfg = load_config(overrides=["batch.source=gs://captions/in/", "batch.model=gs://captions/models/prod",
                                 "wandb.mode=disabled"])
    summary = run_caption_pipeline(cfg, tmp_path / "work")
    assert summary["status"] == "ok", summary
    lines = read_lines(tmp_path / "work" / "caption" / "captions" / "captions.jsonl")
    assert [line["uri"] for line in lines] == [f"gs://captions/in/{p.name}" for p in scenes["images"][:3]]
    assert all(line["caption"] for line in lines)


@pytest.mark.parametrize("target", ["kubeflow", "vertex"])
def test_the_caption_pipeline_compiles_with_parallel_shards_on_the_gpu(target, tmp_path):
    out = tmp_path / "caption.yaml"
    proc = captioning_cli("compile", "--pipeline", "caption", "--target", target, "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    spec = yaml.safe_load_all(out.read_text())
    docs = list(spec)
    ir = docs[0]
    assert f"[compiled for {target}]" in ir["pipelineInfo"]["description"]
    assert set(ir["root"]["inputDefinitions"]["parameters"]) >= {"source", "model", "registry", "shard_images"}
    loop = next(t for t in ir["root"]["dag"]["tasks"].values() if "iteratorPolicy" in t)
    assert loop["iteratorPolicy"]["parallelismLimit"] == 8
    tasks = {**ir["root"]["dag"]["tasks"], **next(c for n, c in ir["components"].items()
                                                   if n.startswith("comp-for-loop"))["dag"]["tasks"]}
    for name in ("resolve-model", "plan-captions"):  # an alias moves: never answered from the cache
        assert not tasks[name].get("cachingOptions", {}).get("enableCache")
    for name in ("resolve-model", "plan-captions", "caption-shard", "merge-captions"):  # all idempotent: retried
        assert tasks[name]["retryPolicy"]["maxRetryCount"] == 3
    assert tasks["caption-shard"]["cachingOptions"]["enableCache"]
    executors = ir["deploymentSpec"]["executors"]
    shard = executors["exec-caption-shard"]["container"]
    assert shard["resources"]["accelerator"]["resourceCount"] == "1"
    assert "accelerator" not in executors["exec-merge-captions"]["container"].get("resources", {})
    text = out.read_text()
    if target == "vertex":  # the key is read from Secret Manager in the pod: no trace of it in the package
        assert "WANDB_API_KEY" not in text and "secretAsEnv" not in text
    if target == "kubeflow":
        platform = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
        assert int(platform["exec-caption-shard"]["securityContext"]["runAsUser"]) == 1000
        assert platform["exec-caption-shard"]["tolerations"][0]["key"] == "nvidia.com/gpu"
        assert platform["exec-merge-captions"]["secretAsEnv"][0]["secretName"] == "wandb"
        # the key's only trace: the env name each task maps the Secret to, never a value
        assert text.count("WANDB_API_KEY") == sum(len(e.get("secretAsEnv", [])) for e in platform.values())
