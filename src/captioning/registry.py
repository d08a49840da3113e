"""The local model registry (for in-process and offline runs), a folder, and the promotion rule.

```
<registry>/<collection>/versions/vN/   model files + metrics.json
<registry>/<collection>/aliases.json   {"production": "vN"}
<registry>/<collection>/decisions.jsonl  every decision, promoted or not
```

Used by the promote step, by the W&B promote (``records``) and by ``model_source`` to resolve an alias.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
from pathlib import Path

from captioning.errors import DataError
from captioning.io import file_lock, read_json, removed_on_failure, require_free_space, tree_size, write_json_atomic


def decide(candidate: float, production: float | None, margin: float) -> bool:
    return production is None or candidate > production + margin


class LocalRegistry:
    def __init__(self, root: Path, collection: str):
        self.root = Path(root) / collection
        self.aliases_file = self.root / "aliases.json"

    def aliases(self) -> dict[str, str]:
        return read_json(self.aliases_file) if self.aliases_file.exists() else {}

    def holder(self, alias: str) -> tuple[str, dict] | None:
        version = self.aliases().get(alias)
        if not version:
            return None
        return version, read_json(self.root / "versions" / version / "metrics.json", "registered metrics")

    @contextlib.contextmanager
    def transaction(self):
        """versions.lock: promotes sharing a registry take turns for the whole read-decide-write, so two
        promotes started together cannot both decide against the same production model."""
        versions = self.root / "versions"
        versions.mkdir(parents=True, exist_ok=True)
        with file_lock(versions):
            yield

    def register(self, model_dir: Path, metrics: dict, alias: str) -> str:
        with self.transaction():
            return self.register_in_transaction(model_dir, metrics, alias)

    def register_in_transaction(self, model_dir: Path, metrics: dict, alias: str) -> str:
        versions = self.root / "versions"
        number = 1 + max((int(p.name[1:]) for p in versions.glob("v*") if p.name[1:].isdigit()), default=0)
        version = f"v{number}"
        staging = versions / f".{version}.staging"
        shutil.rmtree(staging, ignore_errors=True)  # what a failed promote left
        require_free_space(versions, tree_size(Path(model_dir))["bytes"], f"registering {version}")
        with removed_on_failure(staging):
            shutil.copytree(model_dir, staging)
            write_json_atomic(staging / "metrics.json", metrics)
        staging.rename(versions / version)
        write_json_atomic(self.aliases_file, {**self.aliases(), alias: version})
        return version

    def log_decision(self, decision: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        log_file = self.root / "decisions.jsonl"
        # O_NOFOLLOW and a regular-file check: a FIFO there would block every promote holding the lock
        try:
            fd = os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
        except OSError as exc:  # a symbolic link (ELOOP), a FIFO nobody reads (ENXIO)
            raise DataError(f"{log_file}: cannot append the decision: {exc.strerror or exc}") from None
        with os.fdopen(fd, "a") as fh:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise DataError(f"{log_file}: not a regular file; refusing to append the decision to it")
            fh.write(json.dumps(decision) + "\n")
