"""Offline W&B runs read back as W&B itself reads them (`wandb leet inspect --json`)."""

import json
import subprocess
import sys
from pathlib import Path


def leet_records(run_dir) -> list[dict]:
    exe = str(Path(sys.executable).parent / "wandb")
    proc = subprocess.run([exe, "leet", "inspect", "--json", str(run_dir)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def logged_artifacts(records: list[dict]) -> dict[str, dict]:
    return {r["artifact"]["name"]: r["artifact"] for r in records if r["type"] == "artifact"}


def references(artifact: dict) -> list[str]:
    return [e["ref"] for e in artifact["manifest"]["contents"] if e.get("ref")]
