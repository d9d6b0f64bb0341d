"""tf_kld.linear_distillation_loss: the chunked fused linear + distillation loss.

Values and gradients (student hidden states, kernel, bias) against the materialised float64
composite differentiated by TensorFlow; chunk sizes that do not divide the rows; rows of weight 0;
3-D hidden states; 16-bit inputs; tf.function, XLA and SavedModel (gradients through the reloaded
function too); every bad input; a memory test in a fresh process that fails if a [rows, classes]
tensor is ever allocated; MirroredStrategy against one device; and the example's smoke run.
"""

import functools
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import tf_kld

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
IMPORT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(tf_kld.__file__)))


def _problem(rng, rows=37, hs=8, ht=6, classes=50, lead=None, dtype=np.float64, scale=1.0):
    lead = lead or (rows,)
    x = {
        "student_hidden": rng.normal(size=lead + (hs,)) * scale,
        "student_kernel": rng.normal(size=(hs, classes)),
        "student_bias": rng.normal(size=(classes,)),
        "teacher_hidden": rng.normal(size=lead + (ht,)) * scale,
        "teacher_kernel": rng.normal(size=(ht, classes)),
        "teacher_bias": rng.normal(size=(classes,)),
        "sample_weight": rng.uniform(0.0, 2.0, size=lead),
    }
    return {k: v.astype(dtype) for k, v in x.items()}


def _materialised(x, beta, temperature, bias=True):
    """The spec in float64 TensorFlow ops, with the [rows, classes] logits materialised."""
    s = tf.linalg.matvec(tf.linalg.matrix_transpose(x["student_kernel"]), x["student_hidden"])
    t = tf.linalg.matvec(tf.linalg.matrix_transpose(x["teacher_kernel"]), x["teacher_hidden"])
    if bias:
        s, t = s + x["student_bias"], t + x["teacher_bias"]
    lp = tf.nn.log_softmax(t / temperature)
    lq = tf.nn.log_softmax(s / temperature)
    p, q = tf.exp(lp), tf.exp(lq)
    if beta == 0:
        d = tf.reduce_sum(p * (lp - lq), -1)
    elif beta == 1:
        d = tf.reduce_sum(q * (lq - lp), -1)
    else:
        lm = tf.reduce_logsumexp(tf.stack([lp + math.log(beta), lq + math.log1p(-beta)]), 0)
        d = beta * tf.reduce_sum(p * (lp - lm), -1) + (1 - beta) * tf.reduce_sum(q * (lq - lm), -1)
    w = tf.convert_to_tensor(x["sample_weight"])
    return tf.math.divide_no_nan(tf.reduce_sum(w * d), tf.reduce_sum(w))


STUDENT = ("student_hidden", "student_kernel", "student_bias")


def _loss_and_grads(fn, x, **kwargs):
    xs = {k: tf.convert_to_tensor(v) for k, v in x.items()}
    with tf.GradientTape() as tape:
        tape.watch([xs[k] for k in STUDENT])
        loss = fn(xs, **kwargs)
    return loss, tape.gradient(loss, [xs[k] for k in STUDENT])


def _fused(xs, beta, temperature, chunk_size=None, bias=True):
    extra = {"student_bias": xs["student_bias"], "teacher_bias": xs["teacher_bias"]} if bias else {}
    return tf_kld.linear_distillation_loss(
        xs["student_hidden"], xs["student_kernel"], xs["teacher_hidden"], xs["teacher_kernel"],
        temperature=temperature, beta=beta, sample_weight=xs["sample_weight"],
        chunk_size=chunk_size, **extra)


def _assert_matches(x, beta, temperature, chunk_size, bias=True, tol=1e-12):
    loss, grads = _loss_and_grads(_fused, x, beta=beta, temperature=temperature,
                                  chunk_size=chunk_size, bias=bias)
    want, want_grads = _loss_and_grads(_materialised, x, beta=beta, temperature=temperature, bias=bias)
    assert loss.dtype == want.dtype
    np.testing.assert_allclose(loss.numpy(), want.numpy(), rtol=tol, atol=tol)
    for name, got, ref in zip(STUDENT, grads, want_grads):
        if not bias and name == "student_bias":
            continue
        np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=tol, atol=tol, err_msg=name)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("chunk_size", [1, 5, 16, 64, None])
def test_float64_value_and_student_gradients(beta, chunk_size, impl, rng):
    _assert_matches(_problem(rng), beta, 2.0, chunk_size)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_float32_jsd_of_a_close_student(beta, impl, rng):
    """A student projection within 2^-8 of the teacher's (float32 logits exact: small integers
    times multiples of 2^-10): the generalized JSD is O(d^2) against terms O(d), and the chunks
    take lp - lm, lq - lm straight from d = lq - lp (the ops' kernels, or reference.log_ratios on
    the composite path), so each row's float32 loss (one row weighted at a time) stays within
    test_distillation's cancellation-aware bound (with lm rounded, some ulps of |lm| in every
    term: the composite path was 20 to 1000 times over it here)."""
    import test_distillation as D

    h = rng.integers(-3, 4, size=(8, 8)).astype(np.float32)
    kt = (rng.integers(-256, 257, size=(8, 300)) / 128.0).astype(np.float32)
    ks = kt + (rng.integers(-4, 5, size=kt.shape) / 1024.0).astype(np.float32)
    t64, s64 = h.astype(np.float64) @ kt.astype(np.float64), h.astype(np.float64) @ ks.astype(np.float64)
    want, bound = D.oracle(t64, s64, beta), D.jsd_error_bound(t64, s64, beta, 1.0)
    got = [float(tf_kld.linear_distillation_loss(h, ks, h, kt, beta=beta, chunk_size=4,
                                                 sample_weight=np.eye(8, dtype=np.float32)[i]))
           for i in range(8)]
    assert np.all(np.abs(np.array(got) - want) <= bound), np.abs(np.array(got) - want) / bound


@pytest.mark.parametrize("onednn", [False, True])
def test_both_ways_of_the_hidden_states_gradient(onednn, monkeypatch, require_custom, rng):
    # dS @ W^T comes from TensorFlow's matmul where oneDNN is on, else from the in-place op's pass,
    # and the float32 chunks' logits from TensorFlow's matmul, else from TfKld>LinearLogits: both,
    # whatever this machine's TensorFlow does, in float64 and float32 (16-bit kernels too).
    monkeypatch.setattr(tf_kld.ops, "onednn_enabled", lambda: onednn)
    _assert_matches(_problem(rng, classes=300), 0.0, 2.0, 5)
    _assert_matches(_problem(rng, classes=300), 0.5, 2.0, 16)
    x = _problem(rng, rows=64, hs=16, ht=16, classes=1000, scale=0.3)
    for dtype, tol in ((tf.float32, 1e-5), (tf.bfloat16, 3e-2)):
        rounded = {k: tf.cast(tf.cast(v, dtype), tf.float64).numpy() for k, v in x.items()}
        loss, grads = _loss_and_grads(_fused, {k: tf.cast(v, dtype) for k, v in x.items()},
                                      beta=0.0, temperature=2.0, chunk_size=24)
        want, want_grads = _loss_and_grads(_materialised, rounded, beta=0.0, temperature=2.0)
        np.testing.assert_allclose(loss.numpy(), want.numpy(), rtol=tol)
        for name, got, ref in zip(STUDENT, grads, want_grads):
            err = np.max(np.abs(tf.cast(got, tf.float64).numpy() - ref.numpy())) / np.max(np.abs(ref.numpy()))
            assert err < tol, (dtype, name, err)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
def test_temperatures_and_no_bias(temperature, impl, rng):
    _assert_matches(_problem(rng), 0.0, temperature, 7, bias=False)
    _assert_matches(_problem(rng), 0.5, temperature, 7, bias=True)


def test_three_d_hidden_states(impl, rng):
    _assert_matches(_problem(rng, lead=(3, 11)), 0.5, 1.5, 4)


def test_rows_of_weight_zero_contribute_nothing(impl, rng):
    x = _problem(rng)
    x["sample_weight"][::3] = 0.0
    x["student_hidden"][3] = np.nan  # a padding row holding garbage changes nothing
    loss, grads = _loss_and_grads(_fused, x, beta=0.0, temperature=1.0, chunk_size=4)
    keep = x["sample_weight"] != 0
    y = {k: (v[keep] if k in ("student_hidden", "teacher_hidden", "sample_weight") else v)
         for k, v in x.items()}
    want, want_grads = _loss_and_grads(_materialised, y, beta=0.0, temperature=1.0)
    np.testing.assert_allclose(loss.numpy(), want.numpy(), rtol=1e-12)
    np.testing.assert_allclose(grads[0].numpy()[keep], want_grads[0].numpy(), rtol=1e-12, atol=1e-14)
    assert np.all(grads[0].numpy()[~keep] == 0)
    np.testing.assert_allclose(grads[1].numpy(), want_grads[1].numpy(), rtol=1e-12, atol=1e-14)


