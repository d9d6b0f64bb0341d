"""The pure-TensorFlow composite: the single source of truth for tf_kld's semantics.

    loss = sum(y_true * log(y_true / y_pred), axis=-1)

exactly as `keras.losses.kl_divergence` (TF r2.3 `keras/losses.py`, unchanged in Keras 3):
y_pred is converted to a tensor, y_true is cast to y_pred's dtype, both are clipped to
[epsilon, 1] with `keras.backend.epsilon()` read at call time, TF broadcasting applies, and the
result has y_pred's dtype and the broadcast shape without its last axis. The clip's gradient
passes on the closed interval [epsilon, 1] and is zero outside (and at NaN).

One deliberate difference, shared by every tf_kld path: float16 and bfloat16 inputs are computed
in float32 (epsilon rounded to the 16-bit dtype first) and the result is cast back. Keras computes
in the 16-bit dtype itself, where y_true / y_pred overflows to inf above 65504 (e.g. y_true=[1, 0],
y_pred=[0, 1] gives inf in float16 Keras and 15.94 here) and rounding error grows with the row width.

The custom op and its gradients are checked against this module; the XLA/TPU path runs it.
"""

import functools
import math

import keras
import numpy as np
import tensorflow as tf

_LOW_PRECISION = (tf.float16, tf.bfloat16)


def epsilon(dtype):
    """`keras.backend.epsilon()` now, rounded to `dtype` as TensorFlow's clip would round it.

    Returned as a Python float that is exactly representable in `dtype` (and in float32 for the
    16-bit types), so every path clips at the same value.
    """
    eps = float(keras.backend.epsilon())
    return float(np.asarray(eps, dtype=tf.as_dtype(dtype).as_numpy_dtype))


def compute_dtype(dtype):
    """The dtype the arithmetic runs in: float32 for float16/bfloat16, else the dtype itself."""
    return tf.float32 if dtype in _LOW_PRECISION else dtype


def _dtype_name(x):
    """x's dtype for an error message, without failing on values that do not convert."""
    for get in (lambda: tf.as_dtype(x.dtype), lambda: tf.convert_to_tensor(x).dtype):
        try:
            return get().name
        except (AttributeError, TypeError, ValueError):
            pass
    return type(x).__name__


def prepare(y_true, y_pred, fn="kl_divergence"):
    """Converts the inputs as Keras does: y_pred to a tensor, y_true cast to y_pred's dtype.

    Raises:
      TypeError: if y_pred is not floating point, or y_true cannot be cast to y_pred.dtype.
      ValueError (graph) / InvalidArgumentError (eager), as TensorFlow's own ops would raise: if
        the static shapes do not broadcast, or broadcast to rank 0.
    """
    try:
        y_pred = tf.convert_to_tensor(y_pred)
    except (TypeError, ValueError) as err:
        error = TypeError if isinstance(err, TypeError) else ValueError
        raise error(f"{fn}: y_pred cannot be converted to a tensor: {err} y_pred must "
                    f"be a floating-point tensor or array (float16, bfloat16, float32 or "
                    f"float64).") from err
    dtype = y_pred.dtype
    if not dtype.is_floating:
        raise TypeError(
            f"{fn}: y_pred must be a floating-point tensor (float16, bfloat16, float32 or "
            f"float64), got y_pred dtype {dtype.name} (y_true dtype {_dtype_name(y_true)}). Cast it "
            f"first, e.g. tf.cast(y_pred, tf.float32).")
    if isinstance(y_true, (tf.Tensor, tf.Variable)) or hasattr(y_true, "dtype") and isinstance(
            getattr(y_true, "dtype"), tf.DType):
        y_true = tf.convert_to_tensor(y_true)
    else:
        try:  # Python and NumPy values convert straight to y_pred's dtype, as in Keras.
            y_true = tf.convert_to_tensor(y_true, dtype=dtype)
        except (TypeError, ValueError):
            try:
                y_true = tf.convert_to_tensor(y_true)
            except (TypeError, ValueError) as err:
                raise TypeError(
                    f"{fn}: y_true cannot be cast to y_pred.dtype ({dtype.name}): {err}"
                ) from err
    if not (y_true.dtype.is_floating or y_true.dtype.is_integer or y_true.dtype == tf.bool):
        raise TypeError(
            f"{fn}: y_true cannot be cast to y_pred.dtype: y_true has dtype "
            f"{y_true.dtype.name}, y_pred has dtype {dtype.name}. y_true must be numeric "
            f"(floating, integer or bool).")
    if y_true.dtype != dtype:
        y_true = tf.cast(y_true, dtype)
    _check_static_shapes(y_true.shape, y_pred.shape, fn)
    return y_true, y_pred


