#!/usr/bin/env bash
# Runs the docker example: `tidegate up hello-docker.yaml`, which builds this directory's
# Dockerfile and serves it from zero containers. Extra arguments go to `tidegate up`
# (e.g. --listen 127.0.0.1:9090). Needs a running Docker engine.
set -euo pipefail
dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$dir/../.." && pwd)

# The image is FROM scratch: its one program, a statically linked busybox, has to be in the
# build context, because tidegate never pulls a base image. Copy the host's in when it is
# missing or different.
if [ ! -x /bin/busybox ]; then
    echo "run.sh: needs a static /bin/busybox on the host (e.g. apt-get install busybox-static)" >&2
    exit 1
fi
if ! cmp -s /bin/busybox "$dir/busybox"; then
    install -m 0755 /bin/busybox "$dir/busybox"
fi

tidegate="$root/.venv/bin/tidegate"
if [ ! -x "$tidegate" ]; then
    tidegate=tidegate  # installed some other way: take it from PATH
fi
exec "$tidegate" up "$dir/hello-docker.yaml" "$@"
