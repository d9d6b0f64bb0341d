"""Gradients (first and second order) against autodiff of tf_kld.reference, on both paths."""

import numpy as np
import pytest
import tensorflow as tf

import _util as U
import tf_kld


def _grads(fn, t, p, weights, wrt=("t", "p")):
    """Gradients of sum(weights * fn(t, p)) w.r.t. the named inputs (a non-uniform upstream)."""
    t, p = tf.convert_to_tensor(t), tf.convert_to_tensor(p)
    with tf.GradientTape() as tape:
        for name, x in (("t", t), ("p", p)):
            if name in wrt:
                tape.watch(x)
        loss = fn(t, p)
        total = tf.reduce_sum(loss * tf.cast(weights, loss.dtype))
    return loss, tape.gradient(total, [{"t": t, "p": p}[name] for name in wrt])


def _grad_scales(t, p, weights, dtype):
    """Per element: the magnitude each gradient is computed from (see U.assert_grad_close)."""
    tc, pc = U.clipped64(t, p, dtype)
    g = np.abs(np.asarray(weights, np.float64))[..., None]
    return g * (1.0 + np.abs(np.log(tc / pc))), g * tc / pc


def _np_grads(t, p, weights, dtype):
    """The spec: d/dp = -g t_c/p_c, d/dt = g (log(t_c/p_c) + 1), each zero unless its own input lies
    in the closed interval [eps, 1] (so zero at NaN)."""
    eps = U.epsilon(dtype)
    t64 = np.asarray(t).astype(np.float64)
    p64 = np.asarray(p).astype(np.float64)
    tc, pc = U.clipped64(t, p, dtype)
    g = np.asarray(weights, np.float64)[..., None]
    with np.errstate(invalid="ignore"):
        t_in = (t64 >= eps) & (t64 <= 1.0)
        p_in = (p64 >= eps) & (p64 <= 1.0)
    d_t = np.where(t_in, g * (np.log(tc / pc) + 1.0), 0.0)
    d_p = np.where(p_in, -g * tc / pc, 0.0)
    nd = U.np_dtype(dtype)  # rounded to the output dtype: float16's -t/p overflows to -inf
    with np.errstate(over="ignore"):
        return d_t.astype(nd).astype(np.float64), d_p.astype(nd).astype(np.float64)


def _interior(rng, shape, dtype=np.float64):
    return [rng.uniform(0.05, 0.95, size=shape).astype(dtype) for _ in range(2)]


def test_numeric_gradient_float64(impl, rng):
    """tf.test.compute_gradient: theoretical (the path's gradient) vs central differences, inputs
    kept 0.05 away from the clip boundaries; theoretical also vs the reference's autodiff."""
    t, p = _interior(rng, (3, 4))
    weights = tf.constant(rng.uniform(-2.0, 2.0, size=(3,)))

    def f(t, p):
        return tf_kld.kl_divergence(t, p) * weights

    def f_ref(t, p):
        return tf_kld.reference.kl_divergence(t, p) * weights

    theoretical, numerical = tf.test.compute_gradient(f, [t, p], delta=1e-6)
    reference, _ = tf.test.compute_gradient(f_ref, [t, p], delta=1e-6)
    for name, th, nu, ref in zip("tp", theoretical, numerical, reference):
        assert np.abs(th).max() > 0.1
        np.testing.assert_allclose(th, nu, rtol=1e-6, atol=1e-7, err_msg=f"d/d{name} vs numerical")
        np.testing.assert_allclose(th, ref, rtol=1e-12, atol=1e-12 * np.abs(ref).max(),
                                   err_msg=f"d/d{name} vs reference")


