"""Run in the TensorFlow env by test_convert_nsfw_head: a Keras model with LAION's NSFW head layers, saved.

    python keras_nsfw_head.py OUT  ->  OUT/keras_head/ (SavedModel), OUT/wrong/ (a 768 -> 32 head),
                                       OUT/embeddings.npy [300, 768] float32, OUT/punsafe.npy [300] (Keras' outputs)

Like LAION's autokeras model: some columns read as categories (the value's '%f' text -> index in a
vocabulary, unseen: 0; autokeras' MultiCategoryEncoding), a Normalization adapted on data with
non-trivial mean and variance, Dense 768 -> 64 -> 512 -> 256 -> 1 with ReLU layers, a sigmoid.
Random weights and biases; half of the embeddings' category values are in the vocabularies.
"""

import sys
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from keras import layers

CATEGORY_COLUMNS = [7, 300, 701]
rng = np.random.default_rng(0)


class MultiCategoryEncoding(layers.Layer):
    """autokeras 1.0's layer, for float input: category columns through a StringLookup of their text."""

    def __init__(self, vocabularies: dict, **kwargs):
        super().__init__(**kwargs)
        self.encoding_layers = [
            layers.StringLookup(vocabulary=vocabularies[c]) if c in vocabularies else None for c in range(768)
        ]

    def call(self, x):
        columns = tf.split(x, 768, axis=-1)
        return tf.concat(
            [
                tf.cast(lookup(tf.strings.as_string(col)) if lookup is not None else col, "float32")
                for col, lookup in zip(columns, self.encoding_layers)
            ],
            axis=-1,
        )


def model(widths: list[int], vocabularies: dict) -> keras.Model:
    inp = keras.Input((768,), dtype="float64")
    x = MultiCategoryEncoding(vocabularies)(inp)
    norm = layers.Normalization()
    data = rng.normal(rng.normal(0, 0.05, 768), rng.uniform(0.02, 0.1, 768), (2000, 768))
    for c, vocab in vocabularies.items():
        data[:, c] = rng.integers(0, len(vocab) + 1, len(data))  # what the Normalization sees there: indices
    norm.adapt(data.astype(np.float32))
    x = norm(x)
    for i, width in enumerate(widths[1:]):
        dense = layers.Dense(width)
        x = dense(x)
        dense.bias.assign(rng.normal(0, 0.1, width).astype(np.float32))
        x = layers.ReLU()(x) if i < len(widths) - 2 else layers.Activation("sigmoid")(x)
    return keras.Model(inp, x)


def main(out: Path) -> None:
    emb = rng.standard_normal((300, 768)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    vocabularies = {}
    for c in CATEGORY_COLUMNS:
        texts = {f"{v:f}" for v in np.concatenate([emb[:150, c], rng.normal(0, 0.036, 50)])}
        vocabularies[c] = sorted(texts - {"0.000000", "-0.000000"}, key=lambda t: rng.random())
    head = model([768, 64, 512, 256, 1], vocabularies)
    tf.saved_model.save(head, str(out / "keras_head"))
    tf.saved_model.save(model([768, 32, 1], vocabularies), str(out / "wrong"))
    np.save(out / "embeddings.npy", emb)
    np.save(out / "punsafe.npy", head(tf.constant(emb.astype(np.float64))).numpy().reshape(-1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
