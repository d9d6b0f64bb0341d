"""tf_kld: a fused Kullback-Leibler divergence loss for TensorFlow.

    loss = sum(y_true * log(y_true / y_pred), axis=-1)

with exactly the semantics of `tf.keras.losses.kl_divergence`, computed by a fused C++ op with a
fused gradient, or by the pure-TF composite under XLA/TPU or on request.
"""

from tf_kld import reference
from tf_kld.ops import custom_op_loaded
from tf_kld.ops import current_implementation
from tf_kld.ops import implementation
from tf_kld.ops import kl_divergence

KLD = kld = kullback_leibler_divergence = kl_divergence

__version__ = "0.1.0"

__all__ = [
    "KLD",
    "custom_op_loaded",
    "current_implementation",
    "implementation",
    "kl_divergence",
    "kld",
    "kullback_leibler_divergence",
    "reference",
]
