"""XLA: jit_compile never fails, matches the reference, and the compiled program is fused."""

import os
import re
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import _util as U
import tf_kld
from tf_kld import ops as kld_ops

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _inputs(rng, shape=(6, 37), dtype=tf.float32):
    t, p = U.random_inputs(rng, shape, dtype=dtype, special=0.2)
    return tf.constant(t), tf.constant(p)


def _loss_and_grads(fn, t, p, weights):
    with tf.GradientTape() as tape:
        tape.watch([t, p])
        loss = fn(t, p)
        total = tf.reduce_sum(loss * weights)
    return (loss,) + tuple(tape.gradient(total, [t, p]))


def _reference(t, p, weights):
    with tf_kld.implementation("reference"):
        return _loss_and_grads(tf_kld.kl_divergence, t, p, weights)


def _assert_matches_reference(got, t, p, weights, dtype):
    want = _reference(t, p, weights)
    U.assert_loss_close(got[0].numpy(), want[0].numpy(), t.numpy(), p.numpy(), dtype)
    scale = np.abs(np.broadcast_to(weights.numpy()[..., None], t.shape)).astype(np.float64)
    for g, w, name in zip(got[1:], want[1:], ("y_true", "y_pred")):
        U.assert_grad_close(g.numpy(), w.numpy(), scale, dtype, what=f"d/d{name}")


@pytest.mark.parametrize("dtype", U.FLOAT_DTYPES, ids=lambda d: d.name)
def test_jit_compile_forward_and_gradient(impl, dtype, rng):
    """Both paths under jit_compile: "custom" compiles the op's own XLA lowering."""
    if impl == "custom" and not kld_ops.xla_lowering_available():
        pytest.fail(f"the op library has no XLA lowering: {kld_ops.xla_lowering_error()}")
    t, p = _inputs(rng, dtype=dtype)
    weights = tf.cast(tf.linspace(-1.0, 2.0, t.shape[0]), dtype)
    jitted = tf.function(lambda a, b, w: _loss_and_grads(tf_kld.kl_divergence, a, b, w),
                         jit_compile=True)
    _assert_matches_reference(jitted(t, p, weights), t, p, weights, dtype)


def test_auto_emits_composite_inside_xla(require_custom):
    spec = tf.TensorSpec([None, 5], tf.float32)
    graph = tf.function(tf_kld.kl_divergence, jit_compile=True).get_concrete_function(spec, spec).graph
    assert not U.graph_op_types(graph) & {U.FORWARD_OP, U.GRAD_OP}


def test_trace_cached_outside_xla_then_called_from_jit(require_custom, rng):
    """A tf.function traced outside XLA keeps the custom op in its cached trace; jit must still work."""
    t, p = _inputs(rng)
    weights = tf.ones([t.shape[0]])
    inner = tf.function(tf_kld.kl_divergence)
    assert U.FORWARD_OP in U.graph_op_types(inner.get_concrete_function(t, p))
    outer = tf.function(lambda a, b, w: _loss_and_grads(inner, a, b, w), jit_compile=True)
    _assert_matches_reference(outer(t, p, weights), t, p, weights, tf.float32)


def test_compiled_program_is_fused(require_custom):
    """The optimized HLO of the custom op under XLA: no custom-call, each input read once."""
    with tf_kld.implementation("custom"):
        fn = tf.function(tf_kld.kl_divergence, jit_compile=True)
        hlo = fn.experimental_get_compiler_ir(tf.zeros([64, 128]), tf.zeros([64, 128]))(
            stage="optimized_hlo")
    assert "custom-call" not in hlo
    assert "TfKld_KlDivergence" in hlo, "expected the op's own lowering in the program"
    entry = hlo[hlo.index("ENTRY"):]
    params = re.findall(r"%(\S+) = f32\[64,128\]\{1,0\} parameter\(", entry)
    assert len(params) == 2, entry
    for param in params:  # each input is read by exactly one (fused) instruction
        readers = [line for line in entry.splitlines()
                   if re.search(rf"[(, ]%{re.escape(param)}[,)]", line) and "parameter(" not in line]
        assert len(readers) == 1 and "fusion(" in readers[0], (param, readers)


def test_autoclustering(rng):
    t, p = _inputs(rng)
    weights = tf.ones([t.shape[0]])
    tf.config.optimizer.set_jit(True)
    try:
        fn = tf.function(lambda a, b, w: _loss_and_grads(tf_kld.kl_divergence, a, b, w))
        got = fn(t, p, weights)
    finally:
        tf.config.optimizer.set_jit(False)
    _assert_matches_reference(got, t, p, weights, tf.float32)


def test_keras_fit_with_jit_compile(require_custom):
    def losses(impl):
        keras.utils.set_random_seed(3)
        rng = np.random.default_rng(3)
        x = rng.normal(size=(256, 8)).astype("float32")
        y = tf.nn.softmax(rng.normal(size=(256, 4)).astype("float32")).numpy()
        model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, activation="softmax")])
        with tf_kld.implementation(impl):
            model.compile(optimizer=keras.optimizers.SGD(0.5), loss=tf_kld.KLDivergence(),
                          jit_compile=True)
            return model.fit(x, y, batch_size=64, epochs=3, verbose=0, shuffle=False).history["loss"]

    fused, reference = losses("auto"), losses("reference")
    assert fused[-1] < fused[0]
    np.testing.assert_allclose(fused, reference, rtol=1e-5)


def _run(code, env=None, timeout=240):
    full_env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(tf_kld.__file__)), os.environ.get("PYTHONPATH", "")]),
        TF_CPP_MIN_LOG_LEVEL="2", **(env or {}))
    full_env.pop(kld_ops.IMPL_ENV, None)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full_env,
                          capture_output=True, text=True, timeout=timeout)


LATE_IMPORT = """
    import numpy as np, tensorflow as tf
    # TensorFlow runs ops and an XLA computation before tf_kld (and its library) is imported.
    x = tf.ones([3]) + 1
    tf.function(lambda v: v * 2, jit_compile=True)(x)
    import tf_kld
    t = tf.constant(np.random.default_rng(0).uniform(0, 1, (5, 9)).astype(np.float32))
    p = tf.constant(np.random.default_rng(1).uniform(0, 1, (5, 9)).astype(np.float32))
    inner = tf.function(tf_kld.kl_divergence)
    inner(t, p)  # traced outside XLA: the custom op is in the cached trace
    @tf.function(jit_compile=True)
    def outer(a, b):
        with tf.GradientTape() as tape:
            tape.watch(b)
            loss = inner(a, b)
        return loss, tape.gradient(loss, b)
    loss, grad = outer(t, p)
    with tf_kld.implementation("reference"):
        with tf.GradientTape() as tape:
            tape.watch(p)
            ref = tf_kld.kl_divergence(t, p)
        ref_grad = tape.gradient(ref, p)
    np.testing.assert_allclose(loss.numpy(), ref.numpy(), rtol=1e-6)
    np.testing.assert_allclose(grad.numpy(), ref_grad.numpy(), rtol=1e-6)
    print("LATE-IMPORT-OK", tf_kld.ops.xla_lowering_available())
"""


def test_late_import_then_jit(require_custom):
    """A library loaded after TF built its XLA kernel table still lowers (fresh process)."""
    proc = _run(LATE_IMPORT)
    assert proc.returncode == 0 and "LATE-IMPORT-OK True" in proc.stdout, proc.stderr[-3000:]
