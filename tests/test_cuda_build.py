"""The CUDA build, checked without a GPU: a library built with TF_KLD_CUDA=1 registers GPU kernels of
both ops for every dtype, links no CUDA runtime, loads on a machine without a GPU, and its CPU
kernels give bit-identical results to the CPU-only library's.

Runs when TF_KLD_CUDA_LIBRARY names such a library (tools/cuda_ci.sh builds one and sets it),
skipped otherwise. Each library runs in its own interpreter: two libraries cannot register the same
ops in one process.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import tf_kld

CUDA_LIBRARY = os.environ.get("TF_KLD_CUDA_LIBRARY")
pytestmark = pytest.mark.skipif(not CUDA_LIBRARY,
                                reason="TF_KLD_CUDA_LIBRARY is not set (tools/cuda_ci.sh builds one)")

IMPORT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(tf_kld.__file__)))
OPS = ("TfKld>KlDivergence", "TfKld>KlDivergenceGrad")
DTYPES = ["bfloat16", "float16", "float32", "float64"]

_PROBE = r"""
import ctypes, json, sys
import numpy as np
import tensorflow as tf
from tensorflow.python.framework import kernels
import tf_kld

out = {"loaded": tf_kld.custom_op_loaded(), "error": tf_kld.ops.load_error(),
       "gpus": len(tf.config.list_physical_devices("GPU"))}
out["kernels"] = {
    op: sorted([k.device_type, tf.as_dtype(k.constraint[0].allowed_values.list.type[0]).name]
               for k in kernels.get_registered_kernels_for_op(op).kernel)
    for op in ("TfKld>KlDivergence", "TfKld>KlDivergenceGrad")}
try:
    fn = ctypes.CDLL(tf_kld.ops.library_path()).TfKldCudaArchs
    fn.restype = ctypes.c_char_p
    out["archs"] = fn().decode()
except AttributeError:
    out["archs"] = None

# Loss and both gradients on the CPU, same inputs in every process: uniform values with special
# ones (clip boundaries, NaN, Inf, negatives) mixed in; rows narrow, odd, and wide (chunked).
rng = np.random.default_rng(20240606)
specials = np.array([0.0, -0.0, -1.0, 1e-7, 1.0, 1.5, np.inf, -np.inf, np.nan, 1e-3, 0.5, 2e-7])
results = {}
with tf_kld.implementation("custom"), tf.device("/CPU:0"):
    for dtype in (tf.float16, tf.bfloat16, tf.float32, tf.float64):
        for shape in [(5, 7), (64, 100), (3, 40000), (2, 3, 17)]:
            t, p = (np.where(rng.uniform(size=shape) < 0.1, rng.choice(specials, size=shape),
                             rng.uniform(size=shape)) for _ in range(2))
            yt, yp = tf.constant(t, dtype), tf.constant(p, dtype)
            with tf.GradientTape(persistent=True) as tape:
                tape.watch([yt, yp])
                loss = tf_kld.kl_divergence(yt, yp)
                total = tf.reduce_sum(loss * tf.cast(tf.range(1, 1 + loss.shape[-1]), dtype))
            d_true, d_pred = tape.gradient(total, [yt, yp])
            key = f"{dtype.name}_{'x'.join(map(str, shape))}"
            for name, x in (("loss", loss), ("d_true", d_true), ("d_pred", d_pred)):
                x = tf.cast(x, tf.float64) if dtype == tf.bfloat16 else x
                results[f"{key}_{name}"] = x.numpy()
np.savez(sys.argv[1], **results)
print("RESULT " + json.dumps(out))
"""


def _probe(library, npz):
    env = dict(os.environ, TF_KLD_LIBRARY=library, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("TF_KLD_IMPL", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [IMPORT_ROOT, env.get("PYTHONPATH")]))
    return subprocess.Popen([sys.executable, "-c", _PROBE, str(npz)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def probes(tmp_path_factory):
    """{"cuda"|"cpu": (probe output, results)} for the CUDA library and the CPU-only one, concurrently."""
    tmp = tmp_path_factory.mktemp("cuda_build")
    libraries = {"cuda": CUDA_LIBRARY, "cpu": tf_kld.ops.library_path()}
    assert os.path.exists(CUDA_LIBRARY), CUDA_LIBRARY
    assert tf_kld.custom_op_loaded(), f"the CPU-only library is needed: {tf_kld.ops.load_error()}"
    procs = {name: _probe(lib, tmp / f"{name}.npz") for name, lib in libraries.items()}
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
        assert proc.returncode == 0 and lines, f"{name} probe failed ({libraries[name]}):\n{stderr[-3000:]}"
        with np.load(tmp / f"{name}.npz") as data:
            out[name] = (json.loads(lines[-1][7:]), dict(data))
    return out


def test_cuda_library_loads_without_a_gpu(probes):
    info, _ = probes["cuda"]
    assert info["loaded"], info["error"]
    assert info["gpus"] == 0, "this test is meant for a machine without a GPU"


@pytest.mark.parametrize("op", OPS)
def test_gpu_kernels_registered_for_every_dtype(probes, op):
    info, _ = probes["cuda"]
    registered = info["kernels"][op]
    assert sorted(dtype for device, dtype in registered if device == "GPU") == DTYPES, registered
    assert sorted(dtype for device, dtype in registered if device == "CPU") == DTYPES, registered
    cpu_only = probes["cpu"][0]["kernels"][op]
    assert all(device == "CPU" for device, _ in cpu_only), cpu_only


def test_cuda_archs_reported(probes):
    archs = probes["cuda"][0]["archs"]
    assert archs and all(a.strip().isdigit() and int(a) >= 750 for a in archs.split(",")), archs
    assert probes["cpu"][0]["archs"] is None


def test_no_cuda_runtime_linked():
    def readelf(flag):
        return subprocess.run(["readelf", flag, CUDA_LIBRARY], capture_output=True, text=True, check=True).stdout

    needed = [line for line in readelf("-d").splitlines() if "(NEEDED)" in line]
    assert not [line for line in needed if "cuda" in line.lower()], needed
    sections = readelf("-S")
    assert ".nv_fatbin" in sections, "no device code in the library"


def test_cpu_results_bit_identical(probes):
    cuda, cpu = probes["cuda"][1], probes["cpu"][1]
    assert sorted(cuda) == sorted(cpu) and len(cpu) == 4 * 4 * 3
    for key in cpu:
        a, b = cpu[key], cuda[key]
        assert a.dtype == b.dtype and a.shape == b.shape, key
        same = (a.view(f"u{a.itemsize}") == b.view(f"u{b.itemsize}")) | (np.isnan(a) & np.isnan(b))
        assert same.all(), f"{key}: {np.count_nonzero(~same)} values differ"
