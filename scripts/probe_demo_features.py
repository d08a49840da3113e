"""How well can the demo's features name the shapes in its two-object scenes? A ceiling, not CI.

Draws two-object scenes as the demo does (its generator, other seeds; about as many as the demo's
training split holds), runs them through the same random InceptionV3 and preprocessing as
process_data, and fits a linear probe (softmax regression) of each object's shape and colour on the
features of the grid cells under its bounding box (max over them): an oracle for where the object is,
which the captioner has to learn from the captions instead. Prints the held-out accuracies and the
share of scenes with both objects named right, to set beside `two_object_scenes_correct`.

    python scripts/probe_demo_features.py [--train-scenes 455] [--test-scenes 162]
"""

from __future__ import annotations

import argparse
import io
import random

import numpy as np


def scenes(count: int, seed: int):
    from captioning.data import demo

    rng, images, objects = random.Random(seed), [], []
    while len(images) < count:
        scene = demo.random_scene(rng)
        if len(scene["objects"]) != 2:
            continue
        placed: list = []
        buf = io.BytesIO()
        demo.draw_scene(scene, rng, placed=placed).save(buf, format="JPEG", quality=90)
        images.append(buf.getvalue())
        objects.append(placed)
    return images, objects


def object_features(backbone, images, objects, width=640, height=480):
    import tensorflow as tf

    from captioning.features import decode_and_resize

    rows, shapes, colours = [], [], []
    for start in range(0, len(images), 32):
        batch = tf.stack([decode_and_resize(tf.constant(b)) for b in images[start:start + 32]])
        grids = backbone(batch, training=False).numpy()  # (b, 8, 8, 2048)
        for grid, placed in zip(grids, objects[start:start + 32]):
            for obj in placed:
                x0, y0, x1, y1 = obj["box"]
                cells = grid[int(y0 / height * 8):int(y1 / height * 8) + 1, int(x0 / width * 8):int(x1 / width * 8) + 1]
                rows.append(cells.max(axis=(0, 1)))
                shapes.append(obj["shape"])
                colours.append(obj["colour"])
    return np.array(rows), shapes, colours


def probe(train_x, train_y, test_x, classes):
    import keras

    index = {c: i for i, c in enumerate(classes)}
    mean, std = train_x.mean(0), train_x.std(0) + 1e-8
    model = keras.Sequential([keras.layers.Input((train_x.shape[1],)),
                              keras.layers.Dense(len(classes), kernel_regularizer=keras.regularizers.l2(1e-3))])
    model.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit((train_x - mean) / std, np.array([index[y] for y in train_y]), epochs=80, batch_size=64, verbose=0)
    return [classes[i] for i in model.predict((test_x - mean) / std, verbose=0).argmax(1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train-scenes", type=int, default=455)
    parser.add_argument("--test-scenes", type=int, default=162)
    args = parser.parse_args()

    import keras

    from captioning.data import demo
    from captioning.features import build_backbone

    keras.utils.set_random_seed(0)
    backbone = build_backbone("none")
    train_x, train_shapes, train_colours = object_features(backbone, *scenes(args.train_scenes, seed=11))
    test_x, test_shapes, test_colours = object_features(backbone, *scenes(args.test_scenes, seed=12))
    shapes = probe(train_x, train_shapes, test_x, list(demo.SHAPES))
    colours = probe(train_x, train_colours, test_x, list(demo.COLOURS))
    right = np.array([s == ts and c == tc for s, ts, c, tc in zip(shapes, test_shapes, colours, test_colours)])
    print(f"objects {len(right)}: shape {np.mean(np.array(shapes) == np.array(test_shapes)):.3f}, "
          f"colour {np.mean(np.array(colours) == np.array(test_colours)):.3f}; "
          f"scenes with both objects right {right.reshape(-1, 2).all(1).mean():.3f} of {len(right) // 2}")


if __name__ == "__main__":
    main()
