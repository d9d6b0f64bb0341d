"""Memory: the fused op allocates its outputs and nothing else (a regression test for temporaries).

Each figure is the benchmark's own measurement (bench/bench.py --memory-child), made in a fresh
process: the peak resident memory of one call beyond what existed before it (VmHWM after
/proc/self/clear_refs, once the inputs exist and the function is traced), with glibc's mmap
threshold fixed so that every large buffer is mapped when allocated and unmapped when freed.
The inputs are float32 [1024, 2048]: the gradient is 8 MiB, the loss and its upstream gradient
8 KiB together, so any per-element temporary (>= 4 MiB) shows.

The same child first calibrates: a TensorFlow call that allocates one 8 MiB buffer must show up.
With oneDNN on (Intel's default; TF_ENABLE_ONEDNN_OPTS=1 anywhere) TensorFlow's CPU allocator keeps
freed buffers and the calibration sees nothing; the benchmark then measures again with oneDNN off,
and reports "not measurable here" (never a pass) if that does not help either. CI runs this file
with TF_ENABLE_ONEDNN_OPTS=1 and =0.
"""

import json
import os
import platform
import subprocess
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
        measured = bench.peak_memory(impl, SHAPE, mode)
        assert measured["bytes"] is not None, f"measuring {impl} {mode}: {measured['note']}"
        results[(impl, mode)] = measured["bytes"]
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


def test_an_allocator_that_keeps_memory_is_never_reported_as_met(monkeypatch):
    # A child whose calibration saw nothing (a pooling allocator) in every environment tried.
    child = {"peak_extra_bytes": 0, "calibration_bytes": GRAD_BYTES, "calibration_seen_bytes": 8192}

    def fake_run(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 0, stdout=json.dumps(child) + "\n", stderr="")
    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    monkeypatch.setattr(bench, "_POOLING_SEEN", [])  # what the fake finds is not kept for later tests
    measured = bench.peak_memory("tf_kld", SHAPE, "fwd+bwd")
    assert measured["bytes"] is None and measured["note"].startswith(bench.NOT_MEASURABLE), measured
    memory = [{"shape": "1024x2048", "mode": "fwd+bwd", "impl": "tf_kld", "peak_extra_mib": None,
               "x_gradient_buffer": None, "measured_with": measured["note"]}]
    targets = bench._targets([], memory, [], 1.0)  # pylint: disable=protected-access
    assert len(targets) == 1 and targets[0]["met"] is False and targets[0]["value"] is None


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="oneDNN's allocator is x86's")
def test_the_calibration_sees_a_pooling_allocator():
    # With oneDNN forced on, TensorFlow 2.21's CPU allocator pools freed buffers on x86: the child's
    # calibration must notice (else the measurements above could pass without seeing anything).
    env = dict(os.environ, **bench.MEMORY_ENV, TF_ENABLE_ONEDNN_OPTS="1")
    proc = subprocess.run([sys.executable, bench.__file__, "--memory-child", "tf.function composite",
                           f"{SHAPE[0]}x{SHAPE[1]}", "fwd+bwd"], capture_output=True, text=True,
                          env=env, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    child = json.loads([l for l in proc.stdout.splitlines() if l.startswith("{")][-1])
    assert child["calibration_bytes"] == GRAD_BYTES
    assert child["calibration_seen_bytes"] < 0.5 * GRAD_BYTES, child


def test_distillation_forward_and_gradient_allocate_only_the_gradient(require_custom):
    # The fused softmax-KL's fwd+bwd, as distill_bench.py measures it: the gradient, the per-row
    # loss and statistics (5 doubles a row), nothing per element beyond the gradient.
    shape = (256, 8192)
    script = os.path.join(os.path.dirname(bench.__file__), "distill_bench.py")
    measured = bench.peak_memory_in_child(script, ["tf_kld", f"{shape[0]}x{shape[1]}"])
    assert measured["bytes"] is not None, measured["note"]
    grad = 4 * shape[0] * shape[1]
    assert 0.9 * grad <= measured["bytes"] <= 1.1 * grad, (
        f"fused softmax-KL fwd+bwd took {measured['bytes'] / 2**20:.2f} MiB beyond its inputs; the "
        f"gradient is {grad / 2**20:.0f} MiB")
