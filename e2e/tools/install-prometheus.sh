#!/usr/bin/env bash
# Installs Debian's prometheus (prometheus + promtool) into <repo>/.tools/
# without root and prints the path of the prometheus binary.
#
# The tests start a real Prometheus against the local cluster (dashboard
# queries and the chart's alert rules). `apt-get download` fetches the .deb
# through apt, which checks it against the signed package index; `dpkg-deb -x`
# unpacks it under .tools/prometheus/. The binaries are Go programs linked
# only against libc, so the package's other dependencies (JavaScript of the
# classic web UI) are not needed for the HTTP API.
#
# Idempotent: when a prometheus is already unpacked it only prints the path.
# Progress goes to stderr; stdout is exactly the path, so callers can do
#   PROMETHEUS="$(e2e/tools/install-prometheus.sh)"
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
root="${repo}/.tools/prometheus"
dest="${root}/usr/bin/prometheus"

log() { printf 'install-prometheus: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

if [ -x "$dest" ] && "$dest" --version >/dev/null 2>&1; then
  printf '%s\n' "$dest"
  exit 0
fi

command -v apt-get >/dev/null 2>&1 || die "apt-get is needed (Debian/Ubuntu). Install Prometheus 2.x yourself and set PROMETHEUS=/path/to/prometheus."
command -v dpkg-deb >/dev/null 2>&1 || die "dpkg-deb is needed to unpack the package."

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
chmod 0755 "$work"  # apt's sandbox user must be able to write here

log "downloading Debian's prometheus package with apt-get download"
if ! (cd "$work" && apt-get download -q prometheus >"$work/apt.log" 2>&1); then
  cat "$work/apt.log" >&2
  die "apt-get download prometheus failed (no package index? run 'apt-get update' as root once)."
fi
deb="$(find "$work" -maxdepth 1 -name 'prometheus_*.deb' -print -quit)"
[ -n "$deb" ] || die "apt-get reported success but left no prometheus .deb in $work."

# Unpack next to the final place, then swap in one rename, so a concurrent
# caller never sees a half-unpacked tree.
mkdir -p "${repo}/.tools"
stage="$(mktemp -d "${repo}/.tools/prometheus.tmp.XXXXXX")"
dpkg-deb -x "$deb" "$stage" || die "dpkg-deb -x $deb failed."
"$stage/usr/bin/prometheus" --version >/dev/null 2>&1 || die "the unpacked prometheus does not run on this machine."
rm -rf "$root"
mv "$stage" "$root"
log "installed $("$dest" --version 2>&1 | head -n1) at ${dest}"
printf '%s\n' "$dest"
