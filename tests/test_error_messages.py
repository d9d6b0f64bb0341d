"""Every error a user can trigger names the argument, what was seen (shape or dtype) and what is
allowed; both paths raise the same exception type, as TensorFlow's own ops would (InvalidArgumentError
eagerly, ValueError while tracing)."""

import os

import numpy as np
import pytest
import tensorflow as tf

import tf_kld
from tf_kld import ops as kld_ops


def _raised(fn, *args, **kwargs):
    with pytest.raises(Exception) as info:
        fn(*args, **kwargs)
    return info.value


def _traced(y_true, y_pred):
    return tf.function(tf_kld.kl_divergence)(y_true, y_pred)


@pytest.mark.parametrize("y_pred, dtype", [([1, 2], "int32"), (["a", "b"], "string"),
                                           (tf.constant([1 + 1j]), "complex128"),
                                           (tf.constant([True]), "bool")])
def test_non_floating_y_pred(impl, y_pred, dtype):
    err = _raised(tf_kld.kl_divergence, [0.5, 0.5], y_pred)
    assert type(err) is TypeError
    msg = str(err)
    assert "y_pred" in msg and f"dtype {dtype}" in msg, msg
    assert all(d in msg for d in ("float16", "bfloat16", "float32", "float64")), msg


@pytest.mark.parametrize("y_true, dtype", [(["a", "b"], "string"), (tf.constant(["a", "b"]), "string"),
                                           (tf.constant([1 + 1j, 2]), "complex128")])
def test_y_true_that_cannot_be_cast(impl, y_true, dtype):
    err = _raised(tf_kld.kl_divergence, y_true, tf.constant([0.5, 0.5]))
    assert type(err) is TypeError
    msg = str(err)
    assert "y_true" in msg and dtype in msg and "float32" in msg and "numeric" in msg, msg


@pytest.mark.parametrize("value", [None, [[1.0, 2.0], [3.0]], object()],
                         ids=["None", "ragged", "object"])
def test_values_that_do_not_convert(impl, value):
    err = _raised(tf_kld.kl_divergence, [0.5, 0.5], value)
    assert isinstance(err, (TypeError, ValueError))
    assert "y_pred" in str(err) and "floating-point" in str(err), str(err)
    err = _raised(tf_kld.kl_divergence, value, [0.5, 0.5])
    assert type(err) is TypeError
    assert "y_true" in str(err) and "float32" in str(err), str(err)


SHAPE_ERRORS = [((2, 3), (2, 4), "broadcastable"), ((3,), (4,), "broadcastable"),
                ((2, 1, 3), (4, 2, 3), "broadcastable"), ((), (), "rank >= 1")]


@pytest.mark.parametrize("shape_true, shape_pred, allowed", SHAPE_ERRORS)
@pytest.mark.parametrize("mode", ["eager", "traced"])
def test_static_shape_errors(impl, shape_true, shape_pred, allowed, mode):
    fn = tf_kld.kl_divergence if mode == "eager" else _traced
    err = _raised(fn, tf.ones(shape_true), tf.ones(shape_pred))
    expected = tf.errors.InvalidArgumentError if mode == "eager" else ValueError
    assert type(err) is expected, repr(err)
    msg = str(err)
    assert "y_true" in msg and "y_pred" in msg and allowed in msg, msg
    assert f"y_true shape {tf.TensorShape(shape_true)}" in msg, msg
    assert f"y_pred shape {tf.TensorShape(shape_pred)}" in msg, msg


