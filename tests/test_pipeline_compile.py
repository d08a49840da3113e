"""The compiled KFP IR: executors, typed artifacts, accelerators, the gate, secrets, caching."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml


IMAGE = "registry.example/captioning:1.2.3"
SECRET_VALUE = "wandb-key-that-must-not-leak-0123456789"
STEP_NAMES = ("log-raw-data", "process-data", "train", "evaluate", "promote")


def compile_in_subprocess(tmp_path, *args):
    out = tmp_path / "pipeline.yaml"
    env = dict(os.environ, WANDB_API_KEY=SECRET_VALUE)
    code = ("import sys, typer; from captioning.cli import app; "
            "typer.main.get_command(app).main(['compile', *sys.argv[1:]], standalone_mode=False); "
            "print('HEAVY' if {'tensorflow', 'keras', 'wandb'} & set(sys.modules) else 'LIGHT')")
    proc = subprocess.run([sys.executable, "-c", code, "--output", str(out), "--image", IMAGE, *args],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    docs = list(yaml.safe_load_all(text))
    return text, docs, proc.stdout


@pytest.fixture(scope="module")
def kubeflow(tmp_path_factory):
    return compile_in_subprocess(tmp_path_factory.mktemp("kf"))


def test_five_executors_on_the_project_image_without_code_or_pip(kubeflow):
    text, docs, _ = kubeflow
    executors = docs[0]["deploymentSpec"]["executors"]
    # the five steps, and on Kubeflow the check that no other run holds the checkpoint volume
    assert sorted(executors) == sorted(f"exec-{n}" for n in (*STEP_NAMES, "check-volumes"))
    for spec in executors.values():
        container = spec["container"]
        assert container["image"] == IMAGE
        assert container["command"][:3] == ["python3", "-m", "kfp.dsl.executor_main"]
    assert "pip install" not in text and "def log_raw_data" not in text  # code lives in the image


def test_compiling_imports_no_heavy_library(kubeflow):
    assert kubeflow[2].strip().endswith("LIGHT")


def test_typed_artifacts_flow_between_steps(kubeflow):
    comps = kubeflow[1][0]["components"]

    def artifacts(comp, io):
        section = comps[f"comp-{comp}"].get(f"{io}Definitions", {}).get("artifacts", {})
        return {name: spec["artifactType"]["schemaTitle"] for name, spec in section.items()}

    run = {"wandb_run": "system.Artifact"}  # every step's offline W&B run, kept for `wandb sync`
    assert artifacts("log-raw-data", "output") == {"raw_data": "system.Dataset", **run}
    assert artifacts("process-data", "input") == {"raw_data": "system.Dataset"}
    assert artifacts("process-data", "output") == {"train_data": "system.Dataset", "test_data": "system.Dataset",
                                                   **run}
    assert artifacts("train", "input") == {"train_data": "system.Dataset"}  # not the test split
    assert artifacts("train", "output") == {"model": "system.Model", **run}
    # evaluate reads the test split and the model: nothing of train/val, nothing raw
    assert artifacts("evaluate", "input") == {"model": "system.Model", "test_data": "system.Dataset"}
    assert artifacts("evaluate", "output") == {"metrics": "system.Metrics", "predictions": "system.Dataset",
                                               "report": "system.HTML", **run}
    assert artifacts("promote", "input") == {"model": "system.Model", "metrics": "system.Metrics"}
    assert artifacts("promote", "output") == run
    outputs = comps["comp-process-data"]["outputDefinitions"]["parameters"]
    assert outputs["wandb_ref"]["parameterType"] == "STRING"  # W&B references travel as strings
    assert comps["comp-evaluate"]["outputDefinitions"]["parameters"]["Output"]["parameterType"] == "NUMBER_DOUBLE"


def test_gpu_steps_request_accelerators_and_others_do_not(kubeflow):
    executors = kubeflow[1][0]["deploymentSpec"]["executors"]
    for name in STEP_NAMES:
        resources = executors[f"exec-{name}"]["container"]["resources"]
        if name in ("process-data", "train", "evaluate"):
            assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu"
            assert resources["accelerator"]["resourceCount"] == "1"
        else:
            assert "accelerator" not in resources
        assert resources["resourceCpuRequest"] and resources["resourceMemoryLimit"]


def test_promote_is_gated_on_the_score_and_not_cached(kubeflow):
    root = kubeflow[1][0]["root"]["dag"]["tasks"]
    gate = next(t for t in root.values() if "triggerPolicy" in t)
    assert "evaluate-Output" in gate["triggerPolicy"]["condition"] and "min_score" in gate["triggerPolicy"]["condition"]
    inner = kubeflow[1][0]["components"][gate["componentRef"]["name"]]["dag"]["tasks"]
    assert list(inner) == ["promote"]
    assert inner["promote"]["cachingOptions"] == {}
    # Retried by nobody: an explicit policy without a count compiles to Argo's limit 0, which the controller's
    # templateDefaults (KFP 2.17: limit 2) cannot raise; a task without a policy would take that default.
    assert "retryPolicy" in inner["promote"] and not inner["promote"]["retryPolicy"].get("maxRetryCount")
    for name in ("log-raw-data", "process-data", "train", "evaluate"):
        assert root[name]["cachingOptions"]["enableCache"] is True
        assert root[name]["retryPolicy"]["maxRetryCount"] == 3


def test_the_wandb_key_comes_from_a_secret_and_is_never_written(kubeflow):
    text, docs, _ = kubeflow
    assert SECRET_VALUE not in text
    platform = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for name in STEP_NAMES:
        (secret,) = platform[f"exec-{name}"]["secretAsEnv"]
        assert secret["secretName"] == "wandb"
        assert secret["keyToEnv"] == [{"envVar": "WANDB_API_KEY", "secretKey": "api-key"}]
    for spec in docs[0]["deploymentSpec"]["executors"].values():
        assert "WANDB_API_KEY" not in str(spec["container"].get("env", ""))


def test_vertex_target_uses_vertex_accelerator_names_and_no_k8s_secrets(tmp_path):
    text, docs, _ = compile_in_subprocess(tmp_path, "--target", "vertex", "--accelerator-type", "NVIDIA_TESLA_T4",
                                          "--accelerator-count", "2")
    assert len(docs) == 1 and SECRET_VALUE not in text
    resources = docs[0]["deploymentSpec"]["executors"]["exec-train"]["container"]["resources"]
    assert resources["accelerator"]["resourceType"] == "NVIDIA_TESLA_T4"
    assert resources["accelerator"]["resourceCount"] == "2"


def test_pipeline_parameters_default_to_the_preset(kubeflow, tmp_path):
    params = kubeflow[1][0]["root"]["inputDefinitions"]["parameters"]
    assert params["base_url"]["defaultValue"] == "http://images.cocodataset.org"
    assert params["epochs"]["parameterType"] == "NUMBER_INTEGER" and params["epochs"]["defaultValue"] == 20
    _, docs, _ = compile_in_subprocess(tmp_path, "--preset", "demo")
    demo = docs[0]["root"]["inputDefinitions"]["parameters"]
    assert demo["base_url"]["defaultValue"] == "demo" and demo["weights"]["defaultValue"] == "none"


def test_kubeflow_gpu_steps_tolerate_the_gpu_taint_and_raw_data_keeps_a_cache_volume(kubeflow, tmp_path):
    from pipeline import GPU_TOLERATION, RAW_CACHE_MOUNT, RAW_CACHE_PVC

    _, docs, _ = kubeflow
    platform = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for name in STEP_NAMES:
        expected = [GPU_TOLERATION] if name in ("process-data", "train", "evaluate") else None
        assert platform[f"exec-{name}"].get("tolerations") == expected, name
        assert "nodeSelector" not in platform[f"exec-{name}"]
    (mount,) = platform["exec-log-raw-data"]["pvcMount"]
    assert mount["constant"] == RAW_CACHE_PVC and mount["mountPath"] == RAW_CACHE_MOUNT
    env = docs[0]["deploymentSpec"]["executors"]["exec-log-raw-data"]["container"]["env"]
    assert {"name": "CAPTIONING_DOWNLOAD_CACHE", "value": f"{RAW_CACHE_MOUNT}/coco2014"} in env
    # raw_data only references the cached archives: process_data reads them on the same volume, at the same path
    (read,) = platform["exec-process-data"]["pvcMount"]
    assert (read["constant"], read["mountPath"]) == (mount["constant"], mount["mountPath"])
    assert "pvcMount" not in platform["exec-train"] or platform["exec-train"]["pvcMount"][0]["constant"] != RAW_CACHE_PVC

    _, docs, _ = compile_in_subprocess(tmp_path, "--raw-cache-pvc", "", "--gpu-node-selector",
                                       "cloud.google.com/gke-accelerator=nvidia-l4")
    platform = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert "pvcMount" not in platform["exec-log-raw-data"] and "pvcMount" not in platform["exec-process-data"]
    assert platform["exec-train"]["nodeSelector"]["labels"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}


def test_on_vertex_a_bucket_keeps_the_archives_across_runs(tmp_path, monkeypatch):
    """Issue 25, point 1: no volume outlives a Vertex AI run; --raw-cache-bucket makes log_raw_data keep the
    archives in a bucket (raw_data then references them), through the env the component reads."""
    from conftest import captioning_cli

    from components.factory import DOWNLOAD_CACHE_ENV

    _, docs, _ = compile_in_subprocess(tmp_path, "--target", "vertex", "--raw-cache-bucket", "gs://my-cache/coco2014")
    executors = docs[0]["deploymentSpec"]["executors"]
    assert {"name": DOWNLOAD_CACHE_ENV, "value": "gs://my-cache/coco2014"} in executors["exec-log-raw-data"]["container"]["env"]
    assert not any(DOWNLOAD_CACHE_ENV in str(e["container"].get("env")) for n, e in executors.items()
                   if n != "exec-log-raw-data")
    without = captioning_cli("compile", "--target", "vertex", "--output", str(tmp_path / "v.yaml"), cwd=tmp_path)
    assert without.returncode == 0 and "no --raw-cache-bucket: a log_raw_data that runs" in without.stderr
    demo = captioning_cli("compile", "--target", "vertex", "--preset", "demo", "--output", str(tmp_path / "d.yaml"),
                          cwd=tmp_path)
    assert demo.returncode == 0 and "raw-cache-bucket" not in demo.stderr
    for bad in (["--raw-cache-bucket", "gs://my-cache/coco"],  # Kubeflow keeps them on its PVC
                ["--target", "vertex", "--raw-cache-bucket", "/var/cache/coco"]):
        proc = captioning_cli("compile", *bad, "--output", str(tmp_path / "x.yaml"), cwd=tmp_path)
        assert proc.returncode == 2 and "--raw-cache-bucket" in proc.stderr, proc.stderr


def test_the_description_names_the_target_and_parameters_include_wandb_mode_and_secret(kubeflow, tmp_path):
    _, docs, _ = kubeflow
    assert docs[0]["pipelineInfo"]["description"].endswith("[compiled for kubeflow]")
    params = docs[0]["root"]["inputDefinitions"]["parameters"]
    assert params["wandb_mode"]["defaultValue"] == "online" and params["wandb_secret"]["defaultValue"] == ""
    _, docs, _ = compile_in_subprocess(tmp_path, "--target", "vertex")
    assert docs[0]["pipelineInfo"]["description"].endswith("[compiled for vertex]")


@pytest.mark.parametrize("args, message", [
    (("--target", "vertex", "--accelerator-type", "nvidia.com/gpu"), "NVIDIA_L4"),
    (("--accelerator-type", "NVIDIA_L4"), "nvidia.com/gpu"),
    (("--gpu-node-selector", "gpu"), "KEY=VALUE"),
    (("--target", "vertex", "--spot"), "Kubeflow only"),
    (("--gpu-memory", "22 GB"), "memory quantity"),
    (("--gpu-memory", "1.5Gi"), "memory quantity"),  # kfp itself would refuse it with a traceback
    (("--memory", "500K"), "memory quantity"),
    (("--gpu-cpu", "six"), "CPU quantity"),
    (("--retry-window", "forever"), "duration"),
    (("--image", "reg/captioning@sha256:abc"), "64 hex digits"),
])
def test_accelerator_names_are_checked_per_target(args, message):
    from captioning.cli import app
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, ["compile", "--output", "/dev/null", *args])
    assert result.exit_code == 2 and message in result.output


# ------------------------------------------------ what a real cluster does with the YAML

CACHED = ("log-raw-data", "process-data", "train", "evaluate")


def run_scoped_placeholders(value) -> set[str]:
    """The run- or task-scoped KFP placeholders anywhere in ``value`` (a piece of the IR)."""
    from kfp import dsl

    # Not the executor's input and output placeholders: the key holds the command and arguments unresolved.
    scoped = {getattr(dsl, name) for name in dir(dsl) if name.endswith("_PLACEHOLDER")
              and any(word in name for word in ("JOB", "TASK_ID", "TASK_NAME"))}
    text = yaml.safe_dump(value)
    return {p for p in scoped if p in text}


def cache_key_parts(docs, task: str) -> dict:
    """What KFP's cache key is made of for one task (backend/src/v2/cacheutils/cache.go): its inputs (as the
    DAG wires them), its component's interface, and its executor's image, command and arguments."""
    ir = docs[0]
    tasks = {**ir["root"]["dag"]["tasks"]}
    for comp in ir["components"].values():  # tasks inside the gate's sub-DAG
        tasks.update(comp.get("dag", {}).get("tasks", {}))
    spec = tasks[task]
    component = ir["components"][spec["componentRef"]["name"]]
    container = ir["deploymentSpec"]["executors"][component["executorLabel"]]["container"]
    return {"inputs": spec.get("inputs", {}), "interface": [component.get("inputDefinitions"),
            component.get("outputDefinitions")], "image": container["image"], "command": container["command"],
            "args": container["args"]}


def test_no_cached_task_has_a_run_scoped_cache_key(kubeflow, tmp_path):
    """A placeholder such as {{$.pipeline_job_name}} in a cached task's inputs, command or arguments makes
    every run recompute it (hours of GPU at COCO size)."""
    from kfp import compiler, dsl

    _, docs, _ = kubeflow
    for task in CACHED:
        assert run_scoped_placeholders(cache_key_parts(docs, task)) == set(), task

    @dsl.component(base_image="python:3.11")
    def echo(text: str) -> str:
        return text

    @dsl.pipeline(name="run-scoped")
    def run_scoped():
        echo(text=dsl.PIPELINE_JOB_NAME_PLACEHOLDER)

    compiler.Compiler().compile(run_scoped, str(tmp_path / "bad.yaml"))
    bad = list(yaml.safe_load_all((tmp_path / "bad.yaml").read_text()))
    assert run_scoped_placeholders(cache_key_parts(bad, "echo")) == {dsl.PIPELINE_JOB_NAME_PLACEHOLDER}


def test_a_second_run_with_the_same_inputs_is_answered_from_the_cache_up_to_promote(kubeflow):
    """Replayed as KFP's backend keys tasks (helpers/kfp_cache.py, a stand-in: no backend runs here): no cached
    task is fed by an uncached one, so all of them hit; promote, uncached, runs again."""
    from helpers.kfp_cache import CacheReplay

    _, docs, _ = kubeflow
    ir = docs[0]
    params = {name: spec.get("defaultValue") for name, spec in ir["root"]["inputDefinitions"]["parameters"].items()}
    replay = CacheReplay(ir)
    assert all(what == "ran" for _, what in replay.replay(params, {}, {}))
    second = dict(replay.replay(params, {}, {}))
    assert second == {**{task: "hit" for task in CACHED}, "promote": "ran", "check-volumes": "ran"}
    changed = dict(replay.replay({**params, "epochs": 99}, {}, {}))  # a training setting: train and after it
    assert changed == {"log-raw-data": "hit", "process-data": "hit", "train": "ran", "evaluate": "ran",
                       "promote": "ran", "check-volumes": "ran"}


def test_wandb_runs_are_grouped_by_the_run_id_label_outside_the_cache_key(kubeflow, monkeypatch):
    from pipeline import RUN_ID_LABEL

    from captioning.tracking import KFP_RUN_ID_ENV, VERTEX_RUN_LABELS_ENV, StepTracker, pipeline_run_group

    _, docs, _ = kubeflow
    platform = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for name in STEP_NAMES:
        assert platform[f"exec-{name}"]["fieldPathAsEnv"] == [{"fieldPath": RUN_ID_LABEL, "name": KFP_RUN_ID_ENV}]
    assert RUN_ID_LABEL == "metadata.labels['pipeline/runid']"

    for env in ("CAPTIONING_RUN_GROUP", KFP_RUN_ID_ENV, VERTEX_RUN_LABELS_ENV):
        monkeypatch.delenv(env, raising=False)
    assert pipeline_run_group() == ""
    monkeypatch.setenv(VERTEX_RUN_LABELS_ENV, '{"vertex-ai-pipelines-run-billing-id": "4711", "team": "ml"}')
    assert pipeline_run_group() == "vertex-4711"
    monkeypatch.setenv(KFP_RUN_ID_ENV, "0b5e-run")
    assert pipeline_run_group() == "kfp-0b5e-run"
    monkeypatch.delenv(KFP_RUN_ID_ENV)
    monkeypatch.setenv(VERTEX_RUN_LABELS_ENV, "not json")
    assert pipeline_run_group() == ""
    monkeypatch.setenv(KFP_RUN_ID_ENV, "0b5e-run")
    from captioning.config import load_config
    assert StepTracker(load_config(preset="demo"), "train", "/tmp").group == "kfp-0b5e-run"


def test_an_image_digest_compiles_verbatim_into_every_executor(tmp_path):
    pinned = "registry.example/ml/captioning@sha256:" + "0123456789abcdef" * 4
    out = tmp_path / "p.yaml"
    proc = subprocess.run([sys.executable, "-m", "captioning.cli", "compile", "--output", str(out), "--image", pinned],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "is a tag" not in proc.stderr
    executors = next(yaml.safe_load_all(out.read_text()))["deploymentSpec"]["executors"]
    assert {e["container"]["image"] for e in executors.values()} == {pinned}
    proc = subprocess.run([sys.executable, "-m", "captioning.cli", "compile", "--output", str(out), "--image", IMAGE],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0 and f"--image {IMAGE} is a tag" in proc.stderr


def test_image_digests_are_read_from_a_push_and_from_the_engine():
    """No registry runs here: the push's event stream is the one docker-py yields (kept at the edge)."""
    from captioning.image_build import ImageBuildError, digest_from_push, known_digest, repository

    digest = "sha256:" + "ab" * 32
    events = [{"status": "Pushing"}, {"status": "1.0: digest: ..."},
              {"progressDetail": {}, "aux": {"Tag": "1.0", "Digest": digest, "Size": 1234}}]
    assert digest_from_push(events, "reg:5000/ml/captioning:1.0") == f"reg:5000/ml/captioning@{digest}"
    with pytest.raises(ImageBuildError, match="denied"):
        digest_from_push([{"error": "denied: requested access to the resource is denied"}], "reg/c:1")
    with pytest.raises(ImageBuildError, match="no digest"):
        digest_from_push([{"status": "Pushing"}], "reg/c:1")
    attrs = {"RepoDigests": [f"other/captioning@{digest}", f"reg:5000/ml/captioning@{digest}"]}
    assert known_digest(attrs, "reg:5000/ml/captioning:1.0") == f"reg:5000/ml/captioning@{digest}"
    assert known_digest({"RepoDigests": None}, "captioning:0.1.0") == ""
    assert repository("captioning") == "captioning"


