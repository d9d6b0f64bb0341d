"""Compiler and linker flags for the tf_kld op library: the one place both builds read.

setup.py imports this module; configure.sh runs it to write .bazelrc. Everything comes from the
installed TensorFlow's `tf.sysconfig`, so the library always matches the TF it will be loaded into.

    python3 tools/build_flags.py --show      # human-readable summary
    python3 tools/build_flags.py --bazelrc   # lines for .bazelrc (used by configure.sh)

CUDA builds (see the CUDA section below): `--show --cuda`, `--bazelrc --cuda` (configure.sh --cuda),
`--cuda-home`, `--gencode` and `--nvcc-command --shim DIR` (the nvcc command line Bazel's genrule runs),
`--clang-command DIR` (clang's, for the harness).
"""

import argparse
import functools
import os
import shutil
import sys

# Sources of the op library, relative to the repository root. The ISA files are the same kernel core
# compiled for AVX2+FMA+F16C and for AVX-512; the library picks the best the CPU has at run time.
SOURCES = [
    "cc/ops/kld_ops.cc",
    "cc/kernels/kld_kernels.cc",
    "cc/kernels/kld_cpu_generic.cc",
    "cc/kernels/kld_gpu_gate.cc",  # the GPU kernels' driver gate; in CPU builds for gpu_info()
    "cc/ops/distill_ops.cc",  # the distillation family; its core is in the kld_cpu_* objects
    "cc/kernels/distill_kernels.cc",
    "cc/ops/linear_ops.cc",  # the fused linear loss's in-place weight-gradient accumulation
    "cc/kernels/linear_kernels.cc",
]
AVX2_FLAGS = ["-mavx2", "-mfma", "-mf16c"]
AVX512_FLAGS = AVX2_FLAGS + ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"]
ISA_SOURCES = {"cc/kernels/kld_cpu_avx2.cc": AVX2_FLAGS, "cc/kernels/kld_cpu_avx512.cc": AVX512_FLAGS}
# The XLA lowerings (optional: TF_KLD_XLA=0 leaves them out). They need two more of TF's bundled
# include dirs and libtensorflow_cc, which holds XLA's op registry; each takes ~90 s to compile.
XLA_SOURCES = ["cc/kernels/kld_xla.cc", "cc/kernels/distill_xla.cc"]

# Flags of our own, on top of TensorFlow's. -ffp-contract=off: the compiler never fuses a multiply
# and an add on its own (the AVX2 log uses FMA explicitly, where it was chosen);
# no -ffast-math: NaN and Inf must keep TensorFlow's semantics.
CXXFLAGS = ["-O3", "-DNDEBUG", "-fPIC", "-fvisibility-inlines-hidden", "-fno-math-errno", "-ffp-contract=off",
            "-Wall", "-Wno-sign-compare", "-Wno-unused-function", "-Wno-psabi",
            "-Wno-deprecated-declarations", "-Wno-interference-size"]
LDFLAGS = ["-shared", "-Wl,--no-undefined", "-Wl,-O1", "-ldl"]  # -ldl: the driver gate, glibc < 2.34

LIBRARY_NAME = "_kld_ops.so"


@functools.lru_cache(maxsize=None)
def _sysconfig():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    return {
        "version": tf.__version__,
        "compile": list(tf.sysconfig.get_compile_flags()),
        "link": list(tf.sysconfig.get_link_flags()),
        "include": tf.sysconfig.get_include(),
        "lib": tf.sysconfig.get_lib(),
    }


def tf_version():
    return _sysconfig()["version"]


def include_dir():
    return _sysconfig()["include"]


def lib_dir():
    return _sysconfig()["lib"]


def tf_compile_flags():
    """TensorFlow's own flags with the -I dir removed (callers add includes their own way)."""
    flags = [f for f in _sysconfig()["compile"] if not f.startswith("-I")]
    # Older TFs spell it --std=; both compilers accept -std=.
    return ["-std=c++17" if f in ("--std=c++17", "-std=c++17") else f for f in flags]