@pytest.mark.parametrize("dtype", U.FLOAT_DTYPES, ids=[d.name for d in U.FLOAT_DTYPES])
def test_boundary_gradients(impl, dtype, rng):
    """Every pair of special values (on, just inside/outside [eps, 1], 0, <0, >1, +-inf, NaN):
    gradient vs the reference's autodiff and vs the spec's formula in NumPy."""
    s = np.append(U.special_values(dtype), np.asarray(np.nan, U.np_dtype(dtype)))
    t, p = np.meshgrid(s, s, indexing="ij")
    weights = rng.uniform(0.5, 2.0, size=t.shape[:-1]) * rng.choice([-1.0, 1.0], size=t.shape[:-1])
    weights = weights.astype(U.np_dtype(dtype)).astype(np.float64)  # the upstream the op sees
    _, (dt, dp) = _grads(tf_kld.kl_divergence, t, p, weights)
    _, (rt, rp) = _grads(tf_kld.reference.kl_divergence, t, p, weights)
    assert dt.dtype == dp.dtype == dtype
    st, sp = _grad_scales(t, p, weights, dtype)
    U.assert_grad_close(dt, rt, st, dtype, what="d/dy_true vs reference")
    U.assert_grad_close(dp, rp, sp, dtype, what="d/dy_pred vs reference")
    nt, npred = _np_grads(t, p, weights, dtype)
    U.assert_grad_close(dt, nt, st, dtype, what="d/dy_true vs NumPy")
    U.assert_grad_close(dp, npred, sp, dtype, what="d/dy_pred vs NumPy")
    # The closed-interval rule, spelled out: exactly eps and exactly 1 pass, NaN gives 0.
    eps = U.epsilon(dtype)
    dp = dp.numpy()
    col = {float(v): i for i, v in enumerate(s[:-1])}
    row_half = col[0.5]
    assert dp[row_half, col[eps]] != 0 and dp[row_half, col[1.0]] != 0
    assert dp[row_half, col[0.0]] == 0 and dp[row_half, col[1.5]] == 0 and dp[row_half, -1] == 0
    assert dt.numpy()[-1, row_half] == 0


@pytest.mark.parametrize("dtype", [tf.float32, tf.float64], ids=["float32", "float64"])
def test_random_gradients(impl, dtype, rng):
    t, p = U.random_inputs(rng, (4, 5, 6), dtype=dtype)
    weights = rng.normal(size=(4, 5))
    loss, (dt, dp) = _grads(tf_kld.kl_divergence, t, p, weights)
    ref_loss, (rt, rp) = _grads(tf_kld.reference.kl_divergence, t, p, weights)
    U.assert_loss_close(loss, ref_loss, t, p, dtype)
    st, sp = _grad_scales(t, p, weights, dtype)
    U.assert_grad_close(dt, rt, st, dtype, what="d/dy_true")
    U.assert_grad_close(dp, rp, sp, dtype, what="d/dy_pred")


@pytest.mark.parametrize("shapes", [((2, 3), (3,)), ((4, 1, 3), (5, 3)), ((2, 1), (2, 3))],
                         ids=lambda s: f"{s[0]}-{s[1]}")
def test_broadcast_gradients_reduce_to_input_shapes(impl, shapes, rng):
    t, p = U.random_inputs(rng, shapes[0], shapes[1], dtype=tf.float64)
    out_shape = np.broadcast_shapes(*shapes)[:-1]
    weights = rng.normal(size=out_shape)
    _, (dt, dp) = _grads(tf_kld.kl_divergence, t, p, weights)
    _, (rt, rp) = _grads(tf_kld.reference.kl_divergence, t, p, weights)
    assert dt.shape == shapes[0] and dp.shape == shapes[1]
    np.testing.assert_allclose(dt.numpy(), rt.numpy(), rtol=1e-12, atol=1e-12 * np.abs(rt).max())
    np.testing.assert_allclose(dp.numpy(), rp.numpy(), rtol=1e-12, atol=1e-12 * np.abs(rp).max())


