"""Self-critical training: the CIDEr-D reward, the policy's log-probabilities, and that it learns."""

import random

import numpy as np
import pytest

from captioning.scst import CiderD

START, END, PAD = 1, 2, 0


def test_the_vectorised_cider_d_equals_pycocoevalcap_per_image():
    """Given the same references as its corpus, each image's score equals coco-caption's to 1e-9: repeated
    n-grams, empty and one-word candidates, images with one to six references."""
    from pycocoevalcap.cider.cider import Cider

    rng = random.Random(0)
    words = "a the red blue circle square left right of on is there two shapes".split()
    refs = {i: [" ".join(rng.choice(words) for _ in range(rng.randint(1, 12))) for _ in range(rng.randint(1, 6))]
            for i in range(60)}
    res = {i: [" ".join(rng.choice(words) for _ in range(rng.randint(0, 14)))] for i in range(60)}
    res[3], res[4], res[5] = [""], ["a"], [" ".join(refs[5][0].split() * 2)]
    ids = {w: k + 3 for k, w in enumerate(words)}
    encode = lambda s: [ids[w] for w in s.split()]
    _, expected = Cider().compute_score(refs, res)
    cider = CiderD([[encode(r) for r in refs[i]] for i in range(60)], vocab_size=len(words) + 3)
    got = cider.score([encode(res[i][0]) for i in range(60)], np.arange(60))
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9)
    assert got.max() > 1.0  # not all near zero: the comparison has teeth
    # Padded rows of an int array score as their unpadded sequences; any image's references can be asked for.
    padded = np.zeros((2, 20), np.int64)
    padded[0, : len(encode(res[7][0]))] = encode(res[7][0])
    padded[1, : len(encode(refs[9][0]))] = encode(refs[9][0])
    np.testing.assert_allclose(cider.score(padded, [7, 9]), [expected[7], cider.score([encode(refs[9][0])], [9])[0]])
    # Candidates with no n-gram at all: zero, not an error.
    np.testing.assert_array_equal(cider.score([[], [0, 0]], [0, 2]), [0.0, 0.0])
    assert cider.score([], []).shape == (0,)


@pytest.fixture(scope="module")
def tiny():
    """A tiny captioner and 8 images (random features) with 3 references each from a 12-word language."""
    import keras

    from captioning.model import Captioner

    keras.utils.set_random_seed(3)
    rng = np.random.default_rng(3)
    vocab = 16
    features = rng.standard_normal((8, 64, 2048)).astype(np.float16)
    refs = [[[int(w) for w in rng.integers(4, vocab, size=rng.integers(3, 7))] + [END] for _ in range(3)]
            for _ in range(8)]
    model = Captioner(vocab, embedding_dim=16, units=32, dropout=0.0, attention_reg=0.0, context_dim=16)
    model.build()
    model.set_feature_stats(np.zeros(2048), np.ones(2048))
    return model, features, refs, vocab


def test_a_sampled_caption_has_the_teacher_forced_log_probability_of_the_policy(tiny):
    import tensorflow as tf

    from captioning.scst import policy_mask, sample, teacher_forced

    model, features, _, vocab = tiny
    mask = policy_mask(vocab, (PAD, START, 3))
    tokens, log_prob = sample(model, features, 4, START, END, 9, mask, tf.constant([5, 0]))
    tokens = tokens.numpy()
    assert tokens.shape == (32, 9)
    assert not np.isin(tokens, [START, 3]).any()  # masked tokens never drawn
    for row in tokens:  # nothing after <end>
        ends = np.flatnonzero(row == END)
        if len(ends):
            assert not row[ends[0] + 1:].any()
    assert len({tuple(r) for r in tokens}) > 8  # samples differ
    chosen, entropy = teacher_forced(model, features, tf.constant(tokens), 4, START, mask)
    np.testing.assert_allclose(chosen.numpy().sum(1), log_prob.numpy(), atol=1e-5)
    assert (entropy.numpy()[tokens != 0] > 0).all()
    again, _ = sample(model, features, 4, START, END, 9, mask, tf.constant([5, 0]))
    np.testing.assert_array_equal(again.numpy(), tokens)  # seeded: the same draw


def test_the_self_critical_copy_of_a_mixed_precision_model_trains_in_float32(tiny):
    """Under mixed_float16 Keras wraps the optimizer in a loss-scale optimizer, which would divide the hand-written
    step's gradients by a scale never applied: the copy is float32 whatever the model's policy."""
    import keras

    from captioning.model import Captioner
    from captioning.scst import self_critical

    model, _, refs, vocab = tiny
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        mixed = Captioner.from_config(model.get_config() | {"dtype": "mixed_float16"})
        mixed.build()
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert mixed.dtype_policy.name == "mixed_float16"
    critic = self_critical(mixed, CiderD(refs, vocab), 3, "mean", START, END, 8, (PAD,), seed=1)
    critic.compile(optimizer=keras.optimizers.Adam(1e-4))
    assert critic.dtype_policy.name == "float32"
    assert type(critic.optimizer).__name__ == "Adam"


@pytest.mark.slow  # trains: the slow tier
def test_self_critical_steps_raise_greedy_cider_d(tiny):
    """Cross-entropy first (a model that has learnt a little), then 150 self-critical steps with the
    leave-one-out baseline: greedy CIDEr-D on the 8 images rises by at least 20 % relative."""
    import keras
    import tensorflow as tf

    from captioning.decode import greedy
    from captioning.scst import self_critical

    model, features, refs, vocab = tiny
    width = 8
    inputs = np.zeros((8, 3, width), np.int32)
    targets = np.zeros((8, 3, width), np.int32)
    for i, image_refs in enumerate(refs):
        for k, ref in enumerate(image_refs):
            targets[i, k, : len(ref)] = ref
            inputs[i, k, : len(ref)] = [START] + ref[:-1]
    model.compile(optimizer=keras.optimizers.Adam(3e-3))
    model.fit({"features": features, "tokens": inputs}, targets, batch_size=8, epochs=25, verbose=0)
    cider = CiderD(refs, vocab)

    def greedy_cider(m):
        tokens, _ = greedy(m, features, START, END, width, (PAD, START, 3))
        return cider.score(np.asarray(tokens), np.arange(8)).mean()

    before = greedy_cider(model)
    critic = self_critical(model, cider, samples=5, baseline="mean", start_id=START, end_id=END, max_length=width,
                           banned=(PAD, 3), seed=7)
    critic.compile(optimizer=keras.optimizers.Adam(3e-3), jit_compile=False)
    data = tf.data.Dataset.from_tensors(({"features": features, "images": np.arange(8, dtype=np.int32)},
                                         np.zeros(8, np.float32))).repeat(150)
    history = critic.fit(data, epochs=1, verbose=0)
    after = greedy_cider(critic)
    print(f"greedy CIDEr-D before {before:.4f}, after 150 self-critical steps {after:.4f}")
    assert after >= 1.2 * before, (before, after)
    assert set(history.history) >= {"reward", "baseline", "entropy", "loss"}
    # Its weights are the captioner's, layer for layer.
    plain = type(model).from_config(model.get_config())
    plain.build()
    plain.set_weights(critic.get_weights())
    assert greedy_cider(plain) == pytest.approx(after)
