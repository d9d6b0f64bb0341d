"""The CUDA build, checked without a GPU: a library built with TF_KLD_CUDA=1 registers GPU kernels of
the KL ops and of the distillation ops (their device code in the fatbinary) for every dtype, links
no CUDA runtime, exports no Eigen:: or tf_kld::gpu:: symbols, loads on a machine without a GPU, and
its CPU kernels (both families) give bit-identical results to the CPU-only library's. Its driver gate (cc/kernels/kld_gpu_gate.h) is checked by standing in for a machine with
GPUs and an old or a new driver (TF_KLD_TEST_DRIVER_VERSION, TF_KLD_TEST_GPU_COUNT), and
tf_kld.gpu_info() on both builds. With TF_KLD_CUDA_HARNESS_DIR (tools/cuda_ci.sh sets it), the
harness binaries built by tools/cuda_harness.sh are checked too: the variant linked against
TensorFlow's libcudart.so.12 really is, and neither uses cudaGetDeviceProperties.

Runs when TF_KLD_CUDA_LIBRARY names such a library (tools/cuda_ci.sh builds one and sets it),
skipped otherwise. Each library runs in its own interpreter: two libraries cannot register the same
ops in one process.
"""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import tf_kld

CUDA_LIBRARY = os.environ.get("TF_KLD_CUDA_LIBRARY")
pytestmark = pytest.mark.skipif(not CUDA_LIBRARY,
                                reason="TF_KLD_CUDA_LIBRARY is not set (tools/cuda_ci.sh builds one)")

IMPORT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(tf_kld.__file__)))
OPS = ("TfKld>KlDivergence", "TfKld>KlDivergenceGrad", "TfKld>KlDivergenceWithLogits",
       "TfKld>KlDivergenceWithLogitsGrad", "TfKld>GeneralizedJsdWithLogits", "TfKld>GeneralizedJsdWithLogitsGrad")
DTYPES = ["bfloat16", "float16", "float32", "float64"]

_PROBE = r"""
import ctypes, json, sys
import numpy as np
import tensorflow as tf
from tensorflow.python.framework import kernels

import warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import tf_kld
out = {"loaded": tf_kld.custom_op_loaded(), "error": tf_kld.ops.load_error(),
       "gpus": len(tf.config.list_physical_devices("GPU")), "gpu_info": tf_kld.gpu_info(),
       "warnings": [str(w.message) for w in caught if "tf_kld" in str(w.message)]}
out["kernels"] = {
    op: sorted([k.device_type, tf.as_dtype(k.constraint[0].allowed_values.list.type[0]).name]
               for k in kernels.get_registered_kernels_for_op(op).kernel)
    for op in sys.argv[2].split(",")}
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
        # The distillation ops (distill_kernels.cc is compiled with GOOGLE_CUDA=1 in the CUDA build):
        # logits with -inf, NaN and huge values mixed in, one narrow and one chunked width.
        logit_specials = np.array([-np.inf, np.nan, 1e4, -1e4, 0.0])
        for shape in [(6, 33), (2, 40000)]:
            t, p = (np.where(rng.uniform(size=shape) < 0.05, rng.choice(logit_specials, size=shape),
                             3 * rng.normal(size=shape)) for _ in range(2))
            yt, yp = tf.constant(t, dtype), tf.constant(p, dtype)
            for fn_name, fn in (("kl", lambda a, b: tf_kld.kl_divergence_with_logits(a, b, temperature=2.0)),
                                ("jsd", lambda a, b: tf_kld.generalized_jsd_with_logits(a, b, 0.3, 2.0))):
                with tf.GradientTape(persistent=True) as tape:
                    tape.watch([yt, yp])
                    loss = fn(yt, yp)
                    total = tf.reduce_sum(loss * tf.cast(tf.range(1, 1 + loss.shape[-1]), dtype))
                d_true, d_pred = tape.gradient(total, [yt, yp])
                key = f"{fn_name}_{dtype.name}_{'x'.join(map(str, shape))}"
                for name, x in (("loss", loss), ("d_true", d_true), ("d_pred", d_pred)):
                    x = tf.cast(x, tf.float64) if dtype == tf.bfloat16 else x
                    results[f"{key}_{name}"] = x.numpy()
np.savez(sys.argv[1], **results)
print("RESULT " + json.dumps(out))
"""


