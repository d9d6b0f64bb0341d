"""Entry point of //tests:tests: runs pytest over tests/test_*.py inside Bazel's runfiles.

tf_kld must come from the runfiles tree (where Bazel put the freshly built _kld_ops.so beside it),
never from the source tree or site-packages. Fails when pytest fails or collects nothing.
"""

import glob
import importlib.util
import os
import sys


def main():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # The library under test is the one Bazel built beside tf_kld in runfiles, not an override.
    os.environ.pop("TF_KLD_LIBRARY", None)
    here = os.path.dirname(os.path.abspath(__file__))  # <runfiles>/<workspace>/tests, unresolved
    workspace_root = os.path.dirname(here)
    # Python put this script's *resolved* directory (the source tree's tests/) first on sys.path;
    # drop it so helpers such as tests/_util.py are imported from runfiles too.
    source_dir = os.path.dirname(os.path.realpath(__file__))
    if source_dir != here:
        sys.path[:] = [p for p in sys.path if p != source_dir]

    spec = importlib.util.find_spec("tf_kld")
    package_dir = os.path.dirname(spec.origin) if spec and spec.origin else None
    if package_dir is None or os.path.dirname(package_dir) != workspace_root:
        sys.exit(f"tf_kld resolves to {package_dir}, not to the runfiles tree {workspace_root}")
    library = os.path.join(package_dir, "_kld_ops.so")
    if not os.path.exists(library):
        sys.exit(f"{library} is missing from runfiles")

    tests = sorted(glob.glob(os.path.join(here, "test_*.py")))
    if not tests:
        sys.exit(f"no tests/test_*.py in {here}")

    import pytest  # pylint: disable=import-outside-toplevel

    args = [
        "-p", "no:cacheprovider",  # runfiles are not a place to write a cache
        "--rootdir", workspace_root,
        "-ra",
    ]
    xml = os.environ.get("XML_OUTPUT_FILE")
    if xml:
        args.append(f"--junitxml={xml}")
    # Extra pytest arguments: bazel test //tests --test_arg=-k --test_arg=name
    args += sys.argv[1:] + tests
    code = pytest.main(args)
    if code == pytest.ExitCode.NO_TESTS_COLLECTED:
        print("pytest collected no tests", file=sys.stderr)
    sys.exit(int(code) if code else 0)


if __name__ == "__main__":
    main()
