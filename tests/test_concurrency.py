"""Concurrency: many Python threads calling the op at once give exactly the serial results, and the
op works with TensorFlow's inter-op and intra-op thread pools of one thread each."""

import json
import os
import subprocess
import sys
import threading

import numpy as np
import tensorflow as tf

import _util as U
import tf_kld

THREADS = 16
CALLS = 25
IMPORT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(tf_kld.__file__)))

# (dtype, y_true shape, y_pred shape): sharded rows, a row wider than the op's 32768-element chunk
# (partial sums in parallel), broadcasting, and 16-bit types.
CASES = [
    (tf.float32, (64, 40), (64, 40)),
    (tf.float64, (3, 5, 17), (5, 17)),
    (tf.float16, (2, 40000), (2, 40000)),
    (tf.bfloat16, (33, 9), (33, 1)),
    (tf.float32, (1, 70001), (1, 70001)),
]


def _inputs(seed):
    dtype, shape_true, shape_pred = CASES[seed % len(CASES)]
    rng = np.random.default_rng(seed)
    t, p = U.random_inputs(rng, shape_true, shape_pred, dtype=dtype, special=0.2, nan=0.01)
    w = rng.uniform(-2.0, 2.0, size=np.broadcast_shapes(shape_true, shape_pred)[:-1])
    return tf.constant(t), tf.constant(p), tf.constant(w.astype(U.np_dtype(dtype)))


def _loss_and_grads(t, p, w):
    with tf.GradientTape() as tape:
        tape.watch([t, p])
        loss = tf_kld.kl_divergence(t, p)
    d_t, d_p = tape.gradient(loss, [t, p], output_gradients=w)
    return loss, d_t, d_p


def _compute(t, p, w):
    """Loss and both gradients (under upstream w), as bytes: bit-exact comparison, NaN included."""
    return [x.numpy().tobytes() for x in _loss_and_grads(t, p, w)]


def _impl(seed):
    return "custom" if seed % 4 else "reference"  # a quarter on the reference path, at the same time


def test_threads_give_serial_results(require_custom):
    inputs = [_inputs(seed) for seed in range(THREADS)]
    serial = []
    for seed, args in enumerate(inputs):
        with tf_kld.implementation(_impl(seed)):
            serial.append(_compute(*args))
    barrier = threading.Barrier(THREADS)
    results = [None] * THREADS

    def work(seed):
        try:
            with tf_kld.implementation(_impl(seed)):
                barrier.wait(timeout=60)
                runs = []
                for _ in range(CALLS):
                    runs.append(_compute(*inputs[seed]))
                    # implementation() is per thread: the others' blocks never leak in here.
                    assert tf_kld.current_implementation() == _impl(seed)
            results[seed] = runs
        except BaseException as err:  # reported below, in the main thread
            results[seed] = err

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=300)
    assert not any(th.is_alive() for th in threads), "threads did not finish"
    for seed, runs in enumerate(results):
        assert not isinstance(runs, BaseException), f"thread {seed}: {runs!r}"
        assert len(runs) == CALLS
        for call, got in enumerate(runs):
            for name, a, b in zip(("loss", "d/dy_true", "d/dy_pred"), got, serial[seed]):
                assert a == b, f"thread {seed} ({_impl(seed)}, {CASES[seed % len(CASES)]}) call {call}: " \
                               f"{name} differs from the serial result"


_ONE_THREAD_SCRIPT = r"""
import json, sys
import tensorflow as tf
tf.config.threading.set_inter_op_parallelism_threads(1)
tf.config.threading.set_intra_op_parallelism_threads(1)
sys.path.insert(0, sys.argv[1])
import tf_kld, test_concurrency as T
out = {"inter": tf.config.threading.get_inter_op_parallelism_threads(),
       "intra": tf.config.threading.get_intra_op_parallelism_threads(),
       "loaded": tf_kld.custom_op_loaded(), "eager": [], "graph": []}
with tf_kld.implementation("custom"):
    graph = tf.function(T._loss_and_grads)
    for seed in range(len(T.CASES)):
        args = T._inputs(seed)
        out["eager"].append([x.hex() for x in T._compute(*args)])
        out["graph"].append([x.numpy().tobytes().hex() for x in graph(*args)])
print("RESULT " + json.dumps(out))
"""


def test_one_inter_op_and_one_intra_op_thread(require_custom):
    """A fresh process with both pools at one thread: the op runs (eager and in a tf.function) and
    gives bit for bit what it gives here with the default pools (the sharding depends only on the
    shape)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("TF_KLD_IMPL", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [IMPORT_ROOT, env.get("PYTHONPATH")]))
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.run([sys.executable, "-c", _ONE_THREAD_SCRIPT, tests_dir], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-4000:]}"
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert line, proc.stdout[-2000:] + proc.stderr[-4000:]
    out = json.loads(line[-1][len("RESULT "):])
    assert out["inter"] == 1 and out["intra"] == 1 and out["loaded"] is True, out
    with tf_kld.implementation("custom"):
        for seed in range(len(CASES)):
            here = [x.hex() for x in _compute(*_inputs(seed))]
            assert out["eager"][seed] == here, f"{CASES[seed]}: eager differs with one thread"
            assert out["graph"][seed] == here, f"{CASES[seed]}: tf.function differs with one thread"
