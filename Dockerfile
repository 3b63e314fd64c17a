# One image for the four programs: worker, enqueue, the reference gateway
# and the HTTP API. docker-compose.yml runs them; `docker build -t boxq .` alone works
# too, e.g. `docker run --rm boxq worker -h`.

# Build: static binaries (no cgo), so the runtime image needs no Go and no libc
# of a matching version.
FROM golang:1.26-bookworm AS build
WORKDIR /src
# Modules first: this layer is reused until go.mod or go.sum change.
COPY go.mod go.sum ./
RUN go mod download
COPY . .
RUN CGO_ENABLED=0 go build -trimpath -ldflags='-s -w' -o /out/ ./cmd/worker ./cmd/enqueue ./cmd/gateway ./cmd/api

# Run: bash runs every command of a sandbox (wrap/ builds bash scripts),
# bubblewrap isolates them when the container may create namespaces (see
# docker-compose.bwrap.yml), ca-certificates lets a worker reach an HTTPS
# gateway.
FROM debian:bookworm-slim
RUN apt-get update \
	&& DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends bash bubblewrap ca-certificates \
	&& rm -rf /var/lib/apt/lists/*
# A fixed non-root uid, so volumes keep their owner across rebuilds. The
# gateway's state dir is created here, owned by that user, so that a named
# volume mounted on it starts with the right owner.
RUN useradd --uid 10001 --user-group --create-home --home-dir /home/boxq --shell /bin/bash boxq \
	&& install -d -o boxq -g boxq /var/lib/boxq/gateway
COPY --from=build /out/ /usr/local/bin/
# The example batch, for `enqueue -f /examples/demo.jsonl -wait`.
COPY examples/ /examples/
USER boxq
WORKDIR /home/boxq
# 8085: the gateway's API (-addr); 9090: a worker's /metrics, /healthz and
# dashboard (-http).
EXPOSE 8085 9090
CMD ["worker", "-h"]
