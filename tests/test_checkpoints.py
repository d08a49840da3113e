"""train's resume folder: the key, early stopping across restarts, and the gs:// mirror (on the GCS emulator)."""

import os

import pytest

from captioning.checkpoints import RESUME_POINT, CheckpointFolder
from captioning.errors import ConfigError


def test_early_stopping_is_replayed_from_the_history():
    from captioning.steps.train import _epochs_without_improvement

    rows = [{"epoch": i, "val_CIDEr": v} for i, v in enumerate([0.3, 0.5, 0.4, 0.45, 0.6, 0.55, 0.5])]
    assert _epochs_without_improvement(rows[:2], "val_CIDEr") == 0
    assert _epochs_without_improvement(rows[:4], "val_CIDEr") == 2
    assert _epochs_without_improvement(rows, "val_CIDEr") == 2  # 0.6 at epoch 4 reset it
    assert _epochs_without_improvement([], "val_CIDEr") == 0


@pytest.fixture
def bucket(gcs_emulator):
    from captioning.gcs import storage_client

    return storage_client().create_bucket("ckpts")


def test_a_new_pod_restores_the_keyed_folder_and_uploads_what_changed(bucket, tmp_path):
    first = CheckpointFolder("gs://ckpts/runs", "abc", tmp_path / "pod1")
    assert str(first) == "gs://ckpts/runs/train-abc" and first.restore() == 0
    (first.folder / "checkpoints" / "backup").mkdir(parents=True)
    (first.folder / "history.csv").write_text("epoch,loss\n0,1.0\n")
    (first.folder / RESUME_POINT).write_text('{"epoch": 0}')
    assert first.save() == 2 and first.save() == 0  # nothing changed since
    bucket.blob("runs/train-abc/checkpoints/").upload_from_string(b"")  # a console-made "folder" object

    second = CheckpointFolder("gs://ckpts/runs", "abc", tmp_path / "pod2")
    (second.folder / "stale-local.txt").write_text("never uploaded")
    assert second.restore() == 2
    assert (second.folder / "history.csv").read_text() == "epoch,loss\n0,1.0\n"
    assert second.save() == 1  # the local-only file was not taken for uploaded
    names = sorted(b.name for b in bucket.client.list_blobs(bucket))
    assert "runs/train-abc/stale-local.txt" in names and not any(".write-probe" in n for n in names)
    other = CheckpointFolder("gs://ckpts/runs", "other-key", tmp_path / "pod3")
    assert other.restore() == 0  # another key never sees these files


def test_checkpoint_folders_that_cannot_be_used_are_named(gcs_emulator, tmp_path):
    with pytest.raises(ConfigError, match="train.checkpoint_dir=gs://no-such-bucket/x/train-k"):
        CheckpointFolder("gs://no-such-bucket/x", "k", tmp_path).restore()
    with pytest.raises(ConfigError, match="use a local folder .* or gs://bucket/path"):
        CheckpointFolder("s3://bucket/x", "k", tmp_path)
    if os.geteuid() != 0:  # root writes anywhere
        read_only = tmp_path / "ro"
        read_only.mkdir(mode=0o555)
        with pytest.raises(ConfigError, match="train.checkpoint_dir=.*not writable"):
            CheckpointFolder(read_only / "x", "k", tmp_path)


def test_history_csv_is_rewritten_whole_so_two_writers_never_leave_two_headers(tmp_path):
    """Issue 14, point 6: Keras' CSVLogger appended in place; two staggered runs wrote two headers."""
    from captioning.steps.train import _history_csv, _read_history

    path = tmp_path / "history.csv"
    first, second = _history_csv(path), _history_csv(path)
    first.on_epoch_end(0, {"loss": 2.0, "val_CIDEr": 0.5})
    second.on_epoch_end(0, {"loss": 1.9, "val_CIDEr": 0.6})  # the same epoch again: its last row is kept
    first.on_epoch_end(1, {"loss": 1.5, "val_CIDEr": 0.7})
    text = path.read_text().splitlines()
    assert text[0] == "epoch,loss,val_CIDEr" and text.count(text[0]) == 1 and len(text) == 3
    assert _read_history(path) == [{"epoch": 0, "loss": 1.9, "val_CIDEr": 0.6},
                                   {"epoch": 1, "loss": 1.5, "val_CIDEr": 0.7}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["history.csv"]  # no temporary file left
