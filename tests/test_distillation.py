"""tf_kld.kl_divergence_with_logits and tf_kld.generalized_jsd_with_logits: values against a float64
NumPy oracle, gradients of both inputs against NumPy's analytic formulas and autodiff of the
composite, the conventions for -inf/huge/NaN logits, argument and input errors, jit_compile.
Every test of the functions runs on both paths."""

import decimal
import math

import numpy as np
import pytest
import tensorflow as tf

import _util as U
import tf_kld
from tf_kld import reference

INF = math.inf
BETAS = (0.0, 0.1, 0.5, 0.9, 1.0)
TEMPERATURES = (0.5, 1.0, 4.0)


# --------------------------------------------------------------------------------------------
# The float64 NumPy oracle (written from the definitions, independently of reference.py)


def np_log_softmax(x, temperature):
    x = np.asarray(x, np.float64) / temperature
    with np.errstate(invalid="ignore"):
        m = np.max(x, axis=-1, keepdims=True) if x.shape[-1] else np.zeros(x.shape[:-1] + (1,))
        return x - (m + np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True)))


def np_kl(lp, lq):
    """sum(p (lp - lq)): 0 where p = 0, +inf where p > 0 and q = 0, NaN propagates."""
    with np.errstate(invalid="ignore", over="ignore"):
        infinite = (lq == -INF) & (lp > -INF)
        use = (lp != -INF) & ~infinite
        term = np.where(use, np.exp(lp) * np.where(use, lp - lq, 0.0), np.where(infinite, INF, 0.0))
    return np.sum(term, axis=-1)


def np_log_mixture(lp, lq, beta):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.logaddexp(np.log(beta) + lp, np.log1p(-beta) + lq)


def oracle(y_true, y_pred, beta=None, temperature=1.0, dtype=tf.float64):
    """The loss in float64 for inputs as `dtype` holds them; beta=None is KL(p || q)."""
    nd = U.np_dtype(dtype)
    t, p = np.broadcast_arrays(np.asarray(y_true).astype(nd).astype(np.float64),
                               np.asarray(y_pred).astype(nd).astype(np.float64))
    lp, lq = np_log_softmax(t, temperature), np_log_softmax(p, temperature)
    if beta is None or beta == 0.0:
        return np_kl(lp, lq)
    if beta == 1.0:
        return np_kl(lq, lp)
    lm = np_log_mixture(lp, lq, beta)
    return beta * np_kl(lp, lm) + (1.0 - beta) * np_kl(lq, lm)


def oracle_grads(y_true, y_pred, weights, beta=None, temperature=1.0):
    """d sum(w * loss) / d(y_true, y_pred) in float64, from DISTILLATION_NOTES.md's formulas."""
    t, p = np.broadcast_arrays(np.asarray(y_true, np.float64), np.asarray(y_pred, np.float64))
    lp, lq = np_log_softmax(t, temperature), np_log_softmax(p, temperature)
    g = np.asarray(weights, np.float64)[..., None] / temperature

    def kl_grads(la, lb):  # d KL(a || b) / d(logits of a), d(logits of b)
        kl = np_kl(la, lb)[..., None]
        pa, pb = np.exp(la), np.exp(lb)
        with np.errstate(invalid="ignore"):
            d_a = np.where(la == -INF, 0.0, pa * ((la - lb) - kl))
        return g * d_a, g * (pb - pa)

    if beta is None or beta == 0.0:
        return kl_grads(lp, lq)
    if beta == 1.0:
        d_q, d_p = kl_grads(lq, lp)
        return d_p, d_q
    lm = np_log_mixture(lp, lq, beta)

    def side(la, weight):
        kl = np_kl(la, lm)[..., None]
        with np.errstate(invalid="ignore"):
            return g * weight * np.where(la == -INF, 0.0, np.exp(la) * ((la - lm) - kl))

    return side(lp, beta), side(lq, 1.0 - beta)


def loss_fn(beta):
    if beta is None:
        return lambda t, p, temperature=1.0: tf_kld.kl_divergence_with_logits(t, p, temperature)
    return lambda t, p, temperature=1.0: tf_kld.generalized_jsd_with_logits(t, p, beta, temperature)


def ref_fn(beta):
    if beta is None:
        return lambda t, p, temperature=1.0: reference.kl_divergence_with_logits(t, p, temperature)
    return lambda t, p, temperature=1.0: reference.generalized_jsd_with_logits(t, p, beta, temperature)


# --------------------------------------------------------------------------------------------
# Tolerances


def magnitude(y_true, y_pred, temperature, dtype):
    """Per row sum((p + q) (1 + |lp| + |lq|)) over finite terms: the scale of the rounding error."""
    nd = U.np_dtype(dtype)
    t, p = np.broadcast_arrays(np.asarray(y_true).astype(nd).astype(np.float64),
                               np.asarray(y_pred).astype(nd).astype(np.float64))
    lp, lq = np_log_softmax(t, temperature), np_log_softmax(p, temperature)
    with np.errstate(invalid="ignore"):
        w = (np.exp(lp) + np.exp(lq)) * (1.0 + np.abs(lp) + np.abs(lq))
    return np.sum(np.where(np.isfinite(w), w, 0.0), axis=-1)


def assert_loss(got, want, y_true, y_pred, temperature, dtype, what="loss"):
    """Same shape and NaN/inf positions; finite values within rtol * (|want| + width * magnitude),
    plus one ulp of the result for float16/bfloat16 (computed in float32, rounded once)."""
    dtype = tf.as_dtype(dtype)
    got = np.asarray(U.to_numpy(got), np.float64)
    want = np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    U._check_special_positions(got, want, what)
    n = np.shape(y_true)[-1] if np.ndim(y_true) else 1
    n = max(n, np.shape(y_pred)[-1] if np.ndim(y_pred) else 1)
    rtol = U.RTOL[reference.compute_dtype(dtype)]
    tol = rtol * (np.abs(want) + max(1.0, math.sqrt(n / 16.0)) * magnitude(
        y_true, y_pred, temperature, dtype))
    if dtype in U.LOW_PRECISION:
        with np.errstate(invalid="ignore"):
            tol = tol + np.spacing(np.abs(want).astype(U.np_dtype(dtype))).astype(np.float64)
    U._assert_within(got, want, np.broadcast_to(tol, want.shape), what)


