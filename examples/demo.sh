#!/usr/bin/env bash
# Sets up and runs the demo (README quickstart, first command). Idempotent.
# Two instances of examples/hello/app.py behind the tidegate ingress, at most 2 requests in
# flight each: try `curl http://127.0.0.1:8080/` and a burst of `/slow` requests.
set -euo pipefail
source "$(dirname "$0")/../tests/setup.sh"
tg_setup_venv test
cd "$tg_root"
PORT_A=${PORT_A:-18081}
PORT_B=${PORT_B:-18082}
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM
PORT=$PORT_A TIDEGATE_INSTANCE=hello-a .venv/bin/python examples/hello/app.py & pids+=($!)
PORT=$PORT_B TIDEGATE_INSTANCE=hello-b .venv/bin/python examples/hello/app.py & pids+=($!)
echo
echo "  tidegate demo: open http://127.0.0.1:${LISTEN_PORT:-8080}/  (Ctrl-C stops everything)"
echo "  try: for i in \$(seq 8); do curl -s http://127.0.0.1:${LISTEN_PORT:-8080}/slow & done; wait"
echo
.venv/bin/tidegate ingress --listen "127.0.0.1:${LISTEN_PORT:-8080}" \
    --static-upstream "127.0.0.1:$PORT_A" --static-upstream "127.0.0.1:$PORT_B" \
    --max-concurrency 2 --queue-timeout 10s & pids+=($!)
wait "${pids[-1]}"