@pytest.mark.parametrize("wrt", ["p", "t"])
def test_gradient_wrt_one_input(impl, wrt, rng):
    """Differentiating one input gives the reference's gradient for it, and only that input's Grad op
    runs (eager) or is needed for the output (graph: the other is not built, or is dead)."""
    t, p = U.random_inputs(rng, (3, 7), dtype=tf.float64)
    weights = rng.normal(size=(3,))
    with U.record_eager_ops() as executed:
        _, (got,) = _grads(tf_kld.kl_divergence, t, p, weights, wrt=(wrt,))
    grad_runs = [attrs["wrt"] for op_type, attrs in executed if op_type == U.GRAD_OP]
    assert grad_runs == (["y_pred" if wrt == "p" else "y_true"] if impl == "custom" else [])
    _, (want,) = _grads(tf_kld.reference.kl_divergence, t, p, weights, wrt=(wrt,))
    st, sp = _grad_scales(t, p, weights, tf.float64)
    U.assert_grad_close(got, want, sp if wrt == "p" else st, tf.float64)

    @tf.function
    def grad_one(t, p):
        return _grads(tf_kld.kl_divergence, t, p, weights, wrt=(wrt,))[1][0]

    cf = grad_one.get_concrete_function(tf.TensorSpec([None, None], tf.float64),
                                        tf.TensorSpec([None, None], tf.float64))
    U.assert_grad_close(cf(tf.constant(t), tf.constant(p)), want, sp if wrt == "p" else st, tf.float64)
    needed = [op for op in U.ancestor_ops(cf.outputs) if op.type == U.GRAD_OP]
    if impl == "custom":
        assert [U.attr_str(op, "wrt") for op in needed] == ["y_pred" if wrt == "p" else "y_true"]
    else:
        assert not needed and not U.graph_op_types(cf) & {U.FORWARD_OP, U.GRAD_OP}


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16], ids=["float16", "bfloat16"])
def test_low_precision_gradients(impl, dtype, rng):
    t, p = U.random_inputs(rng, (6, 8), dtype=dtype, special=0.2)
    weights = rng.uniform(-2, 2, size=(6,)).astype(U.np_dtype(dtype))
    _, (dt, dp) = _grads(tf_kld.kl_divergence, t, p, weights)
    _, (rt, rp) = _grads(tf_kld.reference.kl_divergence, t, p, weights)
    assert dt.dtype == dp.dtype == dtype
    st, sp = _grad_scales(t, p, weights.astype(np.float64), dtype)
    U.assert_grad_close(dt, rt, st, dtype, what="d/dy_true")
    U.assert_grad_close(dp, rp, sp, dtype, what="d/dy_pred")


# --------------------------------------------------------------------------------------------
# Second order


def _second_order_inputs(rng, boundary):
    t, p = _interior(rng, (3, 5))
    if boundary:  # on, below and above the clip range; exactly eps and 1
        eps = U.epsilon(tf.float64)
        t[0] = [eps, 1.0, 0.0, 1.5, 0.3]
        p[0] = [1.0, eps, 0.4, 0.2, -1.0]
        t[1, :2], p[1, :2] = [0.5, 2e-8], [1e-9, 0.5]
    return t, p


def _hvp(fn, t, p, w, v_t, v_p):
    """Hessian-vector product of sum(w * fn(t, p)) by nested tapes; also d/dw of <grad, v>."""
    t, p, w = tf.constant(t), tf.constant(p), tf.constant(w)
    with tf.GradientTape() as outer:
        outer.watch([t, p, w])
        with tf.GradientTape() as inner:
            inner.watch([t, p])
            total = tf.reduce_sum(w * fn(t, p))
        g_t, g_p = inner.gradient(total, [t, p])
        dot = tf.reduce_sum(g_t * v_t) + tf.reduce_sum(g_p * v_p)
    return outer.gradient(dot, [t, p, w])