def logits(rng, shape, dtype=np.float32, scale=3.0):
    return (rng.normal(size=shape) * scale).astype(dtype)


def special_rows(n=6):
    """Teacher/student logit rows with -inf (masked classes), huge (1e4) and NaN logits."""
    r = [
        ([1.0, 2.0, 3.0, 0.5, -1.0, 0.0], [3.0, 2.0, 1.0, 0.0, 0.5, -1.0]),
        ([-INF, 0.0, 1.0, -INF, 2.0, 0.5], [0.0, 1.0, 2.0, 3.0, 0.0, 1.0]),  # masked teacher classes
        ([-INF, 0.0, 1.0, -INF, 2.0, 0.5], [-INF, 1.0, 2.0, -INF, 0.0, 1.0]),  # masked on both
        ([0.0, 1.0, 2.0, 0.0, 0.0, 0.0], [0.0, -INF, 2.0, 0.0, 0.0, 0.0]),  # q = 0 < p: +inf
        ([-INF, 1.0, 2.0, 0.0, 0.0, 0.0], [0.0, -INF, 2.0, 0.0, 0.0, 0.0]),  # KL inf, reverse finite
        ([1e4, -1e4, 0.0, 1e4, 5.0, -5.0], [-1e4, 1e4, 0.0, 1e4, 0.0, 0.0]),  # huge
        ([1e4, 9999.0, 0.0, 0.0, 0.0, 0.0], [1e4, 1e4, 1e4, 0.0, 0.0, 0.0]),  # huge, close
        ([-1e4, 0.0, 0.0, 0.0, 0.0, 0.0], [-INF, 0.0, 0.0, 0.0, 0.0, 0.0]),  # p underflows, q = 0
        ([-INF] * 6, [0.0, 1.0, 2.0, 0.0, 0.0, 0.0]),  # all -inf teacher: NaN
        ([0.0, 1.0, 2.0, 0.0, 0.0, 0.0], [-INF] * 6),  # all -inf student: NaN
        ([np.nan, 1.0, 2.0, 0.0, 0.0, 0.0], [0.0, 1.0, 2.0, 0.0, 0.0, 0.0]),  # NaN teacher
        ([0.0, 1.0, 2.0, 0.0, 0.0, 0.0], [0.0, 1.0, np.nan, 0.0, 0.0, 0.0]),  # NaN student
        ([-INF, 1.0, 2.0, 0.0, 0.0, 0.0], [np.nan, 1.0, 2.0, 0.0, 0.0, 0.0]),  # NaN under a mask
        ([5.0] * 6, [5.0] * 6),  # equal: 0
    ]
    t = np.array([a[:n] for a, _ in r])
    p = np.array([b[:n] for _, b in r])
    return t, p


# --------------------------------------------------------------------------------------------
# Values


def test_documented_values(impl):
    got = tf_kld.kl_divergence_with_logits([[1.0, 2.0, 3.0]], [[3.0, 2.0, 1.0]]).numpy()
    np.testing.assert_allclose(got, [1.1504207], rtol=1e-6)
    # Equal logits, and logits that differ by a constant, give the same distribution: 0.
    x = np.array([[0.3, -1.0, 2.0]], np.float32)
    np.testing.assert_allclose(tf_kld.kl_divergence_with_logits(x, x + 7.0).numpy(), [0.0], atol=1e-6)
    # JSD(beta = 0.5) of two disjoint point masses is log 2.
    jsd = tf_kld.generalized_jsd_with_logits([[0.0, -INF]], [[-INF, 0.0]]).numpy()
    np.testing.assert_allclose(jsd, [math.log(2.0)], rtol=1e-6)


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("shape", [(5, 1), (4, 7), (3, 33), (2, 3, 7), (3, 2, 33)], ids=str)
@pytest.mark.parametrize("dtype", [tf.float32, tf.float64], ids=lambda d: d.name)
def test_kl_values(impl, dtype, shape, temperature, rng):
    t, p = logits(rng, shape, U.np_dtype(dtype)), logits(rng, shape, U.np_dtype(dtype))
    got = tf_kld.kl_divergence_with_logits(t, p, temperature)
    assert got.dtype == dtype and got.shape == shape[:-1]
    assert_loss(got, oracle(t, p, None, temperature, dtype), t, p, temperature, dtype)


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("shape", [(5, 1), (4, 7), (3, 33), (2, 3, 7)], ids=str)
@pytest.mark.parametrize("dtype", [tf.float32, tf.float64], ids=lambda d: d.name)
def test_jsd_values(impl, dtype, shape, beta, temperature, rng):
    t, p = logits(rng, shape, U.np_dtype(dtype)), logits(rng, shape, U.np_dtype(dtype))
    got = tf_kld.generalized_jsd_with_logits(t, p, beta, temperature)
    assert got.dtype == dtype and got.shape == shape[:-1]
    assert_loss(got, oracle(t, p, beta, temperature, dtype), t, p, temperature, dtype)


def test_jsd_ends_are_the_kls(impl, rng):
    """beta = 0 is KL(p || q), beta = 1 is KL(q || p) (TRL's convention), both exactly."""
    t, p = logits(rng, (4, 9)), logits(rng, (4, 9))
    kl = tf_kld.kl_divergence_with_logits(t, p).numpy()
    reverse = tf_kld.kl_divergence_with_logits(p, t).numpy()
    np.testing.assert_array_equal(tf_kld.generalized_jsd_with_logits(t, p, 0.0).numpy(), kl)
    np.testing.assert_array_equal(tf_kld.generalized_jsd_with_logits(t, p, 1.0).numpy(), reverse)
    # Near the ends the formula itself tends to 0, not to the KLs.
    assert np.all(tf_kld.generalized_jsd_with_logits(t, p, 1e-6).numpy() < 1e-4)