def _check_static_shapes(true_shape, pred_shape, fn):
    """Raises what TensorFlow's ops would (ValueError in graphs, InvalidArgumentError eagerly) for
    shapes known not to broadcast or to broadcast to rank 0, with a message naming both inputs."""
    if true_shape == pred_shape and true_shape.rank:  # equal shapes of rank >= 1: the common case
        return
    try:
        shape = tf.broadcast_static_shape(true_shape, pred_shape)
        problem = None if shape.rank != 0 else "must have rank >= 1 (the loss reduces the last axis)"
    except ValueError:
        problem = ("must have broadcastable shapes (trailing dimensions equal, or one of them 1, or "
                   "missing)")
    if problem is None:
        return
    message = (f"{fn}: y_true and y_pred {problem}, got y_true shape {true_shape} and "
               f"y_pred shape {pred_shape}.")
    if tf.executing_eagerly():
        raise tf.errors.InvalidArgumentError(None, None, message)
    raise ValueError(message)


def composite(y_true, y_pred, eps):
    """The loss on prepared tensors of one floating dtype (broadcastable shapes), clipping at eps."""
    dtype = y_pred.dtype
    work = compute_dtype(dtype)
    t = tf.clip_by_value(tf.cast(y_true, work), eps, 1.0)
    p = tf.clip_by_value(tf.cast(y_pred, work), eps, 1.0)
    loss = tf.reduce_sum(t * tf.math.log(t / p), axis=-1)
    return tf.cast(loss, dtype)


def kl_divergence(y_true, y_pred):
    """Kullback-Leibler divergence, pure TensorFlow: `sum(y_true * log(y_true / y_pred), axis=-1)`."""
    y_true, y_pred = prepare(y_true, y_pred)
    return composite(y_true, y_pred, epsilon(y_pred.dtype))


# --------------------------------------------------------------------------------------------
# The distillation family: divergences between the softmaxes of two sets of logits.
#
# Per row, a = y_true / T and b = y_pred / T, lp = log_softmax(a), lq = log_softmax(b),
# p = exp(lp), q = exp(lq). Everything is computed in log-space, with no clipping and no epsilon.
# Conventions (shared by every path): a class with p = 0 exactly (teacher logit -inf) contributes 0;
# p > 0 with q = 0 gives +inf; NaN propagates; a row of all -inf gives NaN; an empty row gives 0.


def check_temperature(temperature, fn):
    """`temperature` as a Python float, or ValueError/TypeError saying what is wrong with it."""
    value = _real(temperature, "temperature", fn)
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(f"{fn}: temperature must be a finite number > 0, got temperature="
                         f"{temperature!r}.")
    return value


def check_beta(beta, fn):
    """`beta` as a Python float, or ValueError/TypeError saying what is wrong with it."""
    value = _real(beta, "beta", fn)
    if not 0.0 <= value <= 1.0:  # False for NaN
        raise ValueError(f"{fn}: beta must be a number in [0, 1], got beta={beta!r}.")
    return value


def _real(value, name, fn):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer,
                                                                     np.floating)):
        # Tensors would make the argument checks (and the op's attributes) depend on run time.
        raise TypeError(f"{fn}: {name} must be a Python or NumPy real number, got {name}="
                        f"{value!r} of type {type(value).__name__}.")
    return float(value)


def broadcast(y_true, y_pred):
    """Both broadcast to their common shape (the same tensors when the static shapes agree).

    The softmax runs over the broadcast last axis, so it must come before the log-softmax."""
    if y_true.shape.is_fully_defined() and y_pred.shape.is_fully_defined():
        if y_true.shape == y_pred.shape:
            return y_true, y_pred
        shape = tf.broadcast_static_shape(y_true.shape, y_pred.shape)
    else:
        shape = tf.broadcast_dynamic_shape(tf.shape(y_true), tf.shape(y_pred))
    return tf.broadcast_to(y_true, shape), tf.broadcast_to(y_pred, shape)