def test_retries_allow_attempts_hours_apart_on_the_cached_steps(kubeflow):
    _, docs, _ = kubeflow
    root = docs[0]["root"]["dag"]["tasks"]
    for name in CACHED:
        policy = root[name]["retryPolicy"]
        assert policy["maxRetryCount"] == 3
        assert int(policy["backoffMaxDuration"].rstrip("s")) >= 24 * 3600  # train at COCO size takes hours
        assert float(policy["backoffFactor"]).is_integer()  # Argo reads the factor as an integer
        assert int(policy["backoffDuration"].rstrip("s")) >= 60


def test_every_pod_runs_as_the_images_non_root_user(kubeflow):
    from pipeline import IMAGE_UID

    dockerfile = (Path(__file__).resolve().parents[1] / "docker" / "Dockerfile").read_text()
    assert f"USER {IMAGE_UID}:{IMAGE_UID}" in dockerfile
    _, docs, _ = kubeflow
    platform = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for name in STEP_NAMES:
        context = platform[f"exec-{name}"]["securityContext"]
        assert context == {"runAsUser": str(IMAGE_UID), "runAsGroup": str(IMAGE_UID), "runAsNonRoot": True}


def test_older_backends_get_a_pipeline_without_the_security_context(tmp_path):
    """A 2.15 backend refuses the field (its compiler unmarshals the Kubernetes config strictly)."""
    _, docs, _ = compile_in_subprocess(tmp_path, "--no-security-context")
    platform = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert not any("securityContext" in spec for spec in platform.values())


