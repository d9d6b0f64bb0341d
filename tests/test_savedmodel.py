"""SavedModels using tf_kld: a tf.Module (loss and gradient) and an exported Keras model, traced on
each path, reloaded in fresh processes. Custom-op ones reload after `import tf_kld`; ones traced
under implementation("reference") hold no custom op and reload where tf_kld cannot be imported.
The two fresh processes run concurrently, once for the module; the one with tf_kld also checks the
first alias import and patch_tensorflow() in an interpreter where TF's namespaces are still lazy."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

import _util as U
import tf_kld

IMPORT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(tf_kld.__file__)))
PATHS = ("custom", "reference")
KINDS = ("module", "keras")
SPEC = tf.TensorSpec([None, 4], tf.float32)

_LOADER = r"""
import json, sys
if sys.argv[2] == "without":
    sys.modules["tf_kld"] = None  # importing tf_kld now fails, even if it is installed
import tensorflow as tf
out = {}
if sys.argv[2] == "with":
    import tf_kld
    from tf_kld.compat.v1.keras.metrics import kld  # a fresh interpreter's first alias import
    out["alias_ok"] = kld is tf_kld.kl_divergence
    original = tf.compat.v2.keras.losses.KLD
    with tf_kld.patch_tensorflow():  # the first to touch TF's lazily loaded namespaces
        out["patched"] = [getattr(ns, "kld") is tf_kld.kl_divergence for ns in (
            tf.losses, tf.metrics, tf.compat.v2.losses, tf.compat.v2.metrics, tf.keras.losses)]
    out["restored"] = [getattr(ns, "kld") is original for ns in (
        tf.losses, tf.metrics, tf.compat.v2.losses, tf.compat.v2.metrics, tf.keras.losses)]
else:
    try:
        import tf_kld
        out["imported"] = True
    except ImportError:
        out["imported"] = False
with open(sys.argv[1] + "/inputs.json") as f:
    inputs = json.load(f)
t, p, x = (tf.constant(inputs[k], tf.float32) for k in ("t", "p", "x"))
import os
for name in ("module_custom", "module_reference", "keras_custom", "keras_reference"):
    if not os.path.isdir(sys.argv[1] + "/" + name):
        continue
    try:
        obj = tf.saved_model.load(sys.argv[1] + "/" + name)
        if name.startswith("module"):
            out[name] = {"loss": obj.loss(t, p).numpy().tolist(), "grad": obj.grad(t, p).numpy().tolist()}
        else:
            out[name] = {"loss": obj.serve([t, x]).numpy().tolist()}
    except Exception as err:  # pylint: disable=broad-except
        out[name] = {"error": type(err).__name__ + ": " + str(err)[:400]}
