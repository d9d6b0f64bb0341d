"""Benchmark of the distillation family: tf_kld.kl_divergence_with_logits against what TensorFlow
users write today, forward and forward+backward (gradient w.r.t. the student only), as ratios from
one run (issue 12's shapes and peers).

    python bench/distill_bench.py            # 8192x32000, 1024x128256, 256x262144, 65536x10
    python bench/distill_bench.py --quick    # small shapes (a smoke run)

Peers: (a) Keras's form `keras.losses.kl_divergence(softmax(t/T), softmax(s/T))` under tf.function
and under XLA; (b) the log-softmax composite (tf_kld.reference) under XLA; (c) TF's fused
`softmax_cross_entropy_with_logits(labels=softmax(t/T), logits=s/T)` (the same student gradient up
to a constant); (d) torch's `kl_div(log_softmax(s/T), log_softmax(t/T), log_target=True)` on the
CPU when PyTorch is installed; and the floor: TensorFlow reading both inputs once. Timing reuses
bench.py's interleaved medians (every peer sampled round by round, so a slow spell hits all alike).
Results: bench/out/distill_results.{json,md} (untracked).
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

SHAPES = [(8192, 32000), (1024, 128256), (256, 262144), (65536, 10)]
QUICK_SHAPES = [(256, 32000), (8192, 10)]
DTYPES = (tf.float32, tf.bfloat16)
TEMPERATURE = 2.0


def _fused(t, s):
    with tf_kld.implementation("custom"):
        return tf_kld.kl_divergence_with_logits(t, s, TEMPERATURE)


def _log_softmax_composite(t, s):
    return tf_kld.reference.kl_with_logits_composite(t, s, TEMPERATURE)


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


def _markdown(rows):
    lines = ["| shape | dtype | mode | peer | ms | peer / tf_kld |", "|---|---|---|---|---|---|"]
    ours = {(r["shape"], r["dtype"], r["mode"]): r["ms"] for r in rows if r["peer"] == "tf_kld"}
    for r in rows:
        base = ours.get((r["shape"], r["dtype"], r["mode"]))
        ratio = f"{r['ms'] / base:.2f}" if base else ""
        lines.append(f"| {r['shape']} | {r['dtype']} | {r['mode']} | {r['peer']} | {r['ms']:.1f} | {ratio} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, short budget")
    parser.add_argument("--budget", type=float, default=None, help="seconds of samples per peer")
    args = parser.parse_args(argv)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    budget = args.budget if args.budget is not None else (0.5 if args.quick else 3.0)
    rows = run(shapes, budget)
    os.makedirs(bench.RESULTS, exist_ok=True)
    with open(os.path.join(bench.RESULTS, "distill_results.json"), "w") as f:
        json.dump({"temperature": TEMPERATURE, "cpu_isa": tf_kld.ops.cpu_isa(), "rows": rows}, f,
                  indent=1)
    with open(os.path.join(bench.RESULTS, "distill_results.md"), "w") as f:
        f.write(_markdown(rows))
    return rows


if __name__ == "__main__":
    main()
