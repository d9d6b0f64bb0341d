"""Distillation loss on top of the output projection, without materialising the logits.

    linear_distillation_loss(student_hidden, student_kernel, teacher_hidden, teacher_kernel, ...)

is `sum_i w_i * D_i / sum_i w_i`, where row i's logits are `hidden_i @ kernel + bias` (Keras Dense
layout: kernel [H, V]) and `D_i` is the generalized Jensen-Shannon divergence at a temperature
between the teacher's and the student's softmax (beta = 0: KL(teacher || student), beta = 1:
KL(student || teacher); see `generalized_jsd_with_logits`).

Rows are processed `chunk_size` at a time inside one `tf.custom_gradient` function: each chunk's
student logits `[chunk, V]` exist only while that chunk is processed, its logit gradient is computed
in the same pass as its loss and folded at once into the gradients of the student's hidden states,
kernel and bias. The loss is a scalar, so the backward pass only scales those three by the upstream
gradient: peak memory is a few `[chunk, V]` buffers plus the kernel gradient, never `[rows, V]`.
From 131073 classes (outside XLA) the loop runs over blocks of the kernels' columns instead
(`_column_blocked`): each column of the kernel gradient is then computed once, in its own dtype.
The teacher gets no gradient (as `tf.stop_gradient`).

The loop is a `tf.while_loop` over chunks of one static shape (the rows are padded with weight-0 rows
to a multiple of the chunk), so the same code runs eagerly, in `tf.function` and under XLA
(`jit_compile=True`). Outside XLA, rows of weight 0 (padding) are dropped before the loop: they cost
nothing. Matmuls run in the inputs' dtype (float32 accumulation inside TensorFlow's kernels); the
softmax and divergence run in float32 (float64 for float64 inputs). bfloat16 chunks under oneDNN keep
their logits and logit gradient in bfloat16 (widened in cache by the fused ops) and sum the kernel
gradient in float32 by TfKld>AccumulateKernelGrad (see _chunked).
"""

import numpy as np
import tensorflow as tf

from tf_kld import reference

_NAME = "linear_distillation_loss"

# Rows per chunk when chunk_size is None: a [chunk, V] float32 buffer of at most this many bytes.
# Two such buffers live at once (the teacher's and the student's logits; the logit gradient takes
# over the student's), and each chunk reads the kernels and the kernel gradient ([H, V] each) once
# more: smaller chunks save memory, larger ones spend less time on that traffic. So chunks have at
# least H_s / 2 rows as well (the two chunk buffers then take at most what the float32 kernel
# gradient takes): measured on 2 CPU cores at 2048 x 256 x 128256 (docs/linear.md), 64 rows a chunk
# (32 MiB) took 1.22x the materialised path's time in float32 and 1.48x in bfloat16, 128 rows 1.01x
# and 1.30x.
_CHUNK_BYTES = 32 << 20
_MAX_AUTO_CHUNK = 1024


def _check_float(x, name):
    if not x.dtype.is_floating:
        raise TypeError(f"linear_distillation_loss: {name} must be floating point (float16, bfloat16, "
                        f"float32 or float64), got {x.dtype.name}. Cast it first.")


def _check_scalar_args(temperature, beta, chunk_size):
    temperature = reference.check_temperature(temperature, _NAME)
    beta = reference.check_beta(beta, _NAME)
    if chunk_size is not None and (isinstance(chunk_size, (bool, np.bool_))
                                   or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1):
        raise ValueError(f"{_NAME}: chunk_size must be a positive int or None, got {chunk_size!r}")
    return temperature, beta, None if chunk_size is None else int(chunk_size)


def _dim(shape, i):
    return tf.compat.dimension_value(shape[i])


