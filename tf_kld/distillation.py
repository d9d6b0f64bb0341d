"""Distillation losses from logits: KL divergence and generalized Jensen-Shannon divergence of the
softmaxes of two sets of logits at a temperature, computed in log-space.

The semantics live in `tf_kld.reference` (the composites); this module validates the arguments,
converts the inputs as `tf_kld.kl_divergence` does and dispatches through the same implementation
switch (`tf_kld.implementation`) as the rest of tf_kld: the fused ops
`TfKld>KlDivergenceWithLogits` (one pass per row) and `TfKld>GeneralizedJsdWithLogits` (two, the
second in cache), each with a fused one-pass gradient. The ops lower themselves to XLA
(cc/kernels/distill_xla.cc); under XLA "auto" still emits the composite, as for `kl_divergence`.
"""

from tf_kld import ops
from tf_kld import reference


def _use_custom_op():
    """The fused op when the switch asks for it and the loaded library has this family's ops.

    Inside XLA (jit_compile, TPU) "auto" has chosen the composite already; "custom" keeps the op,
    which lowers itself, unless the library was built without that lowering (TF_KLD_XLA=0): then
    the composite runs, since the op could not compile.
    """
    if not (ops.use_custom_op() and ops.distillation_ops_loaded()):
        return False
    return not ops.in_xla_context() or ops.distillation_xla_lowering_available()


def kl_divergence_with_logits(y_true, y_pred, temperature=1.0):
    """KL divergence between the softmaxes of two sets of logits, at a temperature.

    With `p = softmax(y_true / T)` and `q = softmax(y_pred / T)` over the last axis:

        loss = sum(p * (log p - log q), axis=-1) = KL(p || q)

    computed in log-space (log-softmax with max-subtraction; no clipping, no epsilon), so logits as
    large as 1e4 and probabilities far below 1e-7 are exact. `y_true` and `y_pred` may be logits or
    log-probabilities. No `T**2` factor (as torch's `kl_div`, TRL and Liger-Kernel); reverse KL is
    `kl_divergence_with_logits(y_pred, y_true)`.

    Conventions: a class with `p = 0` (teacher logit `-inf`, e.g. a masked token) contributes 0;
    `p > 0` with `q = 0` gives `+inf`; NaN propagates; a row of all `-inf` gives NaN; an empty
    last axis gives 0. float16 and bfloat16 are computed in float32 and the result cast back.

    >>> tf_kld.kl_divergence_with_logits([[1., 2., 3.]], [[3., 2., 1.]]).numpy()
    array([1.1504208], dtype=float32)

    Args:
      y_true: Teacher logits (the target distribution p). Cast to `y_pred`'s dtype.
      y_pred: Student logits (q), floating point. The shapes broadcast as in TensorFlow.
      temperature: A Python number > 0 dividing both sets of logits.

    Returns:
      A `Tensor` of `y_pred`'s dtype, the broadcast shape without its last axis.

    Raises:
      ValueError: If `temperature` is not a finite number > 0.
      TypeError: If `y_pred` is not floating point or `y_true` cannot be cast to its dtype.
    """
    temperature = reference.check_temperature(temperature, "kl_divergence_with_logits")
    y_true, y_pred = reference.prepare(y_true, y_pred, "kl_divergence_with_logits")
    if _use_custom_op():
        return ops.custom_kl_divergence_with_logits(y_true, y_pred, temperature)
    return reference.kl_with_logits_composite(y_true, y_pred, temperature)


def generalized_jsd_with_logits(y_true, y_pred, beta=0.5, temperature=1.0):
    """Generalized Jensen-Shannon divergence between the softmaxes of two sets of logits.

    With `p = softmax(y_true / T)`, `q = softmax(y_pred / T)` and `m = beta * p + (1 - beta) * q`:

        loss = beta * KL(p || m) + (1 - beta) * KL(q || m)

    over the last axis, with `log p - log m` and `log q - log m` taken straight from
    `d = log q - log p` (`-log1p((1 - beta) expm1(d))` and `-log1p(beta expm1(-d))`): exact where p
    and q are close and the JSD is small against its terms, never a log of a sum of underflowed
    probabilities. Where `|d| <= 1` a class's term is `p * beta * (1 - beta) * d**2 * K(d)`, K by
    its Taylor series, a term that cancels nothing, with `d` from the logits' exact difference
    (the fused op and the composite alike): within a few ulps of the JSD itself however close the
    student is to the teacher. As TRL's `generalized_jsd_loss` (so code ported from it gives the
    same numbers), `beta == 0` gives `KL(p || q)` and `beta == 1` gives `KL(q || p)`, although
    the formula's limit at both ends is 0. `beta = 0.5` is the symmetric Jensen-Shannon divergence
    (at most log 2). Conventions and dtypes as `kl_divergence_with_logits`.

    Args:
      y_true: Teacher logits (p). Cast to `y_pred`'s dtype.
      y_pred: Student logits (q), floating point. The shapes broadcast as in TensorFlow.
      beta: A Python number in [0, 1], the weight of p in the mixture.
      temperature: A Python number > 0 dividing both sets of logits.

    Returns:
      A `Tensor` of `y_pred`'s dtype, the broadcast shape without its last axis.

    Raises:
      ValueError: If `beta` is outside [0, 1] or NaN, or `temperature` is not a finite number > 0.
      TypeError: If `y_pred` is not floating point or `y_true` cannot be cast to its dtype.
    """
    beta = reference.check_beta(beta, "generalized_jsd_with_logits")
    temperature = reference.check_temperature(temperature, "generalized_jsd_with_logits")
    y_true, y_pred = reference.prepare(y_true, y_pred, "generalized_jsd_with_logits")
    if beta in (0.0, 1.0) and _use_custom_op():  # the KL divergence, one way or the other
        y_true, y_pred = (y_true, y_pred) if beta == 0.0 else (y_pred, y_true)
        return ops.custom_kl_divergence_with_logits(y_true, y_pred, temperature)
    if _use_custom_op():
        return ops.custom_generalized_jsd_with_logits(y_true, y_pred, beta, temperature)
    return reference.jsd_with_logits_composite(y_true, y_pred, beta, temperature)
