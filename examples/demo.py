"""tf_kld demo: the documented example, then distilling a teacher's softmax into a student.

    python examples/demo.py [--epochs N]
"""

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tf_kld  # noqa: E402


# float32 rows of 10 softmax probabilities, averaged: both sum in a different order (tf_kld in
# double), so they agree to a few float32 ulps.
RTOL = 1e-6


def agreement(a, b):
    return "agree" if np.isclose(a, b, rtol=RTOL, atol=0) else f"DISAGREE by {abs(a - b):.3g}"


def op_types(fn, *args):
    graph = tf.function(fn).get_concrete_function(*args).graph
    return {op.type for op in graph.get_operations()}


def which_implementation():
    spec = tf.TensorSpec([None, 10], tf.float32)
    types = op_types(tf_kld.kl_divergence, spec, spec)
    if "TfKld>KlDivergence" in types:
        return "fused C++ op (TfKld>KlDivergence)"
    return "pure-TF composite (reference path: " + (tf_kld.ops.load_error() or "requested") + ")"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args()

    print("== tf_kld demo ==")
    print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}")
    print("implementation:", which_implementation())

    value = float(tf_kld.KLD([.4, .9, .2], [.5, .8, .12]))
    keras_value = float(keras.losses.kl_divergence([.4, .9, .2], [.5, .8, .12]))
    print(f"KLD([.4, .9, .2], [.5, .8, .12]) = {value:.8f}   (documented: 0.11891246; keras "
          f"{keras_value:.8f}: {agreement(value, keras_value)})")

    # Distillation: a fixed random teacher's softmax over 10 classes is the target distribution.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4096, 32)).astype("float32")
    teacher = keras.Sequential([keras.Input((32,)), keras.layers.Dense(64, activation="tanh"),
                                keras.layers.Dense(10)])
    soft_targets = tf.nn.softmax(teacher(x) / 2.0).numpy()

    keras.utils.set_random_seed(1)
    student = keras.Sequential([keras.Input((32,)), keras.layers.Dense(32, activation="relu"),
                                keras.layers.Dense(10, activation="softmax")])
    student.compile(optimizer=keras.optimizers.Adam(1e-2), loss=tf_kld.kl_divergence,
                    jit_compile=False)
    print(f"\ndistilling a teacher into a student with loss=tf_kld.kl_divergence, {args.epochs} epochs:")
    history = student.fit(x, soft_targets, batch_size=128, epochs=args.epochs, verbose=0)
    losses = history.history["loss"]
    for epoch, loss in enumerate(losses, 1):
        print(f"  epoch {epoch:2d}  KL(teacher || student) = {loss:.5f}")
    predictions = student.predict(x, verbose=0)
    ours = float(np.mean(tf_kld.kl_divergence(soft_targets, predictions)))
    theirs = float(np.mean(keras.losses.kl_divergence(soft_targets, predictions)))
    print(f"the trained student's loss: tf_kld {ours:.7f}, keras.losses.kl_divergence {theirs:.7f}: "
          f"{agreement(ours, theirs)}")
    if not losses[-1] < losses[0]:
        sys.exit("demo: the loss did not fall")
    if not np.isclose(ours, theirs, rtol=RTOL, atol=0):
        sys.exit("demo: tf_kld and Keras disagree")


if __name__ == "__main__":
    main()
