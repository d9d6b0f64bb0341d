"""Unusual Keras epsilons behave exactly as in the composite: float64 epsilons parsed whatever the C
locale (comma-decimal LC_NUMERIC) and over the whole range (subnormals), and epsilon <= 0 (also a
16-bit epsilon that rounds to 0) giving the composite's gradients, NaN for NaN, on the CPU kernel and
in the XLA lowering."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import _util as U
import tf_kld

IMPORT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(tf_kld.__file__)))

# Inputs on and around everything a non-positive epsilon lets through the clip: zeros, negatives,
# tiny and huge values, NaN and infinities, paired with each other (every (t, p) pair once).
_EDGE_VALUES = [0.0, -0.0, -1.0, -0.5, 1e-30, 1e-3, 0.25, 0.5, 1.0, 2.0, np.nan, np.inf, -np.inf]


def _edge_pairs(dtype):
    nd = U.np_dtype(dtype)
    t, p = np.meshgrid(_EDGE_VALUES, _EDGE_VALUES, indexing="ij")
    # Rows of 13: every row has a vector part and a scalar tail on the CPU kernel's AVX2 build.
    return t.astype(nd), p.astype(nd)


def _loss_and_grads(t, p, weights, impl, jit=False):
    def run(t, p):
        with tf.GradientTape() as tape:
            tape.watch([t, p])
            loss = tf_kld.kl_divergence(t, p)
            total = tf.reduce_sum(loss * weights)
        return (loss,) + tuple(tape.gradient(total, [t, p]))

    with tf_kld.implementation(impl):
        return tuple(x.numpy() for x in (tf.function(run, jit_compile=True) if jit else run)(t, p))


def _grad_scale(t, p, weights, eps):
    """|g| * (1 + |log(tc / pc)| + |tc / pc|): the magnitude both gradients are computed from."""
    with np.errstate(all="ignore"):
        tc = np.clip(t.astype(np.float64), eps, 1.0)
        pc = np.clip(p.astype(np.float64), eps, 1.0)
        r = np.abs(tc / pc)
        return np.abs(weights.astype(np.float64))[..., None] * (1.0 + np.abs(np.log(r)) + r + 1.0 / r)


@pytest.mark.parametrize("jit", [False, True], ids=["kernel", "xla"])
@pytest.mark.parametrize("dtype, keras_eps", [
    (tf.float32, 0.0), (tf.float32, -1e-7), (tf.float32, -0.5),
    (tf.float64, 0.0), (tf.float64, -1e-7),
    (tf.float16, 1e-8),  # rounds to 0 in float16
    (tf.float16, 0.0), (tf.bfloat16, 0.0), (tf.bfloat16, -0.25),
], ids=lambda x: getattr(x, "name", repr(x)))
def test_non_positive_epsilon_matches_composite(restore_epsilon, require_custom, dtype, keras_eps, jit):
    if jit and not tf_kld.ops.xla_lowering_available():
        pytest.fail(f"needs the XLA lowering: {tf_kld.ops.xla_lowering_error()}")
    keras.backend.set_epsilon(keras_eps)
    eps = U.epsilon(dtype)
    assert eps <= 0.0
    t, p = _edge_pairs(dtype)
    weights = np.linspace(-2.0, 3.0, t.shape[0]).astype(U.np_dtype(dtype))
    t, p, w = tf.constant(t), tf.constant(p), tf.constant(weights)
    got = _loss_and_grads(t, p, w, "custom", jit)
    want = _loss_and_grads(t, p, w, "reference")
    with np.errstate(all="ignore"):
        U.assert_loss_close(got[0], want[0], t.numpy(), p.numpy(), dtype)
    scale = _grad_scale(t.numpy(), p.numpy(), weights, eps)
    for g, r, name in zip(got[1:], want[1:], ("y_true", "y_pred")):
        assert np.array_equal(np.isnan(g.astype(np.float64)), np.isnan(r.astype(np.float64))), (
            f"d/d{name}: NaN at {np.argwhere(np.isnan(g.astype(float)) != np.isnan(r.astype(float)))}")
        U.assert_grad_close(g, r, scale, dtype, what=f"d/d{name}")


@pytest.mark.parametrize("keras_eps", [1e-310, 5e-324, 2.2250738585072014e-308],
                         ids=["1e-310", "5e-324", "min-normal"])
def test_subnormal_float64_epsilon(restore_epsilon, require_custom, rng, keras_eps):
    """A float64 epsilon below the normal range is parsed exactly (strtod used to reject it)."""
    keras.backend.set_epsilon(keras_eps)
    assert U.epsilon(tf.float64) == keras_eps
    t, p = U.random_inputs(rng, (7, 19), dtype=tf.float64, special=0.3)
    weights = tf.constant(rng.uniform(-1, 1, 7))
    got = _loss_and_grads(tf.constant(t), tf.constant(p), weights, "custom")
    want = _loss_and_grads(tf.constant(t), tf.constant(p), weights, "reference")
    U.assert_loss_close(got[0], want[0], t, p, tf.float64)
    # Gradients where both clipped values are normal numbers (below, autodiff's tc / pc^2 overflows).
    inside = (np.abs(t) >= 1e-300) & (np.abs(p) >= 1e-300) & np.isfinite(t) & np.isfinite(p)
    for g, r in zip(got[1:], want[1:]):
        U.assert_grad_close(np.where(inside, g, 0), np.where(inside, r, 0),
                            _grad_scale(t, p, weights.numpy(), keras_eps), tf.float64)


def _comma_locale(tmp_path_factory):
    """(LOCPATH or None, name) of a locale whose decimal point is ',', generated with localedef into
    a temporary directory when the system has none; skips when neither is possible."""
    probe = "import locale, sys; locale.setlocale(locale.LC_NUMERIC, sys.argv[1]); " \
            "print(locale.localeconv()['decimal_point'])"
    names = ["de_DE.UTF-8", "de_DE.utf8", "fr_FR.UTF-8", "fr_FR.utf8", "nl_NL.UTF-8"]
    for name in names:
        out = subprocess.run([sys.executable, "-c", probe, name], capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip() == ",":
            return None, name
    localedef = shutil.which("localedef")
    if localedef is None or not os.path.isdir("/usr/share/i18n/locales"):
        pytest.skip("no comma-decimal locale installed and no localedef with locale sources to make one")
    locpath = tmp_path_factory.mktemp("locales")
    for source in ("de_DE", "fr_FR"):
        made = subprocess.run([localedef, "-i", source, "-f", "UTF-8", str(locpath / f"{source}.UTF-8")],
                              capture_output=True, text=True)
        if (locpath / f"{source}.UTF-8").exists():
            out = subprocess.run([sys.executable, "-c", probe, f"{source}.UTF-8"], capture_output=True,
                                 text=True, env=dict(os.environ, LOCPATH=str(locpath)))
            if out.returncode == 0 and out.stdout.strip() == ",":
                return str(locpath), f"{source}.UTF-8"
    pytest.skip(f"localedef could not make a comma-decimal locale: {made.stderr[-500:]}")


_LOCALE_SCRIPT = """
    import json, locale, sys
    import numpy as np, keras, tensorflow as tf
    import tf_kld
    locale.setlocale(locale.LC_NUMERIC, sys.argv[1])
    assert locale.localeconv()["decimal_point"] == ","
    keras.backend.set_epsilon(1.5e-7)
    rng = np.random.default_rng(7)
    t = tf.constant(rng.uniform(-0.1, 1.1, (4, 11)))
    p = tf.constant(rng.uniform(-0.1, 1.1, (4, 11)))
    def run(impl):
        with tf_kld.implementation(impl):
            with tf.GradientTape() as tape:
                tape.watch([t, p])
                loss = tf_kld.kl_divergence(t, p)
            return [x.numpy().tolist() for x in [loss] + tape.gradient(loss, [t, p])]
    print("RESULT " + json.dumps({"custom": run("custom"), "reference": run("reference")}))
"""


def test_comma_decimal_locale(tmp_path_factory, require_custom):
    """After setlocale(LC_NUMERIC, <comma locale>), float64 ops still read their epsilon (fresh
    process: the locale is process-wide)."""
    locpath, name = _comma_locale(tmp_path_factory)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=os.pathsep.join(filter(None, [IMPORT_ROOT, os.environ.get("PYTHONPATH")])))
    env.pop("TF_KLD_IMPL", None)
    if locpath:
        env["LOCPATH"] = locpath
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(_LOCALE_SCRIPT), name], env=env,
                          capture_output=True, text=True, timeout=300)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    out = json.loads(line[-1][len("RESULT "):])
    for got, want in zip(out["custom"], out["reference"]):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-12, atol=1e-300)
