"""Benchmark of the distillation family: tf_kld.kl_divergence_with_logits against what TensorFlow
users write today, forward and forward+backward (gradient w.r.t. the student only), as ratios from
one run (issue 12's shapes and peers).

    python bench/distill_bench.py            # 8192x32000, 1024x128256, 256x262144, 65536x10
    python bench/distill_bench.py --quick    # small shapes (a smoke run)

Peers: (a) Keras's form `keras.losses.kl_divergence(softmax(t/T), softmax(s/T))` under tf.function
and under XLA; (b) the log-softmax composite as users write it (`tf.nn.log_softmax`) under XLA; (c)
TF's fused `softmax_cross_entropy_with_logits(labels=softmax(t/T), logits=s/T)` (the same student
gradient up to a constant); (d) torch's `kl_div(log_softmax(s/T), log_softmax(t/T),
log_target=True)` on the CPU when PyTorch is installed; and the floor: TensorFlow reading both
inputs once. Timing reuses bench.py's interleaved medians (every peer sampled round by round, so a
slow spell hits all alike). Then the peak extra memory of forward+backward (float32, a fresh process
per peer, calibrated as bench.py's), and every target of the issue, met or missed. Results:
bench/out/distill_results.{json,md} (untracked).
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench  # noqa: E402  (sets up the path to tf_kld and TensorFlow's logging)
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tf_kld  # noqa: E402

tf.get_logger().setLevel("ERROR")  # every (shape, dtype) traces the peers anew: retracing is expected

SHAPES = [(8192, 32000), (1024, 128256), (256, 262144), (65536, 10)]
QUICK_SHAPES = [(256, 32000), (8192, 10)]
MEMORY_SHAPE, QUICK_MEMORY_SHAPE = (2048, 32000), (256, 32000)
NARROW = 10  # rows this narrow (65536 x 10) have their own, lower speed targets
DTYPES = (tf.float32, tf.bfloat16)
TEMPERATURE = 2.0


def _fused(t, s):
    with tf_kld.implementation("custom"):
        return tf_kld.kl_divergence_with_logits(t, s, TEMPERATURE)


def _log_softmax_composite(t, s):
    """(b): the KL as users write it from tf.nn.log_softmax, in float32 for 16-bit logits (as
    tf_kld.reference computed it until it took lp - lq from the logits' exact difference)."""
    lp = tf.nn.log_softmax(tf.cast(t, tf.float32) / TEMPERATURE, axis=-1)
    lq = tf.nn.log_softmax(tf.cast(s, tf.float32) / TEMPERATURE, axis=-1)
    return tf.cast(tf.reduce_sum(tf.exp(lp) * (lp - lq), axis=-1), s.dtype)


def _keras_form(t, s):
    return keras.losses.kl_divergence(tf.nn.softmax(t / TEMPERATURE), tf.nn.softmax(s / TEMPERATURE))


def _cross_entropy(t, s):
    return tf.nn.softmax_cross_entropy_with_logits(labels=tf.nn.softmax(t / TEMPERATURE),
                                                   logits=s / TEMPERATURE)


def _with_grad(loss_fn):
    def fn(t, s):
        with tf.GradientTape() as tape:
            tape.watch(s)
            loss = loss_fn(t, s)
        return loss, tape.gradient(loss, s)
    return fn


def tf_peers():
    peers = {}
    if tf_kld.ops.distillation_ops_loaded():
        peers["tf_kld"] = (tf.function(_fused), tf.function(_with_grad(_fused)))
    peers["(a) Keras form, XLA"] = (tf.function(_keras_form, jit_compile=True),
                                    tf.function(_with_grad(_keras_form), jit_compile=True))
    peers["(a) Keras form, tf.function"] = (tf.function(_keras_form),
                                            tf.function(_with_grad(_keras_form)))
    peers["(b) log-softmax composite, XLA"] = (
        tf.function(_log_softmax_composite, jit_compile=True),
        tf.function(_with_grad(_log_softmax_composite), jit_compile=True))
    peers["(c) softmax cross-entropy"] = (tf.function(_cross_entropy),
                                          tf.function(_with_grad(_cross_entropy)))
    return peers


def torch_peer():
    try:
        import torch  # pylint: disable=import-outside-toplevel
    except ImportError:
        return None
    f = torch.nn.functional

    def fwd(t, s):
        with torch.no_grad():
            return f.kl_div(f.log_softmax(s / TEMPERATURE, -1), f.log_softmax(t / TEMPERATURE, -1),
                            log_target=True, reduction="none").sum(-1)

    def fwd_bwd(t, s):
        s = s.detach().requires_grad_(True)
        loss = f.kl_div(f.log_softmax(s / TEMPERATURE, -1), f.log_softmax(t / TEMPERATURE, -1),
                        log_target=True, reduction="none").sum(-1)
        loss.sum().backward()
        return loss, s.grad

    return torch, fwd, fwd_bwd


def run(shapes, budget):
    rows = []
    torch_info = torch_peer()
    for shape in shapes:
        rng = np.random.default_rng(0)
        t64 = rng.normal(size=shape) * 3.0
        s64 = rng.normal(size=shape) * 3.0
        for dtype in DTYPES:
            t, s = tf.constant(t64, dtype), tf.constant(s64, dtype)
            for mode in ("fwd", "fwd+bwd"):
                calls = {name: (fns[0] if mode == "fwd" else fns[1], (t, s))
                         for name, fns in tf_peers().items()}
                if mode == "fwd":
                    calls[bench.READ] = (bench.read_both, (t, s))
                if torch_info is not None and dtype == tf.float32:
                    torch, fwd, fwd_bwd = torch_info
                    tt, ts = torch.from_numpy(t.numpy()), torch.from_numpy(s.numpy())
                    calls["(d) torch kl_div"] = (fwd if mode == "fwd" else fwd_bwd, (tt, ts))
                times = bench.interleaved_medians(calls, budget)
                for name, seconds in times.items():
                    rows.append({"shape": f"{shape[0]}x{shape[1]}", "dtype": dtype.name, "mode": mode,
                                 "peer": name, "ms": seconds * 1e3})
                best = times.get("tf_kld")
                summary = ", ".join(f"{name} {ms * 1e3:.1f} ms" + (
                    f" ({ms / best:.2f}x)" if best and name != "tf_kld" else "")
                                    for name, ms in times.items())
                print(f"{shape[0]}x{shape[1]} {dtype.name} {mode}: {summary}", flush=True)
    return rows


def memory_child(peer, shape):
    """In a fresh process: the peak extra memory of one forward+backward of peer, float32."""
    rng = np.random.default_rng(0)
    t, s = (tf.constant(rng.normal(size=shape) * 3.0, tf.float32) for _ in range(2))
    bench.measure_in_child(tf_peers()[peer][1], (t, s), shape)


def measure_memory(shape):
    out = []
    for peer in tf_peers():
        measured = bench.peak_memory_in_child(__file__, [peer, f"{shape[0]}x{shape[1]}"])
        extra, grad = measured["bytes"], 4 * shape[0] * shape[1]
        out.append({"shape": f"{shape[0]}x{shape[1]}", "peer": peer, "note": measured["note"],
                    "peak_extra_mib": None if extra is None else extra / 2**20,
                    "x_gradient_buffer": None if extra is None else extra / grad})
        print(f"  peak memory fwd+bwd {shape[0]}x{shape[1]} {peer:32s} " +
              (f"{extra / 2**20:9.1f} MiB ({extra / grad:.2f}x the gradient)" if extra is not None
               else measured["note"]), flush=True)
    return out


def targets(rows, memory):
    """The issue's targets, each {"target", "value", "met"}; a value of None (memory not measurable
    here) is never met."""
    ms = {(r["shape"], r["dtype"], r["mode"], r["peer"]): r["ms"] for r in rows}
    out = []

    def add(target, value, bar):
        out.append({"target": target, "value": value, "met": value is not None and value >= bar})

    for shape, dtype in dict.fromkeys((r["shape"], r["dtype"]) for r in rows):
        narrow = int(shape.split("x")[1]) <= NARROW
        for mode in ("fwd", "fwd+bwd"):
            ours = ms.get((shape, dtype, mode, "tf_kld"))
            if ours is None:
                continue
            xla = [ms[k] for k in ((shape, dtype, mode, "(a) Keras form, XLA"),
                                   (shape, dtype, mode, "(b) log-softmax composite, XLA")) if k in ms]
            bar = 1.5 if narrow else (5.0 if mode == "fwd" else 4.0)
            add(f"{mode} {shape} {dtype}: >= {bar:g}x the fastest XLA form of (a)/(b)", min(xla) / ours, bar)
            if not narrow:
                add(f"{mode} {shape} {dtype}: >= 8x (a) under tf.function",
                    ms[(shape, dtype, mode, "(a) Keras form, tf.function")] / ours, 8.0)
            if mode == "fwd+bwd" and not narrow:
                add(f"{mode} {shape} {dtype}: >= 4x (c) softmax cross-entropy",
                    ms[(shape, dtype, mode, "(c) softmax cross-entropy")] / ours, 4.0)
            if mode == "fwd" and (shape, dtype, mode, bench.READ) in ms:
                add(f"fwd {shape} {dtype}: >= 70% of the read floor (reading both inputs, timed alongside)",
                    ms[(shape, dtype, mode, bench.READ)] / ours, 0.7)
        f32, bf16 = ms.get((shape, "float32", "fwd", "tf_kld")), ms.get((shape, "bfloat16", "fwd", "tf_kld"))
        if dtype == "bfloat16" and f32 and bf16:
            add(f"fwd {shape} bfloat16: time per element <= float32's (value: float32 / bfloat16)",
                f32 / bf16, 1.0)
    for m in memory:
        if m["peer"] == "tf_kld":
            ratio = m["x_gradient_buffer"]
            out.append({"target": f"fwd+bwd {m['shape']} float32: peak extra <= 1.1x one gradient buffer",
                        "value": ratio, "met": ratio is not None and ratio <= 1.1})
    return out


def _markdown(rows, memory=(), goals=()):
    lines = ["| shape | dtype | mode | peer | ms | peer / tf_kld |", "|---|---|---|---|---|---|"]
    ours = {(r["shape"], r["dtype"], r["mode"]): r["ms"] for r in rows if r["peer"] == "tf_kld"}
    for r in rows:
        base = ours.get((r["shape"], r["dtype"], r["mode"]))
        ratio = f"{r['ms'] / base:.2f}" if base else ""
        lines.append(f"| {r['shape']} | {r['dtype']} | {r['mode']} | {r['peer']} | {r['ms']:.1f} | {ratio} |")
    if memory:
        lines += ["", "| shape | fwd+bwd peer (float32) | peak extra MiB | x gradient buffer | measured with |",
                  "|---|---|---:|---:|---|"]
        for m in memory:
            mib = "-" if m["peak_extra_mib"] is None else f"{m['peak_extra_mib']:.1f}"
            ratio = "-" if m["x_gradient_buffer"] is None else f"{m['x_gradient_buffer']:.2f}"
            lines.append(f"| {m['shape']} | {m['peer']} | {mib} | {ratio} | {m['note']} |")
    if goals:
        lines += ["", "| target | measured | |", "|---|---:|---|"]
        for g in goals:
            verdict = bench.NOT_MEASURABLE if g["value"] is None else ("met" if g["met"] else "missed")
            value = "-" if g["value"] is None else f"{g['value']:.3f}"
            lines.append(f"| {g['target']} | {value} | {verdict} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, short budget")
    parser.add_argument("--budget", type=float, default=None, help="seconds of samples per peer")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    parser.add_argument("--out", default=bench.RESULTS, help="directory for distill_results.{json,md}")
    parser.add_argument("--memory-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        peer, shape = args.memory_child
        return memory_child(peer, tuple(int(v) for v in shape.split("x")))
    shapes = QUICK_SHAPES if args.quick else SHAPES
    budget = args.budget if args.budget is not None else (0.5 if args.quick else 3.0)
    rows = run(shapes, budget)
    memory = [] if args.no_memory else measure_memory(QUICK_MEMORY_SHAPE if args.quick else MEMORY_SHAPE)
    goals = targets(rows, memory)
    missed = [g["target"] for g in goals if g["met"] is False]
    print(f"\ndistillation targets: {sum(g['met'] is True for g in goals)} of {len(goals)} met" +
          "".join(f"\n  missed: {m}" for m in missed), flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "distill_results.json"), "w") as f:
        json.dump({"temperature": TEMPERATURE, "cpu_isa": tf_kld.ops.cpu_isa(), "rows": rows,
                   "memory": memory, "targets": goals}, f, indent=1)
    with open(os.path.join(args.out, "distill_results.md"), "w") as f:
        f.write(_markdown(rows, memory, goals))
    return rows


if __name__ == "__main__":
    main()
