# syntax=docker/dockerfile:1
# Build: docker build -t switchyard .
# Run:   docker run -p 8080:8080 -p 127.0.0.1:9090:9090 -e SWITCHYARD_ADMIN_TOKEN=... \
#          -v $PWD/config:/etc/switchyard:ro -v switchyard-state:/var/lib/switchyard switchyard

FROM rust:1-slim-bookworm AS build
WORKDIR /src
# Dependencies first, so code changes do not rebuild them.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src benches && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && echo 'fn main() {}' > benches/stats.rs && echo 'fn main() {}' > benches/routing.rs \
    && cargo build --release --locked && rm -rf src benches
COPY src src
COPY benches benches
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin switchyard

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /var/lib/switchyard --shell /usr/sbin/nologin switchyard \
    && mkdir -p /etc/switchyard /var/lib/switchyard && chown switchyard /var/lib/switchyard
COPY --from=build /src/target/release/switchyard /usr/local/bin/switchyard
COPY config/switchyard.toml /etc/switchyard/switchyard.toml
USER switchyard
WORKDIR /var/lib/switchyard
# The state file and the audit log live here; keep it on a volume so colors survive restarts.
ENV SWITCHYARD__STATE__PATH=/var/lib/switchyard/switchyard.json \
    SWITCHYARD__ADMIN__LISTEN=0.0.0.0:9090
VOLUME ["/etc/switchyard", "/var/lib/switchyard"]
EXPOSE 8080 8081 9090
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=2s CMD ["switchyard", "ctl", "--admin", "http://127.0.0.1:9090", "status", "--json"]
ENTRYPOINT ["switchyard"]
CMD ["serve", "--config", "/etc/switchyard/switchyard.toml"]
