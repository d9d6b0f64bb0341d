"""Shared test helpers: input generation, NumPy expectations, tolerances, graph inspection."""

import contextlib
import math

import keras
import numpy as np
import tensorflow as tf

FLOAT_DTYPES = (tf.float16, tf.bfloat16, tf.float32, tf.float64)
LOW_PRECISION = (tf.float16, tf.bfloat16)

# Relative tolerance of the float32/float64 comparisons. Each row also gets an absolute allowance of
# RTOL * sum(t_c * (1 + |log(t_c / p_c)|)): rounding t_c / p_c costs ~1 ulp of log(t_c / p_c)
# (absolute), i.e. t_c ulp per term however small the term, and mixed-sign terms cancel in the sum.
RTOL = {tf.float32: 1e-6, tf.float64: 1e-12}

# Keras computes float16/bfloat16 in the 16-bit dtype (rounding the ratio, the log, the product and
# the sum), tf_kld in float32 rounded once. They agree to this many ulp of the 16-bit dtype times
# the row magnitude (+|loss|), plus one float16 subnormal step per term (terms near eps are
# subnormal in float16). Measured worst case on random data with special values: 0.5 ulp.
KERAS_LOW_PRECISION_ULPS = 2

FORWARD_OP = "TfKld>KlDivergence"
GRAD_OP = "TfKld>KlDivergenceGrad"


def np_dtype(dtype):
    return tf.as_dtype(dtype).as_numpy_dtype


def machine_eps(dtype):
    """The dtype's ulp at 1.0."""
    dtype = tf.as_dtype(dtype)
    if dtype == tf.bfloat16:
        return 2.0 ** -7
    return float(np.finfo(np_dtype(dtype)).eps)


def epsilon(dtype):
    """keras.backend.epsilon() rounded to dtype, as a Python float (computed independently of tf_kld)."""
    return float(np.asarray(keras.backend.epsilon(), dtype=np_dtype(dtype)))


def to_numpy(x):
    return x.numpy() if hasattr(x, "numpy") else np.asarray(x)


def special_values(dtype):
    """Values on and around the clip range [eps, 1], exactly representable in dtype."""
    nd = np_dtype(dtype)
    eps = np.asarray(epsilon(dtype), nd)
    one = np.asarray(1, nd)
    vals = [0.0, -0.0, -0.5, -1.0, -float(eps), float(eps), 1.0, 1.5, 2.0, 1e4, math.inf, -math.inf,
            float(np.nextafter(eps, one)), float(np.nextafter(eps, np.asarray(0, nd))),
            float(np.nextafter(one, np.asarray(2, nd))), float(np.nextafter(one, np.asarray(0, nd))),
            float(eps) / 4, 1e-3, 0.5]
    return np.asarray(vals, dtype=np.float64).astype(nd)


def random_inputs(rng, shape_true, shape_pred=None, dtype=tf.float32, special=0.3, nan=0.0):
    """A (y_true, y_pred) pair of NumPy arrays of dtype: uniform [0, 1) values of which a fraction
    `special` is replaced by special_values(dtype) and a fraction `nan` by NaN."""
    shape_pred = shape_true if shape_pred is None else shape_pred
    nd = np_dtype(dtype)
    specials = special_values(dtype)

    def draw(shape):
        x = rng.uniform(0.0, 1.0, size=shape)
        pick = rng.uniform(size=shape)
        x = np.where(pick < special, rng.choice(specials.astype(np.float64), size=shape), x)
        x = np.where(pick > 1.0 - nan, np.nan, x)
        return np.asarray(x, np.float64).astype(nd)

    return draw(shape_true), draw(shape_pred)


def clipped64(y_true, y_pred, dtype, eps=None):
    """Both inputs as dtype would hold them, clipped, broadcast, in float64 (NaN kept)."""
    nd = np_dtype(dtype)
    eps = epsilon(dtype) if eps is None else eps
    t = np.asarray(y_true).astype(nd).astype(np.float64)
    p = np.asarray(y_pred).astype(nd).astype(np.float64)
    with np.errstate(invalid="ignore"):
        t = np.where(np.isnan(t), np.nan, np.clip(t, eps, 1.0))
        p = np.where(np.isnan(p), np.nan, np.clip(p, eps, 1.0))
    return np.broadcast_arrays(t, p)


def np_kld(y_true, y_pred, dtype=tf.float64, eps=None):
    """The loss in float64 NumPy for inputs of `dtype` (the expected value, before output rounding)."""
    t, p = clipped64(y_true, y_pred, dtype, eps)
    return np.sum(t * np.log(t / p), axis=-1)


def row_magnitude(y_true, y_pred, dtype, eps=None):
    """Per row sum(t_c * (1 + |log(t_c / p_c)|)): the scale of the loss's rounding error."""
    t, p = clipped64(y_true, y_pred, dtype, eps)
    return np.sum(t * (1.0 + np.abs(np.log(t / p))), axis=-1)


def _check_special_positions(got, want, what):
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=f"{what}: NaN positions")
    np.testing.assert_array_equal(np.isposinf(got), np.isposinf(want), err_msg=f"{what}: +inf positions")
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want), err_msg=f"{what}: -inf positions")


