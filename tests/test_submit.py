"""`captioning submit` against loopback stand-ins of the KFP API and of Google's APIs.

No Kubeflow backend, Vertex AI or Secret Manager can run here: the servers in
helpers/api_servers.py answer the calls the real SDKs (kfp.Client,
aiplatform.PipelineJob, the Secret Manager client) make, and record them.
"""

from __future__ import annotations

import json
import os
import socket

import pytest
import yaml

from conftest import captioning_cli
from helpers.api_servers import FakeGoogleApis, FakeKfpApi, KfpBehaviour

SECRET_VALUE = "wandb-key-that-must-never-travel-0123456789"


@pytest.fixture(scope="module")
def packages(tmp_path_factory) -> dict:
    from pipeline import BuildOptions, compile_pipeline

    root = tmp_path_factory.mktemp("packages")
    return {target: compile_pipeline(root / f"{target}.yaml", BuildOptions(target=target, image="reg.example/cap:1"))
            for target in ("kubeflow", "vertex")}


def _env(**extra) -> dict:
    # A W&B key in the submitting shell must not reach any request.
    env = {"WANDB_API_KEY": SECRET_VALUE, "KF_PIPELINES_SA_TOKEN_PATH": "/nonexistent/token",
           "NO_GCE_CHECK": "true", "GCE_METADATA_HOST": "127.0.0.1:9", "GCE_METADATA_IP": "127.0.0.1:9"}
    for name in ("KF_PIPELINES_ENDPOINT", "KF_PIPELINES_TOKEN", "KF_PIPELINES_NAMESPACE", "KUBERNETES_SERVICE_HOST",
                 "GOOGLE_CLOUD_PROJECT", "GOOGLE_OAUTH_ACCESS_TOKEN"):
        env[name] = ""
    env.update(extra)
    return env


def _one_line_error(proc, sdk_logs: bool = False) -> str:
    """Our error is one line; with ``sdk_logs`` the Google SDK's own log lines may come before it."""
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert proc.returncode not in (0, 1), proc.stdout
    assert lines and lines[-1].startswith("error: "), proc.stderr
    assert sum(line.startswith("error: ") for line in lines) == 1, proc.stderr
    assert sdk_logs or len(lines) == 1, proc.stderr
    return lines[-1]


def _kfp_submit(api, package, *args, env=None):
    return captioning_cli("submit", "--target", "kubeflow", "--host", api.url, "--package", str(package), *args,
                          env=_env(**(env or {})), timeout=120)


# ------------------------------------------------------------------ Kubeflow


def test_kubeflow_submission_creates_the_experiment_and_a_run_of_this_pipeline(packages):
    with FakeKfpApi(KfpBehaviour(token="tok-123")) as api:
        proc = _kfp_submit(api, packages["kubeflow"], "--token", "tok-123", "--experiment", "coco-nightly",
                           "--run-name", "nightly-1", "--pipeline-root", "minio://mlpipeline/captioning",
                           "--set", "train.epochs=2", "--set", "data.max_images=5000", "--set", "wandb.mode=offline")
        assert proc.returncode == 0, proc.stderr
        calls = [(r.method, r.path) for r in api.requests]
        assert ("GET", "/apis/v2beta1/healthz") in calls
        assert calls[-3:] == [("GET", "/apis/v2beta1/experiments"), ("POST", "/apis/v2beta1/experiments"),
                              ("POST", "/apis/v2beta1/runs")]
        # Every call but healthz carries the token; nothing carries the W&B key.
        assert all(r.headers.get("authorization") == "Bearer tok-123" for r in api.requests)
        assert SECRET_VALUE not in api.all_text()

        (experiment,) = api.experiments.values()
        assert experiment["display_name"] == "coco-nightly"
        (run,) = api.runs.values()
        assert run["experiment_id"] == experiment["experiment_id"] and run["display_name"] == "nightly-1"
        assert run["service_account"] == "captioning-runner"
        docs = list(yaml.safe_load_all(packages["kubeflow"].read_text()))
        assert run["pipeline_spec"]["pipeline_spec"] == docs[0]
        assert run["pipeline_spec"]["platform_spec"] == docs[1]  # the W&B Secret, tolerations, the PVC
        config = run["runtime_config"]
        assert config["pipeline_root"] == "minio://mlpipeline/captioning"
        params = config["parameters"]
        assert params["epochs"] == 2 and params["max_images"] == 5000 and params["wandb_mode"] == "offline"
        assert params["preset"] == "coco2014" and params["units"] == 1024  # the rest from the preset (its GRU state)
        assert set(params) <= set(docs[0]["root"]["inputDefinitions"]["parameters"])
        assert f"run: {api.url}/#/runs/details/{run['run_id']}" in proc.stdout

        # A second submission reuses the experiment.
        again = _kfp_submit(api, packages["kubeflow"], "--token", "tok-123", "--experiment", "coco-nightly")
        assert again.returncode == 0, again.stderr
        assert len(api.experiments) == 1 and len(api.runs) == 2


