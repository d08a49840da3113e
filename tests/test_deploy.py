"""`captioning deploy` and manifests/serving: the InferenceService validated, and the command against loopback
stand-ins of the Kubernetes API and of Vertex AI's REST API (no cluster, no KServe, no Vertex AI here).

The stand-ins answer the calls the real clients (kubernetes.client.CustomObjectsApi, google.cloud.aiplatform
over REST) make, with the shapes the real servers use, and record them.
"""

from __future__ import annotations

import json
import os
import re
import socket
from pathlib import Path
from urllib.parse import unquote

import pytest
import typer
import yaml
from typer.testing import CliRunner

from helpers.api_servers import JSON, Recorded, _Server
from test_manifests import MANIFESTS, kustomize, validate

from captioning import DEFAULT_IMAGE
from captioning.deploy.command import deploy
from captioning.deploy.kserve import S3Access, inference_service

SERVING = MANIFESTS / "serving"
KUBE_TOKEN = "kube-token-that-must-never-be-printed-0123"
GOOGLE_TOKEN = "ya29.deploy-loopback-token-never-printed"
IMAGE = "eu-docker.pkg.dev/my-proj-1/ml/captioning:0.2.0"
MODEL_URI = "gs://my-bucket/captioning/models/v7"
# ComponentExtensionSpec: the predictor's fields that are not the pod's (KServe's v1beta1 API).
EXTENSION_FIELDS = {"minReplicas", "maxReplicas", "scaleTarget", "scaleMetric", "containerConcurrency", "timeout",
                    "canaryTrafficPercent", "logger", "batcher", "labels", "annotations", "deploymentStrategy"}


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """No kubeconfig, cluster, project or token from the shell; a fresh aiplatform configuration per test."""
    from google.cloud.aiplatform import initializer

    for name in ("KUBECONFIG", "KUBE_API_SERVER", "KUBE_TOKEN", "KUBERNETES_SERVICE_HOST", "CAPTIONING_IMAGE",
                 "GOOGLE_CLOUD_PROJECT", "GOOGLE_CLOUD_REGION", "GOOGLE_OAUTH_ACCESS_TOKEN",
                 "GOOGLE_APPLICATION_CREDENTIALS", "AIP_STORAGE_URI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.kube/config
    for name, value in {"NO_GCE_CHECK": "true", "GCE_METADATA_HOST": "127.0.0.1:9",
                        "GCE_METADATA_IP": "127.0.0.1:9"}.items():
        monkeypatch.setenv(name, value)
    initializer.global_config.__init__()  # aiplatform.init sets process-wide state: none in, none out
    yield
    initializer.global_config.__init__()


def run_deploy(*args: str, env: dict | None = None):
    """The command as `captioning deploy` runs it (cli.py registers the same function)."""
    app = typer.Typer()
    app.callback()(lambda: None)  # a group, so the command keeps its name
    app.command("deploy")(deploy)
    return CliRunner().invoke(app, ["deploy", *args], env=env, catch_exceptions=False)


def one_line_error(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def closed_port_url() -> str:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


# ------------------------------------------------------------------ manifests/serving


@pytest.fixture(scope="module")
def rendered() -> dict:
    (isvc,) = [d for d in kustomize(SERVING) if d["kind"] == "InferenceService"]
    return isvc


def rendered_with_gpu(tmp_path) -> dict:
    """manifests/serving with the gpu component, as an overlay would use it."""
    rel = os.path.relpath(SERVING, tmp_path)
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({"resources": [rel], "components": [f"{rel}/gpu"]}))
    (isvc,) = [d for d in kustomize(tmp_path) if d["kind"] == "InferenceService"]
    return isvc


def storage_uri(isvc: dict) -> str:
    """The model the manifest serves: `serve --model`'s value (gs://, read by the server itself)."""
    args = isvc["spec"]["predictor"]["containers"][0]["args"]
    return args[args.index("--model") + 1]


def kserve_pod(isvc: dict) -> dict:
    """The predictor pod as KServe's webhook makes it (a stand-in: no KServe runs here): with STORAGE_URI set it
    adds the storage-initializer init container, built without a securityContext (pkg/utils/storage.go, v0.20)."""
    pod = predictor_pod(isvc)["spec"]
    env = {e["name"]: e.get("value") for e in pod["containers"][0].get("env", [])}
    if "STORAGE_URI" in env:
        pod["initContainers"] = [{"name": "storage-initializer", "image": "kserve/storage-initializer:v0.20.0",
                                  "args": [env["STORAGE_URI"], "/mnt/models"]}]
    return pod


def predictor_pod(isvc: dict) -> dict:
    """The pod KServe makes of the predictor: its PodSpec fields, without the ComponentExtensionSpec ones."""
    spec = {k: v for k, v in isvc["spec"]["predictor"].items() if k not in EXTENSION_FIELDS}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"{isvc['metadata']['name']}-predictor"},
            "spec": spec}


