"""`tf_kld.patch_tensorflow()`: TensorFlow's own KL-divergence aliases, computed by tf_kld.

Points every alias attribute that exists in the `tf.` namespaces of the alias table
(`tf.keras.losses.KLD`, `tf.metrics.kld`, `tf.compat.v2.losses.kullback_leibler_divergence`, ...)
at `tf_kld.kl_divergence`, and puts the originals back when undone. Only names TensorFlow has are
replaced: TF 2.21 lacks `kl_divergence` in these namespaces, and adding it would make code run
under the patch that fails without it; `add_missing=True` adds it anyway (and removes it on undo).

Patches nest and may be undone in any order: each attribute is replaced while at least one patch
holds it and restored to TensorFlow's value when the last one is undone.
"""

import sys
import threading

from tf_kld import aliases
from tf_kld import ops

_MISSING = object()
_lock = threading.Lock()
_held = {}  # (id(namespace object), name) -> [namespace object, name, original or _MISSING, holders]


def tensorflow_namespaces():
    """The distinct objects behind `tf.<namespace>` for the table's namespaces.

    Both the object reached by attribute access (TF's lazy loaders keep their own copy of the
    module's attributes) and the module registered in sys.modules under its name, which
    `from keras._tf_keras.keras.losses import KLD` reads.
    """
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    found = {}
    for namespace in aliases.NAMESPACES:
        obj = tf
        for part in namespace.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if obj is None:
            continue
        for candidate in (obj, sys.modules.get(getattr(obj, "__name__", None))):
            if candidate is not None:
                found.setdefault(id(candidate), candidate)
    return list(found.values())


class TensorFlowPatch:
    """An applied patch (see `patch_tensorflow`): `undo()` it, or use it as a context manager."""

    def __init__(self, add_missing=False):
        self.add_missing = add_missing
        self._keys = []
        with _lock:
            try:
                self._apply()
            except BaseException:
                self._release()
                raise

    def _apply(self):
        # Read every original before setting any: a TF lazy loader copies its module's attributes
        # when first read, and must not copy patched ones.
        targets = tensorflow_namespaces()
        originals = [(t, name, getattr(t, name, _MISSING))
                     for t in targets for name in aliases.FUNCTION_NAMES]
        for target, name, original in originals:
            key = (id(target), name)
            entry = _held.get(key)
            if entry is None:
                if original is _MISSING and not self.add_missing:
                    continue
                entry = _held[key] = [target, name, original, 0]
                setattr(target, name, ops.kl_divergence)
            elif entry[2] is _MISSING and not self.add_missing:
                continue  # added by another patch; not this one's to keep
            entry[3] += 1
            self._keys.append(key)

    def _release(self):
        for key in reversed(self._keys):
            entry = _held[key]
            entry[3] -= 1
            if entry[3]:
                continue
            target, name, original, _ = _held.pop(key)
            if original is _MISSING:
                try:
                    delattr(target, name)
                except AttributeError:
                    pass
            else:
                setattr(target, name, original)
        self._keys = []

    @property
    def active(self):
        """Whether this patch still holds any attribute."""
        return bool(self._keys)

    def undo(self):
        """Restores what this patch replaced (once; later calls do nothing)."""
        with _lock:
            self._release()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.undo()
        return False


def patch_tensorflow(add_missing=False):
    """Makes TensorFlow's own KL-divergence aliases compute with `tf_kld.kl_divergence`.

    Every existing `KLD`, `kld`, `kl_divergence` and `kullback_leibler_divergence` attribute of
    `tf.keras.losses`, `tf.keras.metrics`, `tf.losses`, `tf.metrics`, `tf.compat.v1.keras.losses`,
    `tf.compat.v1.keras.metrics` and `tf.compat.v2.{keras.,}{losses,metrics}` becomes
    `tf_kld.kl_divergence`, so existing code runs the fused op unchanged. Applied at once; undone
    by `undo()` or on leaving a `with` block (also on an exception). Patches nest.

    >>> with tf_kld.patch_tensorflow():
    ...     assert tf.keras.losses.KLD is tf_kld.kl_divergence
    >>> patch = tf_kld.patch_tensorflow()
    >>> model.fit(...)
    >>> patch.undo()

    What it does not change: Keras's classes (`tf.keras.losses.KLDivergence`; use
    `tf_kld.KLDivergence`), string identifiers (`loss="kld"`), and functions Keras looked up
    before the patch (e.g. a model compiled earlier).

    Args:
      add_missing: also add the names TensorFlow lacks (`kl_divergence` in TF 2.21) while patched.

    Returns:
      A `TensorFlowPatch`: a context manager with an `undo()` method.
    """
    return TensorFlowPatch(add_missing)
