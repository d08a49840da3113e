"""Loopback stand-ins for the cloud APIs that cannot run here, each recording what it is sent.

- ``FakeKfpApi``: the parts of the Kubeflow Pipelines v2beta1 REST API that
  ``kfp.Client`` uses (healthz, experiments list/create, runs create/get).
- ``FakeGoogleApis``: an OAuth token endpoint, Vertex AI's ``pipelineJobs``
  create/get and Secret Manager's ``versions:access`` (REST transport).

They answer with the shapes the real servers use, and only what the tests need.
"""

from __future__ import annotations

import base64
import json
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


@dataclass
class Recorded:
    method: str
    path: str
    query: dict
    headers: dict
    body: dict | None
    raw: bytes = b""


class _Server:
    """A ThreadingHTTPServer on 127.0.0.1 whose handler calls ``self.handle(req) -> (status, obj)``."""

    def __init__(self):
        self.requests: list[Recorded] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _serve(self):
                parts = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = None
                headers = {k.lower(): v for k, v in self.headers.items()}  # HTTP header names ignore case
                req = Recorded(self.command, parts.path, parse_qs(parts.query), headers, body, raw)
                with server._lock:
                    server.requests.append(req)
                    status, payload, content_type = server.handle(req)
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = do_PATCH = _serve

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    def handle(self, req: Recorded):  # pragma: no cover - overridden
        raise NotImplementedError

    def all_text(self) -> str:
        """Everything the clients sent (paths, headers, bodies): for 'no secret was sent' checks."""
        return "\n".join(f"{r.method} {r.path} {r.query} {r.headers} {r.raw.decode(errors='replace')}"
                         for r in self.requests)


JSON = "application/json"


@dataclass
class KfpBehaviour:
    token: str | None = None  # when set, requests need "Authorization: Bearer <token>"
    cookie: str | None = None  # when set, requests need this "name=value" in their Cookie header
    multi_user: bool = False
    namespaces: tuple[str, ...] = ("team-a",)  # profiles the caller may use (multi-user)
    run_states: list[str] = field(default_factory=lambda: ["RUNNING", "SUCCEEDED"])
    login_page: bool = False  # answer like a Dex/oauth2-proxy front: 200 with HTML


class FakeKfpApi(_Server):
    """Stand-in for a Kubeflow Pipelines API server (no Kubeflow backend can run here)."""

    def __init__(self, behaviour: KfpBehaviour | None = None):
        super().__init__()
        self.behaviour = behaviour or KfpBehaviour()
        self.experiments: dict[str, dict] = {}
        self.runs: dict[str, dict] = {}
        self._run_polls: dict[str, int] = {}

    def _error(self, status: int, message: str):
        code = {401: 16, 403: 7, 404: 5, 400: 3}.get(status, 2)
        return status, {"error_message": message, "code": code, "message": message, "details": []}, JSON

    def handle(self, req: Recorded):
        b = self.behaviour
        if b.login_page:
            return 200, b"<html><body>Log in to Kubeflow</body></html>", "text/html"
        path = req.path.rstrip("/")
        if req.method == "GET" and path == "/apis/v2beta1/healthz":  # unauthenticated, as in KFP
            return 200, {"multi_user": b.multi_user, "pipeline_store": "database"}, JSON
        if b.token and req.headers.get("authorization") != f"Bearer {b.token}":
            return self._error(401, "Unauthenticated: the request carries no valid token")
        if b.cookie and b.cookie not in [c.strip() for c in req.headers.get("cookie", "").split(";")]:
            return self._error(401, "Unauthenticated: no session cookie")
        if path == "/apis/v2beta1/experiments":
            namespace = (req.query.get("namespace") or [""])[0] if req.method == "GET" else \
                (req.body or {}).get("namespace", "")
            if b.multi_user and namespace not in b.namespaces:
                return self._error(403, f"Failed to authorize with API: PermissionDenied: User is not authorized "
                                        f"to access namespace '{namespace}'")
            if req.method == "GET":
                return 200, self._list_experiments(req, namespace), JSON
            if req.method == "POST":
                exp = {"experiment_id": str(uuid.uuid4()), "display_name": req.body["display_name"],
                       "namespace": namespace, "created_at": "2026-11-30T00:00:00Z", "storage_state": "AVAILABLE"}
                self.experiments[exp["experiment_id"]] = exp
                return 200, exp, JSON
        if req.method == "POST" and path == "/apis/v2beta1/runs":
            run = dict(req.body, run_id=str(uuid.uuid4()), state="PENDING", created_at="2026-11-30T00:00:00Z")
            if run.get("experiment_id") not in self.experiments:
                return self._error(404, f"Experiment {run.get('experiment_id')} not found")
            self.runs[run["run_id"]] = run
            return 200, run, JSON
        if req.method == "GET" and path.startswith("/apis/v2beta1/runs/"):
            run_id = path.rsplit("/", 1)[1]
            if run_id not in self.runs:
                return self._error(404, f"Run {run_id} not found")
            polls = self._run_polls.get(run_id, 0)
            self._run_polls[run_id] = polls + 1
            states = b.run_states
            run = dict(self.runs[run_id], state=states[min(polls, len(states) - 1)])
            return 200, run, JSON
        return self._error(404, f"no route {req.method} {path}")

    def _list_experiments(self, req: Recorded, namespace: str) -> dict:
        wanted = None
        if req.query.get("filter"):
            for pred in json.loads(req.query["filter"][0]).get("predicates", []):
                if pred.get("key") == "display_name":
                    wanted = pred.get("stringValue") or pred.get("string_value")
        found = [e for e in self.experiments.values()
                 if (wanted is None or e["display_name"] == wanted) and (not namespace or e["namespace"] == namespace)]
        return {"experiments": found, "total_size": len(found)} if found else {}


