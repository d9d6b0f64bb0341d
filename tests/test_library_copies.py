"""Loading is idempotent and never fatal: a second copy of the op library loads harmlessly (XLA's
registry used to abort the process), tf_kld's diagnostics use the library it loaded whatever the
environment or working directory says later, the XLA lowering of every op (the KLD and the
distillation families) is registered exactly once per XLA backend, for the types that backend compiles, even while another thread builds XLA's kernel table.
Each case runs in a fresh interpreter: a failure would abort it."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

import tf_kld
from tf_kld import ops as kld_ops

IMPORT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(tf_kld.__file__)))
ALL_OPS = ("TfKld>KlDivergence", "TfKld>KlDivergenceGrad", "TfKld>KlDivergenceWithLogits",
           "TfKld>KlDivergenceWithLogitsGrad", "TfKld>GeneralizedJsdWithLogits",
           "TfKld>GeneralizedJsdWithLogitsGrad")

_PRELUDE = """
    import ctypes, json, os, sys
    import numpy as np
    import tensorflow as tf
    from tensorflow.python.framework import kernels

    OPS = ("TfKld>KlDivergence", "TfKld>KlDivergenceGrad", "TfKld>KlDivergenceWithLogits",
           "TfKld>KlDivergenceWithLogitsGrad", "TfKld>GeneralizedJsdWithLogits",
           "TfKld>GeneralizedJsdWithLogitsGrad")

    def xla_kernels():
        # {op: {device: [type names]}} of the XLA kernels registered for every op.
        out = {}
        for op in OPS:
            for k in kernels.get_registered_kernels_for_op(op).kernel:
                if "XLA" in k.device_type:
                    types = [tf.as_dtype(t).name for t in k.constraint[0].allowed_values.list.type]
                    out.setdefault(op, {}).setdefault(k.device_type, []).append(sorted(types))
        return out

    def log_types():
        # The float types of XLA's own Log lowering, per XLA device.
        out = {}
        for k in kernels.get_registered_kernels_for_op("Log").kernel:
            if "XLA" in k.device_type and k.device_type.endswith("_JIT"):
                types = {tf.as_dtype(t).name for t in k.constraint[0].allowed_values.list.type}
                out[k.device_type] = sorted(types & {"float16", "bfloat16", "float32", "float64"})
        return out

    def use_ops(tf_kld):
        # The loss and its gradient, eagerly and under jit_compile, on the custom op.
        t = tf.constant([[0.4, 0.6], [0.1, 0.9]])
        p = tf.constant([[0.5, 0.5], [0.3, 0.7]])
        def run(a, b):
            with tf.GradientTape() as tape:
                tape.watch(b)
                loss = tf_kld.kl_divergence(a, b)
            return loss, tape.gradient(loss, b)
        with tf_kld.implementation("custom"):
            eager = [x.numpy() for x in run(t, p)]
            jit = [x.numpy() for x in tf.function(run, jit_compile=True)(t, p)]
        with tf_kld.implementation("reference"):
            want = [x.numpy() for x in run(t, p)]
        for got in (eager, jit):
            for g, w in zip(got, want):
                np.testing.assert_allclose(g, w, rtol=1e-6)
        use_distillation_ops(tf_kld)
        return True

    def use_distillation_ops(tf_kld):
        # Both distillation losses and their gradients, eagerly and under jit_compile (the lowering).
        t = tf.constant([[1.0, -2.0, 0.5], [float("-inf"), 3.0, 1.0]])
        p = tf.constant([[0.0, 1.0, 2.0], [1.0, 2.0, -1.0]])
        def run(a, b):
            out = []
            for loss_fn in (lambda x, y: tf_kld.kl_divergence_with_logits(x, y, 2.0),
                            lambda x, y: tf_kld.generalized_jsd_with_logits(x, y, 0.3, 2.0)):
                with tf.GradientTape() as tape:
                    tape.watch([a, b])
                    loss = loss_fn(a, b)
                out += [loss] + tape.gradient(loss, [a, b])
            return out
        with tf_kld.implementation("custom"):
            eager = [x.numpy() for x in run(t, p)]
            fn = tf.function(run, jit_compile=True)
            hlo = fn.experimental_get_compiler_ir(t, p)(stage="hlo")
            assert 'op_type="TfKld>GeneralizedJsdWithLogits"' in hlo, "not the lowering"
            jit = [x.numpy() for x in fn(t, p)]
        with tf_kld.implementation("reference"):
            want = [x.numpy() for x in run(t, p)]
        for got in (eager, jit):
            for g, w in zip(got, want):
                np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)
