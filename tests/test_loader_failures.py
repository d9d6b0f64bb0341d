"""More ways the op library can be broken, beyond test_loader.py's missing file and text file: built
for another TensorFlow (an undefined tensorflow symbol: a tiny library, and the real library with
one imported symbol renamed), for another architecture (wrong ELF class), an empty file, a directory,
and a library that loads but defines no tf_kld ops. Each gives one reason naming the path and the
cause; at import, one RuntimeWarning starting "tf_kld:", no traceback, the reference path, and a
clear RuntimeError under implementation("custom")."""

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import tensorflow as tf

import _util as U

import tf_kld
from tf_kld import ops as kld_ops

IMPORT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(tf_kld.__file__)))
# An undefined data symbol of the real library: data relocations are resolved at load time.
IMPORTED_SYMBOL = b"_ZN10tensorflow10DEVICE_CPUE"
RENAMED_SYMBOL = b"_ZN10tensorflaw10DEVICE_CPUE"
OTHER_VERSION = "2.99.9"

_UNDEFINED_SYMBOL_SOURCE = """
namespace tensorflow { void TfKldSymbolOfAnotherTensorFlow(); }
struct Init { Init() { tensorflow::TfKldSymbolOfAnotherTensorFlow(); } } init;
"""


def _compile(tmp, name, source):
    cxx = os.environ.get("CXX", "g++").split()
    if shutil.which(cxx[0]) is None:
        pytest.fail(f"building the {name} test library needs a C++ compiler ({cxx[0]})", pytrace=False)
    src, lib = tmp / f"{name}.cc", tmp / f"{name}.so"
    src.write_text(source)
    subprocess.run(cxx + ["-shared", "-fPIC", str(src), "-o", str(lib)], check=True)
    return str(lib)


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    """{case: path} of broken libraries."""
    tmp = tmp_path_factory.mktemp("broken_libs")
    real = kld_ops.library_path()
    if not os.path.exists(real):
        pytest.fail(f"needs the built library {real}", pytrace=False)
    data = open(real, "rb").read()
    cases = {
        "undefined_symbol": _compile(tmp, "undefined_symbol", _UNDEFINED_SYMBOL_SOURCE),
        "no_ops": _compile(tmp, "no_ops", "int tf_kld_test_nothing_here() { return 0; }\n"),
    }
    needle = b"\0" + IMPORTED_SYMBOL + b"\0"
    assert needle in data, f"{IMPORTED_SYMBOL!r} is no longer imported by {real}: pick another symbol"
    renamed = tmp / "renamed_symbol.so"
    renamed.write_bytes(data.replace(needle, b"\0" + RENAMED_SYMBOL + b"\0"))
    cases["renamed_symbol"] = str(renamed)
    # The real library, marked as built for another TensorFlow (the marker build_flags compiles in).
    marker = f"tf_kld-build: tensorflow={tf.__version__};".encode()
    assert marker in data, f"{real} lacks its build marker {marker!r}"
    other = tmp / "other_tensorflow.so"
    other.write_bytes(data.replace(marker, marker.replace(tf.__version__.encode(),
                                                          OTHER_VERSION.encode())))
    cases["other_tensorflow"] = str(other)
    wrong_class = tmp / "wrong_elf_class.so"
    wrong_class.write_bytes(data[:4] + b"\x01" + data[5:])  # EI_CLASS: ELFCLASS32
    cases["wrong_elf_class"] = str(wrong_class)
    empty = tmp / "empty.so"
    empty.write_bytes(b"")
    cases["empty"] = str(empty)
    directory = tmp / "directory.so"
    directory.mkdir()
    cases["directory"] = str(directory)
    return cases


# Loading these into this process is harmless: each fails before any initializer runs, or registers
# nothing. (renamed_symbol, a copy of the real library, is only loaded in a fresh process.)
@pytest.mark.parametrize("case, cause", [
    ("undefined_symbol", "undefined symbol: _ZN10tensorflow30TfKldSymbolOfAnotherTensorFlowEv"),
    ("wrong_elf_class", "wrong ELF class"),
    ("empty", "file too short"),
    ("directory", "Is a directory"),
    ("no_ops", "does not define the ops TfKld>KlDivergence and TfKld>KlDivergenceGrad"),
    ("other_tensorflow", f"was built for TensorFlow {OTHER_VERSION}"),
])
def test_load_reason_names_path_and_cause(broken, monkeypatch, case, cause):
    monkeypatch.setenv(kld_ops.LIBRARY_ENV, broken[case])
    module, reason = kld_ops._load()  # pylint: disable=protected-access
    assert module is None
    assert broken[case] in reason and cause in reason, reason


_IMPORT_SCRIPT = r"""
import json
import tensorflow as tf
import tf_kld  # warnings go to stderr, as for a user
out = {}
""" + U.LOADER_PROBE


def _run_import(library):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("TF_KLD_IMPL", None)
    env.pop(kld_ops.LIBRARY_ENV, None)
    if library is not None:
        env[kld_ops.LIBRARY_ENV] = library
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [IMPORT_ROOT, env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", _IMPORT_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=300, cwd=os.path.dirname(library or IMPORT_ROOT))
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    return proc.returncode, proc.stderr, json.loads(line[-1][len("RESULT "):]) if line else None


@pytest.fixture(scope="module")
def imports(broken):
    """Fresh interpreters importing tf_kld: {case: (returncode, stderr, result)}, two at a time."""
    cases = {"healthy": None, "renamed_symbol": broken["renamed_symbol"], "no_ops": broken["no_ops"],
             "other_tensorflow": broken["other_tensorflow"]}
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(cases, pool.map(_run_import, cases.values())))
    return results


@pytest.mark.parametrize("case, cause", [
    ("renamed_symbol", "undefined symbol: " + RENAMED_SYMBOL.decode()),
    ("no_ops", "does not define the ops"),
    ("other_tensorflow", f"was built for TensorFlow {OTHER_VERSION}, but this is TensorFlow "
                         f"{tf.__version__}"),
])
def test_import_with_broken_library(broken, imports, case, cause):
    returncode, stderr, out = imports[case]
    assert returncode == 0 and out is not None, f"import crashed (exit {returncode}):\n{stderr[-3000:]}"
    assert "Traceback" not in stderr, stderr[-3000:]
    warnings = [x for x in stderr.splitlines() if "RuntimeWarning: tf_kld:" in x]
    assert len(warnings) == 1, stderr[-3000:]
    assert broken[case] in warnings[0] and cause in warnings[0], warnings[0]
    assert "Rebuild it against the installed TensorFlow" in warnings[0], warnings[0]
    assert out["loaded"] is False
    assert out["loss"] == pytest.approx(0.11891246, rel=1e-6)
    assert "Log" in out["ops"] and not any(op.startswith("TfKld>") for op in out["ops"]), out["ops"]
    err = out["custom_error"]
    assert err and err.startswith("tf_kld:") and "'custom'" in err and broken[case] in err, err
    assert cause in err, err


def test_import_with_healthy_library_is_silent(imports):
    returncode, stderr, out = imports["healthy"]
    assert returncode == 0 and out is not None, f"import crashed (exit {returncode}):\n{stderr[-3000:]}"
    assert "Traceback" not in stderr and "tf_kld" not in stderr, stderr[-3000:]
    assert out["loaded"] is True and out["custom_error"] is None
    assert "TfKld>KlDivergence" in out["ops"]