def test_the_manifest_is_the_object_captioning_deploy_sends(rendered, tmp_path):
    """One definition: kserve.inference_service; the YAML must render to the same object (image from kustomize's
    images:, the URI a placeholder), with and without the gpu component."""
    uri = storage_uri(rendered)
    assert uri.startswith("gs://")
    assert rendered == inference_service(DEFAULT_IMAGE, uri), \
        "manifests/serving differs from captioning.deploy.kserve.inference_service(): change both"
    assert rendered_with_gpu(tmp_path) == inference_service(DEFAULT_IMAGE, uri, gpu=True)


def test_the_predictor_pod_validates_under_the_restricted_profile(rendered, tmp_path):
    from pipeline import GPU_TOLERATION, IMAGE_UID

    for isvc in (rendered, rendered_with_gpu(tmp_path)):
        pod = predictor_pod(isvc)
        validate(pod)  # kubernetes-validate, strict: a misspelt or misplaced field fails
        (container,) = pod["spec"]["containers"]
        # Pod Security "restricted", on the container (Knative drops a pod-level securityContext).
        assert "securityContext" not in pod["spec"] and not container["securityContext"].get("privileged")
        assert container["securityContext"] == {
            "runAsUser": IMAGE_UID, "runAsGroup": IMAGE_UID, "runAsNonRoot": True, "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}
        assert not {"hostNetwork", "hostPID", "hostIPC", "volumes"} & set(pod["spec"])
        assert container["resources"]["requests"] == {"cpu": "2", "memory": "8Gi"}
    gpu_pod = predictor_pod(rendered_with_gpu(tmp_path))["spec"]
    assert gpu_pod["tolerations"] == [GPU_TOLERATION]
    assert gpu_pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "tolerations" not in rendered["spec"]["predictor"]


SERVING_VARIANTS = [("gs://b/models/production", S3Access()), ("pvc://models/captioning/v7", S3Access()),
                    ("s3://mlpipeline/v2/artifacts/run/model", S3Access("http://seaweedfs.kubeflow:9000",
                                                                        "mlpipeline-minio-artifact")),
                    ("s3://b/model", S3Access())]


@pytest.mark.parametrize("uri, s3", SERVING_VARIANTS)
def test_every_predictor_deploy_makes_passes_pod_security_restricted(uri, s3):
    """Issue 25, point 3: every URI kind deploy and promote.deploy hand out is read without KServe's storage
    initializer (gs:// and s3:// by the server, pvc:// mounted), so the pod a restricted namespace gets has no
    init container and passes the profile's checks."""
    from helpers.pod_security import violations

    for gpu in (False, True):
        isvc = inference_service(IMAGE, uri, gpu=gpu, s3=s3)
        pod = kserve_pod(isvc)
        validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": pod})
        assert violations(pod) == [] and "initContainers" not in pod, violations(pod)
        (container,) = pod["containers"]
        assert "STORAGE_URI" not in {e["name"] for e in container.get("env", [])}
        if not uri.startswith("pvc://"):
            assert storage_uri(isvc) == uri  # the server reads it


def test_the_pod_security_checker_refuses_kserves_storage_initializer():
    """The checker is not blind: the init container KServe injects for STORAGE_URI (v0.20, no securityContext)."""
    from helpers.pod_security import violations

    isvc = inference_service(IMAGE, MODEL_URI)
    isvc["spec"]["predictor"]["containers"][0]["env"] = [{"name": "STORAGE_URI", "value": "https://h/model.zip"}]
    pod = kserve_pod(isvc)
    assert violations(pod) and all(v.startswith("init container storage-initializer") for v in violations(pod))


def test_the_validator_catches_a_broken_predictor(rendered):
    import kubernetes_validate

    pod = predictor_pod(rendered)
    pod["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/typo"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(pod)


def test_what_kserve_needs_matches_the_server_and_the_cluster_manifests(rendered):
    """The fields KServe's controller reads, the probes against the server's real routes, the args against the real
    `serve` command, and the names manifests/base and pipeline.py use."""
    from types import SimpleNamespace

    import pipeline

    from captioning import deploy as contract
    from captioning import serving
    from captioning.cli import app
    from captioning.deploy import kserve

    assert rendered["apiVersion"] == "serving.kserve.io/v1beta1" and rendered["kind"] == "InferenceService"
    predictor = rendered["spec"]["predictor"]
    (container,) = predictor["containers"]
    assert container["name"] == "kserve-container"  # KServe reads the port (and STORAGE_URI) from this one
    assert container["ports"] == [{"containerPort": serving.DEFAULT_PORT, "protocol": "TCP"}]
    assert predictor["minReplicas"] == 1 and container["image"] == DEFAULT_IMAGE

    # The server's contract, as deploy knows it, is the server's own.
    assert (contract.DEFAULT_NAME, contract.DEFAULT_PORT) == (serving.DEFAULT_NAME, serving.DEFAULT_PORT)
    assert (contract.LIVE_ROUTE, contract.READY_ROUTE) == (serving.LIVE_ROUTE, serving.READY_ROUTE)
    assert (contract.VERTEX_HEALTH_ROUTE, contract.VERTEX_PREDICT_ROUTE) == (
        serving.VERTEX_HEALTH_DEFAULT, serving.VERTEX_PREDICT_DEFAULT)
    routes = {(r.path, m) for r in serving.create_app(SimpleNamespace(version=None)).routes for m in r.methods}
    for probe in ("readinessProbe", "livenessProbe"):
        assert (container[probe]["httpGet"]["path"], "GET") in routes
        assert container[probe]["httpGet"]["port"] == serving.DEFAULT_PORT
    assert container["readinessProbe"]["httpGet"]["path"] == serving.READY_ROUTE
    assert {(contract.VERTEX_HEALTH_ROUTE, "GET"), (contract.VERTEX_PREDICT_ROUTE, "POST")} <= routes

    serve = typer.main.get_command(app).commands["serve"]
    assert container["command"] == ["captioning"] and container["args"][0] == "serve"
    params = serve.make_context("serve", list(container["args"][1:])).params
    assert (params["model"], params["name"], params["port"]) == (storage_uri(rendered), "captioner", 8080)
    assert "env" not in container  # no STORAGE_URI: nothing for KServe to inject
    from captioning.deploy.vertex import upload_kwargs

    vertex_args = upload_kwargs(IMAGE, MODEL_URI, "captioner")["serving_container_args"]
    assert serve.make_context("serve", vertex_args[1:]).params["name"] == "captioner"

    # the server's own account, without an API token: not the pipeline's, which reads the namespace's Secrets
    (account,) = [d for d in kustomize(SERVING) if d["kind"] == "ServiceAccount"]
    (runner,) = [d for d in kustomize(MANIFESTS / "base") if d["kind"] == "ServiceAccount"]
    assert predictor["serviceAccountName"] == account["metadata"]["name"] != runner["metadata"]["name"]
    assert account["automountServiceAccountToken"] is False and predictor["automountServiceAccountToken"] is False
    validate(account)
    assert container["securityContext"]["runAsUser"] == pipeline.IMAGE_UID == kserve.IMAGE_UID
    assert kserve.GPU_TOLERATION == pipeline.GPU_TOLERATION
    assert "`serving/`" in (MANIFESTS / "README.md").read_text()


# ------------------------------------------------------------------ a stand-in Kubernetes API


def k8s_status(code: int, reason: str, message: str, kind: str | None = "inferenceservices", name: str | None = None):
    details = {k: v for k, v in {"name": name, "group": "serving.kserve.io", "kind": kind}.items() if v}
    return code, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
                  "reason": reason, "details": details, "code": code}, JSON


class FakeKubeApi(_Server):
    """The inferenceservices resource of a Kubernetes API with KServe installed, from an in-memory dict.

    ``verbs``: what the caller may do per namespace (RBAC); ``ready_after``: GETs after a write before the
    controller reports Ready; ``conflicts``: how many writes meet a concurrent change (HTTP 409) first.
    """

    PATH = re.compile(r"/apis/serving\.kserve\.io/v1beta1/namespaces/([^/]+)/inferenceservices(?:/([^/]+))?")
    VERBS = {"GET": "get", "POST": "create", "PUT": "update"}

    def __init__(self, verbs: dict | None = None, ready_after: int = 2, conflicts: int = 0, installed: bool = True):
        super().__init__()
        handler = self.httpd.RequestHandlerClass
        handler.do_PUT = handler._serve  # replace, which the shared handler does not route
        self.verbs = verbs if verbs is not None else {"team-a": {"get", "create", "update"}}
        self.ready_after, self.conflicts, self.installed = ready_after, conflicts, installed
        self.objects: dict[tuple[str, str], dict] = {}
        self._version, self._polls = 100, {}

    def _next_version(self) -> str:
        self._version += 1
        return str(self._version)

    def handle(self, req: Recorded):
        if req.headers.get("authorization") != f"Bearer {KUBE_TOKEN}":
            return k8s_status(401, "Unauthorized", "Unauthorized", kind=None)
        match = self.PATH.fullmatch(req.path)
        if not match or not self.installed:
            return 404, b"404 page not found\n", "text/plain; charset=utf-8"
        namespace, name = match.groups()
        verb = self.VERBS[req.method]
        if verb not in self.verbs.get(namespace, ()):
            return k8s_status(403, "Forbidden", f'inferenceservices.serving.kserve.io "{name or ""}" is forbidden: '
                                                f'User "system:serviceaccount:ci:deployer" cannot {verb} resource '
                                                f'"inferenceservices" in API group "serving.kserve.io" in the '
                                                f'namespace "{namespace}"', name=name)
        key = (namespace, name or (req.body or {}).get("metadata", {}).get("name"))
        current = self.objects.get(key)
        if req.method == "GET":
            if current is None:
                return k8s_status(404, "NotFound", f'inferenceservices.serving.kserve.io "{name}" not found', name=name)
            self._polls[key] = self._polls.get(key, 0) + 1
            return 200, self._with_status(current, self._polls[key] >= self.ready_after), JSON
        if self.conflicts:
            self.conflicts -= 1
            if current is not None:  # someone else wrote meanwhile: the version moves on
                current["metadata"]["resourceVersion"] = self._next_version()
            return k8s_status(409, "Conflict", f'Operation cannot be fulfilled on inferenceservices.serving.kserve.io '
                                               f'"{key[1]}": the object has been modified', name=key[1])
        body = json.loads(json.dumps(req.body))
        if req.method == "POST":
            if current is not None:
                return k8s_status(409, "AlreadyExists", f'inferenceservices "{key[1]}" already exists', name=key[1])
            body["metadata"].update(namespace=namespace, uid=f"uid-{key[1]}", generation=1,
                                    resourceVersion=self._next_version(), creationTimestamp="2026-12-01T00:00:00Z")
        else:
            if current is None:
                return k8s_status(404, "NotFound", f'inferenceservices.serving.kserve.io "{name}" not found', name=name)
            if body["metadata"].get("resourceVersion") != current["metadata"]["resourceVersion"]:
                return k8s_status(409, "Conflict", "the object has been modified", name=name)
            changed = body["spec"] != current["spec"]
            body["metadata"].update(generation=current["metadata"]["generation"] + changed,
                                    resourceVersion=self._next_version())
        self.objects[key] = body
        self._polls[key] = 0
        return (201 if req.method == "POST" else 200), self._with_status(body, False), JSON

    @staticmethod
    def _with_status(obj: dict, ready: bool) -> dict:
        meta = obj["metadata"]
        name, namespace, generation = meta["name"], meta["namespace"], meta["generation"]
        if ready:
            status = {"observedGeneration": generation, "url": f"http://{name}.{namespace}.example.com",
                      "conditions": [{"type": "Ready", "status": "True"}]}
        else:
            status = {"observedGeneration": generation - 1, "conditions": [
                {"type": "Ready", "status": "False", "reason": "RevisionMissing",
                 "message": "Configuration is waiting for a Revision to become ready."}]}
        return dict(obj, status=status)


def write_kubeconfig(path, server: str, namespace: str | None = "team-a", token: str = KUBE_TOKEN):
    context = {"cluster": "loopback", "user": "deployer", **({"namespace": namespace} if namespace else {})}
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "loopback",
        "clusters": [{"name": "loopback", "cluster": {"server": server}}],
        "users": [{"name": "deployer", "user": {"token": token}}],
        "contexts": [{"name": "loopback", "context": context}]}))
    return path


