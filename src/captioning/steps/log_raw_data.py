"""log_raw_data: fetch the COCO 2014 archives, verify them, extract them safely.

Output: ``manifest.json`` (sources, sizes, checksums, counts; paths relative
to the manifest) beside ``downloads/`` and ``extracted/``.
"""

from __future__ import annotations

import fcntl
import json
import logging
import sys
from contextlib import contextmanager
from pathlib import Path

from captioning.config import DEMO_SOURCE, DataConfig
from captioning.data.archive import safe_extract
from captioning.data.fetch import download, join_url, record_dict
from captioning.errors import DataError
from captioning.io import write_json_atomic
from captioning.steps.result import StepResult

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
ANNOTATION_FILES = {"train2014": "annotations/captions_train2014.json", "val2014": "annotations/captions_val2014.json"}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


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


def demo_mirror(out_dir: Path) -> Path:
    """Write the synthetic COCO-layout mirror once, inside the step's folder."""
    from captioning.data.demo import write_coco_mirror

    root = out_dir / "demo-mirror"
    marker = root / ".complete"
    if not marker.exists():
        info = write_coco_mirror(root)
        marker.write_text(json.dumps(info))
    return root


@contextmanager
def _locked(path: Path):
    """An exclusive lock beside ``path``: runs sharing one download cache (a PVC) take turns per file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def count_extracted(root: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for split, rel in ANNOTATION_FILES.items():
        folder = root / split
        if folder.is_dir():
            counts[f"{split}_images"] = sum(1 for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        ann = root / rel
        if ann.is_file():
            data = json.loads(ann.read_text())
            counts[f"{split}_annotated_images"] = len(data.get("images", []))
            counts[f"{split}_captions"] = len(data.get("annotations", []))
    return counts


def log_raw_data(cfg: DataConfig, out_dir: str | Path) -> StepResult:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = cfg.base_url
    if base == DEMO_SOURCE:
        base = str(demo_mirror(out_dir).resolve())
    extracted = out_dir / "extracted"
    downloads = Path(cfg.download_cache) if cfg.download_cache else out_dir / "downloads"
    files = {}
    downloaded = 0
    with _progress_bar() as hook:
        for rel in cfg.files:
            url = join_url(base, rel)
            dest = downloads / rel
            with _locked(dest):
                record = download(
                    url, dest, expected_sha256=cfg.sha256.get(rel), retries=cfg.retries,
                    backoff_s=cfg.retry_backoff_s, timeout_s=cfg.timeout_s, progress=hook,
                )
                top_level = safe_extract(dest, extracted, record.sha256)
            downloaded += record.size if record.downloaded else 0
            entry = record_dict(record)
            entry["path"] = str(dest.relative_to(out_dir)) if dest.is_relative_to(out_dir) else str(dest)
            entry["extracted"] = top_level
            files[rel] = entry
    counts = count_extracted(extracted)
    for rel in ANNOTATION_FILES.values():
        if not (extracted / rel).is_file():
            raise DataError(f"{base}: the archives hold no {rel}; is data.base_url a COCO 2014 mirror?")
    manifest = {
        "base_url": cfg.base_url,
        "resolved_base_url": base,
        "files": files,
        "root": "extracted",
        "annotations": ANNOTATION_FILES,
        "image_dirs": {split: split for split in ANNOTATION_FILES},
        "counts": counts,
    }
    write_json_atomic(out_dir / MANIFEST, manifest)
    metrics = {"bytes": sum(f["size"] for f in files.values()), "bytes_downloaded": downloaded, **counts}
    return StepResult(metrics=metrics, outputs={"raw_data": str(out_dir), "manifest": str(out_dir / MANIFEST)})
