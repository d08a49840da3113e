"""The ``captioning deploy`` command (registered in cli.py: ``app.command("deploy")(deploy)``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from captioning import DEFAULT_IMAGE
from captioning.console import fail
from captioning.deploy import DEFAULT_NAME
from captioning.errors import CaptioningError
from captioning.redact import redact_tree

KSERVE, VERTEX = "KServe", "Vertex AI"


def deploy(
    target: str = typer.Option(..., help="kserve (an InferenceService) or vertex (a Model on an Endpoint)."),
    model_uri: str = typer.Option(..., help="The model folder: gs://, s3://, pvc://CLAIM/PATH (kserve; the server "
                                  "reads it, no storage initializer); gs:// (vertex)."),
    image: str = typer.Option(DEFAULT_IMAGE, envvar="CAPTIONING_IMAGE", help="The image running `captioning serve`."),
    name: str = typer.Option(DEFAULT_NAME, help="The InferenceService / Model name, and the model's name in the "
                             "routes."),
    gpu: bool = typer.Option(False, "--gpu/--no-gpu", help="One GPU per replica."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print what would be sent; contact nothing."),
    wait: bool = typer.Option(False, help="kserve: wait until the InferenceService is Ready (vertex always waits)."),
    timeout_s: float = typer.Option(900.0, help="Give up waiting after this long."),
    poll_s: float = typer.Option(5.0, min=0.01, help="Seconds between readiness checks."),
    namespace: Optional[str] = typer.Option(None, help="Default: the kubeconfig context's, or the pod's, or "
                                            "default.", rich_help_panel=KSERVE),
    kubeconfig: Optional[Path] = typer.Option(None, help="Default: KUBECONFIG or ~/.kube/config, else the "
                                              "in-cluster service account.", rich_help_panel=KSERVE),
    api_server: Optional[str] = typer.Option(None, envvar="KUBE_API_SERVER", help="Kubernetes API URL (over the "
                                             "kubeconfig's).", rich_help_panel=KSERVE),
    token: Optional[str] = typer.Option(None, envvar="KUBE_TOKEN", show_default=False,
                                        help="Bearer token for the Kubernetes API.", rich_help_panel=KSERVE),
    s3_endpoint: Optional[str] = typer.Option(None, help="s3://: an S3-compatible store's URL (KFP's: "
                                              "http://seaweedfs.kubeflow:9000 from 2.16, http://minio-service."
                                              "kubeflow:9000 before); default AWS S3.", rich_help_panel=KSERVE),
    s3_secret: Optional[str] = typer.Option(None, help="s3://: a Secret with the keys accesskey and secretkey (KFP's "
                                            "mlpipeline-minio-artifact has them); default the pod's own identity.",
                                            rich_help_panel=KSERVE),
    project: Optional[str] = typer.Option(None, envvar="GOOGLE_CLOUD_PROJECT", rich_help_panel=VERTEX),
    region: str = typer.Option("us-central1", envvar="GOOGLE_CLOUD_REGION", rich_help_panel=VERTEX),
    machine_type: Optional[str] = typer.Option(None, help="Default: g2-standard-8 with one NVIDIA_L4 (--gpu), "
                                               "n1-standard-4.", rich_help_panel=VERTEX),
    endpoint: Optional[str] = typer.Option(None, help="An Endpoint to deploy to: resource name, id or display name "
                                           "(default: the one named --name, created when missing).",
                                           rich_help_panel=VERTEX),
    api_endpoint: Optional[str] = typer.Option(None, help="Vertex API endpoint (private service connect).",
                                               rich_help_panel=VERTEX),
    access_token: Optional[str] = typer.Option(
        None, envvar="GOOGLE_OAUTH_ACCESS_TOKEN", show_default=False,
        help="OAuth access token (e.g. from `gcloud auth print-access-token`); default: application default "
        "credentials.", rich_help_panel=VERTEX),
) -> None:
    """Serve a model folder online: a KServe InferenceService or a Vertex AI Endpoint running `captioning serve`."""
    try:
        if target == "kserve":
            _kserve(image, model_uri, name, gpu, dry_run, wait, timeout_s, poll_s, namespace, kubeconfig, api_server,
                    token, s3_endpoint, s3_secret)
        elif target == "vertex":
            _vertex(image, model_uri, name, gpu, dry_run, project, region, machine_type, endpoint, api_endpoint,
                    access_token)
        else:
            raise CaptioningError(f"--target {target!r}: choose kserve or vertex")
    except CaptioningError as exc:
        fail(exc)


def _echo_state(state: str) -> None:
    typer.echo(f"state: {state}", err=True)


def _kserve(image, model_uri, name, gpu, dry_run, wait, timeout_s, poll_s, namespace, kubeconfig, api_server, token,
            s3_endpoint, s3_secret):
    from captioning.deploy import kserve

    s3 = kserve.S3Access(s3_endpoint, s3_secret)
    kserve.check_request(model_uri, name, s3)
    if note := kserve.serverless_note(model_uri):
        typer.echo(f"note: {note}", err=True)
    where = kserve.KServeTarget(namespace, str(kubeconfig) if kubeconfig else None, api_server, token)
    obj = kserve.inference_service(image, model_uri, name, gpu, s3)
    if dry_run:
        typer.echo(json.dumps(redact_tree(kserve.dry_run_plan(obj, where)), indent=1))
        return
    outcome = kserve.apply(obj, where, wait=wait, timeout_s=timeout_s, poll_s=poll_s, on_state=_echo_state)
    typer.echo(f"inferenceservice: {outcome['namespace']}/{outcome['name']} {outcome['action']}")
    if outcome["url"]:
        typer.echo(f"url: {outcome['url']}")


def _vertex(image, model_uri, name, gpu, dry_run, project, region, machine_type, endpoint, api_endpoint, access_token):
    from captioning.deploy import vertex

    where = vertex.VertexDeployTarget(project or "", region, machine_type, gpu, endpoint, api_endpoint)
    if dry_run:
        typer.echo(json.dumps(redact_tree(vertex.dry_run_plan(image, model_uri, name, where)), indent=1))
        return
    outcome = vertex.deploy_vertex(image, model_uri, name, where, access_token=access_token,
                                   on_step=lambda line: typer.echo(line, err=True))
    for key in ("model", "endpoint", "deployed_model_id", "predict_url"):
        typer.echo(f"{key}: {outcome[key]}")
