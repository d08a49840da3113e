"""Safe, idempotent zip extraction.

Every entry is checked before anything is written: an absolute path, a ``..``
component, a drive letter or a symbolic link refuses the whole archive. The
archive is extracted into a temporary folder beside the target and its
top-level entries are renamed into place, so an interrupted extraction leaves
nothing half-written behind, and a marker records what was extracted.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import zipfile
from pathlib import Path, PurePosixPath

from captioning.errors import DataError, UnsafeArchiveError


def _check_entry(archive: Path, info: zipfile.ZipInfo, target: Path) -> None:
    name = info.filename
    pure = PurePosixPath(name.replace("\\", "/"))
    if pure.is_absolute() or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise UnsafeArchiveError(f"{archive}: entry {name!r} has an absolute path; refusing to extract")
    if ".." in pure.parts:
        raise UnsafeArchiveError(f"{archive}: entry {name!r} points outside the target folder ('..'); refusing to extract")
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        raise UnsafeArchiveError(f"{archive}: entry {name!r} is a symbolic link; refusing to extract")
    resolved = (target / pure).resolve()
    if not resolved.is_relative_to(target.resolve()):
        raise UnsafeArchiveError(f"{archive}: entry {name!r} would land outside {target}; refusing to extract")


def safe_extract(archive: Path, target: Path, sha256: str) -> list[str]:
    """Extract ``archive`` into ``target``; returns its top-level names.

    ``sha256`` identifies the archive: a second call with the same archive
    finds the marker and extracts nothing.
    """
    archive, target = Path(archive), Path(target)
    target.mkdir(parents=True, exist_ok=True)
    marker = target / f".extracted.{archive.name}.json"
    if marker.exists():
        done = json.loads(marker.read_text())
        if done.get("sha256") == sha256 and all((target / n).exists() for n in done["top_level"]):
            return done["top_level"]
    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile as exc:
        raise DataError(f"{archive}: not a valid zip archive: {exc}") from None
    with zf:
        infos = zf.infolist()
        for info in infos:
            _check_entry(archive, info, target)
        staging = target / f".staging.{archive.name}"
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir()
        for info in infos:
            zf.extract(info, staging)
    top_level = sorted(os.listdir(staging))
    for name in top_level:
        final = target / name
        if final.exists():
            shutil.rmtree(final) if final.is_dir() else final.unlink()
        os.replace(staging / name, final)
    staging.rmdir()
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps({"archive": archive.name, "sha256": sha256, "top_level": top_level}))
    os.replace(tmp, marker)
    return top_level
