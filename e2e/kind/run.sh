#!/usr/bin/env bash
# Runs the e2e suite against a real Kubernetes cluster made with kind:
#   1. creates a kind cluster from e2e/kind/cluster.yaml (1 control plane,
#      3 workers, one of them a tainted pool);
#   2. builds the operator and agent images (images/*.Dockerfile) and loads
#      them into the cluster's nodes;
#   3. installs charts/peerfill with those images and waits for the rollout;
#   4. runs `cargo nextest run -p peerfill-e2e` with E2E_KUBECONFIG pointing
#      at the cluster, so the suite talks to it instead of its in-memory API.
# The cluster is deleted on exit unless KEEP_CLUSTER=1.
#
# Needs: docker (running), kind, kubectl, cargo with cargo-nextest, and helm
# (on PATH, in $HELM, or installed by e2e/tools/install-helm.sh on Linux amd64).
#
# Environment:
#   CLUSTER_NAME     kind cluster name                  (peerfill-e2e)
#   KEEP_CLUSTER     1 keeps the cluster afterwards     (0)
#   KIND_NODE_IMAGE  kindest/node image; >= v1.32 for the admission policy
#   IMAGE_TAG        tag of the built images            (e2e-<git short sha>)
#   NAMESPACE        release namespace                  (peerfill-system)
#   RELEASE          helm release name                  (peerfill)
#   HELM_EXTRA_ARGS  extra arguments for helm install, e.g. "--set agent.hostNetwork=true"
# Arguments after the options are passed to cargo nextest, e.g.
#   e2e/kind/run.sh -E 'test(distribution)'
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$repo"

CLUSTER_NAME="${CLUSTER_NAME:-peerfill-e2e}"
KEEP_CLUSTER="${KEEP_CLUSTER:-0}"
NAMESPACE="${NAMESPACE:-peerfill-system}"
RELEASE="${RELEASE:-peerfill}"
IMAGE_TAG="${IMAGE_TAG:-e2e-$(git rev-parse --short HEAD 2>/dev/null || echo dev)}"
OPERATOR_IMAGE="peerfill-operator"
AGENT_IMAGE="peerfill-agent"

log() { printf '\n==> %s\n' "$*" >&2; }
die() { printf 'e2e/kind/run.sh: ERROR: %s\n' "$*" >&2; exit 1; }

# --- tools -------------------------------------------------------------------
missing=()
for tool in docker kind kubectl cargo; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
[ "${#missing[@]}" -eq 0 ] || die "missing tools: ${missing[*]} (see docs/install.md, 'Run the e2e suite on kind')"
cargo nextest --version >/dev/null 2>&1 || die "cargo-nextest is missing: cargo install cargo-nextest --locked"
docker info >/dev/null 2>&1 || die "docker is installed but its daemon does not answer (is it running, may this user use it?)"

if [ -n "${HELM:-}" ]; then
  [ -x "$HELM" ] || die "HELM=$HELM is not an executable"
elif command -v helm >/dev/null 2>&1; then
  HELM="$(command -v helm)"
else
  log "helm not found; installing it under .tools/"
  HELM="$(e2e/tools/install-helm.sh)" || die "could not install helm; install helm >= 3.14 and retry"
fi

if kind get clusters 2>/dev/null | grep -qx "$CLUSTER_NAME"; then
  die "a kind cluster named $CLUSTER_NAME already exists; delete it (kind delete cluster --name $CLUSTER_NAME) or set CLUSTER_NAME"
fi

work="$(mktemp -d)"
kubeconfig="${work}/kubeconfig"
created=0