def test_all_weights_zero_give_zero(impl, rng):
    x = _problem(rng)
    x["sample_weight"][:] = 0.0
    loss, grads = _loss_and_grads(_fused, x, beta=0.5, temperature=1.0, chunk_size=8)
    assert loss.numpy() == 0.0 and all(np.all(g.numpy() == 0) for g in grads)


def test_default_weights_are_one(rng):
    x = _problem(rng)
    xs = {k: tf.constant(v) for k, v in x.items()}
    got = tf_kld.linear_distillation_loss(xs["student_hidden"], xs["student_kernel"],
                                          xs["teacher_hidden"], xs["teacher_kernel"], chunk_size=6)
    x["sample_weight"][:] = 1.0
    want = _materialised(x, 0.0, 1.0, bias=False)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-12)


def test_weights_of_the_leading_rank_broadcast(impl, rng):
    # [batch, 1] weights (one per sequence) and [1, length] ones are those broadcast to every row;
    # NumPy integers are chunk sizes as Python ints are.
    x = _problem(rng, lead=(3, 5))
    for shape in ((3, 1), (1, 5), (1, 1)):
        w = rng.uniform(0.5, 2.0, size=shape)
        x["sample_weight"] = w
        loss, grads = _loss_and_grads(_fused, x, beta=0.5, temperature=2.0, chunk_size=np.int64(4))
        x["sample_weight"] = np.broadcast_to(w, (3, 5)).copy()
        want, want_grads = _loss_and_grads(_materialised, x, beta=0.5, temperature=2.0)
        np.testing.assert_allclose(loss.numpy(), want.numpy(), rtol=1e-12)
        for name, got, ref in zip(STUDENT, grads, want_grads):
            np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=1e-12, atol=1e-14, err_msg=name)
    for shape in ((3, 2), (5,), (3,), (3, 5, 1)):
        with pytest.raises(ValueError, match="sample_weight"):
            _fused({**x, "sample_weight": np.ones(shape)}, 0.0, 1.0)


@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16, tf.float16])
def test_low_precision_inputs(dtype, impl, rng):
    # Matmuls in the input dtype, the divergence in float32: compared with the float64 composite on
    # the same (rounded) inputs, within what rounding the logits to the input dtype costs.
    x = _problem(rng, rows=64, hs=16, ht=16, classes=300, dtype=np.float64, scale=0.3)
    rounded = {k: tf.cast(tf.cast(v, dtype), tf.float64).numpy() for k, v in x.items()}
    xs = {k: tf.cast(v, dtype) for k, v in x.items()}
    with tf.GradientTape() as tape:
        tape.watch([xs[k] for k in STUDENT])
        loss = _fused(xs, beta=0.5, temperature=2.0, chunk_size=24)
    grads = tape.gradient(loss, [xs[k] for k in STUDENT])
    assert loss.dtype == tf.float32
    assert [g.dtype for g in grads] == [dtype] * 3
    want, want_grads = _loss_and_grads(_materialised, rounded, beta=0.5, temperature=2.0)
    tol = {tf.float32: 1e-5, tf.bfloat16: 3e-2, tf.float16: 4e-3}[dtype]
    np.testing.assert_allclose(loss.numpy(), want.numpy(), rtol=tol)
    for name, got, ref in zip(STUDENT, grads, want_grads):
        ref = ref.numpy()
        err = np.max(np.abs(tf.cast(got, tf.float64).numpy() - ref)) / np.max(np.abs(ref))
        assert err < tol, (name, err)


def test_tf_function_unknown_rows_and_xla_agree_with_eager(rng):
    x = {k: tf.constant(v, tf.float32) for k, v in _problem(rng).items()}

    def fwd_bwd(hs, ws, bs):
        with tf.GradientTape() as tape:
            tape.watch([hs, ws, bs])
            loss = tf_kld.linear_distillation_loss(
                hs, ws, x["teacher_hidden"][: tf.shape(hs)[0]], x["teacher_kernel"], student_bias=bs,
                teacher_bias=x["teacher_bias"], beta=0.5, temperature=2.0,
                sample_weight=x["sample_weight"][: tf.shape(hs)[0]], chunk_size=8)
        return [loss] + tape.gradient(loss, [hs, ws, bs])

    args = (x["student_hidden"], x["student_kernel"], x["student_bias"])
    eager = fwd_bwd(*args)
    spec = [tf.TensorSpec([None, 8]), tf.TensorSpec([8, 50]), tf.TensorSpec([50])]
    graph = tf.function(fwd_bwd, input_signature=spec)(*args)
    xla = tf.function(fwd_bwd, jit_compile=True)(*args)
    for got in (graph, xla):
        for a, b in zip(got, eager):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_xla_float64_matches_materialised_with_weight_zero_rows(beta, rng):
    # Under XLA the rows of weight 0 stay in the loop (static shapes) and must still contribute
    # nothing, even holding NaN; 3-D hidden states, a chunk that does not divide the 3 x 13 rows.
    x = _problem(rng, lead=(3, 13))
    x["sample_weight"][:, ::4] = 0.0
    x["student_hidden"][0, 4] = np.nan
    x["teacher_hidden"][2, 8] = np.nan

    @tf.function(jit_compile=True)
    def fused(hs, ws, bs):
        with tf.GradientTape() as tape:
            tape.watch([hs, ws, bs])
            loss = tf_kld.linear_distillation_loss(
                hs, ws, x["teacher_hidden"], x["teacher_kernel"], student_bias=bs,
                teacher_bias=x["teacher_bias"], beta=beta, temperature=1.5,
                sample_weight=x["sample_weight"], chunk_size=5)
        return [loss] + tape.gradient(loss, [hs, ws, bs])

    got = fused(*(tf.constant(x[k]) for k in STUDENT))
    keep = x["sample_weight"] != 0
    y = {k: (v[keep] if k in ("student_hidden", "teacher_hidden", "sample_weight") else v)
         for k, v in x.items()}
    want, want_grads = _loss_and_grads(_materialised, y, beta=beta, temperature=1.5)
    np.testing.assert_allclose(got[0].numpy(), want.numpy(), rtol=1e-12)
    d_h = got[1].numpy()
    assert d_h.shape == x["student_hidden"].shape and np.all(d_h[~keep] == 0)
    np.testing.assert_allclose(d_h[keep], want_grads[0].numpy(), rtol=1e-12, atol=1e-14)
    for name, a, b in zip(STUDENT[1:], got[2:], want_grads[1:]):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-12, atol=1e-14, err_msg=name)


def test_automatic_chunk_is_no_larger_than_the_rows(monkeypatch, rng):
    # 10 rows at 50 classes: the automatic chunk (1024 rows) would pad them to 1024 rows of work.
    seen = []
    chunked = tf_kld.linear._chunked

    def spy(*args):
        seen.append(args[-2])
        return chunked(*args)

    monkeypatch.setattr(tf_kld.linear, "_chunked", spy)
    _assert_matches(_problem(rng, rows=10), 0.0, 1.0, None)
    _assert_matches(_problem(rng, lead=(2, 3)), 0.0, 1.0, None)
    assert seen == [10, 6], seen


def test_automatic_chunk_from_classes_and_hidden_size():
    # A 32 MiB [chunk, V] float32 buffer, or H_s / 2 rows when more; a power of two <= 1024, no
    # more than the rows.
    chunk = tf_kld.linear.auto_chunk_size
    assert chunk(128256) == chunk(128256, 512, 128) == 64
    assert chunk(128256, 2048, 256) == 128 and chunk(128256, 100, 256) == 100
    assert chunk(32000, None, 512) == 256 and chunk(32000, None, 1024) == 512
    assert chunk(32000, None, 4096) == 1024 and chunk(10, 5000) == 1024 and chunk(10, 3) == 3


def test_savedmodel_reload(tmp_path, rng):
    x = {k: tf.constant(v, tf.float32) for k, v in _problem(rng).items()}

    class Head(tf.Module):
        def __init__(self):
            super().__init__()
            self.kernel = tf.Variable(x["student_kernel"])

        @tf.function(input_signature=[tf.TensorSpec([None, 8]), tf.TensorSpec([None, 6]),
                                      tf.TensorSpec([6, 50])])
        def loss(self, hs, ht, wt):
            return tf_kld.linear_distillation_loss(hs, self.kernel, ht, wt, beta=1.0, chunk_size=8)

    head = Head()
    want = head.loss(x["student_hidden"], x["teacher_hidden"], x["teacher_kernel"])
    tf.saved_model.save(head, str(tmp_path / "head"))
    loaded = tf.saved_model.load(str(tmp_path / "head"))
    got = loaded.loss(x["student_hidden"], x["teacher_hidden"], x["teacher_kernel"])
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-6)