def printed(result) -> str:
    return result.stdout + result.stderr


def test_kserve_dry_run_prints_the_object_and_contacts_nothing(tmp_path):
    with FakeKubeApi() as api:
        kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", api.url)
        result = run_deploy("--target", "kserve", "--model-uri", MODEL_URI, "--image", IMAGE, "--gpu",
                            "--kubeconfig", str(kubeconfig), "--dry-run")
        assert result.exit_code == 0, printed(result)
        plan = json.loads(result.stdout)
        assert plan["namespace"] == "team-a"  # the kubeconfig's context
        assert plan["path"] == "/apis/serving.kserve.io/v1beta1/namespaces/team-a/inferenceservices/captioner"
        assert plan["object"] == inference_service(IMAGE, MODEL_URI, gpu=True)

        result = run_deploy("--target", "kserve", "--model-uri", "pvc://models/captioning/v7", "--name", "cap-b",
                            "--api-server", api.url, "--namespace", "team-b", "--dry-run",
                            env={"KUBE_TOKEN": KUBE_TOKEN, "CAPTIONING_IMAGE": IMAGE})
        assert result.exit_code == 0, printed(result)
        plan = json.loads(result.stdout)
        assert (plan["namespace"], plan["auth"], plan["api_server"]) == ("team-b", "token", api.url)
        container = plan["object"]["spec"]["predictor"]["containers"][0]
        assert container["image"] == IMAGE and container["args"][container["args"].index("--name") + 1] == "cap-b"
        # the claim mounted read-only, no STORAGE_URI (no storage initializer)
        assert "env" not in container and container["args"][container["args"].index("--model") + 1] == \
            "/mnt/pvc/captioning/v7"
        assert plan["object"]["spec"]["predictor"]["volumes"] == [
            {"name": "model", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}}]
        assert KUBE_TOKEN not in printed(result)
        assert "kubernetes.podspec-persistent-volume-claim" in result.stderr  # what Knative needs for the claim

        # s3:// from KFP's store: read by the server, with the endpoint and the Secret's keys in its environment
        result = run_deploy("--target", "kserve", "--model-uri", "s3://mlpipeline/v2/artifacts/r/model",
                            "--s3-endpoint", "http://seaweedfs.kubeflow:9000", "--s3-secret",
                            "mlpipeline-minio-artifact", "--api-server", api.url, "--dry-run",
                            env={"KUBE_TOKEN": KUBE_TOKEN})
        assert result.exit_code == 0, printed(result)
        container = json.loads(result.stdout)["object"]["spec"]["predictor"]["containers"][0]
        assert container["args"][container["args"].index("--model") + 1] == "s3://mlpipeline/v2/artifacts/r/model"
        assert {e["name"]: e.get("value") or e["valueFrom"]["secretKeyRef"]["key"] for e in container["env"]} == {
            "AWS_ENDPOINT_URL": "http://seaweedfs.kubeflow:9000", "AWS_ACCESS_KEY_ID": "accesskey",
            "AWS_SECRET_ACCESS_KEY": "secretkey"}
        assert api.requests == []


