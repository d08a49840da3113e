"""The W&B key from Google Secret Manager, for pods on Vertex AI (which runs no Kubernetes Secrets).

Only the secret's *name* travels in the pipeline; the value is read inside the
pod with the run's service account and put into this process's environment.
"""

from __future__ import annotations

import logging
import os

from captioning.errors import ConfigError

log = logging.getLogger(__name__)


def version_name(secret: str) -> str:
    """``projects/P/secrets/S`` → ``projects/P/secrets/S/versions/latest``."""
    return secret if "/versions/" in secret else f"{secret}/versions/latest"


def read_secret(secret: str, client=None) -> str:
    """The secret's payload as text; a clear ``ConfigError`` when it cannot be read."""
    from google.api_core import exceptions

    name = version_name(secret)
    if client is None:
        from google.cloud import secretmanager

        client = secretmanager.SecretManagerServiceClient()
    try:
        response = client.access_secret_version(name=name)
    except (exceptions.PermissionDenied, exceptions.Forbidden):  # gRPC and REST spellings
        raise ConfigError(f"wandb.api_key_secret={name}: permission denied; grant the pipeline's service "
                          "account roles/secretmanager.secretAccessor on it") from None
    except exceptions.NotFound:
        raise ConfigError(f"wandb.api_key_secret={name}: no such secret or version") from None
    except exceptions.GoogleAPICallError as exc:
        raise ConfigError(f"wandb.api_key_secret={name}: Secret Manager answered {exc.code}: {exc.message}") from None
    value = response.payload.data.decode("utf-8").strip()
    if not value:
        raise ConfigError(f"wandb.api_key_secret={name}: the secret is empty")
    return value


def ensure_wandb_key(secret: str, mode: str, client=None) -> bool:
    """Load the W&B key from ``secret`` when online and no key is set; True if it was loaded."""
    if mode != "online" or not secret or os.environ.get("WANDB_API_KEY"):
        return False
    os.environ["WANDB_API_KEY"] = read_secret(secret, client)
    log.info("W&B key read from Secret Manager (%s)", version_name(secret))
    return True
