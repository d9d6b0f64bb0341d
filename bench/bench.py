"""Benchmark: tf_kld against every peer, forward and forward+backward, as ratios from one run.

    python bench/bench.py              # all shapes, tables + bench/out/results.{csv,json,md,png}
    python bench/bench.py --quick      # fewer repetitions, smaller shapes (CI smoke run)

Peers: the XLA-compiled composite (tf.function(jit_compile=True)), the plain tf.function composite,
the eager composite, torch.nn.functional.kl_div when PyTorch is installed, and NumPy. Times are
medians of calls interleaved round by round between the peers in this one process, so a slow
spell of a noisy machine hits every peer alike; compare ratios, not absolute times.

fwd+bwd is the loss and its gradient w.r.t. y_pred with an upstream gradient that depends on the
loss (exp(-loss)), so the backward pass cannot start before the forward pass ends.

Also measured: peak memory per path, each in a fresh process (VmHWM after /proc/self/clear_refs,
once the inputs exist and the function is traced, with glibc's mmap threshold fixed so freed
buffers leave the resident set); tf_kld's time per element in float16 and bfloat16 against
float32; and the targets of the speed issue, each marked met or not.
"""

import argparse
import csv
import json
import os
import platform
import re
import resource
import statistics
import subprocess
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
MEMORY_SHAPES = [(4096, 4096), (1_000_000, 16)]
QUICK_MEMORY_SHAPES = [(1024, 1024)]
DTYPE_SHAPE, QUICK_DTYPE_SHAPE = (4096, 4096), (1024, 1024)
SMALL = (8, 10)  # latency, not throughput: held to "no slower than the composite"
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")  # untracked


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


def _call(fn, args):
    start = time.perf_counter()
    _block(fn(*args))
    return time.perf_counter() - start


def median_time(fn, args, budget):
    return interleaved_medians({"": (fn, args)}, budget)[""]


def interleaved_medians(calls, budget, max_samples=5000):
    """{name: median seconds} of calls {name: (fn, args)} made round by round: each round calls every
    peer still sampling once. A peer samples until it has spent `budget` seconds (at least 3 calls)."""
    for fn, args in calls.values():
        _block(fn(*args))  # warm-up: trace, compile, allocate
    times = {name: [] for name in calls}
    active = list(calls)
    while active:
        for name in active:
            times[name].append(_call(*calls[name]))
        active = [n for n in active if len(times[n]) < 3 or
                  (sum(times[n]) < budget and len(times[n]) < max_samples)]
    return {name: statistics.median(t) for name, t in times.items()}


READ = "read both inputs"


@tf.function
def read_both(t, p):
    """The memory-bound floor of the forward pass: TensorFlow reading both inputs once."""
    return tf.reduce_sum(t) + tf.reduce_sum(p)