def test_kserve_create_then_update_against_a_stand_in_kubernetes_api(tmp_path):
    with FakeKubeApi(ready_after=2) as api:
        kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", api.url)
        first = run_deploy("--target", "kserve", "--model-uri", MODEL_URI, "--kubeconfig", str(kubeconfig))
        assert first.exit_code == 0, printed(first)
        assert "inferenceservice: team-a/captioner created" in first.stdout
        assert [(r.method, r.path.rsplit("/", 1)[-1]) for r in api.requests] == [
            ("GET", "captioner"), ("POST", "inferenceservices")]
        assert api.requests[-1].body == inference_service(DEFAULT_IMAGE, MODEL_URI)
        stored = api.objects[("team-a", "captioner")]
        # What others add (KServe's webhook, kubectl annotate) must survive our update.
        stored["metadata"]["annotations"] = {"team.example.com/owner": "ml"}
        created_version = stored["metadata"]["resourceVersion"]

        api.requests.clear()
        second = run_deploy("--target", "kserve", "--model-uri", MODEL_URI, "--image", IMAGE, "--gpu",
                            "--api-server", api.url, "--token", KUBE_TOKEN, "--namespace", "team-a",
                            "--wait", "--poll-s", "0.01", "--timeout-s", "10")
        assert second.exit_code == 0, printed(second)
        assert "inferenceservice: team-a/captioner updated" in second.stdout
        assert "url: http://captioner.team-a.example.com" in second.stdout
        assert "state: RevisionMissing: Configuration is waiting" in second.stderr and "state: Ready" in second.stderr
        put = [r for r in api.requests if r.method == "PUT"]
        assert len(put) == 1 and len(api.objects) == 1
        assert put[0].body["metadata"]["resourceVersion"] == created_version  # optimistic concurrency
        assert put[0].body["metadata"]["annotations"] == {"team.example.com/owner": "ml"}
        assert put[0].body["spec"] == inference_service(IMAGE, MODEL_URI, gpu=True)["spec"]
        stored = api.objects[("team-a", "captioner")]
        assert stored["spec"]["predictor"]["containers"][0]["image"] == IMAGE
        assert stored["metadata"]["generation"] == 2 and stored["metadata"]["uid"] == "uid-captioner"
        assert all(r.headers.get("authorization") == f"Bearer {KUBE_TOKEN}" for r in api.requests)
        for result in (first, second):
            assert KUBE_TOKEN not in printed(result)


