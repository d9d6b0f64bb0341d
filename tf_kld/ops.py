"""Loads the op library, chooses between the custom op and the composite, registers gradients.

The choice is made at trace time (once per eager call, once per tf.function trace):

* ``reference`` - the pure-TF composite in :mod:`tf_kld.reference`.
* ``custom``    - the fused C++ op; an error if the library did not load.
* ``auto``      - the custom op when it is loaded and the graph is not being compiled by XLA
                  (jit_compile, TPU), the composite otherwise; also the composite for an op placed on
                  a GPU that the library has no GPU kernels for (see :mod:`tf_kld.gpu`).

The default comes from the environment variable ``TF_KLD_IMPL`` (auto|custom|reference) and is
overridden, per thread, by the :func:`implementation` context manager.
"""

import contextlib
import ctypes
import math
import os
import re
import threading
import warnings

import tensorflow as tf
from tensorflow.python.framework import ops as tf_ops
from tensorflow.python.ops import control_flow_util

from tf_kld import reference

IMPLEMENTATIONS = ("auto", "custom", "reference")
LIBRARY_ENV = "TF_KLD_LIBRARY"
IMPL_ENV = "TF_KLD_IMPL"
FORWARD_OP = "TfKld>KlDivergence"
GRAD_OP = "TfKld>KlDivergenceGrad"
_LIBRARY_FILE = "_kld_ops.so"
_OP_FUNCTIONS = ("tf_kld_kl_divergence", "tf_kld_kl_divergence_grad")
_REBUILD_HINT = ("Rebuild it against the installed TensorFlow with `pip install --no-build-isolation .` "
                 "(or `./configure.sh && bazel build //...`), or point TF_KLD_LIBRARY at a built "
                 "_kld_ops.so. Until then tf_kld computes with the pure-TensorFlow composite.")


# --------------------------------------------------------------------------------------------
# Loading


def library_path():
    """Where the op library is looked for: $TF_KLD_LIBRARY, else _kld_ops.so beside this file.

    tf_kld loads it once, at import; :func:`loaded_library_path` is the library in use."""
    return os.environ.get(LIBRARY_ENV) or os.path.join(os.path.dirname(__file__), _LIBRARY_FILE)


def built_for_tensorflow(path):
    """The TensorFlow version the library at `path` was built for (a marker compiled into it), or
    None when the file has none (not a tf_kld library, or one from before the marker)."""
    try:
        with open(path, "rb") as f:
            found = re.search(rb"tf_kld-build: tensorflow=([^;\x00]+);", f.read())
    except OSError:
        return None
    return found.group(1).decode(errors="replace") if found else None


def _is_op_library(path):
    """Whether `path`, loaded already, is a tf_kld op library (it exports TfKldCpuIsa); found with
    dlopen(RTLD_NOLOAD), which never loads anything."""
    try:
        return hasattr(ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LAZY), "TfKldCpuIsa")
    except OSError:
        return False