def test_savedmodel_reload_keeps_the_gradient(tmp_path, rng):
    # The reloaded function's custom gradient (saved with it) gives the original's gradients.
    x = {k: tf.constant(v) for k, v in _problem(rng).items()}

    class Loss(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 8], tf.float64), tf.TensorSpec([8, 50], tf.float64),
                                      tf.TensorSpec([50], tf.float64), tf.TensorSpec([None], tf.float64)])
        def __call__(self, hs, ws, bs, w):
            return tf_kld.linear_distillation_loss(
                hs, ws, x["teacher_hidden"], x["teacher_kernel"], student_bias=bs,
                teacher_bias=x["teacher_bias"], beta=0.5, temperature=2.0, sample_weight=w,
                chunk_size=6)

    def loss_and_grads(fn):
        args = [x[k] for k in STUDENT]
        with tf.GradientTape() as tape:
            tape.watch(args)
            loss = fn(*args, x["sample_weight"])
        return [loss] + tape.gradient(loss, args)

    tf.saved_model.save(Loss(), str(tmp_path / "loss"))
    loaded = tf.saved_model.load(str(tmp_path / "loss"))
    want_loss, want_grads = _loss_and_grads(_materialised, {k: v.numpy() for k, v in x.items()},
                                            beta=0.5, temperature=2.0)
    got = loss_and_grads(loaded)
    np.testing.assert_allclose(got[0].numpy(), want_loss.numpy(), rtol=1e-12)
    for name, a, b in zip(STUDENT, got[1:], want_grads):
        assert a is not None, f"no gradient for {name} through the reloaded SavedModel"
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-12, atol=1e-14, err_msg=name)


def test_variables_get_gradients(rng):
    x = _problem(rng, dtype=np.float32)
    kernel, bias = tf.Variable(x["student_kernel"]), tf.Variable(x["student_bias"])
    with tf.GradientTape() as tape:
        loss = tf_kld.linear_distillation_loss(x["student_hidden"], kernel, x["teacher_hidden"],
                                               x["teacher_kernel"], student_bias=bias, chunk_size=8)
    d_kernel, d_bias = tape.gradient(loss, [kernel, bias])
    assert d_kernel is not None and d_bias is not None and float(tf.reduce_sum(tf.abs(d_kernel))) > 0


def _call(**overrides):
    rng = np.random.default_rng(0)
    x = {k: tf.constant(v, tf.float32) for k, v in _problem(rng, rows=4).items()}
    kwargs = dict(student_hidden=x["student_hidden"], student_kernel=x["student_kernel"],
                  teacher_hidden=x["teacher_hidden"], teacher_kernel=x["teacher_kernel"])
    kwargs.update(overrides)
    args = [kwargs.pop(k) for k in ("student_hidden", "student_kernel", "teacher_hidden", "teacher_kernel")]
    return tf_kld.linear_distillation_loss(*args, **kwargs)


@pytest.mark.parametrize("overrides, error, words", [
    ({"temperature": 0.0}, ValueError, "temperature"),
    ({"temperature": -1.0}, ValueError, "temperature"),
    ({"temperature": float("nan")}, ValueError, "temperature"),
    ({"temperature": float("inf")}, ValueError, "temperature"),
    ({"beta": 1.5}, ValueError, "beta"),
    ({"beta": -0.1}, ValueError, "beta"),
    ({"beta": float("nan")}, ValueError, "beta"),
    ({"chunk_size": 0}, ValueError, "chunk_size"),
    ({"chunk_size": 2.5}, ValueError, "chunk_size"),
    ({"temperature": "2"}, TypeError, "temperature"),
    ({"student_kernel": tf.zeros([8])}, ValueError, "student_kernel must have rank 2"),
    ({"teacher_kernel": tf.zeros([6, 50, 1])}, ValueError, "teacher_kernel must have rank 2"),
    ({"student_kernel": tf.zeros([9, 50])}, ValueError, "student_hidden's last dimension (8)"),
    ({"teacher_kernel": tf.zeros([6, 51])}, ValueError, "student_kernel's classes (50)"),
    ({"student_bias": tf.zeros([49])}, ValueError, "student_bias's length (49)"),
    ({"teacher_hidden": tf.zeros([5, 6])}, ValueError, "same leading shape"),
    ({"sample_weight": tf.ones([5])}, ValueError, "sample_weight"),
    ({"student_hidden": tf.zeros([4, 8], tf.int32)}, TypeError, "student_hidden must be floating"),
    ({"teacher_kernel": tf.zeros([6, 50], tf.float64)}, TypeError, "teacher_kernel and teacher_hidden"),
    ({"teacher_kernel": tf.zeros([7, 50])}, ValueError, "teacher_hidden's last dimension (6)"),
    ({"student_hidden": tf.zeros([8])}, ValueError, "student_hidden must have rank >= 2"),
    ({"teacher_hidden": tf.zeros([6])}, ValueError, "teacher_hidden must have rank >= 2"),
    ({"teacher_bias": tf.zeros([51])}, ValueError, "teacher_bias's length (51)"),
    ({"student_bias": tf.zeros([1, 50])}, ValueError, "student_bias must have shape [classes]"),
    ({"chunk_size": True}, ValueError, "chunk_size"),
    ({"sample_weight": tf.ones([4, 1])}, ValueError, "sample_weight"),
    ({"student_kernel": tf.zeros([8, 50], tf.int32)}, TypeError, "student_kernel must be floating"),
    ({"teacher_hidden": tf.zeros([4, 6], tf.bool)}, TypeError, "teacher_hidden must be floating"),
    ({"student_bias": tf.zeros([50], tf.float16)}, TypeError, "student_bias and student_hidden"),
])
def test_bad_input(overrides, error, words):
    with pytest.raises(error, match=None) as info:
        _call(**overrides)
    assert words in str(info.value), str(info.value)


def test_bad_static_shapes_fail_when_traced():
    # In a tf.function the shape checks run at trace time on the static shapes: a ValueError before
    # any computation, not a kernel error at run time.
    @tf.function(input_signature=[tf.TensorSpec([None, 8]), tf.TensorSpec([9, 50]),
                                  tf.TensorSpec([None, 6]), tf.TensorSpec([6, 50])])
    def loss(hs, ws, ht, wt):
        return tf_kld.linear_distillation_loss(hs, ws, ht, wt)

    with pytest.raises(ValueError, match=r"student_hidden's last dimension \(8\) must equal "
                                         r"student_kernel's first \(9\)"):
        loss.get_concrete_function()


_MEMORY_WORKER = r"""
import json, os, sys
sys.path.insert(0, os.path.join(sys.argv[1], "bench"))
import bench  # calibrated peak measurement, shared with the benchmark
import tensorflow as tf
import tf_kld

rows, hidden, classes, chunk = (int(v) for v in sys.argv[2:6])
dtype = tf.as_dtype(sys.argv[6])
hs = tf.random.normal([rows, hidden]); ht = tf.random.normal([rows, hidden])
ws = tf.random.normal([hidden, classes]) * 0.1; wt = tf.random.normal([hidden, classes]) * 0.1
hs, ht, ws, wt = (tf.cast(x, dtype) for x in (hs, ht, ws, wt))

@tf.function
def step(hs, ws):
    with tf.GradientTape() as tape:
        tape.watch([hs, ws])
        loss = tf_kld.linear_distillation_loss(hs, ws, ht, wt, temperature=2.0,
                                               chunk_size=chunk or None)
    return loss, tape.gradient(loss, [hs, ws])

bench._block(step(hs, ws))
known = tf.zeros([rows // 8, classes])
bench._block(bench._allocate_like(known))
calibration = bench._peak_extra_bytes(bench._allocate_like, (known,))
del known
print(json.dumps({"peak": bench._peak_extra_bytes(step, (hs, ws)), "calibration": calibration,
                  "calibration_bytes": 4 * rows // 8 * classes, "logits_bytes": 4 * rows * classes,
                  "kernel_bytes": 4 * hidden * classes}))
"""


