"""A missing or broken op library: one clear warning at import, the reference path still works,
implementation("custom") raises. Each case needs a fresh interpreter; both run concurrently."""

import json
import os
import subprocess
import sys

import pytest

import _util as U

import tf_kld

# The directory this process imports tf_kld from (a checkout, site-packages or Bazel runfiles).
IMPORT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(tf_kld.__file__)))

_SCRIPT = r"""
import json, warnings
import keras, tensorflow as tf  # imported first: only tf_kld's own warnings are recorded below
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import tf_kld
out = {"warnings": [[w.category.__name__, str(w.message)] for w in caught]}
""" + U.LOADER_PROBE


def _env(library):
    env = dict(os.environ, TF_KLD_LIBRARY=library, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("TF_KLD_IMPL", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [IMPORT_ROOT, env.get("PYTHONPATH")]))
    return env


@pytest.fixture(scope="module")
def bad_libraries(tmp_path_factory):
    """Runs the import script under each broken library, concurrently; {case: (library, proc, out)}."""
    not_a_library = tmp_path_factory.mktemp("lib") / "x.so"
    not_a_library.write_text("this is not a shared library\n")
    cases = {"missing": "/nonexistent/_kld_ops.so", "not_a_library": str(not_a_library)}
    procs = {case: subprocess.Popen([sys.executable, "-c", _SCRIPT], env=_env(lib),
                                    cwd=str(not_a_library.parent), stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
             for case, lib in cases.items()}
    results = {}
    for case, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        line = [x for x in stdout.splitlines() if x.startswith("RESULT ")]
        out = json.loads(line[-1][len("RESULT "):]) if line else None
        results[case] = (cases[case], proc.returncode, stderr, out)
    return results


@pytest.mark.parametrize("case, cause", [("missing", "does not exist"),
                                         ("not_a_library", "could not be loaded")])
def test_broken_library(bad_libraries, case, cause):
    library, returncode, stderr, out = bad_libraries[case]
    assert returncode == 0 and out is not None, f"subprocess failed:\n{stderr[-3000:]}"
    assert "Traceback" not in stderr, stderr[-3000:]
    assert len(out["warnings"]) == 1, out["warnings"]
    category, message = out["warnings"][0]
    assert category == "RuntimeWarning"
    assert message.startswith("tf_kld:")
    assert library in message and cause in message, message
    assert out["loaded"] is False
    assert out["loss"] == pytest.approx(0.11891246, rel=1e-6)
    assert "Log" in out["ops"] and not any(op.startswith("TfKld>") for op in out["ops"])
    err = out["custom_error"]
    assert err is not None, "implementation('custom') must raise RuntimeError without the library"
    assert err.startswith("tf_kld:") and "custom" in err and library in err, err
