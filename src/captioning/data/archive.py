"""The COCO zips as they are: checked once, then read by member, never extracted.

``index_archive`` checks every entry before anything is read (an absolute path,
a ``..`` component, a drive letter or a symbolic link refuses the whole
archive) and lists its top-level folders. ``ArchiveImages`` then reads images
straight out of the zips by member name: random access through the central
directory (parsed once per archive, not per image: COCO's train2014.zip has
82,783 entries), with reading and decoding in parallel, and no image tree is
ever written to disk or uploaded as an artifact.
"""

from __future__ import annotations

import logging
import stat
import threading
import zipfile
import zlib
from collections import Counter
from pathlib import Path, PurePosixPath

from captioning.errors import DataError, UnsafeArchiveError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
# What reading one damaged member raises: a bad CRC or header, a broken deflate stream,
# an encrypted member (RuntimeError), an unsupported compression method.
MEMBER_ERRORS = (zipfile.BadZipFile, OSError, EOFError, zlib.error, RuntimeError, NotImplementedError)


def _check_entry(archive: Path, info: zipfile.ZipInfo) -> None:
    name = info.filename
    pure = PurePosixPath(name.replace("\\", "/"))
    if pure.is_absolute() or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise UnsafeArchiveError(f"{archive}: entry {name!r} has an absolute path; refusing the archive")
    if ".." in pure.parts:
        raise UnsafeArchiveError(f"{archive}: entry {name!r} points outside the target folder ('..'); "
                                 "refusing the archive")
    if stat.S_ISLNK(info.external_attr >> 16):
        raise UnsafeArchiveError(f"{archive}: entry {name!r} is a symbolic link; refusing the archive")


def open_zip(archive: str | Path, fileobj=None) -> zipfile.ZipFile:
    """``archive`` names it in errors; ``fileobj`` (a seekable reader: a bucket object) is read instead when given."""
    try:
        return zipfile.ZipFile(fileobj or archive)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:  # fuzzed directories
        raise DataError(f"{archive}: not a valid zip archive: {exc}") from None


# COCO's three zips expand to about 19 GB; JPEGs barely compress and the caption JSON about 10x.
MAX_EXPANDED_BYTES = 64 << 30
MAX_EXPANSION_RATIO = 200


def _check_expansion(archive: Path, infos: list[zipfile.ZipInfo], max_bytes: int, max_ratio: float) -> None:
    """Declared sizes bound what reading can produce (zipfile stops at an entry's declared size)."""
    total = 0
    for info in infos:
        total += info.file_size
        if info.file_size > max(info.compress_size, 1) * max_ratio and info.file_size > 1 << 20:
            raise UnsafeArchiveError(
                f"{archive}: entry {info.filename!r} expands {info.compress_size} bytes to {info.file_size} "
                f"(over data.max_expansion_ratio={max_ratio:g}); refusing the archive")
    if total > max_bytes:
        raise UnsafeArchiveError(f"{archive}: its entries expand to {total} bytes, over "
                                 f"data.max_expanded_bytes={max_bytes}; refusing the archive")


def index_archive(archive: str | Path, max_bytes: int = MAX_EXPANDED_BYTES,
                  max_ratio: float = MAX_EXPANSION_RATIO, fileobj=None) -> dict[str, dict[str, int]]:
    """Check every entry of ``archive`` (paths, links, expansion); returns its top-level folders with their
    file and image counts. Only the central directory is read (through ``fileobj`` when given)."""
    with open_zip(archive, fileobj) as zf:
        infos = zf.infolist()
    for info in infos:
        _check_entry(archive, info)
    twice = sorted(name for name, n in Counter(i.filename for i in infos).items() if n > 1)
    if twice:  # zipfile reads the later copy: a member could be replaced unseen
        raise UnsafeArchiveError(f"{archive}: entry {twice[0]!r} appears more than once"
                                 f"{f' (and {len(twice) - 1} more names)' if len(twice) > 1 else ''}; "
                                 "refusing the archive")
    _check_expansion(archive, infos, max_bytes, max_ratio)
    files, images = Counter(), Counter()
    for info in infos:
        if info.is_dir():
            continue
        top = PurePosixPath(info.filename).parts[0]
        files[top] += 1
        images[top] += PurePosixPath(info.filename).suffix.lower() in IMAGE_SUFFIXES
    return {top: {"files": files[top], "images": images[top]} for top in sorted(files)}


