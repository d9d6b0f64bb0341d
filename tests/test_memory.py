"""Memory: the fused op allocates its outputs and nothing else (a regression test for temporaries).

Each figure is the benchmark's own measurement (bench/bench.py --memory-child), made in a fresh
process: the peak resident memory of one call beyond what existed before it (VmHWM after
/proc/self/clear_refs, once the inputs exist and the function is traced), with glibc's mmap
threshold fixed so that every large buffer is mapped when allocated and unmapped when freed.
The inputs are float32 [1024, 2048]: the gradient is 8 MiB, the loss and its upstream gradient
8 KiB together, so any per-element temporary (>= 4 MiB) shows.
"""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import bench  # noqa: E402  pylint: disable=wrong-import-position

SHAPE = (1024, 2048)
GRAD_BYTES = 4 * SHAPE[0] * SHAPE[1]

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"),
                                reason="needs Linux's /proc/self/clear_refs to reset VmHWM")


@pytest.fixture(scope="module")
def peaks():
    """{(path, mode): peak extra bytes}, each from bench.peak_memory's fresh process."""
    results = {}
    for impl, mode in [("tf_kld", "fwd"), ("tf_kld", "fwd+bwd"), ("tf.function composite", "fwd+bwd")]:
        results[(impl, mode)] = bench.peak_memory(impl, SHAPE, mode)
        assert results[(impl, mode)] is not None, f"measuring {impl} {mode} failed (stderr above)"
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