def _assert_within(got, want, tol, what):
    finite = np.isfinite(want)
    with np.errstate(invalid="ignore"):
        err = np.abs(got - want)
    bad = finite & ~(err <= tol)
    if bad.any():
        idx = tuple(np.argwhere(bad)[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {got.size} values outside tolerance; first at {idx}: "
            f"got {got[idx]!r}, want {want[idx]!r}, |diff| {err[idx]:.3g} > tol {tol[idx]:.3g}")


def loss_tolerance(y_true, y_pred, want, dtype, against="reference"):
    """Per-row absolute tolerance for a loss of `dtype`.

    against="reference": float32/float64 -> RTOL (see above; the sum's rounding grows like
    sqrt(row width), hence the sqrt(n / 16) factor for wide rows). float16/bfloat16 -> both sides
    compute in float32 and round once, so they differ by at most 1 ulp of the 16-bit result on top
    of the float32 tolerance.
    against="keras": float16/bfloat16 -> KERAS_LOW_PRECISION_ULPS ulp of the row magnitude, plus
    the 16-bit subnormal step for every term (terms near eps are subnormal in float16).
    """
    dtype = tf.as_dtype(dtype)
    want = np.asarray(want, np.float64)
    n = np.broadcast_shapes(np.shape(y_true), np.shape(y_pred))[-1]
    width = max(1.0, math.sqrt(n / 16.0))
    mag = row_magnitude(y_true, y_pred, dtype)
    if dtype in LOW_PRECISION:
        if against == "keras":
            tiny = float(np.finfo(np.float16).smallest_subnormal) if dtype == tf.float16 else 0.0
            return KERAS_LOW_PRECISION_ULPS * machine_eps(dtype) * (width * mag + np.abs(want)) + n * tiny
        rtol = RTOL[tf.float32]
        with np.errstate(invalid="ignore"):
            ulp16 = np.spacing(np.abs(want).astype(np_dtype(dtype))).astype(np.float64)
        return rtol * np.abs(want) + rtol * width * mag + ulp16
    rtol = RTOL[dtype]
    return rtol * np.abs(want) + rtol * width * mag


def assert_loss_close(got, want, y_true, y_pred, dtype, against="reference", what="loss"):
    """Asserts a loss matches `want`: same shape, same NaN/inf positions, finite values within
    loss_tolerance(...)."""
    got = np.asarray(to_numpy(got), np.float64)
    want = np.asarray(to_numpy(want), np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    _check_special_positions(got, want, what)
    tol = np.broadcast_to(loss_tolerance(y_true, y_pred, want, dtype, against), want.shape)
    _assert_within(got, want, tol, what)


def assert_grad_close(got, want, scale, dtype, what="gradient"):
    """Elementwise: same NaN/inf positions, |got - want| <= rtol * (|want| + scale).

    `scale` is the magnitude the gradient is computed from (e.g. |g| * (1 + |log r|) for d/dy_true,
    whose value cancels near r = 1/e). float16/bfloat16 allow 1 ulp of the 16-bit dtype on top.
    """
    dtype = tf.as_dtype(dtype)
    got = np.asarray(to_numpy(got), np.float64)
    want = np.asarray(to_numpy(want), np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    _check_special_positions(got, want, what)
    rtol = RTOL[tf.float32] if dtype in LOW_PRECISION else RTOL[dtype]
    scale = np.broadcast_to(np.nan_to_num(np.asarray(scale, np.float64), nan=0.0, posinf=0.0), want.shape)
    tol = rtol * (np.abs(want) + scale)
    if dtype in LOW_PRECISION:
        with np.errstate(invalid="ignore"):
            tol = tol + np.spacing(np.abs(want).astype(np_dtype(dtype))).astype(np.float64)
    _assert_within(got, want, tol, what)


# --------------------------------------------------------------------------------------------
# Graphs


def graph_op_types(graph):
    """Op types in a tf.Graph (or a ConcreteFunction's graph), including its function library."""
    graph = getattr(graph, "graph", graph)
    graph_def = graph.as_graph_def()
    types = {node.op for node in graph_def.node}
    for fn in graph_def.library.function:
        types.update(node.op for node in fn.node_def)
    return types


def ancestor_ops(tensors):
    """All ops the given graph tensors depend on (data and control inputs)."""
    seen, stack = set(), [t.op for t in tensors]
    while stack:
        op = stack.pop()
        if op in seen:
            continue
        seen.add(op)
        stack.extend(x.op for x in op.inputs)
        stack.extend(op.control_inputs)
    return seen


@contextlib.contextmanager
def record_eager_ops():
    """Yields a list that collects (op_type, {attr: value}) for every op executed eagerly inside."""
    from tensorflow.python.framework import op_callbacks  # pylint: disable=g-import-not-at-top

    executed = []

    def callback(op_type, inputs, attrs, outputs, op_name=None, graph=None):
        del inputs, outputs, op_name
        if graph is None:
            pairs = attrs or ()
            executed.append((op_type, {k: v.decode() if isinstance(v, bytes) else v
                                       for k, v in zip(pairs[::2], pairs[1::2])}))

    op_callbacks.add_op_callback(callback)
    try:
        yield executed
    finally:
        op_callbacks.remove_op_callback(callback)


def attr_str(op, name):
    value = op.get_attr(name)
    return value.decode() if isinstance(value, bytes) else value


# The body of a fresh-process probe of tf_kld's loader (after `import tf_kld` has filled a dict
# `out`): what loaded, the doc example's value, the traced op types, and the "custom" error.
LOADER_PROBE = r"""
out["loaded"] = tf_kld.custom_op_loaded()
out["loss"] = float(tf_kld.kl_divergence([.4, .9, .2], [.5, .8, .12]))
spec = tf.TensorSpec([None, 3])
cf = tf.function(tf_kld.kl_divergence).get_concrete_function(spec, spec)
out["ops"] = sorted({op.type for op in cf.graph.get_operations()})
try:
    with tf_kld.implementation("custom"):
        tf_kld.kl_divergence([.4, .6], [.5, .5])
    out["custom_error"] = None
except RuntimeError as err:
    out["custom_error"] = str(err)
print("RESULT " + json.dumps(out))
"""
