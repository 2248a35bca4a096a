# syntax=docker/dockerfile:1
# Build: docker build --build-arg SWITCHYARD_GIT_COMMIT=$(git rev-parse --short HEAD) -t switchyard .
# Run:   docker run -p 8080:8080 -p 127.0.0.1:9090:9090 -e SWITCHYARD_ADMIN_TOKEN=... \
#          -v $PWD/config:/etc/switchyard:ro -v switchyard-state:/var/lib/switchyard switchyard
#
# CI cannot pull base images: .ci/docker-build-check copies exactly the paths the COPY lines of
# the build stage name (minus .dockerignore) into an empty directory and runs the cargo command
# of the RUN line below there, and hadolint lints this file. Keep one `cargo build` line.

FROM rust:1-slim-bookworm AS build
WORKDIR /src
# `switchyard --version` names this commit (the build context has no .git).
ARG SWITCHYARD_GIT_COMMIT=unknown
# No dependency stubs: BuildKit cache mounts keep the registry and target/ between builds, so a
# code change rebuilds only Switchyard, and nothing here repeats the target list of Cargo.toml.
COPY Cargo.toml Cargo.lock build.rs ./
COPY src src
COPY benches benches
# Stripped of symbols and debug info: 13 MB instead of 61 MB with the release profile's line tables
# (measured at 48c40f0; aws-lc-rs added 2 MB).
RUN --mount=type=cache,id=switchyard-cargo-registry,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,id=switchyard-target,target=/src/target,sharing=locked \
    CARGO_PROFILE_RELEASE_STRIP=symbols cargo build --release --locked --bin switchyard \
    && install -D -m 0755 target/release/switchyard /out/switchyard

FROM debian:bookworm-slim
# A numeric user, so Kubernetes' runAsNonRoot can verify it; the passwd entry is for ps and ls.
RUN groupadd --system --gid 10001 switchyard \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/switchyard \
       --shell /usr/sbin/nologin switchyard \
    && mkdir -p /etc/switchyard /var/lib/switchyard \
    && chown 10001:10001 /var/lib/switchyard
COPY --from=build /out/switchyard /usr/local/bin/switchyard
# The CA bundle (the build image has it; bookworm-slim does not), where Switchyard looks for the
# system's: https webhooks, an https Prometheus or probe URL and `ctl --admin https://` verify
# against it unless a ca_file is set.
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY config/switchyard.toml /etc/switchyard/switchyard.toml
USER 10001:10001
WORKDIR /var/lib/switchyard
# The state file and the audit log live here; keep it on a volume so colors survive restarts.
# The admin listener (/healthz, /metrics, the API) listens on every interface of the container
# so probes and Prometheus reach it: publish it on the host's loopback only (as above), or keep
# it behind a ClusterIP Service (deploy/kubernetes). Mutating calls always need the bearer token.
# The proxy listener comes from the config (0.0.0.0:8080); any listener can be changed with
# SWITCHYARD__PROXY__LISTEN, SWITCHYARD__PROXY__PREVIEW_LISTEN, SWITCHYARD__ADMIN__LISTEN.
# SWITCHYARD_CONFIG is the config file of `serve` (CMD) and of `healthcheck` (HEALTHCHECK) alike:
# to run another file, set it rather than passing `serve --config`, so that both read the same.
ENV SWITCHYARD_CONFIG=/etc/switchyard/switchyard.toml \
    SWITCHYARD__STATE__PATH=/var/lib/switchyard/switchyard.json \
    SWITCHYARD__ADMIN__LISTEN=0.0.0.0:9090
VOLUME ["/etc/switchyard", "/var/lib/switchyard"]
EXPOSE 8080 8081 9090
STOPSIGNAL SIGTERM
# GET /healthz on the admin listener where the config and the environment put it (its port,
# https with [admin] tls_cert), exit 0 or 1 within 3 s: a config with another admin port or TLS
# does not leave the container unhealthy.
HEALTHCHECK --interval=10s --timeout=5s CMD ["switchyard", "healthcheck"]
ENTRYPOINT ["switchyard"]
CMD ["serve"]
