"""Every documented alias path is tf_kld.kl_divergence itself, reachable as attribute and module."""

import importlib
import pickle
import sys

import keras
import pytest
import tensorflow as tf

import tf_kld
from tf_kld import aliases

# Typed out here on purpose (the library builds them from one table): the TF docs' union.
NAMESPACES = ["keras.losses", "keras.metrics", "losses", "metrics", "compat.v1.keras.losses",
              "compat.v1.keras.metrics", "compat.v2.keras.losses", "compat.v2.keras.metrics",
              "compat.v2.losses", "compat.v2.metrics"]
NAMES = ["KLD", "kld", "kl_divergence", "kullback_leibler_divergence"]
PATHS = [f"{ns}.{name}" for ns in NAMESPACES for name in NAMES]


def _resolve(root, dotted):
    for part in dotted.split("."):
        root = getattr(root, part)
    return root


def test_table_has_exactly_the_40_paths():
    assert len(PATHS) == 40
    assert sorted(aliases.function_paths()) == sorted(PATHS)


@pytest.mark.parametrize("path", PATHS)
def test_path_is_the_function(path):
    namespace, name = path.rsplit(".", 1)
    assert _resolve(tf_kld, path) is tf_kld.kl_divergence
    module = importlib.import_module(f"tf_kld.{namespace}")
    assert module is sys.modules[f"tf_kld.{namespace}"] is _resolve(tf_kld, namespace)
    assert getattr(module, name) is tf_kld.kl_divergence
    assert name in module.__all__


def test_top_level_aliases():
    for name in NAMES:
        assert getattr(tf_kld, name) is tf_kld.kl_divergence


def test_import_statements():
    import tf_kld.keras.losses  # noqa: F401  pylint: disable=import-outside-toplevel,redefined-outer-name
    from tf_kld.compat.v1.keras.metrics import kld  # pylint: disable=import-outside-toplevel
    from tf_kld.keras.losses import KLD  # pylint: disable=import-outside-toplevel
    from tf_kld.compat.v2 import losses  # pylint: disable=import-outside-toplevel

    assert KLD is kld is losses.kullback_leibler_divergence is tf_kld.kl_divergence
    assert importlib.util.find_spec("tf_kld.compat.v2.keras.metrics").name == "tf_kld.compat.v2.keras.metrics"
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("tf_kld.keras.optimizers")


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_namespace_classes(namespace):
    cls = _resolve(tf_kld, namespace).KLDivergence
    if namespace.endswith("losses"):
        assert cls is tf_kld.KLDivergence
        assert issubclass(cls, keras.losses.Loss)
    else:
        assert cls is tf_kld.keras.metrics.KLDivergence
        assert issubclass(cls, keras.metrics.Metric)


def test_covers_every_tensorflow_alias():
    """Each KL-divergence function TF 2.21 exposes in these namespaces has its name here too."""
    seen = 0
    for namespace in NAMESPACES:
        tf_ns = _resolve(tf, namespace)
        for name in dir(tf_ns):
            if getattr(tf_ns, name) is keras.losses.kl_divergence:
                assert name in NAMES, f"tf.{namespace}.{name} has no tf_kld alias"
                seen += 1
    assert seen >= 30  # KLD, kld, kullback_leibler_divergence in all ten


def test_aliases_pickle_by_reference():
    for obj in (tf_kld.keras.losses.KLD, tf_kld.compat.v1.keras.metrics.kld):
        assert pickle.loads(pickle.dumps(obj)) is tf_kld.kl_divergence
    assert pickle.loads(pickle.dumps(tf_kld.keras.metrics.KLDivergence)) is tf_kld.keras.metrics.KLDivergence


def test_docstrings():
    doc = tf_kld.keras.losses.KLD.__doc__
    assert "Standalone usage" in doc and "0.11891246" in doc and "TypeError" in doc
    for cls in (tf_kld.KLDivergence, tf_kld.keras.metrics.KLDivergence):
        assert "Standalone usage" in cls.__doc__ and "compile()" in cls.__doc__
    assert "tf.compat.v1.keras.metrics" in tf_kld.compat.v1.keras.metrics.__doc__
    assert tf_kld.keras.losses.KLD([.4, .9, .2], [.5, .8, .12]).numpy() == pytest.approx(0.11891246, rel=1e-6)
