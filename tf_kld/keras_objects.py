"""Keras 3 Loss and Metric classes computing with `tf_kld.kl_divergence` (the fused op).

(Not `tf_kld/keras.py`: `tf_kld.keras` is the alias namespace built in `tf_kld.aliases`.)

Both subclass Keras's own `KLDivergence` classes, so `isinstance` checks against Keras keep
working, and wrap tf_kld's function instead of Keras's. They and the function are registered for
Keras serialisation under the package "tf_kld" (`tf_kld>KLDivergence`,
`tf_kld>KLDivergenceMetric`, `tf_kld>kl_divergence`): a saved `.keras` model reloads after
`import tf_kld`.
"""

import keras
import keras.distillation  # noqa: F401  (a lazily loaded submodule in some Keras versions)

from tf_kld import distillation
from tf_kld import ops
from tf_kld import reference

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


# --------------------------------------------------------------------------------------------
# The distillation family: losses between two sets of logits.

_register(package="tf_kld")(distillation.kl_divergence_with_logits)
_register(package="tf_kld")(distillation.generalized_jsd_with_logits)


@_register(package="tf_kld")
class KLDivergenceWithLogits(keras.losses.Loss):
    """KL divergence between the softmaxes of two sets of logits at a temperature, as a Keras Loss.

    Per sample `tf_kld.kl_divergence_with_logits(y_true, y_pred, temperature)` =
    `KL(softmax(y_true / T) || softmax(y_pred / T))` over the last axis, in log-space (no clipping),
    then reduced as Keras reduces (sample_weight and masks as for any Keras Loss). No `T**2` factor.

    >>> loss = tf_kld.KLDivergenceWithLogits(temperature=2.0)
    >>> loss([[1., 2., 3.]], [[3., 2., 1.]]).numpy()
    0.3201567

    Args:
      temperature: A Python number > 0 dividing both sets of logits.
      reduction: `"sum_over_batch_size"` (default), `"sum"`, `"mean"`, `"mean_with_sample_weight"`
        or `None`, as in Keras.
      name: Name of the loss instance. Defaults to "kl_divergence_with_logits".
      dtype: The dtype of the loss's computations; `None` means `keras.backend.floatx()`.
    """

    def __init__(self, temperature=1.0, reduction="sum_over_batch_size",
                 name="kl_divergence_with_logits", dtype=None):
        self.temperature = reference.check_temperature(temperature, type(self).__name__)
        super().__init__(name=name, reduction=reduction, dtype=dtype)

    def call(self, y_true, y_pred):
        return distillation.kl_divergence_with_logits(y_true, y_pred, self.temperature)

    def get_config(self):
        return {**super().get_config(), "temperature": self.temperature, "dtype": self.dtype}


@_register(package="tf_kld")
class GeneralizedJSDWithLogits(keras.losses.Loss):
    """Generalized Jensen-Shannon divergence of the softmaxes of two sets of logits, a Keras Loss.

    Per sample `tf_kld.generalized_jsd_with_logits(y_true, y_pred, beta, temperature)`:
    `beta * KL(p || m) + (1 - beta) * KL(q || m)` with `m = beta * p + (1 - beta) * q`, except
    `beta == 0` is `KL(p || q)` and `beta == 1` is `KL(q || p)` (TRL's convention).

    Args:
      beta: A Python number in [0, 1], the weight of the teacher's distribution in the mixture.
      temperature: A Python number > 0 dividing both sets of logits.
      reduction: As `KLDivergenceWithLogits`.
      name: Name of the loss instance. Defaults to "generalized_jsd_with_logits".
      dtype: The dtype of the loss's computations; `None` means `keras.backend.floatx()`.
    """

    def __init__(self, beta=0.5, temperature=1.0, reduction="sum_over_batch_size",
                 name="generalized_jsd_with_logits", dtype=None):
        self.beta = reference.check_beta(beta, type(self).__name__)
        self.temperature = reference.check_temperature(temperature, type(self).__name__)
        super().__init__(name=name, reduction=reduction, dtype=dtype)

    def call(self, y_true, y_pred):
        return distillation.generalized_jsd_with_logits(y_true, y_pred, self.beta, self.temperature)

    def get_config(self):
        return {**super().get_config(), "beta": self.beta, "temperature": self.temperature,
                "dtype": self.dtype}


@_register(package="tf_kld")
class LogitsDistillation(keras.distillation.LogitsDistillation):
    """`keras.distillation.LogitsDistillation` computing with the fused log-space KL divergence.

    `compute_loss(teacher_logits, student_logits)` is
    `T**2 * mean(tf_kld.kl_divergence_with_logits(teacher_logits, student_logits, T))` (summed over
    the outputs of a multi-output model), the value of Keras's
    `LogitsDistillation(temperature=T, loss=keras.losses.KLDivergence())` wherever every softmax
    probability is at least 1e-7. Below that Keras clips both probabilities to
    `[keras.backend.epsilon(), 1]` (1e-7), which changes its value (common with vocabularies of
    100k+ classes, where most probabilities are tiny) and zeroes its gradient there; this class
    computes the exact divergence, with no clipping.

    >>> distiller = keras.distillation.Distiller(
    ...     teacher=teacher, student=student, distillation_losses=tf_kld.LogitsDistillation())

    Args:
      temperature: A Python number > 0 dividing both sets of logits. Defaults to 3.0.
    """

    def __init__(self, temperature=3.0):
        temperature = reference.check_temperature(temperature, type(self).__name__)
        super().__init__(temperature=temperature, loss="kl_divergence")

    def compute_loss(self, teacher_outputs, student_outputs, **kwargs):
        del kwargs
        t = self.temperature

        def one(teacher, student):
            loss = distillation.kl_divergence_with_logits(teacher, student, t)
            return keras.ops.mean(loss) * (t * t)

        losses = keras.tree.flatten(keras.tree.map_structure(one, teacher_outputs, student_outputs))
        return losses[0] if len(losses) == 1 else keras.ops.sum(keras.ops.stack(losses))

    def get_config(self):
        return {"temperature": self.temperature}

    @classmethod
    def from_config(cls, config):
        return cls(**config)
