"""The console command as a user runs it."""

import json
import os
import stat

import pytest

from conftest import captioning_cli


@pytest.mark.slow
def test_run_on_a_loopback_mirror_writes_the_summary(http_mirror, small_mirror, tmp_path):
    summary_path = tmp_path / "out" / "summary.json"
    proc = captioning_cli(
        "run", "--workdir", str(tmp_path / "work"), "--summary-json", str(summary_path),
        "--set", f"data.base_url={http_mirror.url}", "--set", "features.weights=none",
        "--set", "data.val_images=5", "--set", "data.test_images=5", "--set", "data.max_images=50",
        "--set", "train.scst_epochs=0", "--set", "train.epochs=2", "--set", "train.units=32",
        "--set", "train.embedding_dim=16", "--set", "evaluate.attention_samples=1",
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(summary_path.read_text())
    steps = summary["steps"]
    assert list(steps) == ["log_raw_data", "process_data", "train", "evaluate", "promote"]
    assert steps["log_raw_data"]["status"] == "ok"
    data = steps["process_data"]
    assert data["status"] == "ok"
    assert data["metrics"]["images"] + len([s for s in data["skipped"] if s["reason"] != "no usable caption"]) <= 50
    assert data["metrics"]["val_images"] == 5 and data["metrics"]["test_images"] == 5
    assert data["metrics"]["captions"] >= 4 * data["metrics"]["images"]
    assert all(set(s) == {"file", "reason"} for s in data["skipped"])
    for part in ("train", "test"):
        assert (tmp_path / "work" / "processed" / part / "dataset.json").is_file()
        assert data["outputs"][f"{part}_data"] == str(tmp_path / "work" / "processed" / part)
    # everything stayed in the work dir
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "work"]


def test_bad_setting_exits_non_zero_naming_the_key(tmp_path):
    proc = captioning_cli("run", "--workdir", str(tmp_path), "--set", "train.epochz=3")
    assert proc.returncode == 2
    assert "train.epochz: unknown key" in proc.stderr
    assert not (tmp_path / "summary.json").exists()


def test_unreachable_mirror_fails_the_step_with_the_url(tmp_path):
    proc = captioning_cli("run", "--workdir", str(tmp_path), "--set", f"data.base_url={tmp_path}/no-mirror",
                          "--set", "data.retries=0")
    assert proc.returncode == 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"]["log_raw_data"]["status"] == "failed"
    assert "no-mirror/annotations/annotations_trainval2014.zip: file not found" in summary["steps"]["log_raw_data"]["error"]
    assert summary["steps"]["process_data"]["status"] == "skipped"


@pytest.mark.slow
def test_bench_features_prints_one_json_line():
    proc = captioning_cli("bench", "features", "--images", "8", "--batch", "4", "--repeats", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    line = json.loads(proc.stdout.strip().splitlines()[-1])
    assert line["bytes_per_image"] == 64 * 2048 * 2
    assert line["images_per_s"] > 0 and line["model_only_images_per_s"] > 0


HOLD_WORKDIR = """
import sys, time
from captioning.io import exclusive_workdir
with exclusive_workdir(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def test_one_run_per_work_dir_and_a_killed_runs_lock_is_taken_over(tmp_path):
    """Issue 14, point 6: a second run on a busy work dir is refused at once, naming the dir and the holder."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from captioning.io import LOCK_FILE, exclusive_workdir

    work = tmp_path / "work"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_WORKDIR, str(work)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        proc = captioning_cli("run", "--workdir", str(work))
        assert proc.returncode == 2
        assert f"--workdir {work}: busy, another run (PID {holder.pid}) is using it" in proc.stderr
        assert time.monotonic() - started < 60  # refused at once, not after waiting
        assert not (work / "summary.json").exists() and sorted(p.name for p in work.iterdir()) == [LOCK_FILE]
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    with exclusive_workdir(work):  # the killed run's lock file is still there, and free
        assert (work / LOCK_FILE).read_text() == f"{os.getpid()}\n"


def test_a_workdir_that_is_a_file_or_a_summary_path_that_is_a_folder_is_refused_before_any_work(tmp_path):
    """Issue 14, point 7."""
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    proc = captioning_cli("run", "--workdir", str(afile))
    assert proc.returncode == 2 and f"--workdir {afile}: a file, not a folder" in proc.stderr
    folder = tmp_path / "summary-here"
    folder.mkdir()
    proc = captioning_cli("run", "--workdir", str(tmp_path / "work"), "--summary-json", str(folder))
    assert proc.returncode == 2 and f"--summary-json {folder}: a directory; name a regular file" in proc.stderr
    assert not (tmp_path / "work").exists()
    # Issue 27, case 5: a device node (here a FIFO, which needs no root) is refused, not replaced by a file
    fifo = tmp_path / "summary.fifo"
    os.mkfifo(fifo)
    proc = captioning_cli("run", "--workdir", str(tmp_path / "work"), "--summary-json", str(fifo))
    assert proc.returncode == 2 and f"--summary-json {fifo}: a FIFO; name a regular file" in proc.stderr
    assert stat.S_ISFIFO(fifo.stat().st_mode) and not (tmp_path / "work").exists()


def test_no_output_replaces_what_is_not_a_regular_file(tmp_path):
    from captioning.errors import CaptioningError
    from captioning.io import write_json_atomic

    fifo = tmp_path / "out.json"
    os.mkfifo(fifo)
    with pytest.raises(CaptioningError, match=rf"{fifo}: a FIFO; refusing to replace it with a file"):
        write_json_atomic(fifo, {"a": 1})
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    write_json_atomic(tmp_path / "plain.json", {"a": 1})
    write_json_atomic(tmp_path / "plain.json", {"a": 2})  # a regular file is replaced as before
