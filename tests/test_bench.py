"""The benchmark runs end to end and writes its results (a smoke test: nothing here is timed)."""

import json
import os
import subprocess
import sys

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "bench.py")


def test_quick_benchmark_writes_every_result(tmp_path, require_custom):
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, BENCH, "--quick", "--budget", "0.01", "--no-memory", "--out", str(out)],
        capture_output=True, text=True, timeout=600, check=False,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "targets of the speed issue" in proc.stdout
    with open(out / "results.json") as f:
        results = json.load(f)
    seen = {(r["shape"], r["mode"], r["impl"]) for r in results["rows"]}
    for shape in ("1024x1024", "100000x16", "8x10"):
        for mode in ("fwd", "fwd+bwd"):
            for impl in ("tf_kld", "XLA composite", "tf.function composite", "eager composite", "numpy"):
                assert (shape, mode, impl) in seen
    assert all(r["ms"] > 0 and r["speedup_of_tf_kld"] > 0 for r in results["rows"])
    assert {d["dtype"] for d in results["dtypes"]} == {"float32", "float16", "bfloat16"}
    assert results["targets"] and all(isinstance(t["met"], bool) for t in results["targets"])
    markdown = (out / "results.md").read_text()
    assert "| shape | mode | tf_kld ms |" in markdown and "| target | measured |" in markdown
    assert (out / "results.csv").stat().st_size > 0
    assert (out / "results.png").exists() or "matplotlib not installed" in proc.stdout


def test_linear_benchmark_runs(tmp_path):
    out = tmp_path / "results"
    script = os.path.join(os.path.dirname(BENCH), "linear_bench.py")
    proc = subprocess.run(
        [sys.executable, script, "--shapes", "64x16x1000", "--budget", "0.01", "--no-memory",
         "--out", str(out)], capture_output=True, text=True, timeout=600, check=False,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "linear.json") as f:
        rows = json.load(f)["rows"]
    impls = {r["impl"] for r in rows}
    assert {"tf_kld fused linear", "keras XLA", "keras tf.function"} <= impls, impls
    assert all(r["ms"] > 0 and r["time_x_tf_kld"] > 0 for r in rows)
    assert "| shape (rows x H x V) |" in (out / "linear.md").read_text()


def test_distillation_benchmark_reports_every_target(tmp_path, require_custom):
    out = tmp_path / "results"
    script = os.path.join(os.path.dirname(BENCH), "distill_bench.py")
    proc = subprocess.run([sys.executable, script, "--quick", "--budget", "0.01", "--no-memory",
                           "--out", str(out)],
                          capture_output=True, text=True, timeout=900, check=False,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "distill_results.json") as f:
        results = json.load(f)
    peers = {(r["shape"], r["dtype"], r["mode"], r["peer"]) for r in results["rows"]}
    for shape in ("256x32000", "8192x10"):
        for dtype in ("float32", "bfloat16"):
            for mode in ("fwd", "fwd+bwd"):
                assert (shape, dtype, mode, "tf_kld") in peers
                assert (shape, dtype, mode, "(b) log-softmax composite, XLA") in peers
    targets = {t["target"]: t for t in results["targets"]}
    assert any("read floor" in t for t in targets) and any("8x (a) under tf.function" in t for t in targets)
    assert any("8192x10" in t and ">= 1.5x" in t for t in targets)
    assert all(isinstance(t["met"], bool) for t in targets.values())
    assert "| target | measured |" in (out / "distill_results.md").read_text()
