"""log_raw_data + process_data on a COCO-layout mirror served over loopback HTTP."""

import json
from pathlib import Path

import numpy as np
import pytest

from captioning.config import load_config
from captioning.errors import DataError
from captioning.steps.process_data import held_out_sizes, split_images

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def extractor():
    from captioning.features import FeatureExtractor

    return FeatureExtractor("none")


@pytest.fixture(scope="session")
def processed(small_mirror, extractor, tmp_path_factory):
    from helpers.http_mirror import HttpMirror

    from captioning.steps.log_raw_data import log_raw_data
    from captioning.steps.process_data import process_data

    work = tmp_path_factory.mktemp("work")
    with HttpMirror(Path(small_mirror["root"])) as server:
        cfg = load_config(overrides=[f"data.base_url={server.url}", "data.val_images=8", "data.test_images=8",
                                     "features.shard_images=16", "features.batch_size=8",
                                     "features.max_image_pixels=1000000"])  # 640x480 pass, the 1200x1000 PNG not
        raw = log_raw_data(cfg.data, work / "raw")
    result = process_data(cfg, work / "raw", work / "processed" / "train", work / "processed" / "test",
                          extractor=extractor)
    return {"cfg": cfg, "raw": raw, "result": result, "work": work, "mirror": small_mirror}


def split_folder(processed, split):
    """Where a split is: train and val in train_data, test in test_data."""
    return processed["work"] / "processed" / ("test" if split == "test" else "train")


def test_raw_manifest_records_sources_checksums_counts(processed):
    manifest = json.loads((processed["work"] / "raw" / "manifest.json").read_text())
    assert set(manifest["files"]) == {"annotations/annotations_trainval2014.zip", "zips/train2014.zip",
                                      "zips/val2014.zip"}
    for entry in manifest["files"].values():
        assert len(entry["sha256"]) == 64 and entry["size"] > 0 and entry["source"].startswith("http://127.0.0.1")
    # 40 annotated train images, one of them missing from the zip
    assert manifest["counts"]["train2014_annotated_images"] == 40
    assert manifest["counts"]["train2014_images"] == 39
    assert manifest["counts"]["val2014_images"] == 30


def test_raw_artifact_is_the_archives_and_a_manifest_nothing_extracted(processed):
    raw = processed["work"] / "raw"
    files = sorted(str(p.relative_to(raw)) for p in raw.rglob("*") if p.is_file())
    assert files == ["archives/annotations/annotations_trainval2014.zip",
                     "archives/annotations/annotations_trainval2014.zip.verified.json",
                     "archives/zips/train2014.zip", "archives/zips/train2014.zip.verified.json",
                     "archives/zips/val2014.zip", "archives/zips/val2014.zip.verified.json", "manifest.json"]
    manifest = json.loads((raw / "manifest.json").read_text())
    assert manifest["members"] == {"annotations": "archives/annotations/annotations_trainval2014.zip",
                                   "train2014": "archives/zips/train2014.zip", "val2014": "archives/zips/val2014.zip"}
    for rel, entry in manifest["files"].items():  # each archive as served, byte for byte
        assert (raw / entry["path"]).read_bytes() == (Path(processed["mirror"]["root"]) / rel).read_bytes()


def test_a_hostile_archive_is_refused_before_any_image_is_read(processed, tmp_path, extractor):
    import shutil
    import zipfile

    from captioning.errors import UnsafeArchiveError
    from captioning.steps.process_data import process_data

    raw = tmp_path / "raw"
    shutil.copytree(processed["work"] / "raw", raw)
    with zipfile.ZipFile(raw / "archives/zips/val2014.zip", "a") as zf:
        zf.writestr("val2014/../../escape.jpg", b"pwned")
    with pytest.raises(UnsafeArchiveError, match="val2014.zip: entry 'val2014/../../escape.jpg' points outside"):
        process_data(processed["cfg"], raw, tmp_path / "train", tmp_path / "test", extractor=extractor)
    assert not (tmp_path / "train" / "features").exists() and not (tmp_path / "test" / "features").exists()


