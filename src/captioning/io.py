"""Small file helpers: atomic writes so a killed step never leaves half a file."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_json_atomic(path: str | Path, data: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False))
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
