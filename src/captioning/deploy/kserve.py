"""KServe: the InferenceService running ``captioning serve``, created or updated through the Kubernetes API.

``inference_service`` is the one definition of the object. manifests/serving/ holds the same
object as YAML for ``kubectl apply -k`` (tests/test_deploy.py renders it and checks it equals
this function's output), because the command must work where no checkout is (the image, CI).

The API is reached like kubectl does: ``--kubeconfig`` (default ``KUBECONFIG`` or
~/.kube/config), else the pod's service account inside a cluster; ``--api-server`` and
``--token`` override the address and the credentials.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from captioning.deploy import DEFAULT_NAME, DEFAULT_PORT, LIVE_ROUTE, READY_ROUTE, DeployError
from captioning.submit.kubeflow import POD_NAMESPACE_FILE, _reason

GROUP, VERSION, PLURAL = "serving.kserve.io", "v1beta1", "inferenceservices"
# The server's own identity (manifests/serving/service-account.yaml): no Kubernetes API token, no RBAC; what
# reads the model from gs:// or s3:// is bound to it (Workload Identity, IRSA) or given by --s3-secret. Not the
# pipeline's captioning-runner, which can read the namespace's Secrets: a network-facing pod must not hold that.
SERVICE_ACCOUNT = "captioning-serving"
CONTAINER = "kserve-container"  # the container KServe routes to (and reads STORAGE_URI from, if set)
IMAGE_UID = 1000  # docker/Dockerfile: USER 1000:1000 (pipeline.IMAGE_UID)
GPU_RESOURCE = "nvidia.com/gpu"
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}  # pipeline.GPU_TOLERATION
RESOURCES = {"cpu": "2", "memory": "8Gi"}  # TensorFlow, the backbone and a batch of images
# Where the server finds the model, each without KServe's storage initializer: KServe injects that init container
# for STORAGE_URI without any securityContext (pkg/utils/storage.go), and a namespace enforcing Pod Security
# "restricted" refuses such a pod. The server reads gs:// and s3:// itself; a pvc:// claim is mounted read-only.
STORAGE_SCHEMES = ("gs://", "s3://", "pvc://")
# KFP's own Secret for its artifact store (backend/src/v2/config/env.go: mlpipeline-minio-artifact, keys accesskey
# and secretkey), present in each profile namespace; `--s3-secret` names one with the same keys.
S3_KEYS = {"AWS_ACCESS_KEY_ID": "accesskey", "AWS_SECRET_ACCESS_KEY": "secretkey"}
PVC_MOUNT = "/mnt/pvc"
NAME = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")  # a DNS-1035 label: it names Services and routes
SECRET_NAME = re.compile(r"[a-z0-9]([-.a-z0-9]{0,251}[a-z0-9])?")  # a DNS-1123 subdomain
TIMEOUT = (10, 60)  # connect, read seconds for each API call


@dataclass(frozen=True)
class S3Access:
    """How the server reaches an s3:// model: an S3-compatible endpoint (KFP's store) and a Secret holding the keys
    (``accesskey``, ``secretkey``); neither set: AWS S3 with the pod's own identity (IRSA)."""
    endpoint: str | None = None
    secret: str | None = None


@dataclass(frozen=True)
class KServeTarget:
    namespace: str | None = None
    kubeconfig: str | None = None
    api_server: str | None = None
    token: str | None = None


def inference_service(image: str, model_uri: str, name: str = DEFAULT_NAME, gpu: bool = False,
                      s3: S3Access = S3Access()) -> dict:
    """The InferenceService serving ``model_uri`` with ``image`` (manifests/serving/inferenceservice.yaml)."""

    def probe(path: str, initial: int, period: int, failures: int) -> dict:
        return {"httpGet": {"path": path, "port": DEFAULT_PORT}, "initialDelaySeconds": initial,
                "periodSeconds": period, "timeoutSeconds": 5, "failureThreshold": failures}

    model, extra, volumes = _model_source(model_uri, s3)
    container = {
        "name": CONTAINER, "image": image, "command": ["captioning"],
        "args": ["serve", "--model", model, "--name", name, "--port", str(DEFAULT_PORT)],
        **extra,
        "ports": [{"containerPort": DEFAULT_PORT, "protocol": "TCP"}],
        "readinessProbe": probe(READY_ROUTE, 30, 10, 3),  # loading TensorFlow and the model takes ~30-60 s
        "livenessProbe": probe(LIVE_ROUTE, 60, 15, 6),
        "resources": {"requests": dict(RESOURCES), "limits": {**RESOURCES, **({GPU_RESOURCE: 1} if gpu else {})}},
        # Pod Security "restricted" on the container: Knative (serverless mode) drops a pod-level one.
        "securityContext": {"runAsUser": IMAGE_UID, "runAsGroup": IMAGE_UID, "runAsNonRoot": True,
                            "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                            "seccompProfile": {"type": "RuntimeDefault"}},
    }
    predictor = {"serviceAccountName": SERVICE_ACCOUNT, "automountServiceAccountToken": False, "minReplicas": 1,
                 "containers": [container], **({"volumes": volumes} if volumes else {})}
    if gpu:
        predictor["tolerations"] = [dict(GPU_TOLERATION)]
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "InferenceService",
            "metadata": {"name": name, "labels": {"app.kubernetes.io/part-of": "captioning"}},
            "spec": {"predictor": predictor}}


