"""Small file helpers: atomic writes so a killed step never leaves half a file."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import re
import shutil
import stat
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


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
hdf5_write_failed = False  # HDF5 met a full disk in this process: see exit_process


def _copy_failures(exc: BaseException) -> list:
    """shutil.copytree's error: a list of (source, destination, why) with no errno of its own."""
    if isinstance(exc, shutil.Error) and exc.args and isinstance(exc.args[0], list):
        return [entry for entry in exc.args[0] if isinstance(entry, tuple) and len(entry) == 3]
    return []


def is_disk_full(exc: BaseException) -> bool:
    if any(f"[Errno {code}]" in str(why) for _, _, why in _copy_failures(exc) for code in DISK_FULL_ERRNOS):
        return True
    return isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS


def human_bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def tree_size(path: Path, leave_out: list[Path] = ()) -> dict[str, int]:
    """Files and bytes under ``path`` (or of the file), leaving out what lies under ``leave_out``."""
    if path.is_file():
        return {"files": 1, "bytes": path.stat().st_size}
    files = [p for p in path.rglob("*") if p.is_file() and not any(p.is_relative_to(o) for o in leave_out)] \
        if path.is_dir() else []
    return {"files": len(files), "bytes": sum(p.stat().st_size for p in files)}


def free_bytes(path: str | Path) -> int:
    """Free bytes on the volume that holds ``path`` (or its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    usage = shutil.disk_usage(path)
    # Some FUSE mounts (object stores) report no capacity at all: unknown, so no write is refused for it.
    return usage.free if usage.total else 1 << 62


def disk_full_error(path: str | Path, kept: str = ""):
    """The error for a write that found the volume full, naming the file."""
    from captioning.errors import DiskFullError

    return DiskFullError(f"{path}: no space left on the device ({human_bytes(free_bytes(path))} free there); "
                         f"{kept + '; ' if kept else ''}free space or give the step a larger volume")


def disk_full_from(exc: BaseException):
    """The DiskFullError for an OSError a full disk raised anywhere (a library's own write, HDF5's, a copy),
    or None. HDF5 names its file only inside the message."""
    if not is_disk_full(exc):
        return None
    failed = _copy_failures(exc)
    if failed:  # copytree: name the first file it could not write
        return disk_full_error(failed[0][1])
    found = re.search(r"filename = '([^']+)'", str(exc))  # HDF5's own report of a failed write
    if found:
        _note_hdf5_failure()
    path = exc.filename2 or exc.filename or (found.group(1) if found else "a file")
    return disk_full_error(path)


def require_free_space(folder: str | Path, needed: int, what: str) -> None:
    """Refuse, before writing a byte, a write the volume cannot hold: a clean error now rather than a
    half-written file (and HDF5's crash on a full disk, h5py#914) hours later."""
    from captioning.errors import DiskFullError

    free = free_bytes(folder)
    if needed > free:
        raise DiskFullError(f"{folder}: {what} needs about {human_bytes(needed)}, but the volume has "
                            f"{human_bytes(free)} free; free space or give the step a larger volume")


@contextlib.contextmanager
def atomic_path(path: str | Path, tmp_name: str = ""):
    """A temporary path beside ``path``, renamed onto it when the block succeeds and removed when it fails:
    no half-written file under either name, a full disk included (then a DiskFullError naming ``path``).
    Only a regular file is replaced: the rename would put a file in place of a device, a FIFO or a folder."""
    from captioning.errors import CaptioningError

    path = Path(path)
    if path.exists() and not path.is_file():
        raise CaptioningError(f"{path}: {not_a_file(path)}; refusing to replace it with a file")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(tmp_name or f".{path.name}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if is_disk_full(exc):
            raise disk_full_error(path) from None
        raise


def not_a_file(path: Path) -> str:
    """What a path that exists but is no regular file is, for errors."""
    mode = path.stat().st_mode
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"))
    return next((kind for test, kind in kinds if test(mode)), "not a regular file")


@contextlib.contextmanager
def removed_on_failure(folder: Path):
    """A staging folder filled in the block: removed whole if the block fails (never half a model or a
    version under any name), a full disk reported naming the file."""
    try:
        yield folder
    except BaseException as exc:
        shutil.rmtree(folder, ignore_errors=True)
        full = disk_full_from(exc)
        if full:
            raise full from None
        raise


def write_json_atomic(path: str | Path, data: Any) -> Path:
    text = json.dumps(finite_json(data), indent=1, ensure_ascii=False, allow_nan=False)
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def weights_bytes(model) -> int:
    """What ``model.save_weights`` writes, about: every variable, the optimizer's included."""
    import numpy as np

    optimizer = getattr(model, "optimizer", None)
    variables = [*model.weights, *(optimizer.variables if optimizer is not None else [])]
    return sum(math.prod(v.shape) * np.dtype(v.dtype).itemsize for v in variables) + (1 << 20)  # + HDF5's own


def save_weights_atomic(model, path: str | Path) -> Path:
    """``model.save_weights`` checked against the free space first and renamed into place when complete:
    HDF5 left writing on a full disk leaves a broken file and crashes the process at exit (h5py#914)."""
    path = Path(path)
    require_free_space(path.parent, weights_bytes(model), f"saving {path.name}")
    with atomic_path(path, f".tmp-{path.name}") as tmp:  # Keras wants the name to end in .weights.h5
        try:
            model.save_weights(tmp)
        except OSError as exc:
            if is_disk_full(exc):
                _note_hdf5_failure()
                # HDF5 names the file only in some of its messages (not when the close fails): name it here.
                raise disk_full_error(path) from None
            raise
    return path


def _note_hdf5_failure() -> None:
    global hdf5_write_failed
    hdf5_write_failed = True


def exit_process(code: int) -> None:
    """Exit with ``code``. After HDF5 met a full disk it holds a half-closed file that crashes the interpreter's
    teardown (h5py#914, exit 139): then flush what was printed and leave without that teardown."""
    if hdf5_write_failed:
        import logging
        import sys

        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)
    raise SystemExit(code)


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