def test_kserve_update_retries_after_a_concurrent_change(tmp_path):
    with FakeKubeApi() as api:
        args = ("--target", "kserve", "--model-uri", MODEL_URI, "--api-server", api.url, "--namespace", "team-a")
        env = {"KUBE_TOKEN": KUBE_TOKEN}
        assert run_deploy(*args, env=env).exit_code == 0
        api.conflicts = 1
        result = run_deploy(*args, "--image", IMAGE, env=env)
        assert result.exit_code == 0, printed(result)
        methods = [r.method for r in api.requests[2:]]
        assert methods == ["GET", "PUT", "GET", "PUT"]  # read again, then written with the new resourceVersion
        assert api.objects[("team-a", "captioner")]["spec"]["predictor"]["containers"][0]["image"] == IMAGE


def test_kserve_errors_are_one_line_each(tmp_path):
    base = ("--target", "kserve", "--model-uri", MODEL_URI)
    with FakeKubeApi(verbs={"team-a": {"get", "create", "update"}, "read-only": {"get"}}) as api:
        line = one_line_error(run_deploy(*base, "--api-server", api.url, "--token", KUBE_TOKEN,
                                         "--namespace", "read-only"))
        assert "refused to create inferenceservices.serving.kserve.io 'captioner' in namespace 'read-only'" in line
        assert "HTTP 403" in line and "cannot create resource" in line
        line = one_line_error(run_deploy(*base, "--api-server", api.url, "--token", KUBE_TOKEN,
                                         "--namespace", "elsewhere"))
        assert "refused to get" in line and "'elsewhere'" in line

        wrong = "wrong-token-also-never-printed"
        result = run_deploy(*base, "--api-server", api.url, "--token", wrong, "--namespace", "team-a")
        line = one_line_error(result)
        assert "refused the credentials (HTTP 401, auth: token)" in line and wrong not in printed(result)

        kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", api.url)
        line = one_line_error(run_deploy("--target", "kserve", "--model-uri", "/home/me/model",
                                         "--kubeconfig", str(kubeconfig)))
        assert "--model-uri '/home/me/model'" in line and "not reachable from the cluster" in line
        line = one_line_error(run_deploy(*base, "--name", "Captioner_1", "--kubeconfig", str(kubeconfig)))
        assert "--name 'Captioner_1'" in line
        # what only KServe's storage initializer reads is refused (restricted namespaces refuse the initializer)
        line = one_line_error(run_deploy("--target", "kserve", "--model-uri", "https://h/model.zip",
                                         "--kubeconfig", str(kubeconfig)))
        assert "--model-uri 'https://h/model.zip'" in line and "storage initializer" in line
        s3 = ("--target", "kserve", "--model-uri", "s3://b/m", "--kubeconfig", str(kubeconfig))
        line = one_line_error(run_deploy(*s3, "--s3-endpoint", "seaweedfs.kubeflow:9000"))
        assert "--s3-endpoint 'seaweedfs.kubeflow:9000'" in line and "http(s)://HOST[:PORT]" in line
        line = one_line_error(run_deploy(*s3, "--s3-secret", "KFP_Secret"))
        assert "--s3-secret 'KFP_Secret'" in line
        line = one_line_error(run_deploy(*base, "--s3-secret", "mlpipeline-minio-artifact",
                                         "--kubeconfig", str(kubeconfig)))
        assert "for an s3:// model" in line
        assert not api.objects

    with FakeKubeApi(installed=False) as api:
        line = one_line_error(run_deploy(*base, "--api-server", api.url, "--token", KUBE_TOKEN))
        assert "HTTP 404" in line and "is KServe installed?" in line and "namespace 'default'" in line

    closed = closed_port_url()
    result = run_deploy(*base, "--kubeconfig", str(write_kubeconfig(tmp_path / "closed", closed)))
    assert one_line_error(result) == f"error: cannot reach the Kubernetes API at {closed}: connection refused"
    line = one_line_error(run_deploy(*base))
    assert "no Kubernetes API" in line and "--kubeconfig" in line
    line = one_line_error(run_deploy(*base, "--kubeconfig", str(tmp_path / "missing")))
    assert "--kubeconfig" in line and "no such file" in line
    line = one_line_error(run_deploy("--target", "knative", "--model-uri", MODEL_URI))
    assert "--target 'knative'" in line


