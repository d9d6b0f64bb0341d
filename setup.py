"""pip build of tf_kld: compiles the op library against the installed TensorFlow.

    pip install --no-build-isolation .     # isolation would pull a second TensorFlow into the build
    pip wheel --no-build-isolation --no-deps -w dist .
    python setup.py build_ext --inplace    # library into tf_kld/ of this checkout (tests, demo)

Flags come from tools/build_flags.py (shared with Bazel's configure.sh). CXX overrides g++.
TF_KLD_XLA=0 leaves out the op's XLA lowering (then jit_compile relies on tf_kld's detection of XLA
contexts alone); if it fails to compile, the build warns and goes on without it.

TF_KLD_CUDA=1 adds the CUDA kernels (nvcc 13 from $CUDA_HOME, /usr/local/cuda, PATH or the pip wheels
in build_flags.NVCC_WHEELS); TF_KLD_CUDA_ARCHS="75-real;80-real;86-real;89-real;90" (the default)
picks the GPU architectures; TF_KLD_CUDA_COMPILER=clang compiles the device code with clang and
ptxas 12.5 instead (runs on R525+ drivers; see build_flags.py). The library still loads and runs on
CPU-only machines.
"""

import hashlib
import json
import os
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import build_flags  # noqa: E402  pylint: disable=wrong-import-position


def _has_cuda_kernels(library):
    """Whether a built library is a CUDA build (it exports TfKldCudaArchs)."""
    with open(library, "rb") as f:
        return b"TfKldCudaArchs" in f.read()


class BuildOpLibrary(build_ext):
    """Builds the TensorFlow op library (not a Python extension) with TensorFlow's flags."""

    def get_ext_filename(self, fullname):
        return os.path.join(*fullname.split(".")[:-1], build_flags.LIBRARY_NAME)

    def build_extension(self, ext):
        target = os.path.abspath(self.get_ext_fullpath(ext.name))
        xla = os.environ.get("TF_KLD_XLA", "1") != "0"
        cuda = os.environ.get("TF_KLD_CUDA", "0") not in ("", "0")
        sources = build_flags.SOURCES + list(build_flags.ISA_SOURCES)
        all_sources = sources + build_flags.XLA_SOURCES + (build_flags.CUDA_SOURCES if cuda else [])
        headers = [os.path.join("cc/kernels", f) for f in os.listdir(os.path.join(ROOT, "cc/kernels"))
                   if f.endswith(".h")]
        cuda_headers = headers if cuda else []
        headers = [h for h in headers if h not in build_flags.CUDA_HEADERS]
        inputs = [os.path.join(ROOT, f) for f in all_sources + headers + ["tools/build_flags.py"]]
        cxx = shlex.split(os.environ.get("CXX", "g++"))
        # The library and its objects are only reused when built for this TensorFlow (version,
        # paths), with these flags and this compiler: the key is kept beside the library, and the
        # objects live in a directory of their own per key.
        key = json.dumps(build_flags.build_key(cxx, xla, cuda), sort_keys=True)
        stamp = target + ".stamp"
        # A CUDA build always relinks (its objects are cached); a CPU build replaces a CUDA library.
        if not self.force and not cuda and _read(stamp) == key and os.path.exists(target) and \
                os.path.getmtime(target) >= max(os.path.getmtime(f) for f in inputs) and \
                not _has_cuda_kernels(target):
            print(f"tf_kld: {target} is up to date")
            return
        digest = hashlib.sha256(key.encode()).hexdigest()[:12]
        tmp = os.path.abspath(os.path.join(self.build_temp, "tf_kld-" + digest))
        os.makedirs(tmp, exist_ok=True)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        cuda_sources = []
        if cuda:  # objects that differ from the CPU build's, per compiler and architecture list
            archs = build_flags.cuda_archs_string()
            key = build_flags.cuda_compiler() + "_" + archs
            tmp_cuda = os.path.join(tmp + "_cuda", "".join(c if c.isalnum() else "_" for c in key))
            cuda_cmd, cuda_host_flags = build_flags.cuda_compile_command(tmp_cuda)
            cuda_sources = build_flags.CUDA_SOURCES + build_flags.CUDA_HOST_SOURCES
            print(f"tf_kld: CUDA build with {cuda_cmd[0]} for {archs}", flush=True)

        def compile_one(source):
            if source in cuda_sources:
                return compile_cuda(source)
            obj = os.path.join(tmp, os.path.basename(source) + ".o")
            deps = [os.path.join(ROOT, f) for f in [source] + headers + ["tools/build_flags.py"]]
            if not self.force and os.path.exists(obj) and os.path.getmtime(obj) >= max(
                    os.path.getmtime(f) for f in deps):
                return obj  # up to date
            extra = build_flags.ISA_SOURCES.get(source, [])
            if source in build_flags.XLA_SOURCES:
                extra = build_flags.xla_compile_flags()
            cmd = cxx + build_flags.compile_flags() + extra + ["-c", source, "-o", obj]
            print(" ".join(cmd), flush=True)
            if source in build_flags.XLA_SOURCES:
                if subprocess.run(cmd, cwd=ROOT, check=False).returncode != 0:
                    print(f"tf_kld: WARNING: the XLA lowering {source} did not compile; building "
                          "without it (jit_compile then relies on detecting XLA contexts).", flush=True)
                    return None
                return obj
            subprocess.run(cmd, cwd=ROOT, check=True)
            return obj

        def compile_cuda(source):
            obj = os.path.join(tmp_cuda, os.path.basename(source) + ".o")
            deps = [os.path.join(ROOT, f) for f in [source] + cuda_headers + ["tools/build_flags.py"]]
            if not self.force and os.path.exists(obj) and os.path.getmtime(obj) >= max(
                    os.path.getmtime(f) for f in deps):
                return obj
            if source in build_flags.CUDA_SOURCES:
                cmd = list(cuda_cmd)
            else:
                cmd = cxx + cuda_host_flags + build_flags.compile_flags()
            cmd += ["-c", source, "-o", obj]
            print(" ".join(cmd), flush=True)
            subprocess.run(cmd, cwd=ROOT, check=True)
            return obj

        # The XLA sources first: they take longest; then nvcc's.
        order = ((build_flags.XLA_SOURCES if xla else []) + (build_flags.CUDA_SOURCES if cuda else []) +
                 sources)
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            objects = list(pool.map(compile_one, order))
        # A lowering that failed to compile is left out; the others still link.
        xla_objects = objects[:len(build_flags.XLA_SOURCES)] if xla else []
        with_xla = any(obj is not None for obj in xla_objects)
        objects = [obj for obj in objects if obj is not None]
        cmd = cxx + objects + build_flags.link_flags(xla=with_xla) + ["-o", target]
        print(" ".join(cmd), flush=True)
        if os.path.exists(stamp):
            os.remove(stamp)
        subprocess.run(cmd, cwd=ROOT, check=True)
        if all(obj is not None for obj in xla_objects):  # one that fell back is retried next time
            with open(stamp, "w") as f:
                f.write(key)


def _read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


setup(
    name="tf_kld",
    version="0.1.0",
    description="A fused Kullback-Leibler divergence loss op for TensorFlow, with its gradient",
    packages=["tf_kld"],
    ext_modules=[Extension("tf_kld._kld_ops", sources=build_flags.SOURCES + list(build_flags.ISA_SOURCES) +
                           build_flags.XLA_SOURCES + build_flags.CUDA_SOURCES)],
    cmdclass={"build_ext": BuildOpLibrary},
    python_requires=">=3.9",
    install_requires=["tensorflow>=2.16"],
    zip_safe=False,
)
