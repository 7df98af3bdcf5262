#!/usr/bin/env bash
# Build the stax image and smoke-run it where a Docker engine is reachable:
#   1. docker build (the repository's Dockerfile);
#   2. the image runs as a non-root user;
#   3. `stax demo` inside the container routes its tour;
#   4. the default command (a gateway on the bundled deploy/graph.example.yaml) turns
#      /readyz 200 with a graph version, answers stax errors on its listener, reports
#      healthy through the image's HEALTHCHECK, and exits 0 when `docker stop` drains it;
#   5. with --compose: deploy/compose.yaml comes up and a request crosses gateway, sidecars
#      and apps (web in baseline calls orders, which lands on team-a for env feature-1).
#
# Usage: deploy/docker-smoke.sh [--compose] [--keep]
#   STAX_SMOKE_IMAGE   image tag to build (default stax:smoke)
# Exit status: 0 passed, 1 failed, 77 skipped (no docker CLI, or no engine reachable).
set -euo pipefail

SKIP=77
IMAGE="${STAX_SMOKE_IMAGE:-stax:smoke}"
COMPOSE=0
KEEP=0
for arg in "$@"; do
  case "$arg" in
    --compose) COMPOSE=1 ;;
    --keep) KEEP=1 ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "docker-smoke: unknown argument $arg (try --help)" >&2; exit 2 ;;
  esac
done

cd "$(dirname "$0")/.."

say() { printf 'docker-smoke: %s\n' "$*"; }
fail() { printf 'docker-smoke: FAILED: %s\n' "$*" >&2; exit 1; }

# -- is there an engine? ------------------------------------------------------------------------
if ! command -v docker >/dev/null 2>&1; then
  say "SKIPPED: the docker CLI is not installed; nothing was built or run." >&2
  exit "$SKIP"
fi
with_timeout() {  # coreutils timeout where there is one (not on stock macOS)
  if command -v timeout >/dev/null 2>&1; then timeout "$@"; else shift; "$@"; fi
}
if ! engine_error=$(with_timeout 20 docker version --format '{{.Server.Version}}' 2>&1); then
  say "SKIPPED: no Docker engine is reachable (docker version failed); nothing was built or run." >&2
  say "  $(printf '%s' "$engine_error" | tr -s ' \n' '  ' | sed 's/^ //')" >&2
  say "  Start Docker (or set DOCKER_HOST / docker context) and run this again." >&2
  exit "$SKIP"
fi
say "engine $engine_error"

http() {  # http URL [HEADER...] -> prints "STATUS BODY" (curl, else python3)
  local url=$1; shift
  if command -v curl >/dev/null 2>&1; then
    local args=(-s -o /dev/stdout -w ' %{http_code}' --max-time 5)
    for h in "$@"; do args+=(-H "$h"); done
    local out
    out=$(curl "${args[@]}" "$url" || true)
    printf '%s %s\n' "${out##* }" "${out% *}"
  else
    python3 - "$url" "$@" <<'PY'
import sys, urllib.request, urllib.error
req = urllib.request.Request(sys.argv[1], headers=dict(h.split(": ", 1) for h in sys.argv[2:]))
try:
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(req, timeout=5) as r:
        print(r.status, r.read().decode())
except urllib.error.HTTPError as e:
    print(e.code, e.read().decode())
except OSError:
    print("000")
PY
  fi
}

answers() {  # answers "STATUS BODY" WANT_STATUS NEEDLE: the status matches, the body has NEEDLE
  [ "${1%% *}" = "$2" ] && grep -q -- "$3" <<<"$1"
}

CID=""
cleanup() {
  if [ -n "$CID" ] && [ "$KEEP" = 0 ]; then docker rm -f "$CID" >/dev/null 2>&1 || true; fi
  if [ "$COMPOSE" = 1 ] && [ "$KEEP" = 0 ]; then
    docker compose -f deploy/compose.yaml down --volumes --remove-orphans >/dev/null 2>&1 || true
  fi
}
trap cleanup EXIT