def _probe(library, npz, **env_extra):
    env = dict(os.environ, TF_KLD_LIBRARY=library, TF_CPP_MIN_LOG_LEVEL="2", **env_extra)
    env.pop("TF_KLD_IMPL", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [IMPORT_ROOT, env.get("PYTHONPATH")]))
    return subprocess.Popen([sys.executable, "-c", _PROBE, str(npz), ",".join(OPS)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


# Probes: the CUDA library and the CPU-only one as they are here (no GPU), and the CUDA library on
# stand-ins for machines with GPUs: a driver for CUDA 12.8 (R570, too old for nvcc 13 device code),
# one for CUDA 13.0 (R580, enough), and GPUs without a usable driver.
# nvcc 13 builds need 13000; clang builds (TF_KLD_CUDA_COMPILER=clang) 12000 (R525, TensorFlow's own).
NEEDED = int(os.environ.get("TF_KLD_CUDA_NEEDED_DRIVER", "13000"))
OLD_DRIVER = NEEDED - 920  # 13000 -> 12080 (CUDA 12.8, R570); 12000 -> 11080 (CUDA 11.8)
PROBES = {
    "cuda": {},
    "cpu": None,
    "cuda_old_driver": {"TF_KLD_TEST_DRIVER_VERSION": str(OLD_DRIVER), "TF_KLD_TEST_GPU_COUNT": "2"},
    "cuda_new_driver": {"TF_KLD_TEST_DRIVER_VERSION": str(NEEDED), "TF_KLD_TEST_GPU_COUNT": "2"},
    "cuda_no_driver": {"TF_KLD_TEST_DRIVER_VERSION": "0", "TF_KLD_TEST_GPU_COUNT": "1"},
}


def _cuda(version):
    return f"CUDA {version // 1000}.{version % 1000 // 10}"


@pytest.fixture(scope="module")
def probes(tmp_path_factory):
    """{name: (probe output, results)} for each of PROBES, two at a time."""
    tmp = tmp_path_factory.mktemp("cuda_build")
    assert os.path.exists(CUDA_LIBRARY), CUDA_LIBRARY
    assert tf_kld.custom_op_loaded(), f"the CPU-only library is needed: {tf_kld.ops.load_error()}"
    out = {}
    names = list(PROBES)
    for batch in (names[i:i + 2] for i in range(0, len(names), 2)):
        procs = {}
        for name in batch:
            library = tf_kld.ops.library_path() if PROBES[name] is None else CUDA_LIBRARY
            procs[name] = (library, _probe(library, tmp / f"{name}.npz", **(PROBES[name] or {})))
        for name, (library, proc) in procs.items():
            stdout, stderr = proc.communicate(timeout=600)
            lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
            assert proc.returncode == 0 and lines, f"{name} probe failed ({library}):\n{stderr[-3000:]}"
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
    cpu_only = probes["cpu"][0]["kernels"][op]  # CPU kernels and XLA's compilation kernels, no GPU
    assert sorted(dtype for device, dtype in cpu_only if device == "CPU") == DTYPES, cpu_only
    assert not [device for device, _ in cpu_only if device == "GPU"], cpu_only


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


@pytest.mark.parametrize("name", ["cuda", "cuda_old_driver"])
def test_cpu_results_bit_identical(probes, name):
    cuda, cpu = probes[name][1], probes["cpu"][1]
    assert sorted(cuda) == sorted(cpu) and len(cpu) == 4 * 4 * 3 + 4 * 2 * 2 * 3
    for key in cpu:
        a, b = cpu[key], cuda[key]
        assert a.dtype == b.dtype and a.shape == b.shape, key
        same = (a.view(f"u{a.itemsize}") == b.view(f"u{b.itemsize}")) | (np.isnan(a) & np.isnan(b))
        assert same.all(), f"{key}: {np.count_nonzero(~same)} values differ"


def _built_archs(probe):
    return sorted({int(a) // 10 for a in probe["archs"].split(",")})


def test_gpu_info_cuda_build_without_gpu(probes):
    info = probes["cuda"][0]
    assert info["gpu_info"] == {"built_archs": _built_archs(info), "driver_version": None,
                                "needed_driver_version": NEEDED, "kernels_registered": True, "reason": None}
    assert info["gpu_info"]["built_archs"] and not info["warnings"], info


def test_gpu_info_cpu_build(probes):
    info = probes["cpu"][0]["gpu_info"]
    assert info["built_archs"] == [] and info["needed_driver_version"] is None
    assert info["kernels_registered"] is False and "built without CUDA kernels" in info["reason"]
    assert not probes["cpu"][0]["warnings"]


@pytest.mark.parametrize("name, driver", [("cuda_old_driver", OLD_DRIVER), ("cuda_no_driver", None)])
def test_old_or_missing_driver_registers_no_gpu_kernels(probes, name, driver):
    info = probes[name][0]
    for op in OPS:
        assert sorted(d for device, d in info["kernels"][op] if device == "CPU") == DTYPES, info["kernels"]
        assert not [k for k in info["kernels"][op] if k[0] == "GPU"], info["kernels"]
    gpu_info = info["gpu_info"]
    assert gpu_info["kernels_registered"] is False and gpu_info["driver_version"] == driver
    assert gpu_info["built_archs"] == _built_archs(info)
    reason = gpu_info["reason"]
    branch = {13000: "R580", 12000: "R525"}[NEEDED]
    assert f"{_cuda(NEEDED)} ({branch} or newer)" in reason, reason
    found = f"{_cuda(driver)} (cudaDriverGetVersion {driver})" if driver else "no usable CUDA driver"
    assert found in reason, reason
    # One warning at import, naming the driver found and the one needed.
    assert info["warnings"] == [f"tf_kld: {reason}"], info["warnings"]


def test_new_driver_registers_gpu_kernels(probes):
    info = probes["cuda_new_driver"][0]
    for op in OPS:
        assert sorted(d for device, d in info["kernels"][op] if device == "GPU") == DTYPES, info["kernels"]
    assert info["gpu_info"]["kernels_registered"] is True and info["gpu_info"]["reason"] is None
    assert info["gpu_info"]["driver_version"] == NEEDED and not info["warnings"]


def _exported(library):
    out = subprocess.run(["nm", "-D", "--defined-only", "-C", library], capture_output=True, text=True,
                         check=True).stdout
    return [line.split(" ", 2)[2] for line in out.splitlines() if line.count(" ") >= 2]


def test_no_eigen_or_gpu_internals_exported():
    symbols = _exported(CUDA_LIBRARY)
    assert "TfKldCudaArchs" in symbols and "TfKldGpuKernelsRegistered" in symbols
    leaked = [s for s in symbols
              if s.startswith("Eigen::") or "tf_kld::gpu::" in s or "tf_kld::distill_gpu::" in s]
    assert not leaked, leaked[:20]


def test_only_exact_math_kernels_compiled_in():
    # The fast_math kernels (kld_gpu.cu.h, 16-bit types) are the harness's; the library uses none.
    with open(CUDA_LIBRARY, "rb") as f:
        names = set(re.findall(rb"_ZN6tf_kld3gpu1[34](?:Forward|Gradient)KernelI(?:6__half|13__nv_bfloat16|f|d)"
                               rb"Lb([01])E", f.read()))
    assert names == {b"0"}, names


def test_distillation_kernels_in_the_fatbinary(tmp_path):
    # The device code itself (the .nv_fatbin section, not only the host-side launch stubs): both
    # kernels of the distillation core for every dtype.
    fatbin = tmp_path / "fatbin"
    subprocess.run(["objcopy", "-O", "binary", "--only-section=.nv_fatbin", CUDA_LIBRARY, str(fatbin)],
                   check=True)
    names = set(re.findall(rb"_ZN6tf_kld3gpu7distill(13Forward|14Gradient)KernelI(6__half|13__nv_bfloat16|f|d)E",
                           fatbin.read_bytes()))
    assert len(names) == 8, sorted(names)


HARNESS_DIR = os.environ.get("TF_KLD_CUDA_HARNESS_DIR")


@pytest.mark.skipif(not HARNESS_DIR, reason="TF_KLD_CUDA_HARNESS_DIR is not set (tools/cuda_ci.sh sets it)")
@pytest.mark.parametrize("variant", ["harness", "harness_cudart12", "harness_clang"])
def test_harness_variants(variant):
    binary = os.path.join(HARNESS_DIR, variant)
    if variant == "harness_clang" and not os.path.exists(binary):
        pytest.skip("the clang variant is built by cuda_harness.sh --clang only")
    needed = subprocess.run(["readelf", "-d", binary], capture_output=True, text=True, check=True).stdout
    imports = subprocess.run(["nm", "-D", "--undefined-only", binary], capture_output=True, text=True,
                             check=True).stdout
    if variant != "harness":  # TensorFlow's runtime, as the op library uses it
        assert "[libcudart.so.12]" in needed, needed
        assert "cudaLaunchKernel" in imports and "cudaDeviceGetAttribute" in imports
        # CUDA 12's cudaDeviceProp has another layout than the one the harness is compiled with.
        assert "cudaGetDeviceProperties" not in imports
    else:  # CUDA 13's runtime, linked statically
        assert "libcudart" not in needed, needed
