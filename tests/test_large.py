"""int64 indexing: more than 2^31 elements through the custom op, forward and gradient
(tests/_large_worker.py, in a subprocess: ~12 GiB peak, a minute or two on 2 cores)."""

import json
import os
import subprocess
import sys

import pytest

import tf_kld

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
IMPORT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(tf_kld.__file__)))
NEEDS_GIB = 13.5  # the worker's peak RSS (measured 12.6 GiB) plus headroom


def _available_gib():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2 ** 20
    return 0.0


@pytest.mark.slow
def test_more_than_2_31_elements(require_custom):
    available = _available_gib()
    if available < NEEDS_GIB:
        pytest.skip(f"needs {NEEDS_GIB} GiB of available memory, this machine has {available:.1f} GiB")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("TF_KLD_IMPL", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [IMPORT_ROOT, env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, os.path.join(TESTS_DIR, "_large_worker.py")], env=env,
                          cwd=TESTS_DIR, capture_output=True, text=True, timeout=1200)
    tail = f"stdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-6000:]}"
    assert proc.returncode >= 0, (f"the worker was killed by signal {-proc.returncode} (out of "
                                  f"memory?)\n{tail}")
    assert proc.returncode == 0, f"the worker failed (exit {proc.returncode})\n{tail}"
    line = [x for x in proc.stdout.splitlines() if x.startswith("LARGE ")]
    assert line, tail
    out = json.loads(line[-1][len("LARGE "):])
    assert out["elements"] > 2 ** 31 and out["rows_checked"] > 60000 and out["cols_grad_checked"] > 60000
    print(f"\n{out}")