def framework_library():
    """File name of libtensorflow_framework that the link flags name (e.g. libtensorflow_framework.so.2)."""
    for flag in _sysconfig()["link"]:
        if flag.startswith("-l:"):
            return flag[3:]
    return "libtensorflow_framework.so.2"


def defines():
    """The TensorFlow version the library is built for, compiled into it: tf_kld reads it from the
    file at import and refuses a library built for another TensorFlow, naming both versions."""
    return [f"-DTF_KLD_TF_VERSION={tf_version()}"]


def compile_flags():
    """Every flag for one C++ source of the library, includes included."""
    return ["-I" + include_dir(), "-I."] + tf_compile_flags() + CXXFLAGS + defines()


def build_key(cxx, xla, cuda):
    """What a built library (and its objects) depends on besides its sources: the TensorFlow it is
    compiled and linked against (version, include and lib dirs), the flags and the compiler. setup.py
    keeps it beside the library and rebuilds when it differs."""
    key = {"tensorflow": tf_version(), "include": include_dir(), "lib": lib_dir(), "cxx": cxx,
           "compile": compile_flags(), "link": link_flags(xla=xla), "xla": xla, "cuda": cuda}
    if cuda:
        key.update(cuda_home=cuda_home(), cuda_archs=cuda_archs_string())
    return key


def xla_compile_flags():
    """Extra flags for XLA_SOURCES."""
    return ["-I" + os.path.join(include_dir(), "external", d)
            for d in ("highwayhash", "farmhash_archive/src")] + ["-Wno-comment"]


def cc_library():
    """File name of libtensorflow_cc (XLA's op registry), e.g. libtensorflow_cc.so.2."""
    return framework_library().replace("tensorflow_framework", "tensorflow_cc")


def link_flags(xla=False):
    libs = [framework_library()] + ([cc_library()] if xla else [])
    return LDFLAGS + ["-L" + lib_dir()] + ["-l:" + lib for lib in libs] + ["-Wl,-rpath," + lib_dir()]


# ---- CUDA ------------------------------------------------------------------------------------------
# A CUDA build (setup.py: TF_KLD_CUDA=1; Bazel: ./configure.sh --cuda, then --config=cuda) puts GPU
# kernels into the same library: CUDA_HOST_SOURCES compiled with GOOGLE_CUDA=1 (they then register
# the GPU kernels) and CUDA_SOURCES compiled by nvcc 13. No cudart is linked: libtensorflow_framework
# exports the CUDA runtime API and loads TensorFlow's own libcudart, so the library still loads, and
# runs its CPU kernels, on a machine without a GPU. The other objects are the CPU build's.
CUDA_SOURCES = ["cc/kernels/kld_kernels.cu.cc", "cc/kernels/distill_kernels.cu.cc"]
CUDA_HOST_SOURCES = ["cc/kernels/kld_kernels.cc", "cc/kernels/distill_kernels.cc"]
CUDA_HEADERS = ["cc/kernels/kld_gpu.h", "cc/kernels/kld_gpu.cu.h", "cc/kernels/distill_gpu.h",
                "cc/kernels/distill_gpu.cu.h", "cc/kernels/cuda_types.cu.h"]  # only CUDA objects depend on them
CUDA_ARCHS_ENV = "TF_KLD_CUDA_ARCHS"
# CMake's CUDA_ARCHITECTURES syntax, ',' or ';' separated: "80" is sm_80 code plus compute_80 PTX,
# "80-real" sm_80 code only, "80-virtual" PTX only. Default: sm_75/80/86/89/90 code and compute_90
# PTX, which newer GPUs JIT-compile. nvcc 13 targets sm_75 and newer only.
DEFAULT_CUDA_ARCHS = "75-real;80-real;86-real;89-real;90"
# nvcc 13 from PyPI (pin all five: unpinned pulls a newer minor). CUDA_HOME is then
# <site-packages>/nvidia/cu13.
NVCC_WHEELS = ["nvidia-cuda-nvcc==13.0.88", "nvidia-cuda-crt==13.0.88", "nvidia-nvvm==13.0.88",
               "nvidia-cuda-runtime==13.0.96", "nvidia-cuda-cccl==13.0.85"]
