#!/usr/bin/env bash
# Sets up and runs the demo (README quickstart, first command). Idempotent.
# `tidegate up examples/hello/hello.yaml`: the hello app (standard library only) as local
# processes, scaled from zero by requests, at most 2 in flight per instance, up to 3 instances.
set -euo pipefail
source "$(dirname "$0")/../tests/setup.sh"
tg_setup_venv test
cd "$tg_root"
port=${LISTEN_PORT:-8080}
echo
echo "  tidegate demo: open http://127.0.0.1:${port}/  (Ctrl-C drains and stops everything)"
echo "  the first request cold-starts an instance; a burst scales out:"
echo "    for i in \$(seq 8); do curl -s http://127.0.0.1:${port}/slow & done; wait"
echo "  10 s after the last request it is back to zero (60 s after a burst that doubled the load)"
echo
exec .venv/bin/tidegate up --listen "127.0.0.1:${port}" examples/hello/hello.yaml