def test_train_keeps_its_checkpoints_on_a_volume(kubeflow, tmp_path):
    from pipeline import CHECKPOINT_MOUNT, CHECKPOINT_PVC

    from captioning.io import VOLUME_ENV
    from components.factory import CHECKPOINT_DIR_ENV

    _, docs, _ = kubeflow
    (mount,) = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-train"]["pvcMount"]
    assert mount["constant"] == CHECKPOINT_PVC and mount["mountPath"] == CHECKPOINT_MOUNT
    env = docs[0]["deploymentSpec"]["executors"]["exec-train"]["container"]["env"]
    assert {"name": CHECKPOINT_DIR_ENV, "value": CHECKPOINT_MOUNT} in env
    assert {"name": VOLUME_ENV, "value": f"{CHECKPOINT_PVC}={CHECKPOINT_MOUNT}"} in env
    _, docs, _ = compile_in_subprocess(tmp_path, "--checkpoint-pvc", "")
    assert "pvcMount" not in docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-train"]


def quantity(text: str) -> float:
    """A Kubernetes quantity in CPUs or GiB."""
    units = {"": 1, "m": 1e-3, "Ki": 2**-20, "Mi": 2**-10, "Gi": 1, "Ti": 2**10, "K": 1e3 / 2**30,
             "M": 1e6 / 2**30, "G": 1e9 / 2**30, "T": 1e12 / 2**30}
    number = text.rstrip("KMGTim")
    return float(number) * units[text[len(number):]]


