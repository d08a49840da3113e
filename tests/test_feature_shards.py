"""The feature shard writer when extraction fails part way: nothing it did not fill is kept, it never hangs.

The backbone is a stand-in (zeros, and a failure on demand): these tests are about the shards, not the
features; the images are real JPEGs read through the real decoding pipeline."""

import random
import signal

import pytest

from captioning.data.archive import FolderImages
from captioning.data.demo import draw_scene, random_scene
from captioning.features import GRID, CHANNELS, extract_to_shards, plan_shards


class StandInBackbone:
    weights = "stand-in"
    image_size = 75

    def __init__(self, fail_on_call: int | None = None):
        self.calls, self.fail_on_call = 0, fail_on_call

    def __call__(self, images):
        import tensorflow as tf

        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError("out of GPU memory")
        return tf.zeros((images.shape[0], GRID, CHANNELS), tf.float16)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = random.Random(0)
    for i in range(12):
        draw_scene(random_scene(rng), rng, (320, 240)).save(folder / f"{i}.jpg", quality=85)
    return folder


def plans_of(count: int, per_shard: int = 4):
    return plan_shards({"train": [(i, f"{i}.jpg") for i in range(count)]}, per_shard)


def test_an_interrupted_extraction_keeps_only_the_shards_it_filled(image_folder, tmp_path):
    """Killed by its third batch, extraction keeps the first shard (all its images through) and nothing
    else: before, the shard being written and every later one were finished as if their images were
    unreadable, and the next run reused them, losing those images for good."""
    source, out = FolderImages(image_folder), tmp_path / "features"
    with pytest.raises(RuntimeError, match="out of GPU memory"):
        extract_to_shards(plans_of(12), out, StandInBackbone(fail_on_call=3), 4, source=source)
    assert sorted(p.name for p in out.iterdir()) == ["train-00000.f16", "train-00000.json"]

    results = extract_to_shards(plans_of(12), out, StandInBackbone(), 4, source=source)
    assert [r.reused for r in results] == [True, False, False]
    assert sorted(i for r in results for i in r.image_ids) == list(range(12))
    assert not any(r.skipped for r in results)


def test_a_writer_that_dies_on_a_full_disk_stops_the_extraction_instead_of_hanging(image_folder, small_volume,
                                                                                  tmp_path, monkeypatch):
    """The free-space check fooled (the only stand-in) so the writer itself meets the full disk while the
    backbone keeps producing more batches than the writer's queue holds."""
    import captioning.io
    from captioning.errors import DiskFullError

    monkeypatch.setattr(captioning.io, "free_bytes", lambda path: 1 << 50)
    out = small_volume(tmp_path / "features", 40 << 20)  # 160 images' features (256 KiB each) fit, not 600
    previous = signal.signal(signal.SIGALRM, lambda *_: pytest.fail("extraction hung after its writer died"))
    signal.alarm(120)
    try:
        names = [f"{i % 12}.jpg" for i in range(600)]  # batches of 32 come faster than the writer takes them
        plans = plan_shards({"train": list(enumerate(names))}, 64)
        with pytest.raises(DiskFullError, match=rf"{out}/train-0000\d.f16: no space left on the device"):
            extract_to_shards(plans, out, StandInBackbone(), 32, source=FolderImages(image_folder))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert not [p for p in out.iterdir() if p.suffix == ".tmp"]


def test_a_dead_writer_never_blocks_the_backbone(tmp_path):
    """When the writer dies with its queue full (a GPU outpacing a slow volume), queueing must not block:
    extraction sees the failure instead of hanging for ever."""
    import time

    import numpy as np

    from captioning.features import _DONE, _ShardWriter

    writer = _ShardWriter(tmp_path, plans_of(4), "stand-in", FolderImages(tmp_path), 10**6)
    writer.start()
    assert writer.send((np.array([99]), np.zeros((1, GRID, CHANNELS), np.float16)))  # no plan holds index 99
    writer.join(10)
    assert not writer.is_alive() and isinstance(writer.error, KeyError)
    while not writer.inbox.full():
        writer.inbox.put_nowait(_DONE)
    started = time.monotonic()
    assert writer.send(_DONE) is False
    assert time.monotonic() - started < 2


def test_re_extracting_with_another_backbone_needs_room_for_one_shard_not_all(image_folder, small_volume, tmp_path):
    """Each new shard replaces its old version: on a volume holding the old features and one more shard, a
    rerun with other settings must not be refused for want of room for every shard at once."""
    out = small_volume(tmp_path / "features", 12 * 256 * 1024 + 4 * 256 * 1024 + 256 * 1024)
    source = FolderImages(image_folder)
    extract_to_shards(plans_of(12), out, StandInBackbone(), 4, source=source)
    other = StandInBackbone()
    other.weights = "another stand-in"
    results = extract_to_shards(plans_of(12), out, other, 4, source=source)
    assert [r.reused for r in results] == [False, False, False]


def gif_with_frames(screen, frames):
    """A GIF built block by block: a logical screen, then one image descriptor per (width, height) frame."""
    import struct

    out = bytearray(b"GIF89a") + struct.pack("<HHBBB", *screen, 0x80, 0, 0) + bytes(6)  # a 2-colour table
    for width, height in frames:
        out += b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x02\x4c\x01\x00"
    return bytes(out + b"\x3b")


def test_gif_bombs_are_measured_by_every_frame_not_the_declared_screen():
    """Review of issue 14: TensorFlow decodes every frame at its own size onto a canvas of the largest frame,
    whatever screen the header declares: a 1x1 screen holding a 12000x12000 frame (144 M pixels) passed a
    check of the screen alone. An ordinary animation (small frames of changes) passes."""
    import io

    from captioning.features import gif_frames, image_problem

    huge_frame = gif_with_frames((1, 1), [(1, 1), (12000, 12000)])
    assert gif_frames(huge_frame) == (2, 1 + 12000 * 12000, 12000, 12000)
    assert image_problem(huge_frame) == ("decompression bomb: declares 12000x12000 pixels, more than "
                                         "features.max_image_pixels=50000000")
    many = gif_with_frames((640, 480), [(640, 480)] * 200)
    assert image_problem(many) == ("decompression bomb: 200 frames of 61440000 pixels in all, more than "
                                   "features.max_image_pixels=50000000")
    animation = gif_with_frames((640, 480), [(640, 480)] + [(8, 8)] * 300)  # delta frames, as encoders write
    assert gif_frames(animation) == (301, 640 * 480 + 300 * 64, 640, 480) and image_problem(animation) is None
    single = io.BytesIO()
    draw_scene(random_scene(random.Random(1)), random.Random(1), (320, 240)).save(single, format="GIF")
    assert gif_frames(single.getvalue()) == (1, 320 * 240, 320, 240) and image_problem(single.getvalue()) is None
