"""Small file helpers: atomic writes so a killed step never leaves half a file."""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
from pathlib import Path
from typing import Any


def finite_json(data: Any) -> Any:
    """NaN and infinities as null: JSON has no such numbers, and no reader should take one for a result."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {key: finite_json(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite_json(value) for value in data]
    return data


def write_json_atomic(path: str | Path, data: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(finite_json(data), indent=1, ensure_ascii=False, allow_nan=False))
    os.replace(tmp, path)
    return path


def read_json(path: str | Path, what: str = "file") -> Any:
    from captioning.errors import DataError

    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: {what} not found") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: {what} is not valid JSON: {exc}") from None


# Set by pipeline.py beside a mounted volume's path: "PVC=MOUNT", so an error can name the volume.
VOLUME_ENV = "CAPTIONING_VOLUME"
VOLUME_FIX = ("make it writable for the image's user (uid 1000): run the Job in manifests/base/prepare-volumes-job.yaml "
              "(`kubectl -n NAMESPACE apply -k manifests/overlays/...` creates it; see manifests/README.md)")


def check_writable(folder: str | Path, setting: str) -> Path:
    """Fail at once, naming the folder, the volume and the fix, when this process cannot write to ``folder``
    (a fresh PersistentVolume is owned by root), instead of hours later when the first file is saved."""
    import tempfile

    from captioning.errors import ConfigError

    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-probe-"):
            pass
    except OSError as exc:
        pvc, _, mount = os.environ.get(VOLUME_ENV, "").partition("=")
        on_volume = bool(mount) and folder.resolve().is_relative_to(Path(mount).resolve())
        where = f"volume {pvc} (mounted at {mount})" if on_volume else "folder"
        raise ConfigError(f"{setting}={folder}: the {where} is not writable by uid {os.getuid()} "
                          f"({exc.strerror or exc}); {VOLUME_FIX}") from None
    return folder


@contextlib.contextmanager
def file_lock(path: str | Path):
    """An exclusive lock on ``<path>.lock``: processes sharing a volume take turns (a PVC is on one node)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


LOCK_FILE = ".captioning.lock"


@contextlib.contextmanager
def exclusive_workdir(workdir: str | Path):
    """One run per work dir: a second run is refused at once, naming the dir and the holder's PID. The lock
    is an flock, which dies with its process: the lock file a killed run leaves behind is simply taken over."""
    from captioning.errors import ConfigError

    work = Path(workdir)
    if work.exists() and not work.is_dir():
        raise ConfigError(f"--workdir {work}: a file, not a folder")
    try:
        work.mkdir(parents=True, exist_ok=True)
        fh = open(work / LOCK_FILE, "a+")
    except OSError as exc:
        raise ConfigError(f"--workdir {work}: cannot use it: {exc.strerror or exc}") from None
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            raise ConfigError(f"--workdir {work.resolve()}: busy, another run (PID {holder}) is using it; "
                              "wait for it to finish or choose another --workdir") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        try:
            yield work
        finally:
            fh.truncate(0)
            fcntl.flock(fh, fcntl.LOCK_UN)