def test_kubeflow_compiles_when_no_package_is_given(tmp_path):
    with FakeKfpApi() as api:
        proc = captioning_cli("submit", "--target", "kubeflow", "--host", api.url, "--image", "reg.example/cap:2",
                              "--gpu-node-selector", "cloud.google.com/gke-accelerator=nvidia-l4",
                              cwd=tmp_path, env=_env(), timeout=180)
        assert proc.returncode == 0, proc.stderr
        package = tmp_path / "captioning_pipeline.kubeflow.yaml"
        assert package.is_file()
        (run,) = api.runs.values()
        executors = run["pipeline_spec"]["pipeline_spec"]["deploymentSpec"]["executors"]
        assert {e["container"]["image"] for e in executors.values()} == {"reg.example/cap:2"}
        k8s = run["pipeline_spec"]["platform_spec"]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
        assert k8s["exec-train"]["nodeSelector"]["labels"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}


@pytest.mark.parametrize("states, code", [(["PENDING", "RUNNING", "SUCCEEDED"], 0), (["RUNNING", "FAILED"], 1)])
def test_kubeflow_wait_follows_the_run_and_exits_by_its_outcome(packages, states, code):
    with FakeKfpApi(KfpBehaviour(run_states=states)) as api:
        proc = _kfp_submit(api, packages["kubeflow"], "--wait", "--poll-s", "0.05")
        assert proc.returncode == code, proc.stderr
        assert f"state: {states[-1]}" in proc.stdout
        for state in states:
            assert f"state: {state}" in proc.stderr  # each change reported while waiting
        (run_id,) = api.runs
        assert sum(r.path == f"/apis/v2beta1/runs/{run_id}" for r in api.requests) == len(states)


def test_kubeflow_in_cluster_service_account_token_and_namespace(packages, tmp_path):
    token = tmp_path / "token"
    token.write_text("projected-sa-token\n")
    with FakeKfpApi(KfpBehaviour(token="projected-sa-token", multi_user=True, namespaces=("team-a",))) as api:
        proc = _kfp_submit(api, packages["kubeflow"], "--namespace", "team-a",
                           env={"KF_PIPELINES_SA_TOKEN_PATH": str(token)})
        assert proc.returncode == 0, proc.stderr
        (experiment,) = api.experiments.values()
        assert experiment["namespace"] == "team-a"
        assert "(namespace team-a)" in proc.stdout


def test_kubeflow_session_cookie(packages):
    with FakeKfpApi(KfpBehaviour(cookie="authservice_session=abc123")) as api:
        proc = _kfp_submit(api, packages["kubeflow"], "--cookie", "authservice_session=abc123")
        assert proc.returncode == 0, proc.stderr
        assert len(api.runs) == 1
        assert all("authservice_session=abc123" in r.headers.get("cookie", "") for r in api.requests)
        line = _one_line_error(_kfp_submit(api, packages["kubeflow"], "--cookie", "authservice_session=stale"))
        assert "HTTP 401" in line and len(api.runs) == 1


