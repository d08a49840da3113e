"""The captioner's behaviour on small random models (no training needed)."""

import numpy as np
import pytest

from captioning.decode import Decoder, beam, greedy
from captioning.model import Captioner

VOCAB, START, END = 20, 1, 2


@pytest.fixture(scope="module")
def model():
    import keras

    keras.utils.set_random_seed(1)
    m = Captioner(VOCAB, embedding_dim=16, units=24, dropout=0.0, attention_reg=1.0, context_dim=20)
    m.build()
    m.set_feature_stats(np.zeros(2048), np.ones(2048))
    return m


@pytest.fixture(scope="module")
def features():
    return np.random.default_rng(0).standard_normal((3, 64, 2048)).astype(np.float16)


def test_the_gru_state_carries_across_steps(model, features):
    tokens = np.array([[START, 5, 6, 7, 8, 9]] * 3, np.int32)
    other = tokens.copy()
    other[:, 1] = 11  # change only the word at step 1
    a = model({"features": features, "tokens": tokens})["logits"].numpy()
    b = model({"features": features, "tokens": other})["logits"].numpy()
    np.testing.assert_allclose(a[:, 0], b[:, 0], rtol=1e-5, atol=1e-6)  # before the change: same
    assert not np.allclose(a[:, 4], b[:, 4])  # three steps later: still different, via the state


def test_attention_is_a_distribution_over_64_positions(model, features):
    out = model({"features": features, "tokens": np.full((3, 4), 5, np.int32)})
    attention = out["attention"].numpy()
    assert attention.shape == (3, 4, 64)
    np.testing.assert_allclose(attention.sum(-1), 1.0, rtol=1e-4)


def test_loss_ignores_padding(model, features):
    tokens = np.array([[START, 5, 6, END]] * 3, np.int32)
    padded = np.concatenate([tokens, np.zeros((3, 3), np.int32)], axis=1)
    no_reg = Captioner.from_config({**model.get_config(), "attention_reg": 0.0})
    no_reg.build()
    no_reg.set_weights(model.get_weights())

    def loss(t):
        inp, tgt = t[:, :-1], t[:, 1:]
        return float(no_reg.compute_loss(y=tgt, y_pred=no_reg({"features": features, "tokens": inp})))

    assert loss(tokens) == pytest.approx(loss(padded), rel=1e-5)


def test_safe_save_and_load_round_trip(model, features, tmp_path):
    import keras

    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True, compile=False)
    tokens = np.array([[START, 5, 6]] * 3, np.int32)
    np.testing.assert_allclose(model({"features": features, "tokens": tokens})["logits"].numpy(),
                               loaded({"features": features, "tokens": tokens})["logits"].numpy(), rtol=1e-5)


def reference_greedy(model, feats, max_length):
    """Step-by-step teacher forcing on the model's own argmax: what greedy must equal."""
    tokens = [START]
    for _ in range(max_length):
        logits = model({"features": feats[None], "tokens": np.array([tokens], np.int32)})["logits"].numpy()
        logits[0, -1, START] = -np.inf  # <start> is never emitted
        tokens.append(int(logits[0, -1].argmax()))
        if tokens[-1] == END:
            break
    return tokens[1:]


def test_batched_greedy_equals_step_by_step_argmax(model, features):
    decoder = Decoder(model, START, END, max_length=8, method="greedy")
    tokens, attention = decoder(features)
    assert tokens.shape == (3, 8) and attention.shape == (3, 8, 64)
    for row, feats in zip(tokens, features):
        expected = reference_greedy(model, feats, 8)
        assert list(row[: len(expected)]) == expected
        assert not row[len(expected):].any()  # nothing after <end>


def test_beams_of_width_one_and_four_score_no_worse_than_greedy(model, features):
    """Greedy's caption is among a width-1 beam's finished captions (the live beam follows greedy's words until
    greedy ends), so a beam never scores below it."""
    g, _ = greedy(model, features, START, END, 8)

    def log_prob(seq, feats):
        seq = [t for t in seq if t != 0]
        inp = np.array([[START] + seq[:-1]], np.int32)
        logits = model({"features": feats[None], "tokens": inp})["logits"].numpy()[0]
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
        return float(sum(logp[i, t] for i, t in enumerate(seq)))

    for width in (1, 4):
        b, _ = beam(model, features, START, END, 8, width=width, length_penalty=0.0)
        for k in range(3):
            assert log_prob(list(np.asarray(b)[k]), features[k]) >= log_prob(list(np.asarray(g)[k]), features[k]) - 1e-4


