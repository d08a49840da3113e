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
# KFP's artifact store as its launcher reaches minio:// URIs, set on the promote task by pipeline.py for the
# backend release compiled for (KFP_BACKENDS: seaweedfs.kubeflow:9000 from 2.16, minio-service.kubeflow:9000 before).
STORE_ENV = "CAPTIONING_KFP_STORE"
KFP_STORE_SECRET = "mlpipeline-minio-artifact"  # KFP's Secret for that store, in each profile namespace


def storage_uri(artifact_uri: str) -> str:
    """Where the server or Vertex AI reads the model: KFP's minio:// store is S3 to them."""
    return "s3://" + artifact_uri[len("minio://"):] if artifact_uri.startswith("minio://") else artifact_uri


def _s3_access(artifact_uri: str):
    """KFP's store for a minio:// model (its endpoint and Secret); AWS as the pod's identity for s3://."""
    from captioning.deploy.kserve import S3Access

    if artifact_uri.startswith("minio://"):
        return S3Access(os.environ.get(STORE_ENV) or "http://seaweedfs.kubeflow:9000", KFP_STORE_SECRET)
    return S3Access()


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

            kserve.check_request(uri, p.deploy_name, _s3_access(model_uri))
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

            target = kserve.KServeTarget(p.deploy_namespace or None, None, os.environ.get("KUBE_API_SERVER"),
                                         os.environ.get("KUBE_TOKEN"))
            isvc = kserve.inference_service(_image(), uri, p.deploy_name, p.deploy_gpu, _s3_access(model_uri))
            outcome = kserve.apply(isvc, target)
        else:
            from captioning.deploy.vertex import deploy_vertex

            outcome = deploy_vertex(_image(), uri, p.deploy_name, _vertex_target(cfg))
    except DeployError as exc:
        s3 = _s3_access(model_uri) if p.deploy == "kserve" else None
        flags = "".join(f" --{flag} {value}" for flag, value in
                        (("s3-endpoint", s3 and s3.endpoint), ("s3-secret", s3 and s3.secret)) if value)
        raise DeployError(f"promote.deploy={p.deploy}: the alias {p.alias} moved to {version or 'the new model'}, "
                          f"but the deployment failed: {exc}; deploy it with `captioning deploy --target {p.deploy} "
                          f"--model-uri {redact(uri)}{flags}`") from None
    return {"target": p.deploy, "model_uri": redact(uri), **outcome}
