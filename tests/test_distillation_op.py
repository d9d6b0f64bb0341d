"""The fused ops TfKld>KlDivergenceWithLogits / ...Grad themselves: the core's vectorised exp, which
path runs what, the op against the float64 oracle on wide (chunked) rows, the one-pass gradient
computing only what is needed, determinism across thread counts and ISAs, and the op's own checks.
(Values and gradients on both paths, every dtype and special value: tests/test_distillation.py.)"""

import ctypes
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import _util as U
import test_distillation as D
import tf_kld
from tf_kld import ops as kld_ops

KL_OP = "TfKld>KlDivergenceWithLogits"
KL_GRAD_OP = "TfKld>KlDivergenceWithLogitsGrad"
JSD_OP = "TfKld>GeneralizedJsdWithLogits"
JSD_GRAD_OP = "TfKld>GeneralizedJsdWithLogitsGrad"
IMPORT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(tf_kld.__file__)))


def _core(name, x, dtype):
    """The library's test hook `name` (out[i] = f(x[i]), n elements of dtype) on x."""
    fn = getattr(ctypes.CDLL(kld_ops.library_path()), name)
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    x = np.ascontiguousarray(x, dtype)
    out = np.empty_like(x)
    fn(x.ctypes.data, out.ctypes.data, x.size)
    return out


def _core_exp(x):
    return _core("TfKldDistillExp", x, np.float32)


def _ulps(got, want64):
    """|got - want| in ulps of the float32 nearest want."""
    want32 = want64.astype(np.float32)
    return np.abs(got.astype(np.float64) - want64) / np.spacing(np.abs(want32)).astype(np.float64)


# The worst error allowed over the normal range, per CPU build: the table-driven exps of the AVX-512
# and AVX2 builds measured 1.07 and 0.92 ulp at every 7th float in (-110, 89); the generic build's
# degree-6 form is within 2.
_EXP_ULPS = {"avx512": 1.1, "avx2": 1.1, "generic": 2.0}


def test_vectorised_exp_accuracy(require_custom, rng):
    """Within _EXP_ULPS ulp of exp over the whole normal range, subnormal results within one
    subnormal ulp; exp(-inf) = 0, NaN stays NaN, overflow gives inf, in any position of a vector."""
    x = np.concatenate([rng.uniform(-87.3, 88.0, 200000), rng.uniform(-1.0, 1.0, 50000),
                        np.linspace(-0.35, 0.35, 10001), -np.arange(0, 87, 0.25)]).astype(np.float32)
    got = _core_exp(x)
    err = _ulps(got, np.exp(x.astype(np.float64)))
    assert err.max() <= _EXP_ULPS[kld_ops.cpu_isa()], (kld_ops.cpu_isa(), err.max(), x[np.argmax(err)])
    special = np.array([-np.inf, np.nan, 0.0, -0.0, -104.0, -200.0, -1e30, -100.0, -90.0, 88.5,
                        89.0, 100.0, np.inf, 1.0, -87.5], np.float32)
    got = _core_exp(special)
    with np.errstate(over="ignore"):
        want = np.exp(special.astype(np.float64)).astype(np.float32)
    np.testing.assert_array_equal(got[[0, 2, 3, 4, 5, 6, 10, 11, 12]], want[[0, 2, 3, 4, 5, 6, 10, 11, 12]])
    assert np.isnan(got[1])
    for i in (7, 8, 9, 13, 14):  # subnormal results and near-overflow
        assert abs(float(got[i]) - float(want[i])) <= float(np.spacing(want[i])), (special[i], got[i], want[i])
    tiny = np.linspace(-103.9, -87.4, 20001).astype(np.float32)  # every subnormal result's binade
    got, want = _core_exp(tiny).astype(np.float64), np.exp(tiny.astype(np.float64))
    assert np.all(np.abs(got - want) <= 2.0 ** -149), tiny[np.argmax(np.abs(got - want))]


def test_vectorised_exp_of_nonpositive_arguments_is_the_same_exp(require_custom, rng):
    """The shorter form the loops use on shifted logits (x <= 0 or NaN) gives exactly the bits of
    the checked exp above, special values and every lane included, up to x = 89."""
    x = np.concatenate([rng.uniform(-120.0, 89.0, 200000), -rng.exponential(1.0, 50000),
                        np.linspace(-104.0, -86.0, 20001), -np.arange(0, 87, 0.25),
                        [-np.inf, np.nan, 0.0, -0.0, -110.0, -110.5, -1e30, -3.4e38, 89.0, 1e-30]]
                       ).astype(np.float32)
    for n in (x.size, 1, 15, 17, 33):  # partial vectors too
        got = _core("TfKldDistillExpNonPositive", x[:n], np.float32)
        np.testing.assert_array_equal(got.view(np.uint32), _core_exp(x[:n]).view(np.uint32))


