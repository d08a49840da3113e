"""The demo's scenes (issue 13, point 8): two objects and a relation, captions read back into scenes."""

import random

import numpy as np
import pytest

from captioning.data.demo import (COLOURS, INVERSE, PAIR_TEMPLATES, RELATIONS, _captions, draw_scene, random_scene,
                                  scene_accuracy, scene_of)
from captioning.text import clean_caption

PAIR = {"objects": [("red", "circle"), ("blue", "square")], "relation": "left"}


def test_every_caption_of_a_scene_reads_back_as_that_scene_raw_and_cleaned():
    rng = random.Random(0)
    kinds = set()
    for _ in range(300):
        scene = random_scene(rng)
        kinds.add(len(scene["objects"]))
        parsed = {scene_of(c) for c in _captions(scene, rng)} | {scene_of(clean_caption(c)) for c in _captions(scene, rng)}
        assert len(parsed) == 1 and None not in parsed, (scene, parsed)
    assert kinds == {1, 2}


def test_a_pair_is_the_same_scene_from_either_side_and_wrong_if_any_part_is_wrong():
    right = scene_of("a red circle to the left of a blue square")
    assert right == ("two", ("red", "circle"), "left", ("blue", "square"))
    assert scene_of("a blue square to the right of a red circle") == right
    for wrong in ("a red circle to the right of a blue square", "a red circle above a blue square",
                  "a green circle to the left of a blue square", "a red triangle to the left of a blue square",
                  "a red circle to the left of", "a red circle on the left"):
        assert scene_of(wrong) != right, wrong
    assert len(PAIR_TEMPLATES) == 5 and set(INVERSE) == set(RELATIONS)


@pytest.mark.parametrize("relation", list(RELATIONS))
def test_the_picture_shows_the_first_object_where_the_relation_says(relation):
    scene = {**PAIR, "relation": relation}
    pixels = np.asarray(draw_scene(scene, random.Random(3))).astype(int)

    def centre(colour):
        mask = (np.abs(pixels - np.array(COLOURS[colour])) < 40).all(-1)
        ys, xs = np.nonzero(mask)
        return xs.mean(), ys.mean()

    (rx, ry), (bx, by) = centre("red"), centre("blue")
    assert {"left": rx < bx, "right": rx > bx, "above": ry < by, "below": ry > by}[relation]


def test_the_boxes_a_scene_reports_hold_its_objects_pixels():
    """What scripts/probe_demo_features.py reads the objects' grid cells from."""
    placed = []
    pixels = np.asarray(draw_scene(PAIR, random.Random(4), placed=placed)).astype(int)
    assert [(p["colour"], p["shape"]) for p in placed] == PAIR["objects"]
    for p in placed:
        x0, y0, x1, y1 = p["box"]
        mask = (np.abs(pixels - np.array(COLOURS[p["colour"]])) < 40).all(-1)
        ys, xs = np.nonzero(mask)
        assert mask.sum() > 500 and xs.min() >= x0 and xs.max() <= x1 and ys.min() >= y0 and ys.max() <= y1


def test_scene_accuracy_counts_whole_scenes_and_only_for_demo_references():
    rng = random.Random(1)
    one = {"objects": [("green", "triangle")], "side": "right"}
    refs = {1: _captions(PAIR, rng), 2: _captions(one, rng)}
    result = scene_accuracy({1: "a blue square to the right of a red circle", 2: "a green triangle on the left"}, refs)
    assert result == {"scenes_correct": 0.5, "one_object_scenes_correct": 0.0, "two_object_scenes_correct": 1.0,
                      "two_object_scenes": 1}
    assert scene_accuracy({1: "a dog"}, {1: ["A man riding a horse.", "a dog on a beach"] * 2}) is None