def decimal_jsd(y_true, y_pred, beta):
    """The generalized JSD of float64 logit rows (T = 1) in 80-digit decimal arithmetic: exact
    wherever float64's log-sum-exp of lm is not (near beta = 0 or 1 the JSD is O(beta) or
    O(1 - beta) against O(1) terms)."""
    with decimal.localcontext() as ctx:
        ctx.prec = 80
        b = decimal.Decimal(float(beta))
        out = []
        for t, p in zip(np.asarray(y_true, np.float64), np.asarray(y_pred, np.float64)):
            a, c = [decimal.Decimal(float(x)) for x in t], [decimal.Decimal(float(x)) for x in p]
            la = sum((x - max(a)).exp() for x in a).ln() + max(a)
            lc = sum((x - max(c)).exp() for x in c).ln() + max(c)
            total = decimal.Decimal(0)
            for x, y in zip(a, c):
                lp, lq = x - la, y - lc
                lm = (b * lp.exp() + (1 - b) * lq.exp()).ln()
                total += b * lp.exp() * (lp - lm) + (1 - b) * lq.exp() * (lq - lm)
            out.append(float(total))
        return np.array(out)


@pytest.mark.parametrize("beta", [1e-30, 1e-6, 0.1, 0.5, 0.9, 1.0 - 2.0 ** -30, 1.0 - 1e-16],
                         ids=repr)
def test_composite_jsd_series(beta):
    """The composite's class term over p where |d| <= 1, beta (1 - beta) d^2 K(d), against
    J(d) = (1 - beta) d e^d - u log u (u = beta + (1 - beta) e^d) in 80-digit decimals: K's
    coefficients (float64, evaluated in float64) within 2 float64 ulps of J, and those kept for
    float32 (fewer) within half a float32 ulp (the series is the JSD's exact form; a wrong
    coefficient, or one too few, fails). The kernels take the same coefficients."""
    with decimal.localcontext() as ctx:
        ctx.prec = 80
        b = decimal.Decimal(beta)
        for dtype, bound in ((np.float64, 2.0), (np.float32, 0.5)):
            k = reference._jsd_series(beta)[:reference._SERIES_TERMS[tf.as_dtype(dtype)]]
            for d in np.linspace(-1.0, 1.0, 81):
                if d == 0.0:
                    continue
                e = decimal.Decimal(d).exp()
                u = b + (1 - b) * e
                j = ((1 - b) * decimal.Decimal(d) * e - u * u.ln()) / (b * (1 - b))
                got = 0.0
                for x in reversed(k):  # Horner's rule in float64, as the composite's
                    got = got * d + x
                got *= d * d
                ulps = abs(got - float(j)) / (float(j) * np.finfo(dtype).eps)
                assert ulps <= bound, (dtype.__name__, d, ulps)


@pytest.mark.parametrize("beta", [1e-30, 1.0 - 2.0 ** -30, 1.0 - 1e-12], ids=repr)
@pytest.mark.parametrize("dtype", [tf.float32, tf.float64], ids=lambda d: d.name)
def test_jsd_near_the_ends_of_beta(impl, dtype, beta, rng):
    """Near beta = 0 or 1 the JSD is O(beta) or O(1 - beta) while its terms are O(1): within 2e-7
    (float32) or 1e-13 (float64) of itself, eagerly and under jit_compile, against 80-digit
    decimal arithmetic (float64's log-sum-exp of lm loses the whole JSD at beta = 1e-30)."""
    t, p = logits(rng, (4, 33), U.np_dtype(dtype)), logits(rng, (4, 33), U.np_dtype(dtype))
    want = decimal_jsd(t, p, beta)
    rtol = 2e-7 if dtype == tf.float32 else 1e-13
    for fn in (loss_fn(beta), tf.function(loss_fn(beta), jit_compile=True)):
        got = U.to_numpy(fn(tf.constant(t), tf.constant(p))).astype(np.float64)
        np.testing.assert_allclose(got, want, rtol=rtol, atol=0.0)


@pytest.mark.parametrize("beta", [None, 0.5])
@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16], ids=lambda d: d.name)
def test_wide_rows(impl, dtype, beta, rng):
    """A language-model vocabulary: 32003 classes (not a multiple of any vector width)."""
    t = logits(rng, (3, 32003), np.float32, scale=4.0)
    p = logits(rng, (3, 32003), np.float32, scale=4.0)
    t[0, ::5] = -INF  # a masked block of the vocabulary
    t16, p16 = (tf.cast(x, dtype) for x in (t, p))
    got = loss_fn(beta)(t16, p16, 2.0)
    assert got.dtype == dtype
    tn, pn = t16.numpy().astype(np.float64), p16.numpy().astype(np.float64)
    assert_loss(got, oracle(tn, pn, beta, 2.0), tn, pn, 2.0, dtype)


@pytest.mark.parametrize("temperature", [1.0, 3.0])
@pytest.mark.parametrize("beta", [None, 0.5, 1.0])
@pytest.mark.parametrize("width", [7, 33, 32003], ids=lambda w: f"width{w}")
def test_offset_logits_as_accurate_as_the_composite(impl, width, beta, temperature, rng):
    """A constant added to one side's logits changes neither softmax; the float32 loss stays as
    accurate as the log-softmax composite's (it once lost three decimal digits at an offset of
    1e4, the cross term rounding x_t - x_s to the offset's magnitude): within twice the
    composite's error against float64, plus a few ulps of the loss."""
    for offset in (1e3, 1e4, -1e4):
        for shifted in ("t", "p"):
            t, p = logits(rng, (16, width), np.float64), logits(rng, (16, width), np.float64)
            if shifted == "t":
                t += offset
            else:
                p += offset
            t, p = t.astype(np.float32), p.astype(np.float32)
            want = oracle(t, p, beta, temperature)
            got = loss_fn(beta)(t, p, temperature).numpy().astype(np.float64)
            with tf_kld.implementation("reference"):
                composite = loss_fn(beta)(t, p, temperature).numpy().astype(np.float64)
            floor = 8 * U.machine_eps(tf.float32) * (1.0 + np.abs(want))
            err, err_composite = np.abs(got - want), np.abs(composite - want)
            assert np.all(err <= 2 * err_composite + floor), (
                offset, shifted, float(np.max(err)), float(np.max(err_composite)))


