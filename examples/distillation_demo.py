"""Knowledge distillation with tf_kld: a teacher and a smaller student on a synthetic 10-class
problem, keras.distillation.Distiller with tf_kld.LogitsDistillation (the fused log-space KL
divergence at a temperature), a few epochs, accuracies printed.

    python examples/distillation_demo.py [--epochs 5]
"""

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import keras  # noqa: E402
import numpy as np  # noqa: E402

import tf_kld  # noqa: E402

CLASSES, FEATURES = 10, 20


def make_data(n, seed):
    """Points around 10 random centres; the label is the nearest centre (noisy)."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(0).normal(size=(CLASSES, FEATURES)) * 2.0
    labels = rng.integers(0, CLASSES, size=n)
    x = centres[labels] + rng.normal(size=(n, FEATURES)) * 3.0
    return x.astype(np.float32), labels


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args(argv)
    keras.utils.set_random_seed(1)
    x, y = make_data(4096, 1)
    x_test, y_test = make_data(1024, 2)

    teacher = keras.Sequential([keras.Input((FEATURES,)), keras.layers.Dense(128, activation="relu"),
                                keras.layers.Dense(128, activation="relu"), keras.layers.Dense(CLASSES)])
    teacher.compile(optimizer="adam",
                    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                    metrics=["accuracy"])
    teacher.fit(x, y, epochs=args.epochs, batch_size=64, verbose=0)
    teacher.trainable = False

    student = keras.Sequential([keras.Input((FEATURES,)), keras.layers.Dense(16, activation="relu"),
                                keras.layers.Dense(CLASSES)])
    distiller = keras.distillation.Distiller(
        teacher=teacher, student=student,
        distillation_losses=tf_kld.LogitsDistillation(temperature=3.0), student_loss_weight=0.5)
    distiller.compile(optimizer="adam",
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = distiller.fit(x, y, epochs=args.epochs, batch_size=64, verbose=0)

    def accuracy(model):
        return float(np.mean(np.argmax(model.predict(x_test, verbose=0), axis=-1) == y_test))

    print(f"tf_kld implementation: {'fused op' if tf_kld.ops.distillation_ops_loaded() else 'composite'}")
    print(f"distillation loss per epoch: {', '.join(f'{v:.4f}' for v in history.history['loss'])}")
    print(f"teacher accuracy {accuracy(teacher):.3f}, distilled student accuracy {accuracy(student):.3f}")
    return accuracy(teacher), accuracy(student), history.history["loss"]


if __name__ == "__main__":
    main()
