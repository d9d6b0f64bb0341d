"""tf.distribute: training a Keras model with tf_kld.KLDivergence() under MirroredStrategy (two
logical CPU devices, model.fit) and MultiWorkerMirroredStrategy (two worker processes on 127.0.0.1,
a custom loop: Keras 3's fit() does not support it) runs the fused op on every replica and gives the
per-epoch losses of tf_kld.implementation("reference"), of Keras's own loss and of the XLA path.

The training runs in fresh processes (tests/_distribute_worker.py): logical devices and the cluster
have to be configured before TensorFlow initialises its context.
"""

import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

import _util as U
import tf_kld
from tf_kld import ops as kld_ops

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(TESTS_DIR, "_distribute_worker.py")
IMPORT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(tf_kld.__file__)))
TIMEOUT_S = 240
RTOL = 1e-5


def _env(**extra):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop(kld_ops.IMPL_ENV, None)
    env.pop("TF_CONFIG", None)
    env.update(extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [IMPORT_ROOT, env.get("PYTHONPATH")]))
    return env


def _result(stdout, what):
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"{what} printed no RESULT line"
    return json.loads(lines[-1][len("RESULT "):])


def _free_loopback_ports(n):
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# --------------------------------------------------------------------------------------------
# Running the workers


@pytest.fixture(scope="module")
def mirrored():
    proc = subprocess.run([sys.executable, WORKER, "mirrored"], env=_env(), cwd=TESTS_DIR,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, (f"the MirroredStrategy worker failed (exit {proc.returncode})\n"
                                  f"stdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-6000:]}")
    return _result(proc.stdout, "the MirroredStrategy worker")


def _run_cluster():
    """Starts both workers at once and waits for them. Returns ([(returncode, stdout, stderr)] per
    task, whether the deadline passed); kills both on the deadline, or the other as soon as one
    fails (it would wait on its collectives)."""
    ports = _free_loopback_ports(2)
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    procs, files, timed_out = [], [], False
    try:
        for index in range(2):
            out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
            files.append((out, err))
            tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
            procs.append(subprocess.Popen([sys.executable, WORKER, "multiworker"], cwd=TESTS_DIR,
                                          env=_env(TF_CONFIG=tf_config), stdout=out, stderr=err,
                                          stdin=subprocess.DEVNULL))
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            codes = [p.poll() for p in procs]
            if all(c is not None for c in codes) or any(c not in (None, 0) for c in codes):
                break
            if time.monotonic() > deadline:
                timed_out = True
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            p.wait()
    results = []
    for p, (out, err) in zip(procs, files):
        out.seek(0)
        err.seek(0)
        results.append((p.returncode, out.read(), err.read()))
        out.close()
        err.close()
    return results, timed_out


@pytest.fixture(scope="module")
def multiworker():
    started = time.monotonic()
    results, timed_out = _run_cluster()
    if any(rc != 0 and "ddress already in use" in err for rc, _, err in results):
        results, timed_out = _run_cluster()  # a port was taken between choosing and binding it
    elapsed = time.monotonic() - started
    if any(rc != 0 for rc, _, _ in results):
        killed = (f"killed at the {TIMEOUT_S} s timeout" if timed_out else
                  "killed after its peer failed")
        report = [f"MultiWorkerMirroredStrategy workers did not both finish ({elapsed:.0f} s): "
                  + ", ".join(f"worker {i} " + (f"exit {rc}" if rc >= 0 else killed)
                              for i, (rc, _, _) in enumerate(results))]
        # The worker that failed by itself first: its error is the cause.
        for index in sorted(range(2), key=lambda i: results[i][0] < 0):
            rc, out, err = results[index]
            report.append(f"--- worker {index} (exit {rc}) stdout:\n{out[-2000:]}\n"
                          f"--- worker {index} stderr:\n{err[-5000:]}")
        pytest.fail("\n".join(report), pytrace=False)
    return [_result(out, f"worker {index}") for index, (_, out, _) in enumerate(results)]


# --------------------------------------------------------------------------------------------
# Checks


def _assert_trained_alike(res, what, runs):
    custom = res["custom"]["loss"]
    assert len(custom) >= 3 and custom[-1] < custom[0] * 0.8, f"{what}: the loss did not fall: {custom}"
    for name in runs:
        np.testing.assert_allclose(custom, res[name]["loss"], rtol=RTOL,
                                   err_msg=f"{what}: per-epoch losses, custom op vs {name}")


def _assert_custom_op_on(res, devices, what):
    """The custom run traced the fused forward and gradient ops (on each of `devices`, when given;
    nested functions' nodes have no device)."""
    assert res["custom_op_loaded"] and res["default_implementation"] == "auto", res
    assert res["custom"]["traced_functions"] >= 1, f"{what}: no traced training step found"
    nodes = {tuple(n) for n in res["custom"]["nodes"]}
    if devices is None:
        nodes = {op for op, _ in nodes}
        want = {U.FORWARD_OP, U.GRAD_OP}
    else:
        want = {(op, dev) for op in (U.FORWARD_OP, U.GRAD_OP) for dev in devices}
    assert want <= nodes, f"{what}: tf_kld ops in the training step {sorted(nodes)}, want {sorted(want)}"


def _assert_no_custom_op(res, run, what):
    nodes = res[run]["nodes"]
    assert not nodes, (f"{what}: the '{run}' run's training step contains tf_kld's custom ops "
                       f"{nodes}: the replica functions did not see the implementation chosen for it")


def test_mirrored_runs_custom_op_on_both_replicas(mirrored, require_custom):
    assert mirrored["replicas"] == 2
    _assert_custom_op_on(mirrored, [f"/job:localhost/replica:0/task:0/device:CPU:{i}" for i in (0, 1)],
                         "MirroredStrategy")


def test_mirrored_matches_reference(mirrored, require_custom):
    """Custom op vs tf_kld.implementation("reference"), Keras's own loss and no strategy at all."""
    _assert_no_custom_op(mirrored, "reference", "MirroredStrategy")
    _assert_no_custom_op(mirrored, "keras", "MirroredStrategy")
    _assert_trained_alike(mirrored, "MirroredStrategy", ["reference", "keras", "single"])


def test_multiworker_runs_custom_op_on_each_worker(multiworker, require_custom):
    for index, res in enumerate(multiworker):
        assert res["task"] == index and res["replicas"] == 2, res
        _assert_custom_op_on(res, None, f"worker {index}")


def test_multiworker_workers_agree(multiworker, require_custom):
    for run in ("custom", "reference", "keras", "xla"):
        np.testing.assert_allclose(multiworker[0][run]["loss"], multiworker[1][run]["loss"],
                                   rtol=1e-6, err_msg=f"'{run}' losses of worker 0 vs worker 1")


def test_multiworker_matches_reference(multiworker, require_custom):
    """Custom op vs the reference path, Keras's own loss and the jit-compiled step (XLA path)."""
    for index, res in enumerate(multiworker):
        for run in ("reference", "keras", "xla"):
            _assert_no_custom_op(res, run, f"worker {index}")
        _assert_trained_alike(res, f"worker {index}", ["reference", "keras", "xla"])


def test_multiworker_matches_mirrored(multiworker, mirrored, require_custom):
    """The two workers' custom loop trains as fit() in one process with two replicas (same model,
    data, global batch and order)."""
    np.testing.assert_allclose(multiworker[0]["custom"]["loss"], mirrored["custom"]["loss"],
                               rtol=RTOL)
