"""tf_kld.patch_tensorflow(): TF's own aliases point at tf_kld while patched, and are restored."""

import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import _util as U
import tf_kld

NAMESPACES = ["keras.losses", "keras.metrics", "losses", "metrics", "compat.v1.keras.losses",
              "compat.v1.keras.metrics", "compat.v2.keras.losses", "compat.v2.keras.metrics",
              "compat.v2.losses", "compat.v2.metrics"]
NAMES = ["KLD", "kld", "kl_divergence", "kullback_leibler_divergence"]
PRESENT = ["KLD", "kld", "kullback_leibler_divergence"]  # what TF 2.21 has in each namespace
MISSING = object()


def _namespaces():
    """Every object the aliases are read from: tf.<namespace> and its module in sys.modules."""
    found = []
    for ns in NAMESPACES:
        obj = tf
        for part in ns.split("."):
            obj = getattr(obj, part)
        found += [(f"tf.{ns}", obj), (f"sys.modules[{obj.__name__}]", sys.modules[obj.__name__])]
    return found


def _state():
    return {(label, name): getattr(obj, name, MISSING) for label, obj in _namespaces() for name in NAMES}


@pytest.fixture
def original():
    state = _state()
    assert state[("tf.keras.losses", "KLD")] is keras.losses.kl_divergence
    yield state
    assert _state() == state, "a test left TensorFlow patched"


def _assert_patched(add_missing=False):
    for (label, name), value in _state().items():
        if name in PRESENT or add_missing:
            assert value is tf_kld.kl_divergence, f"{label}.{name}"
        else:
            assert value is MISSING, f"{label}.{name} was added"


def test_context_manager_patches_and_restores(original):
    with tf_kld.patch_tensorflow() as patch:
        assert patch.active
        _assert_patched()
    assert not patch.active
    assert _state() == original


def test_plain_call_and_undo(original):
    patch = tf_kld.patch_tensorflow()
    try:
        _assert_patched()
        assert tf.keras.losses.KLD is tf.compat.v2.metrics.kullback_leibler_divergence is tf_kld.KLD
    finally:
        patch.undo()
    assert _state() == original
    patch.undo()  # a second undo does nothing
    assert _state() == original


def test_restored_after_exception(original):
    with pytest.raises(ZeroDivisionError):
        with tf_kld.patch_tensorflow():
            _assert_patched()
            raise ZeroDivisionError
    assert _state() == original


def test_nested_and_undone_in_any_order(original):
    with tf_kld.patch_tensorflow():
        with tf_kld.patch_tensorflow():
            _assert_patched()
        _assert_patched()  # the inner exit keeps the outer's patch
    assert _state() == original
    first, second = tf_kld.patch_tensorflow(), tf_kld.patch_tensorflow()
    first.undo()
    _assert_patched()
    second.undo()
    assert _state() == original


def test_add_missing(original):
    with tf_kld.patch_tensorflow(add_missing=True):
        _assert_patched(add_missing=True)
        assert tf.keras.losses.kl_divergence is tf_kld.kl_divergence
        with tf_kld.patch_tensorflow():
            _assert_patched(add_missing=True)
        _assert_patched(add_missing=True)
    assert _state() == original
    assert not hasattr(tf.keras.losses, "kl_divergence")
    for adding_first in (False, True):
        first, second = (tf_kld.patch_tensorflow(add_missing=adding_first),
                         tf_kld.patch_tensorflow(add_missing=not adding_first))
        adding = first if adding_first else second
        adding.undo()  # its added names go with it; the plain patch's stay
        _assert_patched()
        (second if adding_first else first).undo()
        assert _state() == original


def test_existing_code_runs_the_fused_op(original, require_custom):
    t, p = [[0.4, 0.9, 0.2]], [[0.5, 0.8, 0.12]]
    with tf_kld.patch_tensorflow():
        with U.record_eager_ops() as executed:
            loss = tf.keras.losses.KLD(t, p)
            tf.losses.kullback_leibler_divergence(t, p)
    assert [op for op, _ in executed].count(U.FORWARD_OP) == 2
    np.testing.assert_allclose(loss.numpy(), [0.11891246], rtol=1e-6)
    with U.record_eager_ops() as executed:
        tf.keras.losses.KLD(t, p)
    assert U.FORWARD_OP not in [op for op, _ in executed]


def test_keras_model_compiled_under_patch(original):
    x = np.random.default_rng(0).normal(size=(32, 3)).astype(np.float32)
    y = tf.nn.softmax(x).numpy()
    with tf_kld.patch_tensorflow():
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(3, activation="softmax")])
        model.compile(optimizer="adam", loss=tf.keras.losses.kld, jit_compile=False)
        assert model.loss is tf_kld.kl_divergence
        model.fit(x, y, epochs=1, verbose=0)
