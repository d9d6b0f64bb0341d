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


def prepare(y_true, y_pred):
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
        raise error(f"kl_divergence: y_pred cannot be converted to a tensor: {err} y_pred must "
                    f"be a floating-point tensor or array (float16, bfloat16, float32 or "
                    f"float64).") from err
    dtype = y_pred.dtype
    if not dtype.is_floating:
        raise TypeError(
            f"kl_divergence: y_pred must be a floating-point tensor (float16, bfloat16, float32 or "
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
                    f"kl_divergence: y_true cannot be cast to y_pred.dtype ({dtype.name}): {err}"
                ) from err
    if not (y_true.dtype.is_floating or y_true.dtype.is_integer or y_true.dtype == tf.bool):
        raise TypeError(
            f"kl_divergence: y_true cannot be cast to y_pred.dtype: y_true has dtype "
            f"{y_true.dtype.name}, y_pred has dtype {dtype.name}. y_true must be numeric "
            f"(floating, integer or bool).")
    if y_true.dtype != dtype:
        y_true = tf.cast(y_true, dtype)
    _check_static_shapes(y_true.shape, y_pred.shape)
    return y_true, y_pred


def _check_static_shapes(true_shape, pred_shape):
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
    message = (f"kl_divergence: y_true and y_pred {problem}, got y_true shape {true_shape} and "
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