def _log_softmax(x, temperature):
    if temperature != 1.0:
        x = x / tf.constant(temperature, x.dtype)
    # Subtracts the row max: huge logits stay finite; -inf classes get lp = -inf, an all -inf row NaN.
    return tf.nn.log_softmax(x, axis=-1)


def _kl_terms(lp, lq, d=None):
    """sum(p * (lp - lq)) over the last axis, with the conventions above; d: lq - lp, its value
    more exact (_log_softmax_and_distance).

    Double `where`: a masked class's unselected product would otherwise send 0 * inf = NaN into
    the gradient; here every masked class gets an exact 0 gradient."""
    minus_inf = tf.constant(-math.inf, lp.dtype)
    # p > 0 but q = 0: +inf even where p underflows to 0 while lp is finite (exp(-1e4) > 0).
    infinite = tf.logical_and(tf.equal(lq, minus_inf), tf.greater(lp, minus_inf))
    use = tf.logical_and(tf.not_equal(lp, minus_inf), tf.logical_not(infinite))  # NaN is used
    zero = tf.zeros_like(lp)
    diff = tf.where(use, lp - lq if d is None else -d, zero)
    term = tf.where(use, tf.exp(lp) * diff,
                    tf.where(infinite, tf.constant(math.inf, lp.dtype), zero))
    return _row_sum(term)


def _log_mixture(lp, lq, beta):
    """log(beta * p + (1 - beta) * q) elementwise by log-sum-exp, for 0 < beta < 1."""
    x1 = lp + tf.constant(math.log(beta), lp.dtype)
    x2 = lq + tf.constant(math.log1p(-beta), lq.dtype)
    minus_inf = tf.constant(-math.inf, lp.dtype)
    # Where both are -inf the mixture is 0: keep -inf inf out of the arithmetic (and its gradient).
    empty = tf.logical_and(tf.equal(x1, minus_inf), tf.equal(x2, minus_inf))
    zero = tf.zeros_like(x1)
    x1s, x2s = tf.where(empty, zero, x1), tf.where(empty, zero, x2)
    # hi + log1p(the smaller exp), the larger term's expm1(0) = 0 keeping it exact; hi is a
    # constant to autodiff (lm does not depend on it), so the gradient is the mixture's weights
    # even at ties, where max/min/abs would send it all to one side.
    hi = tf.stop_gradient(tf.maximum(x1s, x2s))
    first = x1s >= x2s
    s = tf.where(first, tf.math.expm1(x1s - hi) + tf.exp(x2s - hi),
                 tf.exp(x1s - hi) + tf.math.expm1(x2s - hi))
    lm = hi + tf.math.log1p(s)
    return tf.where(empty, tf.fill(tf.shape(lm), minus_inf), lm)


# log_ratios' cases, as the kernels' (cc/kernels/distill_jsd.h's kRatioBound and kRatioMinBeta):
# the far side of d = lq - lp direct up to |d| = _RATIO_BOUND, lm itself below beta = _RATIO_MIN_BETA.
_RATIO_BOUND = 64.0
_RATIO_MIN_BETA = 2.0 ** -125


