"""Property-based fuzz of tf_kld.kl_divergence: the custom op against the reference composite.

Run by tests/test_fuzz.py in a subprocess, so that a crash fails that test instead of killing
pytest. Hypothesis draws shapes (rank 0-4, zero-sized dims, broadcastable and non-broadcastable
pairs), dtypes (float16/bfloat16/float32/float64 for y_pred; those, int32, bool or a Python list for
y_true), values (NaN, +-Inf, +-0, negatives, > 1, subnormals, 3e38, values at eps and 1) and the
execution mode (eager; tf.function with unknown rank; tf.function with unknown dims). For each
example both paths compute the loss and its gradients w.r.t. both inputs under a random upstream
gradient; they must agree (same shapes, NaN and inf positions, values within the tolerances of
tests/_util.py) or both raise the same exception type. Prints one line `FUZZ {json counts}`.

    python3 tests/_fuzz_worker.py [--examples N]
"""

import argparse
import collections
import json
import os
import sys
import tempfile
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis.configuration import set_hypothesis_home_dir  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

import _util as U  # noqa: E402
import tf_kld  # noqa: E402

FLOATS = {d.name: d for d in U.FLOAT_DTYPES}
TRUE_KINDS = list(FLOATS) + ["same", "int32", "bool", "list"]
MODES = ("eager", "eager", "graph_unknown_rank", "graph_unknown_dims")
SPECIALS = [np.nan, np.inf, -np.inf, 0.0, -0.0, -1.0, -0.5, 0.5, 1.0, 1.5, 2.0, 3e38, -3e38, 65504.0,
            7e4, 1e-45, 1e-40, 5e-324, 6e-8, 1e-7, 1.1920929e-07, 1e-3, 1.0 - 2 ** -11, 1.0 + 2 ** -7]
MAX_ELEMENTS = 240

COUNTS = collections.Counter()


class Failure(AssertionError):
    pass


# --------------------------------------------------------------------------------------------
# Strategies


