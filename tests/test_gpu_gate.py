"""The GPU kernels' driver gate and tf_kld.gpu_info(), on any build (the gate is in every library):
the gate's decision as a pure function, gpu_info() of this build, and the dispatch rule that gives
ops placed on a GPU the composite when the library has no GPU kernels there (GPUs simulated).
tests/test_cuda_build.py checks the same on a CUDA build, where the gate decides registration."""

import numpy as np
import pytest
import tensorflow as tf

import _util as U
import tf_kld
from tf_kld import gpu
from tf_kld import ops as kld_ops

NEED = 13000  # nvcc 13.0 device code


@pytest.fixture(autouse=True)
def _library(require_custom):
    yield


@pytest.mark.parametrize("driver", [0, 12020, 12080, 12090, 12999])
@pytest.mark.parametrize("gpus", [1, 4])
def test_gate_refuses_old_or_missing_driver_with_gpus(driver, gpus):
    register, reason = gpu.gate(driver, gpus, NEED)
    assert not register
    assert "CUDA 13.0 (R580 or newer)" in reason and "cudaDriverGetVersion >= 13000" in reason, reason
    if driver:
        found = f"{driver // 1000}.{driver % 1000 // 10}"
        assert f"supports CUDA {found} (cudaDriverGetVersion {driver})" in reason, reason
    else:
        assert f"shows {gpus} GPU(s) but no usable CUDA driver" in reason, reason
    assert "composite" in reason and "Upgrade the driver" in reason


@pytest.mark.parametrize("driver", [13000, 13010, 14000])
@pytest.mark.parametrize("gpus", [1, 8])
def test_gate_registers_at_and_above_the_need(driver, gpus):
    assert gpu.gate(driver, gpus, NEED) == (True, None)


@pytest.mark.parametrize("driver", [0, 12080, 13000])
def test_gate_registers_without_gpus(driver):
    # No GPU at all: as before the gate, nothing can place an op on a GPU.
    assert gpu.gate(driver, 0, NEED) == (True, None)


def test_gate_names_other_needs():
    register, reason = gpu.gate(12040, 1, 12080)
    assert not register and "CUDA 12.8 (R570 or newer)" in reason and "CUDA 12.4" in reason, reason


def test_gpu_info_of_this_build():
    info = tf_kld.gpu_info()
    assert set(info) == {"built_archs", "driver_version", "needed_driver_version", "kernels_registered",
                         "reason"}
    assert info["driver_version"] is None or info["driver_version"] > 0
    assert info == tf_kld.gpu_info() and info is not tf_kld.gpu_info()  # a copy each time
    if info["built_archs"]:  # a CUDA build (tests/test_cuda_build.py checks those in detail)
        assert info["needed_driver_version"] >= 13000
        assert info["kernels_registered"] == (info["reason"] is None)
    else:
        assert info["needed_driver_version"] is None and info["kernels_registered"] is False
        assert "built without CUDA kernels" in info["reason"], info


# ---- dispatch: an op placed on a GPU the library has no kernels for gets the composite -------

T = np.array([[0.4, 0.9, 0.2], [0.0, 1.0, 0.5]], np.float32)
P = np.array([[0.5, 0.8, 0.12], [0.3, 0.3, 0.0]], np.float32)


@pytest.fixture
def gpus_without_kernels(monkeypatch):
    """As on a machine whose GPUs the library has no kernels for (CPU build, or the gate said no)."""
    info = dict(gpu.gpu_info(), kernels_registered=False, reason="simulated")
    monkeypatch.setattr(gpu, "_info", lambda: info)
    monkeypatch.setattr(gpu, "_gpus_visible", lambda: True)


def _op_types(fn):
    return U.graph_op_types(tf.function(fn).get_concrete_function())


def test_no_gpus_keeps_the_custom_op():
    assert not gpu.composite_on_gpu()
    assert kld_ops.use_custom_op()


@pytest.mark.parametrize("scope", [None, "/GPU:0", "/device:GPU:1", "/job:localhost/replica:0/task:0"])
def test_gpu_placement_gets_the_composite(gpus_without_kernels, scope):
    def loss():
        return tf_kld.kl_divergence(tf.constant(T), tf.constant(P))

    def scoped():
        if scope is None:
            return loss()
        with tf.device(scope):
            return loss()

    assert U.FORWARD_OP not in _op_types(scoped)
    assert "Log" in _op_types(scoped)


@pytest.mark.parametrize("scope", ["/CPU:0", "/job:localhost/replica:0/task:0/device:CPU:0", "cpu:0"])
def test_cpu_placement_keeps_the_custom_op(gpus_without_kernels, scope):
    def inner():
        with tf.device(scope):
            return tf_kld.kl_divergence(tf.constant(T), tf.constant(P))

    assert U.FORWARD_OP in _op_types(inner)
    with tf.device(scope):  # eagerly, and a tf.function traced inside the scope
        assert kld_ops.use_custom_op()
        assert U.FORWARD_OP in _op_types(lambda: tf_kld.kl_divergence(tf.constant(T), tf.constant(P)))
    # A GPU scope inside a CPU one wins, and the other way round.
    with tf.device(scope), tf.device("/GPU:0"):
        assert not kld_ops.use_custom_op()
    with tf.device("/GPU:0"), tf.device(scope):
        assert kld_ops.use_custom_op()


def test_gpu_placement_values_and_switches(gpus_without_kernels):
    want = tf_kld.reference.kl_divergence(T, P).numpy()
    assert not kld_ops.use_custom_op()
    np.testing.assert_allclose(tf_kld.kl_divergence(T, P).numpy(), want, rtol=1e-6)
    with tf_kld.implementation("custom"):  # asked for explicitly: the custom op, wherever it runs
        assert kld_ops.use_custom_op()
        np.testing.assert_allclose(tf_kld.kl_divergence(T, P).numpy(), want, rtol=1e-6)