class ChainModel:
    """A constructed captioner: the next word's probabilities depend only on the previous word (a table),
    written with keras.ops so the real beam search runs on it unchanged."""

    def __init__(self, table: dict[int, dict[int, float]], vocab_size: int):
        import keras

        probs = np.full((vocab_size, vocab_size), 1e-6, np.float32)
        for prev, nexts in table.items():
            for word, p in nexts.items():
                probs[prev, word] = p
        self.vocab_size = vocab_size
        self.log_table = keras.ops.convert_to_tensor(np.log(probs / probs.sum(1, keepdims=True)))

    def encode(self, features):
        from keras import ops
        batch = ops.shape(features)[0]
        return ops.zeros((batch, 64, 1)), ops.zeros((batch, 64, 1)), ops.zeros((batch, self.vocab_size))

    def embed(self, token):
        from keras import ops
        return ops.one_hot(token, self.vocab_size)

    def recur(self, image, projected, state, embedded):
        from keras import ops
        rows = ops.shape(embedded)[0]
        return embedded, ops.zeros((rows, 1)), ops.full((rows, 64), 1 / 64)

    def readout(self, state, context, embedded):
        from keras import ops
        return ops.matmul(embedded, self.log_table)  # log-probabilities are logits


def test_a_longer_caption_beats_shorter_finished_ones_under_a_length_penalty():
    """<end> is the likeliest first word and after A the likeliest second, so two short captions finish with
    higher raw scores than A B D <end> (log p -2.005, 4 tokens) has as a prefix. A beam of 2 that let finished
    captions keep their places (as this search did before) pruned A B at step 2 and returned the empty caption
    at penalties 0 to 1. With finished captions kept apart, the long one is found and wins at penalty 1
    (-2.005/4 = -0.50 against -0.69 for <end> alone) and loses at penalty 0."""
    A, B, C, D = 4, 5, 6, 7
    chain = ChainModel({START: {END: 0.5, A: 0.3, C: 0.2}, A: {END: 0.55, B: 0.45}, B: {D: 1.0}, D: {END: 1.0},
                        C: {END: 0.99, B: 0.01}}, vocab_size=8)
    feats = np.zeros((2, 64, 1), np.float32)
    long_caption = [A, B, D, END, 0, 0, 0, 0]
    for penalty, expected in ((1.0, long_caption), (0.0, [END] + [0] * 7)):
        tokens, alphas = beam(chain, feats, START, END, 8, width=2, length_penalty=penalty)
        assert [list(row) for row in np.asarray(tokens)] == [expected, expected], penalty
        assert np.asarray(alphas).shape == (2, 8, 64)
    shared = Decoder(chain, START, END, 8, method="beam", beam_width=2, length_penalties=(0.0, 1.0))
    candidates = shared.candidates(feats)
    assert [list(candidates.best(p)[0][0]) for p in (1.0, 0.0)] == [long_caption, [END] + [0] * 7]
    with pytest.raises(ValueError, match="length penalty 0.5"):
        shared(feats, length_penalty=0.5)  # not searched for: refused rather than ranked on a partial pool


def test_decoding_is_deterministic(model, features):
    decoder = Decoder(model, START, END, max_length=8, method="beam", beam_width=3)
    a, _ = decoder(features)
    b, _ = decoder(features)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_decoding_never_emits_pad_start_or_unk_even_when_the_model_prefers_them(model, features, method):
    import keras

    PAD, UNK = 0, 3
    biased = Captioner.from_config(model.get_config())
    biased.build()
    biased.set_weights(model.get_weights())
    bias = np.zeros(VOCAB, np.float32)
    bias[[PAD, UNK, START]] = 50.0, 55.0, 60.0  # far above every word
    biased.logits.bias.assign(bias)
    plain, _ = Decoder(biased, START, END, max_length=8, method=method)(features)  # bans <start> only
    assert (plain[:, 0] == UNK).all()  # without the ban the model says little else
    tokens, _ = Decoder(biased, START, END, max_length=8, method=method, banned=(PAD, START, UNK))(features)
    for row in tokens:
        words = list(row[: list(row).index(END) + 1]) if END in row else list(row)
        assert not {PAD, START, UNK} & set(words), row
    assert keras.ops.shape(tokens) == (3, 8)


