"""Submit to Vertex AI Pipelines through ``google.cloud.aiplatform.PipelineJob``.

Vertex runs no Kubernetes Secrets: the run gets the *name* of a Secret Manager
secret (the ``wandb_secret`` parameter) and each pod reads the W&B key with the
run's service account. The package must be compiled for Vertex, whose
accelerator names differ (``NVIDIA_L4``, not ``nvidia.com/gpu``).
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from captioning.errors import SubmitError

log = logging.getLogger(__name__)

DEFAULT_SECRET = "wandb-api-key"
TERMINAL_STATES = {"PIPELINE_STATE_SUCCEEDED", "PIPELINE_STATE_FAILED", "PIPELINE_STATE_CANCELLED"}


@dataclass(frozen=True)
class VertexTarget:
    project: str
    region: str
    pipeline_root: str
    service_account: str | None = None
    experiment: str | None = None
    run_name: str | None = None
    api_endpoint: str | None = None  # private service connect, or a test server
    labels: tuple[tuple[str, str], ...] = ()


def default_wandb_secret(project: str) -> str:
    return f"projects/{project}/secrets/{DEFAULT_SECRET}/versions/latest"


def check_target(target: VertexTarget) -> None:
    if not target.project:
        raise SubmitError("no Google Cloud project: pass --project or set GOOGLE_CLOUD_PROJECT")
    if not re.fullmatch(r"[a-z][a-z0-9-]{4,28}[a-z0-9]", target.project):
        raise SubmitError(f"--project {target.project!r}: not a Google Cloud project id")
    if not target.region or not re.fullmatch(r"[a-z]+-[a-z]+\d+", target.region):
        raise SubmitError(f"--region {target.region!r}: expected a Vertex AI region such as us-central1")
    if not target.pipeline_root.startswith("gs://") or len(target.pipeline_root) <= len("gs://"):
        raise SubmitError(f"--pipeline-root {target.pipeline_root!r}: Vertex AI needs a gs://BUCKET/PATH")
    if target.service_account and not re.fullmatch(r"[^@\s]+@[^@\s]+\.iam\.gserviceaccount\.com",
                                                   target.service_account):
        raise SubmitError(f"--service-account {target.service_account!r}: expected NAME@PROJECT.iam.gserviceaccount.com")


def build_job(package: Path, parameters: dict[str, Any], target: VertexTarget, credentials=None):
    """The ``PipelineJob`` (its ``_gca_resource`` is the create request's body); contacts nothing."""
    from google.cloud import aiplatform

    check_target(target)
    if target.api_endpoint:
        aiplatform.init(api_endpoint=target.api_endpoint, api_transport="rest")
    display_name = target.run_name or time.strftime("captioning-%Y%m%d-%H%M%S")
    job_id = re.sub(r"[^a-z0-9-]", "-", display_name.lower()).strip("-")[:100] or None
    try:
        job = aiplatform.PipelineJob(
            display_name=display_name, template_path=str(package), job_id=job_id,
            pipeline_root=target.pipeline_root, parameter_values=parameters, project=target.project,
            location=target.region, credentials=credentials, labels=dict(target.labels) or None)
    except Exception as exc:  # the SDK raises ValueError/google.auth errors with long texts
        raise SubmitError(_explain(exc, target)) from None
    if target.service_account:
        job._gca_resource.service_account = target.service_account  # as submit() does, so dry runs show it
    return job


def request_body(job) -> dict:
    """What ``submit`` sends: the PipelineJob resource as JSON (camelCase, as on the wire)."""
    from google.protobuf import json_format

    resource = job._gca_resource  # public gca_resource exists only once created
    return json_format.MessageToDict(type(resource).pb(resource))


def dry_run_plan(package: Path, parameters: dict[str, Any], target: VertexTarget) -> dict:
    """The ``PipelineJob`` create request that ``submit_vertex`` would send (without the spec); contacts nothing."""
    from google.auth.credentials import AnonymousCredentials

    job = build_job(package, parameters, target, credentials=AnonymousCredentials())
    body = request_body(job)
    body["pipelineSpec"] = f"<the pipeline spec in {package}>"
    return {"target": "vertex", "package": str(package), "project": target.project, "region": target.region,
            "experiment": target.experiment, "parent": job._parent, "pipeline_job_id": job.job_id, "request": body}


def submit_vertex(package: Path, parameters: dict[str, Any], target: VertexTarget, *, wait: bool = False,
                  timeout_s: float = 7 * 24 * 3600, poll_s: float = 30.0, access_token: str | None = None,
                  on_state: Callable[[str], None] | None = None) -> dict:
    """Submit; with ``wait``, follow the job to its end. No ``access_token``: application default credentials."""
    credentials = None
    if access_token:
        from google.oauth2.credentials import Credentials

        credentials = Credentials(token=access_token)
    job = build_job(package, parameters, target, credentials)
    logging.disable(logging.INFO)  # the SDK prints its own INFO lines to stdout; we print the outcome
    try:
        job.submit(service_account=target.service_account, experiment=target.experiment)
    except Exception as exc:
        raise SubmitError(_explain(exc, target)) from None
    finally:
        logging.disable(logging.NOTSET)
    outcome = {"job": job.resource_name, "url": job._dashboard_uri(), "state": None}
    if wait:
        deadline = time.monotonic() + timeout_s
        last = None
        while True:
            try:
                state = job.state.name
            except Exception as exc:
                raise SubmitError(_explain(exc, target)) from None
            if state != last and on_state:
                on_state(state)
            last = state
            if state in TERMINAL_STATES:
                break
            if time.monotonic() > deadline:
                raise SubmitError(f"{job.resource_name} is still {state} after {timeout_s:.0f}s")
            time.sleep(poll_s)
        outcome["state"] = state
    return outcome


def _explain(exc: Exception, target: VertexTarget) -> str:
    from google.api_core import exceptions as api
    from google.auth import exceptions as auth

    if isinstance(exc, auth.DefaultCredentialsError):
        return ("no Google credentials: run `gcloud auth application-default login` or set "
                "GOOGLE_APPLICATION_CREDENTIALS to a service account key file")
    if isinstance(exc, auth.RefreshError):
        return (f"Vertex AI refused the credentials for project {target.project} and they cannot be refreshed: "
                "get a new token (`gcloud auth print-access-token`) or use application default credentials")
    if isinstance(exc, (api.Unauthenticated, api.PermissionDenied, api.Unauthorized, api.Forbidden)):
        return (f"Vertex AI refused the request in project {target.project} ({exc.code.name if exc.code else ''}): "
                f"{_first_line(exc.message)}; the caller needs roles/aiplatform.user and actAs on the service account")
    if isinstance(exc, api.NotFound):
        return f"Vertex AI: not found in {target.project}/{target.region}: {_first_line(exc.message)}"
    if isinstance(exc, api.GoogleAPICallError):
        return f"Vertex AI answered {exc.code.name if exc.code else exc.code}: {_first_line(exc.message)}"
    return f"Vertex AI submission failed: {type(exc).__name__}: {_first_line(str(exc))}"


def _first_line(text: str | None) -> str:
    return (text or "").strip().splitlines()[0][:300] if (text or "").strip() else ""
