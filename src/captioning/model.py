"""Show, Attend and Tell in Keras 3, written with ``keras.ops`` (TensorFlow or JAX).

Shapes: B batch, T caption steps, P=64 grid positions, C=2048 channels,
D context width, E embedding size, U decoder units, V vocabulary.

As in the paper (Xu et al. 2015, soft attention): a gating scalar β_t = σ(f_β(h_{t-1}))
scales the context (§4.2.1); the deep output reads the previous word, the state and
the context (eq. 7); dropout sits on the state and on the deep output, as in the
authors' code (arctic-captions); the doubly-stochastic penalty is
λ Σ_i (1 − Σ_t α_ti)² per caption (eq. 14). A GRU replaces the LSTM.

Unlike the TensorFlow tutorial this model derives from:
- the GRU state is carried from step to step (the tutorial never passed it back in);
- the attention's projection of the image, W1·features, is computed once per
  image, not at every step;
- the output layer (deep output), the embeddings and the GRU's projection of the
  words run once over all steps, only the recurrence itself is a loop;
- training batches hold K captions of each image (``dataset.ImageBatches``): an
  image's features are encoded once (annotations, attention keys, h0) for all K.
"""

from __future__ import annotations

import keras
from keras import layers, ops

# Bumped whenever the layers or their meaning change: a saved model of another
# architecture is refused by name instead of being loaded into the wrong layers.
ARCHITECTURE = "show-attend-tell/2"
# Channels whose training spread is below this share of the median channel's are
# standardised with the floor: a channel that is almost constant on the training
# images must not blow up on an image where it is not.
STD_FLOOR_OF_MEDIAN = 0.1


class ArchitectureError(ValueError):
    pass


class StepTraces:
    """How often the loss was built for training and for validation: in a compiled ``fit`` only while the
    train and test steps are traced (Keras builds it twice for a step's first trace), never per batch;
    XLA then compiles each trace once per batch shape."""

    def __init__(self):
        self.train = self.val = 0