def _core_log(x):
    return _core("TfKldDistillLog", x, np.float64)


def test_vectorised_double_exp_accuracy(require_custom, rng):
    """The double exp that moves the KL's running sums to a new maximum (x <= 0): within 4 double
    ulps of exp (extended precision) down to -708 (1.12 on all three builds; with the series to
    r^11, 55), 0 below and at -inf, NaN for NaN, in any lane and any tail. A float factor there
    cost the KL 3-6 times its error at 32000 classes."""
    x = np.concatenate([-rng.exponential(1.0, 100000), rng.uniform(-708.0, 0.0, 100000),
                        -np.linspace(0.0, 1.0, 10001), [0.0, -0.0, -np.log(2.0), -707.9]])
    got = _core("TfKldDistillExpDouble", x, np.float64)
    want = np.exp(x.astype(np.longdouble))
    ulps = np.abs(got.astype(np.longdouble) - want) / np.spacing(want.astype(np.float64))
    assert ulps.max() <= 4, (float(ulps.max()), x[np.argmax(ulps)])
    special = np.array([-708.5, -800.0, -np.inf, np.nan, -1e300, 0.0, -5.0])
    for n in range(1, len(special) + 1):  # every tail length
        got = _core("TfKldDistillExpDouble", special[:n], np.float64)
        assert np.array_equal(got[:5][:n], np.array([0.0, 0.0, 0.0, np.nan, 0.0])[:n], equal_nan=True), got
    assert _core("TfKldDistillExpDouble", special, np.float64)[5] == 1.0


def test_vectorised_log_accuracy(require_custom, rng):
    """The double log of the narrow rows' statistics (log sum_a, log sum_b; sums in [1, 32] there):
    within one ulp of the exact log (extended precision) over the whole normal range, and libm's log
    bit for bit where the argument is not a positive normal number, in any lane and any tail."""
    x = np.concatenate([rng.uniform(1.0, 32.0, 200000), np.linspace(0.7, 1.5, 100001),
                        1.0 + rng.uniform(-1e-6, 1e-6, 20000), 2.0 ** rng.uniform(-1020, 1023, 50000),
                        [1.0, 2.0, 0.5, np.sqrt(2.0), np.nextafter(np.sqrt(2.0), 3.0), 2.2250738585072014e-308,
                         1.7976931348623157e308]])
    got = _core_log(x)
    exact = np.log(x.astype(np.longdouble))
    err = np.abs(got.astype(np.longdouble) - exact) / np.spacing(np.abs(exact).astype(np.float64))
    err[exact == 0] = np.abs(got[exact == 0]) / 5e-324
    assert err.max() <= 1.0, (err.max(), x[np.argmax(err)])
    special = np.array([0.0, -0.0, 5e-324, 1e-310, -1.0, -np.inf, np.inf, np.nan, 1.0, 3.0, 0.25])
    for n in (special.size, 1, 3, 5, 9):  # partial vectors too, the specials in every lane
        for shift in range(special.size):
            part = np.roll(special, shift)[:n]
            with np.errstate(divide="ignore", invalid="ignore"):
                want = np.log(part)
            got = _core_log(part)
            normal = (part >= 2.2250738585072014e-308) & (part < np.inf)
            np.testing.assert_array_equal(got[~normal], want[~normal])  # NaN where NaN
            assert np.all(np.abs(got[normal] - want[normal]) <= 2 * np.spacing(np.abs(want[normal]))), part