# -fmad=false: nvcc, like the CPU build (-ffp-contract=off), never fuses a product into an add on
# its own, so GPU and CPU round the same terms the same way. -fvisibility=hidden: the nvcc object
# exports nothing but TfKldCudaArchs (no Eigen:: or tf_kld::gpu:: symbols from the .so).
NVCC_FLAGS = ["-x", "cu", "-std=c++17", "--expt-relaxed-constexpr", "-O3", "-DNDEBUG", "-DGOOGLE_CUDA=1",
              "-fmad=false", "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden",
              "-Xcompiler", "-Wno-deprecated-declarations"]


def cuda_home():
    """The CUDA toolkit to compile with: $CUDA_HOME or $CUDA_PATH, /usr/local/cuda, the toolkit of the
    nvcc on PATH, or the pip wheels (site-packages/nvidia/cu13); None when there is none."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc_on_path = shutil.which("nvcc")
    if nvcc_on_path:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc_on_path))))
    candidates += [os.path.join(p, "nvidia", "cu13") for p in sys.path if p and os.path.isdir(p)]
    for home in candidates:
        if home and all(os.path.isfile(os.path.join(home, f))
                        for f in ("bin/nvcc", "include/cuda_runtime.h")):
            return os.path.abspath(home)
    return None


def _require_cuda_home():
    home = cuda_home()
    if home is None:
        raise SystemExit("tf_kld: no nvcc found for the CUDA build: set CUDA_HOME, put nvcc on PATH, or "
                         "pip install " + " ".join(NVCC_WHEELS))
    return home


def cuda_archs(spec=None):
    """[(arch, sass, ptx)] from a TF_KLD_CUDA_ARCHS spec (default: the environment, else the default)."""
    spec = spec or os.environ.get(CUDA_ARCHS_ENV) or DEFAULT_CUDA_ARCHS
    archs = []
    for item in spec.replace(";", ",").split(","):
        item = item.strip().lower().replace("sm_", "").replace("compute_", "")
        if not item:
            continue
        number, _, kind = item.partition("-")
        if not number.isdigit() or kind not in ("", "real", "virtual"):
            raise SystemExit(f"tf_kld: bad CUDA architecture {item!r} in {spec!r} ({CUDA_ARCHS_ENV} "
                             f"syntax, e.g. {DEFAULT_CUDA_ARCHS!r})")
        archs.append((int(number), kind != "virtual", kind != "real"))
    if not archs:
        raise SystemExit(f"tf_kld: CUDA architectures {spec!r} name no architecture")
    return archs


def cuda_archs_string(spec=None):
    """The spec in its canonical form, e.g. "75-real;80-real;86-real;89-real;90"."""
    suffix = {(True, True): "", (True, False): "-real", (False, True): "-virtual"}
    return ";".join(f"{a}{suffix[(s, p)]}" for a, s, p in cuda_archs(spec))


def gencode_flags(spec=None):
    flags = []
    for arch, sass, ptx in cuda_archs(spec):
        codes = ([f"sm_{arch}"] if sass else []) + ([f"compute_{arch}"] if ptx else [])
        flags.append(f"-gencode=arch=compute_{arch},code=[{','.join(codes)}]")
    return flags


def make_cuda_shim(directory, home=None):
    """A directory whose third_party/gpus/cuda/include is CUDA_HOME/include. Searched before
    TensorFlow's include dir, it replaces the CUDA 12.5 headers bundled there, which do not match nvcc 13."""
    home = home or _require_cuda_home()
    link = os.path.join(directory, "third_party", "gpus", "cuda", "include")
    os.makedirs(os.path.dirname(link), exist_ok=True)
    target = os.path.join(home, "include")
    if os.path.islink(link) and os.readlink(link) == target:
        return directory
    if os.path.lexists(link):
        os.remove(link)
    os.symlink(target, link)
    return directory


def cuda_host_flags(shim, home=None):
    """Extra flags for CUDA_HOST_SOURCES in a CUDA build (before compile_flags(): the shim comes first)."""
    home = home or _require_cuda_home()
    return ["-I" + shim, "-I" + os.path.join(home, "include"), "-DGOOGLE_CUDA=1"]