@keras.saving.register_keras_serializable(package="captioning")
class Captioner(keras.Model):
    def __init__(self, vocab_size: int, embedding_dim: int = 512, units: int = 1024, dropout: float = 0.5,
                 attention_reg: float = 1.0, channels: int = 2048, context_dim: int = 512,
                 architecture: str = ARCHITECTURE, **kwargs):
        if architecture != ARCHITECTURE:
            raise ArchitectureError(f"a {architecture!r} captioner; this version builds {ARCHITECTURE!r}: "
                                    "train the model again with this version")
        super().__init__(**kwargs)
        self.vocab_size, self.embedding_dim, self.units = vocab_size, embedding_dim, units
        self.dropout_rate, self.attention_reg, self.channels = dropout, attention_reg, channels
        self.context_dim = context_dim
        self.step_traces = StepTraces()
        # Standardisation of the backbone's features, from the training split.
        self.feature_mean = self.add_weight(shape=(channels,), initializer="zeros", trainable=False, name="feature_mean")
        self.feature_std = self.add_weight(shape=(channels,), initializer="ones", trainable=False, name="feature_std")
        self.encoder = layers.Dense(context_dim, activation="relu", name="encoder")        # C -> D: a_i
        self.attend_image = layers.Dense(context_dim, name="attend_image")                 # W1: D -> D
        self.attend_state = layers.Dense(context_dim, name="attend_state")                 # W2: U -> D
        self.attend_score = layers.Dense(1, name="attend_score")                           # v:  D -> 1
        self.gate = layers.Dense(1, activation="sigmoid", name="gate")                     # f_beta: U -> 1
        self.init_state = layers.Dense(units, activation="tanh", name="init_state")        # mean a_i -> h0
        self.embed = layers.Embedding(vocab_size, embedding_dim, name="embed")
        self.gru = layers.GRUCell(units, name="gru")
        self.state_dropout = layers.Dropout(dropout)
        self.out_state = layers.Dense(embedding_dim, name="out_state")                     # L_h: U -> E
        self.out_context = layers.Dense(embedding_dim, use_bias=False, name="out_context") # L_z: D -> E
        self.out_dropout = layers.Dropout(dropout)
        self.logits = layers.Dense(vocab_size, name="logits")                             # L_o: E -> V

    def build(self, input_shape=None):
        e, u, c, d = self.embedding_dim, self.units, self.channels, self.context_dim
        self.encoder.build((None, None, c))
        self.attend_image.build((None, None, d))
        self.attend_state.build((None, u))
        self.attend_score.build((None, None, d))
        self.gate.build((None, u))
        self.init_state.build((None, d))
        self.embed.build((None, None))
        self.gru.build((None, e + d))
        self.out_state.build((None, None, u))
        self.out_context.build((None, None, d))
        self.logits.build((None, None, e))
        self.built = True

    def get_config(self):
        return {**super().get_config(), "vocab_size": self.vocab_size, "embedding_dim": self.embedding_dim,
                "units": self.units, "dropout": self.dropout_rate, "attention_reg": self.attention_reg,
                "channels": self.channels, "context_dim": self.context_dim, "architecture": ARCHITECTURE}

    @classmethod
    def from_config(cls, config):
        # A model saved before the architecture was recorded is the first one.
        return cls(**{"architecture": "show-attend-tell/1", **config})

    def set_feature_stats(self, mean, std) -> None:
        std = ops.convert_to_tensor(std, "float32")
        floor = ops.maximum(STD_FLOOR_OF_MEDIAN * ops.median(std), 1e-3)
        self.feature_mean.assign(ops.convert_to_tensor(mean, "float32"))
        self.feature_std.assign(ops.maximum(std, floor))

    # ------------------------------------------------------------ pieces

    def encode(self, features):
        """(B, P, C) float16/32 -> annotations a (B, P, D), their W1 projection (B, P, D), h0 (B, U)."""
        x = (ops.cast(features, "float32") - self.feature_mean) / self.feature_std
        image = self.encoder(x)
        return image, self.attend_image(image), self.init_state(ops.mean(image, axis=1))

    def attend(self, image, projected, state):
        """Soft attention: alpha (N, P) over positions and the gated context β·Σ α_i a_i (N, D), for N = B·K
        states of B images (K captions each, caption-major within an image: row b·K + k). The image's
        annotations and keys are broadcast to its K states, never copied; the context is a batched product."""
        images, positions, width = ops.shape(image)[0], ops.shape(image)[1], ops.shape(image)[2]
        keys = ops.reshape(self.attend_state(state), (images, -1, 1, width))             # (B, K, 1, D)
        score = self.attend_score(ops.tanh(ops.expand_dims(projected, 1) + keys))        # (B, K, P, 1)
        alpha = ops.softmax(ops.squeeze(score, -1), axis=-1)                             # (B, K, P)
        context = ops.einsum("bkp,bpd->bkd", alpha, image)                               # (B, K, D)
        alpha, context = ops.reshape(alpha, (-1, positions)), ops.reshape(context, (-1, width))
        return alpha, context * self.gate(state)

    def word_gates(self, embedded):
        """The GRU's projection of the words (with its input bias), (..., E) -> (..., 3U): it does not depend
        on the state, so teacher forcing computes it for all steps at once, outside the loop."""
        kernel = ops.cast(self.gru.kernel[: self.embedding_dim], embedded.dtype)
        return ops.matmul(embedded, kernel) + ops.cast(self.gru.bias[0], embedded.dtype)

    def recur(self, image, projected, state, embedded=None, word_gates=None):
        """One decoder step: attend with the previous state, feed word and context to the GRU (Keras'
        GRUCell with reset_after, its weights; the word's part of the input projection may come precomputed)."""
        alpha, context = self.attend(image, projected, state)
        if word_gates is None:
            word_gates = self.word_gates(embedded)
        dtype = word_gates.dtype
        context = ops.cast(context, dtype)
        from_input = word_gates + ops.matmul(context, ops.cast(self.gru.kernel[self.embedding_dim :], dtype))
        from_state = ops.matmul(state, ops.cast(self.gru.recurrent_kernel, dtype)) + ops.cast(self.gru.bias[1], dtype)
        x_z, x_r, x_h = ops.split(from_input, 3, axis=-1)
        h_z, h_r, h_h = ops.split(from_state, 3, axis=-1)
        update, reset = ops.sigmoid(x_z + h_z), ops.sigmoid(x_r + h_r)
        new_state = update * state + (1.0 - update) * ops.tanh(x_h + reset * h_h)
        return new_state, context, alpha

    def readout(self, states, contexts, embedded, training=False):
        """Deep output: logits from the previous word, the state and the context."""
        states = self.state_dropout(states, training=training)
        deep = ops.tanh(self.out_state(states) + self.out_context(contexts) + embedded)
        return self.logits(self.out_dropout(deep, training=training))

    # ------------------------------------------------------------ teacher forcing

    def call(self, inputs, training=False):
        """``{"features": (B, P, C), "tokens": (B, T) or (B, K, T)}`` -> logits (B·K, T, V) and attention
        (B·K, T, P). With K captions an image, its features are encoded once and broadcast to all K."""
        features, tokens = inputs["features"], inputs["tokens"]
        image, projected, state = self.encode(features)
        if len(tokens.shape) == 3:  # (B, K, T): row b·K + k is caption k of image b; attend broadcasts
            state = ops.repeat(state, ops.shape(tokens)[1], axis=0)
            tokens = ops.reshape(tokens, (-1, ops.shape(tokens)[2]))
        embedded = self.embed(tokens)                                   # (N, T, E), all steps at once
        gates = self.word_gates(embedded)                               # (N, T, 3U), all steps at once

        def step(carry, word_gates):  # carries all three outputs: every step's are stacked
            return self.recur(image, projected, carry[0], word_gates=word_gates)

        rows = ops.shape(tokens)[0]
        init = (state, ops.zeros((rows, self.context_dim), state.dtype),
                ops.zeros((rows, ops.shape(features)[1]), state.dtype))
        states, contexts, alphas = _scan(step, init, ops.moveaxis(gates, 1, 0))
        states, contexts, alphas = (ops.moveaxis(t, 0, 1) for t in (states, contexts, alphas))
        if training and self._readout_in_loss():
            return {"states": states, "contexts": contexts, "embedded": embedded, "attention": alphas}
        logits = self.readout(states, contexts, embedded, training=training)
        return {"logits": logits, "attention": alphas}

    def _readout_in_loss(self) -> bool:
        """Training without XLA on TensorFlow's CPUs: the loss runs the output layer at the real tokens only
        (about a quarter of a per-image batch is padding, and the V-wide output layer is a third of the step's
        work). XLA and JAX need static shapes, so there the output layer runs at every position; so it does on
        GPUs, where the gather's gradient (a scatter) falls back to the CPU under op determinism."""
        if keras.backend.backend() != "tensorflow" or self._jit_compile is not False:
            return False
        import tensorflow as tf

        return not tf.config.list_physical_devices("GPU")

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """The paper's objective per caption, Σ_t −log p(y_t) + λ Σ_i (1 − Σ_t α_ti)² over the real steps,
        summed over the batch's captions and divided by their real tokens (so the learning rate is per
        token). ``y``: (N, T) or (B, K, T) targets, 0 for padding; an all-padding row is no caption."""
        if training:
            self.step_traces.train += 1
        else:
            self.step_traces.val += 1
        y = ops.reshape(y, (-1, ops.shape(y)[-1]))
        mask = ops.cast(ops.not_equal(y, 0), "float32")
        if "logits" in y_pred:
            xent = keras.losses.sparse_categorical_crossentropy(y, ops.cast(y_pred["logits"], "float32"),
                                                                from_logits=True)
            total = ops.sum(xent * mask)
        else:  # the output layer at the real tokens only (``_readout_in_loss``)
            import tensorflow as tf

            real = tf.where(ops.not_equal(y, 0))                                        # (M, 2)
            states, contexts, embedded = (tf.gather_nd(y_pred[k], real) for k in ("states", "contexts", "embedded"))
            logits = self.readout(states, contexts, embedded, training=training)
            total = ops.sum(keras.losses.sparse_categorical_crossentropy(
                tf.gather_nd(y, real), ops.cast(logits, "float32"), from_logits=True))
        if self.attention_reg:
            # Over a caption, each of the P regions should receive about one unit of attention.
            attended = ops.sum(ops.cast(y_pred["attention"], "float32") * ops.expand_dims(mask, -1), axis=1)
            is_caption = ops.max(mask, axis=1)  # an empty row (an image with fewer than K captions) has none
            total = total + self.attention_reg * ops.sum(ops.square(1.0 - attended) * ops.expand_dims(is_caption, -1))
        return total / ops.maximum(ops.sum(mask), 1.0)


def _scan(step, init, xs):
    """Every step's carry, stacked. On TensorFlow ``tf.scan``: its loop is bounded by the sequence
    length, which XLA needs (keras.ops.scan's TensorFlow loop is not, and XLA refuses it)."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.scan(step, xs, initializer=init)
    _, stacked = ops.scan(lambda carry, x: (step(carry, x),) * 2, init, xs)
    return stacked
