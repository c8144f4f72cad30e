# syntax=docker/dockerfile:1
# peerfill operator image. Build from the repository root:
#   docker build -f images/operator.Dockerfile -t peerfill-operator:dev .

# --- build -------------------------------------------------------------------
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
# Cache mounts keep the registry and target dir between builds; the binary is
# copied out because the target cache is not part of the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked -p peerfill-operator \
 && install -D -m 0755 target/release/peerfill-operator /out/peerfill-operator

# --- runtime -----------------------------------------------------------------
# distroless/cc: glibc and libgcc only, no shell or package manager.
# The operator talks only to the API server: it runs as the image's nonroot
# user (65532), matching the chart's podSecurityContext.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/peerfill-operator /usr/local/bin/peerfill-operator
USER 65532:65532
EXPOSE 9463/tcp
ENTRYPOINT ["/usr/local/bin/peerfill-operator"]
