"""Google Cloud Storage access shared by the downloads and train's checkpoints.

``STORAGE_EMULATOR_HOST`` (a local emulator, as in the tests) gets an anonymous
client; otherwise the pod's or user's default credentials are used.
"""

from __future__ import annotations

import os
from urllib.parse import urlparse


def storage_client():
    from google.cloud import storage

    if os.environ.get("STORAGE_EMULATOR_HOST"):
        from google.auth.credentials import AnonymousCredentials

        return storage.Client(project="emulator", credentials=AnonymousCredentials())
    return storage.Client()


def split_uri(uri: str) -> tuple[str, str]:
    """``gs://bucket/a/b`` -> ("bucket", "a/b")."""
    parsed = urlparse(uri)
    return parsed.netloc, parsed.path.strip("/")