def _peak_of_a_step(tmp_path, rows, hidden, classes, chunk=0, dtype="float32"):
    # In a fresh process with an allocator that returns memory (oneDNN's pools freed buffers); a
    # calibration allocation of 1/8 of a [rows, classes] float32 tensor must show up in full.
    script = tmp_path / "worker.py"
    script.write_text(_MEMORY_WORKER)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072",
               TF_CPP_MIN_LOG_LEVEL="3", TF_ENABLE_ONEDNN_OPTS="0")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [IMPORT_ROOT, env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, str(script), IMPORT_ROOT] +
                          [str(v) for v in (rows, hidden, classes, chunk, dtype)],
                          capture_output=True, text=True, env=env, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads([l for l in proc.stdout.splitlines() if l.startswith("{")][-1])
    assert out["calibration"] >= 0.9 * out["calibration_bytes"], out
    return out


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs /proc/self/clear_refs")
def test_never_allocates_rows_by_classes(tmp_path):
    # The peak of a forward+backward step must stay far below one [rows, classes] float32 tensor
    # (500 MiB here).
    out = _peak_of_a_step(tmp_path, 4096, 64, 32000)
    assert out["peak"] <= 0.25 * out["logits_bytes"], (
        f"a fused step took {out['peak'] / 2**20:.0f} MiB; one [rows, classes] float32 tensor is "
        f"{out['logits_bytes'] / 2**20:.0f} MiB")


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs /proc/self/clear_refs")
def test_kernel_gradient_is_summed_in_one_buffer(tmp_path, require_custom):
    # A wide kernel and small chunks: the [H, V] kernel gradient (62.5 MiB) dominates. Summed in
    # place (no [H, V] temporary per chunk, no copy when the upstream gradient is 1) the step's
    # peak is that one buffer plus a few [16, V] chunk buffers (2 MiB each); a second [H, V] buffer
    # at any moment would make it twice as large.
    out = _peak_of_a_step(tmp_path, 256, 512, 32000, chunk=16)
    assert out["peak"] <= 1.25 * out["kernel_bytes"], (
        f"a fused step took {out['peak'] / 2**20:.1f} MiB; the kernel gradient is "
        f"{out['kernel_bytes'] / 2**20:.1f} MiB")


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs /proc/self/clear_refs")
def test_bfloat16_kernels_are_never_widened_whole(tmp_path, require_custom):
    # bfloat16 inputs (oneDNN off, as in every memory measurement): the float32 kernel-gradient sum
    # (62.5 MiB) and, at the end, its bfloat16 cast (half that) are the only [H, V] buffers. The
    # chunks' logits widen the kernels a panel at a time; a float32 copy of a whole kernel (what
    # TensorFlow's Eigen bfloat16 matmul makes for every call) would add another 62.5 MiB.
    out = _peak_of_a_step(tmp_path, 256, 512, 32000, chunk=16, dtype="bfloat16")
    assert out["peak"] <= 1.75 * out["kernel_bytes"], (
        f"a bfloat16 fused step took {out['peak'] / 2**20:.1f} MiB; the float32 kernel gradient is "
        f"{out['kernel_bytes'] / 2**20:.1f} MiB")


_ALLOCATOR_WORKER = r"""
import json, sys
import tensorflow as tf
import tf_kld

rows, hidden, classes, chunk = (int(v) for v in sys.argv[1:5])
hs = tf.random.normal([rows, hidden]); ht = tf.random.normal([rows, hidden])
ws = tf.random.normal([hidden, classes]) * 0.1; wt = tf.random.normal([hidden, classes]) * 0.1
hs, ht, ws, wt = (tf.cast(x, tf.bfloat16) for x in (hs, ht, ws, wt))

@tf.function
def step(hs, ws):
    with tf.GradientTape() as tape:
        tape.watch([hs, ws])
        loss = tf_kld.linear_distillation_loss(hs, ws, ht, wt, temperature=2.0, chunk_size=chunk)
    return loss, tape.gradient(loss, [hs, ws])

def run():
    return [t.numpy() for t in tf.nest.flatten(step(hs, ws))]

run()
graph = step.get_concrete_function(hs, ws).graph.as_graph_def()
types = {n.op for n in graph.node} | {n.op for f in graph.library.function for n in f.node_def}
tf.config.experimental.reset_memory_stats("CPU:0")
before = tf.config.experimental.get_memory_info("CPU:0")["current"]
run()
print(json.dumps({"peak": tf.config.experimental.get_memory_info("CPU:0")["peak"] - before,
                  "kernel_bytes": 4 * hidden * classes, "onednn": tf_kld.ops.onednn_enabled(),
                  "bf16_op": "TfKld>AccumulateKernelGrad" in types}))
"""


def test_bfloat16_chunks_sum_the_kernel_gradient_in_one_buffer(require_custom):
    # The bfloat16 chunks (oneDNN on, forced): the float32 kernel-gradient sum (62.5 MiB) and its
    # final bfloat16 cast are the only [H, V] buffers, by TensorFlow's allocator statistics (oneDNN's
    # allocator pools freed memory, so no resident-set peak means anything there). A copy of the
    # sum per chunk, or a float32 [H, V] temporary, would add 62.5 MiB.
    if tf.config.list_logical_devices("GPU"):
        pytest.skip("the bfloat16 chunks' op is CPU only")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", TF_ENABLE_ONEDNN_OPTS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [IMPORT_ROOT, env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", _ALLOCATOR_WORKER, "256", "512", "32000", "16"],
                          capture_output=True, text=True, env=env, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads([l for l in proc.stdout.splitlines() if l.startswith("{")][-1])
    assert out["onednn"] and out["bf16_op"], out
    assert out["peak"] <= 1.75 * out["kernel_bytes"], (
        f"a bfloat16 fused step took {out['peak'] / 2**20:.1f} MiB; the float32 kernel gradient is "
        f"{out['kernel_bytes'] / 2**20:.1f} MiB")


def _op_types(concrete):
    """The op types of a concrete function's graph and of every function it calls (loop bodies)."""
    graph_def = concrete.graph.as_graph_def()
    types = {node.op for node in graph_def.node}
    for function in graph_def.library.function:
        types |= {node.op for node in function.node_def}
    return types


def _step_op_types(x, beta, chunk_size=None):
    """The op types of a traced step (loss and its gradients w.r.t. the student's hidden states and
    kernel) on the float32 problem x."""
    @tf.function
    def fn(hs, ws):
        with tf.GradientTape() as tape:
            tape.watch([hs, ws])
            loss = tf_kld.linear_distillation_loss(hs, ws, x["teacher_hidden"], x["teacher_kernel"],
                                                   beta=beta, chunk_size=chunk_size)
        return loss, tape.gradient(loss, [hs, ws])
    return _op_types(fn.get_concrete_function(x["student_hidden"], x["student_kernel"]))


def test_custom_path_runs_the_fused_ops(require_custom, rng):
    # Outside XLA the chunks run the fused divergence ops and their gradient ops, and the kernel
    # and hidden-state gradients come from the in-place op; the reference path uses none of them.
    x = {k: tf.constant(v, tf.float32) for k, v in _problem(rng).items()}

    def step(beta):
        return _step_op_types(x, beta, chunk_size=8)

    # (With a GPU the weight-side gradients stay TensorFlow's matmuls: the in-place op is CPU only.)
    in_place = set() if tf.config.list_logical_devices("GPU") else {"TfKld>AccumulateLinearGrads"}
    kl = {"TfKld>KlDivergenceWithLogits", "TfKld>KlDivergenceWithLogitsGrad"} | in_place
    jsd = {"TfKld>GeneralizedJsdWithLogits", "TfKld>GeneralizedJsdWithLogitsGrad"} | in_place
    assert kl <= step(0.0) and kl <= step(1.0)
    assert jsd <= step(0.5)
    with tf_kld.implementation("reference"):
        assert not any(t.startswith("TfKld>") for t in step(0.5))


def _bfloat16_problem(rng, rows, classes, zero_rows, beta, chunk_size=None):
    """A bfloat16 problem with rows of weight 0: (one step's [loss, grads...] as a function, the
    float64 composite's loss and gradients on the same rounded inputs)."""
    x = _problem(rng, rows=rows, classes=classes, scale=0.5)
    x["sample_weight"][zero_rows] = 0.0
    xs = {k: tf.cast(v, tf.bfloat16) for k, v in x.items()}
    rounded = {k: tf.cast(v, tf.float64).numpy() for k, v in xs.items()}

    def step():
        with tf.GradientTape() as tape:
            tape.watch([xs[k] for k in STUDENT])
            loss = _fused(xs, beta=beta, temperature=2.0, chunk_size=chunk_size)
        return [loss] + tape.gradient(loss, [xs[k] for k in STUDENT])

    return step, _loss_and_grads(_materialised, rounded, beta=beta, temperature=2.0)


def _assert_gradients_as_near(got, other, want_grads):
    """got's bfloat16 gradients within 2e-2 of float64's (relative to the largest), and no more
    than 2.5x other's error plus one bfloat16 rounding."""
    for name, a, b, ref in zip(STUDENT, got[1:], other[1:], want_grads):
        ref = ref.numpy()
        err_got, err_other = (np.max(np.abs(tf.cast(g, tf.float64).numpy() - ref)) / np.max(np.abs(ref))
                              for g in (a, b))
        assert a.dtype == tf.bfloat16 and err_got < 2e-2 and err_got < 2.5 * err_other + 2 ** -8, (
            name, err_got, err_other)


