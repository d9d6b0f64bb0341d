"""The Keras side of the distillation family: tf_kld.KLDivergenceWithLogits and
tf_kld.GeneralizedJSDWithLogits (Keras Losses), tf_kld.LogitsDistillation (a Keras distillation loss)
against Keras's own, serialisation, .keras and SavedModel reloads, and Distiller training."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_kld

REDUCTIONS = ["sum_over_batch_size", "sum", "mean", "mean_with_sample_weight", None]
# Keras's wrapper of a loss function (not exported by Keras 3): the parent of its KLDivergence.
_LossFunctionWrapper = keras.losses.KLDivergence.__bases__[0]
IMPORT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(tf_kld.__file__)))


def _logits(rng, shape, scale=2.0):
    return (rng.normal(size=shape) * scale).astype(np.float32)


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("reduction", REDUCTIONS, ids=str)
def test_losses_reduce_the_function_as_keras_does(impl, rng, reduction, weighted):
    t, p = _logits(rng, (6, 5, 7)), _logits(rng, (6, 5, 7))
    sw = rng.uniform(size=(6, 5)).astype(np.float32) if weighted else None
    for loss, fn in [(tf_kld.KLDivergenceWithLogits(2.0, reduction=reduction),
                      lambda a, b: tf_kld.kl_divergence_with_logits(a, b, 2.0)),
                     (tf_kld.GeneralizedJSDWithLogits(0.3, 2.0, reduction=reduction),
                      lambda a, b: tf_kld.generalized_jsd_with_logits(a, b, 0.3, 2.0))]:
        got = loss(t, p, sample_weight=sw)
        # Keras's own reduction around the function: the same numbers.
        want = _LossFunctionWrapper(fn, reduction=reduction)(t, p, sample_weight=sw)
        assert got.shape == want.shape and got.dtype == tf.float32
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-6)


def test_loss_defaults_names_and_dtype(impl):
    kl, jsd = tf_kld.KLDivergenceWithLogits(), tf_kld.GeneralizedJSDWithLogits()
    assert (kl.temperature, kl.name, kl.reduction) == (1.0, "kl_divergence_with_logits",
                                                       "sum_over_batch_size")
    assert (jsd.beta, jsd.temperature, jsd.name) == (0.5, 1.0, "generalized_jsd_with_logits")
    assert isinstance(kl, keras.losses.Loss) and isinstance(jsd, keras.losses.Loss)
    got = tf_kld.KLDivergenceWithLogits(dtype="float64")([[1.0, 2.0, 3.0]], [[3.0, 2.0, 1.0]])
    assert got.dtype == tf.float64
    np.testing.assert_allclose(got.numpy(), 1.1504207652088825, rtol=1e-14)


@pytest.mark.parametrize("loss", [tf_kld.KLDivergenceWithLogits(2.5, reduction="sum", name="kd"),
                                  tf_kld.GeneralizedJSDWithLogits(0.25, 0.5, reduction=None,
                                                                  dtype="float64")],
                         ids=["kl", "jsd"])
def test_loss_serialisation_round_trips(loss):
    config = keras.losses.serialize(loss)
    assert config["registered_name"] == f"tf_kld>{type(loss).__name__}"
    again = keras.losses.deserialize(config)
    assert type(again) is type(loss) and again.get_config() == loss.get_config()
    assert type(loss).from_config(loss.get_config()).get_config() == loss.get_config()


def test_logits_distillation_serialisation():
    d = tf_kld.LogitsDistillation(temperature=2.0)
    config = keras.saving.serialize_keras_object(d)
    assert config["registered_name"] == "tf_kld>LogitsDistillation"
    again = keras.saving.deserialize_keras_object(config)
    assert type(again) is tf_kld.LogitsDistillation and again.temperature == 2.0
    assert isinstance(d, keras.distillation.LogitsDistillation)
    assert tf_kld.LogitsDistillation().temperature == 3.0


@pytest.mark.parametrize("temperature", [1.0, 3.0, 5.0])
def test_logits_distillation_matches_keras(impl, rng, temperature):
    """Where every probability is >= 1e-7, Keras's clipped form gives the same value."""
    t, s = _logits(rng, (8, 10), 1.0), _logits(rng, (8, 10), 1.0)
    got = tf_kld.LogitsDistillation(temperature).compute_loss(t, s)
    keras_kd = keras.distillation.LogitsDistillation(temperature, loss=keras.losses.KLDivergence())
    want = keras_kd.compute_loss(t, s)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=2e-6)
    direct = temperature ** 2 * np.mean(tf_kld.kl_divergence_with_logits(t, s, temperature).numpy())
    np.testing.assert_allclose(got.numpy(), direct, rtol=1e-6)
    # Multi-output models: the sum over the outputs.
    both = tf_kld.LogitsDistillation(temperature).compute_loss([t, t], [s, t])
    np.testing.assert_allclose(both.numpy(), got.numpy(), rtol=1e-6)


def test_logits_distillation_exact_where_keras_clips(impl):
    """Probabilities far below 1e-7: Keras's clip changes its value; tf_kld's stays exact."""
    t = np.array([[0.0, 0.0, -30.0]], np.float32)
    s = np.array([[0.0, -25.0, 0.0]], np.float32)  # q = 7e-12 where p = 0.5
    got = float(tf_kld.LogitsDistillation(1.0).compute_loss(t, s))
    keras_value = float(keras.distillation.LogitsDistillation(
        1.0, loss=keras.losses.KLDivergence()).compute_loss(t, s))
    p = np.exp(t[0].astype(np.float64) - np.logaddexp.reduce(t[0].astype(np.float64)))
    lq = s[0].astype(np.float64) - np.logaddexp.reduce(s[0].astype(np.float64))
    exact = float(np.sum(p * (np.log(p) - lq)))
    assert got == pytest.approx(exact, rel=1e-5)
    assert abs(keras_value - exact) > 0.1 * exact


