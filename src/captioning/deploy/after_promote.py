"""``promote.deploy``: a promote that moves the alias serves the new model, when asked and never otherwise.

The promote pod deploys the model from where the pipeline stored it (the train step's
model artifact: gs:// on Vertex AI, the artifact store on Kubeflow) with the same
image the pipeline runs (``CAPTIONING_IMAGE``, set on the task by pipeline.py).
KServe is reached as the pod's service account (manifests/base grants it the
inferenceservices verbs), or ``KUBE_API_SERVER``/``KUBE_TOKEN`` where set; Vertex AI
as the pod's Google identity.
"""

from __future__ import annotations

import logging
import os

from captioning import DEFAULT_IMAGE
from captioning.config import Config
from captioning.deploy import DeployError
from captioning.redact import redact

log = logging.getLogger(__name__)

IMAGE_ENV = "CAPTIONING_IMAGE"


def storage_uri(artifact_uri: str) -> str:
    """Where KServe's storage initializer or Vertex AI can read the model: KFP's minio:// store is S3 to them."""
    return "s3://" + artifact_uri[len("minio://"):] if artifact_uri.startswith("minio://") else artifact_uri


def _image() -> str:
    return os.environ.get(IMAGE_ENV) or DEFAULT_IMAGE


def _vertex_target(cfg: Config):
    from captioning.deploy.vertex import VertexDeployTarget

    project = cfg.promote.deploy_project or os.environ.get("GOOGLE_CLOUD_PROJECT", "")
    return VertexDeployTarget(project=project, region=cfg.promote.deploy_region, gpu=cfg.promote.deploy_gpu)


def check_deployment(cfg: Config, model_uri: str) -> None:
    """Refuse, before anything is promoted, a deployment that cannot be made (a local path, no project)."""
    uri, p = storage_uri(model_uri), cfg.promote
    try:
        if p.deploy == "kserve":
            from captioning.deploy import kserve

            kserve.check_request(uri, p.deploy_name)
        else:
            from captioning.deploy import vertex

            vertex.check_request(_image(), uri, p.deploy_name, _vertex_target(cfg))
    except DeployError as exc:
        raise DeployError(f"promote.deploy={p.deploy}: {exc}") from None


def deploy_promoted(cfg: Config, model_uri: str, version: str) -> dict:
    """Serve the model the alias now names; a failure says the alias moved and how to deploy by hand."""
    uri, p = storage_uri(model_uri), cfg.promote
    log.info("promote.deploy=%s: serving %s (%s) as %s", p.deploy, version or "the new model", redact(uri),
             p.deploy_name)
    try:
        if p.deploy == "kserve":
            from captioning.deploy import kserve

            if note := kserve.restricted_note(uri):
                log.warning("promote.deploy=kserve: %s", note)
            target = kserve.KServeTarget(p.deploy_namespace or None, None, os.environ.get("KUBE_API_SERVER"),
                                         os.environ.get("KUBE_TOKEN"))
            outcome = kserve.apply(kserve.inference_service(_image(), uri, p.deploy_name, p.deploy_gpu), target)
        else:
            from captioning.deploy.vertex import deploy_vertex

            outcome = deploy_vertex(_image(), uri, p.deploy_name, _vertex_target(cfg))
    except DeployError as exc:
        raise DeployError(f"promote.deploy={p.deploy}: the alias {p.alias} moved to {version or 'the new model'}, "
                          f"but the deployment failed: {exc}; deploy it with `captioning deploy --target {p.deploy} "
                          f"--model-uri {redact(uri)}`") from None
    return {"target": p.deploy, "model_uri": redact(uri), **outcome}