cleanup() {
  local rc=$?
  if [ "$created" -eq 1 ] && [ "$rc" -ne 0 ]; then
    log "failed (exit $rc): cluster state for diagnosis"
    kubectl --kubeconfig "$kubeconfig" get nodes -o wide >&2 || true
    kubectl --kubeconfig "$kubeconfig" -n "$NAMESPACE" get pods -o wide >&2 || true
    kubectl --kubeconfig "$kubeconfig" get distributions -A >&2 || true
    kubectl --kubeconfig "$kubeconfig" get nodefills >&2 || true
    kubectl --kubeconfig "$kubeconfig" -n "$NAMESPACE" logs -l app.kubernetes.io/component=operator --tail=100 --prefix >&2 || true
    kubectl --kubeconfig "$kubeconfig" -n "$NAMESPACE" logs -l app.kubernetes.io/component=agent --tail=50 --prefix >&2 || true
  fi
  if [ "$created" -eq 1 ]; then
    if [ "$KEEP_CLUSTER" = "1" ]; then
      local kept="${repo}/.tools/kind-${CLUSTER_NAME}.kubeconfig"
      mkdir -p "${repo}/.tools"
      cp "$kubeconfig" "$kept"
      log "keeping cluster $CLUSTER_NAME; kubeconfig: $kept (delete with: kind delete cluster --name $CLUSTER_NAME)"
    else
      log "deleting cluster $CLUSTER_NAME"
      kind delete cluster --name "$CLUSTER_NAME" >&2 || true
    fi
  fi
  rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- cluster -----------------------------------------------------------------
log "creating kind cluster $CLUSTER_NAME"
node_image_args=()
[ -n "${KIND_NODE_IMAGE:-}" ] && node_image_args=(--image "$KIND_NODE_IMAGE")
# Marked before the call: a half-created cluster is deleted too.
created=1
kind create cluster --name "$CLUSTER_NAME" --config e2e/kind/cluster.yaml \
  --kubeconfig "$kubeconfig" --wait 180s "${node_image_args[@]}"
export KUBECONFIG="$kubeconfig"
kubectl get nodes -o wide

# --- images ------------------------------------------------------------------
export DOCKER_BUILDKIT=1
log "building ${OPERATOR_IMAGE}:${IMAGE_TAG}"
docker build -f images/operator.Dockerfile -t "${OPERATOR_IMAGE}:${IMAGE_TAG}" .
log "building ${AGENT_IMAGE}:${IMAGE_TAG}"
docker build -f images/agent.Dockerfile -t "${AGENT_IMAGE}:${IMAGE_TAG}" .
log "loading images into the cluster's nodes"
kind load docker-image --name "$CLUSTER_NAME" "${OPERATOR_IMAGE}:${IMAGE_TAG}" "${AGENT_IMAGE}:${IMAGE_TAG}"

# --- chart -------------------------------------------------------------------
log "installing charts/peerfill as $RELEASE in $NAMESPACE"
extra_args=()
if [ -n "${HELM_EXTRA_ARGS:-}" ]; then
  read -r -a extra_args <<<"$HELM_EXTRA_ARGS"
fi
# pullPolicy Never: the images exist only on the nodes (kind load).
"$HELM" upgrade --install "$RELEASE" charts/peerfill \
  --kubeconfig "$kubeconfig" \
  --namespace "$NAMESPACE" --create-namespace \
  --set "operator.image.repository=${OPERATOR_IMAGE}" \
  --set "operator.image.tag=${IMAGE_TAG}" \
  --set operator.image.pullPolicy=Never \
  --set "agent.image.repository=${AGENT_IMAGE}" \
  --set "agent.image.tag=${IMAGE_TAG}" \
  --set agent.image.pullPolicy=Never \
  --wait --timeout 5m \
  "${extra_args[@]}"

log "waiting for the rollout"
selector="app.kubernetes.io/instance=${RELEASE}"
kubectl -n "$NAMESPACE" rollout status deployment -l "${selector},app.kubernetes.io/component=operator" --timeout=180s
kubectl -n "$NAMESPACE" rollout status daemonset -l "${selector},app.kubernetes.io/component=agent" --timeout=300s
kubectl wait --for=condition=Established crd/distributions.peerfill.dev crd/nodefills.peerfill.dev --timeout=60s
kubectl -n "$NAMESPACE" get pods -o wide

# --- e2e suite ---------------------------------------------------------------
log "running the e2e suite against the cluster"
# The suite's HTTP origin runs in the test process on this host; kind's
# nodes reach the host at the gateway of the docker network "kind".
gateway="$(docker network inspect kind -f '{{range .IPAM.Config}}{{.Gateway}} {{end}}' \
  | tr ' ' '\n' | grep -m1 -E '^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$')" \
  || die "no IPv4 gateway on the docker network kind"
# Without arguments, the cluster suite (the stand-in's own tests need no cluster).
[ "$#" -gt 0 ] || set -- -E 'binary(/cluster_/)'
E2E_KUBECONFIG="$kubeconfig" \
E2E_NAMESPACE="$NAMESPACE" \
E2E_RELEASE="$RELEASE" \
E2E_ORIGIN_LISTEN="${gateway}:0" \
E2E_ORIGIN_HOST="$gateway" \
  cargo nextest run -p peerfill-e2e --locked "$@"
log "e2e suite passed on kind cluster $CLUSTER_NAME"