class FakeGoogleApis(_Server):
    """Stand-in for Google's OAuth token endpoint, Vertex AI pipelineJobs and Secret Manager (REST)."""

    ACCESS_TOKEN = "ya29.loopback-access-token"

    def __init__(self, secrets: dict[str, str] | None = None, job_states: list[str] | None = None,
                 deny_secrets: tuple[str, ...] = ()):
        super().__init__()
        self.secrets = secrets or {}
        self.deny_secrets = deny_secrets
        self.job_states = job_states or ["PIPELINE_STATE_RUNNING", "PIPELINE_STATE_SUCCEEDED"]
        self.jobs: dict[str, dict] = {}
        self._polls: dict[str, int] = {}

    def _error(self, status: int, grpc_status: str, message: str):
        return status, {"error": {"code": status, "message": message, "status": grpc_status}}, JSON

    def handle(self, req: Recorded):
        path = req.path
        if req.method == "POST" and path == "/token":
            return 200, {"access_token": self.ACCESS_TOKEN, "expires_in": 3600, "token_type": "Bearer"}, JSON
        if path.endswith(":access"):  # Secret Manager: GET /v1/{name=projects/*/secrets/*/versions/*}:access
            name = path[len("/v1/"):-len(":access")]
            if name in self.deny_secrets:
                return self._error(403, "PERMISSION_DENIED", f"Permission 'secretmanager.versions.access' denied "
                                                              f"for resource '{name}'")
            if name not in self.secrets:
                return self._error(404, "NOT_FOUND", f"Secret Version [{name}] not found.")
            data = base64.b64encode(self.secrets[name].encode()).decode()
            return 200, {"name": name, "payload": {"data": data}}, JSON
        if "/pipelineJobs" in path:
            if req.headers.get("authorization") != f"Bearer {self.ACCESS_TOKEN}":
                return self._error(401, "UNAUTHENTICATED", "Request had invalid authentication credentials.")
            if req.method == "POST":
                job_id = req.query.get("pipelineJobId", ["generated"])[0]
                name = f"{path[len('/v1/'):]}/{job_id}"
                job = dict(req.body, name=name, state="PIPELINE_STATE_PENDING", createTime="2026-11-30T00:00:00Z")
                self.jobs[name] = job
                return 200, job, JSON
            if req.method == "GET":
                name = path[len("/v1/"):]
                if name not in self.jobs:
                    return self._error(404, "NOT_FOUND", f"PipelineJob {name} not found")
                polls = self._polls.get(name, 0)
                self._polls[name] = polls + 1
                return 200, dict(self.jobs[name], state=self.job_states[min(polls, len(self.job_states) - 1)]), JSON
        return self._error(404, "NOT_FOUND", f"no route {req.method} {path}")