@st.composite
def shape_pairs(draw):
    """(shape_true, shape_pred, kind): kind is 'same', 'broadcast', 'incompatible' or 'rank0'."""
    kind = ["same"] * 4 + ["broadcast"] * 4 + ["incompatible", "rank0"]
    kind = kind[draw(st.integers(0, len(kind) - 1))]
    if kind == "rank0":
        return (), (), kind
    rank = draw(st.integers(1, 4))
    dims = st.sampled_from([3, 1, 2, 4, 5, 0, 2, 3, 7, 1, 4])  # zero-sized about 1 in 11
    shape = list(draw(st.lists(dims, min_size=rank, max_size=rank)))
    while int(np.prod(shape)) > MAX_ELEMENTS:
        shape[shape.index(max(shape))] -= 1
    if kind == "same":
        return tuple(shape), tuple(shape), kind
    true, pred = list(shape), list(shape)
    if kind == "broadcast":
        for i in range(rank):
            side = draw(st.sampled_from(["none", "none", "true", "pred"]))
            if side == "true":
                true[i] = 1
            elif side == "pred":
                pred[i] = 1
        drop = draw(st.integers(0, rank - 1))  # leading axes missing from one side
        if drop and draw(st.booleans()):
            true = true[drop:]
        elif drop:
            pred = pred[drop:]
        return tuple(true), tuple(pred), kind
    i = draw(st.integers(0, rank - 1))  # incompatible: one axis of sizes > 1 that differ
    a = draw(st.integers(2, 4))
    b = draw(st.integers(2, 4).filter(lambda x: x != a))
    true[i], pred[i] = a, b
    while int(np.prod(true)) > MAX_ELEMENTS or int(np.prod(pred)) > MAX_ELEMENTS:
        j = max((k for k in range(rank) if k != i), key=lambda k: max(true[k], pred[k]))
        true[j], pred[j] = max(1, true[j] // 2), max(1, pred[j] // 2)
    return tuple(true), tuple(pred), kind


def values(shape):
    element = st.one_of(st.sampled_from(SPECIALS), st.floats(0.0, 1.0), st.floats(-2.0, 2.0))
    return hnp.arrays(np.float64, shape, elements=element)


@st.composite
def examples(draw):
    shape_true, shape_pred, kind = draw(shape_pairs())
    pred_dtype = draw(st.sampled_from(sorted(FLOATS)))
    true_kind = draw(st.sampled_from(TRUE_KINDS))
    mode = draw(st.sampled_from(MODES))
    if mode != "eager" and true_kind not in ("same", "int32"):
        true_kind = draw(st.sampled_from(["same", pred_dtype]))  # bounds the number of traces
    t64 = draw(values(shape_true))
    if true_kind == "list" and t64.size == 0:
        true_kind = "same"  # an empty nested list cannot carry a shape such as (3, 0, 3)
    p64 = draw(values(shape_pred))
    try:
        out_shape = np.broadcast_shapes(shape_true, shape_pred)[:-1]
    except ValueError:
        out_shape = ()
    weights = draw(hnp.arrays(np.float64, out_shape, elements=st.floats(-2.0, 2.0)))
    return dict(kind=kind, pred_dtype=pred_dtype, true_kind=true_kind, mode=mode, t64=t64, p64=p64,
                weights=weights)


# --------------------------------------------------------------------------------------------
# Running one path


def _inputs(ex):
    """NumPy arrays (or a list) as passed to tf_kld, and the dtypes of both tensors."""
    pred_dtype = FLOATS[ex["pred_dtype"]]
    with np.errstate(over="ignore", invalid="ignore"):
        p = ex["p64"].astype(U.np_dtype(pred_dtype))
        kind = ex["true_kind"]
        if kind == "list":
            return ex["t64"].tolist(), p, None, pred_dtype
        if kind == "int32":
            t = np.nan_to_num(ex["t64"], nan=0.0, posinf=3.0, neginf=-3.0).clip(-3, 3).astype(np.int32)
            return t, p, tf.int32, pred_dtype
        if kind == "bool":
            return ex["t64"] > 0.5, p, tf.bool, pred_dtype
        true_dtype = pred_dtype if kind == "same" else FLOATS[kind]
        return ex["t64"].astype(U.np_dtype(true_dtype)), p, true_dtype, pred_dtype


def _loss_and_grads(t, p, w, watch_true):
    with tf.GradientTape(persistent=False) as tape:
        watched = [t, p] if watch_true else [p]
        tape.watch(watched)
        loss = tf_kld.kl_divergence(t, p)
    grads = tape.gradient(loss, watched, output_gradients=tf.cast(w, loss.dtype))
    return [loss] + list(grads)


_FUNCTIONS = {}


def _graph_function(impl, mode, true_dtype, pred_dtype, rank_true, rank_pred, watch_true):
    key = (impl, mode, true_dtype, pred_dtype, rank_true, rank_pred, watch_true)
    if key not in _FUNCTIONS:
        def spec(dtype, rank):
            return tf.TensorSpec(None if mode == "graph_unknown_rank" else [None] * rank, dtype)

        @tf.function(input_signature=[spec(true_dtype, rank_true), spec(pred_dtype, rank_pred),
                                      tf.TensorSpec(None, pred_dtype)])
        def fn(t, p, w):
            return _loss_and_grads(t, p, w, watch_true)

        _FUNCTIONS[key] = fn
        COUNTS["graph_traces"] += 1
    return _FUNCTIONS[key]


def run_path(impl, ex):
    """("ok", [loss, (d_true,) d_pred] as NumPy) or ("raise", exception)."""
    t, p, true_dtype, pred_dtype = _inputs(ex)
    watch_true = true_dtype is not None and true_dtype.is_floating
    w = ex["weights"]
    with tf_kld.implementation(impl):
        try:
            if ex["mode"] == "eager":
                t_in = tf.constant(t) if watch_true else t
                out = _loss_and_grads(t_in, tf.constant(p), w, watch_true)
            else:
                fn = _graph_function(impl, ex["mode"], true_dtype, pred_dtype, np.ndim(t), np.ndim(p),
                                     watch_true)
                out = fn(tf.constant(t), tf.constant(p), tf.constant(w.astype(U.np_dtype(pred_dtype))))
        except (tf.errors.OpError, ValueError, TypeError) as err:
            return "raise", err
    return "ok", [None if x is None else x.numpy() for x in out]


# --------------------------------------------------------------------------------------------
# Comparing the paths


def _sum_to_shape(x, shape):
    """Sums a broadcast array back to `shape`, as the gradient of a broadcast does."""
    x = np.sum(x, axis=tuple(range(x.ndim - len(shape)))) if x.ndim > len(shape) else x
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and x.shape[i] != 1)
    return np.sum(x, axis=axes, keepdims=True) if axes else x


def _compare_grad(got, want, scale, copies, dtype, what):
    dtype = tf.as_dtype(dtype)
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape:
        raise Failure(f"{what}: shape {got.shape} != {want.shape}")
    for check in (np.isnan, np.isposinf, np.isneginf):
        if not np.array_equal(check(got), check(want)):
            raise Failure(f"{what}: {check.__name__} positions differ:\ncustom {got}\nreference {want}")
    scale = np.nan_to_num(scale, nan=0.0, posinf=0.0)
    rtol = U.RTOL[tf.float32] if dtype in U.LOW_PRECISION else U.RTOL[dtype]
    tol = rtol * (np.abs(want) + scale)
    if dtype in U.LOW_PRECISION:
        # Both paths compute each term in float32, sum the broadcast copies in float32 (at most
        # `copies` terms, each sum within copies * 2^-24 of the summed magnitude) and round the
        # result to the 16-bit dtype once: two such roundings differ by at most one 16-bit ulp.
        with np.errstate(invalid="ignore", over="ignore"):
            ulp = np.spacing(np.abs(want).astype(U.np_dtype(dtype))).astype(np.float64)
        tol = tol + copies * 2.0 ** -24 * scale + np.nan_to_num(ulp, posinf=0.0)
    finite = np.isfinite(want)
    with np.errstate(invalid="ignore"):
        bad = finite & ~(np.abs(got - want) <= tol)
    if bad.any():
        i = tuple(np.argwhere(bad)[0])
        raise Failure(f"{what}: {int(bad.sum())} values differ; first at {i}: custom {got[i]!r}, "
                      f"reference {want[i]!r}, tol {tol[i]:.3g}")


