"""The distillation ops' own XLA lowering (cc/kernels/distill_xla.cc): under implementation("custom")
jit_compile compiles the fused ops (not the composite), whose values and gradients of both inputs
match the float64 oracle for every dtype, width, temperature and beta, with -inf/huge/NaN logits,
broadcasting, 3-D inputs and empty rows; the lowered ops output the CPU kernels' loss and stats;
"auto" keeps the composite under XLA. (Two copies of the library: tests/test_library_copies.py.)"""

import numpy as np
import pytest
import tensorflow as tf

import _util as U
import test_distillation as D
import tf_kld
from tf_kld import ops as kld_ops

KL_OP = "TfKld>KlDivergenceWithLogits"
KL_GRAD_OP = "TfKld>KlDivergenceWithLogitsGrad"
JSD_OP = "TfKld>GeneralizedJsdWithLogits"
JSD_GRAD_OP = "TfKld>GeneralizedJsdWithLogitsGrad"
BETAS = (None,) + D.BETAS  # None: kl_divergence_with_logits


@pytest.fixture
def custom(require_custom):
    if not kld_ops.distillation_xla_lowering_available():
        pytest.fail("the op library has no XLA lowering of the distillation ops (built with "
                    "TF_KLD_XLA=0, or distill_xla.cc failed to compile)", pytrace=False)
    with tf_kld.implementation("custom"):
        yield


def _fn(beta, temperature):
    return lambda a, b: D.loss_fn(beta)(a, b, temperature)


def _jit_loss_and_grads(fn, t, p, weights):
    """Loss and d sum(w * loss) / d(y_true, y_pred), all inside one jit_compile'd function."""
    return tf.function(lambda a, b, w: D._grads(fn, a, b, w), jit_compile=True)(t, p, weights)


def _ops_of(beta):
    """The forward and gradient ops the custom path builds for `beta`."""
    return (KL_OP, KL_GRAD_OP) if beta in (None, 0.0, 1.0) else (JSD_OP, JSD_GRAD_OP)


def _check(got, t, p, weights, beta, temperature, dtype, rows=Ellipsis):
    """The loss against the oracle of the inputs as `dtype` holds them; both gradients on `rows`:
    float64 against NumPy's analytic formulas (rtol 1e-12 of |want| + |g| / T, as
    test_distillation), the float32-computed dtypes by assert_grads_float32_compute."""
    loss, (dt, dp) = got
    assert loss.dtype == dt.dtype == dp.dtype == dtype
    t64, p64 = (tf.cast(x, tf.float64).numpy() for x in (t, p))
    w64 = tf.cast(weights, tf.float64).numpy()
    D.assert_loss(loss, D.oracle(t64, p64, beta, temperature), t64, p64, temperature, dtype)
    if dtype == tf.float64:
        want_t, want_p = D.oracle_grads(t64, p64, w64, beta, temperature)
        for g, w, name in ((dt, want_t, "d/dy_true"), (dp, want_p, "d/dy_pred")):
            D.assert_grad(g.numpy()[rows], w[rows], w64[rows], temperature, name)
    else:
        D.assert_grads_float32_compute((dt, dp), t64, p64, w64, beta, temperature, dtype, rows)


# --------------------------------------------------------------------------------------------
# Which program runs


@pytest.mark.parametrize("beta", BETAS)
def test_custom_compiles_the_ops_own_lowering(custom, beta):
    """implementation("custom") under jit_compile: the fused forward and gradient ops are in the
    graph and in the HLO XLA compiles (lowered there, not a custom-call), the composite is not."""
    forward, grad = _ops_of(beta)
    t = tf.zeros([4, 9])
    fn = tf.function(lambda a, b: D._grads(_fn(beta, 2.0), a, b, tf.ones([4])), jit_compile=True)
    types = U.graph_op_types(fn.get_concrete_function(t, t))
    assert {forward, grad} <= types and "Exp" not in types, types
    hlo = fn.experimental_get_compiler_ir(t, t)(stage="hlo")
    assert f'op_type="{forward}"' in hlo and f'op_type="{grad}"' in hlo
    assert 'op_type="Exp"' not in hlo and "custom-call" not in hlo