def _models(seed, classes=4):
    keras.utils.set_random_seed(seed)
    teacher = keras.Sequential([keras.Input((6,)), keras.layers.Dense(16, activation="relu"),
                                keras.layers.Dense(classes)])
    student = keras.Sequential([keras.Input((6,)), keras.layers.Dense(classes)])
    return teacher, student


def test_distiller_trains(impl, rng):
    """keras.distillation.Distiller with tf_kld.LogitsDistillation: the distillation loss falls."""
    teacher, student = _models(0)
    x = rng.normal(size=(64, 6)).astype(np.float32)
    y = rng.integers(0, 4, size=(64,))
    distiller = keras.distillation.Distiller(
        teacher=teacher, student=student, distillation_losses=tf_kld.LogitsDistillation(2.0),
        student_loss_weight=0.0)
    distiller.compile(optimizer=keras.optimizers.Adam(0.05),
                      loss="sparse_categorical_crossentropy")
    before = float(tf_kld.LogitsDistillation(2.0).compute_loss(teacher(x), student(x)))
    history = distiller.fit(x, y, epochs=6, batch_size=16, verbose=0)
    after = float(tf_kld.LogitsDistillation(2.0).compute_loss(teacher(x), student(x)))
    assert all(np.isfinite(v) for v in history.history["loss"])
    assert after < 0.5 * before, (before, after)


@pytest.mark.parametrize("loss_cls", [tf_kld.KLDivergenceWithLogits, tf_kld.GeneralizedJSDWithLogits])
def test_keras_model_save_and_reload(impl, rng, tmp_path, loss_cls):
    """A model compiled with the loss: fit, save as .keras, reload (the loss's config kept)."""
    _, student = _models(1)
    loss = loss_cls(temperature=2.0)
    student.compile(optimizer="sgd", loss=loss)
    x = rng.normal(size=(32, 6)).astype(np.float32)
    y = _logits(rng, (32, 4))
    student.fit(x, y, epochs=1, verbose=0)
    path = str(tmp_path / "m.keras")
    student.save(path)
    again = keras.saving.load_model(path)
    assert type(again.loss) is loss_cls and again.loss.get_config() == loss.get_config()
    np.testing.assert_allclose(again.evaluate(x, y, verbose=0), student.evaluate(x, y, verbose=0),
                               rtol=1e-6)


_SAVEDMODEL_LOADER = r"""
import json
import sys
import numpy as np
import tensorflow as tf
import tf_kld  # the custom op's library, when the SavedModel holds it
m = tf.saved_model.load(sys.argv[1])
t = tf.constant([[1.0, 2.0, 3.0], [0.0, -float("inf"), 1.0]])
s = tf.constant([[3.0, 2.0, 1.0], [1.0, 1.0, 1.0]])
print("RESULT " + json.dumps([np.asarray(f(t, s)).tolist() for f in (m.kl, m.jsd, m.grad)]))
"""


def test_savedmodel_reload(impl, tmp_path):
    """A tf.Module with both losses and a student gradient, reloaded in a fresh process."""
    spec = tf.TensorSpec([None, 3], tf.float32)

    class Module(tf.Module):
        @tf.function(input_signature=[spec, spec])
        def kl(self, t, s):
            return tf_kld.kl_divergence_with_logits(t, s, 2.0)

        @tf.function(input_signature=[spec, spec])
        def jsd(self, t, s):
            return tf_kld.generalized_jsd_with_logits(t, s, 0.3, 2.0)

        @tf.function(input_signature=[spec, spec])
        def grad(self, t, s):
            with tf.GradientTape() as tape:
                tape.watch(s)
                loss = tf.reduce_sum(tf_kld.kl_divergence_with_logits(t, s, 2.0))
            return tape.gradient(loss, s)

    module = Module()
    path = str(tmp_path / "module")
    tf.saved_model.save(module, path)
    t = tf.constant([[1.0, 2.0, 3.0], [0.0, -float("inf"), 1.0]])
    s = tf.constant([[3.0, 2.0, 1.0], [1.0, 1.0, 1.0]])
    env = dict(os.environ, PYTHONPATH=IMPORT_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run([sys.executable, "-c", _SAVEDMODEL_LOADER, path], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT")][-1]
    kl, jsd, grad = json.loads(line[len("RESULT "):])
    np.testing.assert_allclose(kl, module.kl(t, s).numpy(), rtol=1e-6)
    np.testing.assert_allclose(jsd, module.jsd(t, s).numpy(), rtol=1e-6)
    np.testing.assert_allclose(grad, module.grad(t, s).numpy(), rtol=1e-6, atol=1e-7)


def test_distillation_example_runs():
    """examples/distillation_demo.py: the student learns from the teacher (well above chance)."""
    import importlib.util  # pylint: disable=import-outside-toplevel
    path = os.path.join(IMPORT_ROOT, "examples", "distillation_demo.py")
    spec = importlib.util.spec_from_file_location("distillation_demo", path)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    teacher_acc, student_acc, losses = demo.main(["--epochs", "2"])
    assert teacher_acc > 0.5 and student_acc > 0.3 and losses[-1] < losses[0]