# ------------------------------------------------------------------ a stand-in Vertex AI (REST)


class FakeVertexApi(_Server):
    """Vertex AI's models:upload, endpoints list/create/get and :deployModel over REST; long-running operations
    are answered done at once."""

    def __init__(self, project: str = "my-proj-1", region: str = "europe-west4", deny: bool = False):
        super().__init__()
        self.parent = f"projects/{project}/locations/{region}"
        self.deny = deny
        self.models: dict[str, dict] = {}
        self.endpoints: dict[str, dict] = {}
        self._ids = 1000

    def _id(self) -> str:
        self._ids += 1
        return str(self._ids)

    @staticmethod
    def _error(status: int, code: str, message: str):
        return status, {"error": {"code": status, "message": message, "status": code}}, JSON

    def _done(self, kind: str, response: dict):
        return 200, {"name": f"{self.parent}/operations/{self._id()}", "done": True,
                     "response": {"@type": f"type.googleapis.com/google.cloud.aiplatform.v1.{kind}", **response}}, JSON

    @staticmethod
    def _parse(request_type: str, req: Recorded) -> dict:
        """The body read as the API's own message (an unknown field fails), written back with enum names."""
        from google.cloud import aiplatform_v1
        from google.protobuf import json_format

        message = json_format.ParseDict(req.body, getattr(aiplatform_v1, request_type).pb()())
        req.body = json_format.MessageToDict(message)
        return req.body

    def handle(self, req: Recorded):
        if req.headers.get("authorization") != f"Bearer {GOOGLE_TOKEN}":
            return self._error(401, "UNAUTHENTICATED", "Request had invalid authentication credentials.")
        if self.deny:
            return self._error(403, "PERMISSION_DENIED", f"Permission 'aiplatform.models.upload' denied on resource "
                                                         f"'//aiplatform.googleapis.com/{self.parent}'")
        path = unquote(req.path)[len("/v1/"):].split("@")[0]  # models/ID@VERSION: one version here
        if req.method == "POST" and path == f"{self.parent}/models:upload":
            name = f"{self.parent}/models/{self._id()}"
            self.models[name] = dict(self._parse("UploadModelRequest", req)["model"], name=name, versionId="1",
                                     supportedDeploymentResourcesTypes=["DEDICATED_RESOURCES"])
            return self._done("UploadModelResponse", {"model": name, "modelVersionId": "1"})
        if req.method == "GET" and path in self.models:
            return 200, self.models[path], JSON
        if path == f"{self.parent}/endpoints" and req.method == "GET":
            wanted = re.fullmatch(r'display_name="(.*)"', (req.query.get("filter") or [""])[0])
            found = [e for e in self.endpoints.values() if not wanted or e["displayName"] == wanted.group(1)]
            return 200, {"endpoints": found} if found else {}, JSON
        if path == f"{self.parent}/endpoints" and req.method == "POST":
            name = f"{self.parent}/endpoints/{self._id()}"
            self.endpoints[name] = dict(self._parse("Endpoint", req), name=name, deployedModels=[], trafficSplit={})
            return self._done("Endpoint", self.endpoints[name])
        if req.method == "GET" and path in self.endpoints:
            return 200, self.endpoints[path], JSON
        if req.method == "POST" and path.endswith(":deployModel") and path[:-len(":deployModel")] in self.endpoints:
            endpoint = self.endpoints[path[:-len(":deployModel")]]
            self._parse("DeployModelRequest", req)
            deployed = dict(req.body["deployedModel"], id=self._id())
            endpoint["deployedModels"].append(deployed)
            endpoint["trafficSplit"] = {(deployed["id"] if k == "0" else k): v
                                        for k, v in req.body["trafficSplit"].items()}
            return self._done("DeployModelResponse", {"deployedModel": deployed})
        return self._error(404, "NOT_FOUND", f"no route {req.method} {req.path}")