def assert_jsd_of_close_distributions(fn, width, beta, temperature, rng):
    """A student close to its teacher (logits plus noise of 1 and of 0.01): the JSD is O(d^2)
    (d = lq - lp) while its terms p (lp - lm), q (lq - lm) are O(d), so its float32 error must
    scale with those terms, not with the loss's own size nor with |lm|: within 2 float32 ulps of
    the row's sum of beta p |lp - lm| + (1 - beta) q |lq - lm|, each times 1 + |lp| + |lq| (the
    rounding of lp and lq). lp - lm taken with lm rounded to float (as TensorFlow's log-sum-exp
    gives it, and the kernels once did) put ulps of |lm| into every term: 10 to 1000 times this
    bound at a noise of 0.01."""
    for noise in (1.0, 0.01):
        t = logits(rng, (64, width), np.float64)
        t, p = t.astype(np.float32), (t + rng.normal(size=t.shape) * noise).astype(np.float32)
        want = oracle(t, p, beta, temperature)
        bound = jsd_error_bound(t, p, beta, temperature)
        err = np.abs(U.to_numpy(fn(t, p)).astype(np.float64) - want)
        assert np.all(err <= bound), (noise, float(np.max(err / bound)))


def jsd_error_bound(y_true, y_pred, beta, temperature):
    """Per row: 2 float32 ulps of sum(beta p |lp - lm| + (1 - beta) q |lq - lm|) (1 + |lp| + |lq|)."""
    lp = np_log_softmax(np.asarray(y_true, np.float64), temperature)
    lq = np_log_softmax(np.asarray(y_pred, np.float64), temperature)
    lm = np_log_mixture(lp, lq, beta)
    terms = beta * np.exp(lp) * np.abs(lp - lm) + (1.0 - beta) * np.exp(lq) * np.abs(lq - lm)
    return 2 * U.machine_eps(tf.float32) * np.sum(terms * (1.0 + np.abs(lp) + np.abs(lq)), -1)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("width", [10, 33, 4099], ids=lambda w: f"width{w}")
def test_jsd_of_close_distributions(impl, width, beta, temperature, rng):
    assert_jsd_of_close_distributions(lambda t, p: loss_fn(beta)(t, p, temperature), width, beta,
                                      temperature, rng)


def assert_jsd_to_ulps_of_itself(fn, width, beta, temperature, rng):
    """The JSD within 16 float32 ulps of itself for a student close to its teacher (logits plus
    noise of 1 and 0.01, also offset by 1e4): its terms cancel nothing (p beta (1 - beta) d^2 K(d),
    K by its series, where |d| <= 1), and d = lq - lp comes from the logits' exact
    difference. Sums of p (lp - lm) carried the rounding of every O(d) term and of lp itself into
    the O(d^2) result: 70-1000 ulps here at a noise of 0.01."""
    for noise in (1.0, 0.01):
        for offset in (0.0, 1e4):
            t = logits(rng, (32, width), np.float64)
            t, p = t.astype(np.float32), (t + rng.normal(size=t.shape) * noise + offset).astype(np.float32)
            want = oracle(t, p, beta, temperature)
            err = np.abs(U.to_numpy(fn(t, p)).astype(np.float64) - want)
            ulps = err / (U.machine_eps(tf.float32) * np.abs(want))
            assert np.all(ulps <= 16), (noise, offset, float(np.max(ulps)))


@pytest.mark.parametrize("temperature", [1.0, 3.0])
@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("width", [10, 33, 4099], ids=lambda w: f"width{w}")
def test_jsd_to_ulps_of_itself(impl, width, beta, temperature, rng):
    assert_jsd_to_ulps_of_itself(lambda t, p: loss_fn(beta)(t, p, temperature), width, beta,
                                 temperature, rng)


def assert_kl_of_a_vocabulary(fn, bound, rng):
    """The KL at 32000 classes (64 rows, T = 2, a student's noise of 0.25 on its logits) within
    `bound` float32 eps of itself, averaged over the rows. Its log-sum form leaves the error of the
    rows' log-sums' difference, which must not grow with the row: float factors moving running sums
    to new maxima, lp - lq from rounded log-probabilities or float32 log-sums all did."""
    t = logits(rng, (64, 32000), np.float64)
    p = (t + rng.normal(size=t.shape) * 0.25).astype(np.float32)
    t = t.astype(np.float32)
    want = oracle(t, p, None, 2.0)
    got = U.to_numpy(fn(tf.constant(t), tf.constant(p))).astype(np.float64)
    eps = np.mean(np.abs(got - want) / (U.machine_eps(tf.float32) * want))
    assert eps <= bound, eps


def test_kl_of_a_vocabulary_to_ulps_of_itself(impl, rng):
    """Within 6 eps on the fused op (1.7-2.4 over six seeds; 11-14 when a float exp's factor moved
    its running sums to each new maximum) and 10 on the composite (4.5-5.6, its row sums in float32
    pieces; 168-189 with lp - lq from tf.nn.log_softmax)."""
    assert_kl_of_a_vocabulary(lambda t, p: tf_kld.kl_divergence_with_logits(t, p, 2.0),
                              6 if impl == "custom" else 10, rng)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("width", [2, 4099], ids=lambda w: f"width{w}")