@pytest.mark.parametrize("beta", [None, 0.5])
def test_auto_emits_composite_inside_xla(require_custom, beta):
    """implementation("auto") (the default) under jit_compile: the log-softmax composite, as for
    kl_divergence (written out, for its exact d: its exps); outside XLA the fused op."""
    spec = tf.TensorSpec([None, 7], tf.float32)
    jitted = U.graph_op_types(tf.function(_fn(beta, 2.0), jit_compile=True).get_concrete_function(spec, spec))
    assert not {KL_OP, JSD_OP} & jitted and "Exp" in jitted, jitted
    plain = U.graph_op_types(tf.function(_fn(beta, 2.0)).get_concrete_function(spec, spec))
    assert _ops_of(beta)[0] in plain, plain


@pytest.mark.parametrize("beta", [None, 0.3])
def test_trace_cached_outside_xla_then_called_from_jit(require_custom, beta, rng):
    """A tf.function traced outside XLA holds the fused op; called from a jit-compiled function it
    now compiles (through the lowering) and gives the oracle's values and gradients."""
    t, p = tf.constant(D.logits(rng, (5, 13))), tf.constant(D.logits(rng, (5, 13)))
    weights = tf.constant(rng.uniform(-1.0, 2.0, 5).astype(np.float32))
    inner = tf.function(_fn(beta, 1.5))
    assert _ops_of(beta)[0] in U.graph_op_types(inner.get_concrete_function(t, p))
    _check(_jit_loss_and_grads(inner, t, p, weights), t, p, weights, beta, 1.5, tf.float32)


# --------------------------------------------------------------------------------------------
# Values and gradients under jit_compile


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("width, temperature", [(1, 1.0), (7, 0.5), (33, 4.0), (1000, 1.0),
                                                (32000, 0.5)], ids=lambda x: str(x))
@pytest.mark.parametrize("dtype", U.FLOAT_DTYPES, ids=lambda d: d.name)
def test_values_and_gradients(custom, dtype, width, temperature, beta, rng):
    rows = 2 if width > 1000 else 4
    t = tf.cast(D.logits(rng, (rows, width), np.float64, 4.0), dtype)
    p = tf.cast(D.logits(rng, (rows, width), np.float64, 4.0), dtype)
    weights = tf.cast(rng.uniform(-2.0, 2.0, rows), dtype)
    got = _jit_loss_and_grads(_fn(beta, temperature), t, p, weights)
    _check(got, t, p, weights, beta, temperature, dtype)


@pytest.mark.parametrize("implementation", ["custom", "auto"])
@pytest.mark.parametrize("beta", [0.1, 0.9])
@pytest.mark.parametrize("width", [10, 4099], ids=lambda w: f"width{w}")
def test_jsd_of_close_distributions(require_custom, implementation, width, beta, rng):
    """The lowering's log-ratios (and the composite's, which "auto" compiles) as accurate as the
    CPU kernels' where the JSD is small against its terms (test_distillation's bound): XLA's
    simplifier must not undo them (it reassociates (1 - beta) e^d + beta - 1)."""
    with tf_kld.implementation(implementation):
        fn = tf.function(_fn(beta, 2.0), jit_compile=True)
        D.assert_jsd_of_close_distributions(fn, width, beta, 2.0, rng)


@pytest.mark.parametrize("implementation", ["custom", "auto"])
@pytest.mark.parametrize("beta", [0.1, 0.9])
@pytest.mark.parametrize("width", [10, 4099], ids=lambda w: f"width{w}")
def test_jsd_to_ulps_of_itself(require_custom, implementation, width, beta, rng):
    """The lowering and the composite ("auto") sum the JSD's series in d where |d| <= 1, from
    d = lq - lp of the logits' difference (in float64: XLA could reassociate the CPU core's
    TwoSum): within 16 ulps of the JSD itself."""
    with tf_kld.implementation(implementation):
        fn = tf.function(_fn(beta, 3.0), jit_compile=True)
        D.assert_jsd_to_ulps_of_itself(fn, width, beta, 3.0, rng)


