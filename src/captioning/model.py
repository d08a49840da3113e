"""Show, Attend and Tell in Keras 3, written with ``keras.ops`` (TensorFlow or JAX).

Shapes: B batch, T caption steps, P=64 grid positions, C=2048 channels,
E embedding size, U decoder units, V vocabulary.

Unlike the TensorFlow tutorial this model derives from:
- the GRU state is carried from step to step (the tutorial never passed it back in);
- the attention's projection of the image, W1·features, is computed once per
  image, not at every step;
- the output layer (deep output) and the embeddings run once over all steps,
  only the recurrence itself is a loop.
"""

from __future__ import annotations

import keras
from keras import layers, ops


@keras.saving.register_keras_serializable(package="captioning")
class Captioner(keras.Model):
    def __init__(self, vocab_size: int, embedding_dim: int = 256, units: int = 512, dropout: float = 0.3,
                 attention_reg: float = 1.0, channels: int = 2048, **kwargs):
        super().__init__(**kwargs)
        self.vocab_size, self.embedding_dim, self.units = vocab_size, embedding_dim, units
        self.dropout_rate, self.attention_reg, self.channels = dropout, attention_reg, channels
        # Standardisation of the backbone's features, from the training split.
        self.feature_mean = self.add_weight(shape=(channels,), initializer="zeros", trainable=False, name="feature_mean")
        self.feature_std = self.add_weight(shape=(channels,), initializer="ones", trainable=False, name="feature_std")
        self.encoder = layers.Dense(embedding_dim, activation="relu", name="encoder")        # C -> E
        self.attend_image = layers.Dense(units, name="attend_image")                         # W1: E -> U
        self.attend_state = layers.Dense(units, name="attend_state")                         # W2: U -> U
        self.attend_score = layers.Dense(1, name="attend_score")                             # V:  U -> 1
        self.init_state = layers.Dense(units, activation="tanh", name="init_state")          # mean image -> h0
        self.embed = layers.Embedding(vocab_size, embedding_dim, name="embed")
        self.gru = layers.GRUCell(units, name="gru")
        self.out_state = layers.Dense(embedding_dim, name="out_state")                       # L_h
        self.out_context = layers.Dense(embedding_dim, use_bias=False, name="out_context")   # L_z
        self.out_dropout = layers.Dropout(dropout)
        self.logits = layers.Dense(vocab_size, name="logits")                               # L_o

    def build(self, input_shape=None):
        e, u, c = self.embedding_dim, self.units, self.channels
        self.encoder.build((None, None, c))
        self.attend_image.build((None, None, e))
        self.attend_state.build((None, u))
        self.attend_score.build((None, None, u))
        self.init_state.build((None, e))
        self.embed.build((None, None))
        self.gru.build((None, 2 * e))
        self.out_state.build((None, None, u))
        self.out_context.build((None, None, e))
        self.logits.build((None, None, e))
        self.built = True

    def get_config(self):
        return {**super().get_config(), "vocab_size": self.vocab_size, "embedding_dim": self.embedding_dim,
                "units": self.units, "dropout": self.dropout_rate, "attention_reg": self.attention_reg,
                "channels": self.channels}

    def set_feature_stats(self, mean, std) -> None:
        self.feature_mean.assign(ops.convert_to_tensor(mean, "float32"))
        self.feature_std.assign(ops.maximum(ops.convert_to_tensor(std, "float32"), 1e-6))

    # ------------------------------------------------------------ pieces

    def encode(self, features):
        """(B, P, C) float16/32 -> image encodings (B, P, E), their W1 projection (B, P, U), h0 (B, U)."""
        x = (ops.cast(features, "float32") - self.feature_mean) / self.feature_std
        image = self.encoder(x)
        return image, self.attend_image(image), self.init_state(ops.mean(image, axis=1))

    def attend(self, image, projected, state):
        """Additive attention: alpha (B, P) over positions and the context (B, E)."""
        score = self.attend_score(ops.tanh(projected + ops.expand_dims(self.attend_state(state), 1)))
        alpha = ops.softmax(ops.squeeze(score, -1), axis=-1)
        context = ops.sum(image * ops.expand_dims(alpha, -1), axis=1)
        return alpha, context

    def recur(self, image, projected, state, embedded):
        """One decoder step: attend with the previous state, feed word and context to the GRU."""
        alpha, context = self.attend(image, projected, state)
        new_state, _ = self.gru(ops.concatenate([embedded, ops.cast(context, embedded.dtype)], -1), [state])
        return new_state, context, alpha

    def readout(self, states, contexts, embedded, training=False):
        """Deep output: logits from the state, the context and the previous word."""
        deep = ops.tanh(self.out_state(states) + self.out_context(contexts) + embedded)
        return self.logits(self.out_dropout(deep, training=training))

    # ------------------------------------------------------------ teacher forcing

    def call(self, inputs, training=False):
        """``{"features": (B, P, C), "tokens": (B, T)}`` -> logits (B, T, V) and attention (B, T, P)."""
        features, tokens = inputs["features"], inputs["tokens"]
        image, projected, state = self.encode(features)
        embedded = self.embed(tokens)                                   # (B, T, E), all steps at once

        def step(carry, word):
            # keras.ops.scan (TF) wants outputs shaped like the carry: carry all three.
            new = self.recur(image, projected, carry[0], word)
            return new, new

        batch = ops.shape(features)[0]
        init = (state, ops.zeros((batch, self.embedding_dim), state.dtype),
                ops.zeros((batch, ops.shape(features)[1]), state.dtype))
        _, (states, contexts, alphas) = ops.scan(step, init, ops.moveaxis(embedded, 1, 0))
        states, contexts, alphas = (ops.moveaxis(t, 0, 1) for t in (states, contexts, alphas))
        logits = self.readout(states, contexts, embedded, training=training)
        return {"logits": logits, "attention": alphas}

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """Cross-entropy masked on padding, plus doubly-stochastic attention regularisation."""
        mask = ops.cast(ops.not_equal(y, 0), "float32")
        xent = keras.losses.sparse_categorical_crossentropy(y, ops.cast(y_pred["logits"], "float32"),
                                                            from_logits=True)
        loss = ops.sum(xent * mask) / ops.maximum(ops.sum(mask), 1.0)
        if self.attention_reg:
            # Each position should receive about one unit of attention over the caption.
            attended = ops.sum(ops.cast(y_pred["attention"], "float32") * ops.expand_dims(mask, -1), axis=1)
            loss = loss + self.attention_reg * ops.mean(ops.sum(ops.square(1.0 - attended), axis=-1)) / 64.0
        return loss