def read_bandwidth(nbytes):
    """GB/s of TensorFlow reading `nbytes` (two float32 tensors, as read_both does at each shape)."""
    t, p = tf.ones([nbytes // 8], tf.float32), tf.ones([nbytes // 8], tf.float32)
    return nbytes / median_time(read_both, (t, p), 1.0) / 1e9


def _inputs(shape, dtype=np.float32):
    rng = np.random.default_rng(0)
    return (rng.uniform(0, 1, shape).astype(dtype), rng.uniform(0, 1, shape).astype(dtype))


def _candidates():
    """{name: ((fwd, fwd_bwd), to_inputs)}: every path, and how it takes NumPy inputs."""
    def to_tf(t, p):
        return tf.constant(t), tf.constant(p)
    cands = {name: (fns, to_tf) for name, fns in tf_peers().items()}
    torch_fns = torch_peer()
    if torch_fns is not None:
        fns, torch = torch_fns
        cands["torch kl_div"] = (fns, lambda t, p: (torch.from_numpy(t), torch.from_numpy(p)))
    cands["numpy"] = ((numpy_fwd, numpy_fwd_bwd), lambda t, p: (t, p))
    return cands


MODES = (("fwd", 0, 8), ("fwd+bwd", 1, 20))  # (name, index in a path's pair, bytes per element)


def _status_kib(field):
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+)", f.read(), re.M).group(1))


def _peak_extra_bytes(fn, args):
    """Peak resident bytes of one call of fn beyond what existed before it (fn already warmed up)."""
    rss = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    result = fn(*args)
    _block(result)
    return (_status_kib("VmHWM") - rss) * 1024


@tf.function
def _allocate_like(x):
    return x + 1.0  # one new buffer of x's size


def measure_in_child(fn, args, calibration_shape):
    """A memory child's measurement, printed as one JSON line: peak resident bytes of one call of
    fn beyond what existed before it, and a calibration made the same way: a TensorFlow call that
    allocates one float32 buffer of calibration_shape must show up in full, or the allocator keeps
    freed memory (oneDNN's pooled CPU allocator does) and nothing measured here means anything."""
    known = tf.zeros(calibration_shape, tf.float32)
    _block(_allocate_like(known))  # warm-up, freed: a pooling allocator keeps it for the next call
    calibration = _peak_extra_bytes(_allocate_like, (known,))
    del known
    _block(fn(*args))  # trace/compile outside the measurement; its results are freed here
    print(json.dumps({"peak_extra_bytes": _peak_extra_bytes(fn, args),
                      "calibration_bytes": 4 * int(np.prod(calibration_shape)),
                      "calibration_seen_bytes": calibration}))


def memory_child(impl, shape, mode):
    """In a fresh process: the peak extra memory of one call of impl (calibrated by the gradient's size)."""
    fns, to_inputs = _candidates()[impl]
    fn = fns[[m[0] for m in MODES].index(mode)]
    measure_in_child(fn, to_inputs(*_inputs(shape)), shape)


# The environment each memory child runs in: glibc maps every large buffer when it is allocated and
# unmaps it when it is freed. Where the first child finds TensorFlow's allocator keeping freed
# memory, the measurement is repeated without oneDNN's allocator (TF_ENABLE_ONEDNN_OPTS=0), which
# returns it.
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072",
              "TF_CPP_MIN_LOG_LEVEL": "3"}
NOT_MEASURABLE = "not measurable here"
_POOLING_SEEN = []  # non-empty once a child found this environment's allocator pooling freed memory


def _limit_memory(gib):
    size = int(gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (size, size))


def peak_memory_in_child(script, child_args, limit_gib=None):
    """{"bytes": peak extra bytes or None, "note": how it was measured, or why not}, from
    `script --memory-child *child_args` run in a fresh process (which calls measure_in_child),
    optionally under an address-space limit of limit_gib."""
    attempts = [({}, "this process's allocator"),
                ({"TF_ENABLE_ONEDNN_OPTS": "0"}, "TF_ENABLE_ONEDNN_OPTS=0 (TensorFlow's allocator "
                                                 "pooled freed memory with oneDNN on)")]
    if _POOLING_SEEN:  # an earlier child's calibration already failed with this environment
        attempts = attempts[1:]
    for extra_env, note in attempts:
        env = dict(os.environ, **MEMORY_ENV, **extra_env)
        cmd = [sys.executable, os.path.abspath(script), "--memory-child", *child_args]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800, check=False,
                              preexec_fn=None if limit_gib is None else lambda: _limit_memory(limit_gib))
        lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
        if proc.returncode != 0 or not lines:
            last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]  # one line: tables
            return {"bytes": None, "note": f"the measurement failed: {last[-300:]}"}
        child = json.loads(lines[-1])
        if child["calibration_seen_bytes"] >= 0.9 * child["calibration_bytes"]:
            return {"bytes": child["peak_extra_bytes"], "note": note}
        if not extra_env:
            _POOLING_SEEN.append(True)
        if os.environ.get("TF_ENABLE_ONEDNN_OPTS") == "0":
            break  # the second attempt would change nothing
    return {"bytes": None, "note": (
        f"{NOT_MEASURABLE}: a known {child['calibration_bytes'] / 2**20:.1f} MiB allocation through "
        f"TensorFlow showed as {child['calibration_seen_bytes'] / 2**20:.2f} MiB (the allocator keeps "
        f"freed memory)")}