def test_a_mixed_precision_model_decodes_in_float32_without_a_gpu(tmp_path):
    import json

    import keras

    from captioning.bundle import load_bundle
    from captioning.text import Vocabulary

    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        mixed = Captioner(VOCAB, embedding_dim=16, units=24, dropout=0.0, attention_reg=1.0)
        mixed.build()
    finally:
        keras.mixed_precision.set_global_policy("float32")
    mixed.save(tmp_path / "captioner.keras")
    assert mixed.dtype_policy.compute_dtype == "float16"
    vocab = Vocabulary.build([[f"w{i}"] for i in range(VOCAB - 4)], min_count=1, max_size=VOCAB)
    (tmp_path / "vocab.json").write_text(json.dumps(vocab.to_json()))
    (tmp_path / "meta.json").write_text("{}")
    (tmp_path / "backbone.weights.h5").write_bytes(b"")
    loaded = load_bundle(tmp_path).model
    assert {layer.dtype_policy.compute_dtype for layer in (loaded, *loaded.layers)} == {"float32"}


# ---------------------------------------------------------------- the paper's model (issue 13, point 5)

def test_the_context_is_gated_by_a_scalar_beta_from_the_previous_state(model, features):
    image, projected, state = model.encode(features)
    alpha, context = model.attend(image, projected, state)
    beta = model.gate(state).numpy()
    assert beta.shape == (3, 1) and ((beta > 0) & (beta < 1)).all()
    weighted = (image.numpy() * alpha.numpy()[..., None]).sum(1)
    np.testing.assert_allclose(context.numpy(), beta * weighted, rtol=1e-5, atol=1e-6)
    assert context.shape == (3, 20)  # the context has its own width (train.context_dim), not the embedding's


