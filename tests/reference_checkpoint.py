"""Builds a checkpoint the way the reference project builds and saves it (../shared/reference/reference-spec.md):
its exact layers, its height collapse a `Lambda` whose function calls this module's `tf`, saved as a plain
`.keras` file without this project's metadata. Written independently of model.py, so the tests compare
this project against the reference's design rather than against itself."""

import keras
import tensorflow as tf
from keras import layers

NUM_CLASSES = 63  # 62 symbols + the blank, last


def build_reference_crnn(height=50, width=200):
    image = keras.Input(shape=(height, width, 1), name="image")
    x = image
    for filters, pool in [(64, (2, 2)), (128, (2, 2)), (256, (2, 1))]:
        for _ in range(2):
            x = layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
            x = layers.BatchNormalization()(x)
            x = layers.ReLU()(x)
        x = layers.MaxPooling2D(pool)(x)
        x = layers.Dropout(0.25)(x)
    x = layers.Conv2D(256, 3, padding="same", activation="relu")(x)
    x = layers.Lambda(lambda t: tf.reduce_mean(t, axis=1), name="collapse_height")(x)  # (B, 6, 50, 256) -> (B, 50, 256)
    x = layers.Bidirectional(layers.LSTM(256, return_sequences=True, dropout=0.15), merge_mode="concat",
                             name="bilstm_1")(x)
    x = layers.Bidirectional(layers.LSTM(256, return_sequences=True, dropout=0.15), merge_mode="concat",
                             name="bilstm_2")(x)
    probs = layers.Dense(NUM_CLASSES, activation="softmax", dtype="float32", name="softmax")(x)
    return keras.Model(image, probs, name="crnn_ctc_infer")


def save_reference_checkpoint(path, seed=0):
    """A reference-shaped checkpoint at `path` with random (seeded) weights and BatchNorm statistics that are
    not the initial ones, so a converter that dropped them would show. Returns the in-memory model."""
    keras.utils.set_random_seed(seed)
    crnn = build_reference_crnn()
    for layer in crnn.layers:
        if isinstance(layer, layers.BatchNormalization):
            gamma, beta, mean, variance = layer.get_weights()
            layer.set_weights([gamma * 1.1, beta + 0.05, mean + 0.1, variance * 2.0])
    crnn.save(path)
    return crnn
