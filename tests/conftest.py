"""Fixtures: every op test runs on both paths ("custom", "reference"); helpers live in _util.py."""

import importlib.util
import os
import sys
import zlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if importlib.util.find_spec("tf_kld") is None:  # plain `pytest` from a checkout
    sys.path.insert(0, REPO_ROOT)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import tf_kld  # noqa: E402
from tf_kld import ops as kld_ops  # noqa: E402


def _custom_missing_message():
    return (f"the tf_kld custom op library is not loaded ({kld_ops.load_error()}); this test needs "
            f"it. Build tf_kld/_kld_ops.so or set TF_KLD_LIBRARY to a built library.")


def _needs_custom(item):
    callspec = getattr(item, "callspec", None)
    if callspec is not None and callspec.params.get("impl") == "custom":
        return True
    return "require_custom" in getattr(item, "fixturenames", ())


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item):
    # A missing library fails (never skips) every test of the custom path, in the call phase.
    if _needs_custom(item) and not tf_kld.custom_op_loaded():
        pytest.fail(_custom_missing_message(), pytrace=False)


@pytest.fixture(params=["custom", "reference"])
def impl(request):
    """Runs the test inside tf_kld.implementation(<param>)."""
    with tf_kld.implementation(request.param):
        yield request.param


@pytest.fixture
def require_custom(monkeypatch):
    """For custom-only tests of the default ("auto") path: the library must be loaded."""
    monkeypatch.delenv(kld_ops.IMPL_ENV, raising=False)
    assert tf_kld.current_implementation() == "auto"


@pytest.fixture
def rng(request):
    """A NumPy generator seeded from the test's id: reproducible, different per test."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def restore_epsilon():
    eps = keras.backend.epsilon()
    try:
        yield
    finally:
        keras.backend.set_epsilon(eps)
