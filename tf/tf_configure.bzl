"""Repository rule that finds the pip-installed TensorFlow and the Python interpreter that has it.

configure.sh passes the paths with --repo_env (see tools/build_flags.py --bazelrc). Nothing is copied:
TensorFlow's include dir (~20k headers) and its framework library are symlinked into the repository.
"""

_ENV = [
    "TF_KLD_PYTHON",
    "TF_KLD_TF_INCLUDE",
    "TF_KLD_TF_LIB",
    "TF_KLD_TF_FRAMEWORK",
]

# Files that would turn a directory of the symlinked include tree into a Bazel package (or repository)
# and so hide its headers from glob(); directories holding them are rebuilt as real directories.
_MARKERS = ["BUILD", "BUILD.bazel", "WORKSPACE", "WORKSPACE.bazel"]

_PROBE = """
import os, sys
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import tensorflow as tf
lib = next((f[3:] for f in tf.sysconfig.get_link_flags() if f.startswith("-l:")),
           "libtensorflow_framework.so.2")
print(tf.sysconfig.get_include())
print(tf.sysconfig.get_lib())
print(lib)
"""

def _fail(msg):
    fail("tf_configure: %s\nRun ./configure.sh (or set PYTHON_BIN_PATH and run it) first." % msg)

def _probe(ctx, python):
    result = ctx.execute([python, "-c", _PROBE], timeout = 300)
    if result.return_code != 0:
        _fail("%s cannot import tensorflow:\n%s" % (python, result.stderr))
    lines = result.stdout.strip().split("\n")
    if len(lines) < 3:
        _fail("unexpected output from %s:\n%s" % (python, result.stdout))
    return lines[-3:]

def _symlink_tree(ctx, src, dst):
    """Symlinks src as dst, splitting out only the directories that hold Bazel marker files."""
    args = ["find", "-H", src, "-type", "f", "("]
    for i, name in enumerate(_MARKERS):
        args += (["-o"] if i else []) + ["-name", name]
    args.append(")")
    result = ctx.execute(args)
    if result.return_code != 0:
        _fail("cannot list %s: %s" % (src, result.stderr))
    markers = [p[len(src) + 1:] for p in result.stdout.strip().split("\n") if p]
    if not markers:
        ctx.symlink(src, dst)
        return

    # Every ancestor directory of a marker file must be a real directory.
    real_dirs = {"": True}
    for marker in markers:
        parts = marker.split("/")[:-1]
        for i in range(len(parts)):
            real_dirs["/".join(parts[:i + 1])] = True
    for rel in real_dirs:
        for child in ctx.path(src + ("/" + rel if rel else "")).readdir():
            child_rel = (rel + "/" if rel else "") + child.basename
            if child_rel in real_dirs or child.basename in _MARKERS:
                continue
            ctx.symlink(child, dst + "/" + child_rel)

def _tf_configure_impl(ctx):
    env = ctx.os.environ
    python = env.get("TF_KLD_PYTHON", "")
    if not python:
        # Without configure.sh's .bazelrc the C++ flags (-std=c++17, TF's ABI) are missing too.
        _fail("TF_KLD_PYTHON is not set")
    if not ctx.path(python).exists:
        _fail("TF_KLD_PYTHON=%s does not exist" % python)
    # configure.sh passes all four; with only the interpreter given, ask its TensorFlow.
    include = env.get("TF_KLD_TF_INCLUDE", "")
    lib_dir = env.get("TF_KLD_TF_LIB", "")
    framework = env.get("TF_KLD_TF_FRAMEWORK", "")
    if not (include and lib_dir and framework):
        include, lib_dir, framework = _probe(ctx, python)

    if not ctx.path(include + "/tensorflow/core/framework/op.h").exists:
        _fail("%s is not TensorFlow's include dir" % include)
    framework_path = ctx.path(lib_dir + "/" + framework)
    if not framework_path.exists:
        _fail("%s does not exist" % framework_path)

    _symlink_tree(ctx, include, "include")
    ctx.symlink(framework_path, framework)

    # libtensorflow_cc provides XLA's op-kernel registry (for ops that lower themselves to XLA).
    tf_cc = framework.replace("tensorflow_framework", "tensorflow_cc")
    has_tf_cc = ctx.path(lib_dir + "/" + tf_cc).exists
    if has_tf_cc:
        ctx.symlink(lib_dir + "/" + tf_cc, tf_cc)

    ctx.template("BUILD", ctx.attr._build_tpl, {
        "%{framework}": framework,
        "%{python}": python,
        "%{tf_cc}": repr([tf_cc] if has_tf_cc else []),
    })
    ctx.file("tf_paths.bzl", "\n".join([
        "TF_PYTHON = %r" % python,
        "TF_INCLUDE = %r" % include,
        "TF_LIB = %r" % lib_dir,
        "TF_FRAMEWORK = %r" % framework,
        "",
    ]))

tf_configure = repository_rule(
    implementation = _tf_configure_impl,
    environ = _ENV,
    local = True,
    attrs = {
        "_build_tpl": attr.label(default = Label("//tf:BUILD.tpl")),
    },
)