def test_jsd_at_the_series_bound(impl, width, beta, rng):
    """Rows whose JSD is almost all one class at |d| = 0.9 to 0.99 (the series' bound is 1):
    classes 0 and 1 live (logits 0 and u = -2 to -4, the student's 0 and u + delta with delta
    solved for d), the rest -inf in both. Within 4 float32 ulps of float64 on both paths (1.7-3.2
    on the three builds and the composite): the series must keep its coefficients there (with 8
    of the 12, the kernels and the composite were 3.4-23 ulps off, failing 11 of 12 cases)."""
    rows = 64
    t = np.full((rows, width), -np.inf)
    t[:, 0], t[:, 1] = 0.0, rng.uniform(-4.0, -2.0, rows)
    p = t.copy()
    d = rng.choice([-1.0, 1.0], rows) * rng.uniform(0.9, 0.99, rows)
    p1 = 1.0 / (1.0 + np.exp(-t[:, 1]))  # d = delta - log(1 - p1 + p1 e^delta), solved for delta
    p[:, 1] += np.log((1.0 - p1) / (np.exp(-d) - p1))
    t, p = t.astype(np.float32), p.astype(np.float32)
    lp, lq = np_log_softmax(t.astype(np.float64), 1.0), np_log_softmax(p.astype(np.float64), 1.0)
    d = np.abs(lq[:, 1] - lp[:, 1])
    assert np.all((d > 0.85) & (d < 1.0)), d  # the case is what it says
    want = oracle(t, p, beta)
    got = U.to_numpy(loss_fn(beta)(t, p)).astype(np.float64)
    ulps = np.abs(got - want) / (U.machine_eps(tf.float32) * want)
    assert np.all(ulps <= 4), float(np.max(ulps))


@pytest.mark.parametrize("beta", [None, 0.5])
@pytest.mark.parametrize("width", [7, 33, 32003], ids=lambda w: f"width{w}")
def test_exact_distances_at_any_temperature(require_custom, width, beta, rng):
    """float32 rows take their maxima of the raw logits and the exps of (x - max) / T, so at a
    temperature that is no power of two (3) logits offset by 1e4 lose nothing to rounding x / T at
    their magnitude: the loss and both gradients within 8 ulps of their largest value against
    float64, the op's and the composite's (a KL composite that divides first, as
    tf.nn.log_softmax(x / T) does, is 18-990 ulps off; the kernels that divided first were as far)."""
    t = logits(rng, (16, width), np.float64) + 1e4
    p = logits(rng, (16, width), np.float64) - 1e4
    t, p = t.astype(np.float32), p.astype(np.float32)
    w = rng.uniform(0.5, 2.0, 16)
    want = [oracle(t, p, beta, 3.0)] + list(oracle_grads(t, p, w, beta, 3.0))
    fn = lambda a, b: loss_fn(beta)(a, b, 3.0)  # noqa: E731
    for implementation in ("custom", "reference"):
        with tf_kld.implementation(implementation):
            got, got_grads = _grads(fn, t, p, w)
        for what, x, y in zip(("loss", "d/dt", "d/dp"), [got] + list(got_grads), want):
            ulps = np.max(np.abs(x.numpy().astype(np.float64) - y)) / (
                np.max(np.abs(y)) * U.machine_eps(tf.float32))
            assert ulps <= 8, (implementation, what, ulps)


@pytest.mark.parametrize("beta", (None,) + BETAS)
@pytest.mark.parametrize("dtype", U.FLOAT_DTYPES, ids=lambda d: d.name)
def test_special_values(impl, dtype, beta):
    t, p = special_rows()
    t, p = t.astype(U.np_dtype(dtype)), p.astype(U.np_dtype(dtype))
    got = loss_fn(beta)(t, p)
    want = oracle(t, p, beta, 1.0, dtype)
    assert_loss(got, want, t, p, 1.0, dtype)
    if beta is None:  # the conventions, spelled out
        got = got.numpy().astype(np.float64)
        assert got[1] > 0 and np.isfinite(got[1]) and np.isfinite(got[2])
        assert got[3] == INF and got[4] == INF and got[7] == INF
        assert np.isfinite(got[5]) and np.isfinite(got[6])
        assert np.all(np.isnan(got[8:13])) and got[13] == 0


@pytest.mark.parametrize("width", [1, 6, 16, 17, 32], ids=lambda w: f"width{w}")
@pytest.mark.parametrize("dtype", [tf.float32, tf.float16, tf.bfloat16], ids=lambda d: d.name)
def test_many_narrow_rows(impl, dtype, width, rng):
    """Rows of up to 32 classes go a SIMD register of rows at a time: 45 rows (not a multiple of any
    register's rows) with the special rows repeated among random ones, values and both gradients
    against the oracle, and each row's loss the same bits whichever rows come before it."""
    special_t, special_p = special_rows(min(width, 6))
    fill = lambda rows: logits(rng, (rows, width - special_t.shape[1]), np.float64)  # noqa: E731
    t = np.concatenate([np.hstack([special_t, fill(len(special_t))]), logits(rng, (31, width), np.float64)])
    p = np.concatenate([np.hstack([special_p, fill(len(special_p))]), logits(rng, (31, width), np.float64)])
    order = rng.permutation(len(t))
    t, p = t[order].astype(U.np_dtype(dtype)), p[order].astype(U.np_dtype(dtype))
    weights = rng.uniform(0.5, 2.0, size=len(t))
    loss, (dt, dp) = _grads(lambda a, b: tf_kld.kl_divergence_with_logits(a, b, 0.5), t, p, weights)
    assert_loss(loss, oracle(t, p, None, 0.5, dtype), t, p, 0.5, dtype)
    finite = np.isfinite(tf.cast(loss, tf.float64).numpy())
    tn, pn = t.astype(np.float64), p.astype(np.float64)
    nt, npred = oracle_grads(tn, pn, weights, None, 0.5)
    to64 = lambda x: tf.cast(x, tf.float64).numpy()[finite]  # noqa: E731
    rtol = {tf.float32: 1e-5}.get(dtype, 2e-2)
    assert_grad(to64(dt), nt[finite], weights[finite], 0.5, "d/dy_true", rtol=rtol)
    assert_grad(to64(dp), npred[finite], weights[finite], 0.5, "d/dy_pred", rtol=rtol)
    shifted = tf_kld.kl_divergence_with_logits(t[3:], p[3:], 0.5)
    np.testing.assert_array_equal(tf.cast(shifted, tf.float32).numpy(),
                                  tf.cast(loss, tf.float32).numpy()[3:])


