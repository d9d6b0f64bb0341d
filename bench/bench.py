"""Benchmark: tf_kld against every peer, forward and forward+backward, as ratios from one run.

    python bench/bench.py              # all shapes, table + bench/results/{results.csv,json,png}
    python bench/bench.py --quick      # fewer repetitions, smaller shapes (CI smoke run)

Peers: the XLA-compiled composite (tf.function(jit_compile=True)), the plain tf.function composite,
the eager composite, torch.nn.functional.kl_div when PyTorch is installed, and NumPy. Every time is
the median of repeated calls in this one process; compare ratios, not absolute times.

fwd+bwd is the loss and its gradient w.r.t. y_pred with an upstream gradient that depends on the
loss (exp(-loss)), so the backward pass cannot start before the forward pass ends.
"""

import argparse
import csv
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tf_kld  # noqa: E402
from tensorflow.python.eager import context  # noqa: E402

SHAPES = [(4096, 4096), (1_000_000, 16), (32, 131072), (64, 1_000_000), (8, 10)]
QUICK_SHAPES = [(1024, 1024), (100_000, 16), (8, 10)]
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _composite(t, p):
    return tf_kld.reference.composite(t, p, tf_kld.reference.epsilon(p.dtype))


def _fused(t, p):
    with tf_kld.implementation("custom"):
        return tf_kld.kl_divergence(t, p)


def _with_grad(loss_fn):
    def fn(t, p):
        with tf.GradientTape() as tape:
            tape.watch(p)
            loss = loss_fn(t, p)
        return loss, tape.gradient(loss, p, output_gradients=tf.exp(-loss))
    return fn


def tf_peers():
    peers = {}
    if tf_kld.custom_op_loaded():
        peers["tf_kld"] = (tf.function(_fused), tf.function(_with_grad(_fused)))
    peers["XLA composite"] = (tf.function(_composite, jit_compile=True),
                              tf.function(_with_grad(_composite), jit_compile=True))
    peers["tf.function composite"] = (tf.function(_composite), tf.function(_with_grad(_composite)))
    peers["eager composite"] = (_composite, _with_grad(_composite))
    return peers


def torch_peer():
    try:
        import torch  # pylint: disable=import-outside-toplevel
    except ImportError:
        return None
    torch.set_num_threads(os.cpu_count() or 1)

    def fwd(t, p):
        tc, pc = t.clamp(1e-7, 1), p.clamp(1e-7, 1)
        return torch.nn.functional.kl_div(pc.log(), tc, reduction="none").sum(-1)

    def fwd_bwd(t, p):
        p = p.detach().requires_grad_(True)
        loss = fwd(t, p)
        loss.backward(torch.exp(-loss.detach()))
        return loss, p.grad

    return (lambda t, p: fwd(t, p), fwd_bwd), torch


def numpy_fwd(t, p):
    tc, pc = np.clip(t, 1e-7, 1), np.clip(p, 1e-7, 1)
    return np.sum(tc * np.log(tc / pc), axis=-1)


def numpy_fwd_bwd(t, p):
    tc, pc = np.clip(t, 1e-7, 1), np.clip(p, 1e-7, 1)
    loss = np.sum(tc * np.log(tc / pc), axis=-1)
    g = np.exp(-loss)[..., None] * (-tc / pc) * ((p >= 1e-7) & (p <= 1))
    return loss, g


def _block(result):
    """Waits for pending TensorFlow work without copying results (`.numpy()` would copy them, which
    costs as much as the gradient itself at large shapes). Torch and NumPy on the CPU are synchronous."""
    del result
    context.async_wait()