@pytest.fixture
def onednn(monkeypatch):
    """tf_kld.linear takes oneDNN's matmuls to be on (its bfloat16 paths), whatever this machine's
    TensorFlow does (Eigen's bfloat16 matmul gives the same products, rounded the same way)."""
    monkeypatch.setattr(tf_kld.ops, "onednn_enabled", lambda: True)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_bfloat16_chunks_stay_in_bfloat16(beta, onednn, monkeypatch, require_custom, rng):
    # bfloat16 kernels under oneDNN: the chunks' logits and logit gradient stay bfloat16 and the
    # kernel gradient goes into the float32 sum by TfKld>AccumulateKernelGrad (never the float32
    # op or casts of [chunk, V] to float32). The loss is the float32 chunks' own, bit for bit; the
    # gradients are as near float64 as theirs (rows of weight 0, non-integer weights whose 1/sum is
    # no power of two, a chunk that does not divide the rows).
    if tf.config.list_logical_devices("GPU"):
        pytest.skip("the bfloat16 chunks' op is CPU only")
    step, (_, want_grads) = _bfloat16_problem(rng, 45, 300, [2, 7], beta, chunk_size=16)
    types = _op_types(tf.function(step).get_concrete_function())
    assert "TfKld>AccumulateKernelGrad" in types and "TfKld>AccumulateLinearGrads" not in types
    got = step()
    monkeypatch.setattr(tf_kld.ops, "kernel_grad_op_loaded", lambda: False)  # float32 chunks
    assert "TfKld>AccumulateLinearGrads" in _op_types(tf.function(step).get_concrete_function())
    f32 = step()
    assert got[0].numpy() == f32[0].numpy()
    _assert_gradients_as_near(got, f32, want_grads)


# Column blocks (the path for vocabularies where row chunks would be tiny: V >= 131073), forced on
# small problems by lowering its thresholds: blocks of a few columns, super-chunks of a few rows.

@pytest.fixture
def by_columns(monkeypatch):
    """Every call takes the column-blocked path where it applies; records the calls."""
    monkeypatch.setattr(tf_kld.linear, "_COLUMNS_FROM_CLASSES", 1)
    monkeypatch.setattr(tf_kld.linear, "_MIN_COLUMN_BLOCK", 1)
    calls = []
    blocked = tf_kld.linear._column_blocked

    def spy(*args):
        calls.append(args)
        return blocked(*args)

    monkeypatch.setattr(tf_kld.linear, "_column_blocked", spy)
    return calls


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("rows_at_once, block_bytes", [(4096, 4 << 20), (7, 4 * 7 * 16), (5, 4 * 5 * 3)])
@pytest.mark.parametrize("bias", [True, False])
def test_column_blocks_float64(beta, rows_at_once, block_bytes, bias, by_columns, monkeypatch,
                               require_custom, rng):
    # One super-chunk with one block of all 50 columns; 7-row super-chunks (37 rows: a partial
    # last one) of 16-column blocks (a partial last block); 5-row super-chunks of 3-column blocks.
    monkeypatch.setattr(tf_kld.linear, "_COLUMN_ROWS", rows_at_once)
    monkeypatch.setattr(tf_kld.linear, "_COLUMN_BLOCK_BYTES", block_bytes)
    x = _problem(rng)
    x["sample_weight"][[0, 3, 36]] = 0.0
    _assert_matches(x, beta, 1.5, None, bias=bias)
    assert by_columns


@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16, tf.float16])
@pytest.mark.parametrize("beta", [0.0, 0.7, 1.0])
def test_column_blocks_agree_with_row_chunks(dtype, beta, by_columns, monkeypatch, require_custom, rng):
    # The two paths in the inputs' dtype (the kernel gradient in the kernel's dtype on the column
    # path), with masked (-inf bias) teacher classes (KL) and rows of weight 0, in tf.function with unknown rows
    # (the kernel gradient then summed in float32) and eagerly; and both near float64.
    monkeypatch.setattr(tf_kld.linear, "_COLUMN_ROWS", 16)
    monkeypatch.setattr(tf_kld.linear, "_COLUMN_BLOCK_BYTES", 4 * 16 * 8)
    x = _problem(rng, rows=40, classes=61)
    x["sample_weight"][[2, 5]] = 0.0
    if beta == 0.0:  # classes the teacher never predicts (reverse KL would be +inf)
        x["teacher_bias"][[4, 9]] = -np.inf
    want64, want64_grads = _loss_and_grads(_materialised, {**x, "teacher_bias": np.where(
        np.isinf(x["teacher_bias"]), -1e300, x["teacher_bias"])}, beta=beta, temperature=2.0)
    xs = {k: tf.cast(v, dtype) for k, v in x.items()}

    def run(fused_fn):
        with tf.GradientTape() as tape:
            args = [xs[k] for k in STUDENT]
            tape.watch(args)
            loss = fused_fn(*args)
        return [loss] + tape.gradient(loss, args)

    def fused(hs, ws, bs):
        return tf_kld.linear_distillation_loss(hs, ws, xs["teacher_hidden"], xs["teacher_kernel"],
                                               student_bias=bs, teacher_bias=xs["teacher_bias"],
                                               temperature=2.0, beta=beta,
                                               sample_weight=xs["sample_weight"])

    unknown_rows = tf.function(fused, input_signature=[
        tf.TensorSpec([None, 8], dtype), tf.TensorSpec([8, 61], dtype), tf.TensorSpec([61], dtype)])
    by_cols = run(fused)
    by_cols_graph = run(unknown_rows)
    assert len(by_columns) >= 2
    monkeypatch.setattr(tf_kld.linear, "_COLUMNS_FROM_CLASSES", 10**9)
    by_rows = run(fused)
    assert by_cols[2].dtype == dtype and by_cols_graph[2].dtype == dtype
    tol = {tf.float32: 1e-5, tf.bfloat16: 2e-2, tf.float16: 2e-3}[dtype]
    for got in (by_cols, by_cols_graph, by_rows):
        for name, a, b in zip(("loss",) + STUDENT, got, [want64] + want64_grads):
            a, b = tf.cast(a, tf.float64).numpy(), b.numpy()
            np.testing.assert_allclose(a, b, rtol=tol, atol=tol * np.abs(b).max(), err_msg=name)


@pytest.mark.parametrize("beta", [0.0, 0.7, 1.0])
def test_column_blocks_bfloat16_kernel_gradient_by_bfloat16_matmuls(beta, by_columns, onednn,
                                                                    monkeypatch, require_custom, rng):
    # bfloat16 under oneDNN with every row in one super-chunk: each block of the kernel gradient is
    # one bfloat16 matmul of the hidden states and the rounded logit gradient (the materialised
    # path's arithmetic); as near float64 as the row chunks, rows of weight 0 included.
    if tf.config.list_logical_devices("GPU"):
        pytest.skip("the column path is CPU only")
    monkeypatch.setattr(tf_kld.linear, "_COLUMN_BLOCK_BYTES", 4 * 64 * 8)
    step, (want, want_grads) = _bfloat16_problem(rng, 40, 61, [2, 5], beta)
    by_cols = step()
    assert len(by_columns) == 1
    monkeypatch.setattr(tf_kld.linear, "_COLUMNS_FROM_CLASSES", 10**9)
    by_rows = step()
    # The loss from the same bfloat16 logits either way (rounded apart from float64's).
    np.testing.assert_allclose(by_cols[0].numpy(), by_rows[0].numpy(), rtol=1e-6)
    np.testing.assert_allclose(by_cols[0].numpy(), want.numpy(), rtol=2e-2)
    _assert_gradients_as_near(by_cols, by_rows, want_grads)


def test_column_blocks_run_their_ops(by_columns, require_custom, rng):
    # The column path's ops (and not the row chunks' accumulation) for KL, reverse KL and the
    # generalized JSD (with its second pass).
    if tf.config.list_logical_devices("GPU"):
        pytest.skip("the column path is CPU only")
    x = {k: tf.constant(v, tf.float32) for k, v in _problem(rng).items()}
    cols = {"TfKld>KlDivergenceWithLogitsBlock", "TfKld>AddColumns"}
    kl = cols | {"TfKld>KlDivergenceWithLogitsGrad"}
    jsd = cols | {"TfKld>GeneralizedJsdWithLogitsBlock", "TfKld>GeneralizedJsdWithLogitsGrad"}
    for beta, wanted in ((0.0, kl), (1.0, kl), (0.5, jsd)):
        types = _step_op_types(x, beta)
        assert wanted <= types and "TfKld>AccumulateLinearGrads" not in types, (beta, types)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs /proc/self/clear_refs")