def log_ratios(lp, lq, beta, d=None):
    """rp = lp - lm and rq = lq - lm, with lm = log(beta * p + (1 - beta) * q), for 0 < beta < 1.

    Straight from d = lq - lp (or the given d: the same, its value more exact):
    rp = -log1p((1 - beta) expm1(d)), rq = -log1p(beta expm1(-d)), each exact to a few ulps of
    itself. Where p and q are close the JSD is O(d^2) and its terms p rp, q rq are O(d): lp - lm
    with lm rounded would put some ulps of |lm| into every term, and the loss would lose as many
    digits as the terms cancel. The side e^-|d| bounds (p's where
    d <= 0: u = 1 + s = beta + (1 - beta) e^-|d|) for every d; the other (u = (1 - beta) + beta e^|d|)
    the same way where |d| <= 64, beyond that as the first minus |d|, where nothing cancels.
    log1p(s) is log(u) where u, a sum of positive terms, is below 1/2 (1 + s would lose s's low
    bits). Masked classes (d infinite or NaN) get -log(beta) or -log(1 - beta) on the finite side,
    -inf or NaN on the other (whose terms are 0); beta below 2^-125 (u not a normal float) takes
    lm by log-sum-exp. Every branch is evaluated at finite arguments only, so no gradient is NaN."""
    if not beta >= _RATIO_MIN_BETA:
        lm = _log_mixture(lp, lq, beta)
        return lp - lm, lq - lm
    dtype = lp.dtype
    zero, half, one = (tf.constant(v, dtype) for v in (0.0, 0.5, 1.0))
    b, c = tf.constant(beta, dtype), tf.constant(1.0 - beta, dtype)
    d = lq - lp if d is None else d
    finite = tf.math.is_finite(d)
    d = tf.where(finite, d, tf.zeros_like(d))
    ad = tf.abs(d)
    up = d > zero  # q > p: q's side is the bounded one
    x, y = tf.where(up, c, b), tf.where(up, b, c)
    e, k = tf.exp(-ad), tf.math.expm1(-ad)  # e^-|d|, expm1(-|d|)
    near = ad <= tf.constant(_RATIO_BOUND, dtype)
    r = tf.exp(tf.where(near, ad, tf.zeros_like(ad)))  # e^|d|, 1 beyond the bound

    def log1p(u, s):
        low = u < half
        return tf.where(low, tf.math.log(tf.where(low, u, one)),
                        tf.math.log1p(tf.where(low, tf.zeros_like(s), s)))

    bounded = -log1p(x + y * e, y * k)
    other = tf.where(near, -log1p(y + x * r, -x * (k * r)), bounded - ad)
    rp, rq = tf.where(up, other, bounded), tf.where(up, bounded, other)
    # Infinite or NaN d: q = 0 < p gives rp = -log(beta), p = 0 < q gives rq = -log(1 - beta); the
    # rest NaN (their terms are 0 where that side is masked, NaN where a logit is).
    nan = tf.constant(math.nan, dtype)
    q_zero = tf.logical_and(tf.equal(lq, -math.inf), tf.math.is_finite(lp))
    p_zero = tf.logical_and(tf.equal(lp, -math.inf), tf.math.is_finite(lq))
    rp = tf.where(finite, rp, tf.where(q_zero, tf.constant(-math.log(beta), dtype), nan))
    rq = tf.where(finite, rq, tf.where(p_zero, tf.constant(-math.log1p(-beta), dtype), nan))
    return rp, rq


def _ratio_terms(lp, r):
    """p * r elementwise (r a log-ratio of p's), 0 where p = 0, NaN propagates; double `where` as
    in _kl_terms."""
    use = tf.not_equal(lp, tf.constant(-math.inf, lp.dtype))  # NaN is used
    zero = tf.zeros_like(lp)
    return tf.where(use, tf.exp(lp) * tf.where(use, r, zero), zero)


# _row_sum's pieces: a divisor of the width near _PIECE, from _PIECES[0] to _PIECES[1].
_PIECE = 256
_PIECES = (32, 4096)