@pytest.mark.parametrize("beta", [None, 0.5])
@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16], ids=lambda d: d.name)
def test_narrow_rows_in_many_blocks(impl, dtype, beta, rng):
    """Thousands of narrow rows (the ops' blocks of rows and their threads' shards, the last SIMD
    block partial) with the special rows scattered among them: the oracle's values, row by row."""
    special_t, special_p = special_rows(6)
    t, p = logits(rng, (2053, 10), np.float64), logits(rng, (2053, 10), np.float64)
    at = rng.choice(np.arange(1, 2052), size=len(special_t), replace=False)
    at[-1] = 2052  # a special row last
    t[at, :6], p[at, :6] = special_t, special_p
    t, p = t.astype(U.np_dtype(dtype)), p.astype(U.np_dtype(dtype))
    got = loss_fn(beta)(t, p, 2.0)
    assert_loss(got, oracle(t, p, beta, 2.0, dtype), t, p, 2.0, dtype)


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("dtype", U.LOW_PRECISION, ids=lambda d: d.name)
def test_low_precision(impl, dtype, temperature, rng):
    """float16/bfloat16 computed in float32 and rounded once: the oracle of the 16-bit inputs."""
    t = logits(rng, (4, 3, 40)).astype(U.np_dtype(dtype))
    p = logits(rng, (4, 3, 40)).astype(U.np_dtype(dtype))
    for beta in (None, 0.3):
        got = loss_fn(beta)(t, p, temperature)
        assert got.dtype == dtype
        assert_loss(got, oracle(t, p, beta, temperature, dtype), t, p, temperature, dtype)


@pytest.mark.parametrize("beta", [None, 0.5])
@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 5), (2, 0, 4)], ids=str)
def test_empty(impl, shape, beta):
    x = np.zeros(shape, np.float32)
    got = loss_fn(beta)(x, x).numpy()
    assert got.shape == shape[:-1]
    np.testing.assert_array_equal(got, np.zeros(shape[:-1]))


@pytest.mark.parametrize("beta", [None, 0.3])
@pytest.mark.parametrize("shapes", [((2, 3), (3,)), ((4, 1, 3), (5, 3)), ((2, 1), (2, 3)),
                                    ((3,), (2, 3))], ids=lambda s: f"{s[0]}-{s[1]}")
def test_broadcasting(impl, shapes, beta, rng):
    """The softmax runs over the broadcast last axis (a width-1 row broadcasts to uniform)."""
    t, p = logits(rng, shapes[0], np.float64), logits(rng, shapes[1], np.float64)
    got = loss_fn(beta)(t, p, 2.0)
    assert got.shape == np.broadcast_shapes(*shapes)[:-1]
    assert_loss(got, oracle(t, p, beta, 2.0), t, p, 2.0, tf.float64)


def test_mixed_input_types(impl):
    """y_true is cast to y_pred's dtype (lists, ints, float64 arrays), as kl_divergence does."""
    want = tf_kld.kl_divergence_with_logits(tf.constant([[1.0, 2.0, 3.0]]), tf.constant([[3.0, 2.0, 1.0]]))
    for y_true in ([[1, 2, 3]], np.array([[1.0, 2.0, 3.0]]), tf.constant([[1, 2, 3]])):
        got = tf_kld.kl_divergence_with_logits(y_true, tf.constant([[3.0, 2.0, 1.0]]))
        assert got.dtype == tf.float32
        np.testing.assert_array_equal(got.numpy(), want.numpy())


# --------------------------------------------------------------------------------------------
# Gradients


def _grads(fn, t, p, weights, wrt=("t", "p")):
    t, p = tf.convert_to_tensor(t), tf.convert_to_tensor(p)
    with tf.GradientTape() as tape:
        for name, x in (("t", t), ("p", p)):
            if name in wrt:
                tape.watch(x)
        loss = fn(t, p)
        total = tf.reduce_sum(loss * tf.cast(weights, loss.dtype))
    return loss, tape.gradient(total, [{"t": t, "p": p}[name] for name in wrt])


def assert_grad(got, want, weights, temperature, what, rtol=1e-12):
    """|got - want| <= rtol * (|want| + |g| / T); same NaN/inf positions."""
    got = np.asarray(U.to_numpy(got), np.float64)
    want = np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{what}: {got.shape} != {want.shape}"
    U._check_special_positions(got, want, what)
    scale = np.abs(np.asarray(weights, np.float64))[..., None] / temperature
    U._assert_within(got, want, np.broadcast_to(rtol * (np.abs(want) + scale), want.shape), what)


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("beta", (None,) + BETAS)
def test_gradients_of_both_inputs(impl, beta, temperature, rng):
    """float64: the path's gradients == NumPy's analytic formulas == autodiff of the composite."""
    t, p = logits(rng, (3, 2, 11), np.float64), logits(rng, (3, 2, 11), np.float64)
    weights = rng.normal(size=(3, 2))
    fn = lambda a, b: loss_fn(beta)(a, b, temperature)  # noqa: E731
    ref = lambda a, b: ref_fn(beta)(a, b, temperature)  # noqa: E731
    _, (dt, dp) = _grads(fn, t, p, weights)
    _, (rt, rp) = _grads(ref, t, p, weights)
    nt, npred = oracle_grads(t, p, weights, beta, temperature)
    assert np.abs(nt).max() > 1e-3 and np.abs(npred).max() > 1e-3
    assert_grad(rt, nt, weights, temperature, "composite d/dy_true vs NumPy")
    assert_grad(rp, npred, weights, temperature, "composite d/dy_pred vs NumPy")
    assert_grad(dt, nt, weights, temperature, "d/dy_true vs NumPy")
    assert_grad(dp, npred, weights, temperature, "d/dy_pred vs NumPy")


