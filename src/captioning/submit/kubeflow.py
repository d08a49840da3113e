"""Submit to Kubeflow Pipelines through ``kfp.Client`` (the v2beta1 REST API).

Before the client is built, one ``GET /apis/v2beta1/healthz`` with the same
credentials turns the usual failures (nothing listening, a login page, 401/403,
a multi-user cluster without a namespace) into one clear line each; the
client itself would retry for half a minute and print tracebacks.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import requests

from captioning.errors import SubmitError

log = logging.getLogger(__name__)

DEFAULT_SERVICE_ACCOUNT = "captioning-runner"  # from manifests/base
IN_CLUSTER_HOST = "http://ml-pipeline.kubeflow.svc.cluster.local:8888"
# Where Kubeflow mounts a projected token for pods that may call the KFP API (PodDefault
# "access-ml-pipeline"); kfp's ServiceAccountTokenVolumeCredentials reads the same variable.
SA_TOKEN_PATH_ENV = "KF_PIPELINES_SA_TOKEN_PATH"
SA_TOKEN_PATH = "/var/run/secrets/kubeflow/pipelines/token"
POD_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
TERMINAL_STATES = {"SUCCEEDED", "FAILED", "SKIPPED", "CANCELED"}


@dataclass(frozen=True)
class KubeflowTarget:
    host: str | None = None
    namespace: str | None = None
    token: str | None = None
    cookie: str | None = None
    experiment: str = "captioning"
    run_name: str | None = None
    pipeline_root: str | None = None
    service_account: str | None = None
    ui_host: str | None = None


@dataclass(frozen=True)
class Auth:
    kind: str  # token | cookie | in-cluster service account | none
    token: str | None = None
    cookie: str | None = None
    token_path: str | None = None

    def headers(self) -> dict[str, str]:
        token = self.token or (Path(self.token_path).read_text().strip() if self.token_path else None)
        return {"Authorization": f"Bearer {token}"} if token else {}


def resolve_auth(target: KubeflowTarget) -> Auth:
    if target.token:
        return Auth("token", token=target.token)
    if target.cookie:
        return Auth("cookie", cookie=target.cookie)
    path = os.environ.get(SA_TOKEN_PATH_ENV, SA_TOKEN_PATH)
    if Path(path).is_file():
        return Auth("in-cluster service account", token_path=path)
    return Auth("none")


def resolve_host(target: KubeflowTarget) -> str:
    host = target.host or os.environ.get("KF_PIPELINES_ENDPOINT")
    if not host:
        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            return IN_CLUSTER_HOST
        raise SubmitError("no KFP host: pass --host URL or set KF_PIPELINES_ENDPOINT (for example "
                          "http://localhost:8080 after `kubectl -n kubeflow port-forward svc/ml-pipeline-ui 8080:80`)")
    if not host.startswith(("http://", "https://")):
        raise SubmitError(f"--host {host!r}: expected an http:// or https:// URL")
    return host.rstrip("/")


def resolve_namespace(target: KubeflowTarget) -> str | None:
    if target.namespace:
        return target.namespace
    if Path(POD_NAMESPACE_FILE).is_file() and os.environ.get("KUBERNETES_SERVICE_HOST"):
        return Path(POD_NAMESPACE_FILE).read_text().strip() or None
    return None


def check_endpoint(host: str, auth: Auth, namespace: str | None, timeout_s: float = 15.0) -> dict:
    """``GET /apis/v2beta1/healthz``: the KFP API is there and takes these credentials."""
    url = f"{host}/apis/v2beta1/healthz"
    cookies = _cookie_dict(auth.cookie)
    try:
        resp = requests.get(url, headers=auth.headers(), cookies=cookies, timeout=timeout_s, allow_redirects=False)
    except requests.ConnectionError as exc:
        raise SubmitError(f"cannot reach the KFP API at {host}: {_reason(exc)}") from None
    except requests.Timeout:
        raise SubmitError(f"the KFP API at {host} did not answer within {timeout_s:.0f}s") from None
    if resp.status_code in (401, 403):
        raise SubmitError(f"{host} refused the credentials (HTTP {resp.status_code}, auth: {auth.kind}): "
                          "pass --token (or KF_PIPELINES_TOKEN) or --cookie authservice_session=...")
    if resp.status_code in (301, 302, 303, 307, 308):
        raise SubmitError(f"{host} redirects to {resp.headers.get('Location', '?')} (a login page): "
                          "pass --cookie authservice_session=... or --token")
    if resp.status_code != 200:
        raise SubmitError(f"{url} answered HTTP {resp.status_code}: is {host} a Kubeflow Pipelines endpoint?")
    try:
        health = resp.json()
    except ValueError:
        raise SubmitError(f"{url} answered with {resp.headers.get('Content-Type', 'no type')}, not the KFP API "
                          "(a login page?): pass --cookie or --token, or point --host at the pipelines API") from None
    if health.get("multi_user") and not namespace:
        raise SubmitError(f"{host} is a multi-user Kubeflow: pass --namespace (your profile's namespace)")
    return health


def dry_run_plan(package: Path, parameters: dict[str, Any], target: KubeflowTarget) -> dict:
    """What ``submit_kubeflow`` would send, as JSON; contacts nothing (and needs no host)."""
    return {"target": "kubeflow", "package": str(package), "host": resolve_host(target) if target.host else None,
            "namespace": resolve_namespace(target), "auth": resolve_auth(target).kind,
            "experiment": target.experiment, "run_name": target.run_name, "pipeline_root": target.pipeline_root,
            "service_account": target.service_account, "parameters": parameters}


def submit_kubeflow(package: Path, parameters: dict[str, Any], target: KubeflowTarget, *, wait: bool = False,
                    timeout_s: float = 7 * 24 * 3600, poll_s: float = 10.0,
                    on_state: Callable[[str], None] | None = None) -> dict:
    """Create (or reuse) the experiment and the run; with ``wait``, follow it to its end."""
    import kfp
    import urllib3
    from kfp_server_api import ApiException

    host = resolve_host(target)
    auth = resolve_auth(target)
    namespace = resolve_namespace(target)
    check_endpoint(host, auth, namespace)

    credentials = None
    if auth.token_path:
        from kfp.client.set_volume_credentials import ServiceAccountTokenVolumeCredentials

        credentials = ServiceAccountTokenVolumeCredentials(auth.token_path)
    printed = io.StringIO()  # kfp prints its own links; ours follow
    with warnings.catch_warnings(), contextlib.redirect_stdout(printed):
        warnings.simplefilter("ignore", FutureWarning)
        try:
            client = kfp.Client(host=host, namespace=namespace or "kubeflow", existing_token=auth.token,
                                cookies=auth.cookie, credentials=credentials, ui_host=target.ui_host)
            result = client.create_run_from_pipeline_package(
                str(package), arguments=parameters, run_name=target.run_name or _default_run_name(),
                experiment_name=target.experiment, namespace=namespace, pipeline_root=target.pipeline_root,
                service_account=target.service_account or None)
        except ApiException as exc:
            raise SubmitError(_api_error(exc, host, namespace, target.experiment)) from None
        except urllib3.exceptions.HTTPError as exc:
            raise SubmitError(f"lost the KFP API at {host}: {_reason(exc)}") from None
    log.debug("kfp: %s", printed.getvalue().strip())
    run_id = result.run_id
    url = f"{(target.ui_host or host).rstrip('/')}/#/runs/details/{run_id}"
    outcome = {"run_id": run_id, "url": url, "state": None, "experiment": target.experiment,
               "namespace": namespace}
    if wait:
        outcome["state"] = follow_run(client, run_id, timeout_s, poll_s, on_state, host, namespace)
    return outcome


def follow_run(client, run_id: str, timeout_s: float, poll_s: float, on_state, host: str, namespace) -> str:
    from kfp_server_api import ApiException

    deadline = time.monotonic() + timeout_s
    last = None
    while True:
        try:
            state = str(client.get_run(run_id).state or "PENDING")
        except ApiException as exc:
            raise SubmitError(_api_error(exc, host, namespace, None)) from None
        if state != last and on_state:
            on_state(state)
        last = state
        if state in TERMINAL_STATES:
            return state
        if time.monotonic() > deadline:
            raise SubmitError(f"run {run_id} is still {state} after {timeout_s:.0f}s")
        time.sleep(poll_s)


def _default_run_name() -> str:
    return time.strftime("captioning-%Y%m%d-%H%M%S")


def _cookie_dict(cookie: str | None) -> dict[str, str]:
    out = {}
    for part in (cookie or "").split(";"):
        if "=" in part:
            name, value = part.strip().split("=", 1)
            out[name] = value
    return out


def _reason(exc: Exception) -> str:
    text = str(exc)
    for known in ("Connection refused", "Name or service not known", "No route to host", "timed out"):
        if known in text:
            return known.lower()
    return text.splitlines()[0][:200]


def _api_error(exc, host: str, namespace: str | None, experiment: str | None) -> str:
    """One line from a kfp_server_api.ApiException: status, what was refused, the server's message."""
    message = ""
    try:
        body = json.loads(exc.body or "{}")
        message = body.get("message") or body.get("error_message") or ""
    except (TypeError, ValueError):
        message = (exc.body or "")[:200] if isinstance(exc.body, str) else ""
    message = message.strip().splitlines()[0] if message.strip() else str(exc.reason or "")
    status = exc.status
    if not status:
        return f"cannot reach the KFP API at {host}: {_reason(exc)}"
    if status in (401, 403):
        where = f" in namespace {namespace!r}" if namespace else ""
        return (f"KFP at {host} refused the request{where} (HTTP {status}): {message}; check --namespace "
                "(a profile you can use) and the credentials")
    if status == 404 and namespace:
        return f"KFP at {host}: not found (HTTP 404) in namespace {namespace!r}: {message}"
    return f"KFP at {host} answered HTTP {status}: {message}"
