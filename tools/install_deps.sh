#!/usr/bin/env bash
# Installs requirements-dev.txt into $PYTHON (default python3) where missing or at another version,
# saying what and where; quick when all is there. Also g++ (Debian) when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

mapfile -t need < <("$PYTHON" - requirements-dev.txt <<'PY'
import sys
from importlib import metadata
for line in open(sys.argv[1]):
    req = line.split("#")[0].strip()
    if not req:
        continue
    name, _, version = req.partition("==")
    try:
        if metadata.version(name) == version:
            continue
    except metadata.PackageNotFoundError:
        pass
    print(req)
PY
)
if [ ${#need[@]} -gt 0 ]; then
  prefix=$("$PYTHON" -c 'import sys; print(sys.prefix)')
  echo "tf_kld: installing ${need[*]} into $prefix (pip, from PyPI)"
  # (pip's warnings about find-links folders a machine's pip.conf names but lacks are dropped)
  "$PYTHON" -m pip install --disable-pip-version-check -q "${need[@]}" \
    2> >(grep -v -E "^WARNING: Location '.*' is ignored: it is neither a file nor a directory" >&2)
fi
if ! command -v g++ >/dev/null; then
  echo "tf_kld: installing g++ (apt-get)"
  apt-get update -q && apt-get install -y -q g++
fi
