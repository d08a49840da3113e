"""The promise of the README: `captioning run` with no arguments trains a model that looks at images."""

import json

import pytest

from conftest import captioning_cli

pytestmark = pytest.mark.slow


def test_demo_beats_the_blind_baseline_twice_over(tmp_path):
    proc = captioning_cli("run", cwd=tmp_path, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "work" / "summary.json").read_text())
    assert {s["status"] for s in summary["steps"].values()} == {"ok"}
    metrics = summary["steps"]["evaluate"]["metrics"]
    assert metrics["CIDEr"] >= 2 * metrics["baseline_CIDEr"], metrics
    assert summary["steps"]["promote"]["metrics"]["promoted"] is True
    assert summary["steps"]["process_data"]["metrics"]["skipped_files"] == 4
    assert summary["config"]["wandb"]["mode"] == "offline"