def _other_copies(path):
    """The tf_kld op libraries loaded into this process other than `path`."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            mapped = {line.split(None, 5)[5].strip() for line in maps if len(line.split(None, 5)) == 6}
    except OSError:
        return []
    mine = os.path.realpath(path)
    found = []
    for candidate in sorted(m for m in mapped if m.startswith("/") and ".so" in os.path.basename(m)):
        if os.path.realpath(candidate) != mine and _is_op_library(candidate):
            found.append(candidate)
    return found


def _load(path=None):
    """Loads the op library: (module, None), or (None, why not)."""
    path = os.path.abspath(path or library_path())
    if not os.path.exists(path):
        return None, f"the op library {path} does not exist"
    built_for = built_for_tensorflow(path)
    if built_for is not None and built_for != tf.__version__:
        return None, (f"the op library {path} was built for TensorFlow {built_for}, but this is "
                      f"TensorFlow {tf.__version__}")
    try:
        module = tf.load_op_library(path)
    except (tf.errors.OpError, OSError, RuntimeError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return None, (f"the op library {path} could not be loaded into TensorFlow "
                      f"{tf.__version__} ({reason})")
    # Any shared library loads; only one that registered both ops is usable.
    if not all(hasattr(module, name) for name in _OP_FUNCTIONS):
        others = _other_copies(path) if _is_op_library(path) else []
        if others:  # the ops were registered already, by that library, so this one added none
            return None, (f"the op library {path} loaded, but another copy of it, "
                          f"{', '.join(others)}, was loaded into this process first (e.g. with "
                          f"tf.load_op_library) and registered the ops {FORWARD_OP} and {GRAD_OP}; "
                          f"load only one: import tf_kld before anything loads a copy, or point "
                          f"{LIBRARY_ENV} at that copy")
        return None, (f"the library {path} loaded but does not define the ops {FORWARD_OP} and "
                      f"{GRAD_OP} (not a tf_kld op library, or one from another tf_kld version)")
    return module, None


# The absolute path, fixed at import: diagnostics use the library loaded from it, never a later
# $TF_KLD_LIBRARY or working directory (loading a second copy of the library would add nothing).
_path = os.path.abspath(library_path())
_module, _load_error = _load(_path)


def loaded_library_path():
    """The absolute path of the op library in use, or None when it did not load."""
    return _path if _module is not None else None


_handle = []  # the loaded library's ctypes handle, opened once


def _library_feature(symbol):
    """An exported `int symbol()` / `const char* symbol()` of the loaded library, or None."""
    if _module is None:
        return None
    if not _handle:
        # The library TensorFlow loaded from _path; RTLD_NOLOAD: never a second load.
        _handle.append(ctypes.CDLL(_path, mode=os.RTLD_NOLOAD | os.RTLD_LAZY))
    return getattr(_handle[0], symbol, None)


def xla_lowering_available():
    """True when the loaded library lowers both ops to XLA itself (so jit_compile always works)."""
    fn = _library_feature("TfKldHasXlaLowering")
    return bool(fn and fn())


def xla_lowering_error():
    """Why the op cannot lower itself to XLA, or None."""
    if _module is None:
        return _load_error
    if not xla_lowering_available():
        return (f"the op library {_path} was built without its XLA lowering (TF_KLD_XLA=0, "
                f"or the XLA source failed to compile); under jit_compile tf_kld emits the composite "
                f"where it can detect XLA, but a trace cached outside XLA cannot compile")
    return None


def cpu_isa():
    """The CPU kernel build in use ("avx512", "avx2" or "generic"; TF_KLD_CPU_ISA=avx2 or generic caps
    it, =avx512 keeps AVX-512 without its AVX512_BF16 kernel), or None without the library."""
    fn = _library_feature("TfKldCpuIsa")
    if fn is None:
        return None
    fn.restype = ctypes.c_char_p
    return fn().decode()


def cpu_bf16_dot():
    """True where tf_kld.linear's bfloat16 kernel gradient runs on the CPU's AVX512_BF16 dot products
    (TfKld>AccumulateKernelGrad; TF_KLD_CPU_ISA=avx512, avx2 or generic turns them off), False where
    it widens to float32, None without the library."""
    fn = _library_feature("TfKldCpuBf16Dot")
    return None if fn is None else bool(fn())


def custom_op_loaded():
    """True when the fused C++ op library is loaded and the custom op can run."""
    return _module is not None


if _module is None:
    warnings.warn(f"tf_kld: {_load_error}. {_REBUILD_HINT}", RuntimeWarning, stacklevel=2)
elif not xla_lowering_available():
    warnings.warn(f"tf_kld: {xla_lowering_error()}.", RuntimeWarning, stacklevel=2)


def load_error():
    """Why the library did not load, or None."""
    return _load_error


# --------------------------------------------------------------------------------------------
# Choosing the implementation

# Each thread has its own stack of `implementation()` blocks. A thread with none of its own follows
# the main thread's, so the replica threads tf.distribute starts for each step (MirroredStrategy)
# see what the training script chose.
_state = threading.local()
_main_stack = []


def _own_stack(create=False):
    if threading.current_thread() is threading.main_thread():
        return _main_stack
    stack = getattr(_state, "stack", None)
    if stack is None and create:
        stack = _state.stack = []
    return stack


def _env_implementation():
    value = os.environ.get(IMPL_ENV, "auto").strip().lower() or "auto"
    if value not in IMPLEMENTATIONS:
        raise ValueError(f"tf_kld: {IMPL_ENV}={value!r} is not one of {', '.join(IMPLEMENTATIONS)}.")
    return value


def current_implementation():
    """The implementation requested now: the innermost `implementation()` block of this thread (or
    of the main thread, when this one has none), else $TF_KLD_IMPL."""
    stack = _own_stack() or _main_stack
    return stack[-1] if stack else _env_implementation()


@contextlib.contextmanager
def implementation(name):
    """Context manager choosing the implementation ("auto", "custom" or "reference").

    It holds for this thread, and for threads that have no block of their own when it is entered
    on the main thread (e.g. tf.distribute's replica threads). It is consulted when an op is
    built: eagerly on each call, in a tf.function when it is traced.

    >>> with tf_kld.implementation("reference"):
    ...     loss = tf_kld.kl_divergence(y_true, y_pred)
    """
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"tf_kld.implementation: {name!r} is not one of {', '.join(IMPLEMENTATIONS)}.")
    stack = _own_stack(create=True)
    stack.append(name)
    try:
        yield name
    finally:
        stack.pop()


def in_xla_context():
    """True while building a graph that XLA will compile (jit_compile=True, TPU)."""
    if tf.executing_eagerly():
        return False
    return control_flow_util.GraphOrParentsInXlaContext(tf_ops.get_default_graph())


def use_custom_op():
    """Whether the op being built now should be the fused custom op."""
    impl = current_implementation()
    if impl == "reference":
        return False
    if impl == "custom":
        if _module is None:
            raise RuntimeError(f"tf_kld: implementation 'custom' was requested but {_load_error}. "
                               + _REBUILD_HINT.split(" Until then")[0])
        return True
    if _module is None or in_xla_context():
        return False
    from tf_kld import gpu  # pylint: disable=import-outside-toplevel  (gpu imports this module)
    return not gpu.composite_on_gpu()


# --------------------------------------------------------------------------------------------
# The custom op


def _epsilon_attrs(dtype):
    eps = reference.epsilon(dtype)
    # A TF "float" attr is 32-bit; float64 carries the exact double as text as well.
    return {"epsilon": eps, "epsilon_f64": repr(eps) if dtype == tf.float64 else ""}


def _needs_broadcast(y_true, y_pred):
    """False when both shapes are known and equal; True when they differ or are not all known."""
    return not (y_true.shape.is_fully_defined() and y_true.shape == y_pred.shape)


def custom_kl_divergence(y_true, y_pred):
    """The fused op on prepared tensors (same dtype, broadcastable shapes)."""
    dtype = y_pred.dtype
    work = reference.compute_dtype(dtype)
    if work != dtype and _needs_broadcast(y_true, y_pred):
        # The gradient of a broadcast sums over the broadcast axes in the dtype being broadcast: for
        # 16-bit inputs run the op on float32 copies (the 16-bit kernels compute in float32 anyway,
        # clipping at the 16-bit epsilon), so those sums run in float32 and are rounded once, as in
        # the composite. Exact: every 16-bit value is a float32.
        loss = custom_kl_divergence_in(tf.cast(y_true, work), tf.cast(y_pred, work), dtype)
        return tf.cast(loss, dtype)
    return custom_kl_divergence_in(y_true, y_pred, dtype)


def custom_kl_divergence_in(y_true, y_pred, eps_dtype):
    y_true, y_pred = reference.broadcast(y_true, y_pred)
    return _module.tf_kld_kl_divergence(y_true, y_pred, **_epsilon_attrs(eps_dtype))


def _grad_op(grad, y_true, y_pred, wrt, attrs):
    return _module.tf_kld_kl_divergence_grad(grad, y_true, y_pred, wrt=wrt, **attrs)


@tf.RegisterGradient(FORWARD_OP)
def _kl_divergence_grad(op, grad):
    y_true, y_pred = op.inputs
    attrs = {"epsilon": op.get_attr("epsilon"), "epsilon_f64": op.get_attr("epsilon_f64")}
    # Eager tapes tell which inputs nobody differentiates; in graphs an unused node is pruned.
    skip = getattr(op, "skip_input_indices", None) or ()
    d_true = None if 0 in skip else _grad_op(grad, y_true, y_pred, "y_true", attrs)
    d_pred = None if 1 in skip else _grad_op(grad, y_true, y_pred, "y_pred", attrs)
    return d_true, d_pred


def _op_epsilon(op):
    eps64 = op.get_attr("epsilon_f64")
    if isinstance(eps64, bytes):
        eps64 = eps64.decode()
    return float(eps64) if eps64 else op.get_attr("epsilon")


@tf.RegisterGradient(GRAD_OP)
def _kl_divergence_grad_grad(op, dout):
    """Second order, in TF ops: the gradient of the fused first-order gradient."""
    grad, y_true, y_pred = op.inputs
    wrt = op.get_attr("wrt")
    wrt = wrt.decode() if isinstance(wrt, bytes) else wrt
    dtype = y_pred.dtype
    work = reference.compute_dtype(dtype)
    eps = _op_epsilon(op)
    g = tf.cast(grad, work)[..., tf.newaxis]
    t = tf.cast(y_true, work)
    p = tf.cast(y_pred, work)
    d = tf.cast(dout, work)
    zero = tf.zeros_like(t)
    t_in = tf.logical_and(t >= eps, t <= 1.0)
    p_in = tf.logical_and(p >= eps, p <= 1.0)
    tc = tf.clip_by_value(t, eps, 1.0)
    pc = tf.clip_by_value(p, eps, 1.0)
    if wrt == "y_pred":  # out = -g * tc / pc  where p is inside [eps, 1]
        d = tf.where(p_in, d, zero)
        d_grad = tf.reduce_sum(-d * tc / pc, axis=-1)
        d_true = tf.where(t_in, -d * g / pc, zero)
        d_pred = d * g * tc / (pc * pc)
    else:  # out = g * (log(tc / pc) + 1)  where t is inside [eps, 1]
        d = tf.where(t_in, d, zero)
        d_grad = tf.reduce_sum(d * (tf.math.log(tc / pc) + 1.0), axis=-1)
        d_true = d * g / tc
        d_pred = tf.where(p_in, -d * g / pc, zero)
    return tuple(tf.cast(x, dtype) for x in (d_grad, d_true, d_pred))


# --------------------------------------------------------------------------------------------
# The public entry point


def kl_divergence(y_true, y_pred):
    """Computes the Kullback-Leibler divergence loss between `y_true` and `y_pred`.

    `loss = y_true * log(y_true / y_pred)`, summed over the last axis.

    `y_true` is cast to `y_pred`'s dtype and both are clipped to `[epsilon, 1]` with
    `keras.backend.epsilon()`; the shapes broadcast as in TensorFlow. A fused C++ op computes the
    loss and its gradient; under XLA (jit_compile, TPU) the same formula runs as TensorFlow ops.
    float16 and bfloat16 are computed in float32 and the result is cast back.

    Standalone usage:

    >>> y_true = [.4, .9, .2]
    >>> y_pred = [.5, .8, .12]
    >>> tf_kld.kl_divergence(y_true, y_pred).numpy()
    0.11891246

    Args:
      y_true: Tensor of true targets.
      y_pred: Tensor of predicted targets.

    Returns:
      A `Tensor` with loss: y_pred's dtype, shape = `[batch_size, d0, .. dN-1]`.

    Raises:
      TypeError: If `y_pred` is not floating point (float16, bfloat16, float32, float64), or
        `y_true` cannot be cast to the `y_pred.dtype`.
      ValueError: In a graph (tf.function), if the static shapes do not broadcast or broadcast to
        rank 0 (the loss reduces the last axis).
      tf.errors.InvalidArgumentError: The same, eagerly, or when shapes only known at run time do
        not broadcast.
    """
    y_true, y_pred = reference.prepare(y_true, y_pred)
    if use_custom_op():
        return custom_kl_divergence(y_true, y_pred)
    return reference.composite(y_true, y_pred, reference.epsilon(y_pred.dtype))


# --------------------------------------------------------------------------------------------
# The distillation family (tf_kld.distillation)


KL_LOGITS_OP = "TfKld>KlDivergenceWithLogits"
KL_LOGITS_GRAD_OP = "TfKld>KlDivergenceWithLogitsGrad"
JSD_LOGITS_OP = "TfKld>GeneralizedJsdWithLogits"
JSD_LOGITS_GRAD_OP = "TfKld>GeneralizedJsdWithLogitsGrad"
_KL_LOGITS_ATTRS = ("temperature", "temperature_f64")
_JSD_LOGITS_ATTRS = _KL_LOGITS_ATTRS + ("beta", "beta_f64")


def distillation_ops_loaded():
    """True when the loaded library has the fused distillation ops."""
    return _module is not None and hasattr(_module, "tf_kld_generalized_jsd_with_logits")


def distillation_xla_lowering_available():
    """True when the loaded library lowers the distillation ops to XLA itself."""
    fn = _library_feature("TfKldDistillHasXlaLowering")
    return bool(fn and fn())


def _temperature_attrs(temperature, dtype):
    # A TF "float" attr is 32-bit; float64 carries the exact double as text as well.
    return {"temperature": temperature,
            "temperature_f64": repr(float(temperature)) if dtype == tf.float64 else ""}


def _text_attr(op, name):
    value = op.get_attr(name)
    return value.decode() if isinstance(value, bytes) else value


def _op_number(op, name):
    """The exact value of a float attr carried with its `_f64` text (when set)."""
    text = _text_attr(op, name + "_f64")
    return float(text) if text else op.get_attr(name)


def custom_kl_divergence_with_logits(y_true, y_pred, temperature):
    """The fused op on prepared tensors (same dtype, broadcastable shapes)."""
    y_true, y_pred = reference.broadcast(y_true, y_pred)
    loss, _ = _module.tf_kld_kl_divergence_with_logits(
        y_true, y_pred, **_temperature_attrs(temperature, y_pred.dtype))
    return loss


def custom_generalized_jsd_with_logits(y_true, y_pred, beta, temperature):
    """The fused JSD op (0 < beta < 1) on prepared tensors (same dtype, broadcastable shapes)."""
    y_true, y_pred = reference.broadcast(y_true, y_pred)
    # beta always travels exactly: log(beta) and log1p(-beta) are taken from it in double.
    loss, _ = _module.tf_kld_generalized_jsd_with_logits(
        y_true, y_pred, beta=beta, beta_f64=repr(float(beta)),
        **_temperature_attrs(temperature, y_pred.dtype))
    return loss


def custom_divergence_and_student_grad(t_logits, s_logits, g, beta, temperature, d_dtype=None):
    """The fused ops on one chunk of rows ([rows, classes], one dtype): per row the generalized JSD
    (beta = 0: KL(p || q), beta = 1: KL(q || p)) and its gradient w.r.t. the student logits scaled
    by the per-row `g` ([rows], the logits' dtype), each in one pass (tf_kld.linear's chunks).
    d_dtype: the divergence in that dtype, from the float64 per-row statistics (the op's own value
    before its rounding to the logits' dtype), e.g. float32 for 16-bit logits."""
    attrs = _temperature_attrs(temperature, s_logits.dtype)
    if beta in (0.0, 1.0):  # KL(p || q), or KL(q || p): the student is y_true
        y_true, y_pred = (t_logits, s_logits) if beta == 0.0 else (s_logits, t_logits)
        d, stats = _module.tf_kld_kl_divergence_with_logits(y_true, y_pred, **attrs)
        if d_dtype is not None:
            d = tf.cast(stats[:, 4], d_dtype)
    else:
        d, stats = _module.tf_kld_generalized_jsd_with_logits(
            t_logits, s_logits, beta=beta, beta_f64=repr(float(beta)), **attrs)
        if d_dtype is not None:  # FinishJsd's arithmetic: NaN for a row of all -inf logits
            d = beta * stats[:, 4] + (1.0 - beta) * stats[:, 5]
            empty = tf.logical_or(tf.equal(stats[:, 0], -math.inf), tf.equal(stats[:, 2], -math.inf))
            d = tf.cast(tf.where(empty, tf.constant(math.nan, tf.float64), d), d_dtype)
    return d, student_grad(g, t_logits, s_logits, stats, beta, temperature)


def student_grad(g, t_logits, s_logits, stats, beta, temperature):
    """The generalized JSD's gradient w.r.t. the student logits scaled by the per-row `g`, in one
    pass, on whole rows or any block of their columns given the whole rows' `stats`: the KL op's
    of (teacher, student) for beta = 0, of (student, teacher) for beta = 1, else the JSD op's."""
    attrs = _temperature_attrs(temperature, s_logits.dtype)
    if beta in (0.0, 1.0):
        y_true, y_pred = (t_logits, s_logits) if beta == 0.0 else (s_logits, t_logits)
        d_true, d_pred = _module.tf_kld_kl_divergence_with_logits_grad(
            g, y_true, y_pred, stats, need_y_true=beta == 1.0, need_y_pred=beta == 0.0, **attrs)
        return d_pred if beta == 0.0 else d_true
    _, d_pred = _module.tf_kld_generalized_jsd_with_logits_grad(
        g, t_logits, s_logits, stats, need_y_true=False, need_y_pred=True, beta=beta,
        beta_f64=repr(float(beta)), **attrs)
    return d_pred


def linear_grads_op_loaded():
    """True when the loaded library has TfKld>AccumulateLinearGrads and TfKld>LinearLogits (CPU)."""
    return _module is not None and hasattr(_module, "tf_kld_accumulate_linear_grads") and \
        hasattr(_module, "tf_kld_linear_logits")


def column_block_ops_loaded():
    """True when the loaded library has TfKld>KlDivergenceWithLogitsBlock,
    TfKld>GeneralizedJsdWithLogitsBlock and TfKld>AddColumns (CPU; tf_kld.linear's column blocks)."""
    return _module is not None and hasattr(_module, "tf_kld_kl_divergence_with_logits_block") and \
        hasattr(_module, "tf_kld_generalized_jsd_with_logits_block") and \
        hasattr(_module, "tf_kld_add_columns")


def kl_block_initial_state(rows):
    """The running state of `rows` rows before any column ([rows, 7] float64: maxima -inf, sums and
    flags 0), for kl_divergence_with_logits_block."""
    ninf = tf.fill([rows, 1], tf.constant(-math.inf, tf.float64))
    zero = tf.zeros([rows, 1], tf.float64)
    return tf.concat([ninf, zero, zero, ninf, zero, zero, zero], axis=1)


def kl_divergence_with_logits_block(y_true, y_pred, state, temperature):
    """The next block of columns ([rows, block], one dtype) of KL(softmax(y_true / T) ||
    softmax(y_pred / T)) merged into the rows' running state: (state, loss, stats) of the columns
    seen so far (after the last block, the whole rows' loss and the stats the gradient op reads)."""
    return _module.tf_kld_kl_divergence_with_logits_block(
        y_true, y_pred, state, **_temperature_attrs(temperature, y_pred.dtype))


# The columns of TfKld>GeneralizedJsdWithLogitsBlock's state (cc/kernels/distill_cpu.h's
# kJsdBlockState): the six stats and the loss's sum.
JSD_BLOCK_STATE = 7


def generalized_jsd_with_logits_block(y_true, y_pred, stats, beta, temperature):
    """The next block of columns ([rows, block], one dtype) of the generalized JSD's second pass:
    (stats, loss) with the block's sums added to stats ([rows, JSD_BLOCK_STATE]: the whole rows'
    first four stats, then the sums so far: KL(p || m), KL(q || m) as the gradient reads them,
    then the JSD as the loss sums it) and the JSD of the sums so far. The first six are the
    gradient's stats."""
    return _module.tf_kld_generalized_jsd_with_logits_block(
        y_true, y_pred, stats, beta=beta, beta_f64=repr(float(beta)),
        **_temperature_attrs(temperature, y_pred.dtype))


def add_columns(acc, block, offset):
    """acc with block ([m, nb]) added to its columns [offset, offset + nb), in acc's buffer where
    TensorFlow allows it (16-bit sums in float32, rounded once). CPU."""
    return _module.tf_kld_add_columns(acc, block, tf.cast(offset, tf.int64))


def linear_logits(h, w, bias=None):
    """One chunk's logits `h @ w + bias` in float32 (float64 for float64 h, w): h [m, k] and w
    [k, n] of one dtype, 16-bit ones widened exactly and summed in float32 (w a cache-sized panel
    at a time: no float32 copy of it); bias [n] or None. CPU."""
    out_dtype = tf.float64 if h.dtype == tf.float64 else tf.float32
    bias = tf.zeros([0], out_dtype) if bias is None else tf.cast(bias, out_dtype)
    return _module.tf_kld_linear_logits(h, w, bias)


def accumulate_linear_grads(acc, a, b, w, with_d_a=True):
    """One chunk's gradients of `a @ w` from `b` = d loss / d (a @ w), in one pass over w's columns:
    (acc + matmul(a, b, transpose_a=True) in acc's buffer where TensorFlow allows it,
    matmul(b, w, transpose_b=True), or a [0, m] tensor when not with_d_a). acc, a, b float32 (w
    float32 or 16-bit) or all float64; CPU."""
    return _module.tf_kld_accumulate_linear_grads(acc, a, b, w, with_d_a=with_d_a)


def kernel_grad_op_loaded():
    """True when the loaded library has TfKld>AccumulateKernelGrad (CPU)."""
    return _module is not None and hasattr(_module, "tf_kld_accumulate_kernel_grad")


def accumulate_kernel_grad(acc, a, b, scale=1.0):
    """One chunk's kernel gradient from 16-bit operands, added in float32: acc + scale *
    matmul(a, b, transpose_a=True) in acc's buffer where TensorFlow allows it, for acc [m, n]
    float32, a [k, m] and b [k, n] of one 16-bit dtype (bfloat16 by AVX512_BF16 dot products where
    the CPU has them, see cpu_bf16_dot). CPU."""
    return _module.tf_kld_accumulate_kernel_grad(acc, a, b, tf.cast(scale, tf.float32))


def onednn_enabled():
    """Whether TensorFlow's oneDNN CPU kernels are on in this process (TF_ENABLE_ONEDNN_OPTS, or
    TensorFlow's default for this CPU)."""
    try:
        from tensorflow.python.util import _pywrap_util_port  # pylint: disable=import-outside-toplevel
        return bool(_pywrap_util_port.IsMklEnabled())
    except (ImportError, AttributeError):
        return False


def _fused_grad(op, grad, grad_op, attr_names):
    """Both gradients in one pass from the forward's per-row stats; an input nobody differentiates
    (eager tapes, and tapes in tf.function, say which) is not computed."""
    y_true, y_pred = op.inputs
    skip = getattr(op, "skip_input_indices", None) or ()
    need_true, need_pred = 0 not in skip, 1 not in skip
    if not (need_true or need_pred):
        return None, None
    d_true, d_pred = grad_op(grad, y_true, y_pred, op.outputs[1], need_y_true=need_true,
                             need_y_pred=need_pred, **{n: op.get_attr(n) for n in attr_names})
    return (d_true if need_true else None), (d_pred if need_pred else None)


@tf.RegisterGradient(KL_LOGITS_OP)
def _kl_logits_grad(op, grad, unused_stats_grad):
    del unused_stats_grad  # the stats are an implementation detail, not differentiable outputs
    return _fused_grad(op, grad, _module.tf_kld_kl_divergence_with_logits_grad, _KL_LOGITS_ATTRS)


@tf.RegisterGradient(JSD_LOGITS_OP)
def _jsd_logits_grad(op, grad, unused_stats_grad):
    del unused_stats_grad
    return _fused_grad(op, grad, _module.tf_kld_generalized_jsd_with_logits_grad, _JSD_LOGITS_ATTRS)


def _second_order(op, d_true_grad, d_pred_grad, composite):
    """Second order, in TF ops: the first-order gradient rebuilt by autodiff of the composite
    (exact: it is the same function of grad, y_true and y_pred), then differentiated."""
    grad, y_true, y_pred, _ = op.inputs
    wanted = [(op.get_attr("need_y_true"), d_true_grad, 0), (op.get_attr("need_y_pred"), d_pred_grad, 1)]
    with tf.GradientTape(persistent=True) as outer:
        outer.watch([grad, y_true, y_pred])
        with tf.GradientTape() as inner:
            inner.watch([y_true, y_pred])
            total = tf.reduce_sum(composite(y_true, y_pred) * grad)
        firsts = inner.gradient(total, [y_true, y_pred])
        picked = [(firsts[i], d) for need, d, i in wanted if need and d is not None]
    if not picked:
        return None, None, None, None
    d_grad, d_y_true, d_y_pred = outer.gradient(
        [f for f, _ in picked], [grad, y_true, y_pred], output_gradients=[d for _, d in picked],
        unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return d_grad, d_y_true, d_y_pred, None


@tf.RegisterGradient(KL_LOGITS_GRAD_OP)
def _kl_logits_grad_grad(op, d_true_grad, d_pred_grad):
    temperature = _op_number(op, "temperature")
    return _second_order(op, d_true_grad, d_pred_grad,
                         lambda t, p: reference.kl_with_logits_composite(t, p, temperature))


@tf.RegisterGradient(JSD_LOGITS_GRAD_OP)
def _jsd_logits_grad_grad(op, d_true_grad, d_pred_grad):
    temperature, beta = _op_number(op, "temperature"), _op_number(op, "beta")
    return _second_order(op, d_true_grad, d_pred_grad,
                         lambda t, p: reference.jsd_with_logits_composite(t, p, beta, temperature))
