#!/usr/bin/env bash
# A mesh on one machine: Redis, three services (web -> orders -> payments), each with its
# sidecar on its own loopback ports; calls through the chain, then `fastmesh mesh status`.
# Everything it starts is stopped on exit (Ctrl-C included). See docs/mesh.md.
#
#   examples/mesh-demo.sh              # run the demo, print one status table, stop
#   examples/mesh-demo.sh --watch      # ... then keep `fastmesh mesh status` live until Ctrl-C
#
# Ports: DEMO_PORT (default 18000) + 0..39. Without redis-server (or with DEMO_REGISTRY=file),
# a registry file is used.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
base="${DEMO_PORT:-18000}"
if [[ -x "$root/.venv/bin/python" ]]; then
    py="$root/.venv/bin/python"
else
    py="${PYTHON:-python3}"
fi
fm=("$py" -m fastmesh)
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"

work="$(mktemp -d "${TMPDIR:-/tmp}/fastmesh-demo.XXXXXX")"
pids=()
stop_all() {
    trap - EXIT INT TERM
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do kill "${pids[i]}" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$work"
    echo "demo: stopped everything"
}
trap stop_all EXIT
trap 'exit 130' INT TERM

start() {   # start NAME CMD...: in the background, output to $work/NAME.log
    # In a session of its own, so that Ctrl-C reaches only the foreground command and this
    # script, whose trap then stops the pods first and Redis last.
    local name="$1"; shift
    setsid "$@" >"$work/$name.log" 2>&1 &
    pids+=("$!")
}

wait_http() {   # wait_http URL [SECONDS]: until it answers 200 (bounded)
    local url="$1" tries=$(( ${2:-10} * 10 ))
    for ((n = 0; n < tries; n++)); do
        if [[ "$(curl -s -o /dev/null -w '%{http_code}' "$url")" == 200 ]]; then return 0; fi
        sleep 0.1
    done
    echo "demo: $url never answered 200; logs in $work:" >&2
    tail -n 5 "$work"/*.log >&2
    if grep -qs "Address already in use" "$work"/*-sidecar.log; then
        # Also right after a previous run: the sidecar refuses a port that still has
        # connections in TIME_WAIT (about a minute).
        echo "demo: a port is taken; wait a minute or choose others: DEMO_PORT=19100 $0" >&2
    fi
    return 1
}

# -- the registry --------------------------------------------------------------------------------
if [[ "${DEMO_REGISTRY:-}" != file ]] && command -v redis-server >/dev/null; then
    redis_port=$((base + 39))
    start redis redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no \
        --dir "$work"
    registry="redis://127.0.0.1:$redis_port/0"
    for ((n = 0; n < 50; n++)); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$redis_port") 2>/dev/null; then break; fi
        sleep 0.1
    done
    echo "demo: redis-server on 127.0.0.1:$redis_port"
else
    # A static registry: the file lists each service's inbound listener and admin API.
    registry="file:$work/mesh.yaml"
    cat >"$work/mesh.yaml" <<EOF
services:
  web:      [{id: web-1, address: "127.0.0.1:$((base + 10))",
              metadata: {fastmesh.admin: "127.0.0.1:$((base + 30))"}}]
  orders:   [{id: orders-1, address: "127.0.0.1:$((base + 11))",
              metadata: {fastmesh.admin: "127.0.0.1:$((base + 31))"}}]
  payments: [{id: payments-1, address: "127.0.0.1:$((base + 12))",
              metadata: {fastmesh.admin: "127.0.0.1:$((base + 32))"}}]
EOF
    echo "demo: registry file $work/mesh.yaml (no redis-server, or DEMO_REGISTRY=file)"
fi

# -- three pods: app + sidecar (app :base+0..2, inbound +10.., outbound +20.., admin +30..) --------
services=(web orders payments)
for i in 0 1 2; do
    name="${services[i]}"
    app=$((base + i)) inbound=$((base + 10 + i)) outbound=$((base + 20 + i)) admin=$((base + 30 + i))
    if ((i < 2)); then
        start "$name-app" "$py" "$here/mesh_app.py" --name "$name" --port "$app" \
            --next "${services[i + 1]}" --outbound "$outbound"
    else
        start "$name-app" "${fm[@]}" echo --listen "127.0.0.1:$app"     # the last one: echo
    fi
    start "$name-sidecar" "${fm[@]}" sidecar --service "$name" --app-port "$app" \
        --registry "$registry" --inbound "127.0.0.1:$inbound" --outbound "127.0.0.1:$outbound" \
        --admin "127.0.0.1:$admin" --instance-id "$name-1" --ttl 5 --drain-timeout 2
done
for i in 0 1 2; do wait_http "http://127.0.0.1:$((base + 30 + i))/ready" 15; done
echo "demo: 3 pods ready"
grep -h "sidecar for" "$work"/*-sidecar.log | sed 's/^/  /'

# -- calls through the chain ---------------------------------------------------------------------
echo
echo "demo: curl -H 'Host: web' http://127.0.0.1:$((base + 10))/checkout   (web's inbound listener)"
curl -s -H 'Host: web' "http://127.0.0.1:$((base + 10))/checkout"
echo
echo "demo: 4 seconds of traffic (web -> orders -> payments), and now and then a call from"
echo "      orders' app to a service that does not exist (its sidecar answers 503)"
load_until=$((SECONDS + 4))
(
    n=0
    while ((SECONDS < load_until)); do
        curl -s -o /dev/null -H 'Host: web' "http://127.0.0.1:$((base + 10))/checkout" || true
        if ((++n % 20 == 0)); then
            curl -s -o /dev/null -H 'Host: nosuch' "http://127.0.0.1:$((base + 21))/x" || true
        fi
    done
) &
pids+=("$!")
sleep 1
echo
echo "demo: fastmesh mesh status --registry $registry --once --interval 2"
"${fm[@]}" mesh status --registry "$registry" --once --interval 2
echo "demo: web's sidecar: curl http://127.0.0.1:$((base + 30))/metrics (requests and latency per pair)"
curl -s "http://127.0.0.1:$((base + 30))/metrics" \
    | grep -E '^fastmesh_mesh_(requests_total|request_duration_seconds_(count|sum))\{' || true

if [[ "${1:-}" == "--watch" ]]; then
    echo
    echo "demo: live status (Ctrl-C stops it and the mesh); send traffic from another shell:"
    echo "      curl -H 'Host: web' http://127.0.0.1:$((base + 10))/checkout"
    "${fm[@]}" mesh status --registry "$registry" --interval 2 || true
fi
