"""The op library's GPU kernels on this machine: `tf_kld.gpu_info()`, and the dispatch rule for ops
placed on a GPU when the library has no GPU kernels there.

A CUDA build registers its GPU kernels only where the driver can run its device code (the driver
gate, cc/kernels/kld_gpu_gate.h): nvcc 13 device code needs a driver for CUDA 13.0 (R580+), while
TensorFlow runs on R525+. Where the kernels are not registered (the gate said no, or a CPU-only
build) and an op would be placed on a GPU, `implementation("auto")` emits the pure-TF composite,
which runs on the GPU, rather than the CPU kernel with copies to and from the device.
"""

import ctypes
import functools
import warnings

import tensorflow as tf
from tensorflow.python.eager import context
from tensorflow.python.framework import ops as tf_ops

from tf_kld import ops


def _library_int(symbol):
    fn = ops._library_feature(symbol)  # pylint: disable=protected-access
    return None if fn is None else int(fn())


def _library_text(symbol):
    fn = ops._library_feature(symbol)  # pylint: disable=protected-access
    if fn is None:
        return None
    fn.restype = ctypes.c_char_p
    return fn().decode()


def gate(driver_version, gpus, needed):
    """The driver gate's decision, from the library's own C function (TfKldGpuGate):
    (register the GPU kernels?, why not or None). driver_version as cudaDriverGetVersion gives it
    (0: no usable driver), gpus: GPUs on the machine, needed: the version the device code needs."""
    fn = ops._library_feature("TfKldGpuGate")  # pylint: disable=protected-access
    if fn is None:
        raise RuntimeError(f"tf_kld: the op library is not loaded ({ops.load_error()})")
    reason = ctypes.create_string_buffer(1024)
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    register = bool(fn(driver_version, gpus, needed, reason, len(reason)))
    return register, (reason.value.decode() or None)


@functools.lru_cache(maxsize=None)
def _info():
    if not ops.custom_op_loaded():
        return {"built_archs": [], "driver_version": None, "needed_driver_version": None,
                "kernels_registered": False, "reason": f"the op library is not loaded: {ops.load_error()}"}
    archs = _library_text("TfKldCudaArchs")
    driver = _library_int("TfKldCudaDriverVersion")
    info = {
        # __CUDA_ARCH_LIST__ order and spelling: "750,800,860,890,900" -> [75, 80, 86, 89, 90].
        "built_archs": sorted({int(a) // 10 for a in archs.split(",") if a.strip()}) if archs else [],
        "driver_version": driver or None,
        "needed_driver_version": _library_int("TfKldNeededDriverVersion"),
        "kernels_registered": bool(_library_int("TfKldGpuKernelsRegistered")),
    }
    if info["kernels_registered"]:
        info["reason"] = None
    elif archs:
        info["reason"] = _library_text("TfKldGpuGateReason") or None
    else:
        info["reason"] = ("the op library was built without CUDA kernels (TF_KLD_CUDA=1 builds them); "
                          "ops placed on a GPU run as the pure-TensorFlow composite under "
                          "implementation('auto')")
    return info


def gpu_info():
    """What the op library can do on GPUs here, as a dict:

    * ``built_archs``: the SM versions with device code in the library, e.g. [75, 80, 86, 89, 90]
      ([] for a CPU-only build);
    * ``driver_version``: the CUDA driver's version as ``cudaDriverGetVersion`` gives it (e.g.
      12080 for CUDA 12.8), None without a driver;
    * ``needed_driver_version``: what the device code needs (13000 for nvcc 13), None for a CPU build;
    * ``kernels_registered``: whether the GPU kernels are registered with TensorFlow;
    * ``reason``: None, or why they are not.
    """
    return {key: list(value) if isinstance(value, list) else value for key, value in _info().items()}


# --------------------------------------------------------------------------------------------
# Dispatch


@functools.lru_cache(maxsize=None)
def _has_physical_gpus():
    # Listing physical devices does not initialise TensorFlow's runtime (memory growth etc. stay
    # configurable); a machine without GPUs never gets further than this.
    return bool(tf.config.list_physical_devices("GPU"))


@functools.lru_cache(maxsize=None)
def _gpus_visible():
    """Whether TensorFlow has GPUs to place ops on (fixed once its runtime has started, which
    listing logical devices does: this runs when the first op is built)."""
    return _has_physical_gpus() and bool(tf.config.list_logical_devices("GPU"))


def _scope_device_type():
    """The device type named by the innermost tf.device scope in effect, or None when no scope
    names one (TensorFlow then prefers a GPU) or a device function decides."""
    if not tf.executing_eagerly():
        # pylint: disable=protected-access
        specs = [s for s in tf_ops.get_default_graph()._device_function_stack.peek_objs()
                 if not s.is_null_merge]
        for spec in specs:
            if spec.function is None or spec.raw_string is None:
                return None  # a cleared scope, or a device function
            device_type = tf.DeviceSpec.from_string(spec.raw_string).device_type
            if device_type:
                return device_type.upper()
        if specs:  # scopes without a device type (the context below has resolved them already)
            return None
    name = context.context().device_name  # the eager scope, also where a tf.function is traced
    if not name:
        return None
    return (tf.DeviceSpec.from_string(name).device_type or "").upper() or None


def composite_on_gpu():
    """True when an op built now would be placed on a GPU that the library has no kernels for:
    `implementation("auto")` then emits the composite (never the CPU kernel with device copies)."""
    if _info()["kernels_registered"] or not _gpus_visible():
        return False
    return _scope_device_type() != "CPU"


if _info()["built_archs"] and not _info()["kernels_registered"]:
    warnings.warn(f"tf_kld: {_info()['reason']}", RuntimeWarning, stacklevel=2)
