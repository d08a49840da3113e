"""Deterministic, batched decoding: greedy and beam search (no sampling).

Both run the image encoder once per image and then only the recurrence per
step, for a whole batch at once, and stop as soon as every caption has
produced ``<end>``. The loops are compiled (``tf.function`` / ``jax.jit``).
Tokens that are not words (``<pad>``, ``<start>``, ``<unk>``: ``banned``) are
never chosen, whatever the model's scores for them.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np
from keras import ops

from captioning.model import Captioner


def _compile(fn):
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(fn, reduce_retracing=True)
    if backend == "jax":
        import jax

        return jax.jit(fn, static_argnums=(1, 2, 3))
    return fn


def _ban(vocab_size: int, banned) -> "np.ndarray":
    """Added to the scores: -1e9 for the tokens never to be emitted."""
    mask = np.zeros(vocab_size, np.float32)
    mask[[b for b in banned if 0 <= b < vocab_size]] = -1e9
    return mask


def greedy(model: Captioner, features, start_id: int, end_id: int, max_length: int, banned=()):
    """(B, P, C) -> tokens (B, max_length) int32 (padded with 0 after <end>), attention (B, max_length, P)."""
    mask = ops.convert_to_tensor(_ban(model.vocab_size, banned))
    image, projected, state = model.encode(features)
    batch = ops.shape(features)[0]
    positions = ops.shape(features)[1]
    token = ops.full((batch,), start_id, "int32")
    tokens = ops.zeros((batch, max_length), "int32")
    alphas = ops.zeros((batch, max_length, positions), "float32")
    done = ops.zeros((batch,), "bool")

    def cond(t, token, state, tokens, alphas, done):
        return ops.logical_and(t < max_length, ops.logical_not(ops.all(done)))

    def body(t, token, state, tokens, alphas, done):
        embedded = model.embed(token)
        state, context, alpha = model.recur(image, projected, state, embedded)
        logits = ops.cast(model.readout(state, context, embedded), "float32") + mask
        nxt = ops.cast(ops.argmax(logits, axis=-1), "int32")
        nxt = ops.where(done, ops.zeros_like(nxt), nxt)
        at_t = ops.expand_dims(ops.one_hot(t, max_length, dtype="int32"), 0)
        tokens = tokens + ops.expand_dims(nxt, 1) * at_t
        alphas = alphas + ops.expand_dims(ops.cast(alpha, "float32"), 1) * ops.expand_dims(ops.cast(at_t, "float32"), -1)
        done = ops.logical_or(done, ops.equal(nxt, end_id))
        return t + 1, nxt, state, tokens, alphas, done

    _, _, _, tokens, alphas, _ = ops.while_loop(cond, body, (0, token, state, tokens, alphas, done))
    return tokens, alphas


def beam(model: Captioner, features, start_id: int, end_id: int, max_length: int, width: int = 3,
         length_penalty: float = 0.7, banned=()):
    """Beam search for a batch (eagerly; ``Decoder`` compiles it); returns the best caption's tokens
    (B, max_length) and attention (B, max_length, P), as numpy, ranked by score / length**length_penalty."""
    found = beam_candidates(model, features, start_id, end_id, max_length, width, banned, (length_penalty,))
    return Candidates(*(np.asarray(ops.convert_to_numpy(x)) for x in found)).best(length_penalty)


def beam_candidates(model: Captioner, features, start_id: int, end_id: int, max_length: int, width: int = 3,
                    banned=(), length_penalties=(0.0,)):
    """Beam search with the finished captions kept apart from the ``width`` live ones.

    A caption that ends leaves the beam: it never takes a live hypothesis's place, so a longer caption is
    not pruned by shorter finished ones whose raw scores are higher. Live hypotheses all have the same length,
    so ranking them by summed log-probability is ranking them by any length-normalised score. For each
    penalty p in ``length_penalties`` the search keeps the best finished caption by score / length**p, and
    stops when no live hypothesis can still beat it (its score can only fall, and its length is at most
    ``max_length``). Returns candidates for ``Candidates.best``: tokens (B, M, max_length), attention
    (B, M, max_length, P), summed log-probabilities (B, M) and lengths (B, M), M = len(penalties) + width:
    each penalty's best finished caption, then the live hypotheses (which reached max_length unfinished, or
    cannot win)."""
    image, projected, state = model.encode(features)
    batch, positions = ops.shape(features)[0], ops.shape(features)[1]
    k = width
    vocab = model.vocab_size
    penalties = ops.convert_to_tensor(np.asarray(length_penalties, np.float32))          # (N,)
    n_pen = len(length_penalties)
    mask = ops.convert_to_tensor(_ban(vocab, banned))
    no_end = ops.convert_to_tensor(_ban(vocab, (end_id,)))

    def tile(x):  # (B, ...) -> (B*K, ...)
        return ops.reshape(ops.repeat(ops.expand_dims(x, 1), k, axis=1), (-1, *ops.shape(x)[1:]))

    def normalised(score, length):  # (..., ) with the penalties on a new last axis
        return ops.expand_dims(score, -1) / ops.power(ops.maximum(ops.expand_dims(length, -1), 1.0), penalties)

    image, projected, state = tile(image), tile(projected), tile(state)
    token = ops.full((batch * k,), start_id, "int32")
    # Only the first beam is live at the start, so the K beams do not all repeat one caption.
    scores = ops.tile(ops.convert_to_tensor([[0.0] + [-1e9] * (k - 1)]), (batch, 1))  # (B, K)
    tokens = ops.zeros((batch, k, max_length), "int32")
    alphas = ops.zeros((batch, k, max_length, positions), "float32")
    # Each penalty's best finished caption so far: none yet (-inf normalised score).
    fin_tokens = ops.zeros((batch, n_pen, max_length), "int32")
    fin_alphas = ops.zeros((batch, n_pen, max_length, positions), "float32")
    fin_scores = ops.full((batch, n_pen), -1e9)
    fin_lengths = ops.ones((batch, n_pen))
    fin_norm = ops.full((batch, n_pen), -np.inf)
    rows = ops.expand_dims(ops.arange(batch), 1)

    def cond(t, token, state, scores, tokens, alphas, fin):
        # Go on while some live hypothesis could still beat some penalty's best finished caption.
        best_live = ops.max(normalised(scores, ops.full(ops.shape(scores), float(max_length))), axis=1)  # (B, N)
        hopeful = ops.any(best_live > fin[4])
        return ops.logical_and(t < max_length, hopeful)

    def body(t, token, state, scores, tokens, alphas, fin):
        fin_tokens, fin_alphas, fin_scores, fin_lengths, fin_norm = fin
        embedded = model.embed(token)
        new_state, context, alpha = model.recur(image, projected, state, embedded)
        logp = ops.log_softmax(ops.cast(model.readout(new_state, context, embedded), "float32"), axis=-1)
        logp = ops.reshape(logp + mask, (batch, k, vocab))
        at_t = ops.one_hot(t, max_length, dtype="int32")
        alpha = ops.reshape(ops.cast(alpha, "float32"), (batch, k, positions))
        step_alphas = alphas + ops.expand_dims(alpha, 2) * ops.reshape(ops.cast(at_t, "float32"), (1, 1, -1, 1))
        length = ops.cast(t + 1, "float32")

        # Captions ending now: each live beam followed by <end>; per penalty, the best beats the kept one?
        ended = scores + logp[:, :, end_id]                                              # (B, K)
        ended_norm = normalised(ended, ops.full(ops.shape(ended), length))               # (B, K, N)
        which = ops.argmax(ended_norm, axis=1)                                           # (B, N) beam index
        best_ended = ops.max(ended_norm, axis=1)                                         # (B, N)
        better = best_ended > fin_norm                                                   # strict: ties keep the first
        gather = lambda x: ops.take_along_axis(x, ops.reshape(which, (batch, n_pen) + (1,) * (len(x.shape) - 2)), axis=1)
        ended_tokens = gather(tokens) + end_id * ops.reshape(at_t, (1, 1, -1))
        fin_tokens = ops.where(ops.expand_dims(better, -1), ended_tokens, fin_tokens)
        fin_alphas = ops.where(ops.reshape(better, (batch, n_pen, 1, 1)), gather(step_alphas), fin_alphas)
        fin_scores = ops.where(better, ops.take_along_axis(ended, which, axis=1), fin_scores)
        fin_lengths = ops.where(better, length, fin_lengths)
        fin_norm = ops.where(better, best_ended, fin_norm)

        # The live beams go on with words only.
        total = ops.reshape(ops.expand_dims(scores, -1) + logp + no_end, (batch, k * vocab))
        best, flat = ops.top_k(total, k)                                                 # (B, K)
        parent, word = flat // vocab, ops.cast(flat % vocab, "int32")
        pick = lambda x: ops.take_along_axis(x, ops.reshape(parent, (batch, k) + (1,) * (len(x.shape) - 2)), axis=1)
        tokens = pick(tokens) + ops.expand_dims(word, -1) * at_t
        alphas = pick(step_alphas)
        state = ops.take(new_state, ops.reshape(rows * k + parent, (-1,)), axis=0)
        return (t + 1, ops.reshape(word, (-1,)), state, best, tokens, alphas,
                (fin_tokens, fin_alphas, fin_scores, fin_lengths, fin_norm))

    t, _, _, scores, tokens, alphas, fin = ops.while_loop(
        cond, body, (0, token, state, scores, tokens, alphas,
                     (fin_tokens, fin_alphas, fin_scores, fin_lengths, fin_norm)))
    fin_tokens, fin_alphas, fin_scores, fin_lengths, _ = fin
    live_lengths = ops.full((batch, k), ops.cast(t, "float32"))
    return (ops.concatenate([fin_tokens, tokens], axis=1), ops.concatenate([fin_alphas, alphas], axis=1),
            ops.concatenate([fin_scores, scores], axis=1), ops.concatenate([fin_lengths, live_lengths], axis=1))


def chosen_decoding(meta: dict, decoder: str = "auto", beam_width: int = 3, length_penalty: float = 0.7) -> dict:
    """decoder=auto: what train chose on validation and recorded in the model's meta (greedy when a model
    records no choice); greedy or beam: as given."""
    if decoder == "auto":
        chosen = meta.get("decoding") or {"decoder": "greedy", "beam_width": 1, "length_penalty": 0.0}
        return {"decoder": chosen["decoder"], "beam_width": int(chosen["beam_width"]),
                "length_penalty": float(chosen["length_penalty"]), "chosen_on": "validation"}
    if decoder not in ("greedy", "beam"):
        raise ValueError(f"decoder {decoder!r}: choose auto, greedy or beam")
    beam = decoder == "beam"
    return {"decoder": decoder, "beam_width": beam_width if beam else 1,
            "length_penalty": length_penalty if beam else 0.0, "chosen_on": "settings"}


@dataclass
class Candidates:
    """Decoded captions of a batch before the length penalty ranks them (greedy: one per image)."""

    tokens: np.ndarray   # (B, K, max_length)
    alphas: np.ndarray   # (B, K, max_length, P)
    scores: np.ndarray   # (B, K) summed log-probabilities
    lengths: np.ndarray  # (B, K)

    def best(self, length_penalty: float) -> tuple[np.ndarray, np.ndarray]:
        """Tokens (B, max_length) and attention (B, max_length, P) of the best candidate after
        dividing each score by length**length_penalty (ties: the first, as argmax)."""
        if self.tokens.shape[1] == 1:  # greedy
            return self.tokens[:, 0], self.alphas[:, 0]
        # float64: one ranking, whatever the backend's float32 power would round to
        lengths = np.maximum(self.lengths.astype(np.float64), 1.0)
        best = np.argmax(self.scores.astype(np.float64) / np.power(lengths, length_penalty), axis=1)
        rows = np.arange(len(best))
        return self.tokens[rows, best], self.alphas[rows, best]


class Decoder:
    """Compiled decoding for one model: ``decoder(features) -> (tokens, attention)`` as numpy."""

    def __init__(self, model: Captioner, start_id: int, end_id: int, max_length: int,
                 method: str = "greedy", beam_width: int = 3, banned: tuple[int, ...] = (),
                 length_penalty: float = 0.7, length_penalties: tuple[float, ...] | None = None):
        """``banned``: token ids never emitted (the vocabulary's ``non_words``; ``<start>`` always).
        ``length_penalties``: every penalty the beam's captions will be ranked by (default: ``length_penalty``);
        the search keeps each one's best finished caption, so one search serves them all."""
        self.model = model
        self.length_penalty = length_penalty
        self.length_penalties = tuple(float(p) for p in (length_penalties or (length_penalty,)))
        if self.length_penalty not in self.length_penalties:
            self.length_penalties += (float(length_penalty),)
        banned = tuple(sorted({start_id, *banned}))
        if method == "greedy" or beam_width == 1:
            fn = lambda feats, s, e, m: greedy(model, feats, s, e, m, banned)
        else:
            fn = lambda feats, s, e, m: beam_candidates(model, feats, s, e, m, beam_width, banned=banned,
                                                        length_penalties=self.length_penalties)
        self.beam = not (method == "greedy" or beam_width == 1)
        self._fn = _compile(fn)
        self.args = (start_id, end_id, max_length)

    def penalty(self, length_penalty: float | None) -> float:
        """The penalty to rank by (None: the decoder's own); a beam ranks only by those it searched for."""
        penalty = self.length_penalty if length_penalty is None else float(length_penalty)
        if self.beam and penalty not in self.length_penalties:
            raise ValueError(f"length penalty {penalty}: this beam search kept the best finished captions for "
                             f"{list(self.length_penalties)} only; build the Decoder with length_penalties")
        return penalty

    def candidates(self, features) -> Candidates:
        out = [np.asarray(ops.convert_to_numpy(x)) for x in self._fn(ops.convert_to_tensor(features), *self.args)]
        if self.beam:
            return Candidates(*out)
        tokens, alphas = out
        ones = np.ones((len(tokens), 1), np.float32)
        return Candidates(tokens[:, None], alphas[:, None], 0 * ones, ones)

    def __call__(self, features, length_penalty: float | None = None):
        """Tokens (B, max_length) and attention (B, max_length, P); ``length_penalty`` overrides the decoder's."""
        return self.candidates(features).best(self.penalty(length_penalty))


def decode_all(decoder: Decoder, features, batch_size: int, length_penalties=(None,)):
    """Decode an unbatched tf.data dataset of feature grids, batch by batch, searching once for every
    length penalty (None: the decoder's own; each one the decoder was built for). Per penalty: tokens
    (N, max_length) and attention (N, max_length, P) of each image, in dataset order."""
    length_penalties = [decoder.penalty(p) for p in length_penalties]
    out = [([], []) for _ in length_penalties]
    for batch in features.batch(batch_size):
        candidates = decoder.candidates(batch)
        for (tokens, alphas), penalty in zip(out, length_penalties):
            best_tokens, best_alphas = candidates.best(penalty)
            tokens.append(best_tokens)
            alphas.append(best_alphas)
    empty = (np.zeros((0, decoder.args[2]), np.int32), np.zeros((0, decoder.args[2], 0), np.float32))
    return [(np.concatenate(t), np.concatenate(a)) if t else empty for t, a in out]
