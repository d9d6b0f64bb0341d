"""The CPU kernel core's ISA objects share no symbol, so link order can never put AVX2 or AVX-512 code
into the baseline kernels: built unoptimised (-O0, where inline functions are emitted out of line), each
object defines only its own table getter (and the generic one the dispatch), and the baseline
kernels pass the core test with the objects linked in any order. No TensorFlow needed."""

import itertools
import os
import shutil
import subprocess

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OBJECTS = ("generic.o", "avx2.o", "avx512.o")
# The only symbols the ISA objects may export (to the rest of the library), by object.
ALLOWED = {  # each family's table getters (one name per ISA) and the run-time choice
    "generic.o": {"tf_kld::cpu::GenericKernels()", "tf_kld::cpu::Cpu()", "TfKldCpuIsa", "TfKldCpuBf16Dot",
                  "tf_kld::distill::GenericKernels()", "tf_kld::distill::Cpu()"},
    "avx2.o": {"tf_kld::cpu::Avx2Kernels()", "tf_kld::distill::Avx2Kernels()"},
    "avx512.o": {"tf_kld::cpu::Avx512Kernels()", "tf_kld::distill::Avx512Kernels()"},
}
# The exception-handling personality pointer: data, the same in every object, not ISA code.
HARMLESS = {"DW.ref.__gxx_personality_v0"}


def _need(tool):
    if shutil.which(tool) is None:
        pytest.fail(f"this test needs {tool} on PATH", pytrace=False)


@pytest.fixture(scope="module")
def objects(tmp_path_factory):
    """The core test built at -O0 with its objects kept: {name: path} plus "main.o"."""
    if not os.path.exists(os.path.join(REPO_ROOT, "tools", "build_core.sh")):
        pytest.skip("needs a source checkout (tools/build_core.sh, cc/)")
    cxx = os.environ.get("CXX", "g++").split()[0]
    for tool in (cxx, "nm"):
        _need(tool)
    out = tmp_path_factory.mktemp("core_o0")
    env = dict(os.environ, TF_KLD_CORE_OBJDIR=str(out))
    proc = subprocess.run(["bash", "tools/build_core.sh", str(out / "kld_cpu_test"),
                           "cc/tests/kld_cpu_test.cc", "-O0"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {name: str(out / name) for name in OBJECTS + ("main.o",)} | {"dir": str(out)}


def _exported(obj):
    """Demangled names of the symbols `obj` defines with external linkage (global, weak, unique)."""
    lines = subprocess.run(["nm", "-C", "--defined-only", "--extern-only", obj], check=True,
                           capture_output=True, text=True).stdout.splitlines()
    return {line.split(None, 2)[2] for line in lines if len(line.split(None, 2)) == 3}


def test_isa_objects_export_only_their_tables(objects):
    for name in OBJECTS:
        extra = _exported(objects[name]) - ALLOWED[name] - HARMLESS
        assert not extra, (f"{name} (-O0) defines symbols another object could bind to, so link "
                           f"order could pick another ISA's copy: {sorted(extra)}")


@pytest.mark.parametrize("pair", list(itertools.combinations(OBJECTS, 2)), ids=lambda p: "-".join(p))
def test_isa_objects_share_no_symbol(objects, pair):
    shared = (_exported(objects[pair[0]]) & _exported(objects[pair[1]])) - HARMLESS
    assert not shared, f"{pair} both define {sorted(shared)}: the linker keeps one for both"


@pytest.mark.parametrize("order", [OBJECTS, OBJECTS[::-1], ("avx2.o", "generic.o", "avx512.o")],
                         ids=lambda o: "-".join(x[:-2] for x in o))
def test_baseline_kernels_in_either_link_order(objects, order):
    cxx = os.environ.get("CXX", "g++").split()
    binary = os.path.join(objects["dir"], "kld_cpu_test_" + "_".join(x[:-2] for x in order))
    subprocess.run(cxx + ["-O0"] + [objects[x] for x in order] + [objects["main.o"], "-o", binary,
                                                                   "-lpthread"], check=True)
    proc = subprocess.run([binary], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, TF_KLD_CPU_ISA="generic"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "0 failures" in proc.stdout and "generic" in proc.stdout, proc.stdout[-3000:]