@pytest.mark.parametrize("isa", ["avx2", "generic"])
def test_vectorised_exp_accuracy_of_narrower_builds(require_custom, isa):
    """The same checks on the narrower CPU builds (TF_KLD_CPU_ISA caps the build a process uses)."""
    native = kld_ops.cpu_isa()
    if native == isa or (isa == "avx2" and native != "avx512"):
        pytest.skip(f"the {isa} build is this process's own ({native}) or this CPU cannot run it")
    env = dict(os.environ, TF_KLD_CPU_ISA=isa, TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONPATH=IMPORT_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          f"{os.path.abspath(__file__)}::test_vectorised_exp_accuracy",
                          f"{os.path.abspath(__file__)}::test_vectorised_exp_of_nonpositive_arguments_is_the_same_exp",
                          f"{os.path.abspath(__file__)}::test_vectorised_log_accuracy",
                          f"{os.path.abspath(__file__)}::test_vectorised_double_exp_accuracy"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "4 passed" in out.stdout, out.stdout[-3000:] + out.stderr[-2000:]


def test_paths_run_the_expected_ops(impl):
    t, s = D.logits(np.random.default_rng(0), (2, 5)), D.logits(np.random.default_rng(1), (2, 5))
    with U.record_eager_ops() as ran:
        tf_kld.kl_divergence_with_logits(t, s, 2.0)
    types = [op for op, _ in ran]
    assert (KL_OP in types) == (impl == "custom"), types
    assert ("Exp" in types) == (impl == "reference"), types  # the composite's log-softmax
    for beta, op in ((0.0, KL_OP), (0.3, JSD_OP), (1.0, KL_OP)):  # the ends are KL divergences
        with U.record_eager_ops() as ran:
            tf_kld.generalized_jsd_with_logits(t, s, beta, 2.0)
        types = [o for o, _ in ran]
        assert (op in types) == (impl == "custom") and (JSD_OP in types) == (op == JSD_OP and impl == "custom"), types


@pytest.mark.parametrize("beta", [None, 0.3])
@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16, tf.float64], ids=lambda d: d.name)
def test_chunked_wide_rows(impl, dtype, beta, rng):
    """Rows wider than the op's chunk (32768): reduced in pieces and merged; still the oracle's
    value, with a masked block, huge logits and a -inf row maximum change across chunks."""
    t = D.logits(rng, (2, 70001), np.float64, 4.0)
    s = D.logits(rng, (2, 70001), np.float64, 4.0)
    t[0, :40000] = -np.inf  # the first chunk fully masked
    t[1, 69000] = 60.0      # the maximum appears in the last chunk
    s[1, 100] = 50.0
    t16, s16 = tf.cast(t, dtype), tf.cast(s, dtype)
    got = D.loss_fn(beta)(t16, s16, 1.5)
    tn, sn = (tf.cast(x, tf.float64).numpy() for x in (t16, s16))
    D.assert_loss(got, D.oracle(tn, sn, beta, 1.5), tn, sn, 1.5, dtype)


@pytest.mark.parametrize("beta", [None, 0.3])
@pytest.mark.parametrize("wrt", ["t", "p", "both"])
def test_gradient_computes_only_what_is_needed(require_custom, wrt, beta, rng):
    """One Grad op per backward pass; an input nobody differentiates is not computed (eager)."""
    t, s = D.logits(rng, (3, 9), np.float64), D.logits(rng, (3, 9), np.float64)
    weights = rng.normal(size=(3,))
    names = ("t", "p") if wrt == "both" else (wrt,)
    with U.record_eager_ops() as ran:
        _, got = D._grads(lambda a, b: D.loss_fn(beta)(a, b, 2.0), t, s, weights, wrt=names)
    grads = [attrs for op, attrs in ran if op == (KL_GRAD_OP if beta is None else JSD_GRAD_OP)]
    assert len(grads) == 1
    assert grads[0]["need_y_true"] == ("t" in names) and grads[0]["need_y_pred"] == ("p" in names)
    want_t, want_p = D.oracle_grads(t, s, weights, beta, 2.0)
    for name, g in zip(names, got):
        D.assert_grad(g, want_t if name == "t" else want_p, weights, 2.0, f"d/d{name}")


def test_gradient_in_keras_style_training_step(require_custom, rng):
    """Inside tf.function with a GradientTape over the student only (as Keras trains): the fused
    gradient op runs, computing d/dy_pred only."""
    teacher = tf.constant(D.logits(rng, (4, 11)))
    w = tf.Variable(D.logits(rng, (4, 11)))

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf_kld.kl_divergence_with_logits(teacher, w * 1.0, 2.0))
        return tape.gradient(loss, w)

    graph = step.get_concrete_function().graph
    grads = [op for op in graph.get_operations() if op.type == KL_GRAD_OP]
    assert len(grads) == 1 and not grads[0].get_attr("need_y_true") and grads[0].get_attr("need_y_pred")
    want = D.oracle_grads(teacher.numpy(), w.numpy(), np.full(4, 0.25), None, 2.0)[1]
    D.assert_grad(step(), want, np.full(4, 0.25), 2.0, "d/dy_pred", rtol=2e-6)