def vertex_args(api_url: str | None, *extra: str) -> tuple:
    return ("--target", "vertex", "--model-uri", MODEL_URI, "--image", IMAGE, "--project", "my-proj-1",
            "--region", "europe-west4", *(("--api-endpoint", api_url) if api_url else ()), *extra)


def test_vertex_dry_run_prints_the_requests_and_contacts_nothing():
    with FakeVertexApi() as api:
        result = run_deploy(*vertex_args(api.url, "--gpu", "--dry-run"),
                            env={"GOOGLE_OAUTH_ACCESS_TOKEN": GOOGLE_TOKEN})
        assert result.exit_code == 0, printed(result)
        assert api.requests == [] and GOOGLE_TOKEN not in printed(result)
    plan = json.loads(result.stdout)
    assert plan["upload_model"]["parent"] == "projects/my-proj-1/locations/europe-west4"
    container = plan["upload_model"]["model"]["containerSpec"]
    assert container["imageUri"] == IMAGE and container["args"] == ["serve", "--name", "captioner"]
    assert (container["healthRoute"], container["predictRoute"]) == ("/health", "/predict")
    resources = plan["deploy_model"]["deployedModel"]["dedicatedResources"]
    assert resources["machineSpec"] == {"machineType": "g2-standard-8", "acceleratorType": "NVIDIA_L4",
                                        "acceleratorCount": 1}
    assert plan["deploy_model"]["trafficSplit"] == {"0": 100}
    cpu = json.loads(run_deploy(*vertex_args(None, "--dry-run", "--endpoint", "1234")).stdout)
    assert cpu["deploy_model"]["deployedModel"]["dedicatedResources"]["machineSpec"] == {"machineType": "n1-standard-4"}
    assert cpu["endpoint"] == {"reuse": "1234"}


def test_vertex_upload_and_deploy_against_a_stand_in_api():
    env = {"GOOGLE_OAUTH_ACCESS_TOKEN": GOOGLE_TOKEN}
    with FakeVertexApi() as api:
        plan = json.loads(run_deploy(*vertex_args(api.url, "--gpu", "--dry-run")).stdout)
        first = run_deploy(*vertex_args(api.url, "--gpu"), env=env)
        assert first.exit_code == 0, printed(first)
        (upload,) = [r for r in api.requests if r.path.endswith("/models:upload")]
        assert upload.body == {"model": plan["upload_model"]["model"]}  # the dry run shows what is sent
        (endpoint,) = api.endpoints.values()
        assert endpoint["displayName"] == "captioner"
        (deploy_call,) = [r for r in api.requests if r.path.endswith(":deployModel")]
        (model_name,) = api.models
        expected = json.loads(json.dumps(plan["deploy_model"]).replace(
            "projects/my-proj-1/locations/europe-west4/models/<the uploaded model>", model_name))
        assert deploy_call.body["deployedModel"]["model"].split("@")[0] == model_name
        deploy_call.body["deployedModel"]["model"] = model_name
        assert deploy_call.body == expected
        assert f"endpoint: {endpoint['name']}" in first.stdout
        assert f"predict_url: https://europe-west4-aiplatform.googleapis.com/v1/{endpoint['name']}:predict" in \
            first.stdout

        second = run_deploy(*vertex_args(api.url), env=env)  # a new model to the same endpoint, on CPUs
        assert second.exit_code == 0, printed(second)
        assert len(api.endpoints) == 1 and len(api.models) == 2
        assert sum(r.method == "POST" and r.path.endswith("/endpoints") for r in api.requests) == 1
        old, new = endpoint["deployedModels"]
        assert endpoint["trafficSplit"] == {new["id"]: 100}  # the old model stays deployed, with no traffic
        assert old["dedicatedResources"]["machineSpec"]["acceleratorType"] == "NVIDIA_L4"
        assert new["dedicatedResources"]["machineSpec"] == {"machineType": "n1-standard-4"}
        assert f"deployed_model_id: {new['id']}" in second.stdout
        assert all(r.headers.get("authorization") == f"Bearer {GOOGLE_TOKEN}" for r in api.requests)
        for result in (first, second):
            assert GOOGLE_TOKEN not in printed(result)


def test_vertex_errors_are_one_line_each():
    line = one_line_error(run_deploy("--target", "vertex", "--model-uri", MODEL_URI, "--image", IMAGE, "--dry-run"))
    assert "no Google Cloud project" in line
    line = one_line_error(run_deploy(*vertex_args(None, "--dry-run", "--model-uri", "s3://bucket/model")))
    assert "--model-uri 's3://bucket/model'" in line and "gs://" in line
    line = one_line_error(run_deploy(*vertex_args(None, "--dry-run", "--image", DEFAULT_IMAGE)))
    assert f"--image {DEFAULT_IMAGE}" in line and "registry" in line
    line = one_line_error(run_deploy(*vertex_args(None, "--dry-run", "--gpu", "--machine-type", "e2-standard-8")))
    assert "--machine-type e2-standard-8 with --gpu" in line
    with FakeVertexApi(deny=True) as api:
        result = run_deploy(*vertex_args(api.url), env={"GOOGLE_OAUTH_ACCESS_TOKEN": GOOGLE_TOKEN})
        line = one_line_error(result)
        assert "Vertex AI refused the request in my-proj-1/europe-west4 (FORBIDDEN)" in line  # HTTP 403 over REST
        assert "aiplatform.models.upload" in line and GOOGLE_TOKEN not in printed(result)