def peak_memory(impl, shape, mode):
    """{"bytes", "note"} of one call of impl in mode at shape (see peak_memory_in_child)."""
    return peak_memory_in_child(__file__, [impl, f"{shape[0]}x{shape[1]}", mode])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, short runs")
    parser.add_argument("--budget", type=float, default=None, help="seconds per measurement")
    parser.add_argument("--out", default=RESULTS, help="directory for results.{csv,json,md,png}")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    parser.add_argument("--memory-child", nargs=3, metavar=("IMPL", "SHAPE", "MODE"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        impl, shape, mode = args.memory_child
        return memory_child(impl, tuple(int(x) for x in shape.split("x")), mode)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    budget = args.budget or (0.3 if args.quick else 1.0)

    print(f"TensorFlow {tf.__version__}; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores; custom op loaded: {tf_kld.custom_op_loaded()}")
    bandwidth = read_bandwidth(256 << 20)
    print(f"measured read bandwidth (tf.reduce_sum over 256 MiB): {bandwidth:.1f} GB/s\n")

    cands = _candidates()
    rows = []
    for shape in shapes:
        t_np, p_np = _inputs(shape)
        converted = {}  # one copy per framework
        inputs = {name: converted.setdefault(to_inputs, to_inputs(t_np, p_np))
                  for name, (_, to_inputs) in cands.items()}
        for mode, index, per_element in MODES:
            print(f"  {shape[0]}x{shape[1]} {mode:8s} ...", end="", flush=True)
            calls = {name: (fns[index], inputs[name]) for name, (fns, _) in cands.items()}
            if mode == "fwd":  # the floor, timed in the same rounds: one read of both inputs
                calls[READ] = (read_both, inputs["XLA composite"])
            medians = interleaved_medians(calls, budget)
            print(" " + ", ".join(f"{name} {sec * 1e3:.3f} ms" for name, sec in medians.items()),
                  flush=True)
            floor = medians.pop(READ, None)
            for name, seconds in medians.items():
                row = {"shape": f"{shape[0]}x{shape[1]}", "mode": mode, "impl": name,
                       "ms": seconds * 1e3, "gb_s": per_element * t_np.size / seconds / 1e9,
                       "read_floor_gb_s": None}
                if floor is not None:
                    row["read_floor_gb_s"] = 8 * t_np.size / floor / 1e9
                rows.append(row)
        del inputs, converted

    memory = []
    if not args.no_memory:
        for shape in (QUICK_MEMORY_SHAPES if args.quick else MEMORY_SHAPES):
            for mode, _, _ in MODES:
                for name in cands:
                    print(f"  peak memory {shape[0]}x{shape[1]} {mode:8s} {name:22s}", end="",
                          flush=True)
                    measured = peak_memory(name, shape, mode)
                    extra, grad_bytes = measured["bytes"], 4 * shape[0] * shape[1]
                    print(f" {extra / 2**20:9.1f} MiB" if extra is not None else
                          f" {measured['note']}", flush=True)
                    memory.append({"shape": f"{shape[0]}x{shape[1]}", "mode": mode, "impl": name,
                                   "peak_extra_mib": None if extra is None else extra / 2**20,
                                   "x_gradient_buffer": None if extra is None else extra / grad_bytes,
                                   "measured_with": measured["note"]})

    dtypes = []
    if tf_kld.custom_op_loaded():
        shape = QUICK_DTYPE_SHAPE if args.quick else DTYPE_SHAPE
        fns = tf_peers()["tf_kld"]
        for mode, index, _ in MODES:
            calls = {}
            for dtype in ("float32", "float16", "bfloat16"):
                t, p = (tf.cast(tf.constant(x), dtype) for x in _inputs(shape))
                calls[dtype] = (fns[index], (t, p))
            medians = interleaved_medians(calls, budget)
            for dtype, seconds in medians.items():
                dtypes.append({"shape": f"{shape[0]}x{shape[1]}", "mode": mode, "dtype": dtype,
                               "ns_per_element": seconds * 1e9 / (shape[0] * shape[1]),
                               "x_float32_time": seconds / medians["float32"]})
    _report(rows, memory, dtypes, bandwidth, args.out)
    return 0


def _targets(rows, memory, dtypes, bandwidth):
    """The speed issue's targets, each with the measured value and whether it is met."""
    ms = {(r["shape"], r["mode"], r["impl"]): r["ms"] for r in rows}
    out = []
    small = f"{SMALL[0]}x{SMALL[1]}"
    for (shape, mode, impl), t in sorted(ms.items()):
        if impl != "tf_kld":
            continue
        for peer, bar in (("XLA composite", 1.5), ("tf.function composite", 5.0)):
            if (shape, mode, peer) not in ms:
                continue
            ratio = ms[(shape, mode, peer)] / t
            need = 1.0 if shape == small else bar
            out.append({"target": f"{mode} {shape}: >= {need:g}x {peer}", "value": ratio,
                        "met": ratio >= need})
    for r in rows:
        if r["impl"] == "tf_kld" and r["mode"] == "fwd" and r["shape"] != small:
            frac = r["gb_s"] / r["read_floor_gb_s"]
            out.append({"target": f"fwd {r['shape']}: >= 70% of the read bandwidth (reading both "
                                  f"inputs, timed alongside)", "value": frac, "met": frac >= 0.7})
    for m in memory:
        if m["impl"] == "tf_kld" and m["mode"] == "fwd+bwd":
            value = m["x_gradient_buffer"]  # None: not measurable here, never "met"
            out.append({"target": f"fwd+bwd {m['shape']}: peak extra <= 1.1x gradient buffer",
                        "value": value, "met": value is not None and value <= 1.1})
    for d in dtypes:
        if d["dtype"] != "float32":
            out.append({"target": f"{d['mode']} {d['shape']} {d['dtype']}: time per element <= float32's",
                        "value": d["x_float32_time"], "met": d["x_float32_time"] <= 1.0})
    return out


def _verdict(target):
    if target["value"] is None:
        return "n/a"
    return "met" if target["met"] else "MISSED"


def _value(target):
    return NOT_MEASURABLE if target["value"] is None else f"{target['value']:.3f}"


def _report(rows, memory, dtypes, bandwidth, out):
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
    print(f"\n(GB/s counts input reads and output writes; reading 256 MiB measured "
          f"{bandwidth:.1f} GB/s at the start.)")
    for r in rows:
        if r["impl"] == "tf_kld" and r["read_floor_gb_s"]:
            print(f"fwd {r['shape']}: tf_kld {r['gb_s']:.1f} GB/s, reading both inputs (timed "
                  f"alongside) {r['read_floor_gb_s']:.1f} GB/s")
    if memory:
        print(f"\n{'shape':>14} {'mode':8} {'implementation':22} {'peak extra MiB':>15} "
              f"{'x gradient buffer':>18}")
        for m in memory:
            if m["peak_extra_mib"] is None:
                print(f"{m['shape']:>14} {m['mode']:8} {m['impl']:22} {m['measured_with']}")
                continue
            print(f"{m['shape']:>14} {m['mode']:8} {m['impl']:22} {m['peak_extra_mib']:15.1f} "
                  f"{m['x_gradient_buffer']:18.2f}")
        print("(peak resident memory of one call beyond the inputs, in a fresh process; the outputs"
              " count: fwd+bwd returns the gradient and the loss)")
        for note in dict.fromkeys(m["measured_with"] for m in memory if m["peak_extra_mib"] is not None):
            print(f"(measured with {note})")
    if dtypes:
        print(f"\n{'shape':>14} {'mode':8} {'dtype':10} {'ns/element':>11} {'x float32 time':>15}")
        for d in dtypes:
            print(f"{d['shape']:>14} {d['mode']:8} {d['dtype']:10} {d['ns_per_element']:11.3f} "
                  f"{d['x_float32_time']:15.2f}")
    targets = _targets(rows, memory, dtypes, bandwidth)
    print("\ntargets of the speed issue (measured in this run):")
    for t in targets:
        print(f"  [{_verdict(t):6}] {t['target']}: {_value(t)}")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"read_bandwidth_gb_s": bandwidth, "tensorflow": tf.__version__,
                   "cores": os.cpu_count(), "cpu_isa": tf_kld.ops.cpu_isa() if
                   tf_kld.custom_op_loaded() else None, "rows": rows, "peak_memory": memory,
                   "dtypes": dtypes, "targets": targets}, f, indent=1)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(_markdown(rows, memory, dtypes, targets, bandwidth))
    _plot(rows, os.path.join(out, "results.png"))
    print(f"results written to {out}/results.{{csv,json,md,png}}")


