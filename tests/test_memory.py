"""Memory: the fused op allocates its outputs and nothing else (a regression test for temporaries).

Each figure is the benchmark's own measurement (bench/bench.py --memory-child), made in a fresh
process: the peak resident memory of one call beyond what existed before it (VmHWM after
/proc/self/clear_refs, once the inputs exist and the function is traced), with glibc's mmap
threshold fixed so that every large buffer is mapped when allocated and unmapped when freed.
The inputs are float32 [1024, 2048]: the gradient is 8 MiB, the loss and its upstream gradient
8 KiB together, so any per-element temporary (>= 4 MiB) shows.
"""

import json
import os
import subprocess
import sys

import pytest

SHAPE = (1024, 2048)
GRAD_BYTES = 4 * SHAPE[0] * SHAPE[1]
BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "bench.py")

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"),
                                reason="needs Linux's /proc/self/clear_refs to reset VmHWM")


@pytest.fixture(scope="module")
def peaks():
    """{(path, mode): peak extra bytes}, the children run two at a time."""
    wanted = [("tf_kld", "fwd"), ("tf_kld", "fwd+bwd"), ("tf.function composite", "fwd+bwd")]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072",
               TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("TF_KLD_IMPL", None)
    results = {}
    for batch in (wanted[:2], wanted[2:]):
        procs = {key: subprocess.Popen(
            [sys.executable, BENCH, "--memory-child", key[0], f"{SHAPE[0]}x{SHAPE[1]}", key[1]],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for key in batch}
        for key, proc in procs.items():
            out, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, f"{key}: {err[-2000:]}"
            line = [l for l in out.splitlines() if l.startswith("{")][-1]
            results[key] = json.loads(line)["peak_extra_bytes"]
    return results


def test_forward_and_gradient_allocate_only_the_gradient(require_custom, peaks):
    extra = peaks[("tf_kld", "fwd+bwd")]
    assert 0.9 * GRAD_BYTES <= extra <= 1.1 * GRAD_BYTES, (
        f"fused fwd+bwd took {extra / 2**20:.2f} MiB beyond its inputs; the gradient is "
        f"{GRAD_BYTES / 2**20:.0f} MiB and nothing else should be that large")


def test_forward_allocates_nothing_per_element(require_custom, peaks):
    extra = peaks[("tf_kld", "fwd")]
    assert extra <= 0.05 * GRAD_BYTES, f"fused forward took {extra / 2**20:.2f} MiB"


def test_the_measurement_sees_temporaries(peaks):
    # The fallback path (the plain composite) materialises clipped inputs, the ratio, its log and
    # their gradients: the same measurement has to report them, or the bounds above prove nothing.
    extra = peaks[("tf.function composite", "fwd+bwd")]
    assert extra >= 2 * GRAD_BYTES, f"the composite's fwd+bwd measured {extra / 2**20:.2f} MiB"