_DETERMINISM = r"""
import json, sys
import numpy as np
import tensorflow as tf
tf.config.threading.set_intra_op_parallelism_threads(int(sys.argv[1]))
import tf_kld
out = {"isa": tf_kld.ops.cpu_isa()}
rng = np.random.default_rng(7)
for shape in [(3, 100003), (257, 515), (64, 8), (3001, 10)]:
    for dtype in (tf.float32, tf.bfloat16):
        t = tf.cast(rng.normal(size=shape) * 4, dtype)
        s = tf.cast(rng.normal(size=shape) * 4, dtype)
        for name, fn in (("kl", lambda a, b: tf_kld.kl_divergence_with_logits(a, b, 2.0)),
                         ("jsd", lambda a, b: tf_kld.generalized_jsd_with_logits(a, b, 0.3, 2.0))):
            with tf.GradientTape() as tape:
                tape.watch([t, s])
                loss = fn(t, s)
            dt, ds = tape.gradient(loss, [t, s])
            key = f"{name}-{shape}-{dtype.name}"
            out[key] = [tf.cast(x, tf.float32).numpy().tobytes().hex() for x in (loss, dt, ds)]
print("RESULT " + json.dumps(out))
"""


def _run_determinism(threads, isa=None):
    env = dict(os.environ, PYTHONPATH=IMPORT_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TF_CPP_MIN_LOG_LEVEL="3", TF_KLD_IMPL="custom")
    if isa:
        env["TF_KLD_CPU_ISA"] = isa
    out = subprocess.run([sys.executable, "-c", _DETERMINISM, str(threads)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads([ln for ln in out.stdout.splitlines() if ln.startswith("RESULT")][-1][7:])


def test_deterministic_across_thread_counts(require_custom):
    """Bit-identical losses and gradients with 1 and 4 intra-op threads (wide rows are split by
    shape, not by thread count), and the narrower ISA builds within tolerance of the widest."""
    one, four = _run_determinism(1), _run_determinism(4)
    assert one == four
    narrower = {"avx512": ("avx2", "generic"), "avx2": ("generic",)}.get(one["isa"], ())
    for isa in narrower:
        other = _run_determinism(2, isa)
        assert other["isa"] == isa
        for key in one:
            if key == "isa":
                continue
            for a, b in zip(one[key], other[key]):
                x = np.frombuffer(bytes.fromhex(a), np.float32)
                y = np.frombuffer(bytes.fromhex(b), np.float32)
                np.testing.assert_allclose(x, y, rtol=2e-2 if "bfloat16" in key else 1e-4,
                                           atol=1e-6, err_msg=key)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 3.0])
@pytest.mark.parametrize("cols", [7, 33, 300, 32003, 70001])
def test_bfloat16_rows_give_the_float32_result_of_their_values(require_custom, cols, temperature, rng):
    """A bfloat16 row's KL, JSD and stats are the float32 op's on the same values widened, bit for bit
    (the CPU forward sums both in one order of the terms; the chunked linear loss relies on it: its
    bfloat16 and float32 chunks give the same loss). Rows of -inf classes, offsets of 1e3."""
    t = rng.normal(0.0, 3.0, (5, cols)) + np.array([0.0, 1e3, 0.0, -1e3, 0.0])[:, None]
    s = rng.normal(0.0, 3.0, (5, cols))
    t[2, ::5], s[4, 1::7] = -np.inf, -np.inf
    t16, s16 = tf.constant(t, tf.bfloat16), tf.constant(s, tf.bfloat16)
    t32, s32 = tf.cast(t16, tf.float32), tf.cast(s16, tf.float32)
    module = kld_ops._module
    for op, attrs in ((module.tf_kld_kl_divergence_with_logits, {}),
                      (module.tf_kld_generalized_jsd_with_logits, {"beta": 0.3, "beta_f64": "0.3"})):
        loss16, stats16 = op(t16, s16, temperature=temperature, **attrs)
        loss32, stats32 = op(t32, s32, temperature=temperature, **attrs)
        np.testing.assert_array_equal(stats16.numpy(), stats32.numpy())
        np.testing.assert_array_equal(tf.cast(loss16, tf.float32).numpy(),
                                      tf.cast(tf.cast(loss32, tf.bfloat16), tf.float32).numpy())


