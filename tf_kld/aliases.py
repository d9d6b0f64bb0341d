"""The alias table and the namespaces built from it.

Every name the TensorFlow documentation lists for the KL-divergence loss, under tf_kld instead of
tf: `tf_kld.<namespace>.<name>` for each namespace in NAMESPACES and each name in
FUNCTION_NAMES is `tf_kld.kl_divergence` itself (40 paths), and each namespace's `KLDivergence` is
the Loss class (losses namespaces) or the Metric class (metrics namespaces).

The namespaces are module objects registered in `sys.modules` under their dotted names when
tf_kld is imported, so `import tf_kld.keras.losses` and `from tf_kld.compat.v1.keras.metrics
import kld` work, with no file per namespace (nothing extra for pip or Bazel to package).
`tf_kld.patch_tensorflow` reuses the same table for the `tf.` namespaces.
"""

import importlib.machinery
import sys
import types

from tf_kld import keras_objects
from tf_kld import ops

# The union of the TF API docs' lists (TF 2.21 itself lacks `kl_divergence` in all of them).
FUNCTION_NAMES = ("KLD", "kld", "kl_divergence", "kullback_leibler_divergence")
NAMESPACES = (
    "keras.losses",
    "keras.metrics",
    "losses",
    "metrics",
    "compat.v1.keras.losses",
    "compat.v1.keras.metrics",
    "compat.v2.keras.losses",
    "compat.v2.keras.metrics",
    "compat.v2.losses",
    "compat.v2.metrics",
)
CLASS_NAME = "KLDivergence"
_CLASSES = {"losses": keras_objects.KLDivergence, "metrics": keras_objects.KLDivergenceMetric}


def function_paths():
    """The 40 dotted paths (relative to the package) of the function aliases."""
    return tuple(f"{ns}.{name}" for ns in NAMESPACES for name in FUNCTION_NAMES)


def namespace_class(namespace):
    """The Keras class a namespace holds: the Loss in `*.losses`, the Metric in `*.metrics`."""
    return _CLASSES[namespace.rsplit(".", 1)[-1]]


def _module(package, dotted):
    """The module `<package>.<dotted>`, created (with its parents) and registered if missing."""
    parent = package
    for part in dotted.split("."):
        name = f"{parent.__name__}.{part}"
        module = sys.modules.get(name)
        if module is None:
            module = types.ModuleType(name, f"tf_kld's mirror of `tf.{name.split('.', 1)[1]}`.")
            module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
            module.__path__ = []  # a package with no files: a missing child is ModuleNotFoundError
            module.__package__ = name
            sys.modules[name] = module
        setattr(parent, part, module)
        parent = module
    return parent


def install(package):
    """Builds every namespace of the table under `package` (the tf_kld module)."""
    for namespace in NAMESPACES:
        module = _module(package, namespace)
        for name in FUNCTION_NAMES:
            setattr(module, name, ops.kl_divergence)
        setattr(module, CLASS_NAME, namespace_class(namespace))
        module.__all__ = sorted(FUNCTION_NAMES + (CLASS_NAME,))
