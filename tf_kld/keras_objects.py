"""Keras 3 Loss and Metric classes computing with `tf_kld.kl_divergence` (the fused op).

(Not `tf_kld/keras.py`: `tf_kld.keras` is the alias namespace built in `tf_kld.aliases`.)

Both subclass Keras's own `KLDivergence` classes, so `isinstance` checks against Keras keep
working, and wrap tf_kld's function instead of Keras's. They and the function are registered for
Keras serialisation under the package "tf_kld" (`tf_kld>KLDivergence`,
`tf_kld>KLDivergenceMetric`, `tf_kld>kl_divergence`): a saved `.keras` model reloads after
`import tf_kld`.
"""

import keras

from tf_kld import ops

_register = keras.saving.register_keras_serializable

# The function itself, so `compile(loss=tf_kld.KLD)` serialises as "tf_kld>kl_divergence".
_register(package="tf_kld")(ops.kl_divergence)


@_register(package="tf_kld")
class KLDivergence(keras.losses.KLDivergence):
    """Computes Kullback-Leibler divergence loss between `y_true` & `y_pred`.

    Formula:

    ```python
    loss = y_true * log(y_true / y_pred)
    ```

    summed over the last axis, computed by `tf_kld.kl_divergence` (the fused op). `y_true` and
    `y_pred` are expected to be probability distributions, with values between 0 and 1. They will
    get clipped to the `[epsilon, 1]` range.

    Standalone usage:

    >>> y_true = [[0., 1.], [0., 0.]]
    >>> y_pred = [[0.6, 0.4], [0.4, 0.6]]
    >>> kl = tf_kld.KLDivergence()
    >>> kl(y_true, y_pred).numpy()
    0.45814306
    >>> kl(y_true, y_pred, sample_weight=[0.8, 0.2]).numpy()
    0.3665154
    >>> tf_kld.KLDivergence(reduction="sum")(y_true, y_pred).numpy()
    0.9162861
    >>> tf_kld.KLDivergence(reduction=None)(y_true, y_pred).numpy()
    array([ 9.1628921e-01, -3.0809074e-06], dtype=float32)

    Usage with the `compile()` API:

    ```python
    model.compile(optimizer="sgd", loss=tf_kld.KLDivergence())
    ```

    Args:
      reduction: Type of reduction to apply to the loss: `"sum_over_batch_size"` (default),
        `"sum"`, `"mean"`, `"mean_with_sample_weight"` or `None` (no reduction), as in Keras.
      name: Optional name for the loss instance. Defaults to "kl_divergence".
      dtype: The dtype of the loss's computations. Defaults to `None`, which means
        `keras.backend.floatx()`.
    """

    def __init__(self, reduction="sum_over_batch_size", name="kl_divergence", dtype=None):
        # Keras's KLDivergence.__init__ wraps Keras's function; call its parent, Keras's
        # LossFunctionWrapper (not exported by Keras 3), with tf_kld's instead.
        super(keras.losses.KLDivergence, self).__init__(
            ops.kl_divergence, reduction=reduction, name=name, dtype=dtype)

    def get_config(self):
        # Keras's Loss config leaves the dtype out; keep it so from_config round-trips.
        return {**super().get_config(), "dtype": self.dtype}


@_register(package="tf_kld")
class KLDivergenceMetric(keras.metrics.KLDivergence):
    """Computes Kullback-Leibler divergence metric between `y_true` and `y_pred`.

    The (sample-weighted) mean over all samples seen of `tf_kld.kl_divergence(y_true, y_pred)`.
    Public as `tf_kld.keras.metrics.KLDivergence`.

    Standalone usage:

    >>> m = tf_kld.keras.metrics.KLDivergence()
    >>> m.update_state([[0, 1], [0, 0]], [[0.6, 0.4], [0.4, 0.6]])
    >>> m.result().numpy()
    0.45814306
    >>> m.reset_state()
    >>> m.update_state([[0, 1], [0, 0]], [[0.6, 0.4], [0.4, 0.6]], sample_weight=[1, 0])
    >>> m.result().numpy()
    0.9162892

    Usage with the `compile()` API:

    ```python
    model.compile(optimizer="sgd", loss="mse", metrics=[tf_kld.keras.metrics.KLDivergence()])
    ```

    Args:
      name: (Optional) string name of the metric instance. Defaults to "kl_divergence".
      dtype: (Optional) data type of the metric result.
    """

    def __init__(self, name="kl_divergence", dtype=None):
        # As above: Keras's MeanMetricWrapper around tf_kld's function instead of Keras's.
        super(keras.metrics.KLDivergence, self).__init__(
            fn=ops.kl_divergence, name=name, dtype=dtype)