def nvcc_flags(shim, spec=None):
    """Every nvcc flag for one of CUDA_SOURCES (add -c SOURCE -o OBJECT)."""
    tf_flags = [f for f in tf_compile_flags() if not f.startswith("-std=")]
    targets = len(cuda_archs(spec))
    return (NVCC_FLAGS + tf_flags + gencode_flags(spec) +
            ["--threads", str(max(1, min(targets, os.cpu_count() or 1)))] +
            ["-I" + shim, "-I" + include_dir(), "-I."])


def nvcc(home=None):
    return os.path.join(home or _require_cuda_home(), "bin", "nvcc")


# ---- CUDA with clang (TF_KLD_CUDA_COMPILER=clang; pip builds only) ---------------------------------
# clang >= 16 compiles CUDA_SOURCES against the CUDA 12.5 headers bundled in TensorFlow's include dir
# to PTX (ISA 7.8), ptxas 12.5 (from CLANG_CUDA_WHEELS) assembles it: device code that, by CUDA 12's
# minor-version compatibility, a driver for CUDA 12.0 (R525, TensorFlow's own minimum) runs, where
# nvcc 13's needs R580. fatbinary is CUDA 13's (from CUDA_HOME), behind a wrapper that translates
# clang's --image= into the --image3= it takes. See the README's CUDA section for what is verified.
CUDA_COMPILER_ENV = "TF_KLD_CUDA_COMPILER"
CLANG_ENV = "TF_KLD_CLANG"  # the clang++ to use (default: clang++-16, then clang++)
CLANG_CUDA_WHEELS = ["nvidia-cuda-nvcc-cu12==12.5.82"]
CLANG_NEEDED_DRIVER = 12000
# Directory holding nvidia/cuda_nvcc of CLANG_CUDA_WHEELS when it is not importable (pip --target).
CLANG_CUDA_WHEEL_DIR_ENV = "TF_KLD_CUDA12_NVCC_DIR"


def cuda_compiler():
    compiler = os.environ.get(CUDA_COMPILER_ENV, "nvcc").strip().lower() or "nvcc"
    if compiler not in ("nvcc", "clang"):
        raise SystemExit(f"tf_kld: {CUDA_COMPILER_ENV}={compiler!r} is not nvcc or clang")
    return compiler


def clang():
    for name in filter(None, [os.environ.get(CLANG_ENV), "clang++-16", "clang++"]):
        path = shutil.which(name)
        if path:
            return path
    raise SystemExit(f"tf_kld: no clang++ found for {CUDA_COMPILER_ENV}=clang (apt-get install clang-16, "
                     f"or set {CLANG_ENV})")


def _cuda12_nvcc_dir():
    roots = [os.environ.get(CLANG_CUDA_WHEEL_DIR_ENV)] + [p for p in sys.path if p]
    for root in filter(None, roots):
        candidate = os.path.join(root, "nvidia", "cuda_nvcc")
        if os.path.isfile(os.path.join(candidate, "bin", "ptxas")):
            return candidate
    raise SystemExit(f"tf_kld: {CUDA_COMPILER_ENV}=clang needs ptxas and libdevice from CUDA 12: pip "
                     f"install {' '.join(CLANG_CUDA_WHEELS)} (or pip install --target DIR and set "
                     f"{CLANG_CUDA_WHEEL_DIR_ENV}=DIR)")


_FATBINARY_WRAPPER = """#!/bin/sh
# clang passes --image=profile=sm_NN,file=F / compute_NN; CUDA 13's fatbinary takes --image3=.
for a in "$@"; do
  shift
  case "$a" in
    --image=profile=sm_*) r=${a#--image=profile=sm_}; set -- "$@" "--image3=kind=elf,sm=${r%%,*},${r#*,}" ;;
    --image=profile=compute_*) r=${a#--image=profile=compute_}; set -- "$@" "--image3=kind=ptx,sm=${r%%,*},${r#*,}" ;;
    *) set -- "$@" "$a" ;;
  esac
done
exec "%s" --compress-mode=none "$@"
"""


