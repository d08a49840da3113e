"""The TensorFlow tutorial's captioner, kept only as the benchmarks' reference point.

Same sizes as ours, the tutorial's structure: a per-step Python loop inside
``tf.function`` over captions padded to 50 tokens, the attention's image
projection recomputed at every step, the vocabulary projection per step, and
one image at a time with per-step eager calls when decoding. (Its GRU state bug
is kept as well; it does not change the cost.) Never used for training.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from keras import layers

PADDED_LENGTH = 50


class TutorialAttention(layers.Layer):
    def __init__(self, units):
        super().__init__()
        self.W1, self.W2, self.V = layers.Dense(units), layers.Dense(units), layers.Dense(1)

    def call(self, features, hidden):
        score = tf.nn.tanh(self.W1(features) + self.W2(tf.expand_dims(hidden, 1)))
        weights = tf.nn.softmax(self.V(score), axis=1)
        return tf.reduce_sum(weights * features, axis=1), weights


class TutorialDecoder(keras.Model):
    def __init__(self, embedding_dim, units, vocab_size):
        super().__init__()
        self.units = units
        self.encoder = layers.Dense(embedding_dim, activation="relu")
        self.embedding = layers.Embedding(vocab_size, embedding_dim)
        self.gru = layers.GRU(units, return_sequences=True, return_state=True, recurrent_initializer="glorot_uniform")
        self.fc1, self.fc2 = layers.Dense(units), layers.Dense(vocab_size)
        self.attention = TutorialAttention(units)

    def call(self, x, features, hidden):
        context, weights = self.attention(features, hidden)
        x = tf.concat([tf.expand_dims(context, 1), self.embedding(x)], axis=-1)
        output, state = self.gru(x)  # the tutorial never passes `hidden` back in
        output = tf.reshape(self.fc1(output), (-1, output.shape[2]))
        return self.fc2(output), state, weights


def make_tutorial(vocab_size=5000, embedding_dim=256, units=512):
    decoder = TutorialDecoder(embedding_dim, units, vocab_size)
    optimizer = keras.optimizers.Adam()
    loss_object = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")

    def loss_function(real, pred):
        mask = tf.cast(tf.math.logical_not(tf.math.equal(real, 0)), tf.float32)
        return tf.reduce_mean(loss_object(real, pred) * mask)

    @tf.function
    def train_step(img_tensor, target):
        loss = 0.0
        hidden = tf.zeros((target.shape[0], units))
        dec_input = tf.expand_dims(target[:, 0], 1)
        with tf.GradientTape() as tape:
            features = decoder.encoder(tf.cast(img_tensor, tf.float32))
            for i in range(1, target.shape[1]):
                predictions, hidden, _ = decoder(dec_input, features, hidden)
                loss += loss_function(target[:, i], predictions)
                dec_input = tf.expand_dims(target[:, i], 1)
        variables = decoder.trainable_variables
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return loss

    def caption_one(img_tensor, start_id, end_id, max_length=PADDED_LENGTH):
        hidden = tf.zeros((1, units))
        features = decoder.encoder(tf.cast(img_tensor[None], tf.float32))
        dec_input = tf.constant([[start_id]])
        result = []
        for _ in range(max_length):
            predictions, hidden, _ = decoder(dec_input, features, hidden)
            predicted = int(tf.argmax(predictions[0]).numpy())  # greedy, not tf.random.categorical
            if predicted == end_id:
                break
            result.append(predicted)
            dec_input = tf.constant([[predicted]])
        return result

    return decoder, train_step, caption_one


def pad_to(tokens: np.ndarray, length: int = PADDED_LENGTH) -> np.ndarray:
    out = np.zeros((tokens.shape[0], length), np.int32)
    out[:, : tokens.shape[1]] = tokens[:, :length]
    return out