# ------------------------------------------------------------------ promote.deploy


def promote_step(cfg, model_dir, metrics, model_uri: str | None, scratch: Path):
    """The promote step as a pod runs it: its model artifact's URI is where the pipeline stored the model. Its
    scratch (W&B's run folder) is the test's own: the model folder is the session's, which other tests read."""
    from captioning.tracking import StepTracker
    from captioning.workflow import STEPS, StepIO

    io = StepIO(inputs={"model": model_dir, "metrics": metrics}, outputs={}, scratch=scratch,
                uris={"model": model_uri} if model_uri else {})
    with StepTracker(cfg, "promote", io.scratch) as tracker:
        return STEPS["promote"].run(cfg, io, tracker)


def test_a_promote_that_moves_the_alias_deploys_when_asked_and_only_then(promoted_model, tmp_path, monkeypatch):
    from captioning.config import load_config
    from captioning.errors import CaptioningError

    work = promoted_model["work"]
    model_dir, metrics = work / "train" / "model", work / "evaluate" / "metrics.json"
    with FakeKubeApi() as api:
        monkeypatch.setenv("KUBE_API_SERVER", api.url)
        monkeypatch.setenv("KUBE_TOKEN", KUBE_TOKEN)
        monkeypatch.setenv("CAPTIONING_IMAGE", IMAGE)
        monkeypatch.setenv("WANDB_MODE", "disabled")  # conftest's offline default would write runs

        def cfg(registry, *more):
            return load_config(overrides=[f"promote.registry={registry}", "wandb.mode=disabled",
                                          "promote.deploy_namespace=team-a", *more])

        # not asked: nothing contacted
        result = promote_step(cfg(tmp_path / "r0"), model_dir, metrics, "gs://b/run-1/model", tmp_path / "scratch")
        assert result.metrics["promoted"] and "deployed" not in result.extra and not api.requests

        # asked, and the alias moves: the InferenceService serves the model from the pipeline's store, at the
        # endpoint pipeline.py set for the release compiled for
        monkeypatch.setenv("CAPTIONING_KFP_STORE", "http://minio-service.kubeflow:9000")
        asked = cfg(tmp_path / "r1", "promote.deploy=kserve")
        result = promote_step(asked, model_dir, metrics, "minio://mlpipeline/v2/artifacts/run-1/train/model", tmp_path / "scratch")
        assert result.metrics["promoted"] and result.metrics["deployed"]
        assert result.extra["deployed"]["action"] == "created"
        (isvc,) = api.objects.values()
        container = isvc["spec"]["predictor"]["containers"][0]
        assert container["image"] == IMAGE
        # the server reads it from KFP's store with KFP's own Secret
        assert storage_uri(isvc) == "s3://mlpipeline/v2/artifacts/run-1/train/model"
        assert container["env"] == [
            {"name": "AWS_ENDPOINT_URL", "value": "http://minio-service.kubeflow:9000"},
            {"name": "AWS_ACCESS_KEY_ID",
             "valueFrom": {"secretKeyRef": {"name": "mlpipeline-minio-artifact", "key": "accesskey"}}},
            {"name": "AWS_SECRET_ACCESS_KEY",
             "valueFrom": {"secretKeyRef": {"name": "mlpipeline-minio-artifact", "key": "secretkey"}}}]
        writes = len(api.requests)

        # the same model again: the alias stays, nothing is deployed
        result = promote_step(asked, model_dir, metrics, "gs://b/run-2/model", tmp_path / "scratch")
        assert not result.metrics["promoted"] and result.metrics["deployed"] is False
        assert len(api.requests) == writes

        # a model the cluster cannot read is refused before anything is registered
        with pytest.raises(CaptioningError, match="promote.deploy=kserve: .*--model-uri"):
            promote_step(cfg(tmp_path / "r2", "promote.deploy=kserve"), model_dir, metrics, None, tmp_path / "scratch")
        assert not (tmp_path / "r2" / "captioning-model" / "versions").exists() or \
            not any((tmp_path / "r2" / "captioning-model" / "versions").glob("v*"))

        # a refused deployment says the alias moved and how to deploy by hand (with the store's endpoint and Secret)
        api.verbs = {"team-a": {"get"}}
        with pytest.raises(CaptioningError, match=r"deploy it with `captioning deploy --target kserve --model-uri "
                                                  r"s3://mlpipeline/r4/model --s3-endpoint http://minio-service."
                                                  r"kubeflow:9000 --s3-secret mlpipeline-minio-artifact`"):
            promote_step(cfg(tmp_path / "r4", "promote.deploy=kserve"), model_dir, metrics, "minio://mlpipeline/r4/model", tmp_path / "scratch")
        with pytest.raises(CaptioningError, match=r"the alias production moved to v1, but the deployment failed: "
                                                  r".*captioning deploy --target kserve --model-uri gs://b/run-3/model"):
            promote_step(cfg(tmp_path / "r3", "promote.deploy=kserve"), model_dir, metrics, "gs://b/run-3/model", tmp_path / "scratch")
