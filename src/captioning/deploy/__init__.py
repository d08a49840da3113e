"""``captioning deploy``: the promoted model as an online endpoint on KServe or Vertex AI.

``kserve`` builds the InferenceService (the object manifests/serving holds too) and creates
or updates it through the Kubernetes API; ``vertex`` uploads a Model and deploys it to an
Endpoint with ``google.cloud.aiplatform``. Both run the image's ``captioning serve``; the
constants below are the part of its contract the platforms are configured with.
"""

from captioning.errors import CaptioningError

DEFAULT_NAME = "captioner"  # the model's name in the serving routes (/v1/models/NAME:predict)
DEFAULT_PORT = 8080
LIVE_ROUTE, READY_ROUTE = "/v2/health/live", "/v2/health/ready"  # Open Inference v2: KServe's probes
VERTEX_HEALTH_ROUTE, VERTEX_PREDICT_ROUTE = "/health", "/predict"  # AIP_HEALTH_ROUTE / AIP_PREDICT_ROUTE


class DeployError(CaptioningError):
    """A deployment a platform (the Kubernetes API, Vertex AI) refused, or settings that cannot work there."""