@pytest.mark.parametrize("dtype, bound", [("float32", 1.3), ("bfloat16", 0.85)])
def test_column_blocks_write_the_kernel_gradient_once(dtype, bound, tmp_path, require_custom):
    # V = 262144 (column blocks): the kernel gradient [128, V] (128 MiB in float32) is the only
    # [H, V] buffer, in the kernel's dtype: for bfloat16 half of that (measured on Zen 4: 1.11x and
    # 0.61x of the float32 gradient, with 4 MiB block buffers). A float32 sum (the row chunks'
    # 1.5x in float32 with their two 32 MiB chunks, 1.5x in bfloat16 with the final cast) or a
    # second [H, V] buffer would break the bound; so would [rows, V] logits (256 MiB).
    out = _peak_of_a_step(tmp_path, 256, 128, 262144, dtype=dtype)
    assert out["peak"] <= bound * out["kernel_bytes"], (
        f"a {dtype} step by column blocks took {out['peak'] / 2**20:.1f} MiB; the float32 kernel "
        f"gradient is {out['kernel_bytes'] / 2**20:.1f} MiB")


def _block_ops_full_and_blocked(t, s, temperature, block):
    loss, stats = tf_kld.ops._module.tf_kld_kl_divergence_with_logits(
        t, s, temperature=temperature, temperature_f64=repr(temperature) if t.dtype == tf.float64 else "")
    state = tf_kld.ops.kl_block_initial_state(t.shape[0])
    for c0 in range(0, t.shape[1], block):
        state, b_loss, b_stats = tf_kld.ops.kl_divergence_with_logits_block(
            t[:, c0:c0 + block], s[:, c0:c0 + block], state, temperature)
    return loss.numpy(), stats.numpy(), b_loss.numpy(), b_stats.numpy()


@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16, tf.float64])
@pytest.mark.parametrize("block", [1, 7, 128, 1000, 40000])
def test_kl_block_op_is_the_full_op_by_blocks(dtype, block, require_custom, rng):
    # Rows given a block of columns at a time end where the full op does: masked teacher blocks,
    # all -inf rows of either (NaN), a student -inf under teacher mass (+inf), NaN and +inf logits (NaN),
    # NaN under a masked teacher block, huge logits; the stats agree as well.
    rows, cols = 13, 1000
    t = rng.normal(size=(rows, cols)) * 3
    s = rng.normal(size=(rows, cols)) * 3
    t[1, :500] = -np.inf
    t[2] = -np.inf
    s[3] = -np.inf
    s[4, 700] = -np.inf
    t[5, 10] = np.nan
    s[6, 900] = np.nan
    t[7, :500], s[7, :500] = -np.inf, np.nan
    t[8, 3] = np.inf
    t[9] = rng.normal(size=cols) * 1e4
    t[10, :600] = s[10, :600] = -np.inf
    t[11] = s[11] = -np.inf
    t, s = tf.cast(t, dtype), tf.cast(s, dtype)
    for temperature in (1.0, 2.5):
        loss, stats, b_loss, b_stats = _block_ops_full_and_blocked(t, s, temperature, block)
        loss, b_loss = loss.astype(np.float64), b_loss.astype(np.float64)
        tol = 1e-12 if dtype == tf.float64 else 1e-5
        np.testing.assert_allclose(b_loss, loss, rtol=tol, atol=tol, equal_nan=True)
        np.testing.assert_allclose(b_stats, stats, rtol=10 * tol, atol=10 * tol, equal_nan=True)
        assert np.isnan(b_loss[[2, 3, 5, 6, 7, 8, 11]]).all() and b_loss[4] == np.inf


@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16, tf.float64])
@pytest.mark.parametrize("block", [1, 7, 1000, 40000])
def test_jsd_block_op_is_the_full_op_by_blocks(dtype, block, require_custom, rng):
    # The first pass by KL blocks, the second by JSD blocks: the full JSD op's loss and stats, with
    # masked classes on either side, all -inf rows, NaN and +inf logits and huge logits.
    rows, cols = 9, 1000
    t = rng.normal(size=(rows, cols)) * 3
    s = rng.normal(size=(rows, cols)) * 3
    t[1, :500] = -np.inf
    s[2, 100:900] = -np.inf
    t[3] = -np.inf
    t[4, 10] = np.nan
    s[5, 3] = np.inf
    t[6] = rng.normal(size=cols) * 1e4
    t[7, :600] = s[7, :600] = -np.inf
    t, s = tf.cast(t, dtype), tf.cast(s, dtype)
    ops = tf_kld.ops
    for beta, temperature in ((0.5, 1.0), (0.1, 2.5), (0.9, 0.5)):
        loss, stats = ops._module.tf_kld_generalized_jsd_with_logits(
            t, s, beta=beta, beta_f64=repr(beta),
            **ops._temperature_attrs(temperature, dtype))  # pylint: disable=protected-access
        state = ops.kl_block_initial_state(rows)
        for c0 in range(0, cols, block):
            state, _, kl_stats = ops.kl_divergence_with_logits_block(
                t[:, c0:c0 + block], s[:, c0:c0 + block], state, temperature)
        b_stats = tf.concat(
            [kl_stats[:, :4], tf.zeros([rows, ops.JSD_BLOCK_STATE - 4], tf.float64)], axis=1)
        for c0 in range(0, cols, block):
            b_stats, b_loss = ops.generalized_jsd_with_logits_block(
                t[:, c0:c0 + block], s[:, c0:c0 + block], b_stats, beta, temperature)
        tol = 1e-12 if dtype == tf.float64 else 1e-5
        got, want = b_loss.numpy().astype(np.float64), loss.numpy().astype(np.float64)
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol, equal_nan=True)
        np.testing.assert_allclose(b_stats.numpy()[:, :6], stats.numpy(), rtol=10 * tol, atol=10 * tol,
                                   equal_nan=True)
        assert np.isnan(got[[3, 4, 5]]).all() and np.isfinite(got[[0, 1, 2, 6, 7, 8]]).all()


def test_block_ops_and_add_columns_check_their_inputs(require_custom):
    ops = tf_kld.ops
    z = tf.zeros([3, 4])
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match="state must have shape"):
        ops.kl_divergence_with_logits_block(z, z, tf.zeros([2, 7], tf.float64), 1.0)
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match="one shape"):
        ops.kl_divergence_with_logits_block(z, tf.zeros([3, 5]), ops.kl_block_initial_state(3), 1.0)
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match="stats must have shape"):
        ops.generalized_jsd_with_logits_block(z, z, tf.zeros([3, 5], tf.float64), 0.5, 1.0)
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match="not all in acc"):
        ops.add_columns(tf.zeros([3, 10]), tf.ones([3, 4]), 7)
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match="not all in acc"):
        ops.add_columns(tf.zeros([3, 10]), tf.ones([3, 4]), -1)
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match="same rows"):
        ops.add_columns(tf.zeros([3, 10]), tf.ones([2, 4]), 0)


@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16, tf.float16, tf.float64])
def test_add_columns_values(dtype, require_custom, rng):
    acc = rng.normal(size=(5, 37))
    block = rng.normal(size=(5, 11))
    acc_t, block_t = tf.cast(acc, dtype), tf.cast(block, dtype)
    for offset in (0, 13, 26):
        got = tf_kld.ops.add_columns(acc_t, block_t, offset)
        want = acc_t.numpy().astype(np.float64)
        # 16-bit: the sum of the two rounded values in float32, rounded once.
        want[:, offset:offset + 11] = (want[:, offset:offset + 11].astype(np.float32)
                                       + block_t.numpy().astype(np.float32)) if dtype != tf.float64 \
            else want[:, offset:offset + 11] + block
        assert got.dtype == dtype
        np.testing.assert_array_equal(got.numpy(), tf.cast(want, dtype).numpy())
        np.testing.assert_array_equal(acc_t.numpy(), tf.cast(acc, dtype).numpy())  # acc untouched


# TfKld>AccumulateLinearGrads: (acc + a^T b in acc's buffer, b w^T).

def _linear_grads_bounds(acc, a, b, w, dtype):
    """Elementwise bounds on the errors of acc + a^T b (k + 1 roundings) and of b w^T (n roundings)
    summed in `dtype`."""
    unit = 2.0 ** -24 if dtype != np.float64 else 2.0 ** -53
    k, n = b.shape
    acc_bound = (k + 2) * unit * (np.abs(acc) + np.abs(a).T @ np.abs(b)) + 1e-300
    d_a_bound = (n + 2) * unit * (np.abs(b) @ np.abs(w).T) + 1e-300
    return acc_bound, d_a_bound


