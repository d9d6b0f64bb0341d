"""tf_kld.KLDivergence (a Keras Loss) and tf_kld.keras.metrics.KLDivergence (a Metric): Keras's
values on both paths, serialisation, compile/fit, and .keras save and reload."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import _util as U
import tf_kld

Metric = tf_kld.keras.metrics.KLDivergence
Y_TRUE = [[0.0, 1.0], [0.0, 0.0]]
Y_PRED = [[0.6, 0.4], [0.4, 0.6]]
REDUCTIONS = ["sum_over_batch_size", "sum", "mean", "mean_with_sample_weight", None]


def test_documented_values(impl):
    """The TF docs' example (0.458, 0.366, 0.916: Keras's 0.45814306, 0.3665154, 0.9162861)."""
    assert tf_kld.KLDivergence()(Y_TRUE, Y_PRED).numpy() == pytest.approx(0.45814306, rel=1e-6)
    assert tf_kld.KLDivergence()(Y_TRUE, Y_PRED, sample_weight=[0.8, 0.2]).numpy() == pytest.approx(
        0.3665154, rel=1e-6)
    assert tf_kld.KLDivergence(reduction="sum")(Y_TRUE, Y_PRED).numpy() == pytest.approx(0.9162861, rel=1e-6)
    np.testing.assert_allclose(tf_kld.KLDivergence(reduction=None)(Y_TRUE, Y_PRED).numpy(),
                               [0.9162892, -3.0809074e-06], rtol=1e-5)
    m = Metric()
    m.update_state(Y_TRUE, Y_PRED)
    assert m.result().numpy() == pytest.approx(0.45814306, rel=1e-6)
    m.reset_state()
    m.update_state(Y_TRUE, Y_PRED, sample_weight=[1, 0])
    assert m.result().numpy() == pytest.approx(0.9162892, rel=1e-6)


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("reduction", REDUCTIONS, ids=str)
def test_loss_matches_keras(impl, rng, reduction, weighted):
    t, p = U.random_inputs(rng, (6, 5, 7), special=0.1)
    sw = rng.uniform(size=(6, 5)).astype(np.float32) if weighted else None
    got = tf_kld.KLDivergence(reduction=reduction)(t, p, sample_weight=sw)
    want = keras.losses.KLDivergence(reduction=reduction)(t, p, sample_weight=sw)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=2e-6, atol=1e-6)


def test_metric_matches_keras(impl, rng):
    got, want = Metric(), keras.metrics.KLDivergence()
    for _ in range(3):
        t, p = U.random_inputs(rng, (8, 5), special=0.1)
        sw = rng.uniform(size=(8,)).astype(np.float32)
        got.update_state(t, p, sample_weight=sw)
        want.update_state(t, p, sample_weight=sw)
    np.testing.assert_allclose(got.result().numpy(), want.result().numpy(), rtol=2e-6)


def test_dtype(impl):
    loss = tf_kld.KLDivergence(dtype="float64")
    got = loss(Y_TRUE, Y_PRED)
    assert loss.dtype == "float64" and got.dtype == tf.float64
    assert got.numpy() == pytest.approx(
        keras.losses.KLDivergence(dtype="float64")(Y_TRUE, Y_PRED).numpy(), rel=1e-14)
    m = Metric(dtype="float64")
    m.update_state(Y_TRUE, Y_PRED)
    assert m.result().dtype == tf.float64


def test_name_and_types():
    loss, metric = tf_kld.KLDivergence(name="kl"), Metric(name="kl_metric")
    assert loss.name == "kl" and metric.name == "kl_metric"
    assert tf_kld.KLDivergence().name == Metric().name == "kl_divergence"
    assert isinstance(loss, keras.losses.Loss) and isinstance(loss, keras.losses.KLDivergence)
    assert isinstance(metric, keras.metrics.Metric) and isinstance(metric, keras.metrics.KLDivergence)
    assert loss.fn is tf_kld.kl_divergence


def test_wrong_reduction_is_rejected():
    with pytest.raises(ValueError, match="reduction"):
        tf_kld.KLDivergence(reduction="median")


@pytest.mark.parametrize("reduction", REDUCTIONS, ids=str)
def test_loss_config_round_trip(reduction):
    loss = tf_kld.KLDivergence(reduction=reduction, name="kl", dtype="float64")
    config = loss.get_config()
    assert config == {"name": "kl", "reduction": reduction, "dtype": "float64"}
    again = tf_kld.KLDivergence.from_config(config)
    assert type(again) is tf_kld.KLDivergence and again.get_config() == config
    serialized = keras.saving.serialize_keras_object(loss)
    assert serialized["registered_name"] == "tf_kld>KLDivergence"
    again = keras.saving.deserialize_keras_object(serialized)
    assert type(again) is tf_kld.KLDivergence and again.get_config() == config


def test_metric_and_function_serialise():
    metric = Metric(name="kl", dtype="float64")
    serialized = keras.saving.serialize_keras_object(metric)
    assert serialized["registered_name"] == "tf_kld>KLDivergenceMetric"
    again = keras.saving.deserialize_keras_object(serialized)
    assert type(again) is Metric and again.get_config() == {"name": "kl", "dtype": "float64"}
    assert keras.saving.get_registered_name(tf_kld.kl_divergence) == "tf_kld>kl_divergence"
    fn = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(tf_kld.KLD))
    assert fn is tf_kld.kl_divergence


def test_loss_and_metric_run_the_fused_op(require_custom):
    with U.record_eager_ops() as executed:
        tf_kld.KLDivergence()(Y_TRUE, Y_PRED)
        Metric().update_state(Y_TRUE, Y_PRED)
    assert [op for op, _ in executed].count(U.FORWARD_OP) == 2


# --------------------------------------------------------------------------------------------
# Keras models

LOSSES = {
    "function": lambda: tf_kld.KLD,
    "alias": lambda: tf_kld.keras.losses.kullback_leibler_divergence,
    "class": lambda: tf_kld.KLDivergence(),
    "class_sum": lambda: tf_kld.KLDivergence(reduction="sum"),
}


def _data(seed=0, n=128):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype(np.float32)
    teacher = rng.normal(size=(6, 4)).astype(np.float32)
    return x, tf.nn.softmax(x @ teacher).numpy()


def _model(loss, run_eagerly=False):
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4, activation="softmax")])
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss=loss, metrics=[Metric()],
                  jit_compile=False, run_eagerly=run_eagerly)
    return model


@pytest.mark.parametrize("form", ["function", "class"])
def test_fit_loss_falls(impl, form):
    x, y = _data()
    history = _model(LOSSES[form]()).fit(x, y, epochs=6, batch_size=32, verbose=0).history
    losses = history["loss"]
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.7 * losses[0], losses
    np.testing.assert_allclose(history["kl_divergence"], losses, rtol=1e-5)


def test_fit_runs_the_fused_op_and_gradient(require_custom):
    x, y = _data(n=32)
    model = _model(tf_kld.KLDivergence(), run_eagerly=True)
    with U.record_eager_ops() as executed:
        model.fit(x, y, epochs=1, batch_size=32, verbose=0)
    types = [op for op, _ in executed]
    assert U.FORWARD_OP in types and U.GRAD_OP in types


@pytest.mark.parametrize("form", ["function", "class_sum"])
def test_keras_file_save_and_reload(tmp_path, form):
    x, y = _data()
    model = _model(LOSSES[form]())
    model.fit(x, y, epochs=1, batch_size=64, verbose=0)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    if form.startswith("class"):
        assert type(loaded.loss) is tf_kld.KLDivergence
        assert loaded.loss.get_config() == model.loss.get_config()
    else:
        assert loaded.loss is tf_kld.kl_divergence
    np.testing.assert_allclose(loaded.evaluate(x, y, verbose=0), model.evaluate(x, y, verbose=0), rtol=1e-6)
    before = loaded.evaluate(x, y, verbose=0)[0]
    loaded.fit(x, y, epochs=2, batch_size=32, verbose=0)
    assert loaded.evaluate(x, y, verbose=0)[0] < before