def test_op_checks_its_inputs(require_custom):
    module = kld_ops._module
    t = tf.zeros((2, 3))
    with pytest.raises(tf.errors.InvalidArgumentError, match="same shape"):
        module.tf_kld_kl_divergence_with_logits(t, tf.zeros((2, 4)))
    with pytest.raises(tf.errors.InvalidArgumentError, match="rank >= 1"):
        module.tf_kld_kl_divergence_with_logits(tf.constant(1.0), tf.constant(1.0))
    with pytest.raises(tf.errors.InvalidArgumentError, match="temperature must be a finite number > 0"):
        module.tf_kld_kl_divergence_with_logits(t, t, temperature=0.0)
    with pytest.raises(tf.errors.InvalidArgumentError, match="temperature must be a finite number > 0"):
        module.tf_kld_kl_divergence_with_logits(t, t, temperature=math.nan)
    loss, stats = module.tf_kld_kl_divergence_with_logits(t, t)
    assert loss.shape == (2,) and stats.shape == (2, 5) and stats.dtype == tf.float64
    with pytest.raises(tf.errors.InvalidArgumentError, match="grad must have the loss's shape"):
        module.tf_kld_kl_divergence_with_logits_grad(tf.zeros((3,)), t, t, stats)
    with pytest.raises(tf.errors.InvalidArgumentError, match="stats must have shape"):
        module.tf_kld_kl_divergence_with_logits_grad(loss, t, t, tf.zeros((2, 4), tf.float64))
    d_t, d_p = module.tf_kld_kl_divergence_with_logits_grad(loss, t, t, stats, need_y_true=False)
    assert d_t.shape == (0,) and d_p.shape == (2, 3)
    with pytest.raises(ValueError, match="same shape"):
        tf.function(module.tf_kld_kl_divergence_with_logits).get_concrete_function(
            tf.TensorSpec([None, 3]), tf.TensorSpec([None, 4]))


def test_jsd_op_checks_beta(require_custom):
    t = tf.zeros((2, 3))
    for beta in (0.0, 1.0, -0.5, math.nan):
        with pytest.raises(tf.errors.InvalidArgumentError, match="beta must be in"):
            kld_ops._module.tf_kld_generalized_jsd_with_logits(t, t, beta=beta, beta_f64=repr(beta))
    loss, stats = kld_ops._module.tf_kld_generalized_jsd_with_logits(t, t, beta=0.5)
    assert stats.shape == (2, 6)
    with pytest.raises(tf.errors.InvalidArgumentError, match="stats must have shape"):
        kld_ops._module.tf_kld_generalized_jsd_with_logits_grad(loss, t, t, tf.zeros((2, 5), tf.float64))


def test_float64_temperature_is_exact(require_custom, rng):
    """A float64 temperature that float32 cannot hold (0.1) reaches the op exactly."""
    t, s = D.logits(rng, (3, 6), np.float64, 0.3), D.logits(rng, (3, 6), np.float64, 0.3)
    got = tf_kld.kl_divergence_with_logits(t, s, 0.1).numpy()
    np.testing.assert_allclose(got, D.oracle(t, s, None, 0.1), rtol=1e-12)
    got = tf_kld.generalized_jsd_with_logits(t, s, 0.1, 0.1).numpy()  # beta too
    np.testing.assert_allclose(got, D.oracle(t, s, 0.1, 0.1), rtol=1e-12)


def test_xla_graphs(impl):
    """Under jit_compile "custom" keeps the fused ops, which lower themselves to XLA
    (tests/test_distillation_xla.py checks the compiled values); "reference" traces the log-softmax
    composite ("auto" too: test_distillation_xla.py)."""
    spec = tf.TensorSpec([None, 7], tf.float32)
    for fn, op in ((lambda a, b: tf_kld.kl_divergence_with_logits(a, b, 2.0), KL_OP),
                   (lambda a, b: tf_kld.generalized_jsd_with_logits(a, b, 0.3, 2.0), JSD_OP)):
        jitted = tf.function(fn, jit_compile=True).get_concrete_function(spec, spec)
        types = U.graph_op_types(jitted)
        if impl == "custom":  # the composite's exps not there
            assert op in types and not {"Exp", "LogSoftmax"} & types, types
        else:
            assert not {KL_OP, JSD_OP} & types and "Exp" in types, types
        plain = U.graph_op_types(tf.function(fn).get_concrete_function(spec, spec))
        assert bool({KL_OP, JSD_OP} & plain) == (impl == "custom"), plain
