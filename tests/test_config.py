import contextlib
from pathlib import Path

import pytest

from captioning.config import COCO_BASE_URL, load_config
from captioning.errors import ConfigError


def test_demo_is_default_and_runs_offline():
    cfg = load_config()
    assert cfg.data.base_url == "demo"
    assert cfg.features.weights == "none"
    assert cfg.data.max_images is None


def test_coco_preset_uses_the_official_mirror_and_all_images():
    cfg = load_config(preset="coco2014")
    assert cfg.data.base_url == COCO_BASE_URL
    assert cfg.data.max_images is None
    assert cfg.data.val_images is None and cfg.data.test_images is None  # Karpathy-proportional
    assert cfg.features.weights == "imagenet"
    # Every archive is verified: a mirror serving other bytes fails instead of being answered from the cache.
    assert sorted(cfg.data.sha256) == sorted(cfg.data.files)
    assert cfg.data.sha256["zips/train2014.zip"].startswith("ede4087e")
    assert load_config(preset="demo").data.sha256 == {}


def test_checksums_are_checked_as_settings():
    with pytest.raises(ConfigError, match="zips/val2014.zip: 'abc' is not a SHA-256"):
        load_config(preset="coco2014", overrides=["data.sha256={zips/val2014.zip: abc}"])
    with pytest.raises(ConfigError, match="sha256 names zips/test2014.zip, which data.files does not list"):
        load_config(preset="coco2014", overrides=["data.sha256={zips/test2014.zip: " + "a" * 64 + "}"])


def test_overrides_are_typed_from_yaml_scalars():
    cfg = load_config(overrides=["data.max_images=250", "train.epochs=3", "features.weights=/tmp/w.h5",
                                 "data.base_url=http://127.0.0.1:9/coco/"])
    assert cfg.data.max_images == 250 and isinstance(cfg.data.max_images, int)
    assert cfg.train.epochs == 3
    assert cfg.features.weights == "/tmp/w.h5"
    assert cfg.data.base_url == "http://127.0.0.1:9/coco"
    # YAML 1.1 reads a bare on/off as a boolean; the setting still means the word.
    assert load_config(overrides=["train.mixed_precision=on"]).train.mixed_precision == "on"
    assert load_config(overrides=["train.mixed_precision=off"]).train.mixed_precision == "off"


def test_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 7\n  units: 64\n")
    cfg = load_config(path, ["train.units=32"])
    assert (cfg.train.epochs, cfg.train.units) == (7, 32)


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.max_imagez=3", "data.max_imagez: unknown key"),
        ("nosuch.key=1", "nosuch: unknown key"),
        ("train.epochs=many", "train.epochs: Input should be a valid integer"),
        ("data.max_images=0", "data.max_images: Input should be greater than 0"),
        ("train.dropout=1.5", "train.dropout: Input should be less than 1"),
        ("train.batch_size=4", "train: Value error, batch_size 4 is less than captions_per_image 5"),
        ("train.feature_memory=lots", "train.feature_memory: String should match pattern"),
        ("data.base_url=ftp://x", "data.base_url: Value error, unsupported scheme 'ftp'"),
    ],
)
def test_bad_settings_name_the_key_and_the_problem(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    assert message in str(err.value)


def test_bad_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="missing.yaml: config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="bad.yaml: a config file must be a mapping"):
        load_config(bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("trian:\n  epochs: 2\n")
    with pytest.raises(ConfigError, match=r"typo.yaml: trian: unknown key"):
        load_config(typo)


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(overrides=["epochs"])
    with pytest.raises(ConfigError, match="must name a section and a key"):
        load_config(overrides=["epochs=3"])
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config(preset="imagenet")


@pytest.mark.parametrize("setting, problem", [
    ("train.learning_rate=.inf", "train.learning_rate: Input should be a finite number"),
    ("promote.margin=.nan", "promote.margin: Input should be a finite number"),
    ("promote.min_metric=-.inf", "promote.min_metric: Input should be a finite number"),
    ("data.timeout_s=.inf", "data.timeout_s: Input should be a finite number"),
    ("features.seed=-1", "features.seed: Input should be greater than or equal to 0"),
    ("train.seed=4294967296", "train.seed: Input should be less than or equal to 2147483647"),
    ("data.seed=-5", "data.seed: Input should be greater than or equal to 0"),
    ("train.units=10000000", "train.units: Input should be less than or equal to 8192"),
    ("train.embedding_dim=100000", "train.embedding_dim: Input should be less than or equal to 4096"),
    ("data.max_images=100000000", "data.max_images: Input should be less than or equal to 10000000"),
    ("evaluate.batch_size=100000", "evaluate.batch_size: Input should be less than or equal to 4096"),
    ("train.decode_length_penalties=[.nan]", "train.decode_length_penalties.0"),
    # Issue 14, point 2: data.files name paths under the step's folder too; none may lead out of it
    ('data.files=["/etc/passwd.zip"]', "data.files: Value error, '/etc/passwd.zip' is not a relative path"),
    ('data.files=["zips/../../../x.zip"]', "data.files: Value error, 'zips/../../../x.zip' is not a relative path"),
    ('data.files=["zips/train2014.tar"]', "data.files: Value error, 'zips/train2014.tar' is not a relative path to a .zip"),
    ("data.files=[]", "data.files: Value error, lists no archive"),
    ('data.files=["a.zip", "a.zip"]', "data.files: Value error, lists an archive twice"),
    ('data.files=["a.zip\\0x.zip"]', "x00x.zip' is not a relative path to a .zip"),  # a NUL inside
    ('data.files=["a.zip", "a.zip/b.zip"]', "data.files: Value error, 'a.zip/b.zip' would lie inside the archive"),
])
def test_settings_that_cannot_work_are_refused_naming_the_key(setting, problem):
    """Issue 14, point 4: finite numbers only, seeds in range, sizes a GPU can hold."""
    with pytest.raises(ConfigError, match=problem.replace(".", r"\.")):
        load_config(overrides=[setting])


def test_a_refused_setting_exits_2_before_any_work(tmp_path):
    from conftest import captioning_cli

    proc = captioning_cli("run", "--workdir", str(tmp_path / "work"), "--set", "train.learning_rate=.inf")
    assert proc.returncode == 2
    assert "train.learning_rate: Input should be a finite number (got inf)" in proc.stderr
    assert not (tmp_path / "work").exists()


def test_json_outputs_never_hold_nan_or_infinity(tmp_path):
    import json

    from captioning.io import write_json_atomic

    path = write_json_atomic(tmp_path / "m.json", {"CIDEr": float("nan"), "rows": [1.5, float("inf")], "n": 3})
    assert json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"wrote {c}")) == {
        "CIDEr": None, "rows": [1.5, None], "n": 3}


