"""Which implementation runs: the default path uses the custom op; the switches choose."""

import numpy as np
import pytest
import tensorflow as tf

import _util as U
import tf_kld
from tf_kld import ops as kld_ops

SPECS = (tf.TensorSpec([None, None], tf.float32), tf.TensorSpec([None, None], tf.float32))
T = np.array([[0.4, 0.9, 0.2], [0.0, 1.0, 0.5]], np.float32)
P = np.array([[0.5, 0.8, 0.12], [0.3, 0.3, 0.0]], np.float32)


def _loss_graph():
    return tf.function(tf_kld.kl_divergence).get_concrete_function(*SPECS)


def _grad_graph():
    @tf.function
    def grads(t, p):
        with tf.GradientTape() as tape:
            tape.watch([t, p])
            loss = tf_kld.kl_divergence(t, p)
        return tape.gradient(loss, [t, p])

    return grads.get_concrete_function(*SPECS)


def test_default_path_runs_custom_op(require_custom):
    cf = _loss_graph()
    types = U.graph_op_types(cf)
    assert U.FORWARD_OP in types
    assert "Log" not in types, "the default path must not build the composite"
    np.testing.assert_allclose(cf(T, P).numpy(), tf_kld.reference.kl_divergence(T, P).numpy(), rtol=1e-6)
    assert U.GRAD_OP in U.graph_op_types(_grad_graph())


def test_custom_grad_graph_builds_both_wrt(require_custom):
    grad_ops = [op for op in _grad_graph().graph.get_operations() if op.type == U.GRAD_OP]
    assert sorted(U.attr_str(op, "wrt") for op in grad_ops) == ["y_pred", "y_true"]


def test_reference_path_has_no_custom_op():
    with tf_kld.implementation("reference"):
        loss_types, grad_types = U.graph_op_types(_loss_graph()), U.graph_op_types(_grad_graph())
    assert "Log" in loss_types
    assert not (loss_types | grad_types) & {U.FORWARD_OP, U.GRAD_OP}


def test_auto_under_xla_uses_composite(monkeypatch):
    """jit_compile graphs get the composite under "auto" (the custom op has no XLA kernel to rely on)."""
    monkeypatch.delenv(kld_ops.IMPL_ENV, raising=False)
    loss = tf.function(tf_kld.kl_divergence, jit_compile=True)(tf.constant(T), tf.constant(P))
    np.testing.assert_allclose(loss.numpy(), tf_kld.reference.kl_divergence(T, P).numpy(), rtol=1e-6)


def test_env_selects_reference(monkeypatch):
    monkeypatch.setenv(kld_ops.IMPL_ENV, "reference")
    assert tf_kld.current_implementation() == "reference"
    types = U.graph_op_types(_loss_graph())
    assert U.FORWARD_OP not in types and "Log" in types
    np.testing.assert_allclose(tf_kld.kl_divergence(T, P).numpy(),
                               tf_kld.reference.kl_divergence(T, P).numpy(), rtol=0)


def test_context_overrides_env(monkeypatch, require_custom):
    monkeypatch.setenv(kld_ops.IMPL_ENV, "reference")
    with tf_kld.implementation("auto"):
        assert U.FORWARD_OP in U.graph_op_types(_loss_graph())
    assert tf_kld.current_implementation() == "reference"


@pytest.mark.parametrize("value", ["bogus", "Customm"])
def test_invalid_env_value_raises(monkeypatch, value):
    monkeypatch.setenv(kld_ops.IMPL_ENV, value)
    with pytest.raises(ValueError, match="TF_KLD_IMPL"):
        tf_kld.kl_divergence(T, P)


def test_invalid_implementation_name_raises():
    with pytest.raises(ValueError, match="bogus"):
        with tf_kld.implementation("bogus"):
            pass


def test_implementation_nests_and_restores(monkeypatch):
    monkeypatch.delenv(kld_ops.IMPL_ENV, raising=False)
    with tf_kld.implementation("reference"):
        with tf_kld.implementation("auto"):
            assert tf_kld.current_implementation() == "auto"
        assert tf_kld.current_implementation() == "reference"
        with pytest.raises(KeyError):
            with tf_kld.implementation("custom"):
                raise KeyError
        assert tf_kld.current_implementation() == "reference"
    assert tf_kld.current_implementation() == "auto"
