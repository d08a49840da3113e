"""Vertex AI: upload the model with the image as its custom container, then deploy it to an Endpoint.

Vertex copies ``--model-uri``'s files and tells the container where they are (``AIP_STORAGE_URI``),
its port (``AIP_HTTP_PORT``) and its routes (``AIP_HEALTH_ROUTE``, ``AIP_PREDICT_ROUTE``);
``captioning serve`` reads all four, so the container runs ``captioning serve --name NAME``.
An Endpoint with the same display name is reused: the new model takes all its traffic (the
models deployed there before stay deployed, with none).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Callable

from captioning.deploy import DEFAULT_PORT, VERTEX_HEALTH_ROUTE, VERTEX_PREDICT_ROUTE, DeployError
from captioning.deploy.kserve import NAME

# Machine families and the GPU each carries (one per replica: the server uses one device).
ACCELERATORS = {"g2-": "NVIDIA_L4", "n1-": "NVIDIA_TESLA_T4", "a2-highgpu-": "NVIDIA_TESLA_A100",
                "a2-ultragpu-": "NVIDIA_A100_80GB", "a3-highgpu-": "NVIDIA_H100_80GB"}
GPU_MACHINE, CPU_MACHINE = "g2-standard-8", "n1-standard-4"
ENDPOINT_ID = re.compile(r"projects/[^/]+/locations/[^/]+/endpoints/[^/]+|\d+")  # else a display name


@dataclass(frozen=True)
class VertexDeployTarget:
    project: str
    region: str = "us-central1"
    machine_type: str | None = None
    gpu: bool = False
    endpoint: str | None = None  # an Endpoint's resource name or id, or a display name (default: --name)
    api_endpoint: str | None = None  # private service connect, or a test server


def machine(target: VertexDeployTarget) -> tuple[str, str | None, int | None]:
    """(machine type, accelerator type, accelerator count) of each replica."""
    machine_type = target.machine_type or (GPU_MACHINE if target.gpu else CPU_MACHINE)
    if not target.gpu:
        return machine_type, None, None
    accelerator = next((a for prefix, a in ACCELERATORS.items() if machine_type.startswith(prefix)), None)
    if accelerator is None:
        raise DeployError(f"--machine-type {machine_type} with --gpu: choose a GPU machine "
                          f"({', '.join(p + '*' for p in ACCELERATORS)}) or --no-gpu")
    return machine_type, accelerator, 1


def check_request(image: str, model_uri: str, name: str, target: VertexDeployTarget) -> None:
    if not target.project:
        raise DeployError("no Google Cloud project: pass --project or set GOOGLE_CLOUD_PROJECT")
    if not re.fullmatch(r"[a-z][a-z0-9-]{4,28}[a-z0-9]", target.project):
        raise DeployError(f"--project {target.project!r}: not a Google Cloud project id")
    if not target.region or not re.fullmatch(r"[a-z]+-[a-z]+\d+", target.region):
        raise DeployError(f"--region {target.region!r}: expected a Vertex AI region such as us-central1")
    if not re.fullmatch(r"gs://[a-z0-9][-_.a-z0-9]{1,221}[a-z0-9](/.*)?", model_uri):
        raise DeployError(f"--model-uri {model_uri!r}: Vertex AI copies the model from gs://BUCKET/PATH")
    if "/" not in image or not re.search(r"[.:]|^localhost$", image.split("/", 1)[0]):
        raise DeployError(f"--image {image}: Vertex AI pulls from a registry (Artifact Registry: "
                          "REGION-docker.pkg.dev/PROJECT/REPO/captioning:TAG); push it with "
                          "`captioning image build --push` and pass what it prints")
    if not NAME.fullmatch(name):
        raise DeployError(f"--name {name!r}: expected lower-case letters, digits and '-', starting with a letter")
    machine(target)


def upload_kwargs(image: str, model_uri: str, name: str) -> dict:
    """``aiplatform.Model.upload``'s arguments: the container and where its model comes from."""
    return {"display_name": name, "artifact_uri": model_uri, "serving_container_image_uri": image,
            "serving_container_command": ["captioning"], "serving_container_args": ["serve", "--name", name],
            "serving_container_predict_route": VERTEX_PREDICT_ROUTE,
            "serving_container_health_route": VERTEX_HEALTH_ROUTE, "serving_container_ports": [DEFAULT_PORT]}


def deploy_kwargs(name: str, target: VertexDeployTarget) -> dict:
    """``Endpoint.deploy``'s arguments: one replica of one machine, all the endpoint's traffic."""
    machine_type, accelerator_type, accelerator_count = machine(target)
    return {"deployed_model_display_name": name, "machine_type": machine_type, "accelerator_type": accelerator_type,
            "accelerator_count": accelerator_count, "min_replica_count": 1, "max_replica_count": 1,
            "traffic_percentage": 100}