@pytest.mark.parametrize("boundary", [False, True], ids=["interior", "boundary"])
def test_hessian_vector_product(impl, boundary, rng):
    t, p = _second_order_inputs(rng, boundary)
    w = rng.normal(size=(3,))
    v_t, v_p = rng.normal(size=t.shape), rng.normal(size=p.shape)
    got = _hvp(tf_kld.kl_divergence, t, p, w, v_t, v_p)
    want = _hvp(tf_kld.reference.kl_divergence, t, p, w, v_t, v_p)
    for name, g, r in zip(("y_true", "y_pred", "weights"), got, want):
        assert g is not None, f"no second-order gradient for {name}"
        np.testing.assert_allclose(g.numpy(), r.numpy(), rtol=1e-12, atol=1e-12 * np.abs(r).max(),
                                   err_msg=f"HVP part {name}")
    if not boundary:  # analytic Hessian of w * t log(t/p): [[w/t, -w/p], [-w/p, w t/p^2]]
        wc = w[:, None]
        np.testing.assert_allclose(got[0].numpy(), wc * (v_t / t - v_p / p), rtol=1e-12)
        np.testing.assert_allclose(got[1].numpy(), wc * (-v_t / p + v_p * t / p ** 2), rtol=1e-12)


def test_forward_over_reverse(impl, rng):
    """tf.autodiff.ForwardAccumulator over a gradient (JVP of the gradient) equals the reference's."""
    t, p = _second_order_inputs(rng, boundary=True)
    w = tf.constant(rng.normal(size=(3,)))
    tangents = [tf.constant(rng.normal(size=t.shape)), tf.constant(rng.normal(size=p.shape))]

    def jvp_of_grad(fn):
        tt, pp = tf.constant(t), tf.constant(p)
        with tf.autodiff.ForwardAccumulator([tt, pp], tangents) as acc:
            with tf.GradientTape() as tape:
                tape.watch([tt, pp])
                total = tf.reduce_sum(w * fn(tt, pp))
            g_t, g_p = tape.gradient(total, [tt, pp])
        return acc.jvp(g_t), acc.jvp(g_p)

    got = jvp_of_grad(tf_kld.kl_divergence)
    want = jvp_of_grad(tf_kld.reference.kl_divergence)
    for name, g, r in zip(("d/dy_true", "d/dy_pred"), got, want):
        assert g is not None
        np.testing.assert_allclose(g.numpy(), r.numpy(), rtol=1e-12, atol=1e-12 * np.abs(r).max(),
                                   err_msg=f"JVP of {name}")


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("broadcast", ["y_true", "y_pred"])
def test_low_precision_broadcast_gradients_are_reduced_in_float32(impl, dtype, broadcast, rng):
    # A [64] input broadcast against [4096, 64]: its gradient sums 4096 terms. The composite sums
    # them in float32 and rounds once; the path under test must be no less accurate, measured
    # against float64 (a sum in the 16-bit type was ~25x worse in median).
    rows, width = 4096, 64
    small, full = rng.uniform(0.01, 1.0, size=(width,)), rng.uniform(0.01, 1.0, size=(rows, width))
    t, p = (small, full) if broadcast == "y_true" else (full, small)
    nd = U.np_dtype(dtype)
    t, p = t.astype(nd), p.astype(nd)
    weights = rng.uniform(0.5, 1.5, size=(rows,)).astype(nd)
    t64, p64, g = t.astype(np.float64), p.astype(np.float64), weights.astype(np.float64)[:, None]
    if broadcast == "y_true":
        exact = np.sum(g * (np.log(t64 / p64) + 1.0), axis=0)
    else:
        exact = np.sum(-g * t64 / p64, axis=0)
    index = 0 if broadcast == "y_true" else 1

    def rel_errors(fn):
        _, grads = _grads(fn, t, p, weights)
        got = U.to_numpy(grads[index]).astype(np.float64)
        assert got.shape == (width,) and grads[index].dtype == dtype
        return np.abs(got - exact) / np.abs(exact)

    path = rel_errors(tf_kld.kl_divergence)
    composite = rel_errors(tf_kld.reference.kl_divergence)
    for stat in (np.median, np.max):
        assert stat(path) <= 1.1 * stat(composite) + 1e-7, (
            f"d/d{broadcast} {stat.__name__} relative error {stat(path):.3g}, composite's "
            f"{stat(composite):.3g}")
