"""tf_kld: a fused Kullback-Leibler divergence loss for TensorFlow.

    loss = sum(y_true * log(y_true / y_pred), axis=-1)

with the semantics of Keras's `kl_divergence` loss (`keras.losses.kl_divergence`, `tf.keras.losses.KLD`),
computed by a fused C++ op with a fused gradient, or by the pure-TF composite under XLA/TPU or on
request.

Every alias TensorFlow documents is here under `tf_kld.` (`tf_kld.keras.losses.KLD`,
`tf_kld.compat.v1.keras.metrics.kld`, ...; see `tf_kld.aliases`), with the Keras classes
`tf_kld.KLDivergence` (a Loss) and `tf_kld.keras.metrics.KLDivergence` (a Metric).
"""

import sys as _sys

from tf_kld import aliases as _aliases
from tf_kld import reference
from tf_kld.distillation import generalized_jsd_with_logits
from tf_kld.distillation import kl_divergence_with_logits
from tf_kld.gpu import gpu_info
from tf_kld.keras_objects import GeneralizedJSDWithLogits
from tf_kld.keras_objects import KLDivergence
from tf_kld.keras_objects import KLDivergenceWithLogits
from tf_kld.keras_objects import LogitsDistillation
from tf_kld.linear import linear_distillation_loss
from tf_kld.ops import custom_op_loaded
from tf_kld.ops import current_implementation
from tf_kld.ops import implementation
from tf_kld.ops import kl_divergence
from tf_kld.patch import patch_tensorflow

KLD = kld = kullback_leibler_divergence = kl_divergence

# The namespaces tf_kld.keras, .losses, .metrics and .compat (importable modules too); not in
# __all__, so `from tf_kld import *` cannot rebind a user's `keras`.
_aliases.install(_sys.modules[__name__])

__version__ = "0.1.0"

__all__ = [
    "GeneralizedJSDWithLogits",
    "KLD",
    "KLDivergence",
    "KLDivergenceWithLogits",
    "LogitsDistillation",
    "current_implementation",
    "custom_op_loaded",
    "generalized_jsd_with_logits",
    "gpu_info",
    "implementation",
    "kl_divergence",
    "kl_divergence_with_logits",
    "kld",
    "kullback_leibler_divergence",
    "linear_distillation_loss",
    "patch_tensorflow",
    "reference",
]