def _check_linear_grads(k, m, n, dtype, w_dtype, rng):
    acc, a, b, w = (rng.normal(size=s).astype(dtype) for s in ((m, n), (k, m), (k, n), (m, n)))
    w_t = tf.cast(tf.constant(w), w_dtype)
    w = tf.cast(w_t, tf.float64).numpy()  # the rounded kernel the op reads
    acc_t = tf.constant(acc)
    got, d_a = tf_kld.ops.accumulate_linear_grads(acc_t, tf.constant(a), tf.constant(b), w_t)
    assert got.dtype == acc_t.dtype and got.shape == (m, n) and d_a.shape == (k, m)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    acc_bound, d_a_bound = _linear_grads_bounds(acc, a, b, w, dtype)
    err = np.abs(got.numpy().astype(np.float64) - (acc.astype(np.float64) + a64.T @ b64))
    assert np.all(err <= acc_bound), err.max()
    err = np.abs(d_a.numpy().astype(np.float64) - b64 @ w.T)
    assert np.all(err <= d_a_bound), err.max()
    # acc still has a reader (acc_t): the op copied it rather than writing into it.
    np.testing.assert_array_equal(acc_t.numpy(), acc)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 5, 7), (33, 129, 257), (64, 4, 256), (65, 7, 1000),
                                   (130, 3, 300), (2, 9, 4099), (5, 6, 70001), (0, 4, 5), (4, 0, 5),
                                   (4, 5, 0)])
def test_linear_grads_op_values(shape, dtype, require_custom, rng):
    _check_linear_grads(*shape, dtype, tf.float64 if dtype == np.float64 else tf.float32, rng)


@pytest.mark.parametrize("w_dtype", [tf.bfloat16, tf.float16])
def test_linear_grads_op_16_bit_kernels(w_dtype, require_custom, rng):
    for shape in ((33, 129, 257), (6, 7, 5003)):
        _check_linear_grads(*shape, np.float32, w_dtype, rng)


def test_linear_grads_op_checks_its_inputs(require_custom):
    op = tf_kld.ops.accumulate_linear_grads
    w = tf.zeros([3, 4])
    with pytest.raises(tf.errors.InvalidArgumentError, match="must be matrices that match"):
        op(tf.zeros([3, 4]), tf.zeros([2, 3]), tf.zeros([2, 5]), w)
    with pytest.raises(tf.errors.InvalidArgumentError, match="must be matrices that match"):
        op(tf.zeros([3, 4]), tf.zeros([2, 3]), tf.zeros([1, 4]), w)
    with pytest.raises(tf.errors.InvalidArgumentError, match="must be matrices that match"):
        op(tf.zeros([3, 4]), tf.zeros([2, 3]), tf.zeros([2, 4]), tf.zeros([4, 3]))
    with pytest.raises(tf.errors.InvalidArgumentError, match="must be matrices that match"):
        op(tf.zeros([3]), tf.zeros([2, 3]), tf.zeros([2, 4]), w)
    with pytest.raises((TypeError, tf.errors.InvalidArgumentError, tf.errors.NotFoundError)):
        z = tf.zeros([3, 4], tf.bfloat16)
        op(z, tf.zeros([2, 3], tf.bfloat16), tf.zeros([2, 4], tf.bfloat16), z)

    @tf.function
    def mixed():
        return op(w, tf.zeros([2, 3]), tf.zeros([2, 4]), tf.zeros([3, 4], tf.float64))

    with pytest.raises(ValueError, match="w must be float64 exactly when"):
        mixed.get_concrete_function()

    @tf.function(input_signature=[tf.TensorSpec([3, 4]), tf.TensorSpec([2, 3]), tf.TensorSpec([2, 5]),
                                  tf.TensorSpec([3, 4])])
    def traced(acc, a, b, w):
        return op(acc, a, b, w)

    with pytest.raises(ValueError, match="do not match"):
        traced.get_concrete_function()


# TfKld>AccumulateKernelGrad: acc + scale * a^T b for 16-bit a, b (float32 acc).

def _check_kernel_grad(k, m, n, dtype, scale, rng):
    acc = rng.normal(size=(m, n)).astype(np.float32)
    a, b = (tf.cast(rng.normal(size=s), dtype) for s in ((k, m), (k, n)))
    acc_t = tf.constant(acc)
    got = tf_kld.ops.accumulate_kernel_grad(acc_t, a, b, scale)
    assert got.dtype == tf.float32 and got.shape == (m, n)
    a64, b64 = (tf.cast(x, tf.float64).numpy() for x in (a, b))
    s32 = float(np.float32(scale))
    # Exact products, k + 1 roundings of the sum, one of the scaling (or of a * scale when widened)
    # and one of the final addition.
    bound = (k + 3) * 2.0 ** -24 * (np.abs(acc) + abs(s32) * np.abs(a64).T @ np.abs(b64)) + 1e-300
    err = np.abs(got.numpy().astype(np.float64) - (acc + s32 * (a64.T @ b64)))
    assert np.all(err <= bound), (k, m, n, dtype, scale, (err / bound).max())
    np.testing.assert_array_equal(acc_t.numpy(), acc)  # acc had another reader: copied, not written


@pytest.mark.parametrize("dtype", [tf.bfloat16, tf.float16])
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 5, 7), (2, 9, 4099), (128, 13, 1000),
                                   (131, 7, 300), (257, 6, 70001), (64, 256, 256), (0, 4, 5),
                                   (4, 0, 5), (4, 5, 0)])
def test_kernel_grad_op_values(shape, dtype, require_custom, rng):
    # Pairs of rows (odd k: the last one alone), tiles of 6, 2 and 1 rows, 64- and 16-column
    # vectors and masked tails, panels of 256 columns, blocks of 128 rows; scales 1, 1/3 and -2.
    for scale in (1.0, 1.0 / 3.0, -2.0):
        _check_kernel_grad(*shape, dtype, scale, rng)


def test_kernel_grad_op_checks_its_inputs(require_custom):
    op = tf_kld.ops.accumulate_kernel_grad
    z = functools.partial(tf.zeros, dtype=tf.bfloat16)
    with pytest.raises(tf.errors.InvalidArgumentError, match="must be matrices that match"):
        op(tf.zeros([3, 4]), z([2, 3]), z([2, 5]))
    with pytest.raises(tf.errors.InvalidArgumentError, match="must be matrices that match"):
        op(tf.zeros([3, 4]), z([2, 3]), z([1, 4]))
    with pytest.raises(tf.errors.InvalidArgumentError, match="must be matrices that match"):
        op(tf.zeros([3]), z([2, 3]), z([2, 4]))
    with pytest.raises(tf.errors.InvalidArgumentError, match="scale must be a scalar"):
        tf_kld.ops._module.tf_kld_accumulate_kernel_grad(tf.zeros([3, 4]), z([2, 3]), z([2, 4]),
                                                        tf.ones([1]))
    with pytest.raises((TypeError, tf.errors.InvalidArgumentError, tf.errors.NotFoundError)):
        op(tf.zeros([3, 4]), tf.zeros([2, 3]), tf.zeros([2, 4]))  # float32 operands: the other op's

    @tf.function(input_signature=[tf.TensorSpec([3, 4]), tf.TensorSpec([2, 3], tf.bfloat16),
                                  tf.TensorSpec([2, 5], tf.bfloat16)])
    def traced(acc, a, b):
        return op(acc, a, b)

    with pytest.raises(ValueError, match="do not match"):
        traced.get_concrete_function()


# TfKld>LinearLogits: h @ w + bias in float32 (float64 for float64).

def _check_linear_logits(m, k, n, dtype, rng, bias=True):
    h, w, b = (tf.cast(rng.normal(size=s), dtype) for s in ((m, k), (k, n), (n,)))
    got = tf_kld.ops.linear_logits(h, w, b if bias else None)
    out_dtype = tf.float64 if dtype == tf.float64 else tf.float32
    assert got.dtype == out_dtype and got.shape == (m, n)
    h64, w64 = (tf.cast(x, tf.float64).numpy() for x in (h, w))
    b64 = tf.cast(tf.cast(b, out_dtype), tf.float64).numpy() if bias else np.zeros([n])
    unit = 2.0 ** -53 if dtype == tf.float64 else 2.0 ** -24
    bound = (k + 2) * unit * (np.abs(b64) + np.abs(h64) @ np.abs(w64)) + 1e-300
    err = np.abs(got.numpy().astype(np.float64) - (h64 @ w64 + b64))
    assert np.all(err <= bound), (m, k, n, dtype, err.max())


@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16, tf.float16, tf.float64])
@pytest.mark.parametrize("shape", [(1, 1, 1), (5, 3, 7), (13, 129, 257), (64, 256, 1000),
                                   (67, 65, 300), (2, 9, 4099), (6, 5, 70001), (0, 4, 5), (4, 0, 5),
                                   (4, 5, 0)])
def test_linear_logits_op_values(shape, dtype, require_custom, rng):
    # Within the float32 (float64) bound of the float64 sums of the exactly widened inputs: tiles
    # of 6, 4 and 1 rows, panels of 256 columns and their tails, depth blocks of 64.
    _check_linear_logits(*shape, dtype, rng)
    if shape[0] * shape[2] < 20000:
        _check_linear_logits(*shape, dtype, rng, bias=False)