def check_archive(archive: str | Path, max_bytes: int = MAX_EXPANDED_BYTES,
                  max_ratio: float = MAX_EXPANSION_RATIO) -> None:
    """The check a download passes before it is marked verified: a zip whose entries are safe (see
    ``index_archive``) and whose every member reads back with the right CRC. Reads the whole archive once."""
    archive = Path(archive)
    index_archive(archive, max_bytes, max_ratio)
    with open_zip(archive) as zf:
        try:
            bad = zf.testzip()
        except MEMBER_ERRORS as exc:
            raise DataError(f"{archive.name}: a member cannot be read: {type(exc).__name__}: {exc}") from None
    if bad is not None:
        raise DataError(f"{archive.name}: member {bad} fails its CRC check (a damaged or mixed download)")


def _withdraw_verification(archive: Path, exc: BaseException) -> str:
    """A member whose bytes fail to decode after the download's full check: the archive changed or rotted
    since. An OSError (EIO, a stale NFS handle) may pass: it withdraws nothing."""
    from captioning.data.fetch import unverify

    if isinstance(exc, OSError):
        return f"{archive.name} could not be read (the volume's error, not the archive's contents)"
    unverify(archive)
    return f"{archive.name} is damaged; its verified mark is withdrawn, so the next log_raw_data downloads it again"


def read_member(archive: str | Path, member: str, what: str = "file", fileobj=None) -> bytes:
    """One member's bytes (through ``fileobj`` when given, see ``open_zip``); the error names the archive and
    the member."""
    with open_zip(archive, fileobj) as zf:
        try:
            return zf.read(member)
        except KeyError:
            raise DataError(f"{archive}: holds no {member} ({what})") from None
        except MEMBER_ERRORS as exc:
            withdrawn = "" if fileobj else f"; {_withdraw_verification(Path(archive), exc)}"
            raise DataError(f"{archive}: cannot read {member} ({what}): {type(exc).__name__}: {exc}"
                            f"{withdrawn}") from None


def read_json_member(archive: str | Path, member: str, what: str = "file", fileobj=None):
    """One member parsed as JSON; every failure names the archive and the member."""
    import json

    try:
        return json.loads(read_member(archive, member, what, fileobj))
    except ValueError as exc:  # not JSON, or not UTF-8
        raise DataError(f"{archive}:{member}: not valid JSON: {exc}") from None
    except RecursionError:
        raise DataError(f"{archive}:{member}: nested too deeply to be a {what}") from None


class ArchiveImages:
    """Images addressed as ``<top-level folder>/<name>``, read out of the archive holding that folder."""

    def __init__(self, archives: dict[str, str | Path]):
        self.archives = {top: Path(path) for top, path in archives.items()}
        # One handle per archive, shared by the reading threads: opening parses the whole central directory
        # (COCO's train2014.zip: 82,783 entries, about a second), so it happens once, not per image or thread.
        # ZipFile serialises only the raw reads of a shared handle; decompression and decoding run in parallel.
        self._handles: dict[str, zipfile.ZipFile] = {}
        self._lock = threading.Lock()
        self.opened = 0
        self.damaged: set[str] = set()  # archives a member of which failed to read

    def _zip(self, top: str) -> zipfile.ZipFile:
        handle = self._handles.get(top)
        if handle is None:
            with self._lock:
                handle = self._handles.get(top)
                if handle is None:
                    handle = self._handles[top] = open_zip(self.archives[top])
                    self.opened += 1
        return handle

    def where(self, key: str) -> str:
        """Where an image is, for reports: ``<archive>:<member>``."""
        top = PurePosixPath(key).parts[0]
        return f"{self.archives[top].name}:{key}" if top in self.archives else key

    def read(self, key: str) -> bytes:
        """The image's bytes; FileNotFoundError when no archive holds it, DataError when it cannot be read."""
        top = PurePosixPath(key).parts[0]
        if top not in self.archives:
            raise FileNotFoundError(key)
        try:
            return self._zip(top).read(key)
        except KeyError:
            raise FileNotFoundError(key) from None
        except MEMBER_ERRORS as exc:
            if top not in self.damaged:  # the image is skipped; the archive is not trusted again
                self.damaged.add(top)
                log.warning("%s: %s: %s; %s", self.where(key), type(exc).__name__, exc,
                            _withdraw_verification(self.archives[top], exc))
            raise DataError(f"{self.where(key)}: {type(exc).__name__}: {exc}") from None

    def read_or_empty(self, key: str) -> bytes:
        """For the decoding pipeline: an unreadable member gives no bytes, and the decoder drops it."""
        try:
            return self.read(key)
        except (FileNotFoundError, DataError):
            return b""


class FolderImages:
    """Images as files under a folder (benchmarks, ``captioning caption``): the same interface as ArchiveImages."""

    def __init__(self, root: str | Path = "."):
        self.root = Path(root)

    def where(self, key: str) -> str:
        return str(self.root / key)

    def read(self, key: str) -> bytes:
        return (self.root / key).read_bytes()

    def read_or_empty(self, key: str) -> bytes:
        try:
            return self.read(key)
        except OSError:
            return b""
