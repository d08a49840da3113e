"""Self-critical sequence training (Rennie et al. 2017) on CIDEr-D, after cross-entropy.

Each step draws K captions per image from the model's policy (its softmax with the
non-word tokens masked, dropout off), scores each against all the image's training
references with CIDEr-D, and follows the REINFORCE gradient of
(reward − baseline) · log p(caption). The baseline is the mean reward of the image's
other K − 1 samples (Luo 2020, "a better variant of SCST") or the greedy caption's
reward (Rennie et al.). ``<end>`` is one of the caption's words inside the reward, as
in the references: without it CIDEr-D rewards sentence fragments (Hu et al. 2023).

``CiderD`` is coco-caption's CIDEr-D (pycocoevalcap's ``CiderScorer``: n-grams to 4,
σ = 6, clipped tf-idf, the length penalty on the bigram counts, ×10), vectorised with
numpy in float64 over token ids, with document frequencies from a fixed corpus (the
training references) instead of the images being scored.
"""

from __future__ import annotations

import numpy as np

ORDERS = 4
SIGMA = 6.0
MAX_VOCAB = 1 << 15  # token ids below it: four of them and the order fit an int64 n-gram key


class CiderD:
    """CIDEr-D of candidate token sequences against the references of corpus images.

    ``references[i]`` are image i's reference sequences (token ids, no ``<start>``, no padding). Document
    frequencies and the log corpus size come from these images, so given the same references as its corpus
    a score equals pycocoevalcap's ``Cider()`` on the same words."""

    def __init__(self, references: list[list[list[int]]], vocab_size: int):
        if vocab_size >= MAX_VOCAB:
            raise ValueError(f"vocabulary of {vocab_size}: n-gram keys hold token ids below 32768")
        self.base = vocab_size + 1
        self.ref_len = np.log(float(len(references)))
        self.ref_first = np.concatenate([[0], np.cumsum([len(r) for r in references])]).astype(np.int64)
        flat = [ref for refs in references for ref in refs]
        owner, keys = self._ngrams(flat)                         # one entry per n-gram occurrence
        ref_image = np.repeat(np.arange(len(references)), [len(r) for r in references])
        # Document frequency: the number of images whose references hold the n-gram.
        image_keys = np.unique(np.stack([ref_image[owner], keys]), axis=1) if len(keys) else np.zeros((2, 0), np.int64)
        self.keys, self.df = np.unique(image_keys[1], return_counts=True)
        # Each reference's tf-idf vector as sorted (reference, n-gram id) entries.
        dense = np.searchsorted(self.keys, keys)
        composite, counts = np.unique(owner * len(self.keys) + dense, return_counts=True)
        self.ref_entries = composite
        ref_of, dense_of = composite // max(len(self.keys), 1), composite % max(len(self.keys), 1)
        self.ref_weights = counts * (self.ref_len - np.log(np.maximum(1.0, self.df[dense_of])))
        order = self._order(self.keys[dense_of])
        self.ref_norms = np.sqrt(np.bincount(ref_of * ORDERS + order, self.ref_weights ** 2,
                                             minlength=len(flat) * ORDERS)).reshape(len(flat), ORDERS)
        self.ref_lengths = np.array([max(len(r) - 1, 0) for r in flat], np.float64)  # bigrams, as coco-caption

    def _ngrams(self, sequences: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """(owner, key) of every n-gram (orders 1-4) of every sequence; the key encodes the order and the ids."""
        owners, keys = [], []
        for n in range(1, ORDERS + 1):
            for row, seq in enumerate(sequences):
                if len(seq) < n:
                    continue
                ids = np.asarray(seq, np.int64)
                windows = np.lib.stride_tricks.sliding_window_view(ids, n)
                key = np.full(len(windows), n - 1, np.int64)
                for j in range(n):
                    key = key * self.base + windows[:, j]
                keys.append(key)
                owners.append(np.full(len(windows), row, np.int64))
        if not keys:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(owners), np.concatenate(keys)

    def _order(self, keys: np.ndarray) -> np.ndarray:
        """The n-gram order (0-3) a key encodes: keys of order n lie in [(n-1)·base^n, n·base^n)."""
        order = np.zeros(len(keys), np.int64)
        for n in range(2, ORDERS + 1):
            order[keys >= (n - 1) * self.base ** n] = n - 1
        return order

    def score(self, candidates, images) -> np.ndarray:
        """CIDEr-D (float64) of each candidate (a sequence of ids, or a row of an int array where 0 pads) against
        the references of ``images[i]`` (a corpus image index)."""
        sequences = [[int(t) for t in c if t != 0] for c in candidates]
        images = np.asarray(images, np.int64)
        n_keys = max(len(self.keys), 1)
        owner, keys = self._ngrams(sequences)
        entries, counts = np.unique(np.stack([owner, keys]), axis=1, return_counts=True) if len(keys) else (
            np.zeros((2, 0), np.int64), np.zeros(0, np.int64))
        cand, keys = entries
        dense = np.minimum(np.searchsorted(self.keys, keys), n_keys - 1)
        known = self.keys[dense] == keys if len(self.keys) else np.zeros(len(keys), bool)
        df = np.where(known, self.df[dense] if len(self.keys) else 0, 0)
        weights = counts * (self.ref_len - np.log(np.maximum(1.0, df)))
        order = self._order(keys)
        norms = np.sqrt(np.bincount(cand * ORDERS + order, weights ** 2,
                                    minlength=len(sequences) * ORDERS)).reshape(len(sequences), ORDERS)
        lengths = np.array([max(len(s) - 1, 0) for s in sequences], np.float64)

        # Every (candidate, reference of its image) pair, and each candidate n-gram's weight in that reference.
        first, last = self.ref_first[images], self.ref_first[images + 1]
        per_cand = last - first
        pair_cand = np.repeat(np.arange(len(sequences)), per_cand)
        pair_ref = np.concatenate([np.arange(a, b) for a, b in zip(first, last)]) if len(sequences) else \
            np.zeros(0, np.int64)
        pair_of = np.concatenate([[0], np.cumsum(per_cand)])  # candidate c's pairs: pair_of[c] .. pair_of[c+1]
        # Expand each candidate n-gram over its candidate's references.
        reps = per_cand[cand]
        entry = np.repeat(np.arange(len(cand)), reps)
        offset = np.arange(len(entry)) - np.repeat(np.cumsum(reps) - reps, reps)
        pair = pair_of[cand[entry]] + offset
        composite = pair_ref[pair] * n_keys + dense[entry]
        at = np.minimum(np.searchsorted(self.ref_entries, composite), max(len(self.ref_entries) - 1, 0))
        found = known[entry] & (self.ref_entries[at] == composite) if len(self.ref_entries) else np.zeros(len(entry), bool)
        ref_w = np.where(found, self.ref_weights[at] if len(self.ref_weights) else 0.0, 0.0)
        hyp_w = weights[entry]
        value = np.bincount(pair * ORDERS + order[entry], np.minimum(hyp_w, ref_w) * ref_w,
                            minlength=len(pair_ref) * ORDERS).reshape(len(pair_ref), ORDERS)
        denominator = norms[pair_cand] * self.ref_norms[pair_ref]
        value = np.where(denominator != 0, value / np.where(denominator != 0, denominator, 1.0), value)
        delta = lengths[pair_cand] - self.ref_lengths[pair_ref]
        value = value * np.exp(-(delta ** 2) / (2 * SIGMA ** 2))[:, None]
        per_pair = value.mean(axis=1)
        total = np.bincount(pair_cand, per_pair, minlength=len(sequences))
        return total / np.maximum(per_cand, 1) * 10.0


# ---------------------------------------------------------------- the policy (TensorFlow)

def policy_mask(vocab_size: int, banned) -> np.ndarray:
    """Added to the logits: the policy never emits a non-word (``<pad>``, ``<start>``, ``<unk>``)."""
    mask = np.zeros(vocab_size, np.float32)
    mask[[b for b in banned if 0 <= b < vocab_size]] = -1e9
    return mask


def sample(model, features, samples: int, start_id: int, end_id: int, max_length: int, mask, seed):
    """``samples`` captions per image drawn from the policy (dropout off), reproducibly from ``seed`` (a (2,)
    int tensor: a run's seed and the batch's number): tokens (B·K, max_length) int32, row b·K + k the k-th of image b, 0 after ``<end>``, and each
    caption's log-probability under the policy (B·K,)."""
    import tensorflow as tf

    image, projected, state = model.encode(features)
    rows = tf.shape(features)[0] * samples
    state = tf.repeat(state, samples, axis=0)  # attend broadcasts the image to its K rows
    mask = tf.convert_to_tensor(mask)

    def body(t, token, state, tokens, log_prob, done):
        embedded = model.embed(token)
        state, context, _ = model.recur(image, projected, state, embedded)
        logits = tf.cast(model.readout(state, context, embedded), tf.float32) + mask
        # (seed, batch·max_length + t): every step of every batch draws its own noise.
        step_seed = tf.stack([seed[0], seed[1] * max_length + t])
        drawn = tf.cast(tf.random.stateless_categorical(logits, 1, seed=step_seed)[:, 0], tf.int32)
        step_log_prob = tf.gather(tf.nn.log_softmax(logits), drawn, batch_dims=1)
        drawn = tf.where(done, 0, drawn)
        log_prob += tf.where(done, 0.0, step_log_prob)
        tokens = tokens.write(t, drawn)
        return t + 1, drawn, state, tokens, log_prob, done | tf.equal(drawn, end_id)

    _, _, _, tokens, log_prob, _ = tf.while_loop(
        lambda t, *_: t < max_length, body,
        (tf.constant(0), tf.fill([rows], start_id), state, tf.TensorArray(tf.int32, size=max_length),
         tf.zeros([rows]), tf.zeros([rows], tf.bool)))
    return tf.transpose(tokens.stack()), log_prob


def teacher_forced(model, features, tokens, samples: int, start_id: int, mask):
    """The policy's log-probability of each token of ``tokens`` (B·K, T) given the ones before it (0 where
    ``tokens`` pads), and the policy's entropy at each position, by teacher forcing with dropout off."""
    import tensorflow as tf

    inputs = tf.concat([tf.fill([tf.shape(tokens)[0], 1], start_id), tokens[:, :-1]], axis=1)
    real = tf.not_equal(tokens, 0)
    inputs = inputs * tf.cast(real, tf.int32)  # <end> is a target, never an input
    shaped = tf.reshape(inputs, (tf.shape(features)[0], samples, -1))
    logits = tf.cast(model({"features": features, "tokens": shaped}, training=False)["logits"], tf.float32) + mask
    log_probs = tf.nn.log_softmax(logits)
    chosen = tf.gather(log_probs, tokens, batch_dims=2) * tf.cast(real, tf.float32)
    entropy = -tf.reduce_sum(tf.exp(log_probs) * log_probs, axis=-1) * tf.cast(real, tf.float32)
    return chosen, entropy


def image_references(batches) -> list[list[list[int]]]:
    """Every reference of each image of a split's ``ImageBatches`` (all n, not the K of a batch), as the reward
    reads them: the words and ``<end>``, without ``<start>`` and padding."""
    refs = []
    for first, count in zip(batches.first, batches.counts):
        rows = batches.tokens[first : first + count, 1:]
        refs.append([[int(t) for t in row if t != 0] for row in rows])
    return refs


def _self_critical_class():
    """Defined on first use: it subclasses the Keras model, so importing this module stays light."""
    import keras
    import tensorflow as tf

    from captioning.decode import greedy
    from captioning.model import Captioner

    class SelfCritical(Captioner):
        """The captioner with a self-critical ``train_step``. Its weights are the captioner's, layer for layer:
        the epochs' weight files load into a plain ``Captioner``."""

        def configure(self, cider: CiderD, samples: int, baseline: str, start_id: int, end_id: int,
                      max_length: int, banned, seed: int) -> None:
            if samples < 2 and baseline == "mean":
                raise ValueError("train.scst_samples must be at least 2 with the mean-of-the-others baseline")
            self.cider, self.samples, self.baseline = cider, samples, baseline
            self.start_id, self.end_id, self.max_length = start_id, end_id, max_length
            self.banned = tuple(sorted({start_id, *banned}))
            self.policy = policy_mask(self.vocab_size, self.banned)
            self.seed = seed

        def _rewards(self, tokens, images):
            real = images >= 0
            scores = self.cider.score(tokens, np.where(real, images, 0))
            return np.where(real, scores, 0.0)

        def train_step(self, data):
            x, _ = data
            features, images = x["features"], tf.cast(x["images"], tf.int32)
            k = self.samples
            # The batch's number over the run (or the step): a resumed run draws the same captions again.
            serial = x["serial"] if "serial" in x else self.optimizer.iterations
            seed = tf.stack([tf.constant(self.seed, tf.int32), tf.cast(serial, tf.int32)])
            tokens, _ = sample(self, features, k, self.start_id, self.end_id, self.max_length, self.policy, seed)
            rewards = tf.numpy_function(self._rewards, [tokens, tf.repeat(images, k)], tf.float64, stateful=False)
            rewards = tf.reshape(tf.cast(rewards, tf.float32), (-1, k))                       # (B, K)
            if self.baseline == "greedy":
                best, _ = greedy(self, features, self.start_id, self.end_id, self.max_length, self.banned)
                base = tf.numpy_function(self._rewards, [best, images], tf.float64, stateful=False)
                base = tf.repeat(tf.reshape(tf.cast(base, tf.float32), (-1, 1)), k, axis=1)
            else:  # the mean of the image's other samples
                base = (tf.reduce_sum(rewards, axis=1, keepdims=True) - rewards) / (k - 1)
            real_image = tf.repeat(tf.cast(images >= 0, tf.float32)[:, None], k, axis=1)     # (B, K)
            advantage = tf.reshape((rewards - base) * real_image, (-1, 1))
            real = tf.cast(tf.not_equal(tokens, 0), tf.float32) * tf.reshape(real_image, (-1, 1))
            with tf.GradientTape() as tape:
                chosen, entropy = teacher_forced(self, features, tokens, k, self.start_id, self.policy)
                loss = -tf.reduce_sum(tf.stop_gradient(advantage) * chosen) / tf.maximum(tf.reduce_sum(real), 1.0)
            grads = tape.gradient(loss, self.trainable_weights)
            self.optimizer.apply(grads, self.trainable_weights)
            images_real = tf.maximum(tf.reduce_sum(real_image), 1.0)
            return {"loss": loss, "reward": tf.reduce_sum(rewards * real_image) / images_real,
                    "baseline": tf.reduce_sum(base * real_image) / images_real,
                    "entropy": tf.reduce_sum(entropy * real) / tf.maximum(tf.reduce_sum(real), 1.0)}

    return SelfCritical


def self_critical(model, cider: CiderD, samples: int, baseline: str, start_id: int, end_id: int, max_length: int,
                  banned, seed: int):
    """A self-critical copy of ``model`` (same sizes, same weights), ready to ``compile`` and ``fit`` on
    ``ImageBatches.image_dataset``."""
    # float32 whatever the model's policy: under mixed_float16 Keras would wrap the optimizer in a loss-scale
    # optimizer, which divides the gradients of this hand-written step by the scale it never applied.
    twin = _self_critical_class().from_config({**model.get_config(), "dtype": "float32"})
    twin.build()
    twin.set_weights(model.get_weights())
    twin.configure(cider, samples, baseline, start_id, end_id, max_length, banned, seed)
    return twin


def epoch_means(keys=("reward", "baseline", "entropy", "loss")):
    """Keras reports a custom ``train_step``'s last batch at epoch end; this puts the epoch's means of ``keys``
    in the epoch's logs instead (``scst_reward``, ``scst_baseline``, ``scst_entropy``, ``loss``: the CSV history,
    W&B). With the mean-of-the-others baseline the mean baseline equals the mean reward by construction; the
    greedy baseline's differs. Place it first."""
    import keras

    class EpochMeans(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.sums, self.batches = dict.fromkeys(keys, 0.0), 0

        def on_train_batch_end(self, batch, logs=None):
            self.batches += 1
            for key in keys:
                self.sums[key] += float((logs or {}).get(key, 0.0))

        def on_epoch_end(self, epoch, logs=None):
            if logs is not None and self.batches:
                for key in keys:  # the last batch's figure, replaced by the epoch's mean
                    logs.pop(key, None)
                logs.update({f"scst_{key}" if key != "loss" else key: value / self.batches
                             for key, value in self.sums.items()})

    return EpochMeans()
