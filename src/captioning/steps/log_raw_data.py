"""log_raw_data: fetch the COCO 2014 archives and verify them; nothing is extracted.

Output (a few large objects, whatever the number of images): ``manifest.json``
(sources, sizes, checksums, what each archive holds, counts; paths relative to
the manifest) and ``archives/<path>``: the verified zips, each with its
``.verified.json`` record. process_data reads the images straight out of them.
With a download cache (a PVC shared by runs) the archives are fetched into the
cache once and only referenced by the manifest; the cache may be a bucket
(``gs://``, for Vertex AI: captioning.data.bucket_cache).
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

from captioning.config import DEMO_SOURCE, DataConfig
from captioning.data import bucket_cache
from captioning.data.archive import check_archive, index_archive, read_json_member
from captioning.data.fetch import download, join_url, record_dict, sidecar, unverify
from captioning.errors import CaptioningError, DataError
from captioning.redact import redact, redact_tree
from captioning.io import check_writable, file_lock, write_json_atomic
from captioning.steps.result import StepResult

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
ANNOTATION_FILES = {"train2014": "annotations/captions_train2014.json", "val2014": "annotations/captions_val2014.json"}
ARCHIVES = "archives"
# data.split=karpathy: the split zip's place in the artifact, and the file read from it.
KARPATHY_ARCHIVE, KARPATHY_MEMBER = "splits/caption_datasets.zip", "dataset_coco.json"
RESULT_FILE = "step.json"  # what a pod adds to its first artifact (captioning.workflow.RESULT_FILE)


@contextmanager
def _progress_bar():
    """A rich progress bar on a terminal; a log line every 25% elsewhere (CI, pods)."""
    if sys.stderr.isatty():
        from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn, TimeRemainingColumn

        with Progress("[bold]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                      TimeRemainingColumn(), transient=False) as bar:
            tasks: dict[str, int] = {}

            def hook(name: str, done: int, total: int) -> None:
                if name not in tasks:
                    tasks[name] = bar.add_task(name, total=total)
                bar.update(tasks[name], completed=done)

            yield hook
    else:
        marks: dict[str, int] = {}

        def hook(name: str, done: int, total: int) -> None:
            quarter = done * 4 // max(total, 1)
            if quarter > marks.get(name, -1):
                marks[name] = quarter
                log.info("%s: %d of %d bytes", name, done, total)

        yield hook


def demo_mirror(scratch: Path) -> Path:
    """Write the synthetic COCO-layout mirror once, in the step's scratch folder (never an artifact)."""
    from captioning.data.demo import DEMO_TRAIN_IMAGES, DEMO_VAL_IMAGES, write_coco_mirror

    root = scratch / "demo-mirror"
    marker = root / ".complete"
    try:
        written = json.loads(marker.read_text())
    except (OSError, ValueError):
        written = {}
    # A mirror another version wrote (other sizes) is written again, not reused.
    if (written.get("train_images"), written.get("val_images")) != (DEMO_TRAIN_IMAGES, DEMO_VAL_IMAGES):
        info = write_coco_mirror(root)
        marker.write_text(json.dumps(info))
    return root


@contextmanager
def _locked(path: Path, shared: bool):
    """An exclusive lock beside ``path`` in a shared download cache (a PVC): runs take turns per file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not shared:
        yield
        return
    with file_lock(path):
        yield


def _counts(read_json, members: dict[str, str], contents: dict[str, dict]) -> dict[str, int]:
    """``read_json(archive path, member)``: the member parsed, and the archive's name for errors."""
    counts: dict[str, int] = {}
    for split, rel in ANNOTATION_FILES.items():
        if split in contents:
            counts[f"{split}_images"] = contents[split]["images"]
        data, archive = read_json(members["annotations"], rel)
        if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations")):
            raise DataError(f"{archive}:{rel}: not a COCO caption file (it needs lists 'images' and 'annotations')")
        counts[f"{split}_annotated_images"] = len(data["images"])
        counts[f"{split}_captions"] = len(data["annotations"])
    return counts


