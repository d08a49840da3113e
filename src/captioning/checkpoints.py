"""Where train keeps what a retried or re-run pod resumes from, keyed by what defines the result.

``<checkpoint_dir>/train-<key>/`` holds the checkpoints, ``history.csv`` and
``train_done.json`` of one combination of training settings and processed
data (the key is a hash of both): changed settings or data start a folder of
their own, so they never resume someone else's epochs.

``checkpoint_dir`` is a local folder (a mounted volume: Kubeflow's PVC) used
as it is, or a ``gs://`` URI (Vertex AI), mirrored: restored into the pod's
scratch folder before training and uploaded after every epoch.
"""

from __future__ import annotations

import logging
from pathlib import Path

from captioning.errors import ConfigError
from captioning.io import atomic_path, check_writable, require_free_space

log = logging.getLogger(__name__)

# BackupAndRestore's record of the last finished epoch: uploaded last, so the bucket never says an epoch is
# done before its weights are there (a pod killed between the two trains that epoch once more).
RESUME_POINT = "checkpoints/backup/training_metadata.json"


def is_remote(root: str) -> bool:
    return root.startswith("gs://")


class CheckpointFolder:
    """``folder`` is where Keras reads and writes; ``restore``/``save`` keep a ``gs://`` copy in step."""

    def __init__(self, root: str | Path, key: str, scratch: str | Path):
        root = str(root)
        name = f"train-{key}"
        if "://" in root and not is_remote(root):
            raise ConfigError(f"train.checkpoint_dir={root}: use a local folder (a mounted volume) or gs://bucket/path")
        self.remote = f"{root.rstrip('/')}/{name}" if is_remote(root) else ""
        self.folder = Path(scratch) / name if self.remote else check_writable(Path(root), "train.checkpoint_dir") / name
        self.folder.mkdir(parents=True, exist_ok=True)
        self._saved: dict[str, tuple[int, int]] = {}  # relative path -> (size, mtime_ns) as last uploaded

    def __str__(self) -> str:
        return self.remote or str(self.folder)

    def _bucket(self):
        from google.auth.exceptions import DefaultCredentialsError

        from captioning.gcs import split_uri, storage_client

        bucket, prefix = split_uri(self.remote)
        try:
            return storage_client().bucket(bucket), prefix
        except DefaultCredentialsError as exc:
            raise ConfigError(f"train.checkpoint_dir={self.remote}: no Google Cloud credentials ({exc})") from None

    def restore(self) -> int:
        """Copy the bucket's files of this key into ``folder`` and check that the bucket takes writes (before
        hours of training, not after the first epoch); the number of files copied."""
        if not self.remote:
            return 0
        from google.api_core import exceptions as gexc

        bucket, prefix = self._bucket()
        restored = {}
        try:
            for blob in bucket.client.list_blobs(bucket, prefix=prefix + "/"):
                rel = blob.name[len(prefix) + 1:]
                if not rel or rel.endswith("/"):  # a "folder" placeholder object
                    continue
                dest = self.folder / rel
                require_free_space(self.folder, blob.size or 0, f"restoring {blob.name}")
                with atomic_path(dest, f".{dest.name}.part") as tmp:
                    blob.download_to_filename(str(tmp))
                stat = dest.stat()
                restored[rel] = (stat.st_size, stat.st_mtime_ns)
            probe = bucket.blob(f"{prefix}/.write-probe")
            probe.upload_from_string(b"")
            probe.delete()
        except (gexc.Forbidden, gexc.Unauthorized, gexc.NotFound) as exc:
            raise ConfigError(f"train.checkpoint_dir={self.remote}: {exc.message}") from None
        self._saved = restored  # anything else in the local folder is uploaded at the next save
        if restored:
            log.info("train: restored %d checkpoint files from %s", len(restored), self.remote)
        return len(restored)

    def save(self) -> int:
        """Upload what changed since the last save (the resume point last); the number of files uploaded."""
        if not self.remote:
            return 0
        from google.api_core import exceptions as gexc

        bucket, prefix = self._bucket()
        state = self._state()
        changed = sorted((rel for rel, stat in state.items() if self._saved.get(rel) != stat),
                         key=lambda rel: (rel == RESUME_POINT, rel))
        try:
            for rel in changed:
                bucket.blob(f"{prefix}/{rel}").upload_from_filename(str(self.folder / rel))
        except (gexc.Forbidden, gexc.Unauthorized, gexc.NotFound) as exc:
            raise ConfigError(f"train.checkpoint_dir={self.remote}: cannot write ({exc.message})") from None
        self._saved = state
        return len(changed)

    def _state(self) -> dict[str, tuple[int, int]]:
        out = {}
        for path in self.folder.rglob("*"):
            if path.is_file() and not path.name.endswith((".part", ".lock", ".tmp")) \
                    and not path.name.startswith(".tmp-"):  # what a kill left half written is never uploaded
                stat = path.stat()
                out[path.relative_to(self.folder).as_posix()] = (stat.st_size, stat.st_mtime_ns)
        return out


def save_every_epoch(checkpoints: CheckpointFolder):
    """A Keras callback uploading the checkpoint folder after each epoch (placed after the callbacks that write it)."""
    import keras

    class SaveCheckpoints(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            checkpoints.save()

    return SaveCheckpoints()