def test_awkward_inputs_are_skipped_with_reasons_or_kept(processed):
    result, awkward = processed["result"], processed["mirror"]["awkward"]
    reasons = {Path(s["file"]).name: s["reason"] for s in result.extra["skipped"]}
    by_case = {case: name for name, case in awkward.items()}
    skipped_cases = ("truncated", "empty", "not_an_image", "missing", "bomb_header", "tiff", "oversized", "gif_frames")
    assert set(reasons) == {by_case[c] for c in skipped_cases}
    assert reasons[by_case["empty"]] == "empty file"
    # Issue 14, point 1: refused from the header, before TensorFlow decodes anything
    assert reasons[by_case["bomb_header"]].startswith("decompression bomb: Image size (400000000 pixels) exceeds")
    assert reasons[by_case["oversized"]] == ("decompression bomb: declares 1200x1000 pixels, more than "
                                             "features.max_image_pixels=1000000")
    assert reasons[by_case["gif_frames"]] == ("decompression bomb: 200 frames of 61440000 pixels in all, more than "
                                              "features.max_image_pixels=1000000")
    assert reasons[by_case["tiff"]] == "a TIFF image; only JPEG, MPO, PNG, GIF, BMP are read"
    assert reasons[by_case["not_an_image"]] == "not an image"
    assert reasons[by_case["missing"]] == "missing file"
    assert reasons[by_case["truncated"]].startswith("truncated or corrupt image")
    kept = set()
    for split in ("train", "val", "test"):
        records = json.loads((split_folder(processed, split) / f"{split}.captions.json").read_text())
        kept |= {Path(r["file"]).name for r in records}
    assert {by_case["grayscale"], by_case["cmyk"], by_case["png_content"]} <= kept
    assert result.metrics["images"] == 70 - 8 == len(kept)
    report = json.loads((processed["work"] / "processed" / "train" / "report.json").read_text())
    assert len(report["skipped"]) == 8 and report["blank_captions_dropped"] == 1
    assert {s["file"].split(":")[0] for s in report["skipped"]} == {"train2014.zip"}  # the archive is named


def test_split_is_by_image_and_held_out_comes_from_val2014(processed):
    out = processed["work"] / "processed" / "train"
    ids = {}
    for split in ("train", "val", "test"):
        records = json.loads((split_folder(processed, split) / f"{split}.captions.json").read_text())
        ids[split] = {r["image_id"] for r in records}
        if split != "train":
            assert {r["source"] for r in records} == {"val2014"}
            assert len(records) == 8
    assert not (ids["train"] & ids["val"]) and not (ids["train"] & ids["test"]) and not (ids["val"] & ids["test"])
    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["split"] == {"kind": "random", "seed": 0, "max_images": None, "val_images": 8, "test_images": 8}
    assert set(dataset["splits"]) == {"train", "val"}
    test = json.loads((split_folder(processed, "test") / "dataset.json").read_text())
    assert set(test["splits"]) == {"test"} and test["split"] == dataset["split"]
    m = processed["result"].metrics
    assert m["train_images"] + m["val_images"] + m["test_images"] == m["images"]


def test_captions_are_clean_and_tokenised(processed):
    out = processed["work"] / "processed" / "train"
    vocab = json.loads((out / "vocab.json").read_text())["tokens"]
    assert vocab[:4] == ["<pad>", "<start>", "<end>", "<unk>"]
    assert all(w.isalnum() for w in vocab[4:]), vocab  # no "left." or "circle," tokens
    dataset = json.loads((out / "dataset.json").read_text())
    records = json.loads((out / "train.captions.json").read_text())
    lengths = [len(t) for r in records for t in r["tokens"]]
    assert max(lengths) <= dataset["max_length"] < 50
    assert all(t[0] == 1 and t[-1] == 2 for r in records for t in r["tokens"])
    assert sum(len(r["captions"]) for r in records) == sum(len(r["tokens"]) for r in records)


def test_features_are_float16_records_in_caption_order(processed, extractor):
    import tensorflow as tf

    from captioning.data.archive import ArchiveImages
    from captioning.features import GRID, CHANNELS, decode_and_resize, read_features

    out = processed["work"] / "processed" / "test"
    dataset = json.loads((out / "dataset.json").read_text())
    split = dataset["splits"]["test"]
    records = json.loads((out / split["captions_file"]).read_text())
    feats = np.stack([f.numpy() for f in read_features([str(out / s) for s in split["shards"]])])
    assert feats.shape == (len(records), GRID, CHANNELS) and feats.dtype == np.float16
    # record k holds the features of the k-th image of the captions file
    k = 5
    raw = processed["work"] / "raw"
    pixels = ArchiveImages({"val2014": raw / "archives/zips/val2014.zip"}).read(records[k]["file"])
    direct = extractor(tf.expand_dims(decode_and_resize(pixels), 0)).numpy()[0]
    np.testing.assert_allclose(feats[k].astype(np.float32), direct.astype(np.float32), rtol=1e-2, atol=1e-6)
    assert not np.allclose(feats[k], feats[k - 1])
    shard_bytes = sum((out / s).stat().st_size for s in split["shards"])
    assert shard_bytes == len(records) * GRID * CHANNELS * 2
    stats = json.loads((out / "feature_stats.json").read_text())
    assert len(stats["mean"]) == CHANNELS and min(stats["std"]) >= 0


def test_restart_reuses_finished_shards(processed, extractor):
    from captioning.steps.process_data import process_data

    out = processed["work"] / "processed"
    shards = sorted((out / "train" / "features").glob("*.f16")) + sorted((out / "test" / "features").glob("*.f16"))
    # The test part's first shard: it starts at a batch boundary and loses no image in both runs, so its
    # batches and bytes match exactly (train's first shard loses the awkward images, so its batches differ).
    victim = sorted((out / "test" / "features").glob("*.f16"))[0]
    original = victim.read_bytes()
    victim.unlink()  # as if the pod died while writing it
    again = process_data(processed["cfg"], processed["work"] / "raw", out / "train", out / "test",
                         extractor=extractor)
    assert again.metrics["shards_reused"] == len(shards) - 1
    assert victim.read_bytes() == original
    assert again.metrics["images"] == processed["result"].metrics["images"]


