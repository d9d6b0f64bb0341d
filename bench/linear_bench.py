"""Benchmark: tf_kld.linear_distillation_loss against the materialised paths users write.

    python bench/linear_bench.py            # quick shapes (run.sh): ratios and peak memory
    python bench/linear_bench.py --full     # the issue's shapes: (2048, 256, 128256),
                                            # (4096, 512, 32000), (512, 256, 262144), float32 + bfloat16
    python bench/linear_bench.py --too-big  # also rows=16384 at V=128256 under a 20 GiB memory limit

One step = the loss and its gradients w.r.t. the student's hidden states, kernel and bias. Peers:
"keras XLA" / "keras tf.function": the logits materialised (`h @ W + b`), then
`keras.losses.kl_divergence(softmax(t / T), softmax(s / T))` averaged; "tf_kld logits": the logits
materialised, then `tf_kld.kl_divergence_with_logits` (where this tf_kld has it). Times are medians of
calls interleaved between the peers in one process; peak memory is bench.py's calibrated fresh-process
measurement (VmHWM beyond the inputs, oneDNN's pooling allocator avoided).
"""

import argparse
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import bench  # noqa: E402  (timing and memory helpers)
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tf_kld  # noqa: E402

QUICK = [(512, 128, 128256)]
FULL = [(2048, 256, 128256), (4096, 512, 32000), (512, 256, 262144)]
TOO_BIG = (16384, 256, 128256)
TEMPERATURE = 2.0
OURS = "tf_kld fused linear"


def _materialised(loss_of_logits):
    def step(hs, ws, bs, ht, wt, bt):
        with tf.GradientTape() as tape:
            tape.watch([hs, ws, bs])
            s = tf.matmul(hs, ws) + bs
            t = tf.matmul(ht, wt) + bt
            loss = tf.reduce_mean(loss_of_logits(tf.cast(t, tf.float32), tf.cast(s, tf.float32)))
        return loss, tape.gradient(loss, [hs, ws, bs])
    return step


def _keras_loss(t, s):
    return keras.losses.kl_divergence(tf.nn.softmax(t / TEMPERATURE), tf.nn.softmax(s / TEMPERATURE))


def _fused(hs, ws, bs, ht, wt, bt):
    with tf.GradientTape() as tape:
        tape.watch([hs, ws, bs])
        loss = tf_kld.linear_distillation_loss(hs, ws, ht, wt, student_bias=bs, teacher_bias=bt,
                                               temperature=TEMPERATURE)
    return loss, tape.gradient(loss, [hs, ws, bs])


def peers():
    out = {OURS: tf.function(_fused),
           "keras XLA": tf.function(_materialised(_keras_loss), jit_compile=True),
           "keras tf.function": tf.function(_materialised(_keras_loss))}
    with_logits = getattr(tf_kld, "kl_divergence_with_logits", None)
    if with_logits is not None:
        out["tf_kld logits"] = tf.function(_materialised(
            lambda t, s: with_logits(t, s, temperature=TEMPERATURE)))
    return out


def inputs(shape, dtype):
    rows, hidden, classes = shape
    rng = np.random.default_rng(0)
    x = [rng.normal(size=(rows, hidden)), rng.normal(size=(hidden, classes)) / np.sqrt(hidden),
         rng.normal(size=(classes,)) * 0.1, rng.normal(size=(rows, hidden)),
         rng.normal(size=(hidden, classes)) / np.sqrt(hidden), rng.normal(size=(classes,)) * 0.1]
    return [tf.cast(tf.constant(v, tf.float32), dtype) for v in x]


def memory_child(peer, shape, dtype):
    bench.measure_in_child(peers()[peer], inputs(shape, dtype), shape[1:])  # calibration: the kernel gradient


