# syntax=docker/dockerfile:1
# peerfill node agent image. Build from the repository root:
#   docker build -f images/agent.Dockerfile -t peerfill-agent:dev .

# --- build -------------------------------------------------------------------
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked -p peerfill-agent \
 && install -D -m 0755 target/release/peerfill-agent /out/peerfill-agent

# --- runtime -----------------------------------------------------------------
# distroless/cc: glibc and libgcc only, no shell or package manager.
# The agent runs as root (uid 0) on purpose: it creates and writes the node's
# data directory through a hostPath volume (/var/lib/peerfill by default),
# which is owned by root on the node, and it must be able to replace files it
# placed there earlier. The chart drops every capability, forbids privilege
# escalation and keeps the root filesystem read-only, so root here is only
# file ownership on the data directory, not extra kernel privilege.
# distroless publishes no version tags; pin a digest (@sha256:...) for releases.
# hadolint ignore=DL3007
FROM gcr.io/distroless/cc-debian12:latest
COPY --from=build /out/peerfill-agent /usr/local/bin/peerfill-agent
# hadolint ignore=DL3002
USER 0:0
EXPOSE 7443/udp 9464/tcp
ENTRYPOINT ["/usr/local/bin/peerfill-agent"]