def make_clang_cuda_root(directory, home=None):
    """A CUDA installation as clang's --cuda-path wants it: TensorFlow's bundled CUDA 12.5 headers,
    libdevice and ptxas 12.5 from CLANG_CUDA_WHEELS, the fatbinary wrapper."""
    home = home or _require_cuda_home()
    nvcc12 = _cuda12_nvcc_dir()
    links = {"include": os.path.join(include_dir(), "third_party", "gpus", "cuda", "include"),
             "nvvm/libdevice": os.path.join(nvcc12, "nvvm", "libdevice"),
             "bin/ptxas": os.path.join(nvcc12, "bin", "ptxas")}
    for name, target in links.items():
        link = os.path.join(directory, name)
        os.makedirs(os.path.dirname(link), exist_ok=True)
        if os.path.lexists(link):
            os.remove(link)
        os.symlink(target, link)
    with open(os.path.join(directory, "bin", "fatbinary"), "w") as f:
        f.write(_FATBINARY_WRAPPER % os.path.join(home, "bin", "fatbinary"))
    os.chmod(os.path.join(directory, "bin", "fatbinary"), 0o755)
    # CUDA 12's host_defines.h makes __noinline__ a macro, which breaks libstdc++ under clang >= 15
    # (where it is a keyword); undone right after clang's own CUDA prelude.
    with open(os.path.join(directory, "undef_noinline.h"), "w") as f:
        f.write("#undef __noinline__\n")
    return directory


def clang_device_flags(root, spec=None):
    """clang's flags for CUDA code of this project (the harness's too); root: make_clang_cuda_root."""
    archs = cuda_archs(spec)
    if any(not sass for _, sass, _ in archs):
        raise SystemExit(f"tf_kld: the clang CUDA build needs real architectures (not -virtual): {spec}")
    flags = ["-x", "cuda", f"--cuda-path={root}", "-Wno-unknown-cuda-version", "-std=c++17", "-O3",
             # as nvcc's -fmad=false and the CPU build: no contraction into FMAs (clang's CUDA
             # default is fast)
             "-ffp-contract=off", "-include", os.path.join(root, "undef_noinline.h"),
             "-isystem" + os.path.join(include_dir(), "third_party", "gpus", "cuda", "libcudacxx", "include")]
    flags += [f"--cuda-gpu-arch=sm_{a}" for a, _, _ in archs]
    return flags + [f"--no-cuda-include-ptx=sm_{a}" for a, _, ptx in archs if not ptx]


def clang_cuda_flags(root, spec=None):
    """Every clang flag for one of CUDA_SOURCES (add -c SOURCE -o OBJECT); root: make_clang_cuda_root."""
    tf_flags = [f for f in tf_compile_flags() if not f.startswith("-std=")]
    return clang_device_flags(root, spec) + tf_flags + [
        "-DNDEBUG", "-DGOOGLE_CUDA=1", f"-DTF_KLD_NEEDED_DRIVER={CLANG_NEEDED_DRIVER}",
        "-DTF_KLD_CUDA_ARCH_LIST=" + ",".join(str(a * 10) for a, _, _ in cuda_archs(spec)),
        "-fPIC", "-fvisibility=hidden", "-Wno-deprecated-declarations", "-I" + include_dir(), "-I."]


def cuda_compile_command(work_dir, spec=None):
    """The compiler and flags for CUDA_SOURCES (add -c SOURCE -o OBJECT), and the extra flags of
    CUDA_HOST_SOURCES (before compile_flags()), for TF_KLD_CUDA_COMPILER's choice. work_dir: where the
    include shim (nvcc) or CUDA root (clang) is made."""
    if cuda_compiler() == "clang":
        root = make_clang_cuda_root(os.path.join(work_dir, "clang_cuda"))
        return ([clang()] + clang_cuda_flags(root, spec),
                ["-I" + os.path.join(root, "include"), "-DGOOGLE_CUDA=1"])
    shim = make_cuda_shim(os.path.join(work_dir, "shim"))
    return [nvcc()] + nvcc_flags(shim, spec), cuda_host_flags(shim)