def _alias_bomb() -> str:
    """Nine levels of nine aliases: a few hundred bytes that expand to 9**9 strings if anything walks them."""
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for level in range(1, 9):
        lines.append(f"l{level}: &l{level} [{', '.join([f'*l{level - 1}'] * 9)}]")
    return "\n".join(lines) + "\ntrain:\n  decode_beam_widths: *l8\n"


@pytest.mark.parametrize("name, content, problem", [
    ("folder.yaml", None, "a directory, not a config file"),
    ("binary.yaml", b"\xff\xfe\x00\x01", "not UTF-8 text (byte 0)"),
    ("latin1.yaml", "train:\n  epochs: caf\xe9\n".encode("latin-1"), "not UTF-8 text (byte 20)"),
    ("nul.yaml", b"train:\n  epochs: 3\x00\n", "a binary file, not a YAML config file"),
    ("deep.yaml", ("a: " + "[" * 5000 + "]" * 5000 + "\n").encode(), "nested too deeply to be a config file"),
    ("huge.yaml", b"# " + b"x" * (1 << 20) + b"\n", "1048579 bytes; a config file holds at most 1048576"),
])
def test_config_files_that_are_not_config_files_are_refused_naming_the_file(tmp_path, name, content, problem):
    """Issue 14, point 7: a clear error naming the file, never a traceback."""
    path = tmp_path / name
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=f"^{path}: {problem}".replace("(", r"\(").replace(")", r"\)")):
        load_config(path)


def test_an_alias_bomb_gives_a_short_error_quickly(tmp_path):
    import time

    path = tmp_path / "bomb.yaml"
    path.write_text(_alias_bomb())
    started = time.monotonic()
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert time.monotonic() - started < 10  # 50 s and a 35 MB message when the whole list was printed
    assert f"{path}: train.decode_beam_widths.0: Input should be a valid integer (got [[[...]" in str(err.value)
    assert len(str(err.value)) < 5000


def test_a_device_is_refused_and_a_pipe_is_read_with_a_bound(tmp_path):
    """Review of issue 14: /dev/zero grew memory without end; a pipe (--config <(envsubst < f.yaml)) is a
    fine config source, read up to the size limit."""
    import os
    import threading

    with pytest.raises(ConfigError, match="^/dev/zero: a device, not a config file"):
        load_config(Path("/dev/zero"))
    for content, problem in ((b"train:\n  epochs: 3\n", None), (b"#" * ((1 << 20) + 10), "over 1048576 bytes")):
        fifo = tmp_path / f"settings-{len(content)}.yaml"
        os.mkfifo(fifo)

        def feed(fifo=fifo, content=content):
            with open(fifo, "wb") as fh, contextlib.suppress(BrokenPipeError):
                fh.write(content)

        writer = threading.Thread(target=feed, daemon=True)
        writer.start()
        if problem:
            with pytest.raises(ConfigError, match=f"^{fifo}: {problem}"):
                load_config(fifo)
        else:
            assert load_config(fifo).train.epochs == 3
        writer.join(5)


@pytest.mark.parametrize("setting, value, why", [
    ("promote.alias", "prod/../../x", "String should match pattern"),
    ("promote.alias", "a" * 129, "at most 128 characters"),
    ("promote.collection", "c" * 300, "at most 128 characters"),
    ("promote.alias", "v3", "W&B manages latest and vN itself"),
    ("promote.alias", "latest", "W&B manages latest and vN itself"),
    ("promote.registry", "/tmp/" + "r" * 300 + "/reg", "a path component of 300 bytes"),
    ("train.checkpoint_dir", "/tmp/" + "c" * 256, "a path component of 256 bytes"),
    ("data.download_cache", "gs://bucket/" + "p" * 300, "a path component of 300 bytes"),
])
def test_settings_that_name_registry_files_are_refused_up_front(setting, value, why):
    """Issue 27, case 11: a 300-character collection trained and evaluated, then failed with 'File name too
    long'; an alias serve cannot read back was accepted. Both are exit 2 before anything runs."""
    from conftest import captioning_cli

    proc = captioning_cli("run", "--workdir", "/nonexistent/never-created", "--set", f"{setting}={value}", timeout=120)
    assert proc.returncode == 2 and f"{setting}: " in proc.stderr and why in proc.stderr, proc.stderr


def test_a_summary_path_the_file_system_cannot_hold_is_exit_2(tmp_path):
    from conftest import captioning_cli

    long_name = tmp_path / ("s" * 300 + ".json")
    proc = captioning_cli("run", "--workdir", str(tmp_path / "work"), "--summary-json", str(long_name), timeout=120)
    assert proc.returncode == 2 and "--summary-json" in proc.stderr and "File name too long" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "work").exists()