def test_held_out_sizes_follow_karpathy_or_settings():
    assert held_out_sizes(40504, None, None) == (5000, 5000)
    assert held_out_sizes(405, None, None) == (50, 50)
    assert held_out_sizes(300, 100, 20) == (100, 20)
    with pytest.raises(DataError, match="data.val_images=200 \\+ data.test_images=200"):
        held_out_sizes(300, 200, 200)
    a = split_images(list(range(100)), list(range(100, 200)), 10, 10, seed=1)
    b = split_images(list(range(100)), list(range(100, 200)), 10, 10, seed=1)
    c = split_images(list(range(100)), list(range(100, 200)), 10, 10, seed=2)
    assert a == b and a["val"] != c["val"]
    assert len(a["train"]) == 180


def test_a_shared_download_cache_is_filled_once_across_runs(http_mirror, tmp_path):
    """On Kubeflow the archives live on a PVC (data.download_cache): a second run downloads nothing."""
    from captioning.steps.log_raw_data import log_raw_data

    cache = tmp_path / "pvc" / "coco2014"
    cfg = load_config(overrides=[f"data.base_url={http_mirror.url}", f"data.download_cache={cache}"]).data
    first = log_raw_data(cfg, tmp_path / "run1")
    gets_after_first = sum(r.method == "GET" for r in http_mirror.state.requests)
    second = log_raw_data(cfg, tmp_path / "run2")
    assert first.metrics["bytes_downloaded"] == first.metrics["bytes"] > 0
    assert second.metrics["bytes_downloaded"] == 0
    assert sum(r.method == "GET" for r in http_mirror.state.requests) == gets_after_first
    manifest = json.loads((tmp_path / "run2" / "manifest.json").read_text())
    # Issue 25, point 1: the artifact references the cached archives instead of holding 20 GB of them
    assert manifest["archive_root"] == str(cache.resolve())
    assert manifest["files"]["zips/val2014.zip"]["path"] == "zips/val2014.zip"
    assert sorted(p.name for p in (tmp_path / "run2").iterdir() if p.name != "step.json") == ["manifest.json"]
    assert manifest["counts"] == json.loads((tmp_path / "run1" / "manifest.json").read_text())["counts"]


def test_test_data_holds_only_the_test_split_its_samples_and_the_blind_baseline(processed):
    from captioning.data.archive import ArchiveImages

    test = processed["work"] / "processed" / "test"
    dataset = json.loads((test / "dataset.json").read_text())
    assert dataset["blind_baseline"]["chosen_on"] == "val" and dataset["blind_baseline"]["caption"]
    assert sorted(p.name for p in (test / "features").iterdir()) == sorted(
        n for s in dataset["splits"]["test"]["shards"] for n in (Path(s).name, Path(s).with_suffix(".json").name))
    assert not list(test.glob("train*")) and not list(test.glob("val*")) and not (test / "backbone.weights.h5").exists()
    records = json.loads((test / "test.captions.json").read_text())
    samples = [r for r in records if r.get("sample")]
    assert len(samples) == min(len(records), 16) and samples == records[: len(samples)]
    images = ArchiveImages({"val2014": processed["work"] / "raw" / "archives/zips/val2014.zip"})
    for r in samples:
        assert (test / r["sample"]).read_bytes() == images.read(r["file"])


@pytest.mark.parametrize("bad_id", ["/../../../../tmp/escaped", "12", 3.5, None])
def test_image_ids_must_be_integers(bad_id):
    from captioning.steps.process_data import load_coco_captions

    data = {"images": [{"id": 1, "file_name": "a.jpg"}, {"id": bad_id, "file_name": "b.jpg"}],
            "annotations": [{"image_id": 1, "caption": "a cat"}, {"image_id": bad_id, "caption": "a dog"}]}
    images, _, skipped, _ = load_coco_captions(data, "annotations.zip:captions.json", "train2014", "train2014")
    assert list(images) == [1]
    assert {"file": "annotations.zip:captions.json images[1]",
            "reason": f"image id {bad_id!r} is not an integer"} in skipped
    assert {"file": "annotations.zip:captions.json annotations[1]",
            "reason": f"image_id {bad_id!r} is not an integer"} in skipped