def peak(peer, shape, dtype, limit_gib=None):
    """{"bytes", "note"} as bench.peak_memory, in a fresh process (optionally under a memory limit)."""
    return bench.peak_memory_in_child(__file__, [peer, "x".join(map(str, shape)), dtype], limit_gib)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="the issue's shapes, float32 and bfloat16")
    parser.add_argument("--too-big", action="store_true", help="also rows=16384 at V=128256")
    parser.add_argument("--shapes", help="ROWSxHxV[,ROWSxHxV...] instead of the quick shapes")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    parser.add_argument("--budget", type=float, default=None, help="seconds per measurement")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    parser.add_argument("--memory-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        peer, shape, dtype = args.memory_child
        return memory_child(peer, tuple(int(v) for v in shape.split("x")), dtype)
    shapes = FULL if args.full else QUICK
    if args.shapes:
        shapes = [tuple(int(v) for v in item.split("x")) for item in args.shapes.split(",")]
    dtypes = ["float32", "bfloat16"] if args.full else ["float32"]
    budget = args.budget or (3.0 if args.full else 1.0)
    rows = []
    print(f"fused linear + KL (T = {TEMPERATURE}), one step = loss + student gradients; "
          f"TensorFlow {tf.__version__}, {os.cpu_count()} cores")
    for shape in shapes:
        for dtype in dtypes:
            args_in = inputs(shape, dtype)
            calls = {name: (fn, args_in) for name, fn in peers().items()}
            medians = bench.interleaved_medians(calls, budget, max_samples=50)
            for name, seconds in medians.items():
                mem = ({"bytes": None, "note": "not measured"} if args.no_memory else
                       peak(name, shape, dtype))
                rows.append({"shape": "x".join(map(str, shape)), "dtype": dtype, "impl": name,
                             "ms": seconds * 1e3, "peak_extra_mib": None if mem["bytes"] is None
                             else mem["bytes"] / 2**20, "memory_note": mem["note"]})
                r = rows[-1]
                mib = f"{r['peak_extra_mib']:9.1f} MiB" if r["peak_extra_mib"] is not None else r["memory_note"]
                print(f"  {r['shape']:>18} {dtype:9} {name:20} {r['ms']:10.1f} ms  {mib}", flush=True)
            del args_in, calls
    if args.too_big:
        for name in (OURS, "keras XLA"):
            mem = peak(name, TOO_BIG, "float32", limit_gib=20)
            rows.append({"shape": "x".join(map(str, TOO_BIG)), "dtype": "float32", "impl": name,
                         "ms": None, "peak_extra_mib": None if mem["bytes"] is None else
                         mem["bytes"] / 2**20, "memory_note": mem["note"] + " (20 GiB limit)"})
            print(f"  {rows[-1]['shape']:>18} float32   {name:20} {rows[-1]['memory_note']} "
                  f"{rows[-1]['peak_extra_mib']}", flush=True)
    _report(rows, args.out)
    return 0


def _targets(rows):
    """The issue's targets per (shape, dtype): peak memory <= 1/10 of each materialised Keras path's
    at V >= 128256 (1/4 below), <= 1/2 of the materialised tf_kld path's; step time <= 1.1x the
    materialised tf_kld path's and below the Keras XLA path's. met None: not measured."""
    out = []
    by = {}
    for r in rows:
        by.setdefault((r["shape"], r["dtype"]), {})[r["impl"]] = r
    for (shape, dtype), peers_ in by.items():
        ours = peers_.get(OURS)
        if ours is None or ours["ms"] is None:
            continue
        classes = int(shape.split("x")[2])
        keras_bound = 0.1 if classes >= 128256 else 0.25
        checks = [(name, f"memory <= {bound:g}x of {name}", "memory", bound)
                  for name, bound in (("keras XLA", keras_bound), ("keras tf.function", keras_bound),
                                      ("tf_kld logits", 0.5))]
        checks += [("tf_kld logits", "time <= 1.1x of tf_kld logits", "time", 1.1),
                   ("keras XLA", "time < keras XLA", "time", 1.0)]
        for name, text, kind, bound in checks:
            peer = peers_.get(name)
            if peer is None:
                continue
            if kind == "memory":
                value = peer.get("tf_kld_memory_fraction")
                measured = "-" if value is None else f"{value:.3f}x"
                met = None if value is None else value <= bound
            else:
                value = ours["ms"] / peer["ms"] if peer["ms"] else None
                measured = "-" if value is None else f"{value:.2f}x"
                met = None if value is None else (value <= bound if bound > 1 else value < bound)
            out.append({"shape": shape, "dtype": dtype, "target": text, "measured": measured,
                        "met": met})
    return out


def _report(rows, out):
    ours = {(r["shape"], r["dtype"]): r for r in rows if r["impl"] == OURS}
    lines = ["| shape (rows x H x V) | dtype | peer | ms | x tf_kld time | peak extra MiB | "
             "tf_kld memory / peer's |", "|---|---|---|---:|---:|---:|---:|"]
    print("\nfused linear: ratios against each peer (time: peer / tf_kld; memory: tf_kld / peer)")
    for r in rows:
        mine = ours.get((r["shape"], r["dtype"]))
        speed = r["ms"] / mine["ms"] if mine and r["ms"] and mine["ms"] else None
        mem = (mine["peak_extra_mib"] / r["peak_extra_mib"] if mine and mine["peak_extra_mib"]
               and r["peak_extra_mib"] else None)
        r["time_x_tf_kld"], r["tf_kld_memory_fraction"] = speed, mem
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        lines.append(f"| {r['shape']} | {r['dtype']} | {r['impl']} | {fmt(r['ms'], '.1f')} | "
                     f"{fmt(speed, '.2f')} | "
                     f"{fmt(r['peak_extra_mib'], '.1f') if r['peak_extra_mib'] is not None else r['memory_note']} | "
                     f"{fmt(mem, '.3f')} |")
    targets = _targets(rows)
    lines += ["", "| shape | dtype | target | measured | met |", "|---|---|---|---:|---|"]
    lines += [f"| {t['shape']} | {t['dtype']} | {t['target']} | {t['measured']} | "
              f"{'yes' if t['met'] else 'no' if t['met'] is not None else '-'} |" for t in targets]
    print("\n".join(lines))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "linear.json"), "w") as f:
        json.dump({"tensorflow": tf.__version__, "rows": rows, "targets": targets}, f, indent=1)
    with open(os.path.join(out, "linear.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"results written to {out}/linear.{{json,md}}")


if __name__ == "__main__":
    sys.exit(main())
