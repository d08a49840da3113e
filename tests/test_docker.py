"""The component image and the pipeline in containers (kfp.local DockerRunner).

Needs a Docker engine and the image built by `.ci/run` (or by hand:
`captioning image build --base-image debian-local:bookworm --variant cpu`).
In CI a missing engine or image fails these tests; elsewhere they skip.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest

from captioning import DEFAULT_IMAGE, __version__
from conftest import captioning_cli
from helpers.wandb_offline import leet_records

IMAGE = os.environ.get("CAPTIONING_TEST_IMAGE", DEFAULT_IMAGE)
HOW = ("start dockerd, then run docker/local-debian-base.sh and "
       "`captioning image build --base-image debian-local:bookworm --variant cpu` (what .ci/run does)")

pytestmark = pytest.mark.docker


@pytest.fixture(scope="module")
def image():
    try:
        import docker

        client = docker.from_env()
        client.ping()
        return client.images.get(IMAGE)
    except Exception as exc:
        message = f"needs a Docker engine and the image {IMAGE} ({type(exc).__name__}: {exc}); {HOW}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def docker_run(*cmd):
    return subprocess.run(["docker", "run", "--rm", IMAGE, *cmd], capture_output=True, text=True, timeout=300)


def test_image_has_the_project_java_and_a_non_root_user(image):
    assert image.attrs["Config"]["User"] == "1000:1000"
    assert image.attrs["Config"]["WorkingDir"] == "/app"
    assert not any("WANDB_API_KEY" in e for e in image.attrs["Config"]["Env"])
    proc = docker_run("python", "-c", "import captioning, tensorflow, kfp, components.train; "
                      "print(tensorflow.__version__, captioning.__version__)")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["2.21.0", __version__]
    assert docker_run("java", "-version").returncode == 0
    ini = docker_run("cat", "/app/kfp_config.ini").stdout
    assert "train = components/train.py" in ini


def test_demo_pipeline_runs_end_to_end_in_containers(image, tmp_path):
    """The demo, as `captioning run` in-process, but each step in its own container: its data in full (the
    awkward files included), a short training (4 cross-entropy epochs, no self-critical ones), since the
    containers' plumbing is under test here and the full recipe's quality in test_demo.py."""
    work = tmp_path / "work"
    proc = captioning_cli("run", "--runner", "docker", "--image", IMAGE, "--workdir", str(work),
                          "--set", "train.epochs=4", "--set", "train.scst_epochs=0", timeout=1800)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads((work / "summary.json").read_text())
    assert summary["runner"] == "docker"
    assert {n: s["status"] for n, s in summary["steps"].items()} == dict.fromkeys(summary["steps"], "ok")
    assert summary["steps"]["process_data"]["metrics"]["skipped_files"] == 4
    steps = summary["steps"]
    raw = steps["log_raw_data"]["artifacts"]["outputs"]["raw_data"]  # what each container moved
    assert 0 < raw["files"] <= 10 and steps["process_data"]["artifacts"]["inputs"]["raw_data"] == raw
    produced = steps["process_data"]["artifacts"]["outputs"]
    assert steps["train"]["artifacts"]["inputs"] == {"train_data": produced["train_data"]}
    assert steps["evaluate"]["artifacts"]["inputs"] == {"model": steps["train"]["artifacts"]["outputs"]["model"],
                                                        "test_data": produced["test_data"]}
    assert summary["steps"]["promote"]["artifacts"]["inputs"]["model"] == \
        summary["steps"]["train"]["artifacts"]["outputs"]["model"]
    metrics = summary["steps"]["evaluate"]["metrics"]
    assert metrics["CIDEr"] >= 1.5 * metrics["baseline_CIDEr"]  # it looks at the images after 4 epochs (~2x)
    assert summary["steps"]["promote"]["metrics"]["promoted"] is True
    run_dir = Path(summary["run_dir"])
    model = run_dir / "train" / "model"
    assert (model / "captioner.keras").is_file()
    # Every step ran as the image's user, as on a cluster (not as the caller, root in CI).
    for step in steps:
        outputs = [p for p in (run_dir / step.replace("_", "-")).iterdir() if p.is_dir()]
        assert outputs and {p.stat().st_uid for p in outputs} == {1000}, step
    # and what they wrote is handed back: readable, and removable by whoever ran it
    assert all(p.stat().st_mode & 0o666 == 0o666 for p in model.iterdir())
    assert model.stat().st_mode & 0o777 == 0o777
    assert (run_dir / "evaluate" / "report").read_text().startswith("<!doctype html>")
    # one W&B run per container, kept on the host in the step's wandb_run artifact
    offline_runs = list(run_dir.glob("*/wandb_run/wandb/wandb/offline-run-*"))
    assert sorted(p.parts[-5] for p in offline_runs) == sorted(n.replace("_", "-") for n in steps)
    assert all(s["artifacts"]["outputs"]["wandb_run"]["files"] > 0 for s in steps.values())
    groups = {next(r["run"]["run_group"] for r in leet_records(p) if r["type"] == "run") for p in offline_runs}
    assert len(groups) == 1 and groups.pop().startswith("run-")  # one group for the pipeline run

    # The model trained in a container captions on the host.
    from captioning.data.demo import draw_scene
    import random

    picture = tmp_path / "p.png"
    draw_scene({"objects": [("green", "square")], "side": "left"}, random.Random(2)).save(picture)
    proc = captioning_cli("caption", "--model", str(model), str(picture))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"{picture}\t")


def test_missing_image_is_a_clear_error(image, tmp_path):
    proc = captioning_cli("run", "--runner", "docker", "--image", "captioning:no-such-tag",
                          "--workdir", str(tmp_path))
    assert proc.returncode == 2
    assert "captioning:no-such-tag: not in the local Docker engine" in proc.stderr


def test_the_container_user_is_the_images_unless_told_otherwise():
    from captioning.errors import CaptioningError
    from captioning.runners.kfp_local import container_user

    assert container_user("1000:1000", "image") == "1000:1000"
    assert container_user("", "image") == "0"  # an image without USER runs as root, as a pod would
    assert container_user("1000:1000", "host") == f"{os.getuid()}:{os.getgid()}"
    assert container_user("1000:1000", "2000:3000") == "2000:3000"
    with pytest.raises(CaptioningError, match="--user 'nobody'"):
        container_user("1000:1000", "nobody")