def test_hostile_annotations_are_skipped_and_counted_naming_the_file_and_the_id():
    """Issue 14, points 2 and 5: paths leaving the image folder, duplicate ids, captions that are not strings,
    captions of 500 words; a file that is not a COCO caption file fails naming it."""
    from captioning.steps.process_data import load_coco_captions

    where = "annotations.zip:annotations/captions_train2014.json"
    data = {
        "images": [{"id": 1, "file_name": "ok.jpg"}, {"id": 2, "file_name": "../../../etc/some.png"},
                   {"id": 3, "file_name": "/etc/hostname"}, {"id": 4, "file_name": "twice-a.jpg"},
                   {"id": 4, "file_name": "twice-b.jpg"}, {"id": 5, "file_name": None}, {"id": 6, "file_name": "x.jpg"},
                   {"id": 7, "file_name": "C:\\evil.jpg"}, "not an entry"],
        "annotations": [{"image_id": 1, "caption": "a red circle"}, {"image_id": 2, "caption": "a host file"},
                        {"image_id": 3, "caption": "another"}, {"image_id": 4, "caption": "whose is it"},
                        {"image_id": 6, "caption": None}, {"image_id": 6, "caption": ["a", "list"]},
                        {"image_id": 1, "caption": " ".join(["word"] * 500)}, {"caption": "no image id"}],
    }
    images, blank, skipped, truncated = load_coco_captions(data, where, "train2014", "train2014", max_words=100)
    assert list(images) == [1]
    assert images[1]["file"] == "train2014/ok.jpg"
    assert [len(c.split()) for c in images[1]["captions"]] == [3, 100] and truncated == 1
    assert len(images[1]["references"][1].split()) == 500  # scoring sees the raw text
    reasons = {entry["file"]: entry["reason"] for entry in skipped}
    assert reasons[f"{where} image 2"] == "file_name '../../../etc/some.png' is not a plain path inside train2014/"
    assert reasons[f"{where} image 3"] == "file_name '/etc/hostname' is not a plain path inside train2014/"
    assert reasons[f"{where} image 5"] == "file_name None is not a plain path inside train2014/"
    assert reasons[f"{where} image 7"].startswith("file_name 'C:\\\\evil.jpg' is not a plain path")
    assert reasons[f"{where} images[3]"].startswith("image id 4 appears 2 times")
    assert reasons[f"{where} images[4]"].startswith("image id 4 appears 2 times")
    assert reasons[f"{where} images[8]"] == "image id None is not an integer"
    assert reasons[f"{where} annotations[4] (image 6)"] == "caption None is not a string"
    assert reasons[f"{where} annotations[5] (image 6)"] == "caption ['a', 'list'] is not a string"
    assert reasons[f"{where} annotations[7]"] == "image_id None is not an integer"
    assert reasons["train2014/x.jpg"] == "no usable caption"  # its only captions were not strings
    assert blank == 0

    unhashable = {"images": [{"id": [1], "file_name": "a.jpg"}, {"id": 9, "file_name": "b.jpg"}],
                  "annotations": [{"image_id": 9, "caption": "a cat"}]}
    images, _, skipped, _ = load_coco_captions(unhashable, where, "train2014", "train2014")
    assert list(images) == [9] and skipped == [{"file": f"{where} images[0]", "reason": "image id [1] is not an integer"}]

    for not_coco in ([], {"images": {}}, {"images": [], "annotations": "none"}, "text"):
        with pytest.raises(DataError, match=f"^{where}: not a COCO caption file"):
            load_coco_captions(not_coco, where, "train2014", "train2014")


def test_the_raw_artifact_drops_what_its_manifest_does_not_list(http_mirror, tmp_path):
    from captioning.steps.log_raw_data import log_raw_data

    out = tmp_path / "raw"
    (out / "extracted" / "train2014").mkdir(parents=True)  # an older version's tree, in a reused work dir
    (out / "extracted" / "train2014" / "a.jpg").write_bytes(b"old")
    (out / "archives" / "zips").mkdir(parents=True)
    (out / "archives" / "zips" / "test2014.zip").write_bytes(b"dropped from data.files")
    cfg = load_config(overrides=[f"data.base_url={http_mirror.url}"]).data
    log_raw_data(cfg, out)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == [
        "archives/annotations/annotations_trainval2014.zip",
        "archives/annotations/annotations_trainval2014.zip.verified.json",
        "archives/zips/train2014.zip", "archives/zips/train2014.zip.verified.json",
        "archives/zips/val2014.zip", "archives/zips/val2014.zip.verified.json", "manifest.json"]


def test_records_keep_the_raw_coco_captions_for_scoring():
    """Training reads the cleaned text; evaluate scores against the captions as COCO has them."""
    from captioning.steps.process_data import load_coco_captions

    data = {"images": [{"id": 1, "file_name": "a.jpg"}],
            "annotations": [{"image_id": 1, "caption": "A man's T-shirt on the bed."},
                            {"image_id": 1, "caption": "   "}, {"image_id": 1, "caption": "Two dogs, running!"}]}
    images, blank, _, _ = load_coco_captions(data, "captions.json", "train2014", "train2014")
    assert images[1]["references"] == ["A man's T-shirt on the bed.", "Two dogs, running!"]
    assert images[1]["captions"] == ["a man s t shirt on the bed", "two dogs running"] and blank == 1