def _piece(width):
    """The size of a row's pieces for _row_sum: the divisor of width nearest _PIECE within
    _PIECES that leaves at least two pieces; None where there is none (or width is not static)."""
    if width is None:
        return None
    sizes = range(_PIECES[0], min(_PIECES[1], width // 2) + 1)
    return min((s for s in sizes if width % s == 0), key=lambda s: (abs(s - _PIECE), s),
               default=None)


def _row_sum(x, keepdims=False, dtype=None):
    """sum over the last axis; float32 rows in pieces (_piece), each summed in float32, the pieces
    in float64. XLA:CPU sums a float32 row in order, so its error grows with the width: the JSD's
    composite was 2.2-9.7 ulps off at 32000 classes (1-1.5 with pieces, as eagerly), and a float64
    sum of whole rows cost it 20%, this 1-3% (2048x32000). Widths with no such divisor
    (32003) keep the plain sum: padding the rows cost 10-15%."""
    dtype = dtype or x.dtype
    size = _piece(x.shape[-1]) if x.dtype == tf.float32 else None
    if size is None:
        return tf.cast(tf.reduce_sum(x, axis=-1, keepdims=keepdims), dtype)
    shape = tf.concat([tf.shape(x)[:-1], [x.shape[-1] // size, size]], 0)
    pieces = tf.cast(tf.reduce_sum(tf.reshape(x, shape), axis=-1), tf.float64)
    return tf.cast(tf.reduce_sum(pieces, axis=-1, keepdims=keepdims), dtype)


def _log_softmax_and_distance(y_true, y_pred, temperature, dtype):
    """lp, lq (log-softmax at the temperature) and d = lq - lp whose value is
    ((y - max y) - (x - max x)) / T - (log sum_y - log sum_x) (x, y the logits): lq - lp carries
    ulps of |lp| into a d that may be far smaller. Where the work is float32, the logits'
    difference (exact), its division by T and the log-sums (of float32 exps, summed by _row_sum)
    in float64, d rounded once: only the exps' rounding stays in the log-sums, alike for every
    class of a row (float32 log-sums of about 10 at 32000 classes rounded d by up to 5e-7). Logits
    of a 16-bit `dtype` (the inputs' own) differ exactly in float32 already: their differences stay
    there (float64 cost XLA 10-45% in bfloat16). d's gradient is lq - lp's."""
    sums = tf.float64 if y_pred.dtype == tf.float32 else y_pred.dtype
    wide = y_pred.dtype if dtype in _LOW_PRECISION else sums

    def parts(x):
        top = tf.stop_gradient(tf.reduce_max(x, axis=-1, keepdims=True))  # lp does not depend on it
        z = x - top
        if temperature != 1.0:
            z = z / tf.constant(temperature, z.dtype)
        log_sum = tf.math.log(_row_sum(tf.exp(z), keepdims=True, dtype=sums))
        return z - tf.cast(log_sum, z.dtype), log_sum, tf.cast(x, wide) - tf.cast(top, wide)

    lp, log_sum_p, shifted_x = parts(y_true)
    lq, log_sum_q, shifted_y = parts(y_pred)
    plain = lq - lp
    exact = shifted_y - shifted_x
    if temperature != 1.0:
        exact = exact / tf.constant(temperature, exact.dtype)
    exact = tf.cast(exact - tf.cast(log_sum_q - log_sum_p, wide), plain.dtype)
    finite = tf.logical_and(tf.math.is_finite(exact), tf.math.is_finite(plain))
    d = plain + tf.stop_gradient(tf.where(finite, exact - plain, tf.zeros_like(plain)))
    return lp, lq, d


# Where |d| <= _SERIES_BOUND a class's JSD term is p times a series in d (_jsd_series), of
# _SERIES_TERMS coefficients by compute dtype (cc/kernels/distill_jsd.h's kJsdSeriesBound,
# kJsdSeriesFloat and kJsdSeries): the rest is below half an ulp of the series at |d| = 1 for every
# beta (u's zeros are at least pi away from d = 0).
_SERIES_BOUND = 1.0
_SERIES_TERMS = {tf.float32: 12, tf.float64: 28}


@functools.lru_cache(maxsize=64)
def _jsd_series(beta):
    """K's Taylor coefficients (of d^0 .. d^27) in beta p rp + (1 - beta) q rq =
    p beta (1 - beta) d^2 K(d), as the kernels take them (distill_jsd.h's JsdSeries, the same
    recurrence in float64). With u = beta + (1 - beta) e^d the term over p is
    J(d) = (1 - beta) d e^d - u log u, which vanishes with its first derivative at d = 0 and at
    beta = 0 and 1; J' = (1 - beta) e^d rq with rq' = t = beta e^-d / u, t' = -t (1 - t): the
    series of tau = t / beta by (n + 1) tau_(n+1) = beta sum_(i+j=n) tau_i tau_j - tau_n, nothing
    divided by beta or 1 - beta (within half a float64 ulp of K at |d| = 1 against exact rational
    arithmetic, for beta from 1e-30 to 1 - 1e-16)."""
    n = _SERIES_TERMS[tf.float64] + 1
    tau = [1.0]
    for m in range(n):
        tau.append((beta * sum(tau[i] * tau[m - i] for i in range(m + 1)) - tau[m]) / (m + 1))
    rq = [0.0] + [tau[i - 1] / i for i in range(1, n + 2)]  # rq / beta
    inverse_factorial = [1.0]
    for j in range(1, n + 1):
        inverse_factorial.append(inverse_factorial[-1] / j)
    return tuple(sum(inverse_factorial[i] * rq[j + 1 - i] for i in range(j + 2)) / (j + 2)
                 for j in range(_SERIES_TERMS[tf.float64]))


def _kl_with_logits(y_true, y_pred, temperature, dtype):
    """KL(softmax(y_true / T) || softmax(y_pred / T)) of broadcast tensors of the compute dtype
    (`dtype` the inputs' own): sum(p (lp - lq)) with lp - lq as -d, d from the logits' exact
    difference and the rows' log-sums in float64 (_log_softmax_and_distance), as the fused op's
    log-sum form takes it. lp - lq itself carries ulps of |lp| and |lq| (about 10 at 32000
    classes), which cost tf.nn.log_softmax's composite 2-36 times this error from 1000 classes
    (and 18-990 ulps at T = 3 with logits offset by 1e4, x / T rounding at their magnitude)."""
    if dtype in _LOW_PRECISION:
        # tf.nn.log_softmax's form: XLA takes the written-out log-softmax 10-45% slower on 16-bit
        # inputs, and this form's float32 error is below a 16-bit ulp of the result except for a
        # student within about 0.01 of its teacher, where it reaches 1e-2 of the KL.
        return _kl_terms(_log_softmax(y_true, temperature), _log_softmax(y_pred, temperature))
    lp, lq, d = _log_softmax_and_distance(y_true, y_pred, temperature, dtype)
    return _kl_terms(lp, lq, d)


def kl_with_logits_composite(y_true, y_pred, temperature):
    """KL(softmax(y_true / T) || softmax(y_pred / T)) on prepared tensors of one floating dtype."""
    dtype = y_pred.dtype
    work = compute_dtype(dtype)
    y_true, y_pred = broadcast(tf.cast(y_true, work), tf.cast(y_pred, work))
    return tf.cast(_kl_with_logits(y_true, y_pred, temperature, dtype), dtype)


def jsd_with_logits_composite(y_true, y_pred, beta, temperature):
    """Generalized JSD of the two softmaxes (TRL's convention at beta 0 and 1), prepared tensors."""
    dtype = y_pred.dtype
    work = compute_dtype(dtype)
    y_true, y_pred = broadcast(tf.cast(y_true, work), tf.cast(y_pred, work))
    if beta == 0.0:
        loss = _kl_with_logits(y_true, y_pred, temperature, dtype)
    elif beta == 1.0:
        loss = _kl_with_logits(y_pred, y_true, temperature, dtype)
    else:
        # One sum of each class's beta p rp + (1 - beta) q rq (never negative): one reduction
        # for XLA to fuse the elementwise work into, no cancellation between two sums. Where p
        # and q are close a class's term is O(d^2) and its two parts O(d): there (|d| <= 1) it is
        # p beta (1 - beta) d^2 K(d) (_jsd_series, as the kernels), which cancels nothing, with d
        # to ulps of itself (_log_softmax_and_distance). Beyond, the parts cancel at most ~3x.
        lp, lq, d = _log_softmax_and_distance(y_true, y_pred, temperature, dtype)
        rp, rq = log_ratios(lp, lq, beta, d)
        far = (tf.constant(beta, work) * _ratio_terms(lp, rp)
               + tf.constant(1.0 - beta, work) * _ratio_terms(lq, rq))
        near = tf.abs(d) <= tf.constant(_SERIES_BOUND, work)
        dn = tf.where(near, d, tf.zeros_like(d))
        k = tf.zeros_like(dn)
        for coefficient in reversed(_jsd_series(beta)[:_SERIES_TERMS[work]]):
            k = k * dn + tf.constant(coefficient, work)
        series = tf.exp(lp) * (dn * dn * k) * tf.constant(beta * (1.0 - beta), work)
        terms = tf.where(near, series, far)
        loss = _row_sum(terms)
    return tf.cast(loss, dtype)


def kl_divergence_with_logits(y_true, y_pred, temperature=1.0):
    """KL(softmax(y_true / T) || softmax(y_pred / T)) over the last axis, pure TensorFlow."""
    temperature = check_temperature(temperature, "kl_divergence_with_logits")
    y_true, y_pred = prepare(y_true, y_pred, "kl_divergence_with_logits")
    return kl_with_logits_composite(y_true, y_pred, temperature)


def generalized_jsd_with_logits(y_true, y_pred, beta=0.5, temperature=1.0):
    """Generalized Jensen-Shannon divergence of softmax(y_true / T) and softmax(y_pred / T)."""
    beta = check_beta(beta, "generalized_jsd_with_logits")
    temperature = check_temperature(temperature, "generalized_jsd_with_logits")
    y_true, y_pred = prepare(y_true, y_pred, "generalized_jsd_with_logits")
    return jsd_with_logits_composite(y_true, y_pred, beta, temperature)