"""


def _run(code, *args, env=None, cwd=None):
    full_env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
                    PYTHONPATH=os.pathsep.join(filter(None, [IMPORT_ROOT, os.environ.get("PYTHONPATH")])))
    full_env.pop(kld_ops.IMPL_ENV, None)
    full_env.pop(kld_ops.LIBRARY_ENV, None)
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(_PRELUDE) + textwrap.dedent(code)]
                          + list(args), env=full_env, cwd=cwd, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{proc.stderr[-4000:]}"
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert line, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(line[-1][len("RESULT "):]), proc.stderr


@pytest.fixture(scope="module")
def library():
    path = kld_ops.loaded_library_path()
    if path is None:
        pytest.fail(f"needs the op library: {kld_ops.load_error()}", pytrace=False)
    return path


@pytest.fixture(scope="module")
def copy(library, tmp_path_factory):
    """A byte-for-byte copy of the op library under another name and directory."""
    path = tmp_path_factory.mktemp("copy") / "kld_copy.so"
    shutil.copyfile(library, path)
    return str(path)


def test_copy_loaded_after_import(copy):
    """tf.load_op_library(<copy>) after `import tf_kld`: loads, adds nothing, the ops still work."""
    out, _ = _run("""
        import tf_kld
        before = xla_kernels()
        tf.load_op_library(sys.argv[1])
        after = xla_kernels()
        counts = {}
        for name, path in (("mine", tf_kld.ops.loaded_library_path()), ("theirs", sys.argv[1])):
            lib = ctypes.CDLL(path)
            counts[name] = [lib.TfKldXlaBackendsRegistered(), lib.TfKldDistillXlaBackendsRegistered()]
        print("RESULT " + json.dumps({"before": before, "after": after, "log": log_types(),
                                      "works": use_ops(tf_kld), **counts}))
    """, copy)
    assert out["after"] == out["before"], "the copy registered XLA kernels again"
    assert min(out["mine"]) >= 1 and out["theirs"] == [0, 0], out
    for op in ALL_OPS:
        # One kernel per XLA backend, for the float types that backend compiles (Log's there).
        assert set(out["after"][op]) == set(out["log"]), (out["after"][op], out["log"])
        for device, registrations in out["after"][op].items():
            assert registrations == [out["log"][device]], (op, device, registrations)
    assert out["works"]


def test_copy_loaded_before_import(copy):
    """A copy loaded first: importing tf_kld does not crash, warns once naming both libraries, and
    tf_kld falls back to the composite."""
    out, stderr = _run("""
        import warnings
        tf.load_op_library(sys.argv[1])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import tf_kld
        loss = float(tf_kld.kl_divergence([.4, .9, .2], [.5, .8, .12]))
        print("RESULT " + json.dumps({"warnings": [str(w.message) for w in caught],
                                      "loaded": tf_kld.custom_op_loaded(), "loss": loss,
                                      "error": tf_kld.ops.load_error()}))
    """, copy)
    assert out["loaded"] is False and out["loss"] == pytest.approx(0.11891246, rel=1e-6)
    tf_kld_warnings = [w for w in out["warnings"] if w.startswith("tf_kld:")]
    assert len(tf_kld_warnings) == 1, out["warnings"]
    assert copy in out["error"] and kld_ops.loaded_library_path() in out["error"], out["error"]
    assert "another copy" in out["error"], out["error"]


def test_diagnostics_use_the_loaded_library(copy, library):
    """TF_KLD_LIBRARY set to a copy after import: diagnostics neither load it nor fail."""
    out, _ = _run("""
        import tf_kld
        loaded = tf_kld.ops.loaded_library_path()
        os.environ["TF_KLD_LIBRARY"] = sys.argv[1]
        isa, xla = tf_kld.ops.cpu_isa(), tf_kld.ops.xla_lowering_available()
        with open("/proc/self/maps") as f:
            copy_mapped = any(sys.argv[1] in line for line in f)
        print("RESULT " + json.dumps({"loaded": loaded, "isa": isa, "xla": xla,
                                      "copy_mapped": copy_mapped, "works": use_ops(tf_kld)}))
    """, copy)
    assert out["loaded"] == library
    assert out["isa"] in ("generic", "avx2", "avx512") and out["xla"] is True, out
    assert not out["copy_mapped"], "a diagnostic loaded the library named by the environment now"
    assert out["works"]


def test_relative_library_path_then_chdir(library, tmp_path):
    """TF_KLD_LIBRARY relative to the starting directory; diagnostics still work after chdir."""
    directory, name = os.path.split(library)
    out, _ = _run("""
        import tf_kld
        os.chdir(sys.argv[1])
        print("RESULT " + json.dumps({"loaded": tf_kld.ops.loaded_library_path(),
                                      "isa": tf_kld.ops.cpu_isa(),
                                      "xla": tf_kld.ops.xla_lowering_available()}))
    """, str(tmp_path), env={"TF_KLD_LIBRARY": os.path.join(".", name)}, cwd=directory)
    assert out == {"loaded": library, "isa": out["isa"], "xla": True} and out["isa"], out


@pytest.mark.parametrize("when", ["before-any-op", "after-ops", "while-xla-builds"])
def test_lowering_registered_once(when):
    """However the library's load falls against XLA building its kernel table (before any op, after
    it, or while another thread compiles), each XLA backend gets exactly one registration of each op
    and jit_compile works."""
    out, _ = _run("""
        import threading
        when = sys.argv[1]
        if when == "after-ops":
            tf.function(lambda v: v * 2, jit_compile=True)(tf.ones([3]))
        thread = None
        if when == "while-xla-builds":
            thread = threading.Thread(
                target=lambda: tf.function(lambda v: tf.math.log(v), jit_compile=True)(tf.ones([3])))
            thread.start()
        import tf_kld
        if thread:
            thread.join()
        print("RESULT " + json.dumps({"kernels": xla_kernels(), "log": log_types(),
                                      "works": use_ops(tf_kld)}))
    """, when)
    for op in ALL_OPS:
        assert set(out["kernels"][op]) == set(out["log"]), (op, out)
        for device, registrations in out["kernels"][op].items():
            assert registrations == [out["log"][device]], (op, device, registrations)
    assert out["works"]