def _markdown(rows, memory, dtypes, targets, bandwidth):
    """The README's tables, from this run."""
    peers = [i for i in dict.fromkeys(r["impl"] for r in rows) if i != "tf_kld"]
    ms = {(r["shape"], r["mode"], r["impl"]): r for r in rows}
    lines = [f"Reading 256 MiB: {bandwidth:.1f} GB/s. \"vs X\" is X's time / tf_kld's; \"read GB/s\" "
             "is TensorFlow reading both inputs, timed alongside.", "",
             "| shape | mode | tf_kld ms | tf_kld GB/s | read GB/s | "
             + " | ".join(f"vs {p}" for p in peers) + " |",
             "|---|---|---:|---:|---:|" + "---:|" * len(peers)]
    for (shape, mode, impl), r in ms.items():
        if impl == "tf_kld":
            ratios = [f"{ms[(shape, mode, p)]['speedup_of_tf_kld']:.2f}x" if (shape, mode, p) in ms
                      else "-" for p in peers]
            floor = f"{r['read_floor_gb_s']:.1f}" if r["read_floor_gb_s"] else "-"
            lines.append(f"| {shape} | {mode} | {r['ms']:.2f} | {r['gb_s']:.1f} | {floor} | "
                         + " | ".join(ratios) + " |")
    if memory:
        lines += ["", "| shape | mode | implementation | peak extra MiB | x gradient buffer |",
                  "|---|---|---|---:|---:|"]
        lines += [f"| {m['shape']} | {m['mode']} | {m['impl']} | {m['peak_extra_mib']:.1f} | "
                  f"{m['x_gradient_buffer']:.2f} |" if m["peak_extra_mib"] is not None else
                  f"| {m['shape']} | {m['mode']} | {m['impl']} | - | {m['measured_with']} |"
                  for m in memory]
        notes = dict.fromkeys(m["measured_with"] for m in memory if m["peak_extra_mib"] is not None)
        lines += [""] + [f"Peak memory measured with {n}." for n in notes]
    if dtypes:
        lines += ["", "| shape | mode | dtype | tf_kld ns/element | x float32 time |",
                  "|---|---|---|---:|---:|"]
        lines += [f"| {d['shape']} | {d['mode']} | {d['dtype']} | {d['ns_per_element']:.3f} | "
                  f"{d['x_float32_time']:.2f} |" for d in dtypes]
    lines += ["", "| target | measured | |", "|---|---:|---|"]
    lines += [f"| {t['target']} | {_value(t)} | {_verdict(t).lower()} |" for t in targets]
    return "\n".join(lines) + "\n"


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
    sys.exit(main())