# -- 1. build -----------------------------------------------------------------------------------
say "building $IMAGE"
docker build -t "$IMAGE" . || fail "docker build"

# -- 2. non-root --------------------------------------------------------------------------------
uid=$(docker run --rm --entrypoint id "$IMAGE" -u) || fail "running id in the image"
[ "$uid" != 0 ] || fail "the image runs as root"
say "ok: runs as uid $uid"

# -- 3. stax demo -------------------------------------------------------------------------------
demo=$(docker run --rm "$IMAGE" demo 2>&1) || { echo "$demo" >&2; fail "stax demo exited non-zero"; }
grep -q 'web=local:feature-1@v1' <<<"$demo" || { echo "$demo" >&2; fail "stax demo did not route"; }
say "ok: stax demo"

# -- 4. gateway on the example graph ------------------------------------------------------------
CID=$(docker run -d --health-interval 1s --health-start-period 0s \
        -p 127.0.0.1::8080 -p 127.0.0.1::9901 "$IMAGE")
admin=$(docker port "$CID" 9901/tcp | head -n1)
listen=$(docker port "$CID" 8080/tcp | head -n1)
ready=""
for _ in $(seq 1 60); do
  ready=$(http "http://$admin/readyz")
  [ "${ready%% *}" = 200 ] && break
  sleep 0.5
done
[ "${ready%% *}" = 200 ] || { docker logs "$CID" >&2; fail "/readyz never answered 200 (last: $ready)"; }
grep -q '"graph_version"' <<<"$ready" || fail "/readyz has no graph_version: $ready"
say "ok: gateway /readyz: ${ready#* }"

# The example graph's endpoints are 127.0.0.1 ports with nothing behind them in the
# container: a resolved request must come back as stax's own 502, an unknown env as 404.
got=$(http "http://$listen/" "Host: web" "x-stax-env: feature-1")
answers "$got" 502 upstream_unavailable || fail "Host: web in feature-1: want 502 upstream_unavailable, got $got"
got=$(http "http://$listen/" "Host: web" "x-stax-env: no-such-env")
answers "$got" 404 unknown_env || fail "unknown env: want 404 unknown_env, got $got"
say "ok: gateway routes (502 upstream_unavailable, 404 unknown_env)"

health=""
for _ in $(seq 1 30); do
  health=$(docker inspect -f '{{.State.Health.Status}}' "$CID")
  [ "$health" = healthy ] && break
  sleep 1
done
[ "$health" = healthy ] || fail "HEALTHCHECK status is '$health', not healthy"
say "ok: HEALTHCHECK healthy"

docker stop -t 30 "$CID" >/dev/null
code=$(docker inspect -f '{{.State.ExitCode}}' "$CID")
[ "$code" = 0 ] || { docker logs "$CID" >&2; fail "gateway exited $code after SIGTERM (want 0: drained)"; }
say "ok: SIGTERM drains and exits 0"

# -- 5. compose (optional) ----------------------------------------------------------------------
if [ "$COMPOSE" = 1 ]; then
  docker compose version >/dev/null 2>&1 || fail "--compose needs the docker compose plugin"
  docker compose -f deploy/compose.yaml config --quiet || fail "deploy/compose.yaml does not validate"
  docker compose -f deploy/compose.yaml up --build -d || fail "docker compose up"
  got=""
  for _ in $(seq 1 60); do
    got=$(http "http://127.0.0.1:8080/" "Host: web" "x-stax-env: feature-1")
    answers "$got" 200 'orders=ancestor:team-a' && break
    sleep 1
  done
  answers "$got" 200 'orders=ancestor:team-a' \
    || { docker compose -f deploy/compose.yaml logs >&2; fail "compose: web -> orders in feature-1: $got"; }
  say "ok: compose: gateway -> web (baseline) -> orders (team-a) for env feature-1"
fi

say "PASSED"