@pytest.mark.parametrize("beta", [None, 0.0, 0.3, 1.0])
def test_numeric_gradient(impl, beta, rng):
    """tf.test.compute_gradient in float64: the path's gradient vs central differences."""
    t, p = logits(rng, (3, 5), np.float64, 1.0), logits(rng, (3, 5), np.float64, 1.0)
    weights = tf.constant(rng.uniform(-2.0, 2.0, size=(3,)))
    theoretical, numerical = tf.test.compute_gradient(
        lambda a, b: loss_fn(beta)(a, b, 1.5) * weights, [t, p], delta=1e-6)
    for name, th, nu in zip("tp", theoretical, numerical):
        assert np.abs(th).max() > 1e-2
        np.testing.assert_allclose(th, nu, rtol=1e-6, atol=1e-8, err_msg=f"d/d{name}")


@pytest.mark.parametrize("beta", (None,) + BETAS)
def test_gradients_with_special_values(impl, beta, rng):
    """Masked (-inf) classes get exact 0 gradients, never NaN; huge logits stay finite; the rest
    matches the NumPy formulas (rows whose loss is +inf or NaN have no meaningful gradient)."""
    t, p = special_rows()
    weights = rng.uniform(0.5, 2.0, size=t.shape[0])
    loss, (dt, dp) = _grads(loss_fn(beta), t, p, weights)
    nt, npred = oracle_grads(t, p, weights, beta)
    finite = np.isfinite(loss.numpy())
    assert finite.sum() >= 5
    assert_grad(dt.numpy()[finite], nt[finite], weights[finite], 1.0, "d/dy_true")
    assert_grad(dp.numpy()[finite], npred[finite], weights[finite], 1.0, "d/dy_pred")
    masked_t, masked_both = dt.numpy()[1], (dt.numpy()[2], dp.numpy()[2])
    if finite[1]:  # (with beta = 1, KL(q || p) is +inf there: q > 0 where p = 0)
        assert masked_t[0] == 0 and masked_t[3] == 0
    if beta not in (0.0, 1.0, None):  # the mixture's gradient reaches both inputs everywhere
        assert masked_both[0][0] == masked_both[1][0] == 0


@pytest.mark.parametrize("beta", [None, 0.5, 1.0])
@pytest.mark.parametrize("dtype", [tf.float32, tf.float16, tf.bfloat16], ids=lambda d: d.name)
def test_gradients_in_float32_compute(impl, dtype, beta, rng):
    """float32/float16/bfloat16 (computed in float32): both gradients vs the float64 formulas of
    the inputs as the dtype holds them, with masked classes and huge logits. Each term of the
    gradient carries a few float32 ulps relative to g/T * (q + p (1 + |lp| + |lq| + |KL|))."""
    nd = U.np_dtype(dtype)
    t, p = logits(rng, (5, 37), np.float64, 3.0), logits(rng, (5, 37), np.float64, 3.0)
    t[1, ::3] = -INF
    t[2, :4], p[2, :4] = -INF, -INF
    t[3] += 1e4 if dtype != tf.float16 else 6e4
    p[3] += 1e4 if dtype != tf.float16 else 6e4
    t, p = t.astype(nd), p.astype(nd)
    weights = rng.uniform(0.5, 2.0, size=5).astype(nd)
    temperature = 2.0
    loss, (dt, dp) = _grads(lambda a, b: loss_fn(beta)(a, b, temperature), t, p, weights)
    assert dt.dtype == dp.dtype == dtype
    t64, p64, w64 = (x.astype(np.float64) for x in (t, p, weights))
    finite = np.isfinite(tf.cast(loss, tf.float64).numpy())  # beta = 1: masked rows are +inf
    assert finite.sum() >= 3
    assert_grads_float32_compute((dt, dp), t64, p64, w64, beta, temperature, dtype, finite)
    if beta != 1.0:
        assert np.all(tf.cast(dt, tf.float64).numpy()[1, ::3] == 0)  # masked teacher classes


def assert_grads_float32_compute(got, t64, p64, w64, beta, temperature, dtype, rows=Ellipsis):
    """(d/dy_true, d/dy_pred) of inputs t64/p64 (float64 arrays of values `dtype` holds), computed in
    float32, vs the float64 formulas on `rows`: each term carries a few float32 ulps relative to
    g/T * (q + p (1 + |lp| + |lq| + |KL|)), plus one ulp of a 16-bit output."""
    nd = U.np_dtype(dtype)
    nt, npred = oracle_grads(t64, p64, w64, beta, temperature)
    lp, lq = np_log_softmax(t64, temperature), np_log_softmax(p64, temperature)
    kl = np.abs(oracle(t64, p64, beta, temperature))[..., None]
    with np.errstate(invalid="ignore"):
        size = (np.exp(lq) + np.exp(lp) * (1 + np.nan_to_num(np.abs(lp) + np.abs(lq), posinf=0) + kl))
        size = np.maximum(size, np.exp(lq) * (1 + np.nan_to_num(np.abs(lp) + np.abs(lq), posinf=0) + kl))
    scale = np.abs(w64)[..., None] / temperature * (1 + size)
    for g, want, name in ((got[0], nt, "d/dy_true"), (got[1], npred, "d/dy_pred")):
        g = tf.cast(g, tf.float64).numpy()[rows]
        want = want.astype(nd).astype(np.float64)[rows]  # rounded to the output dtype
        U._check_special_positions(g, want, name)
        tol = 8 * U.machine_eps(tf.float32) * scale[rows]
        if dtype in U.LOW_PRECISION:
            tol = tol + np.spacing(np.abs(want).astype(nd)).astype(np.float64)
        U._assert_within(g, want, tol, f"{name} ({dtype.name})")