def _check_shapes(hs, ws, ht, wt, bs, bt, sample_weight):
    for x, name in ((ws, "student_kernel"), (wt, "teacher_kernel")):
        if x.shape.rank is not None and x.shape.rank != 2:
            raise ValueError(f"linear_distillation_loss: {name} must have rank 2 ([hidden, classes], "
                             f"the Keras Dense layout), got shape {x.shape}")
    for x, name in ((hs, "student_hidden"), (ht, "teacher_hidden")):
        if x.shape.rank is not None and x.shape.rank < 2:
            raise ValueError(f"linear_distillation_loss: {name} must have rank >= 2 ([..., hidden]), "
                             f"got shape {x.shape}")
    for x, name in ((bs, "student_bias"), (bt, "teacher_bias")):
        if x is not None and x.shape.rank is not None and x.shape.rank != 1:
            raise ValueError(f"linear_distillation_loss: {name} must have shape [classes], got "
                             f"{x.shape}")
    pairs = [(hs, -1, ws, 0, "student_hidden's last dimension", "student_kernel's first"),
             (ht, -1, wt, 0, "teacher_hidden's last dimension", "teacher_kernel's first"),
             (ws, 1, wt, 1, "student_kernel's classes", "teacher_kernel's classes")]
    if bs is not None:
        pairs.append((bs, 0, ws, 1, "student_bias's length", "student_kernel's classes"))
    if bt is not None:
        pairs.append((bt, 0, wt, 1, "teacher_bias's length", "teacher_kernel's classes"))
    for a, i, b, j, what_a, what_b in pairs:
        if a.shape.rank is None or b.shape.rank is None:
            continue
        da, db = _dim(a.shape, i), _dim(b.shape, j)
        if da is not None and db is not None and da != db:
            raise ValueError(f"linear_distillation_loss: {what_a} ({da}) must equal {what_b} ({db}); "
                             f"shapes {a.shape} and {b.shape}")
    lead_s, lead_t = hs.shape[:-1], ht.shape[:-1]
    if not lead_s.is_compatible_with(lead_t):
        raise ValueError(f"linear_distillation_loss: student_hidden and teacher_hidden must have the "
                         f"same leading shape, got {hs.shape} and {ht.shape}")
    if sample_weight is not None and sample_weight.shape.rank != 0 and \
            not _broadcasts_within(sample_weight.shape, lead_s):
        raise ValueError(f"linear_distillation_loss: sample_weight must be a scalar or have the hidden "
                         f"states' leading shape {lead_s} (or that rank with 1s to broadcast, as "
                         f"[batch, 1] for one weight per sequence), got {sample_weight.shape}")


def _broadcasts_within(shape, lead):
    """Whether weights of `shape` broadcast to `lead` without changing rank: each dimension equal
    or 1 (unknown ones are checked when the loss runs)."""
    if shape.rank is None or lead.rank is None:
        return True
    if shape.rank != lead.rank:
        return False
    return all(a is None or b is None or a == 1 or a == b
               for a, b in zip(shape.as_list(), lead.as_list()))


