#!/usr/bin/env bash
# CI for the Bazel build: offline, from a clean output base, then once more through bazelisk.
#
#   tools/bazel_ci.sh [extra bazel test args...]
#
# Installs Debian's bazel-bootstrap (Bazel 4.2.3) and npm's @bazel/bazelisk when missing. Exits
# non-zero on any failure. Leaves no bazel-* symlinks and no output base behind.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

log() { printf '\n=== %s\n' "$*"; }

as_root() {
  if [[ $(id -u) == 0 ]]; then "$@"; else sudo "$@"; fi
}

if ! command -v bazel-4 >/dev/null 2>&1 && ! command -v bazel >/dev/null 2>&1; then
  log "installing bazel-bootstrap"
  as_root apt-get update
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y bazel-bootstrap
fi
# Debian's /usr/bin/bazel wrapper reads USE_BAZEL_VERSION as a version *number*; the path form
# belongs to bazelisk's .bazeliskrc only.
unset USE_BAZEL_VERSION
bazel=(bazel)
command -v bazel >/dev/null 2>&1 || bazel=(bazel-4)

# Not `npm install -g`: the package also installs a `bazel` command, which with npm's /usr prefix
# would collide with Debian's /usr/bin/bazel.
if command -v bazelisk >/dev/null 2>&1; then
  bazelisk=(bazelisk)
else
  npm_dir="${XDG_CACHE_HOME:-$HOME/.cache}/tf_kld/bazelisk"
  if [[ ! -x "$npm_dir/node_modules/.bin/bazelisk" ]]; then
    log "installing @bazel/bazelisk into $npm_dir"
    mkdir -p "$npm_dir"
    npm install --prefix "$npm_dir" --no-save --no-audit --no-fund @bazel/bazelisk >/dev/null
  fi
  bazelisk=("$npm_dir/node_modules/.bin/bazelisk")
fi

log "configure"
./configure.sh

output_base="$(mktemp -d "${TMPDIR:-/tmp}/tf_kld_bazel.XXXXXX")"
cleanup() {
  "${bazel[@]}" --output_base="$output_base" shutdown >/dev/null 2>&1 || true
  chmod -R u+w "$output_base" 2>/dev/null || true
  rm -rf "$output_base"
}
trap cleanup EXIT

# --symlink_prefix=/ : no bazel-* symlinks into an output base that is deleted at the end.
start=$SECONDS
log "bazel test //... (clean output base $output_base)"
status=0
"${bazel[@]}" --output_base="$output_base" test --symlink_prefix=/ //... "$@" || status=$?
log "bazel: clean build + test took $((SECONDS - start)) s (exit $status)"

log "bazelisk build //... (${bazelisk[*]})"
start=$SECONDS
# Bazelisk reads .bazeliskrc (written by configure.sh) and must start the local Bazel offline.
"${bazelisk[@]}" --output_base="$output_base" build --symlink_prefix=/ //...
log "bazelisk: took $((SECONDS - start)) s"
if [[ $status != 0 ]]; then
  log "FAILED: bazel test //... exited with $status"
  exit "$status"
fi
log "OK"