def median_time(fn, args, budget):
    _block(fn(*args))  # warm-up: trace, compile, allocate
    times = []
    deadline = time.perf_counter() + budget
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 200):
        start = time.perf_counter()
        _block(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def read_bandwidth(nbytes):
    """GB/s of a full read of `nbytes` (a float32 sum), the bar a memory-bound kernel is held to."""
    x = tf.ones([nbytes // 4], tf.float32)
    fn = tf.function(lambda v: tf.reduce_sum(v))
    return nbytes / median_time(fn, (x,), 1.0) / 1e9


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, short runs")
    parser.add_argument("--budget", type=float, default=None, help="seconds per measurement")
    parser.add_argument("--out", default=RESULTS, help="directory for results.{csv,json,png}")
    args = parser.parse_args(argv)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    budget = args.budget or (0.3 if args.quick else 1.0)

    print(f"TensorFlow {tf.__version__}; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores; custom op loaded: {tf_kld.custom_op_loaded()}")
    bandwidth = read_bandwidth(256 << 20)
    print(f"measured read bandwidth (tf.reduce_sum over 256 MiB): {bandwidth:.1f} GB/s\n")

    peers = tf_peers()
    torch_fns = torch_peer()
    rows = []
    for shape in shapes:
        rng = np.random.default_rng(0)
        t_np = rng.uniform(0, 1, shape).astype(np.float32)
        p_np = rng.uniform(0, 1, shape).astype(np.float32)
        t, p = tf.constant(t_np), tf.constant(p_np)
        n = t_np.size
        candidates = {name: fns for name, fns in peers.items()}
        if torch_fns is not None:
            (torch_fwd, torch_fwd_bwd), torch = torch_fns
            candidates["torch kl_div"] = (torch_fwd, torch_fwd_bwd)
        candidates["numpy"] = (numpy_fwd, numpy_fwd_bwd)
        for mode, index, nbytes in (("fwd", 0, 8 * n), ("fwd+bwd", 1, 20 * n)):
            for name, fns in candidates.items():
                if name == "torch kl_div":
                    inputs = (torch.from_numpy(t_np), torch.from_numpy(p_np))
                elif name == "numpy":
                    inputs = (t_np, p_np)
                else:
                    inputs = (t, p)
                print(f"  {shape[0]}x{shape[1]} {mode:8s} {name:22s}", end="", flush=True)
                seconds = median_time(fns[index], inputs, budget)
                print(f" {seconds * 1e3:10.3f} ms", flush=True)
                rows.append({"shape": f"{shape[0]}x{shape[1]}", "mode": mode, "impl": name,
                             "ms": seconds * 1e3, "gb_s": nbytes / seconds / 1e9})
    _report(rows, bandwidth, args.out)


def _report(rows, bandwidth, out):
    ref = {(r["shape"], r["mode"]): r["ms"] for r in rows if r["impl"] == "tf_kld"}
    for r in rows:
        base = ref.get((r["shape"], r["mode"]))
        r["speedup_of_tf_kld"] = r["ms"] / base if base else None
    print(f"\n{'shape':>14} {'mode':8} {'implementation':22} {'ms':>10} {'GB/s':>7} "
          f"{'tf_kld is x faster':>18}")
    for r in rows:
        speed = f"{r['speedup_of_tf_kld']:.2f}x" if r["speedup_of_tf_kld"] else "-"
        print(f"{r['shape']:>14} {r['mode']:8} {r['impl']:22} {r['ms']:10.3f} {r['gb_s']:7.2f} "
              f"{speed:>18}")
    print(f"\n(GB/s counts input reads and output writes; the machine's measured read bandwidth is "
          f"{bandwidth:.1f} GB/s.)")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"read_bandwidth_gb_s": bandwidth, "tensorflow": tf.__version__,
                   "cores": os.cpu_count(), "rows": rows}, f, indent=1)
    _plot(rows, os.path.join(out, "results.png"))
    print(f"results written to {out}/results.{{csv,json,png}}")


def _plot(rows, path):
    try:
        import matplotlib  # pylint: disable=import-outside-toplevel
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    except ImportError:
        print("(matplotlib not installed: no plot)")
        return
    modes = ["fwd", "fwd+bwd"]
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), sharey=True)
    width = 0.8 / len(impls)
    for ax, mode in zip(axes, modes):
        for i, impl in enumerate(impls):
            vals = [next((r["speedup_of_tf_kld"] or 0 for r in rows if r["shape"] == s and
                          r["mode"] == mode and r["impl"] == impl), 0) for s in shapes]
            ax.bar(np.arange(len(shapes)) + i * width, vals, width, label=impl)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_xticks(np.arange(len(shapes)) + 0.4 - width / 2, shapes, rotation=15)
        ax.set_title(f"{mode}: time relative to tf_kld (higher = tf_kld faster)")
    axes[0].set_ylabel("time / tf_kld time")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
