"""The CPU kernel core under AddressSanitizer and UndefinedBehaviorSanitizer, without TensorFlow:
tools/sanitize.sh builds cc/tests/kld_cpu_test.cc with the core and runs it over edge shapes,
unaligned buffers and special values, for both ISA tables the CPU runs."""

import os
import re
import shutil
import subprocess

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO_ROOT, "tools", "sanitize.sh")


def test_kernel_core_is_sanitizer_clean():
    if not os.path.exists(SCRIPT) or not os.path.exists(os.path.join(REPO_ROOT, "cc", "tests")):
        pytest.skip("needs a source checkout (tools/sanitize.sh, cc/)")
    if shutil.which(os.environ.get("CXX", "g++").split()[0]) is None:
        pytest.fail("tools/sanitize.sh needs a C++ compiler (g++, or CXX)", pytrace=False)
    proc = subprocess.run(["bash", SCRIPT], capture_output=True, text=True, timeout=600)
    tail = f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}"
    assert proc.returncode == 0, f"tools/sanitize.sh failed (exit {proc.returncode})\n{tail}"
    assert "ERROR: AddressSanitizer" not in proc.stderr and "runtime error" not in proc.stderr, tail
    match = re.search(r"kld_cpu_test: (\d+) checks, (\d+) failures; tables: (.*)", proc.stdout)
    assert match, tail
    assert int(match.group(1)) > 10000 and int(match.group(2)) == 0, match.group(0)
    assert "generic" in match.group(3), match.group(0)