def test_linear_logits_op_checks_its_inputs(require_custom):
    op = tf_kld.ops.linear_logits
    with pytest.raises(tf.errors.InvalidArgumentError, match="must match"):
        op(tf.zeros([2, 3]), tf.zeros([4, 5]))
    with pytest.raises(tf.errors.InvalidArgumentError, match="must match"):
        op(tf.zeros([2, 3]), tf.zeros([3, 5]), tf.zeros([4]))
    with pytest.raises(tf.errors.InvalidArgumentError, match="must match"):
        op(tf.zeros([2, 3, 1]), tf.zeros([3, 5]))

    @tf.function
    def mixed():
        return tf_kld.ops._module.tf_kld_linear_logits(tf.zeros([2, 3], tf.float64), tf.zeros([3, 4], tf.float64),
                                                       tf.zeros([0]))

    with pytest.raises(ValueError, match="must be float64 exactly when"):
        mixed.get_concrete_function()

    @tf.function(input_signature=[tf.TensorSpec([2, 3]), tf.TensorSpec([4, 5])])
    def traced(h, w):
        return op(h, w)

    with pytest.raises(ValueError, match="do not match"):
        traced.get_concrete_function()

    @tf.function(input_signature=[tf.TensorSpec([2, 3]), tf.TensorSpec([3, 5]), tf.TensorSpec([4])])
    def traced_bias(h, w, b):
        return op(h, w, b)

    with pytest.raises(ValueError, match="bias must have w's columns"):
        traced_bias.get_concrete_function()


_ACCUMULATE_WORKER = r"""
import json, sys
import numpy as np
import tensorflow as tf
tf.config.threading.set_intra_op_parallelism_threads(int(sys.argv[1]))
import tf_kld
rng = np.random.default_rng(3)
out = {"isa": tf_kld.ops.cpu_isa()}
for k, m, n in [(64, 130, 5003), (7, 3, 70000), (130, 17, 777)]:
    for w_dtype in (tf.float32, tf.bfloat16):
        acc, a, b, w = (rng.normal(size=s).astype(np.float32) for s in ((m, n), (k, m), (k, n), (m, n)))
        w_t = tf.cast(w, w_dtype)
        w = tf.cast(w_t, tf.float64).numpy()
        got, d_a = (x.numpy() for x in tf_kld.ops.accumulate_linear_grads(acc, a, b, w_t))
        want = acc.astype(np.float64) + a.astype(np.float64).T @ b.astype(np.float64)
        bound = (k + 2) * 2.0 ** -24 * (np.abs(acc) + np.abs(a).T @ np.abs(b))
        d_a_bound = (n + 2) * 2.0 ** -24 * (np.abs(b) @ np.abs(w).T)
        ok = np.all(np.abs(got - want) <= bound) and np.all(np.abs(d_a - b.astype(np.float64) @ w.T) <= d_a_bound)
        out[f"{k}x{m}x{n}-{w_dtype.name}"] = {"ok": bool(ok), "hex": got.tobytes().hex() + d_a.tobytes().hex()}
        # TfKld>LinearLogits: h [m, k] @ w2 [k, n] + bias
        h, w2 = tf.cast(rng.normal(size=(m, k)), w_dtype), tf.cast(rng.normal(size=(k, n)), w_dtype)
        bias = rng.normal(size=n).astype(np.float32)
        logits = tf_kld.ops.linear_logits(h, w2, bias).numpy()
        h64, w64 = tf.cast(h, tf.float64).numpy(), tf.cast(w2, tf.float64).numpy()
        bound = (k + 2) * 2.0 ** -24 * (np.abs(bias) + np.abs(h64) @ np.abs(w64))
        ok = np.all(np.abs(logits - (h64 @ w64 + bias)) <= bound)
        out[f"logits-{m}x{k}x{n}-{w_dtype.name}"] = {"ok": bool(ok), "hex": logits.tobytes().hex()}
        # TfKld>AccumulateKernelGrad: acc + scale a^T b for 16-bit a [k, m], b [k, n]
        if w_dtype != tf.float32:
            a16, b16 = tf.cast(a, w_dtype), tf.cast(b, w_dtype)
            got = tf_kld.ops.accumulate_kernel_grad(acc, a16, b16, 0.75).numpy()
            a64, b64 = tf.cast(a16, tf.float64).numpy(), tf.cast(b16, tf.float64).numpy()
            bound = (k + 3) * 2.0 ** -24 * (np.abs(acc) + 0.75 * np.abs(a64).T @ np.abs(b64))
            ok = np.all(np.abs(got - (acc + 0.75 * (a64.T @ b64))) <= bound)
            out[f"kernel-{k}x{m}x{n}-{w_dtype.name}"] = {"ok": bool(ok), "hex": got.tobytes().hex()}
out["dot"] = tf_kld.ops.cpu_bf16_dot()
print("RESULT " + json.dumps(out))
"""


def _run_accumulate(threads, isa=None):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [IMPORT_ROOT, os.environ.get("PYTHONPATH")])),
               TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("TF_KLD_CPU_ISA", None)
    if isa:
        env["TF_KLD_CPU_ISA"] = isa
    proc = subprocess.run([sys.executable, "-c", _ACCUMULATE_WORKER, str(threads)], env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads([l for l in proc.stdout.splitlines() if l.startswith("RESULT")][-1][7:])


def test_linear_grads_op_every_isa_build_and_thread_count(require_custom):
    # AccumulateLinearGrads, LinearLogits and AccumulateKernelGrad: each build (AVX-512 with and
    # without its AVX512_BF16 kernel, AVX2, baseline: as many as this CPU runs) within the float32
    # bounds of the float64 sums; each bit-identical with 1 and 4 threads (columns split in fixed
    # groups).
    best = _run_accumulate(1)
    isas = {"avx512": [None, "avx512", "avx2", "generic"], "avx2": [None, "generic"]}.get(best["isa"], [None])
    for isa in isas:
        one, four = (best if isa is None else _run_accumulate(1, isa)), _run_accumulate(4, isa)
        assert one == four, isa
        assert one["isa"] == (isa or best["isa"])
        assert one["dot"] == (best["dot"] and isa is None), isa  # the bfloat16 kernel: best build only
        for key, value in one.items():
            if key not in ("isa", "dot"):
                assert value["ok"], (isa, key)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_rows_are_generalized_jsd_with_logits(beta, rng):
    # D_i is tf_kld.generalized_jsd_with_logits(teacher_logits_i, student_logits_i) on either path.
    x = _problem(rng)
    s = x["student_hidden"] @ x["student_kernel"] + x["student_bias"]
    t = x["teacher_hidden"] @ x["teacher_kernel"] + x["teacher_bias"]
    w = x["sample_weight"]
    got = _fused({k: tf.constant(v) for k, v in x.items()}, beta=beta, temperature=3.0, chunk_size=9)
    for impl in ("custom", "reference"):
        with tf_kld.implementation(impl):
            d = tf_kld.generalized_jsd_with_logits(t, s, beta=beta, temperature=3.0).numpy()
        np.testing.assert_allclose(got.numpy(), np.sum(w * d) / np.sum(w), rtol=1e-12, err_msg=impl)


def test_mirrored_strategy_matches_one_device():
    # tests/_linear_distribute_worker.py: a tf.function step with strategy.run over two logical CPU
    # devices, each replica half of the rows; the summed loss, the concatenated hidden-state
    # gradients and the summed kernel/bias gradients equal one call over all rows (float64).
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [IMPORT_ROOT, env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, os.path.join(TESTS_DIR, "_linear_distribute_worker.py")],
                          env=env, cwd=TESTS_DIR, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-5000:]}"
    out = json.loads([l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1][7:])
    assert out["replicas"] == 2
    for case in ("unweighted", "weighted"):
        mirrored, single = out[case]["mirrored"], out[case]["single"]
        for name, a, b in zip(("loss", "student_hidden", "student_kernel", "student_bias"),
                              mirrored, single):
            np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-12, atol=1e-14,
                                       err_msg=f"{case}: {name}")


def test_example_runs():
    """examples/linear_distillation_demo.py --smoke: the loss falls, the student comes to agree with
    the teacher, and both peak-memory figures are measured (or say why not)."""
    import importlib.util  # pylint: disable=import-outside-toplevel
    path = os.path.join(IMPORT_ROOT, "examples", "linear_distillation_demo.py")
    spec = importlib.util.spec_from_file_location("linear_distillation_demo", path)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    out = demo.main(["--smoke"])
    losses = out["losses"]
    assert len(losses) >= 2 and losses[-1] < losses[0], losses
    assert out["agreement_after"] > out["agreement_before"] + 0.2, out
    for kind in ("fused", "materialised"):
        peak = out["memory"][kind]
        assert peak["bytes"] is not None and peak["bytes"] > 0 or \
            peak["note"].startswith("not measurable here"), (kind, peak)