@pytest.mark.parametrize("shape_true, shape_pred", [((2, 3), (2, 4)), ((), ())])
def test_run_time_shape_errors_same_type_on_both_paths(shape_true, shape_pred):
    """Shapes unknown until run time: both paths raise InvalidArgumentError when the graph runs.
    (The messages are TensorFlow's own, e.g. "Incompatible shapes: [2,3] vs. [2,4]"; the custom
    op's rank check names y_true and y_pred.)"""
    spec = tf.TensorSpec(None, tf.float32)
    errors = {}
    for impl in ("custom", "reference"):
        with tf_kld.implementation(impl):
            fn = tf.function(tf_kld.kl_divergence, input_signature=[spec, spec])
            errors[impl] = _raised(fn, tf.ones(shape_true), tf.ones(shape_pred))
    assert type(errors["custom"]) is type(errors["reference"]) is tf.errors.InvalidArgumentError, errors
    msg = str(errors["custom"])
    if shape_true:
        assert "[2,3]" in msg and "[2,4]" in msg, msg
    else:
        assert "y_true and y_pred must have rank >= 1" in msg, msg


def test_bad_implementation_name():
    err = _raised(lambda: tf_kld.implementation("fast").__enter__())
    assert type(err) is ValueError
    assert "tf_kld.implementation" in str(err) and "'fast'" in str(err), str(err)
    assert "auto, custom, reference" in str(err), str(err)


def test_bad_environment_implementation(monkeypatch):
    monkeypatch.setenv(kld_ops.IMPL_ENV, "gpu")
    err = _raised(tf_kld.kl_divergence, [0.5, 0.5], [0.5, 0.5])
    assert type(err) is ValueError
    assert "TF_KLD_IMPL" in str(err) and "'gpu'" in str(err) and "auto, custom, reference" in str(err)


# The raw ops are not public API, but their checks are what guards the kernels.

def _raw_errors(fn, *args):
    """(eager error, traced error) of a raw op call."""
    eager = _raised(fn, *args)
    traced = _raised(tf.function(fn), *args)
    return eager, traced


@pytest.mark.parametrize("shape_true, shape_pred, words", [
    ((2, 3), (2, 4), ["same shape", "y_true [2,3]", "y_pred [2,4]"]),
    ((2, 3), (3,), ["same shape", "y_true [2,3]", "y_pred [3]"]),
    ((), (), ["rank >= 1", "y_true []", "y_pred []"]),
])
def test_raw_forward_op_checks(require_custom, shape_true, shape_pred, words):
    op = kld_ops._module.tf_kld_kl_divergence  # pylint: disable=protected-access
    eager, traced = _raw_errors(op, tf.ones(shape_true), tf.ones(shape_pred))
    assert type(eager) is tf.errors.InvalidArgumentError and type(traced) is ValueError
    for err in (eager, traced):
        assert all(w in str(err) for w in words), str(err)


@pytest.mark.parametrize("grad_shape", [(3,), ()])
def test_raw_gradient_op_checks(require_custom, grad_shape):
    op = kld_ops._module.tf_kld_kl_divergence_grad  # pylint: disable=protected-access
    eager, traced = _raw_errors(op, tf.ones(grad_shape), tf.ones((2, 3)), tf.ones((2, 3)))
    assert type(eager) is tf.errors.InvalidArgumentError and type(traced) is ValueError
    for err in (eager, traced):
        msg = str(err)
        assert "grad must have the loss's shape [2]" in msg, msg
        assert f"got {tf.TensorShape(grad_shape).as_list()}".replace(" ", "") in msg.replace(" ", ""), msg


def test_raw_op_attrs(require_custom):
    module = kld_ops._module  # pylint: disable=protected-access
    x = tf.ones(3, tf.float64)
    err = _raised(module.tf_kld_kl_divergence, x, x, epsilon_f64="small")
    assert "epsilon_f64" in str(err) and '"small"' in str(err) and "decimal number" in str(err)
    err = _raised(module.tf_kld_kl_divergence_grad, tf.ones((), tf.float64), x, x, wrt="both")
    assert "wrt" in str(err) and "both" in str(err) and "y_pred" in str(err) and "y_true" in str(err)
    i = tf.ones(3, tf.int32)
    err = _raised(module.tf_kld_kl_divergence, i, i)
    assert "'T'" in str(err) and "int32" in str(err) and "half, bfloat16, float, double" in str(err)