def test_the_attention_penalty_is_the_papers_per_caption_sum_over_real_steps_and_any_number_of_regions(model):
    """λ Σ_i (1 − Σ_t α_ti)² per caption, padding excluded, with P read from the tensor (16 regions here),
    added to the summed cross-entropy; the whole divided by the batch's real tokens."""
    feats = np.random.default_rng(3).standard_normal((2, 16, 2048)).astype(np.float32)
    inp = np.array([[START, 5, 6, 7], [START, 8, 0, 0]], np.int32)
    tgt = np.array([[5, 6, 7, END], [8, END, 0, 0]], np.int32)
    reg = Captioner.from_config({**model.get_config(), "attention_reg": 2.5})
    reg.build()
    reg.set_weights(model.get_weights())
    out = reg({"features": feats, "tokens": inp})
    mask = (tgt != 0).astype(np.float32)
    alphas = out["attention"].numpy()
    assert alphas.shape == (2, 4, 16)
    penalty = ((1.0 - (alphas * mask[..., None]).sum(1)) ** 2).sum()
    logits = out["logits"].numpy().astype(np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    xent = -np.take_along_axis(logp, tgt[..., None], -1)[..., 0]
    expected = ((xent * mask).sum() + 2.5 * penalty) / mask.sum()
    assert float(reg.compute_loss(y=tgt, y_pred=out)) == pytest.approx(expected, rel=1e-5)


def test_a_near_constant_training_channel_is_standardised_with_a_floor():
    m = Captioner(VOCAB, embedding_dim=8, units=8, context_dim=8)
    m.build()
    std = np.ones(2048, np.float32)
    std[7] = 1e-7  # (almost) never active on the training images
    m.set_feature_stats(np.zeros(2048), std)
    assert float(m.feature_std.numpy()[7]) == pytest.approx(0.1)  # 0.1 x the median spread, not 1e-7
    unseen = np.zeros((1, 64, 2048), np.float32)
    unseen[..., 7] = 3.0  # an image where it fires like any other channel
    standardised = (unseen - m.feature_mean.numpy()) / m.feature_std.numpy()
    assert np.abs(standardised).max() <= 30.0


def test_dropout_acts_on_the_state_and_on_the_deep_output():
    m = Captioner(VOCAB, embedding_dim=8, units=8, context_dim=8, dropout=0.5)
    assert m.state_dropout.rate == 0.5 and m.out_dropout.rate == 0.5


def test_a_model_of_the_earlier_architecture_is_refused_by_name(model, tmp_path):
    import json
    import zipfile

    from captioning.bundle import ModelError, load_bundle
    from captioning.text import Vocabulary

    model.save(tmp_path / "new.keras")
    with zipfile.ZipFile(tmp_path / "new.keras") as src, \
            zipfile.ZipFile(tmp_path / "captioner.keras", "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename == "config.json":  # what a model saved before the architecture was recorded holds
                config = json.loads(data)
                config["config"].pop("architecture")
                config["config"].pop("context_dim")
                data = json.dumps(config).encode()
            dst.writestr(item, data)
    vocab = Vocabulary.build([[f"w{i}"] for i in range(VOCAB - 4)], min_count=1, max_size=VOCAB)
    (tmp_path / "vocab.json").write_text(json.dumps(vocab.to_json()))
    (tmp_path / "meta.json").write_text("{}")
    (tmp_path / "backbone.weights.h5").write_bytes(b"")
    with pytest.raises(ModelError, match=r"captioner\.keras.*show-attend-tell/1.*train the model again"):
        load_bundle(tmp_path)


def test_the_coco2014_preset_has_the_papers_sizes():
    from captioning.config import load_config

    t = load_config(preset="coco2014").train
    assert t.embedding_dim == 512 and t.units >= 1024 and t.context_dim >= 512 and t.dropout == 0.5


@pytest.mark.slow  # trains: the slow tier
def test_train_deterministic_off_compiles_the_step_with_xla_and_on_rules_it_out(model, features):
    """Issue 13, point 6: op determinism and XLA exclude each other in TensorFlow; `train.deterministic`
    picks one. XLA compiles the step on CPUs too, so this runs here."""
    import keras
    from tensorflow.python.framework.config import is_op_determinism_enabled

    from captioning.steps.train import use_determinism

    tokens = np.array([[START, 5, 6, 7, END]] * 3, np.int32)
    try:
        for setting, xla in (("off", True), ("on", False)):
            assert use_determinism(setting) is (not xla) and is_op_determinism_enabled() is (not xla)
            m = Captioner.from_config(model.get_config())
            m.build()
            m.set_weights(model.get_weights())
            m.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=xla)
            assert m.jit_compile is xla
            first = m.train_on_batch({"features": features, "tokens": tokens[:, :-1]}, tokens[:, 1:])
            second = m.train_on_batch({"features": features, "tokens": tokens[:, :-1]}, tokens[:, 1:])
            assert np.isfinite(first) and second < first
        assert use_determinism("auto") is True  # no GPU here: deterministic
    finally:
        use_determinism("on")


def test_one_beam_search_ranked_by_each_length_penalty_equals_a_search_per_penalty(model):
    import tensorflow as tf

    from captioning.decode import decode_all

    feats = np.random.default_rng(4).standard_normal((12, 64, 2048)).astype(np.float16)
    biased = Captioner.from_config(model.get_config())
    biased.build()
    biased.set_weights(model.get_weights())
    bias = np.zeros(VOCAB, np.float32)
    bias[END] = 2.2  # <end> about as likely as the words: beams of different lengths compete
    biased.logits.bias.assign(bias)
    penalties = [0.0, 0.5, 0.7, 1.0, 3.0]
    shared = Decoder(biased, START, END, max_length=8, method="beam", beam_width=4, length_penalties=penalties)
    ranked = decode_all(shared, tf.data.Dataset.from_tensor_slices(feats), 5, penalties)  # batches 5, 5, 2
    for penalty, (tokens, alphas) in zip(penalties, ranked):
        own, own_alphas = beam(biased, feats, START, END, 8, width=4, length_penalty=penalty, banned=(START,))
        np.testing.assert_array_equal(tokens, np.asarray(own))
        np.testing.assert_allclose(alphas, np.asarray(own_alphas), atol=1e-6)
    lengths = {p: (t != 0).sum(1).mean() for p, (t, _) in zip(penalties, ranked)}
    assert lengths[3.0] > lengths[0.0], lengths  # the penalty did change the choice: longer captions


# ---------------------------------------------------------------- per-image batches (issue 23)

def test_a_per_image_batch_gives_the_per_pair_loss_logits_and_attention_of_the_same_pairs(model):
    """B images with K captions each, encoded once and broadcast, against the same (image, caption) pairs
    batched one pair a row with the image's features repeated (dropout off: the model fixture's 0.0).
    An image with fewer than K captions has empty rows, which are no pair: the attention penalty skips them."""
    rng = np.random.default_rng(5)
    feats = rng.standard_normal((3, 64, 2048)).astype(np.float16)
    lengths = [[6, 4, 9], [3, 7, 5], [8, 0, 0]]  # image 2 has one caption: two empty rows
    T = 11  # one more than the longest caption: the per-image batch is padded further than the pairs
    inp, tgt = np.zeros((3, 3, T), np.int32), np.zeros((3, 3, T), np.int32)
    for b, row in enumerate(lengths):
        for k, n in enumerate(row):
            if n:
                words = rng.integers(3, VOCAB, n)
                inp[b, k, : n + 1] = [START, *words]
                tgt[b, k, : n + 1] = [*words, END]
    pairs = [(b, k) for b in range(3) for k in range(3) if lengths[b][k]]
    pair_feats = np.stack([feats[b] for b, _ in pairs])
    pair_inp, pair_tgt = np.stack([inp[b, k] for b, k in pairs]), np.stack([tgt[b, k] for b, k in pairs])
    pair_inp, pair_tgt = pair_inp[:, :-1], pair_tgt[:, :-1]  # the pairs' own padding: shorter by one

    per_image = model({"features": feats, "tokens": inp})
    per_pair = model({"features": pair_feats, "tokens": pair_inp})
    rows = [b * 3 + k for b, k in pairs]
    np.testing.assert_allclose(per_image["logits"].numpy()[rows, :-1], per_pair["logits"].numpy(), atol=1e-5)
    np.testing.assert_allclose(per_image["attention"].numpy()[rows, :-1], per_pair["attention"].numpy(), atol=1e-6)
    assert float(model.compute_loss(y=tgt, y_pred=per_image)) == pytest.approx(
        float(model.compute_loss(y=pair_tgt, y_pred=per_pair)), abs=1e-5)
    assert model.attention_reg == 1.0  # the penalty is part of both


def test_the_encoder_runs_once_per_image_not_once_per_caption(model):
    """The dense layers that read the image see B rows, whatever K: counted by the encoder's input shapes."""
    seen = []
    original = model.encoder.call

    def spy(x, *args, **kwargs):
        seen.append(tuple(x.shape))
        return original(x, *args, **kwargs)

    feats = np.zeros((2, 64, 2048), np.float16)
    tokens = np.full((2, 5, 4), 5, np.int32)
    model.encoder.call = spy
    try:
        out = model({"features": feats, "tokens": tokens})
    finally:
        model.encoder.call = original
    assert seen == [(2, 64, 2048)] and out["logits"].shape == (10, 4, VOCAB)


def test_the_step_is_keras_gru_cell_with_the_words_projection_taken_out_of_the_loop(model, features):
    """recur's GRU, given the words' projection computed beforehand, is the model's own GRUCell."""
    image, projected, state = model.encode(features)
    embedded = model.embed(np.array([5, 6, 7], np.int32))
    new_state, context, _ = model.recur(image, projected, state, word_gates=model.word_gates(embedded))
    _, expected_context = model.attend(image, projected, state)
    expected, _ = model.gru(np.concatenate([embedded.numpy(), expected_context.numpy()], -1), [state])
    np.testing.assert_allclose(new_state.numpy(), expected.numpy(), atol=1e-6)
    np.testing.assert_allclose(model.recur(image, projected, state, embedded)[0].numpy(), expected.numpy(), atol=1e-6)


def test_without_xla_the_training_loss_runs_the_output_layer_at_real_tokens_only_and_is_the_same(model):
    """Compiled without XLA (the CPU default), training leaves the output layer to the loss, which runs it at
    the real tokens only; the loss is the dense one's (dropout off)."""
    import keras

    rng = np.random.default_rng(6)
    feats = rng.standard_normal((2, 64, 2048)).astype(np.float16)
    tgt = np.zeros((2, 2, 6), np.int32)
    tgt[0, 0, :4], tgt[0, 1, :2], tgt[1, 0, :6] = [5, 6, 7, END], [8, END], [9, 5, 6, 7, 8, END]
    inp = np.where(tgt != 0, np.concatenate([np.full((2, 2, 1), START), tgt[..., :-1]], -1), 0)
    inp = inp * (tgt != 0)
    dense = model({"features": feats, "tokens": inp}, training=False)
    expected = float(model.compute_loss(y=tgt, y_pred=dense, training=False))
    sparse = Captioner.from_config(model.get_config())
    sparse.build()
    sparse.set_weights(model.get_weights())
    sparse.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=False)
    out = sparse({"features": feats, "tokens": inp}, training=True)
    assert "logits" not in out and out["states"].shape == (4, 6, 24)
    assert float(sparse.compute_loss(y=tgt, y_pred=out, training=True)) == pytest.approx(expected, abs=1e-5)
    from captioning.steps.train import use_determinism

    try:
        use_determinism("off")  # op determinism rules XLA out
        xla = Captioner.from_config(model.get_config())
        xla.build()
        xla.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=True)
        assert xla.jit_compile is True
        assert "logits" in xla({"features": feats, "tokens": inp}, training=True)  # static shapes under XLA
    finally:
        use_determinism("on")