def dry_run_plan(image: str, model_uri: str, name: str, target: VertexDeployTarget) -> dict:
    """The REST requests ``deploy_vertex`` sends (their bodies as on the wire); contacts nothing."""
    check_request(image, model_uri, name, target)
    up, dep = upload_kwargs(image, model_uri, name), deploy_kwargs(name, target)
    parent = f"projects/{target.project}/locations/{target.region}"
    spec = {"machineType": dep["machine_type"]}
    if dep["accelerator_type"]:
        spec.update(acceleratorType=dep["accelerator_type"], acceleratorCount=dep["accelerator_count"])
    wanted = target.endpoint or name
    return {
        "target": "vertex", "project": target.project, "region": target.region,
        "upload_model": {"parent": parent, "model": {
            "displayName": up["display_name"], "artifactUri": up["artifact_uri"],
            "containerSpec": {"imageUri": image, "command": up["serving_container_command"],
                              "args": up["serving_container_args"],
                              "ports": [{"containerPort": p} for p in up["serving_container_ports"]],
                              "predictRoute": up["serving_container_predict_route"],
                              "healthRoute": up["serving_container_health_route"]},
            "versionAliases": ["default"]}},
        "endpoint": {"reuse": wanted} if ENDPOINT_ID.fullmatch(wanted) else
                    {"display_name": wanted, "note": "reused if one endpoint has this display name, else created"},
        "deploy_model": {"deployedModel": {
            "model": f"{parent}/models/<the uploaded model>", "displayName": dep["deployed_model_display_name"],
            "dedicatedResources": {"machineSpec": spec, "minReplicaCount": dep["min_replica_count"],
                                   "maxReplicaCount": dep["max_replica_count"]}},
            "trafficSplit": {"0": dep["traffic_percentage"]}},
    }


def deploy_vertex(image: str, model_uri: str, name: str, target: VertexDeployTarget, *,
                  access_token: str | None = None, on_step: Callable[[str], None] | None = None) -> dict:
    """Upload, find or create the endpoint, deploy. No ``access_token``: application default credentials."""
    from google.cloud import aiplatform

    check_request(image, model_uri, name, target)
    step = on_step or (lambda _: None)
    credentials = None
    if access_token:
        from google.oauth2.credentials import Credentials

        credentials = Credentials(token=access_token)
    # Also globally: Model.upload reads the uploaded model back with the global credentials, not its own.
    aiplatform.init(project=target.project, location=target.region, credentials=credentials,
                    **({"api_endpoint": target.api_endpoint, "api_transport": "rest"} if target.api_endpoint else {}))
    where = {"project": target.project, "location": target.region, "credentials": credentials}
    logging.disable(logging.INFO)  # the SDK prints its own INFO lines to stdout; we print the outcome
    try:
        model = aiplatform.Model.upload(**upload_kwargs(image, model_uri, name), **where, sync=True)
        step(f"model: {model.resource_name}")
        endpoint, created = _endpoint(aiplatform, target.endpoint or name, target, where)
        step(f"endpoint: {endpoint.resource_name} ({'created' if created else 'reused'})")
        endpoint.deploy(model=model, **deploy_kwargs(name, target), sync=True)
        deployed = [m.id for m in endpoint.list_models() if m.model.split("@")[0] == model.resource_name]
    except DeployError:
        raise
    except Exception as exc:  # the SDK raises ValueError, google.auth and google.api_core errors with long texts
        raise DeployError(_explain(exc, target)) from None
    finally:
        logging.disable(logging.NOTSET)
    return {"model": model.resource_name, "endpoint": endpoint.resource_name, "endpoint_created": created,
            "deployed_model_id": deployed[-1] if deployed else None,
            "predict_url": f"https://{target.region}-aiplatform.googleapis.com/v1/{endpoint.resource_name}:predict"}


def _endpoint(aiplatform, wanted: str, target: VertexDeployTarget, where: dict):
    """(endpoint, created): by resource name or id, else the one with this display name, else a new one."""
    if ENDPOINT_ID.fullmatch(wanted):
        return aiplatform.Endpoint(wanted, **where), False
    found = aiplatform.Endpoint.list(filter=f'display_name="{wanted}"', **where)
    if len(found) > 1:
        raise DeployError(f"--endpoint {wanted!r}: {len(found)} endpoints in {target.project}/{target.region} have "
                          "this display name; pass one's resource name")
    if found:
        return found[0], False
    return aiplatform.Endpoint.create(display_name=wanted, **where, sync=True), True


def _explain(exc: Exception, target: VertexDeployTarget) -> str:
    from google.api_core import exceptions as api
    from google.auth import exceptions as auth

    from captioning.submit.vertex import _first_line

    where = f"{target.project}/{target.region}"
    if isinstance(exc, auth.DefaultCredentialsError):
        return ("no Google credentials: pass --access-token (GOOGLE_OAUTH_ACCESS_TOKEN), run "
                "`gcloud auth application-default login` or set GOOGLE_APPLICATION_CREDENTIALS")
    if isinstance(exc, auth.RefreshError):
        return (f"Vertex AI refused the credentials for project {target.project} and they cannot be refreshed: "
                "get a new token (`gcloud auth print-access-token`) or use application default credentials")
    if isinstance(exc, (api.Unauthenticated, api.PermissionDenied, api.Unauthorized, api.Forbidden)):
        return (f"Vertex AI refused the request in {where} ({exc.code.name if exc.code else exc.code}): "
                f"{_first_line(exc.message)}; the caller needs roles/aiplatform.user")
    if isinstance(exc, api.GoogleAPICallError):
        return f"Vertex AI in {where} answered {exc.code.name if exc.code else exc.code}: {_first_line(exc.message)}"
    return f"Vertex AI deployment failed: {type(exc).__name__}: {_first_line(str(exc))}"