print("RESULT " + json.dumps(out))
"""


class _KLDLayer(keras.layers.Layer):
    def call(self, inputs):
        return tf_kld.kl_divergence(inputs[0], inputs[1])


def _module():
    class KLDModule(tf.Module):
        @tf.function(input_signature=[SPEC, SPEC])
        def loss(self, y_true, y_pred):
            return tf_kld.kl_divergence(y_true, y_pred)

        @tf.function(input_signature=[SPEC, SPEC])
        def grad(self, y_true, y_pred):
            with tf.GradientTape() as tape:
                tape.watch(y_pred)
                loss = tf.reduce_sum(tf_kld.kl_divergence(y_true, y_pred))
            return tape.gradient(loss, y_pred)

    return KLDModule()


def _keras_model():
    keras.utils.set_random_seed(3)
    y_true, x = keras.Input((4,)), keras.Input((6,))
    y_pred = keras.layers.Dense(4, activation="softmax")(x)
    return keras.Model([y_true, x], _KLDLayer()([y_true, y_pred]))


def _op_types(path):
    proto = saved_model_pb2.SavedModel()
    with open(os.path.join(path, "saved_model.pb"), "rb") as f:
        proto.ParseFromString(f.read())
    graph = proto.meta_graphs[0].graph_def
    types = {n.op for n in graph.node}
    for fn in graph.library.function:
        types.update(n.op for n in fn.node_def)
    return types


def _run(directory, mode):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("TF_KLD_IMPL", None)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if mode == "with":
        paths.insert(0, IMPORT_ROOT)
    else:
        paths = [p for p in paths if os.path.abspath(p) != IMPORT_ROOT]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return subprocess.Popen([sys.executable, "-c", _LOADER, directory, mode], env=env, cwd=directory,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Saves the four models, reloads them in two fresh processes; returns what each computed."""
    directory = str(tmp_path_factory.mktemp("savedmodels"))
    rng = np.random.default_rng(7)
    t, p = U.random_inputs(rng, (5, 4), special=0.2)
    x = rng.normal(size=(5, 6)).astype(np.float32)
    with open(os.path.join(directory, "inputs.json"), "w") as f:
        json.dump({"t": t.tolist(), "p": p.tolist(), "x": x.tolist()}, f)
    expected, op_types = {}, {}
    # Without the library the custom-path tests fail (conftest); the reference ones still run.
    for path in PATHS if tf_kld.custom_op_loaded() else ("reference",):
        with tf_kld.implementation(path):  # the op is chosen when each function is traced: here
            module = _module()
            tf.saved_model.save(module, os.path.join(directory, f"module_{path}"))
            expected[f"module_{path}"] = {"loss": module.loss(t, p).numpy(), "grad": module.grad(t, p).numpy()}
            model = _keras_model()
            model.export(os.path.join(directory, f"keras_{path}"), verbose=False)
            expected[f"keras_{path}"] = {"loss": model([t, x]).numpy()}
        for kind in KINDS:
            op_types[f"{kind}_{path}"] = _op_types(os.path.join(directory, f"{kind}_{path}"))
    procs = {mode: _run(directory, mode) for mode in ("with", "without")}
    results = {}
    for mode, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=180)
        lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
        assert proc.returncode == 0 and lines, f"{mode} tf_kld: exit {proc.returncode}\n{stderr[-3000:]}"
        results[mode] = json.loads(lines[-1][len("RESULT "):])
    return expected, op_types, results


def _assert_same(got, want):
    assert "error" not in got, got.get("error")
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        np.testing.assert_allclose(np.asarray(got[key], np.float32), value, rtol=1e-6, atol=1e-7,
                                   err_msg=key)


@pytest.mark.parametrize("kind", KINDS)
def test_traced_ops(saved, require_custom, kind):
    _, op_types, _ = saved
    assert U.FORWARD_OP in op_types[f"{kind}_custom"]
    if kind == "module":
        assert U.GRAD_OP in op_types["module_custom"]
    assert not op_types[f"{kind}_reference"] & {U.FORWARD_OP, U.GRAD_OP}
    assert "Log" in op_types[f"{kind}_reference"]


@pytest.mark.parametrize("kind", KINDS)
def test_custom_reloads_after_import_tf_kld(saved, require_custom, kind):
    expected, _, results = saved
    assert results["with"]["alias_ok"] is True
    _assert_same(results["with"][f"{kind}_custom"], expected[f"{kind}_custom"])


@pytest.mark.parametrize("kind", KINDS)
def test_reference_reloads_after_import_tf_kld(saved, kind):
    expected, _, results = saved
    _assert_same(results["with"][f"{kind}_reference"], expected[f"{kind}_reference"])


@pytest.mark.parametrize("kind", KINDS)
def test_reference_export_reloads_without_tf_kld(saved, kind):
    expected, _, results = saved
    assert results["without"]["imported"] is False
    _assert_same(results["without"][f"{kind}_reference"], expected[f"{kind}_reference"])


@pytest.mark.parametrize("kind", KINDS)
def test_custom_export_needs_tf_kld(saved, require_custom, kind):
    _, _, results = saved
    error = results["without"][f"{kind}_custom"].get("error", "")
    assert "TfKld>KlDivergence" in error, results["without"][f"{kind}_custom"]


def test_fresh_process_patch_and_restore(saved):
    _, _, results = saved
    assert results["with"]["patched"] == [True] * 5
    assert results["with"]["restored"] == [True] * 5