def test_second_order(impl, rng):
    """Second-order gradients (a Hessian-vector product) agree with the composite's."""
    t, p = logits(rng, (2, 6), np.float64, 1.0), logits(rng, (2, 6), np.float64, 1.0)
    v = rng.normal(size=(2, 6))

    def hvp(fn):
        a, b = tf.constant(t), tf.constant(p)
        with tf.GradientTape(persistent=True) as outer:
            outer.watch([a, b])
            with tf.GradientTape() as inner:
                inner.watch([a, b])
                loss = tf.reduce_sum(fn(a, b, 2.0))
            da, db = inner.gradient(loss, [a, b])
            dots = tf.reduce_sum(da * v) + tf.reduce_sum(db * v)
        return outer.gradient(dots, [a, b])

    for beta in (None, 0.4):
        for got, want in zip(hvp(loss_fn(beta)), hvp(ref_fn(beta))):
            np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shapes", [((2, 3), (3,)), ((2, 1), (2, 3))], ids=lambda s: f"{s[0]}-{s[1]}")
def test_broadcast_gradients_reduce_to_input_shapes(impl, shapes, rng):
    t, p = logits(rng, shapes[0], np.float64), logits(rng, shapes[1], np.float64)
    weights = rng.normal(size=np.broadcast_shapes(*shapes)[:-1])
    for beta in (None, 0.5):
        _, (dt, dp) = _grads(loss_fn(beta), t, p, weights)
        _, (rt, rp) = _grads(ref_fn(beta), t, p, weights)
        assert dt.shape == shapes[0] and dp.shape == shapes[1]
        np.testing.assert_allclose(dt.numpy(), rt.numpy(), rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(dp.numpy(), rp.numpy(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", U.FLOAT_DTYPES, ids=lambda d: d.name)
def test_jit_compile(impl, dtype, rng):
    """Forward and both gradients under jit_compile, equal to the eager composite's."""
    t = tf.constant(logits(rng, (4, 19)), dtype)
    p = tf.constant(logits(rng, (4, 19)), dtype)
    weights = tf.cast(tf.linspace(-1.0, 2.0, 4), dtype)

    def run(beta):
        loss, grads = _grads(lambda a, b: loss_fn(beta)(a, b, 2.0), t, p, weights)
        return [loss] + grads

    for beta in (None, 0.5):
        got = tf.function(lambda: run(beta), jit_compile=True)()
        with tf_kld.implementation("reference"):
            want = run(beta)
        tol = 2e-2 if dtype in U.LOW_PRECISION else (1e-5 if dtype == tf.float32 else 1e-12)
        for g, w in zip(got, want):
            assert g.dtype == dtype
            np.testing.assert_allclose(tf.cast(g, tf.float64).numpy(), tf.cast(w, tf.float64).numpy(),
                                       rtol=tol, atol=tol)


# --------------------------------------------------------------------------------------------
# Errors


BAD_TEMPERATURES = [0.0, -1.0, math.nan, math.inf, -math.inf, np.float32(0.0)]
BAD_BETAS = [-0.1, 1.1, math.nan, math.inf, np.float64(-1e-9)]


def _no_ops_built(call):
    """Runs `call` (which must raise) in a fresh graph; returns the exception and the op count."""
    graph = tf.Graph()
    with graph.as_default(), pytest.raises(Exception) as info:
        call()
    return info.value, len(graph.get_operations())


@pytest.mark.parametrize("value", BAD_TEMPERATURES, ids=repr)
def test_bad_temperature(impl, value):
    calls = [lambda: tf_kld.kl_divergence_with_logits([[1.0, 2.0]], [[2.0, 1.0]], value),
             lambda: tf_kld.generalized_jsd_with_logits([[1.0, 2.0]], [[2.0, 1.0]], 0.5, value),
             lambda: tf_kld.KLDivergenceWithLogits(temperature=value),
             lambda: tf_kld.GeneralizedJSDWithLogits(temperature=value),
             lambda: tf_kld.LogitsDistillation(temperature=value)]
    for call in calls:
        err, built = _no_ops_built(call)
        assert type(err) is ValueError, repr(err)
        assert "temperature" in str(err) and repr(value) in str(err), str(err)
        assert built == 0


@pytest.mark.parametrize("value", BAD_BETAS, ids=repr)
def test_bad_beta(impl, value):
    for call in (lambda: tf_kld.generalized_jsd_with_logits([[1.0, 2.0]], [[2.0, 1.0]], value),
                 lambda: tf_kld.GeneralizedJSDWithLogits(beta=value)):
        err, built = _no_ops_built(call)
        assert type(err) is ValueError, repr(err)
        assert "beta" in str(err) and repr(value) in str(err) and "[0, 1]" in str(err), str(err)
        assert built == 0


@pytest.mark.parametrize("value", ["2", None, True, tf.constant(2.0)], ids=repr)
def test_non_number_arguments(impl, value):
    with pytest.raises(TypeError, match="temperature"):
        tf_kld.kl_divergence_with_logits([[1.0]], [[1.0]], value)
    with pytest.raises(TypeError, match="beta"):
        tf_kld.generalized_jsd_with_logits([[1.0]], [[1.0]], value)


def test_type_errors(impl):
    for fn in (tf_kld.kl_divergence_with_logits, tf_kld.generalized_jsd_with_logits):
        name = fn.__name__
        with pytest.raises(TypeError, match=f"{name}: y_pred must be a floating-point") as info:
            fn([0.5, 0.5], [1, 2])
        assert "int32" in str(info.value)
        with pytest.raises(TypeError, match=f"{name}: y_true cannot be cast"):
            fn(["a", "b"], [0.5, 0.5])


def test_shape_errors(impl):
    for fn in (tf_kld.kl_divergence_with_logits, tf_kld.generalized_jsd_with_logits):
        name = fn.__name__
        with pytest.raises(tf.errors.InvalidArgumentError, match=f"{name}: .*broadcastable"):
            fn(np.zeros((2, 3)), np.zeros((2, 4)))
        with pytest.raises(tf.errors.InvalidArgumentError, match="rank >= 1"):
            fn(1.0, 2.0)
        spec = tf.TensorSpec([None, 3])
        with pytest.raises(ValueError, match="broadcastable"):
            tf.function(fn).get_concrete_function(spec, tf.TensorSpec([None, 4]))
        traced = tf.function(fn).get_concrete_function(spec, spec)
        assert traced.structured_outputs.shape.as_list() == [None]