def test_default_requests_fit_the_common_single_gpu_nodes(kubeflow):
    from pipeline import GPU_NODES, SYSTEM_PODS

    _, docs, _ = kubeflow
    executors = docs[0]["deploymentSpec"]["executors"]
    readme = (Path(__file__).resolve().parents[1] / "docs" / "kubeflow-and-vertex.md").read_text()
    for name in ("process-data", "train", "evaluate"):
        resources = executors[f"exec-{name}"]["container"]["resources"]
        cpu, memory = quantity(resources["resourceCpuRequest"]), quantity(resources["resourceMemoryRequest"])
        for node, (node_cpu, node_gib) in GPU_NODES.items():
            assert cpu + SYSTEM_PODS[0] <= node_cpu and memory + SYSTEM_PODS[1] <= node_gib, (name, node)
            assert node.split(" (")[0] in readme
    # what used to be asked for does not fit an n1-standard-8 with a T4
    assert quantity("32G") + SYSTEM_PODS[1] > GPU_NODES["n1-standard-8 (+1x T4)"][1]


def test_spot_nodes_are_tolerated_when_asked_for(kubeflow, tmp_path):
    from pipeline import GPU_TOLERATION, SPOT_TOLERATIONS

    _, docs, _ = compile_in_subprocess(tmp_path, "--spot")
    platform = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert platform["exec-train"]["tolerations"] == [GPU_TOLERATION, *SPOT_TOLERATIONS]
    assert platform["exec-promote"]["tolerations"] == list(SPOT_TOLERATIONS)
    default = kubeflow[1][1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert default["exec-train"]["tolerations"] == [GPU_TOLERATION]


def test_a_pipeline_root_is_compiled_in_and_a_coco_run_without_one_is_warned_about(tmp_path):
    """Issue 25, point 1: KFP 2.15-2.17's default store is a 20Gi SeaweedFS volume; a COCO run writes about 53 GB."""
    from conftest import captioning_cli

    out = tmp_path / "p.yaml"
    proc = captioning_cli("compile", "--pipeline-root", "s3://team-bucket/captioning", "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load_all(out.read_text()).__next__()["defaultPipelineRoot"] == "s3://team-bucket/captioning"
    assert "no --pipeline-root" not in proc.stderr
    bare = captioning_cli("compile", "--output", str(tmp_path / "q.yaml"))
    assert "defaultPipelineRoot" not in (tmp_path / "q.yaml").read_text()
    assert "no --pipeline-root" in " ".join(bare.stderr.split()) and "20Gi" in bare.stderr
    demo = captioning_cli("compile", "--preset", "demo", "--output", str(tmp_path / "d.yaml"))
    assert demo.returncode == 0 and "no --pipeline-root" not in demo.stderr
    for target, root in (("kubeflow", "/data/artifacts"), ("kubeflow", "s3://"), ("vertex", "s3://b/p")):
        bad = captioning_cli("compile", "--target", target, "--pipeline-root", root, "--output", str(tmp_path / "r.yaml"))
        assert bad.returncode == 2 and f"--pipeline-root '{root}'" in bad.stderr, bad.stderr


def pod(name, run, phase, claim, node="gpu-node-a"):
    """A pod as the Kubernetes API lists it (the fields the check reads, in the API's camelCase)."""
    return {"metadata": {"name": name, "labels": {"pipeline/runid": run} if run else {}},
            "spec": {"nodeName": node, "volumes": [{"name": "kube-api-access", "projected": {"sources": []}},
                                                   {"name": "ckpt", "persistentVolumeClaim": {"claimName": claim}}]},
            "status": {"phase": phase}}


def test_a_second_run_is_told_who_holds_its_volumes_before_a_step_waits_for_them(kubeflow):
    """Issue 25, point 6: the ReadWriteOnce volumes held by another run's process_data (raw cache) or train
    (checkpoints) would leave this run's step Pending (Multi-Attach) without a word; an uncached check after
    log_raw_data names the holder."""
    from pipeline import CHECKPOINT_PVC, RAW_CACHE_PVC

    from captioning.cluster_volumes import check_volumes_free, volume_users
    from captioning.errors import DataError

    pods = [pod("captioning-abc-train-1", "run-1", "Running", CHECKPOINT_PVC),
            pod("captioning-xyz-check-volumes", "run-2", "Running", "other-claim"),
            pod("captioning-old-process-data", "run-0", "Succeeded", RAW_CACHE_PVC),
            pod("captioning-xyz-log-raw-data", "run-2", "Pending", RAW_CACHE_PVC, node="")]
    claims = [RAW_CACHE_PVC, CHECKPOINT_PVC]
    assert [u["pod"] for u in volume_users(pods, CHECKPOINT_PVC, "run-2")] == ["captioning-abc-train-1"]
    assert volume_users(pods, RAW_CACHE_PVC, "run-2") == []  # its own pod, and a finished one
    with pytest.raises(DataError, match=rf"namespace kubeflow are mounted by another run: {CHECKPOINT_PVC} by pod "
                                        r"captioning-abc-train-1 \(run run-1, Running, node gpu-node-a\)"):
        check_volumes_free(claims, "run-2", pods, "kubeflow")
    check_volumes_free(claims, "run-2", pods[1:], "kubeflow")  # only its own pods and finished ones: free

    _, docs, _ = kubeflow
    ir = docs[0]
    root = ir["root"]["dag"]["tasks"]
    assert root["check-volumes"]["dependentTasks"] == ["log-raw-data"]  # after it, before the steps that wait
    assert "check-volumes" in root["process-data"]["dependentTasks"] and "check-volumes" in root["train"]["dependentTasks"]
    assert not root["check-volumes"].get("cachingOptions", {}).get("enableCache")
    assert "maxRetryCount" not in root["check-volumes"]["retryPolicy"]  # limit 0: a held volume stays held
    assert root["check-volumes"]["inputs"]["parameters"]["claims"]["runtimeValue"]["constant"] == claims
    platform = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-check-volumes"]
    assert platform["fieldPathAsEnv"][0]["name"] == "KFP_RUN_ID"  # its own run, to tell itself from others
    assert "pvcMount" not in platform  # it reads the API, never mounts the volumes it checks


def test_without_volumes_there_is_nothing_to_check(tmp_path):
    from pipeline import BuildOptions, compile_pipeline

    for options in (BuildOptions(checkpoint_pvc="", raw_cache_pvc=""), BuildOptions(target="vertex")):
        ir = yaml.safe_load_all(compile_pipeline(tmp_path / "p.yaml", options).read_text()).__next__()
        assert "check-volumes" not in ir["root"]["dag"]["tasks"]


def test_the_volume_check_outside_a_pod_or_without_rights_warns_and_passes(monkeypatch, caplog):
    """It advises: without a service account (or RBAC to list pods) it says what it did not check, and lets the
    run go on rather than fail a run that may well be alone."""
    from captioning import cluster_volumes
    from captioning.submit import kubeflow

    monkeypatch.setattr(kubeflow, "POD_NAMESPACE_FILE", "/nonexistent/namespace")
    with caplog.at_level("WARNING"):
        cluster_volumes.check_in_cluster(["captioning-checkpoints"])
    assert "not in a pod with a service account" in caplog.text and "captioning-checkpoints not checked" in caplog.text


def test_python_pipeline_py_compiles_the_defaults_and_sends_options_to_captioning_compile(tmp_path):
    """The script form needs no CLI (which imports pipeline.py): the defaults only; an option is refused, never
    silently dropped."""
    script = str(Path(__file__).resolve().parents[1] / "pipeline.py")
    proc = subprocess.run([sys.executable, script], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    ir = next(yaml.safe_load_all((tmp_path / "captioning_pipeline.yaml").read_text()))
    assert ir["pipelineInfo"]["description"].endswith("[compiled for kubeflow]")
    proc = subprocess.run([sys.executable, script, "--target", "vertex"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and "use: captioning compile --target vertex" in proc.stderr
