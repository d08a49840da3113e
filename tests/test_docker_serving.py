"""The promoted model used from the project image: the server as the image's user, the batch pipeline in
containers (kfp.local DockerRunner, ParallelFor and the collected shards)."""

import base64
import json
import shutil
import subprocess
import time

import pytest
import requests

from conftest import captioning_cli
from test_docker import IMAGE, image  # noqa: F401, F811  the image fixture: fails in CI when missing
from test_serving import free_port

pytestmark = [pytest.mark.docker, pytest.mark.slow]


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    from captioning.data.demo import synthetic_jpegs

    return synthetic_jpegs(tmp_path_factory.mktemp("scenes"), 3, seed=21)


def test_the_server_runs_in_the_image_as_its_user_and_answers_both_protocols(image, promoted_model, scenes):  # noqa: F811
    """As KServe runs it: the model folder mounted read-only at /mnt/models, the image's own user."""
    expected = captioning_cli("caption", "--model", str(promoted_model["model"]), *map(str, scenes))
    assert expected.returncode == 0, expected.stderr
    want = [line.split("\t")[1] for line in expected.stdout.strip().splitlines()]
    port = free_port()
    name = f"captioning-serve-{port}"
    subprocess.run(["docker", "run", "-d", "--rm", "--name", name, "-p", f"127.0.0.1:{port}:8080",
                    "-v", f"{promoted_model['model']}:/mnt/models:ro", IMAGE,
                    "captioning", "serve", "--model", "/mnt/models", "--name", "captioner"],
                   check=True, capture_output=True, timeout=120)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{url}/v2/health/ready", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(1)
        else:
            logs = subprocess.run(["docker", "logs", name], capture_output=True, text=True).stderr
            raise AssertionError(f"the server in the image never became ready: {logs[-3000:]}")
        user = subprocess.run(["docker", "exec", name, "id", "-u"], capture_output=True, text=True).stdout.strip()
        assert user == "1000"
        images = [base64.b64encode(p.read_bytes()).decode() for p in scenes]
        v1 = requests.post(f"{url}/v1/models/captioner:predict", json={"instances": [{"b64": b} for b in images]})
        assert [p["caption"] for p in v1.json()["predictions"]] == want
        v2 = requests.post(f"{url}/v2/models/captioner/infer",
                           json={"inputs": [{"name": "image", "datatype": "BYTES", "shape": [3], "data": images}]})
        assert v2.json()["outputs"][0]["data"] == want
        assert v1.json()["predictions"][0]["model_version"] == v2.json()["model_version"] != ""
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, timeout=60)


def test_the_batch_pipeline_runs_in_containers_with_parallel_shards(image, promoted_model, scenes, tmp_path):  # noqa: F811, E501
    work = tmp_path / "work"
    root = work / "kfp-root"
    shutil.copytree(promoted_model["registry"], root / "registry")
    for path in scenes:
        (root / "images").mkdir(parents=True, exist_ok=True)
        shutil.copy(path, root / "images" / path.name)
    proc = captioning_cli("run", "--pipeline", "caption", "--runner", "docker", "--image", IMAGE,
                          "--workdir", str(work), "--set", f"batch.source={root / 'images'}",
                          "--set", "batch.shard_images=2", "--set", "wandb.mode=offline", timeout=1800)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads((work / "summary.json").read_text())
    assert summary["steps"]["caption_shards"]["metrics"]["shards"] == 2
    assert summary["steps"]["merge_captions"]["metrics"]["captioned"] == 3
    assert summary["steps"]["merge_captions"]["artifacts"]["inputs"]["plan"]["files"] == 3  # plan.json, 2 shards
    [merged] = (work / "kfp-root").glob("captioning-batch-*/merge-captions/captions/captions.jsonl")
    # the offline W&B run of the merge outlives its container, as the training steps' do
    assert len(list(merged.parents[1].glob("wandb_run/wandb/wandb/offline-run-*"))) == 1
    lines = [json.loads(line) for line in merged.read_text().splitlines()]
    assert [line["uri"] for line in lines] == sorted(str(root / "images" / p.name) for p in scenes)
    assert all(line["model_version"] == promoted_model["version"] and line["caption"] for line in lines)