def _model_source(model_uri: str, s3: S3Access) -> tuple[str, dict, list]:
    """``serve --model``'s value, the container's extra fields (env or volume mounts) and the pod's volumes."""
    if model_uri.startswith("pvc://"):
        claim, _, path = model_uri[len("pvc://"):].partition("/")
        mount = {"volumeMounts": [{"name": "model", "mountPath": PVC_MOUNT, "readOnly": True}]}
        volume = {"name": "model", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
        return f"{PVC_MOUNT}/{path}".rstrip("/"), mount, [volume]
    if model_uri.startswith("s3://") and (s3.endpoint or s3.secret):  # boto3's standard environment
        env = [{"name": "AWS_ENDPOINT_URL", "value": s3.endpoint}] if s3.endpoint else []
        env += [{"name": var, "valueFrom": {"secretKeyRef": {"name": s3.secret, "key": key}}}
                for var, key in S3_KEYS.items() if s3.secret]
        return model_uri, {"env": env}, []
    return model_uri, {}, []  # gs:// (Workload Identity, as on Vertex AI) or s3:// as the pod's identity


def serverless_note(model_uri: str) -> str | None:
    """What Knative (KServe's default Serverless mode) needs for the predictor, if anything."""
    if model_uri.startswith("pvc://"):
        return ("pvc://: in Serverless mode Knative admits a PersistentVolumeClaim volume only with "
                "kubernetes.podspec-persistent-volume-claim: enabled in its config-features ConfigMap; or annotate "
                "the InferenceService serving.kserve.io/deploymentMode: RawDeployment")
    return None


def check_request(model_uri: str, name: str, s3: S3Access = S3Access()) -> None:
    if not model_uri.startswith(STORAGE_SCHEMES) or not model_uri.split("://", 1)[1]:
        raise DeployError(f"--model-uri {model_uri!r}: the server reads the model from gs://BUCKET/PATH, "
                          "s3://BUCKET/PATH or pvc://CLAIM/PATH (http(s) and hdfs would need KServe's storage "
                          "initializer, which Pod Security \"restricted\" refuses); a local folder is not reachable "
                          "from the cluster")
    if (s3.endpoint or s3.secret) and not model_uri.startswith("s3://"):
        raise DeployError(f"--s3-endpoint and --s3-secret are for an s3:// model; --model-uri is {model_uri!r}")
    if s3.endpoint and not re.fullmatch(r"https?://[^/\s]+/?", s3.endpoint):
        raise DeployError(f"--s3-endpoint {s3.endpoint!r}: expected http(s)://HOST[:PORT], e.g. "
                          "http://seaweedfs.kubeflow:9000")
    if s3.secret and not SECRET_NAME.fullmatch(s3.secret):
        raise DeployError(f"--s3-secret {s3.secret!r}: not a Secret name (lower-case letters, digits, '-' and '.')")
    if not NAME.fullmatch(name):
        raise DeployError(f"--name {name!r}: expected lower-case letters, digits and '-', starting with a letter "
                          "(at most 63)")


def _kubeconfig(target: KServeTarget) -> str | None:
    """The kubeconfig to load: the one named, else (without --api-server) KUBECONFIG or ~/.kube/config if present."""
    if target.kubeconfig:
        if not Path(target.kubeconfig).is_file():
            raise DeployError(f"--kubeconfig {target.kubeconfig}: no such file")
        return target.kubeconfig
    if target.api_server:
        return None
    found = os.environ.get("KUBECONFIG") or str(Path("~/.kube/config").expanduser())
    return found if any(Path(p).is_file() for p in found.split(os.pathsep) if p) else None


def _in_cluster() -> bool:
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and Path(POD_NAMESPACE_FILE).is_file()


def resolve_namespace(target: KServeTarget) -> str:
    """--namespace, else the kubeconfig's current context's, else the pod's own, else "default" (reads files only)."""
    if target.namespace:
        return target.namespace
    kubeconfig = _kubeconfig(target)
    if kubeconfig:
        from kubernetes.config import ConfigException, list_kube_config_contexts

        try:
            _, current = list_kube_config_contexts(kubeconfig)
        except (ConfigException, OSError, ValueError) as exc:
            raise DeployError(f"--kubeconfig {kubeconfig}: {exc}") from None
        return ((current or {}).get("context") or {}).get("namespace") or "default"
    if not target.api_server and _in_cluster():
        return Path(POD_NAMESPACE_FILE).read_text().strip() or "default"
    return "default"


def auth_kind(target: KServeTarget) -> str:
    if target.token:
        return "token"
    kubeconfig = _kubeconfig(target)
    if kubeconfig:
        return f"kubeconfig {kubeconfig}"
    return "in-cluster service account" if not target.api_server and _in_cluster() else "none"


def configuration(target: KServeTarget):
    """A kubernetes.client.Configuration: kubeconfig or in-cluster, then --api-server and --token over it."""
    from kubernetes import client, config

    cfg = client.Configuration()
    kubeconfig = _kubeconfig(target)
    try:
        if kubeconfig:
            config.load_kube_config(config_file=kubeconfig, client_configuration=cfg, persist_config=False)
        elif not target.api_server and _in_cluster():
            config.load_incluster_config(client_configuration=cfg)
        elif not target.api_server:
            raise DeployError("no Kubernetes API: pass --kubeconfig, or --api-server URL with --token, or run "
                              "inside the cluster")
    except config.ConfigException as exc:
        raise DeployError(f"--kubeconfig {kubeconfig}: {exc}") from None
    if target.api_server:
        if not target.api_server.startswith(("http://", "https://")):
            raise DeployError(f"--api-server {target.api_server!r}: expected an https:// URL")
        cfg.host = target.api_server.rstrip("/")
    if target.token:
        cfg.api_key, cfg.api_key_prefix = {"authorization": f"Bearer {target.token}"}, {}
        cfg.refresh_api_key_hook = None  # a kubeconfig's exec plugin must not replace it
    cfg.retries = 0  # urllib3 would retry with a warning per try; the caller reruns (create-or-update is idempotent)
    return cfg


def dry_run_plan(obj: dict, target: KServeTarget) -> dict:
    """What ``apply`` would send, as JSON; contacts nothing (reads the kubeconfig's namespace only)."""
    namespace = resolve_namespace(target)
    return {"target": "kserve", "namespace": namespace, "api_server": target.api_server, "auth": auth_kind(target),
            "path": f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{obj['metadata']['name']}",
            "object": obj}


class _Conflict(DeployError):
    """HTTP 409: changed (or created) by someone else between our read and our write."""


class _Api:
    """CustomObjectsApi for inferenceservices in one namespace, each failure turned into one line."""

    def __init__(self, target: KServeTarget):
        from kubernetes import client

        self.target, self.cfg = target, configuration(target)
        self.namespace = resolve_namespace(target)
        self.api = client.CustomObjectsApi(client.ApiClient(self.cfg))

    def get(self, name: str) -> dict | None:
        return self._call("get", name, self.api.get_namespaced_custom_object, name)

    def create(self, obj: dict) -> dict:
        return self._call("create", obj["metadata"]["name"], self.api.create_namespaced_custom_object, obj)

    def update(self, obj: dict) -> dict:
        name = obj["metadata"]["name"]
        return self._call("update", name, self.api.replace_namespaced_custom_object, name, obj)

    def _call(self, verb: str, name: str, method: Callable, *args):
        import urllib3
        from kubernetes.client.exceptions import ApiException

        host, where = self.cfg.host, f"in namespace {self.namespace!r}"
        try:
            return method(GROUP, VERSION, self.namespace, PLURAL, *args, _request_timeout=TIMEOUT)
        except ApiException as exc:
            try:
                status = json.loads(exc.body or "{}")
            except (TypeError, ValueError):
                status = {}
            status = status if isinstance(status, dict) else {}
            message = str(status.get("message") or exc.reason or "").strip()
            message = message.splitlines()[0][:300] if message else ""
            if exc.status == 404 and verb == "get" and (status.get("details") or {}).get("kind") == PLURAL:
                return None  # the object is missing (not the API: that 404 has no Status body)
            if exc.status == 404:
                raise DeployError(f"the Kubernetes API at {host} has no {PLURAL}.{GROUP}/{VERSION} (HTTP 404 to "
                                  f"{verb} {name!r} {where}): is KServe installed?") from None
            if exc.status == 401:
                raise DeployError(f"the Kubernetes API at {host} refused the credentials (HTTP 401, auth: "
                                  f"{auth_kind(self.target)}): pass --token (or KUBE_TOKEN) or a working "
                                  "--kubeconfig") from None
            if exc.status == 403:
                raise DeployError(f"the Kubernetes API at {host} refused to {verb} {PLURAL}.{GROUP} {name!r} {where} "
                                  f"(HTTP 403): {message}; the caller needs a Role granting get, create and update "
                                  "on inferenceservices there, or pass --namespace") from None
            if exc.status == 409 and verb in ("create", "update"):
                raise _Conflict(f"InferenceService {self.namespace}/{name} changed while it was being "
                                f"{verb}d: {message}") from None
            raise DeployError(f"the Kubernetes API at {host} answered HTTP {exc.status} to {verb} InferenceService "
                              f"{name!r} {where}: {message}") from None
        except urllib3.exceptions.HTTPError as exc:
            raise DeployError(f"cannot reach the Kubernetes API at {host}: {_reason(exc)}") from None


def _replacement(current: dict, desired: dict) -> dict:
    """``desired`` under the current metadata: resourceVersion (so a concurrent change is a 409, not lost),
    and the labels and annotations others set, ours winning."""
    meta = {k: v for k, v in current.get("metadata", {}).items() if k != "managedFields"}
    for key in ("labels", "annotations"):
        merged = {**(meta.get(key) or {}), **(desired["metadata"].get(key) or {})}
        if merged:
            meta[key] = merged
    return {**desired, "metadata": meta}


def apply(obj: dict, target: KServeTarget, *, wait: bool = False, timeout_s: float = 900.0, poll_s: float = 5.0,
          on_state: Callable[[str], None] | None = None) -> dict:
    """Create the InferenceService, or replace its spec if it exists; with ``wait``, until it is Ready."""
    api = _Api(target)
    name = obj["metadata"]["name"]
    for _ in range(3):  # a 409 means someone else wrote in between: read again and retry
        current = api.get(name)
        try:
            written = api.create(obj) if current is None else api.update(_replacement(current, obj))
        except _Conflict:
            continue
        break
    else:
        raise DeployError(f"InferenceService {api.namespace}/{name} kept changing while it was being updated; "
                          "run the command again")
    outcome = {"action": "created" if current is None else "updated", "name": name, "namespace": api.namespace,
               "api_server": api.cfg.host, "ready": None, "url": (written.get("status") or {}).get("url")}
    if wait:
        ready = wait_ready(api, name, written.get("metadata", {}).get("generation"), timeout_s, poll_s, on_state)
        outcome.update(ready=True, url=(ready.get("status") or {}).get("url"))
    return outcome


def wait_ready(api: _Api, name: str, generation, timeout_s: float, poll_s: float, on_state) -> dict:
    """Poll until the condition Ready is True for the spec just written (observedGeneration caught up)."""
    deadline = time.monotonic() + timeout_s
    last = None
    while True:
        isvc = api.get(name) or {}
        status = isvc.get("status") or {}
        ready = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), {})
        current = generation is None or status.get("observedGeneration", 0) >= generation
        state = "Ready" if ready.get("status") == "True" and current else \
            ": ".join(x for x in (ready.get("reason") or "NotReady", ready.get("message")) if x)
        if state != last and on_state:
            on_state(state)
        last = state
        if state == "Ready":
            return isvc
        if time.monotonic() > deadline:
            raise DeployError(f"InferenceService {api.namespace}/{name} is not Ready after {timeout_s:.0f}s ({state}); "
                              f"see `kubectl -n {api.namespace} describe inferenceservice {name}`")
        time.sleep(poll_s)