def _cuda_bazelrc():
    """build:cuda lines: the define that selects the GPU kernels (BUILD), what @local_config_cuda
    (tf/cuda_configure.bzl) reads, and the host flags of CUDA_HOST_SOURCES."""
    repo = "external/local_config_cuda"
    host = ",".join(["-DGOOGLE_CUDA=1", f"-I{repo}/shim", f"-I{repo}/cuda_include"])
    lines = [
        "# CUDA (./configure.sh --cuda): bazel build --config=cuda //... adds the GPU kernels.",
        "build:cuda --define=tf_kld_cuda=1",
        f"build:cuda --repo_env=TF_KLD_CUDA_HOME={_require_cuda_home()}",
        f"build:cuda --repo_env={CUDA_ARCHS_ENV}={cuda_archs_string().replace(';', ',')}",
    ]
    lines += [f"build:cuda --per_file_copt={s.replace('.', chr(92) + '.')}@{host}" for s in CUDA_HOST_SOURCES]
    return "\n".join(lines)


def _bazelrc(cuda=False):
    python = sys.executable
    lines = [
        "# Generated by configure.sh from tools/build_flags.py; do not edit.",
        f"build --repo_env=TF_KLD_PYTHON={python}",
        f"build --repo_env=TF_KLD_TF_INCLUDE={include_dir()}",
        f"build --repo_env=TF_KLD_TF_LIB={lib_dir()}",
        f"build --repo_env=TF_KLD_TF_FRAMEWORK={framework_library()}",
    ]
    lines += [f"build --copt={f}" for f in tf_compile_flags() + CXXFLAGS + defines() if f != "-fPIC"]
    if cuda:
        lines += ["", _cuda_bazelrc()]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--show", action="store_true")
    group.add_argument("--bazelrc", action="store_true")
    group.add_argument("--cuda-home", action="store_true", help="print the CUDA toolkit found (exit 1: none)")
    group.add_argument("--nvcc-command", action="store_true",
                       help="print nvcc and its flags for CUDA_SOURCES, one per line (needs --shim)")
    group.add_argument("--gencode", action="store_true", help="print the -gencode flags, one per line")
    group.add_argument("--clang-command", metavar="ROOT",
                       help="make the clang CUDA root in ROOT; print clang++ and its CUDA flags, one per line")
    parser.add_argument("--cuda", action="store_true", help="with --show/--bazelrc: the CUDA build too")
    parser.add_argument("--shim", help="the CUDA include shim directory (see make_cuda_shim)")
    parser.add_argument("--archs",
                        help=f"CUDA architectures (default ${CUDA_ARCHS_ENV} or {DEFAULT_CUDA_ARCHS})")
    args = parser.parse_args(argv)
    if args.cuda_home:
        home = cuda_home()
        if home is None:
            return 1
        print(home)
    elif args.gencode:
        print("\n".join(gencode_flags(args.archs)))
    elif args.clang_command:
        root = make_clang_cuda_root(os.path.abspath(args.clang_command))
        print("\n".join([clang()] + clang_device_flags(root, args.archs)))
    elif args.nvcc_command:
        if not args.shim:
            parser.error("--nvcc-command needs --shim")
        print("\n".join([nvcc()] + nvcc_flags(args.shim, args.archs)))
    elif args.bazelrc:
        if args.archs:
            os.environ[CUDA_ARCHS_ENV] = args.archs
        print(_bazelrc(cuda=args.cuda))
    else:
        print(f"tensorflow {tf_version()} at {lib_dir()}")
        print("compile:", " ".join(compile_flags()))
        print("avx2:   ", " ".join(AVX2_FLAGS))
        print("avx512: ", " ".join(AVX512_FLAGS))
        print("xla:    ", " ".join(xla_compile_flags()))
        print("link:   ", " ".join(link_flags(xla=True)))
        if args.cuda:
            shim = "<shim>"
            print("cuda:   ", cuda_home() or "no nvcc found", cuda_archs_string(args.archs))
            print("nvcc:   ", " ".join(nvcc_flags(shim, args.archs)) if cuda_home() else "-")
            print("host:   ", " ".join(cuda_host_flags(shim)) if cuda_home() else "-")
    return 0


if __name__ == "__main__":
    sys.exit(main())
