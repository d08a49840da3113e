import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

sys.path.insert(0, str(Path(__file__).parent))

from helpers.http_mirror import HttpMirror  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared(tmp_path_factory):
    """Made once per test session, whatever the number of xdist workers: ``shared(name, make)`` returns the
    folder ``make(folder)`` filled, the first worker to ask making it under a lock while the others wait.
    The name is the cache key: put every setting that changes the content in it."""
    from captioning.io import file_lock

    root = tmp_path_factory.getbasetemp()
    root = (root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root) / "shared"  # all workers' parent

    def get(name: str, make) -> Path:
        folder = root / name
        with file_lock(folder):
            if not (folder / ".complete").exists():
                shutil.rmtree(folder, ignore_errors=True)
                folder.mkdir(parents=True)
                make(folder)
                (folder / ".complete").touch()
        return folder

    return get


@pytest.fixture(scope="session")
def small_mirror(shared) -> dict:
    """A small COCO-layout mirror with every awkward and hostile input, written once per session."""
    from captioning.data.demo import write_coco_mirror

    def make(root):
        info = write_coco_mirror(root / "mirror", train_images=40, val_images=30, seed=3, awkward=True,
                                 hostile=True, karpathy_split=True)
        (root / "info.json").write_text(json.dumps(info, default=str))

    return json.loads((shared("small-mirror", make) / "info.json").read_text())


@pytest.fixture
def http_mirror(small_mirror):
    with HttpMirror(Path(small_mirror["root"])) as server:
        yield server


def user_env(**extra) -> dict:
    """This process's environment as a user's shell has it: without WANDB_SERVICE, which an in-process W&B run
    of an earlier test sets, and which would make the child write its runs through this process's W&B service
    (on another volume's terms: a full-disk test then saw another error than a user would)."""
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    return {**env, **extra}


def captioning_cli(*args, cwd=None, env=None, timeout=900):
    """Run the installed console command, as a user would."""
    exe = shutil.which("captioning", path=str(Path(sys.executable).parent)) or "captioning"
    full_env = user_env(**(env or {}))
    return subprocess.run([exe, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def gcs_emulator(monkeypatch):
    """A GCS emulator on loopback; google-cloud-storage clients find it through STORAGE_EMULATOR_HOST."""
    import socket

    from gcp_storage_emulator.server import create_server

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = create_server("127.0.0.1", port, in_memory=True)
    server.start()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
    yield
    server.stop()


@pytest.fixture
def s3_server():
    """An S3 server on loopback (moto's, as KFP's SeaweedFS or MinIO store would answer): its URL. It takes any
    key pair; boto3 still needs one to sign with."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def small_volume():
    """Mount a tmpfs of a given size (a real file system that fills up): ``small_volume(path, bytes)``.
    Needs root, as CI has; elsewhere the test is skipped, saying why."""
    mounted = []

    def mount(path: Path, size: int) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs to fill up (needs root): {proc.stderr.strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], check=False)


# A small model, fast to train: what the step, serving, batch-captioning and deploy tests share.
TINY_MODEL = ["data.val_images=8", "data.test_images=8", "features.shard_images=32", "train.embedding_dim=16",
              "train.units=32", "train.batch_size=32", "train.warmup_steps=5", "evaluate.attention_samples=2",
              "train.epochs=3", "train.scst_epochs=0"]


@pytest.fixture(scope="session")
def promoted_model(small_mirror, shared) -> dict:
    """The whole pipeline run once per session (shared by the xdist workers), in-process on the small mirror,
    with W&B offline: its registry holds ``production``. Every test file that needs a trained model or a
    finished run shares it; a test that changes what is in ``work`` copies it first, or adds only what no
    other test counts."""
    from captioning.config import load_config
    from captioning.runners.inprocess import run_pipeline

    cfg = load_config(overrides=[f"data.base_url={small_mirror['root']}", *TINY_MODEL])

    def make(root):
        summary = run_pipeline(cfg, root / "work")
        assert summary["status"] == "ok", summary
        (root / "summary.json").write_text(json.dumps(summary))

    import hashlib

    root = shared("promoted-model-" + hashlib.sha256("\n".join(TINY_MODEL).encode()).hexdigest()[:16], make)
    work, summary = root / "work", json.loads((root / "summary.json").read_text())
    registry = work / "registry"
    version = json.loads((registry / "captioning-model" / "aliases.json").read_text())["production"]
    return {"work": work, "registry": registry, "version": version, "summary": summary, "cfg": cfg,
            "model": registry / "captioning-model" / "versions" / version, "mirror": Path(small_mirror["root"])}

# Fixtures that train a model or run a whole pipeline: a test that uses one (directly or through another
# fixture) belongs to the slow tier, which `make check` leaves out.
TRAINING_FIXTURES = {"promoted_model"}


# The longest files first: xdist (--dist loadfile) hands files out in this order, so the demo's minutes run
# beside the rest rather than after it.
LONGEST_FIRST = ("test_demo.py", "test_docker.py", "test_pipeline_steps.py", "test_batch_captioning.py",
                 "test_scale.py", "test_cli.py")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if TRAINING_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    rank = {name: number for number, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