def test_kubeflow_host_and_token_from_the_environment(packages):
    with FakeKfpApi(KfpBehaviour(token="env-token")) as api:
        proc = captioning_cli("submit", "--target", "kubeflow", "--package", str(packages["kubeflow"]),
                              env=_env(KF_PIPELINES_ENDPOINT=api.url, KF_PIPELINES_TOKEN="env-token"), timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert len(api.runs) == 1


def test_kubeflow_errors_are_one_line_each(packages):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    proc = captioning_cli("submit", "--target", "kubeflow", "--host", closed, "--package", str(packages["kubeflow"]),
                          env=_env(), timeout=60)
    assert "cannot reach the KFP API" in _one_line_error(proc) and "connection refused" in proc.stderr

    with FakeKfpApi(KfpBehaviour(token="right")) as api:
        line = _one_line_error(_kfp_submit(api, packages["kubeflow"], "--token", "wrong"))
        assert "HTTP 401" in line and "Unauthenticated" in line
        assert not api.runs

    with FakeKfpApi(KfpBehaviour(multi_user=True, namespaces=("team-a",))) as api:
        line = _one_line_error(_kfp_submit(api, packages["kubeflow"]))
        assert "multi-user" in line and "--namespace" in line
        line = _one_line_error(_kfp_submit(api, packages["kubeflow"], "--namespace", "no-such-team"))
        assert "HTTP 403" in line and "'no-such-team'" in line
        assert not api.runs

    with FakeKfpApi(KfpBehaviour(login_page=True)) as api:
        line = _one_line_error(_kfp_submit(api, packages["kubeflow"]))
        assert "text/html" in line and "--cookie" in line

    with FakeKfpApi() as api:
        line = _one_line_error(_kfp_submit(api, packages["vertex"]))
        assert "compiled for vertex, not kubeflow" in line
        line = _one_line_error(_kfp_submit(api, packages["kubeflow"], "--set", "train.patience=5"))
        assert "train.patience is not a pipeline parameter" in line
        line = _one_line_error(_kfp_submit(api, packages["kubeflow"], "--set", "train.epochs=0"))
        assert "train.epochs" in line and "greater than or equal to 1" in line
        assert api.requests == []  # refused before anything was sent

    missing = captioning_cli("submit", "--target", "kubeflow", "--package", str(packages["kubeflow"]), env=_env())
    assert "no KFP host" in _one_line_error(missing)


def test_kubeflow_dry_run_contacts_nothing(packages):
    with FakeKfpApi() as api:
        proc = _kfp_submit(api, packages["kubeflow"], "--token", "tok-abc-999", "--dry-run", "--set", "train.units=256")
        assert proc.returncode == 0, proc.stderr
        assert api.requests == []
    plan = json.loads(proc.stdout)
    assert plan["target"] == "kubeflow" and plan["package"] == str(packages["kubeflow"])
    assert plan["parameters"]["units"] == 256 and plan["auth"] == "token"
    assert "tok-abc-999" not in proc.stdout  # the kind of auth, never the token


def test_passwords_in_urls_are_never_printed(packages, tmp_path):
    """Issue 14, point 7: --host and a mirror URL with user:password, in the dry-run plan, in errors and in the
    summary of a failed run."""
    secret = "hunter2-pw"
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://alice:{secret}@127.0.0.1:{s.getsockname()[1]}"
    plan = captioning_cli("submit", "--target", "kubeflow", "--host", closed, "--package", str(packages["kubeflow"]),
                          "--dry-run", env=_env(), timeout=60)
    assert plan.returncode == 0, plan.stderr
    assert json.loads(plan.stdout)["host"] == closed.replace(secret, "***")
    failed = captioning_cli("submit", "--target", "kubeflow", "--host", closed, "--package", str(packages["kubeflow"]),
                            env=_env(), timeout=60)
    assert "cannot reach the KFP API at http://alice:***@127.0.0.1" in _one_line_error(failed)
    run = captioning_cli("run", "--workdir", str(tmp_path / "work"), "--set", f"data.base_url={closed}/coco",
                         "--set", "data.retries=0", timeout=120)
    assert run.returncode == 1
    summary = (tmp_path / "work" / "summary.json").read_text()
    assert "alice:***@127.0.0.1" in summary and "alice:***@127.0.0.1" in run.stderr + run.stdout
    for output in (plan.stdout, plan.stderr, failed.stdout, failed.stderr, run.stdout, run.stderr, summary):
        assert secret not in output
    written = [p for p in (tmp_path / "work").rglob("*") if p.is_file()]  # W&B's offline run among them
    assert any("wandb" in p.parts for p in written)
    assert [p for p in written if secret.encode() in p.read_bytes()] == []


# ------------------------------------------------------------------ Vertex AI


def _vertex(package, *args, env=None):
    return captioning_cli("submit", "--target", "vertex", "--project", "my-proj-1", "--region", "europe-west4",
                          "--pipeline-root", "gs://my-bucket/runs", "--package", str(package), *args,
                          env=_env(**(env or {})), timeout=120)


def test_vertex_dry_run_shows_the_request(packages):
    proc = _vertex(packages["vertex"], "--dry-run", "--run-name", "Nightly 7", "--set", "train.epochs=3",
                   "--service-account", "runner@my-proj-1.iam.gserviceaccount.com")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["parent"] == "projects/my-proj-1/locations/europe-west4"
    assert plan["pipeline_job_id"] == "nightly-7"
    request = plan["request"]
    assert request["displayName"] == "Nightly 7"
    assert request["serviceAccount"] == "runner@my-proj-1.iam.gserviceaccount.com"
    runtime = request["runtimeConfig"]
    assert runtime["gcsOutputDirectory"] == "gs://my-bucket/runs"
    values = runtime["parameterValues"]
    assert values["epochs"] == 3
    assert values["wandb_secret"] == "projects/my-proj-1/secrets/wandb-api-key/versions/latest"
    assert SECRET_VALUE not in proc.stdout + proc.stderr


@pytest.fixture
def vertex_bucket(gcs_emulator):
    """The pipeline root's bucket, which aiplatform looks up before it creates the job."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    storage.Client(project="my-proj-1", credentials=AnonymousCredentials()).create_bucket("my-bucket")


def test_vertex_request_reaches_the_api_with_this_pipeline(packages, vertex_bucket):
    with FakeGoogleApis(job_states=["PIPELINE_STATE_RUNNING", "PIPELINE_STATE_SUCCEEDED"]) as api:
        proc = _vertex(packages["vertex"], "--api-endpoint", api.url, "--run-name", "r1", "--wait", "--poll-s", "0.05",
                       "--set", "train.epochs=2", "--wandb-secret", "projects/my-proj-1/secrets/wb/versions/3",
                       env={"GOOGLE_OAUTH_ACCESS_TOKEN": FakeGoogleApis.ACCESS_TOKEN})
        assert proc.returncode == 0, proc.stderr
        create = [r for r in api.requests if r.method == "POST"]
        assert len(create) == 1
        request = create[0]
        assert request.path == "/v1/projects/my-proj-1/locations/europe-west4/pipelineJobs"
        assert request.query["pipelineJobId"] == ["r1"]
        spec = yaml.safe_load(packages["vertex"].read_text())
        assert request.body["pipelineSpec"]["root"] == spec["root"]
        accelerators = {e["container"]["resources"].get("accelerator", {}).get("resourceType")
                        for e in request.body["pipelineSpec"]["deploymentSpec"]["executors"].values()}
        assert accelerators == {None, "NVIDIA_L4"}
        values = request.body["runtimeConfig"]["parameterValues"]
        assert values["epochs"] == 2 and values["wandb_secret"] == "projects/my-proj-1/secrets/wb/versions/3"
        assert SECRET_VALUE not in api.all_text()
        assert "state: PIPELINE_STATE_SUCCEEDED" in proc.stdout
        assert "console.cloud.google.com/vertex-ai/locations/europe-west4/pipelines/runs/r1" in proc.stdout


def test_vertex_errors_are_one_line_each(packages, vertex_bucket, tmp_path):
    line = _one_line_error(_vertex(packages["kubeflow"], "--dry-run"))
    assert "compiled for kubeflow, not vertex" in line
    line = _one_line_error(captioning_cli("submit", "--target", "vertex", "--project", "my-proj-1",
                                          "--pipeline-root", "/local/dir", "--package", str(packages["vertex"]),
                                          "--dry-run", env=_env()))
    assert "--pipeline-root" in line and "gs://" in line
    line = _one_line_error(captioning_cli("submit", "--target", "vertex", "--pipeline-root", "gs://b/r", "--dry-run",
                                          cwd=tmp_path, env=_env()))
    assert "no Google Cloud project" in line
    assert not list(tmp_path.iterdir())  # refused before compiling anything
    line = _one_line_error(captioning_cli("submit", "--target", "vertex", "--accelerator-type", "nvidia.com/gpu",
                                          "--project", "my-proj-1", "--pipeline-root", "gs://b/r", "--dry-run",
                                          env=_env()))
    assert "NVIDIA_L4" in line
    with FakeGoogleApis() as api:  # a token the API does not take
        line = _one_line_error(_vertex(packages["vertex"], "--api-endpoint", api.url,
                                       env={"GOOGLE_OAUTH_ACCESS_TOKEN": "expired"}), sdk_logs=True)
        assert "refused the credentials for project my-proj-1" in line


# ------------------------------------------------------------------ Secret Manager (in the pods)


def test_pods_read_the_wandb_key_from_secret_manager(monkeypatch):
    from google.api_core.client_options import ClientOptions
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import secretmanager

    from captioning.errors import ConfigError
    from captioning.gcp_secrets import ensure_wandb_key

    name = "projects/my-proj-1/secrets/wandb-api-key/versions/latest"
    with FakeGoogleApis(secrets={name: SECRET_VALUE + "\n"},
                        deny_secrets=("projects/my-proj-1/secrets/locked/versions/latest",)) as api:
        client = secretmanager.SecretManagerServiceClient(
            credentials=AnonymousCredentials(), transport="rest", client_options=ClientOptions(api_endpoint=api.url))
        monkeypatch.delenv("WANDB_API_KEY", raising=False)
        assert not ensure_wandb_key("projects/my-proj-1/secrets/wandb-api-key", "offline", client)
        assert "WANDB_API_KEY" not in os.environ and api.requests == []  # offline: not even read
        assert ensure_wandb_key("projects/my-proj-1/secrets/wandb-api-key", "online", client)
        assert os.environ["WANDB_API_KEY"] == SECRET_VALUE
        assert api.requests[-1].path == f"/v1/{name}:access"
        with pytest.raises(ConfigError, match="locked/versions/latest: permission denied; grant"):
            monkeypatch.delenv("WANDB_API_KEY")
            ensure_wandb_key("projects/my-proj-1/secrets/locked", "online", client)
        with pytest.raises(ConfigError, match="missing/versions/2: no such secret"):
            ensure_wandb_key("projects/my-proj-1/secrets/missing/versions/2", "online", client)


def test_wandb_secret_setting_is_validated():
    from captioning.config import load_config
    from captioning.errors import ConfigError

    assert load_config(overrides=["wandb.api_key_secret=projects/p/secrets/s"]).wandb.api_key_secret
    with pytest.raises(ConfigError, match="wandb.api_key_secret") as err:
        load_config(overrides=[f"wandb.api_key_secret={SECRET_VALUE}"])  # the key pasted where its name goes
    assert SECRET_VALUE not in str(err.value)


# ------------------------------------------------------------------ the batch captioning pipeline


def test_the_caption_pipeline_is_submitted_with_its_own_parameters(tmp_path):
    from pipeline import BuildOptions, compile_pipeline

    package = compile_pipeline(tmp_path / "batch.yaml", BuildOptions(pipeline="caption", image="reg.example/cap:1"))
    with FakeKfpApi(KfpBehaviour(token="tok-9")) as api:
        proc = _kfp_submit(api, package, "--pipeline", "caption", "--token", "tok-9",
                           "--set", "batch.source=gs://photos/2026/", "--set", "batch.model=wandb:production",
                           "--set", "batch.shard_images=500")
        assert proc.returncode == 0, proc.stderr
        (run,) = api.runs.values()
        params = run["runtime_config"]["parameters"]
        assert params["source"] == "gs://photos/2026/" and params["model"] == "wandb:production"
        assert params["shard_images"] == 500 and "epochs" not in params
        assert run["pipeline_spec"]["pipeline_spec"]["pipelineInfo"]["name"] == "captioning-batch"
        assert SECRET_VALUE not in api.all_text()

        # the training pipeline's settings are no parameters of this one; the packages are not interchangeable
        line = _one_line_error(_kfp_submit(api, package, "--pipeline", "caption", "--set", "train.epochs=2"))
        assert "train.epochs is not a parameter of the caption pipeline" in line
        line = _one_line_error(_kfp_submit(api, package, "--token", "tok-9"))
        assert "the caption pipeline, not the train pipeline; pass --pipeline caption" in line
        assert len(api.runs) == 1