def log_raw_data(cfg: DataConfig, out_dir: str | Path, scratch: str | Path | None = None) -> StepResult:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(scratch) if scratch else out_dir.with_name(out_dir.name + ".scratch")
    base = cfg.base_url
    if base == DEMO_SOURCE:
        base = str(demo_mirror(scratch).resolve())
    in_bucket = bucket_cache.is_bucket(cfg.download_cache)
    if in_bucket:
        bucket_cache.check_bucket(cfg.download_cache)
    cache = (check_writable(cfg.download_cache, "data.download_cache") if cfg.download_cache and not in_bucket
             else None)
    files: dict[str, dict] = {}
    members: dict[str, str] = {}  # top-level folder -> the archive holding it (relative to out_dir)
    contents: dict[str, dict] = {}
    downloaded = 0
    limits = (cfg.max_expanded_bytes, cfg.max_expansion_ratio)
    in_bucket_objects: dict[str, bucket_cache.CachedObject] = {}

    def fetch_into_bucket(url: str, rel: str, expected_sha256: str | None, hook) -> tuple[dict, dict, bool]:
        """One archive in the bucket cache: found there (its central directory read in place), or downloaded
        into scratch, checked and uploaded. The entry adds the object's generation and CRC32C."""
        found = bucket_cache.lookup(cfg.download_cache, rel)
        if bucket_cache.reusable(found, redact(url), expected_sha256):
            with bucket_cache.open_object(cfg.download_cache, found) as reader:
                held = index_archive(found.uri, *limits, fileobj=reader)
            entry, fresh = {"source": redact(url), "size": found.size, "sha256": found.sha256}, False
        else:
            staging = scratch / "download-cache" / rel
            record = download(
                url, staging, expected_sha256=expected_sha256, retries=cfg.retries, backoff_s=cfg.retry_backoff_s,
                timeout_s=cfg.timeout_s, transfer_timeout_s=cfg.transfer_timeout_s, progress=hook,
                check=lambda path: check_archive(path, *limits),
            )
            held = index_archive(staging, *limits)
            found = bucket_cache.upload(staging, cfg.download_cache, rel, record.sha256, redact(url))
            bucket_cache.remove_local(staging)
            entry, fresh = redact_tree(record_dict(record)), True
            entry.pop("downloaded", None)
        entry.update(path=rel, contents=held, generation=found.generation, crc32c=found.crc32c)
        in_bucket_objects[rel] = found
        return entry, held, fresh

    def fetch(url: str, rel: str, expected_sha256: str | None, hook) -> tuple[dict, dict, bool]:
        """One archive into ARCHIVES/rel (through the cache when there is one): its manifest entry, what it
        holds, and whether it was downloaded now."""
        if in_bucket:
            return fetch_into_bucket(url, rel, expected_sha256, hook)
        dest = out_dir / ARCHIVES / rel
        fetched = cache / rel if cache else dest
        placed = fetched if cache else dest
        with _locked(fetched, shared=cache is not None):
            record = download(
                url, fetched, expected_sha256=expected_sha256, retries=cfg.retries,
                backoff_s=cfg.retry_backoff_s, timeout_s=cfg.timeout_s, transfer_timeout_s=cfg.transfer_timeout_s,
                progress=hook, check=lambda path: check_archive(path, *limits),
            )
            try:
                held = index_archive(fetched, *limits)  # every entry checked before anything is read
            except CaptioningError:
                unverify(fetched)  # verified under other limits, or changed since: never trusted again
                raise
        entry = redact_tree(record_dict(record))  # the manifest is an artifact: no URL password in it
        # With a cache the archives stay there and the artifact names them: 20 GB neither uploaded nor downloaded.
        entry["path"] = str(placed.relative_to(cache if cache else out_dir))
        entry["contents"] = held
        return entry, held, record.downloaded

    split_file = None
    with _progress_bar() as hook:
        for rel in cfg.files:
            url = join_url(base, rel)
            entry, held, fresh = fetch(url, rel, cfg.sha256.get(rel) if cfg.verify_sha256 else None, hook)
            for top in held:
                if top in members:
                    raise DataError(f"{redact(url)}: holds {top}/, which {files_by_path(files, members[top])} "
                                    "already holds; one archive must not replace another's files")
                members[top] = entry["path"]
            contents.update(held)
            downloaded += entry["size"] if fresh else 0
            files[rel] = entry
        if cfg.split == "karpathy":
            url = cfg.split_url if "://" in cfg.split_url else join_url(base, cfg.split_url)
            entry, held, fresh = fetch(url, KARPATHY_ARCHIVE, cfg.split_sha256 if cfg.verify_sha256 else None, hook)
            if KARPATHY_MEMBER not in held:
                raise DataError(f"{redact(url)} (data.split_url): holds no {KARPATHY_MEMBER}, only "
                                f"{', '.join(sorted(held)) or 'nothing'}; is it Karpathy's caption_datasets.zip?")
            downloaded += entry["size"] if fresh else 0
            files[KARPATHY_ARCHIVE] = entry
            split_file = {"archive": entry["path"], "member": KARPATHY_MEMBER}
    for split, rel in ANNOTATION_FILES.items():
        top = rel.split("/", 1)[0]
        if top not in members:
            raise DataError(f"{redact(base)}: the archives hold no {rel}; is data.base_url a COCO 2014 mirror?")

    def read_json(path: str, member: str):
        if in_bucket:
            found = in_bucket_objects[path]
            with bucket_cache.open_object(cfg.download_cache, found) as reader:
                return read_json_member(found.uri, member, "COCO caption file", reader), found.uri
        archive = (cache or out_dir) / path
        return read_json_member(archive, member, "COCO caption file"), archive

    counts = _counts(read_json, members, contents)
    manifest = {
        "format": "coco-archives/1",
        "base_url": redact(cfg.base_url),
        "resolved_base_url": redact(base),
        "files": files,
        "members": members,
        "annotations": ANNOTATION_FILES,
        "image_dirs": {split: split for split in ANNOTATION_FILES},
        "counts": counts,
    }
    if split_file:
        manifest["split_file"] = split_file
    if cache:  # process_data reads the archives in the cache (the same volume, mounted at the same path)
        manifest["archive_root"] = str(cache.resolve())
    elif in_bucket:  # process_data reads them in the bucket (through Vertex AI's mount)
        manifest["archive_root"] = cfg.download_cache.rstrip("/")
    write_json_atomic(out_dir / MANIFEST, manifest)
    in_artifact = [] if cache or in_bucket else list(files.values())
    _prune(out_dir, {MANIFEST, *(f["path"] for f in in_artifact), *(str(sidecar(Path(f["path"]))) for f in in_artifact)})
    metrics = {"bytes": sum(f["size"] for f in files.values()), "bytes_downloaded": downloaded, **counts}
    return StepResult(metrics=metrics, outputs={"raw_data": str(out_dir), "manifest": str(out_dir / MANIFEST)})


def _prune(folder: Path, keep: set[str], rel: str = "") -> None:
    """The artifact holds the manifest and its archives only: archives dropped from data.files, partial
    downloads and an older layout's extracted tree (work dirs reused in-process) are removed."""
    for path in sorted(folder.iterdir()):
        name = f"{rel}{path.name}"
        is_dir = path.is_dir() and not path.is_symlink()
        if is_dir and any(k.startswith(name + "/") for k in keep):
            _prune(path, keep, name + "/")
        elif name not in keep and name != RESULT_FILE:
            shutil.rmtree(path) if is_dir else path.unlink()
            log.info("log_raw_data: removed %s, which the manifest does not list", path)


def files_by_path(files: dict[str, dict], path: str) -> str:
    return next((rel for rel, f in files.items() if f["path"] == path), path)
