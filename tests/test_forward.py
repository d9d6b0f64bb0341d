"""Forward values against keras.losses.kl_divergence, tf_kld.reference and NumPy, on both paths."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import _util as U
import tf_kld

keras_kld = keras.losses.kl_divergence
DTYPE_IDS = [d.name for d in U.FLOAT_DTYPES]


def test_aliases_are_one_function():
    assert tf_kld.KLD is tf_kld.kld is tf_kld.kullback_leibler_divergence is tf_kld.kl_divergence


def test_doc_example(impl):
    with U.record_eager_ops() as executed:
        got = tf_kld.KLD([.4, .9, .2], [.5, .8, .12])
    ran = {op_type for op_type, _ in executed}
    assert (U.FORWARD_OP in ran) == (impl == "custom") and ("Log" in ran) == (impl == "reference"), ran
    assert got.dtype == tf.float32 and got.shape == ()
    t, p = np.array([.4, .9, .2]), np.array([.5, .8, .12])
    assert float(np.sum(t * np.log(t / p))) == pytest.approx(0.11891246, rel=1e-6)
    np.testing.assert_allclose(got.numpy(), 0.11891246, rtol=1e-6)


def _check_against_all(got, t, p, dtype):
    """got vs tf_kld.reference, NumPy float64 and Keras (16-bit Keras: looser, inf rows excepted)."""
    dtype = tf.as_dtype(dtype)
    ref = tf_kld.reference.kl_divergence(tf.constant(t), tf.constant(p))
    U.assert_loss_close(got, ref, t, p, dtype, what="vs tf_kld.reference")
    U.assert_loss_close(got, U.np_kld(t, p, dtype), t, p, dtype, what="vs NumPy float64")
    want = keras_kld(tf.constant(t), tf.constant(p)).numpy().astype(np.float64)
    got = got.numpy().astype(np.float64)
    if dtype == tf.float16:
        # Keras's float16 ratio t/p overflows to inf (> 65504); tf_kld computes in float32.
        tc, pc = U.clipped64(t, p, dtype)
        overflow = np.any(tc / pc > float(np.finfo(np.float16).max), axis=-1) & ~np.isnan(got)
        np.testing.assert_array_equal(np.isposinf(want), overflow)
        assert np.all(np.isfinite(got[overflow])), "tf_kld must not overflow where Keras float16 does"
        want = np.where(overflow, got, want)
    U.assert_loss_close(got, want, t, p, dtype,
                        against="keras" if dtype in U.LOW_PRECISION else "reference", what="vs Keras")


# Ranks 1-4, plus rows wide enough to reach any vectorised loop and its remainder.
SHAPES = [(7,), (1,), (3, 5), (2, 3, 4), (2, 2, 3, 5), (4, 16), (3, 17), (2, 67), (2, 1031)]


@pytest.mark.parametrize("dtype", U.FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_random_parity(impl, dtype, shape, rng):
    t, p = U.random_inputs(rng, shape, dtype=dtype)
    got = tf_kld.kl_divergence(tf.constant(t), tf.constant(p))
    assert got.dtype == dtype
    assert got.shape == shape[:-1]
    _check_against_all(got, t, p, dtype)


@pytest.mark.parametrize("dtype", U.FLOAT_DTYPES, ids=DTYPE_IDS)
def test_every_pair_of_special_values(impl, dtype):
    """t[i, j] = S[i], p[i, j] = S[j]: every pair of values on, inside and outside [eps, 1],
    once as one-term rows and once as rows of len(S) terms."""
    s = U.special_values(dtype)
    t, p = np.meshgrid(s, s, indexing="ij")
    for tt, pp in ((t[..., None], p[..., None]), (t, p), (t.T, p.T)):
        got = tf_kld.kl_divergence(tf.constant(tt), tf.constant(pp))
        _check_against_all(got, tt, pp, dtype)


@pytest.mark.parametrize("dtype", [tf.float32, tf.float64], ids=["float32", "float64"])
def test_epsilon_is_exact_in_dtype(impl, dtype):
    """t=1 against p<=eps gives log(1/eps) with eps rounded to the dtype; float64 must not use
    float32(1e-7), which is off by ~6e-10 relative."""
    eps = U.epsilon(dtype)
    got = tf_kld.kl_divergence(tf.constant([[1.0], [1.0], [1.0], [eps]], dtype),
                               tf.constant([[0.0], [-3.0], [eps], [1.0]], dtype)).numpy()
    want = np.array([-math.log(eps)] * 3 + [eps * math.log(eps)])
    rtol = 1e-15 if dtype == tf.float64 else 1e-7
    np.testing.assert_allclose(got, want, rtol=rtol)


def test_float16_overflow_where_keras_gives_inf(impl):
    """Documented difference: Keras float16 computes t/p = 1/1.19e-7 in float16 -> inf; tf_kld
    computes in float32 and returns log(1 / 1.1920929e-07) = 15.942385 rounded to float16."""
    t, p = tf.constant([1.0, 0.0], tf.float16), tf.constant([0.0, 1.0], tf.float16)
    assert np.isposinf(keras_kld(t, p).numpy())
    got = tf_kld.kl_divergence(t, p)
    assert got.dtype == tf.float16
    assert got.numpy() == np.float16(-math.log(float(np.float16(1e-7))))  # 15.94
    assert float(got) == pytest.approx(15.94, abs=0.01)


BROADCAST_PAIRS = [((2, 3), (3,)), ((3,), (2, 3)), ((2, 1), (2, 3)), ((2, 3), (2, 1)),
                   ((4, 1, 3), (5, 3)), ((1, 3), (4, 1)), ((), (3,)), ((3,), ()), ((2, 1, 1), (1, 4, 5))]


@pytest.mark.parametrize("dtype", [tf.float32, tf.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("shapes", BROADCAST_PAIRS, ids=lambda s: f"{s[0]}-{s[1]}")
def test_broadcasting(impl, shapes, dtype, rng):
    t, p = U.random_inputs(rng, shapes[0], shapes[1], dtype=dtype)
    got = tf_kld.kl_divergence(tf.constant(t), tf.constant(p))
    assert got.shape == np.broadcast_shapes(shapes[0], shapes[1])[:-1]
    _check_against_all(got, t, p, dtype)


def test_incompatible_shapes_raise(impl):
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError)):
        tf_kld.kl_divergence(tf.ones((2, 3)), tf.ones((4, 3)))


def _mixed_cases():
    t = [[0.1, 0.7, 0.2], [0.0, 1.0, 0.0]]
    p = [[0.3, 0.3, 0.4], [0.25, 0.5, 0.25]]
    ints, bools = [[0, 1, 0], [1, 0, 2]], [[True, False, True], [False, True, False]]
    return [
        ("f64 tensor t, f32 p", lambda: (tf.constant(t, tf.float64), tf.constant(p, tf.float32))),
        ("f32 tensor t, f16 p", lambda: (tf.constant(t, tf.float32), tf.constant(p, tf.float16))),
        ("f32 tensor t, f64 p", lambda: (tf.constant(t, tf.float32), tf.constant(p, tf.float64))),
        ("int32 tensor t", lambda: (tf.constant(ints, tf.int32), tf.constant(p, tf.float32))),
        ("int64 numpy t, f64 numpy p", lambda: (np.array(ints, np.int64), np.array(p, np.float64))),
        ("bool tensor t", lambda: (tf.constant(bools), tf.constant(p, tf.float32))),
        ("bool numpy t, bf16 p", lambda: (np.array(bools), tf.constant(p, tf.bfloat16))),
        ("python lists", lambda: (t, p)),
        ("python int list t", lambda: (ints, p)),
        ("numpy f32 arrays", lambda: (np.array(t, np.float32), np.array(p, np.float32))),
        ("python list t, f64 tensor p", lambda: (t, tf.constant(p, tf.float64))),
        ("f64 numpy t, python list p", lambda: (np.array(t, np.float64), p)),
    ]


@pytest.mark.parametrize("case", _mixed_cases(), ids=lambda c: c[0])
def test_mixed_input_types(impl, case):
    y_true, y_pred = case[1]()
    got = tf_kld.kl_divergence(y_true, y_pred)
    want = keras_kld(y_true, y_pred)
    assert got.dtype == want.dtype
    assert got.shape == want.shape == (2,)
    dtype = got.dtype
    t = np.asarray(y_true).astype(U.np_dtype(dtype)).astype(np.float64)
    p = np.asarray(y_pred).astype(np.float64)
    U.assert_loss_close(got, want, t, p, dtype,
                        against="keras" if dtype in U.LOW_PRECISION else "reference", what="vs Keras")
    U.assert_loss_close(got, U.np_kld(t, p, dtype), t, p, dtype, what="vs NumPy")


def test_bad_dtypes_raise_type_error(impl):
    with pytest.raises(TypeError, match="y_pred"):
        tf_kld.kl_divergence([0.5, 0.5], tf.constant([1, 2]))
    with pytest.raises(TypeError, match="y_true"):
        tf_kld.kl_divergence(tf.constant(["a", "b"]), [0.5, 0.5])


@pytest.mark.parametrize("shape", [(2, 0), (0,), (3, 0, 4), (0, 3), (2, 0, 3), (0, 0)], ids=str)
def test_empty(impl, shape):
    t, p = np.zeros(shape, np.float32), np.full(shape, 0.5, np.float32)
    got = tf_kld.kl_divergence(t, p)
    want = keras_kld(t, p)
    assert got.dtype == tf.float32
    assert got.shape == want.shape == shape[:-1]
    np.testing.assert_array_equal(got.numpy(), np.zeros(shape[:-1], np.float32))


@pytest.mark.parametrize("dtype", U.FLOAT_DTYPES, ids=DTYPE_IDS)
def test_nan_propagates_like_keras(impl, dtype, rng):
    t, p = U.random_inputs(rng, (40, 5), dtype=dtype, special=0.2, nan=0.1)
    t[0], p[0] = np.nan, 0.5  # NaN t in every term
    t[1], p[1] = 0.5, np.nan
    t[2, 0], p[2, 0] = 0.0, np.nan  # NaN p under t clipped to eps
    t[3, 0], p[3, 0] = np.nan, 0.0
    got = tf_kld.kl_divergence(tf.constant(t), tf.constant(p)).numpy().astype(np.float64)
    want = keras_kld(tf.constant(t), tf.constant(p)).numpy().astype(np.float64)
    nan_rows = np.isnan(t).any(-1) | np.isnan(p).any(-1)
    assert nan_rows[:4].all() and not nan_rows.all()
    np.testing.assert_array_equal(np.isnan(got), nan_rows)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    _check_against_all(tf.constant(got.astype(U.np_dtype(dtype))), t, p, dtype)


@pytest.mark.parametrize("dtype", [tf.float32, tf.float64, tf.float16], ids=["float32", "float64", "float16"])
def test_epsilon_read_at_call_time(impl, dtype, restore_epsilon):
    t = np.array([[1.0, 0.0, 5e-4, 0.3], [0.0, 1.0, 1e-6, 0.2]], U.np_dtype(dtype))
    p = np.array([[1e-5, 0.5, 0.0, 2e-3], [1.0, 1e-9, 0.4, 0.2]], U.np_dtype(dtype))
    before = tf_kld.kl_divergence(t, p)
    for eps in (1e-3, 1e-5):
        keras.backend.set_epsilon(eps)
        got = tf_kld.kl_divergence(t, p)
        want = U.np_kld(t, p, dtype, eps=U.epsilon(dtype))
        U.assert_loss_close(got, want, t, p, dtype, what=f"epsilon={eps}")
        U.assert_loss_close(got, tf_kld.reference.kl_divergence(t, p), t, p, dtype, what=f"epsilon={eps}")
        if dtype != tf.float16:
            U.assert_loss_close(got, keras_kld(t, p), t, p, dtype, what=f"epsilon={eps} vs Keras")
        assert not np.allclose(got.numpy(), before.numpy())


def test_rank0_raises(impl):
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError)):
        tf_kld.kl_divergence(0.5, 0.25)
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError)):
        tf_kld.kl_divergence(tf.constant(0.5, tf.float64), tf.constant(0.25, tf.float64))
