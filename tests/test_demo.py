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
    assert metrics["CIDEr"] >= 3 * metrics["baseline_CIDEr"], metrics
    # Scenes with two objects and a relation are in the test split, and the share of captions that name
    # all of a scene is reported beside the COCO metrics; it beats what guessing the relation could get.
    assert metrics["two_object_scenes"] >= 150 and metrics["scenes_correct"] > 0.25, metrics
    # The recipe chosen on validation (no attention penalty, then self-critical epochs): 0.39 on this machine.
    assert metrics["two_object_scenes_correct"] >= 0.3, metrics
    train = summary["steps"]["train"]["metrics"]
    assert train["scst_epochs"] >= 1 and train["val_CIDEr"] >= train["xe_val_CIDEr"], train
    assert summary["steps"]["promote"]["metrics"]["promoted"] is True
    assert summary["steps"]["process_data"]["metrics"]["skipped_files"] == 4
    assert summary["config"]["wandb"]["mode"] == "offline"


def test_a_demo_mirror_of_other_sizes_is_written_again_not_reused(tmp_path, monkeypatch):
    """An old work dir keeps the mirror an earlier version wrote; the sizes in its marker tell it apart.
    (write_coco_mirror stubbed: only the decision is under test, the real writer runs in the demo test.)"""
    import json

    from captioning.data import demo
    from captioning.steps.log_raw_data import demo_mirror

    calls = []
    monkeypatch.setattr(demo, "write_coco_mirror", lambda root: calls.append(root) or {
        "train_images": demo.DEMO_TRAIN_IMAGES, "val_images": demo.DEMO_VAL_IMAGES})
    root = tmp_path / "demo-mirror"
    root.mkdir()
    (root / ".complete").write_text(json.dumps({"train_images": 900, "val_images": 300}))
    demo_mirror(tmp_path)
    demo_mirror(tmp_path)
    assert calls == [root]  # rewritten once, then reused