def auto_chunk_size(classes, rows=None, hidden=None):
    """Rows per chunk for `classes` classes and a student hidden size `hidden`: a [chunk, classes]
    float32 buffer of at most 32 MiB or, when more, hidden / 2 rows (two chunk buffers at most the
    size of the float32 kernel gradient, and the kernel's traffic spread over as many rows); a power
    of two, at most 1024, and no more than the rows there are. (The bfloat16 chunks take as many
    rows: with twice the rows, 256 at 2048 x 256 x 128256, a step was 6% faster there but its
    peak, by TensorFlow's allocator with oneDNN on, 570 MiB instead of 352.)"""
    chunk = max(1, _CHUNK_BYTES // (4 * max(1, classes)), (hidden or 0) // 2)
    chunk = min(_MAX_AUTO_CHUNK, 1 << (chunk.bit_length() - 1))
    if rows is not None:
        chunk = max(1, min(chunk, rows))
    return chunk


def rows_divergence_and_logit_grad(teacher_logits, student_logits, beta, temperature, g):
    """Per row (last axis = classes), in the logits' dtype: the generalized JSD D at `temperature`
    between softmax(teacher / T) = p and softmax(student / T) = q, and dD/dstudent_logits scaled by
    the per-row `g` ([rows]). beta = 0 is KL(p || q), beta = 1 is KL(q || p).

    Formulas (../shared/DISTILLATION_NOTES.md): beta = 0: dS = g / T (q - p); beta = 1: dS =
    g / T q ((lq - lp) - KL(q || p)); else with m = beta p + (1 - beta) q:
    dS = g (1 - beta) / T q ((lq - lm) - KL(q || m)), lp - lm and lq - lm by reference.log_ratios
    (straight from lq - lp: exact where p and q are close). A class with p = 0 (or q = 0)
    contributes 0.
    """
    inv_t = 1.0 / temperature
    lp = tf.nn.log_softmax(teacher_logits * inv_t, axis=-1)
    lq = tf.nn.log_softmax(student_logits * inv_t, axis=-1)
    p, q = tf.exp(lp), tf.exp(lq)
    zero = tf.zeros_like(p)

    def plogr(prob, log_a, log_b):  # prob * (log_a - log_b), 0 where prob is 0 (log_a = -inf)
        return tf.where(prob > 0, prob * (log_a - tf.where(prob > 0, log_b, zero)), zero)

    g = g[:, tf.newaxis] * inv_t
    if beta == 0.0:
        d = tf.reduce_sum(plogr(p, lp, lq), axis=-1)
        ds = g * (q - p)
    elif beta == 1.0:
        d = tf.reduce_sum(plogr(q, lq, lp), axis=-1)
        ds = g * tf.where(q > 0, q * ((lq - lp) - d[:, tf.newaxis]), zero)
    else:
        rp, rq = reference.log_ratios(lp, lq, beta)  # lp - lm, lq - lm, exact where p, q are close
        kl_pm = tf.reduce_sum(plogr(p, rp, zero), axis=-1)
        kl_qm = tf.reduce_sum(plogr(q, rq, zero), axis=-1)
        d = beta * kl_pm + (1.0 - beta) * kl_qm
        ds = g * (1.0 - beta) * tf.where(q > 0, q * (tf.where(q > 0, rq, zero) - kl_qm[:, tf.newaxis]),
                                         zero)
    return d, ds


def linear_distillation_loss(student_hidden, student_kernel, teacher_hidden, teacher_kernel, *,
                             student_bias=None, teacher_bias=None, temperature=1.0, beta=0.0,
                             sample_weight=None, chunk_size=None):
    """Distillation loss between a teacher's and a student's output projection, chunked.

    `sum_i w_i * D_i / sum_i w_i` over rows i (every position of the hidden states' leading shape),
    where `D_i = generalized_jsd_with_logits(teacher_logits_i, student_logits_i, beta, temperature)`
    and `logits = hidden @ kernel + bias`: beta = 0 (the default) is the forward KL(teacher ||
    student), beta = 1 the reverse KL(student || teacher), in between the generalized JSD (TRL's
    convention). No `T^2` factor. 0 when every weight is 0. The `[rows, classes]` logits are never
    materialised: rows go `chunk_size` at a time through one pass that computes the loss and the
    gradients of the student's hidden states, kernel and bias (the teacher gets none).

    Args:
      student_hidden: `[..., H_s]` floating tensor.
      student_kernel: `[H_s, V]`, the student's output projection (Keras Dense kernel), the hidden
        states' dtype.
      teacher_hidden: `[..., H_t]`, the same leading shape as `student_hidden`.
      teacher_kernel: `[H_t, V]`, the teacher hidden states' dtype.
      student_bias, teacher_bias: optional `[V]`.
      temperature: finite float > 0: both logits are divided by it.
      beta: float in [0, 1].
      sample_weight: optional weights of the leading shape, or of its rank with 1s that broadcast
        (`[batch, 1]`: one weight per sequence), or a scalar; rows of weight 0 (e.g. padding)
        contribute nothing.
      chunk_size: rows per chunk; None picks one from V and H_s (a [chunk, V] float32 buffer of
        <= 32 MiB, or H_s / 2 rows when more), no more than the rows where their number is
        static; from V = 131073 (outside XLA) blocks of the kernels' columns instead
        (docs/linear.md).

    Returns:
      A float32 scalar (float64 for float64 student inputs).

    Raises:
      ValueError: bad temperature, beta or chunk_size; kernels not of rank 2; hidden/kernel/bias
        dimensions that do not match; different leading shapes; a sample_weight of another shape.
      TypeError: non-floating inputs, or a kernel of another dtype than its hidden states.
    """
    temperature, beta, chunk_size = _check_scalar_args(temperature, beta, chunk_size)
    hs, ws = tf.convert_to_tensor(student_hidden), tf.convert_to_tensor(student_kernel)
    ht, wt = tf.convert_to_tensor(teacher_hidden), tf.convert_to_tensor(teacher_kernel)
    bs = None if student_bias is None else tf.convert_to_tensor(student_bias)
    bt = None if teacher_bias is None else tf.convert_to_tensor(teacher_bias)
    for x, name in ((hs, "student_hidden"), (ws, "student_kernel"), (ht, "teacher_hidden"),
                    (wt, "teacher_kernel"), (bs, "student_bias"), (bt, "teacher_bias")):
        if x is not None:
            _check_float(x, name)
    for x, y, names in ((ws, hs, "student_kernel and student_hidden"),
                        (wt, ht, "teacher_kernel and teacher_hidden"),
                        (bs, hs, "student_bias and student_hidden"),
                        (bt, ht, "teacher_bias and teacher_hidden")):
        if x is not None and x.dtype != y.dtype:
            raise TypeError(f"linear_distillation_loss: {names} must have one dtype, got "
                            f"{x.dtype.name} and {y.dtype.name}. Cast the weights to the hidden "
                            f"states' dtype (under a Keras mixed-precision policy, "
                            f"`tf.cast(layer.kernel, hidden.dtype)`, as the layer's own call does).")
    work = tf.float64 if hs.dtype == tf.float64 else tf.float32
    w = None if sample_weight is None else tf.cast(tf.convert_to_tensor(sample_weight), work)
    _check_shapes(hs, ws, ht, wt, bs, bt, w)

    classes = _dim(ws.shape, 1)
    static_rows = hs.shape[:-1].num_elements()
    by_columns = chunk_size is None and _columns_pay(classes)
    if chunk_size is None:  # capped at the rows where they are static: padding to a chunk is wasted work
        chunk_size = auto_chunk_size(classes if classes is not None else 32000, static_rows,
                                     _dim(ws.shape, 0))
    hs2 = tf.reshape(hs, [-1, tf.shape(hs)[-1]])
    ht2 = tf.stop_gradient(tf.reshape(ht, [-1, tf.shape(ht)[-1]]))
    rows = tf.shape(hs2)[0]
    if w is None:
        w = tf.ones([rows], work)
    else:
        w = tf.reshape(tf.broadcast_to(w, tf.shape(hs)[:-1]), [-1])
    with_bias = bs is not None
    bs_in = bs if with_bias else tf.zeros([tf.shape(ws)[1]], ws.dtype)
    bt_in = tf.stop_gradient(bt) if bt is not None else None

    @tf.custom_gradient
    def loss_fn(hs2, ws, bs_in):
        args = (hs2, ws, bs_in if with_bias else None, ht2, tf.stop_gradient(wt), bt_in, w, beta,
                temperature)
        if by_columns and _use_fused_ops() and _accumulate_in_place() and _column_ops_loaded():
            loss, d_h, d_w, d_b = _column_blocked(*args, static_rows, work)
        else:
            loss, d_h, d_w, d_b = _chunked(*args, chunk_size, work)

        def grad(upstream):
            u = tf.cast(upstream, work)

            def scaled(x, dtype):  # upstream 1 (the usual case): x itself, no [H_s, V] copy
                return tf.cast(tf.cond(tf.equal(u, 1), lambda: x,
                                       lambda: tf.cast(u * tf.cast(x, work), x.dtype)), dtype)
            return (tf.cast(u * tf.cast(d_h, work), hs2.dtype), scaled(d_w, ws.dtype),
                    scaled(d_b, bs_in.dtype))
        return loss, grad

    return loss_fn(hs2, ws, bs_in)


# The composite path (XLA, or implementation("reference")): XLA fuses the per-chunk softmax,
# divergence and gradient arithmetic into a few passes over [chunk, V] (TensorFlow's graph executor
# would make a pass, and a buffer, per op).
_fused_rows = tf.function(rows_divergence_and_logit_grad, jit_compile=True, reduce_retracing=True)


def _in_xla():
    from tf_kld import ops  # pylint: disable=import-outside-toplevel
    return ops.in_xla_context()


def _use_fused_ops():
    """The fused logits ops inside the chunks: where the implementation switch picks the custom
    ops (never inside XLA, where the composite fuses and the loop's buffers are XLA's)."""
    from tf_kld import distillation, ops  # pylint: disable=import-outside-toplevel
    return not ops.in_xla_context() and distillation._use_custom_op()  # pylint: disable=protected-access


def _accumulate_in_place():
    """Each chunk's kernel and hidden-state gradients by TfKld>AccumulateLinearGrads, the kernel's
    summed in one buffer (a CPU op: with a GPU, TensorFlow's matmuls and an add keep the work on
    the device)."""
    from tf_kld import ops  # pylint: disable=import-outside-toplevel
    return ops.linear_grads_op_loaded() and not tf.config.list_logical_devices("GPU")


def _bf16_chunks(ws, wt):
    """Whether the row chunks stay in bfloat16 (see _chunked): bfloat16 kernels, the fused ops
    with the in-place CPU accumulation, and oneDNN's matmuls."""
    from tf_kld import ops  # pylint: disable=import-outside-toplevel
    return ws.dtype == tf.bfloat16 and wt.dtype == tf.bfloat16 and _use_fused_ops() and \
        _accumulate_in_place() and ops.onednn_enabled() and ops.kernel_grad_op_loaded()


# Column blocks (see _column_blocked) for vocabularies from this many classes: there row chunks
# of 32 MiB would be under 64 rows (each chunk's pass over the [H, V] kernels and kernel-gradient
# sum then costs more than the matmuls), and chunks of efficient size hold [chunk, V] buffers as
# large as the kernel gradient; column blocks leave the kernel gradient the only large buffer.
_COLUMNS_FROM_CLASSES = 131073
# Column blocks: a [rows, block] float32 buffer of at most this many bytes (the blocks' logits and
# logit gradient live a few at a time), rows a super-chunk of at most _COLUMN_ROWS rows at a time.
_COLUMN_BLOCK_BYTES = 4 << 20
_COLUMN_ROWS = 4096
_MIN_COLUMN_BLOCK, _MAX_COLUMN_BLOCK = 256, 32768


def _columns_pay(classes):
    return classes is not None and classes >= _COLUMNS_FROM_CLASSES


def _column_ops_loaded():
    from tf_kld import ops  # pylint: disable=import-outside-toplevel
    return ops.column_block_ops_loaded()


def column_block_size(classes, rows):
    """Columns per block of the column-blocked path for `rows` rows at a time (None: unknown, taken
    as _COLUMN_ROWS): a [rows, block] float32 buffer of at most _COLUMN_BLOCK_BYTES, a power of two
    in [_MIN_COLUMN_BLOCK, _MAX_COLUMN_BLOCK], no more than the classes."""
    rows = _COLUMN_ROWS if rows is None else max(1, min(rows, _COLUMN_ROWS))
    block = max(1, _COLUMN_BLOCK_BYTES // (4 * rows))
    block = min(_MAX_COLUMN_BLOCK, max(_MIN_COLUMN_BLOCK, 1 << (block.bit_length() - 1)))
    return max(1, min(block, classes))


def _column_blocked(hs, ws, bs, ht, wt, bt, w, beta, temperature, static_rows, work):
    """The divergence by blocks of the kernels' columns: (loss, d/d hs, d/d ws, d/d bs) as
    _chunked's.

    Rows go up to _COLUMN_ROWS at a time (one such super-chunk for most batches). For each, a first
    pass over the column blocks computes the block's logits and merges them into the rows' running
    softmax statistics (TfKld>KlDivergenceWithLogitsBlock: online max and log-sum-exp, the full op's
    own merge), and a second pass computes the logits again, their gradient from the whole rows'
    statistics (the fused gradient op), and at once that block's columns of the kernel gradient
    (`h^T dS`, written into the [H, V] gradient in place by TfKld>AddColumns), its part of the
    hidden states' gradient (`dS W_block^T`) and its bias entries. Each column of the kernel gradient
    is thus computed once, in its own dtype where one super-chunk holds every row (no float32 sum,
    no final cast), and the [H, V] kernels are read twice per super-chunk instead of once per row
    chunk; the price is computing the logits twice. The generalized JSD (0 < beta < 1) needs a pass
    more between those two (TfKld>GeneralizedJsdWithLogitsBlock: the sums KL(p || m), KL(q || m)
    given the whole rows' statistics, which its gradient reads): the logits three times."""
    from tf_kld import ops  # pylint: disable=import-outside-toplevel
    to_true = beta == 1.0  # reverse KL(q || p): the student is y_true
    jsd = 0.0 < beta < 1.0
    h_dim, v_dim = tf.shape(ws)[0], tf.shape(ws)[1]
    classes = ws.shape[1]
    block = column_block_size(classes, static_rows)
    n_blocks = (classes + block - 1) // block
    project_by_matmul = ops.onednn_enabled()
    logits_by_op = not project_by_matmul and work == tf.float32
    # The kernel gradient in its own dtype when one super-chunk has every row (each column written
    # once), else summed over super-chunks in `work`.
    one_pass = static_rows is not None and static_rows <= _COLUMN_ROWS
    dw_dtype = ws.dtype if one_pass else work
    # bfloat16 under oneDNN, every row in one super-chunk: each block of the kernel gradient is one
    # bfloat16 matmul of the hidden states and the logit gradient rounded to bfloat16, as the
    # materialised path computes it (twice float32's multiply-adds a cycle with AVX512_BF16).
    kernel_dtype_matmul = project_by_matmul and one_pass and ws.dtype == tf.bfloat16

    total = tf.reduce_sum(w)
    g_all = tf.math.divide_no_nan(w, total)
    rows_all = tf.shape(hs)[0]
    keep = tf.where(tf.not_equal(w, 0))[:, 0]  # rows of weight 0 cost nothing
    hs_k, ht_k, g_k = tf.gather(hs, keep), tf.gather(ht, keep), tf.gather(g_all, keep)
    rows = tf.shape(hs_k)[0]
    n_super = tf.maximum((rows + _COLUMN_ROWS - 1) // _COLUMN_ROWS, 1)

    def logits(h, kernel, bias, c0, nb):
        k = tf.slice(kernel, [0, c0], [tf.shape(kernel)[0], nb])
        b = None if bias is None else tf.slice(bias, [c0], [nb])
        if logits_by_op:
            return ops.linear_logits(h, k, b), k
        z = tf.matmul(h, k)
        if b is not None:
            z += b
        return tf.cast(z, work), k

    def super_chunk(i, loss, d_w, d_b, d_h_parts):
        r0 = i * _COLUMN_ROWS
        rc = tf.minimum(_COLUMN_ROWS, rows - r0)
        h_c = tf.slice(hs_k, [r0, 0], [rc, -1])
        t_c = tf.slice(ht_k, [r0, 0], [rc, -1])
        g_c = tf.slice(g_k, [r0], [rc])

        def block_logits(j):  # (first column, teacher's logits, student's, student kernel block)
            c0 = j * block
            nb = tf.minimum(block, v_dim - c0)
            s_z, w_blk = logits(h_c, ws, bs, c0, nb)
            t_z, _ = logits(t_c, wt, bt, c0, nb)
            return c0, t_z, s_z, w_blk

        def stats_step(j, state, unused_d, unused_stats):
            _, t_z, s_z, _ = block_logits(j)
            y_true, y_pred = (s_z, t_z) if to_true else (t_z, s_z)
            state, d, stats = ops.kl_divergence_with_logits_block(y_true, y_pred, state, temperature)
            return j + 1, state, d, stats

        _, _, d, stats = tf.while_loop(
            lambda j, *_: j < n_blocks, stats_step,
            (tf.constant(0), ops.kl_block_initial_state(rc), tf.zeros([rc], work),
             tf.zeros([rc, 5], tf.float64)), parallel_iterations=1)
        if jsd:  # the second pass: KL(p || m) and KL(q || m) from the whole rows' statistics
            def sums_step(j, stats, unused_d):
                _, t_z, s_z, _ = block_logits(j)
                stats, d = ops.generalized_jsd_with_logits_block(t_z, s_z, stats, beta, temperature)
                return j + 1, stats, d

            _, stats, d = tf.while_loop(
                lambda j, *_: j < n_blocks, sums_step,
                (tf.constant(0), tf.concat([stats[:, :4], tf.zeros([rc, ops.JSD_BLOCK_STATE - 4],
                                                                   tf.float64)], axis=1),
                 tf.zeros([rc], work)), parallel_iterations=1)
            stats = stats[:, :6]  # the gradient's
        loss += tf.reduce_sum(g_c * d)
        h_w = tf.cast(h_c, work)

        def grad_step(j, d_w, d_b, d_h):
            c0, t_z, s_z, w_blk = block_logits(j)
            ds = ops.student_grad(g_c, t_z, s_z, stats, beta, temperature)
            ds_k = tf.cast(ds, ws.dtype) if project_by_matmul else None
            if kernel_dtype_matmul:  # h^T bf16(dS), rounded once: the materialised path's arithmetic
                d_w = ops.add_columns(d_w, tf.matmul(h_c, ds_k, transpose_a=True), c0)
            else:
                d_w = ops.add_columns(d_w, tf.cast(tf.matmul(h_w, ds, transpose_a=True), dw_dtype), c0)
            if bs is not None:
                d_b = ops.add_columns(d_b, tf.reduce_sum(ds, axis=0, keepdims=True), c0)
            if project_by_matmul:  # oneDNN's matmul in the kernel's dtype, as the row chunks'
                d_h += tf.cast(tf.matmul(ds_k, w_blk, transpose_b=True), work)
            else:
                d_h += tf.matmul(ds, tf.cast(w_blk, work), transpose_b=True)
            return j + 1, d_w, d_b, d_h

        _, d_w, d_b, d_h = tf.while_loop(
            lambda j, *_: j < n_blocks, grad_step,
            (tf.constant(0), d_w, d_b, tf.zeros([rc, h_dim], work)), parallel_iterations=1)
        return i + 1, loss, d_w, d_b, d_h_parts.write(i, tf.cast(d_h, hs.dtype))

    d_h_parts = tf.TensorArray(hs.dtype, size=n_super, infer_shape=False,
                               element_shape=tf.TensorShape([None, hs.shape[1]]))
    _, loss, d_w, d_b, d_h_parts = tf.while_loop(
        lambda i, *_: i < n_super, super_chunk,
        (tf.constant(0), tf.zeros([], work), tf.zeros([h_dim, v_dim], dw_dtype),
         tf.zeros([1, v_dim], work), d_h_parts), parallel_iterations=1)
    d_h = d_h_parts.concat()
    d_h = tf.scatter_nd(keep[:, tf.newaxis], d_h, tf.cast(tf.stack([rows_all, h_dim]), tf.int64))
    return loss, d_h, d_w, d_b[0]


def _bf16_chunk(h_c, t_c, g_c, w_c, ws, bs, wt, bt, beta, temperature, scale, d_w):
    """_chunked's chunk step for bfloat16 kernels under oneDNN (see in_bf16 there): (weighted loss,
    d_w + scale * h^T dS, unscaled d/d bs, d/d hs) for the chunk's rows with normalised weights g_c
    and raw weights w_c."""
    from tf_kld import ops  # pylint: disable=import-outside-toplevel
    s_logits, t_logits = tf.matmul(h_c, ws), tf.matmul(t_c, wt)
    if bs is not None:
        s_logits += bs
    if bt is not None:
        t_logits += bt
    # The divergence in float32 from the op's float64 row statistics: as the float32 logits' value.
    d, ds = ops.custom_divergence_and_student_grad(t_logits, s_logits, tf.cast(w_c, ws.dtype), beta,
                                                   temperature, d_dtype=g_c.dtype)
    loss = tf.reduce_sum(g_c * d)
    d_b = tf.reduce_sum(tf.cast(ds, g_c.dtype), axis=0) if bs is not None else None
    if d_w is None:
        d_w = tf.zeros([tf.shape(ws)[0], tf.shape(ws)[1]], tf.float32)
    d_w = ops.accumulate_kernel_grad(d_w, h_c, ds, scale)
    # d/d hs after the kernel-gradient sum: left to the executor, the two overlap in some steps, and
    # more [chunk, V] buffers are then alive at once (at 2048 x 256 x 128256 the step's peak by
    # TensorFlow's allocator statistics, oneDNN on, was 350 or 415 MiB; 352 MiB every time in this
    # order). The teacher's logits after the student's would save more (259 MiB) but took 8-20%
    # longer: the two matmuls share the cores better than either alone.
    with tf.control_dependencies([d_w]):
        d_h = tf.matmul(ds, ws, transpose_b=True)
    return loss, d_w, d_b, tf.cast(tf.cast(d_h, scale.dtype) * scale, h_c.dtype)


def _chunked(hs, ws, bs, ht, wt, bt, w, beta, temperature, chunk, work):
    """The loop over chunks: (loss, d loss/d hs [rows, H_s], d/d ws [H_s, V] and d/d bs [V], in
    `work`, except d/d hs in hs's dtype).

    Outside XLA each chunk runs the fused divergence op and its gradient op (one pass each over the
    chunk's logits), then TfKld>AccumulateLinearGrads: in one pass over the kernel's columns it
    adds the chunk's kernel gradient into the [H_s, V] sum (in place: no [H_s, V] temporary per
    chunk) and, unless oneDNN's matmul does it, computes the chunk's hidden-state gradient. Under XLA
    (and for implementation("reference")) the chunk arithmetic is the composite, and XLA owns the
    buffers."""
    from tf_kld import ops  # pylint: disable=import-outside-toplevel
    fused = _use_fused_ops()
    in_place = fused and _accumulate_in_place()
    # The hidden states' gradient dS @ W^T: TensorFlow's matmul where oneDNN runs it (faster than
    # the op's pass on the AVX-512 machine measured), else the op, in its pass over the kernel's
    # columns (a little faster than Eigen's matmul end to end there).
    project_by_matmul = ops.onednn_enabled()
    # The chunk's logits: TfKld>LinearLogits where TensorFlow's matmul is Eigen's (oneDNN off):
    # as fast as Eigen's float32 matmul on chunks to 1.7x faster, 2.6-4.5x its bfloat16 one, which
    # also converts the whole [H, V] kernel to float32 for every chunk (on the AVX-512 machine
    # measured); oneDNN's matmul is faster than the op from 64 rows (1.1-1.3x float32, 1.2-1.9x
    # bfloat16), so where it runs, it does this.
    logits_by_op = in_place and not project_by_matmul and work == tf.float32
    # bfloat16 kernels under oneDNN: the chunk stays in bfloat16 as the materialised path's tensors
    # are (oneDNN's bfloat16 logits, no float32 copies; the fused ops widen them in cache, and their
    # logit gradient is rounded to bfloat16 once, as that path's), and its kernel gradient is added
    # into the float32 sum by TfKld>AccumulateKernelGrad (AVX512_BF16 dot products where the CPU has
    # them: twice float32's multiply-adds a cycle). The rows' weights enter the logit gradient as
    # bfloat16 (exact for 0/1 masks and small integers), their 1 / sum(w) in float32 afterwards.
    in_bf16 = _bf16_chunks(ws, wt)
    rows_all = tf.shape(hs)[0]
    total = tf.reduce_sum(w)
    g_all = tf.math.divide_no_nan(w, total)
    if in_bf16:  # the logit gradient takes w itself; 1 / sum(w) scales the sums
        scale = tf.math.divide_no_nan(tf.constant(1.0, work), total)
        g_all = tf.stack([g_all, w], axis=1)
    if not _in_xla():  # rows of weight 0 cost nothing (XLA needs static shapes: it keeps them)
        keep = tf.where(tf.not_equal(w, 0))[:, 0]
        hs_k, ht_k, g_k = tf.gather(hs, keep), tf.gather(ht, keep), tf.gather(g_all, keep)
    else:
        keep, hs_k, ht_k, g_k = None, hs, ht, g_all
    rows = tf.shape(hs_k)[0]
    n_chunks = tf.maximum((rows + chunk - 1) // chunk, 1)  # >= 1: the first chunk starts the sums
    pad = n_chunks * chunk - rows
    hs_p = tf.pad(hs_k, [[0, pad], [0, 0]])
    ht_p = tf.pad(ht_k, [[0, pad], [0, 0]])
    g_p = tf.pad(g_k, [[0, pad]] + [[0, 0]] * (g_k.shape.rank - 1))
    h_dim, v_dim = tf.shape(ws)[0], tf.shape(ws)[1]

    def chunk_step(i, d_w):
        """Chunk i's weighted loss, d/d hs, d/d bs, and d_w with its kernel gradient added (d_w
        None: the first chunk, whose kernel gradient starts the sum)."""
        start = i * chunk
        h_c = tf.slice(hs_p, [start, 0], [chunk, h_dim])
        t_c = tf.slice(ht_p, [start, 0], [chunk, tf.shape(ht_p)[1]])
        if in_bf16:
            g_c, w_c = tf.unstack(tf.slice(g_p, [start, 0], [chunk, 2]), axis=1)
            return _bf16_chunk(h_c, t_c, g_c, w_c, ws, bs, wt, bt, beta, temperature, scale, d_w)
        g_c = tf.slice(g_p, [start], [chunk])
        if logits_by_op:  # float32 logits, 16-bit kernels widened in cache
            s_logits, t_logits = ops.linear_logits(h_c, ws, bs), ops.linear_logits(t_c, wt, bt)
        else:
            s_logits = tf.matmul(h_c, ws)
            t_logits = tf.matmul(t_c, wt)
            if bs is not None:
                s_logits += bs
            if bt is not None:
                t_logits += bt
            t_logits, s_logits = tf.cast(t_logits, work), tf.cast(s_logits, work)
        if fused:
            # Padding rows have weight 0 and finite logits (the bias): they add exactly 0.
            d, ds = ops.custom_divergence_and_student_grad(t_logits, s_logits, g_c, beta, temperature)
            loss = tf.reduce_sum(g_c * d)
            h_live = tf.cast(h_c, work)
        else:
            d, ds = _fused_rows(t_logits, s_logits, g=g_c, beta=beta, temperature=temperature)
            # Rows of weight 0 (padding, or kept under XLA) contribute nothing, not even a NaN.
            live = tf.not_equal(g_c, 0)
            loss = tf.reduce_sum(tf.where(live, g_c * d, tf.zeros_like(d)))
            ds = tf.where(live[:, tf.newaxis], ds, tf.zeros_like(ds))
            # A dead row's hidden state may hold NaN (padding under XLA): 0 * NaN would reach d_w.
            h_live = tf.cast(tf.where(live[:, tf.newaxis], h_c, tf.zeros_like(h_c)), work)
        d_b = tf.reduce_sum(ds, axis=0) if bs is not None else None
        if in_place:  # the first chunk's sum starts from zeros, which the op writes into
            d_w = tf.zeros([h_dim, v_dim], work) if d_w is None else d_w
            d_w, d_h = ops.accumulate_linear_grads(d_w, h_live, ds, ws, with_d_a=not project_by_matmul)
            if not project_by_matmul:
                return loss, d_w, d_b, tf.cast(d_h, hs.dtype)
            return loss, d_w, d_b, tf.matmul(tf.cast(ds, ws.dtype), ws, transpose_b=True)
        if d_w is None:
            d_w = tf.matmul(h_live, ds, transpose_a=True)
        else:
            d_w += tf.matmul(h_live, ds, transpose_a=True)
        d_h = tf.matmul(tf.cast(ds, ws.dtype), ws, transpose_b=True)
        return loss, d_w, d_b, d_h

    loss, d_w, d_b, d_h0 = chunk_step(0, None)
    d_h = tf.TensorArray(hs.dtype, size=n_chunks, element_shape=tf.TensorShape([chunk, None]))
    d_h = d_h.write(0, d_h0)
    if d_b is None:
        d_b = tf.zeros([v_dim], work)

    def body(i, loss, d_w, d_b, d_h):
        loss_c, d_w, d_b_c, d_h_c = chunk_step(i, d_w)
        if d_b_c is not None:
            d_b += d_b_c
        return i + 1, loss + loss_c, d_w, d_b, d_h.write(i, d_h_c)

    # The loop's counter waits for the whole first chunk: the loop variables enter the loop one
    # by one, and chunk 1's matmuls (which need only the counter) would otherwise run while chunk
    # 0's last ops still hold its logit gradient (one more [chunk, V] buffer at the peak).
    with tf.control_dependencies([loss, d_w, d_b, d_h0]):
        first = tf.identity(tf.constant(1))
    _, loss, d_w, d_b, d_h = tf.while_loop(lambda i, *_: i < n_chunks, body,
                                           (first, loss, d_w, d_b, d_h), parallel_iterations=1)
    d_h = tf.reshape(d_h.stack(), [-1, h_dim])[:rows]
    if in_bf16:
        d_b *= scale
    if keep is not None:
        d_h = tf.scatter_nd(keep[:, tf.newaxis], d_h, tf.cast(tf.stack([rows_all, h_dim]), tf.int64))
    return loss, d_h, d_w, d_b
