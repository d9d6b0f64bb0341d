"""Property-based fuzz (tests/_fuzz_worker.py, hypothesis) of the custom op against the reference,
in a subprocess: a crash (a signal) fails this test with the worker's stderr instead of killing
pytest. Derandomized, so every run tries the same examples."""

import json
import os
import subprocess
import sys

import tf_kld

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
IMPORT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(tf_kld.__file__)))
EXAMPLES = 400


def test_fuzz_custom_matches_reference(require_custom):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("TF_KLD_IMPL", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [IMPORT_ROOT, env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, os.path.join(TESTS_DIR, "_fuzz_worker.py"),
                           "--examples", str(EXAMPLES)], env=env, cwd=TESTS_DIR,
                          capture_output=True, text=True, timeout=900)
    tail = f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-6000:]}"
    assert proc.returncode >= 0, f"the fuzz worker crashed with signal {-proc.returncode}\n{tail}"
    assert proc.returncode == 0, f"the fuzz worker failed (exit {proc.returncode})\n{tail}"
    lines = [x for x in proc.stdout.splitlines() if x.startswith("FUZZ ")]
    assert lines, tail
    counts = json.loads(lines[-1][len("FUZZ "):])
    assert counts["examples"] == EXAMPLES, counts
    assert counts["agreed"] > EXAMPLES // 2 and counts["both_raised"] > 0, counts
    for key in ("mode_eager", "mode_graph_unknown_rank", "mode_graph_unknown_dims", "shapes_broadcast",
                "shapes_incompatible", "shapes_rank0", "with_nan", "with_inf", "with_zero_size",
                "y_true_list", "y_true_int32"):
        assert counts.get(key, 0) > 0, (key, counts)
    for dtype in ("float16", "bfloat16", "float32", "float64"):
        assert counts.get(f"y_pred_{dtype}", 0) > 0, (dtype, counts)