@pytest.mark.parametrize("implementation", ["custom", "auto"])
def test_kl_of_a_vocabulary_to_ulps_of_itself(require_custom, implementation, rng):
    """test_distillation's bound on the KL at 32000 classes under jit_compile: 6 eps on the
    lowering (1.4-1.9 over six seeds; 150-190 with lp - lq of float log-probabilities), 10 on the
    composite "auto" compiles (4.7-6.8; 268-299 from tf.nn.log_softmax)."""
    with tf_kld.implementation(implementation):
        fn = tf.function(lambda a, b: tf_kld.kl_divergence_with_logits(a, b, 2.0), jit_compile=True)
        D.assert_kl_of_a_vocabulary(fn, 6 if implementation == "custom" else 10, rng)


@pytest.mark.parametrize("implementation", ["custom", "auto"])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_jsd_of_a_vocabulary_to_ulps_of_itself(require_custom, implementation, beta, rng):
    """32000 classes (T = 1, a student's noise of 1 and 0.01): within 6 ulps of the JSD itself
    (1.6-2.6 over six seeds, the lowering and the composite "auto" compiles alike). XLA:CPU sums a
    float32 row in order: the composite's three row sums in one piece each left 8-16 ulps here;
    it sums pieces of the row in float32 and the pieces in float64 (reference._row_sum)."""
    with tf_kld.implementation(implementation):
        fn = tf.function(_fn(beta, 1.0), jit_compile=True)
        for noise in (1.0, 0.01):
            t = D.logits(rng, (16, 32000), np.float64)
            p = (t + rng.normal(size=t.shape) * noise).astype(np.float32)
            t = t.astype(np.float32)
            want = D.oracle(t, p, beta, 1.0)
            err = np.abs(fn(tf.constant(t), tf.constant(p)).numpy().astype(np.float64) - want)
            ulps = err / (U.machine_eps(tf.float32) * want)
            assert np.all(ulps <= 6), (noise, float(np.max(ulps)))


@pytest.mark.parametrize("temperature", D.TEMPERATURES)
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("dtype", U.FLOAT_DTYPES, ids=lambda d: d.name)
def test_3d_inputs_every_temperature(custom, dtype, beta, temperature, rng):
    t = tf.cast(D.logits(rng, (3, 2, 33), np.float64), dtype)
    p = tf.cast(D.logits(rng, (3, 2, 33), np.float64), dtype)
    weights = tf.cast(rng.uniform(-2.0, 2.0, (3, 2)), dtype)
    got = _jit_loss_and_grads(_fn(beta, temperature), t, p, weights)
    assert got[0].shape == (3, 2)
    _check(got, t, p, weights, beta, temperature, dtype)


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("dtype", U.FLOAT_DTYPES, ids=lambda d: d.name)
def test_special_values(custom, dtype, beta, rng):
    """-inf (masked classes), huge (1e4) and NaN logits: the oracle's value, NaN and inf in the same
    rows; gradients as the formulas where the loss is finite, exact 0 for masked teacher classes;
    NaN rows give NaN gradients (never a silently finite number)."""
    t, p = D.special_rows()
    t, p = tf.constant(t, dtype), tf.constant(p, dtype)
    weights = tf.cast(rng.uniform(0.5, 2.0, t.shape[0]), dtype)
    got = _jit_loss_and_grads(_fn(beta, 1.0), t, p, weights)
    loss = tf.cast(got[0], tf.float64).numpy()
    finite = np.isfinite(loss)
    assert finite.sum() >= 5
    _check(got, t, p, weights, beta, 1.0, dtype, rows=finite)
    if beta is None:  # the conventions, spelled out
        assert loss[3] == loss[4] == loss[7] == np.inf and np.all(np.isnan(loss[8:13]))
        assert loss[13] == 0
    dt, dp = (tf.cast(g, tf.float64).numpy() for g in got[1])
    if beta != 1.0:  # (beta = 1: KL(q || p) is +inf in row 1)
        assert dt[1, 0] == 0 and dt[1, 3] == 0
    assert np.all(np.isnan(dp[10:12, 1:])), dp[10:12]  # NaN logits: the row's other classes too


@pytest.mark.parametrize("beta", [None, 0.0, 0.3, 1.0])
@pytest.mark.parametrize("shapes", [((2, 3), (3,)), ((4, 1, 3), (5, 3)), ((2, 1), (2, 3)),
                                    ((3,), (2, 3))], ids=lambda s: f"{s[0]}-{s[1]}")
