"""The compiled KFP IR: executors, typed artifacts, accelerators, the gate, secrets, caching."""

import os
import subprocess
import sys

import pytest
import yaml


IMAGE = "registry.example/captioning:1.2.3"
SECRET_VALUE = "wandb-key-that-must-not-leak-0123456789"
STEP_NAMES = ("log-raw-data", "process-data", "train", "evaluate", "promote")


def compile_in_subprocess(tmp_path, *args):
    out = tmp_path / "pipeline.yaml"
    env = dict(os.environ, WANDB_API_KEY=SECRET_VALUE)
    code = ("import sys, pipeline; pipeline.main(sys.argv[1:]); "
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
    assert sorted(executors) == sorted(f"exec-{n}" for n in STEP_NAMES)
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

    _, docs, _ = compile_in_subprocess(tmp_path, "--raw-cache-pvc", "", "--gpu-node-selector",
                                       "cloud.google.com/gke-accelerator=nvidia-l4")
    platform = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert "pvcMount" not in platform["exec-log-raw-data"]
    assert platform["exec-train"]["nodeSelector"]["labels"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}


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
])
def test_accelerator_names_are_checked_per_target(args, message):
    from captioning.cli import app
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, ["compile", "--output", "/dev/null", *args])
    assert result.exit_code == 2 and message in result.output
