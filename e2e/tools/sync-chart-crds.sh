#!/usr/bin/env bash
# Copies the generated CRDs (crds/*.yaml, written by
# `cargo run -p peerfill-crds --bin crdgen`) into the chart's crds/ folder,
# byte for byte, and removes chart CRDs that no longer exist upstream.
# e2e/tests/chart.rs fails while the two folders differ.
#
#   e2e/tools/sync-chart-crds.sh          # copy
#   e2e/tools/sync-chart-crds.sh --check  # only report differences (exit 1)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
src="${repo}/crds"
dst="${repo}/charts/peerfill/crds"
check=0
case "${1:-}" in
  "") ;;
  --check) check=1 ;;
  *) echo "usage: $0 [--check]" >&2; exit 2 ;;
esac

shopt -s nullglob
sources=("$src"/*.yaml)
if [ "${#sources[@]}" -eq 0 ]; then
  echo "sync-chart-crds: no generated CRDs in ${src}; run: cargo run -p peerfill-crds --bin crdgen" >&2
  exit 1
fi

mkdir -p "$dst"
differ=0
for f in "${sources[@]}"; do
  target="${dst}/$(basename "$f")"
  if ! cmp -s "$f" "$target"; then
    differ=1
    if [ "$check" -eq 1 ]; then
      echo "differs: ${target#"$repo"/} (from ${f#"$repo"/})" >&2
    else
      cp "$f" "$target"
      echo "updated: ${target#"$repo"/}" >&2
    fi
  fi
done
for target in "$dst"/*.yaml; do
  if [ ! -e "${src}/$(basename "$target")" ]; then
    differ=1
    if [ "$check" -eq 1 ]; then
      echo "stale: ${target#"$repo"/} (no ${src#"$repo"/}/$(basename "$target"))" >&2
    else
      rm -f "$target"
      echo "removed: ${target#"$repo"/}" >&2
    fi
  fi
done
if [ "$check" -eq 1 ] && [ "$differ" -eq 1 ]; then
  echo "sync-chart-crds: chart CRDs are out of date; run e2e/tools/sync-chart-crds.sh" >&2
  exit 1
fi
exit 0
