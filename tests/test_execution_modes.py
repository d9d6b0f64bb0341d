"""Eager, tf.function and tf.function with unknown-shape signatures agree, on both paths."""

import numpy as np
import pytest
import tensorflow as tf

import _util as U
import tf_kld

SIGNATURES = {
    "traced": None,
    "none_none": (tf.TensorSpec([None, None]), tf.TensorSpec([None, None])),
    "unknown_rank": (tf.TensorSpec(shape=None), tf.TensorSpec(shape=None)),
}


def _function(signature, dtype, fn):
    if signature is None:
        return tf.function(fn)
    return tf.function(fn, input_signature=[tf.TensorSpec(s.shape, dtype) for s in signature])


def _loss_and_grads(t, p):
    with tf.GradientTape() as tape:
        tape.watch([t, p])
        loss = tf_kld.kl_divergence(t, p)
        weights = tf.cast(tf.range(1, tf.size(loss) + 1), loss.dtype)  # a non-uniform upstream
        total = tf.reduce_sum(loss * tf.reshape(weights, tf.shape(loss)))
    return (loss,) + tuple(tape.gradient(total, [t, p]))


@pytest.mark.parametrize("dtype", [tf.float32, tf.float64, tf.float16], ids=["float32", "float64", "float16"])
def test_eager_and_functions_agree(impl, dtype, rng):
    t, p = U.random_inputs(rng, (5, 7), dtype=dtype)
    tt, pp = tf.constant(t), tf.constant(p)
    eager = _loss_and_grads(tt, pp)
    U.assert_loss_close(eager[0], tf_kld.reference.kl_divergence(tt, pp), t, p, dtype)
    for name, signature in SIGNATURES.items():
        got = _function(signature, dtype, _loss_and_grads)(tt, pp)
        for what, g, e in zip(("loss", "d/dy_true", "d/dy_pred"), got, eager):
            assert g.dtype == dtype and g.shape == e.shape, f"{name}: {what}"
            # Same op, same kernel: the graph result is the eager one (up to one rounding).
            np.testing.assert_allclose(g.numpy().astype(np.float64), e.numpy().astype(np.float64),
                                       rtol=U.machine_eps(dtype), atol=0, err_msg=f"{name}: {what}")


@pytest.mark.parametrize("shapes", [((2, 3), (3,)), ((3,), (2, 3)), ((2, 1), (2, 3)), ((4, 1, 3), (5, 3)),
                                    ((), (3,)), ((2, 0), (2, 0)), ((0, 3), (0, 3))],
                         ids=lambda s: f"{s[0]}-{s[1]}")
def test_unknown_shapes_broadcast_at_run_time(impl, shapes, rng):
    t, p = U.random_inputs(rng, shapes[0], shapes[1], dtype=tf.float64)
    fn = _function(SIGNATURES["unknown_rank"], tf.float64, tf_kld.kl_divergence)
    got = fn(tf.constant(t), tf.constant(p))
    want = tf_kld.reference.kl_divergence(tf.constant(t), tf.constant(p))
    U.assert_loss_close(got, want, t, p, tf.float64)


@pytest.mark.parametrize("signature", ["none_none", "unknown_rank"])
def test_rank0_raises_at_run_time(impl, signature):
    fn = _function(SIGNATURES[signature] if signature == "unknown_rank" else None, tf.float32,
                   tf_kld.kl_divergence)
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError)):
        fn(tf.constant(0.5), tf.constant(0.25))


@pytest.mark.parametrize("specs, expected", [
    (([4, 1, 3], [5, 3]), [4, 5]),
    (([2, 3], [3]), [2]),
    (([], [7]), []),
    (([None, None], [None, None]), [None]),
    (([None, 3], [3]), [None]),
    (([2, None, 3], [None, None, None]), [2, None]),
    ((None, [None, 4]), None),
    ((None, None), None),
], ids=str)
def test_static_output_shape(impl, specs, expected):
    """The output's static shape is the static broadcast shape without its last axis, as precise as
    the reference's (TF's broadcast_static_shape)."""
    cf = tf.function(tf_kld.kl_divergence).get_concrete_function(*(tf.TensorSpec(s) for s in specs))
    shape = cf.structured_outputs.shape
    assert cf.structured_outputs.dtype == tf.float32
    if expected is None:
        assert shape.rank is None, shape
        return
    assert shape.as_list() == expected
