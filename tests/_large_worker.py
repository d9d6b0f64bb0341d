"""More than 2^31 elements through the custom op (int64 indexing), float16, run by tests/test_large.py
in a subprocess (an out-of-memory kill then fails that test instead of killing pytest).

Case "rows": y_true, y_pred of shape [2^31 + 1024, 1]: more than 2^31 rows, one loss per row.
  y_true and y_pred repeat patterns of coprime periods, so a row index wrapped to 32 bits would read
  the wrong pair; sampled rows (first, last, around 2^31, random) are checked against NumPy.
Case "cols": one row of 2^31 + 1024 elements: the loss sums chunks past 2^31, the gradient writes
  flat indices past 2^31. y_pred equals y_true (every term exactly 0) except in three 64-element
  blocks (start, across 2^31, end), so the loss is the sum of those blocks' terms alone; the gradient
  is checked on windows around the same places and at random indices.
Tensors are built in TensorFlow (tile, concat, aligned slices share buffers): about 12 GiB peak.
Prints one line `LARGE {json}` with timings and the peak RSS.
"""

import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import _util as U  # noqa: E402
import tf_kld  # noqa: E402

N = 2 ** 31 + 1024
DTYPE = tf.float16
ND = np.float16
G = 0.75  # upstream gradient of the one-row loss


def peak_rss_gib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2 ** 20
    return float("nan")


def pattern(rng, period):
    """Values in and around [eps, 1] (some outside, so the gradient is zero there), no NaN."""
    x = rng.uniform(0.0, 1.0, size=period)
    pick = rng.uniform(size=period)
    x = np.where(pick < 0.1, rng.choice([0.0, -0.5, 1.5, 1e-8, 1.0, U.epsilon(DTYPE)], size=period), x)
    return x.astype(ND)


def tiled(values, n):
    """The periodic tensor values[i % len(values)], i < n, as float16 [n], without NumPy copies."""
    reps = -(-n // len(values))
    whole = tf.tile(tf.constant(values), tf.constant([reps], tf.int64))
    return tf.slice(whole, tf.constant([0], tf.int64), tf.constant([n], tf.int64))


def sample_indices(rng, n, extra=()):
    windows = [np.arange(0, 2048), np.arange(2 ** 31 - 2048, 2 ** 31 + 2048), np.arange(n - 2048, n)]
    idx = np.concatenate(windows + [rng.integers(0, n, size=65536)] + [np.asarray(e) for e in extra])
    return np.unique(idx[(idx >= 0) & (idx < n)]).astype(np.int64)


def case_rows(rng):
    pt, pp = pattern(rng, 997), pattern(rng, 1009)
    t = tf.reshape(tiled(pt, N), [N, 1])
    p = tf.reshape(tiled(pp, N), [N, 1])
    start = time.time()
    loss = tf_kld.kl_divergence(t, p)
    seconds = time.time() - start
    del t, p
    assert loss.shape == (N,) and loss.dtype == DTYPE, (loss.shape, loss.dtype)
    rows = sample_indices(rng, N)
    got = tf.gather(loss, rows).numpy()
    t_rows, p_rows = pt[rows % 997][:, None], pp[rows % 1009][:, None]
    want = U.np_kld(t_rows, p_rows, DTYPE).astype(ND)
    U.assert_loss_close(got, want, t_rows, p_rows, DTYPE, what="loss of rows past 2^31")
    return {"rows_forward_s": round(seconds, 2), "rows_checked": int(rows.size)}


def case_cols(rng):
    period = 997
    pt = pattern(rng, period)
    t = tiled(pt, N)
    blocks = [1024, 2 ** 31 - 32, N - 64]  # multiples of 32 elements: aligned slices share buffers
    mods = [rng.uniform(0.01, 1.0, size=64).astype(ND) for _ in blocks]
    def part(begin, end):  # int64 bounds: Python slicing would pack 2^31 + x into int32
        return tf.slice(t, tf.constant([begin], tf.int64), tf.constant([end - begin], tf.int64))

    pieces, at = [], 0
    for b, m in zip(blocks, mods):
        pieces += [part(at, b), tf.constant(m)]
        at = b + 64
    p = tf.concat(pieces + ([part(at, N)] if at < N else []), axis=0)
    assert p.shape == (N,), p.shape
    del pieces
    t, p = tf.reshape(t, [1, N]), tf.reshape(p, [1, N])

    start = time.time()
    with tf.GradientTape() as tape:
        tape.watch(p)
        loss = tf_kld.kl_divergence(t, p)
    forward = time.time() - start
    start = time.time()
    grad = tape.gradient(loss, p, output_gradients=tf.constant([G], DTYPE))
    backward = time.time() - start
    del tape

    flat_blocks = np.concatenate([np.arange(b, b + 64) for b in blocks])
    t_blocks = pt[flat_blocks % period]
    p_blocks = np.concatenate(mods)
    want = U.np_kld(t_blocks, p_blocks, DTYPE).astype(ND)  # every other term is exactly 0
    U.assert_loss_close(loss.numpy()[0], want, t_blocks, p_blocks, DTYPE, what="loss of a row > 2^31")

    idx = sample_indices(rng, N, extra=[flat_blocks])
    got = tf.gather(tf.reshape(grad, [N]), idx).numpy().astype(np.float64)
    t_idx = pt[idx % period].astype(np.float64)
    p_idx = t_idx.copy()
    for b, m in zip(blocks, mods):
        inside = (idx >= b) & (idx < b + 64)
        p_idx[inside] = m[idx[inside] - b]
    eps = U.epsilon(DTYPE)
    tc, _ = U.clipped64(t_idx, p_idx, DTYPE)
    with np.errstate(invalid="ignore", divide="ignore"):
        want_g = np.where((p_idx >= eps) & (p_idx <= 1.0), -G * tc / p_idx, 0.0)
    with np.errstate(over="ignore"):
        want_g = want_g.astype(ND).astype(np.float64)
    U.assert_grad_close(got, want_g, G * tc / np.maximum(p_idx, eps), DTYPE,
                        what="d/dy_pred at flat indices past 2^31")
    return {"cols_forward_s": round(forward, 2), "cols_gradient_s": round(backward, 2),
            "cols_grad_checked": int(idx.size)}


def main():
    if not tf_kld.custom_op_loaded():
        print(f"tf_kld custom op library not loaded: {tf_kld.ops.load_error()}", file=sys.stderr)
        return 2
    rng = np.random.default_rng(31)
    out = {"elements": N}
    with tf_kld.implementation("custom"):
        start = time.time()
        out.update(case_rows(rng))
        out.update(case_cols(rng))
        out["total_s"] = round(time.time() - start, 1)
    out["peak_rss_gib"] = round(peak_rss_gib(), 2)
    print("LARGE " + json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