def test_images_are_resized_with_antialiasing_and_the_features_say_so():
    """One-pixel stripes at COCO's 640 pixels: antialiased resizing to 299 averages them to grey; plain
    bilinear sampling aliases them into coarse bands."""
    import io

    import numpy as np
    import tensorflow as tf
    from PIL import Image

    from captioning.features import backbone_identity, decode_and_resize

    stripes = np.zeros((640, 640, 3), np.uint8)
    stripes[:, ::2] = 255
    buffer = io.BytesIO()
    Image.fromarray(stripes).save(buffer, format="PNG")
    ours = decode_and_resize(tf.constant(buffer.getvalue())).numpy()
    aliased = tf.image.resize(stripes, (299, 299), antialias=False).numpy() / 127.5 - 1.0
    assert ours.std() < 0.2 < aliased.std()
    assert backbone_identity("none", 0) == "none(seed=0)+antialiased-bilinear"  # old shards are not reused


def test_an_archive_holding_another_archives_folder_is_refused(small_mirror, tmp_path):
    """Issue 14, point 2: train2014.zip carrying its own annotations/ must not replace the real captions."""
    import shutil
    import zipfile

    from captioning.steps.log_raw_data import log_raw_data

    mirror = tmp_path / "mirror"
    shutil.copytree(small_mirror["root"], mirror)
    with zipfile.ZipFile(mirror / "zips" / "train2014.zip", "a") as zf:
        zf.writestr("annotations/captions_train2014.json", '{"images": [], "annotations": []}')
    cfg = load_config(overrides=[f"data.base_url=file://user:s3cret@{mirror}"])
    with pytest.raises(DataError, match=r"file://user:\*\*\*@.*train2014.zip: holds annotations/, which "
                       r".*annotations_trainval2014.zip already holds; one archive must not replace another's files"):
        log_raw_data(cfg.data, tmp_path / "raw")  # the URL without its password: a pod prints this