def test_broadcasting(custom, shapes, beta, rng):
    """Broadcast inputs: the loss over the broadcast last axis, gradients summed back to each input's
    shape, equal to the eager fused op's and to the float64 oracle."""
    t, p = D.logits(rng, shapes[0], np.float64), D.logits(rng, shapes[1], np.float64)
    weights = rng.normal(size=np.broadcast_shapes(*shapes)[:-1])
    loss, (dt, dp) = _jit_loss_and_grads(_fn(beta, 2.0), tf.constant(t), tf.constant(p), weights)
    assert dt.shape == shapes[0] and dp.shape == shapes[1]
    D.assert_loss(loss, D.oracle(t, p, beta, 2.0), t, p, 2.0, tf.float64)
    _, (et, ep) = D._grads(_fn(beta, 2.0), t, p, weights)
    np.testing.assert_allclose(dt.numpy(), et.numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(dp.numpy(), ep.numpy(), rtol=1e-12, atol=1e-14)
    want_t, want_p = D.oracle_grads(t, p, weights, beta, 2.0)
    for got, want, shape in ((dt, want_t, shapes[0]), (dp, want_p, shapes[1])):
        np.testing.assert_allclose(got.numpy(), _sum_to(want, shape), rtol=1e-11, atol=1e-13)


def _sum_to(x, shape):
    """A gradient of the broadcast shape summed back to an input's `shape`."""
    x = x.sum(axis=tuple(range(x.ndim - len(shape))))
    return x.sum(axis=tuple(i for i, n in enumerate(shape) if n == 1 and x.shape[i] != 1),
                 keepdims=True)


@pytest.mark.parametrize("beta", [None, 0.5])
@pytest.mark.parametrize("shape", [(3, 0), (2, 0, 4), (0, 5)], ids=str)
@pytest.mark.parametrize("dtype", [tf.bfloat16, tf.float32], ids=lambda d: d.name)
def test_empty(custom, dtype, shape, beta):
    x = tf.zeros(shape, dtype)
    loss, (dt, dp) = _jit_loss_and_grads(_fn(beta, 2.0), x, x, tf.ones(shape[:-1], dtype))
    assert loss.shape == shape[:-1] and dt.shape == dp.shape == shape
    np.testing.assert_array_equal(tf.cast(loss, tf.float32).numpy(), np.zeros(shape[:-1]))


# --------------------------------------------------------------------------------------------
# The lowered ops against the CPU kernels: the same loss and per-row stats


def _op_inputs(rng, dtype):
    t = D.logits(rng, (6, 300), np.float64, 4.0)
    p = D.logits(rng, (6, 300), np.float64, 4.0)
    t[1, ::4] = -np.inf  # masked teacher classes
    t[2, :5], p[2, :5] = -np.inf, -np.inf
    t[3] += 1e4 if dtype != tf.float16 else 6e4  # huge
    p[3] += 1e4 if dtype != tf.float16 else 6e4
    return tf.constant(t, dtype), tf.constant(p, dtype)


@pytest.mark.parametrize("family", ["kl", "jsd"])
@pytest.mark.parametrize("dtype", U.FLOAT_DTYPES, ids=lambda d: d.name)
def test_ops_match_the_cpu_kernels(custom, dtype, family, rng):
    """Forward: the same loss and stats [max_a, log sum_a, max_b, log sum_b, KL(s)] (maxima exact);
    gradient op from the same stats: the same outputs, [0]-shaped where not needed."""
    module = kld_ops._module
    attrs = {"temperature": 1.5, "temperature_f64": "1.5" if dtype == tf.float64 else ""}
    if family == "kl":
        forward, grad_op, k = module.tf_kld_kl_divergence_with_logits, module.tf_kld_kl_divergence_with_logits_grad, 5
    else:
        forward, grad_op, k = (module.tf_kld_generalized_jsd_with_logits,
                               module.tf_kld_generalized_jsd_with_logits_grad, 6)
        attrs.update(beta=0.3, beta_f64="0.3")
    t, p = _op_inputs(rng, dtype)
    g = tf.cast(rng.uniform(0.5, 2.0, 6), dtype)
    xla_loss, xla_stats = tf.function(lambda a, b: forward(a, b, **attrs), jit_compile=True)(t, p)
    cpu_loss, cpu_stats = forward(t, p, **attrs)
    assert xla_stats.shape == cpu_stats.shape == (6, k) and xla_stats.dtype == tf.float64
    xs, cs = xla_stats.numpy(), cpu_stats.numpy()
    np.testing.assert_array_equal(xs[:, [0, 2]], cs[:, [0, 2]])
    ulp = U.machine_eps(tf.float64 if dtype == tf.float64 else tf.float32)
    # log sums: a few ulps of the compute type; the divergences: as the loss, of their magnitude
    np.testing.assert_allclose(xs[:, [1, 3]], cs[:, [1, 3]], rtol=4 * ulp, atol=4 * ulp)
    np.testing.assert_allclose(xs[:, 4:], cs[:, 4:], rtol=64 * ulp, atol=64 * ulp)
    np.testing.assert_allclose(tf.cast(xla_loss, tf.float64).numpy(), tf.cast(cpu_loss, tf.float64).numpy(),
                               rtol=64 * ulp + (U.machine_eps(dtype) if dtype in U.LOW_PRECISION else 0),
                               atol=64 * ulp)
    for need_true, need_pred in ((True, True), (False, True), (True, False)):
        flags = dict(need_y_true=need_true, need_y_pred=need_pred, **attrs)
        xla = tf.function(lambda *x: grad_op(*x, **flags), jit_compile=True)(g, t, p, cpu_stats)
        cpu = grad_op(g, t, p, cpu_stats, **flags)
        for x, c, need in zip(xla, cpu, (need_true, need_pred)):
            assert x.shape == c.shape == (t.shape if need else (0,))
            x64, c64 = tf.cast(x, tf.float64).numpy(), tf.cast(c, tf.float64).numpy()
            U._check_special_positions(x64, c64, "gradient")
            scale = np.abs(tf.cast(g, tf.float64).numpy())[:, None] / 1.5 if need else 0.0
            tol = 64 * ulp * (np.abs(c64) + scale)
            if dtype in U.LOW_PRECISION:
                tol = tol + np.spacing(np.abs(c64).astype(U.np_dtype(dtype))).astype(np.float64)
            U._assert_within(x64, c64, np.broadcast_to(tol, c64.shape), "gradient")


def test_empty_rows_give_the_cpu_kernels_stats(custom):
    module = kld_ops._module
    x = tf.zeros((3, 0))
    for forward in (module.tf_kld_kl_divergence_with_logits,
                    lambda a, b: module.tf_kld_generalized_jsd_with_logits(a, b, beta=0.5)):
        xla = tf.function(forward, jit_compile=True)(x, x)
        for got, want in zip(xla, forward(x, x)):
            np.testing.assert_array_equal(got.numpy(), want.numpy())


def test_lowering_checks_its_inputs(custom):
    """The lowering's own checks (the graph shape functions run first for static shapes, so call
    the ops with shapes only XLA sees): bad attributes fail with the CPU kernels' messages."""
    module = kld_ops._module
    t = tf.zeros((2, 3))
    with pytest.raises(tf.errors.InvalidArgumentError, match="temperature must be a finite number > 0"):
        tf.function(lambda a: module.tf_kld_kl_divergence_with_logits(a, a, temperature=0.0),
                    jit_compile=True)(t)
    with pytest.raises(tf.errors.InvalidArgumentError, match="beta must be in"):
        tf.function(lambda a: module.tf_kld_generalized_jsd_with_logits(a, a, beta=1.0, beta_f64="1.0"),
                    jit_compile=True)(t)


@pytest.mark.parametrize("beta", [None, 0.3])
def test_autoclustering(require_custom, beta, rng):
    """tf.config.optimizer.set_jit(True): the fused ops may now join XLA clusters; same results."""
    t, p = tf.constant(D.logits(rng, (5, 13))), tf.constant(D.logits(rng, (5, 13)))
    weights = tf.constant(rng.uniform(-1.0, 2.0, 5).astype(np.float32))
    tf.config.optimizer.set_jit(True)
    try:
        got = tf.function(lambda a, b, w: D._grads(_fn(beta, 2.0), a, b, w))(t, p, weights)
    finally:
        tf.config.optimizer.set_jit(False)
    _check(got, t, p, weights, beta, 2.0, tf.float32)
