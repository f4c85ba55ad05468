#!/usr/bin/env bash
# Sets up and runs every test (README quickstart, second command). Idempotent.
# Extra arguments go to pytest, e.g. `tests/run.sh -m "not docker"` or `tests/run.sh -k balancer`.
set -euo pipefail
source "$(dirname "$0")/setup.sh"
tg_setup_venv test
tg_setup_system
cd "$tg_root"
tg_log "ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
tg_log "mypy"
.venv/bin/mypy ingress tidegate scaler bench
tg_log "pytest"
status=0
.venv/bin/python -m pytest -q "$@" || status=$?
if [ "$status" -eq 5 ]; then
    echo "no tests were collected: that is a failure here" >&2
    exit 1
fi
exit "$status"