@pytest.mark.parametrize("content, why", [
    ("[1, 2]", "not a COCO caption file (it needs lists 'images' and 'annotations')"),
    ('{"images": [', "not valid JSON: Expecting value"),
    ("[" * 100000 + "]" * 100000, "nested too deeply to be a COCO caption file"),
])
def test_log_raw_data_names_an_annotation_file_that_is_not_coco(small_mirror, tmp_path, content, why):
    import shutil
    import zipfile

    from captioning.steps.log_raw_data import log_raw_data

    mirror = tmp_path / "mirror"
    shutil.copytree(small_mirror["root"], mirror)
    annotations = mirror / "annotations" / "annotations_trainval2014.zip"
    with zipfile.ZipFile(annotations) as zf:
        members = {name: zf.read(name) for name in zf.namelist()}
    members["annotations/captions_train2014.json"] = content.encode()
    with zipfile.ZipFile(annotations, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    cfg = load_config(overrides=[f"data.base_url={mirror}"])
    with pytest.raises(DataError) as caught:
        log_raw_data(cfg.data, tmp_path / "raw")
    assert str(caught.value).startswith(f"{tmp_path}/raw/archives/annotations/annotations_trainval2014.zip:"
                                        f"annotations/captions_train2014.json: {why}")


def test_process_data_reads_the_referenced_cache_and_names_an_archive_changed_or_gone_since(small_mirror, tmp_path):
    """Issue 25, point 1: with a download cache the raw-data artifact is only a manifest; process_data reads the
    archives where it points and checks each against the size and SHA-256 log_raw_data recorded (KFP may answer
    log_raw_data from its cache long after the volume changed)."""
    import shutil

    from captioning.steps.log_raw_data import log_raw_data
    from captioning.steps.process_data import open_raw

    cache = tmp_path / "pvc" / "coco2014"
    cfg = load_config(overrides=[f"data.base_url={small_mirror['root']}", f"data.download_cache={cache}",
                                 "data.split=karpathy", "data.split_url=caption_datasets.zip", "data.val_images=null",
                                 "data.test_images=null"]).data
    result = log_raw_data(cfg, tmp_path / "raw")
    artifact = sum(p.stat().st_size for p in (tmp_path / "raw").rglob("*") if p.is_file())
    assert artifact < 64 * 1024 < result.metrics["bytes"]  # a manifest, not the archives
    manifest, images = open_raw(tmp_path / "raw")
    assert set(manifest["members"]) >= {"train2014", "val2014", "annotations"}
    import zipfile

    with zipfile.ZipFile(cache / "zips" / "val2014.zip") as zf:
        some = next(n for n in zf.namelist() if n.endswith(".jpg"))
    assert images.read(some)[:2] == b"\xff\xd8"  # a JPEG, read out of the cached zip

    val = cache / "zips" / "val2014.zip"
    kept = tmp_path / "kept.zip"
    shutil.copy2(val, kept)
    data = bytearray(val.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes
    val.write_bytes(bytes(data))
    with pytest.raises(DataError, match=rf"{val}: changed in the download cache since log_raw_data verified it"):
        open_raw(tmp_path / "raw")
    val.unlink()
    with pytest.raises(DataError, match=rf"{val}: the download cache no longer holds this archive"):
        open_raw(tmp_path / "raw")
    shutil.copy2(kept, val)
    assert open_raw(tmp_path / "raw")[0] == manifest

    # What W&B records of it: references to the archives where they are (the cache's volume), not into the
    # artifact, which no longer holds them (a recording stand-in for the tracker: the W&B server is not here)
    from captioning.records import record_log_raw_data

    logged = {}

    class Tracker:
        def summary(self, metrics):
            pass

        def table(self, *args):
            pass

        def log_artifact(self, name, kind, files, references, metadata):
            logged.update(references)
            return "ref"

    record_log_raw_data(Tracker(), None, result, tmp_path / "raw", "minio://mlpipeline/run-1/raw_data")
    assert logged and all(ref.startswith("file:///") for ref in logged.values())
    assert all(Path(ref[len("file://"):]).is_file() for ref in logged.values())


def test_an_image_id_in_both_caption_files_is_skipped_not_fatal(small_mirror, extractor, tmp_path):
    """Review of issue 14: one id in both files failed the whole step; like a duplicate within a file, it is a
    bad entry: skipped with both files named, the rest of the data kept."""
    import shutil
    import zipfile

    from captioning.steps.log_raw_data import log_raw_data
    from captioning.steps.process_data import process_data

    mirror = tmp_path / "mirror"
    shutil.copytree(small_mirror["root"], mirror)
    annotations = mirror / "annotations" / "annotations_trainval2014.zip"
    with zipfile.ZipFile(annotations) as zf:
        members = {name: zf.read(name) for name in zf.namelist()}
    train = json.loads(members["annotations/captions_train2014.json"])
    val = json.loads(members["annotations/captions_val2014.json"])
    shared, old = train["images"][10]["id"], val["images"][0]["id"]
    val["images"][0]["id"] = shared
    for ann in val["annotations"]:
        if ann["image_id"] == old:
            ann["image_id"] = shared
    members["annotations/captions_val2014.json"] = json.dumps(val).encode()
    with zipfile.ZipFile(annotations, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    cfg = load_config(overrides=[f"data.base_url={mirror}", "data.val_images=5", "data.test_images=5",
                                 "features.shard_images=64"])
    log_raw_data(cfg.data, tmp_path / "raw")
    result = process_data(cfg, tmp_path / "raw", tmp_path / "train", tmp_path / "test", extractor=extractor)
    reasons = [s for s in result.extra["skipped"] if f"image {shared}" in s["file"]]
    assert len(reasons) == 1 and reasons[0]["file"].endswith(f"captions_val2014.json image {shared}")
    assert reasons[0]["reason"] == (f"image id {shared} also appears in train2014's caption file; its captions "
                                    "could belong to either, so none is used")
    kept = {r["image_id"] for part in ("train", "test") for split in ("train", "val", "test")
            if (tmp_path / part / f"{split}.captions.json").exists()
            for r in json.loads((tmp_path / part / f"{split}.captions.json").read_text())}
    assert shared not in kept and len(kept) == result.metrics["images"] > 50


def test_the_karpathy_split_file_fixes_exactly_the_train_val_and_test_images(small_mirror, extractor, tmp_path):
    """data.split=karpathy: a generated caption_datasets.zip in Karpathy's layout, fetched over HTTP like the
    archives and verified against its checksum; restval trains, images it does not list are unused, images it
    lists that the annotations lack are counted."""
    import hashlib

    from helpers.http_mirror import HttpMirror

    from captioning.errors import DownloadError
    from captioning.steps.log_raw_data import log_raw_data
    from captioning.steps.process_data import process_data

    split_zip = Path(small_mirror["root"]) / "caption_datasets.zip"
    digest = hashlib.sha256(split_zip.read_bytes()).hexdigest()
    written = {int(k): v for k, v in small_mirror["karpathy"].items()}
    settings = ["data.split=karpathy", "data.split_url=caption_datasets.zip", "data.val_images=null", "data.test_images=null",
                "features.shard_images=16",
                "features.batch_size=8", "features.max_image_pixels=1000000"]
    with HttpMirror(Path(small_mirror["root"])) as server:
        wrong = load_config(overrides=[f"data.base_url={server.url}", *settings, "data.split_sha256=" + "f" * 64])
        with pytest.raises(DownloadError, match="caption_datasets.zip"):
            log_raw_data(wrong.data, tmp_path / "wrong")
        cfg = load_config(overrides=[f"data.base_url={server.url}", *settings, f"data.split_sha256={digest}"])
        log_raw_data(cfg.data, tmp_path / "raw")
    manifest = json.loads((tmp_path / "raw" / "manifest.json").read_text())
    assert manifest["split_file"] == {"archive": "archives/splits/caption_datasets.zip", "member": "dataset_coco.json"}
    assert manifest["files"]["splits/caption_datasets.zip"]["sha256"] == digest
    result = process_data(cfg, tmp_path / "raw", tmp_path / "train", tmp_path / "test", extractor=extractor)

    skipped = {int(s["file"].rsplit("_", 1)[-1].split(".")[0]) for s in
               json.loads((tmp_path / "train" / "report.json").read_text())["skipped"] if s["file"].endswith(".jpg")}
    for split, folder in (("train", "train"), ("val", "train"), ("test", "test")):
        records = json.loads((tmp_path / folder / f"{split}.captions.json").read_text())
        expected = {i for i, s in written.items() if {"restval": "train"}.get(s, s) == split}
        got = {r["image_id"] for r in records}
        assert got == expected - skipped - {max(written)}, split  # the absent image is in no split
        if split != "train":
            assert got and {r["source"] for r in records} == {"val2014"}
    assert result.metrics["split_file_images_absent"] == 1  # the generated image no annotation file holds
    assert result.metrics["images_outside_split_file"] == 1  # val2014's last image
    dataset = json.loads((tmp_path / "train" / "dataset.json").read_text())
    assert dataset["split"]["kind"] == "karpathy"


def test_a_random_split_size_beside_the_karpathy_split_is_refused_by_name():
    from captioning.errors import ConfigError

    with pytest.raises(ConfigError, match="data.val_images"):
        load_config(overrides=["data.split=karpathy", "data.val_images=10"])


def test_a_bucket_download_cache_is_read_where_it_is_and_checked_by_crc32c(gcs_emulator, http_mirror, tmp_path,
                                                                           monkeypatch):
    """Issue 25, point 1, on Vertex AI: data.download_cache=gs://BUCKET/PREFIX (a GCS emulator on loopback here).
    The first run uploads each checked archive once, the next downloads nothing and reads only central directories;
    the artifact is the manifest; process_data reads the objects through Vertex AI's /gcs mount (a folder stands
    in for it: Cloud Storage FUSE does not run here) or, without one, from a copy of the recorded generation; an
    object changed or gone since is named."""
    import zipfile

    from captioning.data.bucket_cache import FUSE_ROOT_ENV
    from captioning.gcs import storage_client
    from captioning.steps.log_raw_data import log_raw_data
    from captioning.steps.process_data import open_raw

    bucket = storage_client().create_bucket("coco-cache")
    cfg = load_config(overrides=[f"data.base_url={http_mirror.url}",
                                 "data.download_cache=gs://coco-cache/coco2014/"]).data
    assert cfg.download_cache == "gs://coco-cache/coco2014"
    first = log_raw_data(cfg, tmp_path / "run1", tmp_path / "scratch1")
    gets = sum(r.method == "GET" for r in http_mirror.state.requests)
    second = log_raw_data(cfg, tmp_path / "run2", tmp_path / "scratch2")
    assert first.metrics["bytes_downloaded"] == first.metrics["bytes"] > 0
    assert second.metrics["bytes_downloaded"] == 0 and second.metrics == {**first.metrics, "bytes_downloaded": 0}
    assert sum(r.method == "GET" for r in http_mirror.state.requests) == gets
    manifest = json.loads((tmp_path / "run2" / "manifest.json").read_text())
    assert manifest == json.loads((tmp_path / "run1" / "manifest.json").read_text())
    assert manifest["archive_root"] == "gs://coco-cache/coco2014"
    assert sorted(p.name for p in (tmp_path / "run2").iterdir() if p.name != "step.json") == ["manifest.json"]
    assert not list((tmp_path / "scratch1").rglob("*.zip"))  # the staging copies are gone once uploaded
    objects = {b.name: b for b in bucket.list_blobs(prefix="coco2014/")}
    for rel, entry in manifest["files"].items():
        blob = objects[f"coco2014/{entry['path']}"]
        assert (blob.size, blob.crc32c, blob.generation) == (entry["size"], entry["crc32c"], entry["generation"])
        assert blob.metadata["sha256"] == entry["sha256"]

    # Off Vertex AI (no mount): a copy of the recorded generation in scratch, reused by the next reader.
    monkeypatch.setenv(FUSE_ROOT_ENV, str(tmp_path / "no-mount"))
    manifest_read, images = open_raw(tmp_path / "run2", scratch=tmp_path / "work")
    copy = tmp_path / "work" / "download-cache" / "coco-cache" / "coco2014"
    assert manifest_read["archive_root"] == str(copy)
    with zipfile.ZipFile(copy / "zips" / "val2014.zip") as zf:
        some = next(n for n in zf.namelist() if n.endswith(".jpg"))
    assert images.read(some)[:2] == b"\xff\xd8"

    # On Vertex AI: read through the mount, nothing copied.
    mount = tmp_path / "gcs"
    for name, blob in objects.items():
        (mount / "coco-cache" / name).parent.mkdir(parents=True, exist_ok=True)
        blob.download_to_filename(str(mount / "coco-cache" / name))
    monkeypatch.setenv(FUSE_ROOT_ENV, str(mount))
    manifest_read, images = open_raw(tmp_path / "run2", scratch=tmp_path / "work2")
    assert manifest_read["archive_root"] == str(mount / "coco-cache" / "coco2014")
    assert images.read(some)[:2] == b"\xff\xd8" and not (tmp_path / "work2").exists()

    # Changed since (other bytes, same size), then gone: named, with what to do.
    val = objects["coco2014/zips/val2014.zip"]
    data = bytearray(val.download_as_bytes())
    data[len(data) // 2] ^= 0xFF
    bucket.blob(val.name).upload_from_string(bytes(data))
    uri = "gs://coco-cache/coco2014/zips/val2014.zip"
    with pytest.raises(DataError, match=rf"{uri}: changed in the download cache since log_raw_data verified it "
                                        r"\(size or CRC32C"):
        open_raw(tmp_path / "run2", scratch=tmp_path / "work3")
    bucket.blob(val.name).delete()
    with pytest.raises(DataError, match=rf"{uri}: the download cache no longer holds this archive"):
        open_raw(tmp_path / "run2", scratch=tmp_path / "work3")
    # log_raw_data downloads it again (an object it did not upload carries no SHA-256 and is not trusted)
    bucket.blob(val.name).upload_from_string(bytes(data))
    third = log_raw_data(cfg, tmp_path / "run3", tmp_path / "scratch3")
    assert third.metrics["bytes_downloaded"] == manifest["files"]["zips/val2014.zip"]["size"]
    assert bucket.get_blob(val.name).download_as_bytes() != bytes(data)

    # Another mirror's archives under the same names are not this one's: downloaded from it (not reused)
    from helpers.http_mirror import HttpMirror

    with HttpMirror(http_mirror.state.root) as other:
        elsewhere = load_config(overrides=[f"data.base_url={other.url}",
                                           "data.download_cache=gs://coco-cache/coco2014"]).data
        fourth = log_raw_data(elsewhere, tmp_path / "run4", tmp_path / "scratch4")
    assert fourth.metrics["bytes_downloaded"] == fourth.metrics["bytes"]
    assert bucket.get_blob(val.name).metadata["source"].startswith(other.url)

    # A bucket that is not there: said before anything is downloaded, naming the setting
    from captioning.errors import ConfigError

    gets = sum(r.method == "GET" for r in http_mirror.state.requests)
    missing = load_config(overrides=[f"data.base_url={http_mirror.url}",
                                     "data.download_cache=gs://no-such-bucket/coco2014"]).data
    with pytest.raises(ConfigError, match=r"data.download_cache=gs://no-such-bucket/coco2014: no bucket "
                                          r"'no-such-bucket'"):
        log_raw_data(missing, tmp_path / "run5", tmp_path / "scratch5")
    assert sum(r.method == "GET" for r in http_mirror.state.requests) == gets


@pytest.mark.parametrize("value", ["gs://", "gs://Bad_Bucket/x", "s3://b/coco", "gs://b/a/../c", "gs://bb//c"])
def test_a_download_cache_url_must_name_a_bucket(value):
    from captioning.errors import ConfigError

    with pytest.raises(ConfigError, match=r"data.download_cache.*a folder, or a bucket as gs://BUCKET/PREFIX \(no"):
        load_config(overrides=[f"data.download_cache={value}"])


def test_a_caption_that_cannot_be_encoded_is_replaced_and_reported_not_a_failed_step():
    """Issue 27, case 2: one caption holding a lone surrogate ("\\ud800" is legal JSON) killed process_data after
    feature extraction (UnicodeEncodeError writing the dataset), naming nothing."""
    from captioning.steps.process_data import load_coco_captions

    where = "annotations.zip:annotations/captions_train2014.json"
    data = json.loads('{"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": ['
                      '{"image_id": 1, "caption": "a dog \\ud800 runs"}, {"image_id": 1, "caption": "a dog"}]}')
    data["images"].append({"id": 2, "file_name": "COCO_\ud800.jpg"})  # and in a file name (review)
    data["annotations"].append({"image_id": 2, "caption": "a cat"})
    images, _, skipped, _ = load_coco_captions(data, where, "train2014", "train2014")
    assert images[1]["references"] == ["a dog ? runs", "a dog"] and 2 not in images
    json.dumps(skipped, ensure_ascii=False).encode("utf-8")  # the report, too
    assert skipped.pop(0)["file"] == f"{where} image 2"
    json.dumps(images, ensure_ascii=False).encode("utf-8")  # what the step writes: it must encode
    assert skipped == [{"file": f"{where} annotations[0] (image 1)",
                        "reason": "caption holds text that is not valid Unicode (a lone surrogate); kept with '?' "
                                  "in its place"}]


def test_a_huge_reference_is_cut_for_scoring_and_reported():
    """Issue 27, case 9: a 20 MB caption made evaluate take 240 s and 4.2 GB; references now have a length limit
    far above real captions."""
    from captioning.steps.process_data import MAX_REFERENCE_CHARS, load_coco_captions

    where = "annotations.zip:annotations/captions_val2014.json"
    data = {"images": [{"id": 5, "file_name": "a.jpg"}],
            "annotations": [{"image_id": 5, "caption": "a cat " * 1_000_000}, {"image_id": 5, "caption": "a cat"}]}
    images, _, skipped, _ = load_coco_captions(data, where, "val2014", "val2014")
    assert [len(r) for r in images[5]["references"]] == [MAX_REFERENCE_CHARS, 5]
    assert skipped == [{"file": f"{where} annotations[0] (image 5)",
                        "reason": f"caption of 6000000 characters; its first {MAX_REFERENCE_CHARS} are kept"}]