def compare(ex, custom, reference):
    mode, kind = ex["mode"], ex["kind"]
    must_raise = kind in ("incompatible", "rank0")
    if custom[0] == "raise" or reference[0] == "raise":
        if custom[0] != reference[0]:
            raised, err = ("custom", custom[1]) if custom[0] == "raise" else ("reference", reference[1])
            raise Failure(f"only the {raised} path raised: {type(err).__name__}: {err}")
        ce, re_ = custom[1], reference[1]
        if type(ce) is not type(re_):
            raise Failure(f"different exceptions: custom {type(ce).__name__}: {ce}\n"
                          f"reference {type(re_).__name__}: {re_}")
        if not must_raise:
            raise Failure(f"both paths raised on valid inputs: {type(ce).__name__}: {ce}")
        if mode == "eager" and not ("y_true" in str(ce) and "y_pred" in str(ce)):
            raise Failure(f"the error does not name y_true and y_pred: {ce}")
        COUNTS["both_raised"] += 1
        COUNTS[f"raised_{type(ce).__name__}"] += 1
        return
    if must_raise:
        raise Failure(f"{kind} shapes {ex['t64'].shape} vs {ex['p64'].shape} did not raise")
    t, p, _, pred_dtype = _inputs(ex)
    t = np.asarray(t, np.float64) if ex["true_kind"] != "list" else np.asarray(t)
    p = np.asarray(p)
    loss, ref_loss = custom[1][0], reference[1][0]
    U.assert_loss_close(loss, ref_loss, t, p, pred_dtype, what="loss, custom vs reference")
    tc, pc = U.clipped64(t, p, pred_dtype)
    g = np.abs(ex["weights"])[..., None]
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        scale_t = g * (1.0 + np.abs(np.log(tc / pc)))
        scale_p = g * tc / pc
    grads, ref_grads = custom[1][1:], reference[1][1:]
    names = ["y_true", "y_pred"] if len(grads) == 2 else ["y_pred"]
    scales = [scale_t, scale_p] if len(grads) == 2 else [scale_p]
    shapes = [np.shape(t), np.shape(p)] if len(grads) == 2 else [np.shape(p)]
    for name, got, want, scale, shape in zip(names, grads, ref_grads, scales, shapes):
        copies = max(1, int(np.prod(tc.shape)) // max(1, int(np.prod(shape))))
        dtype = got.dtype if got.dtype != object else pred_dtype
        _compare_grad(got, want, _sum_to_shape(scale, shape), copies, tf.as_dtype(dtype),
                      f"d/d{name}, custom vs reference")
    COUNTS["agreed"] += 1


# --------------------------------------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=300)
    args = parser.parse_args(argv)
    if not tf_kld.custom_op_loaded():
        print(f"tf_kld custom op library not loaded: {tf_kld.ops.load_error()}", file=sys.stderr)
        return 2
    warnings.simplefilter("ignore")
    tf.get_logger().setLevel("ERROR")  # retracing notices: each graph case traces on purpose

    @settings(max_examples=args.examples, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck), print_blob=True)
    @given(examples())
    def fuzz(ex):
        COUNTS["examples"] += 1
        COUNTS[f"mode_{ex['mode']}"] += 1
        COUNTS[f"shapes_{ex['kind']}"] += 1
        COUNTS[f"y_pred_{ex['pred_dtype']}"] += 1
        COUNTS[f"y_true_{ex['true_kind']}"] += 1
        both = np.concatenate([ex["t64"].ravel(), ex["p64"].ravel()])
        COUNTS["with_nan"] += bool(np.isnan(both).any())
        COUNTS["with_inf"] += bool(np.isinf(both).any())
        COUNTS["with_zero_size"] += both.size == 0 or 0 in ex["t64"].shape + ex["p64"].shape
        COUNTS["elements"] += int(both.size)
        custom = run_path("custom", ex)
        reference = run_path("reference", ex)
        try:
            compare(ex, custom, reference)
        except AssertionError as err:
            raise Failure(f"{err}\nexample: mode={ex['mode']} kind={ex['kind']} y_pred "
                          f"{ex['pred_dtype']} y_true {ex['true_kind']}\ny_true={ex['t64']!r}\n"
                          f"y_pred={ex['p64']!r}\nweights={ex['weights']!r}") from None

    with tempfile.TemporaryDirectory(prefix="tf_kld_fuzz_") as home:
        set_hypothesis_home_dir(home)  # hypothesis caches there, not in the source tree
        fuzz()
    print("FUZZ " + json.dumps(dict(sorted(COUNTS.items()))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
