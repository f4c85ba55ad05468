# Sourced by tests/run.sh and examples/demo.sh: installs what tidegate needs, idempotently.
#   - a virtual environment in .venv with tidegate and its test extras (and bench's with test),
#     and, when root and missing, a C compiler and Python's headers for the access log's line
#   - when root and missing: Debian's docker.io, busybox-static, prometheus and systemd (for
#     systemd-analyze, which checks the units in systemd/; a container image may lack it), and
#     a running dockerd
# Safe to run again: each step checks before it acts.

tg_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

tg_log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

tg_apt_install() {
    # apt-get update once per run, and only if something is missing
    if [ "$(id -u)" != 0 ]; then
        tg_log "not root: cannot install $*; install them yourself for the tests that need them"
        return 0
    fi
    tg_log "installing $*"
    export DEBIAN_FRONTEND=noninteractive
    if [ -z "${TG_APT_UPDATED:-}" ]; then
        apt-get update -qq
        TG_APT_UPDATED=1
    fi
    apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

tg_setup_venv() {
    local extras=${1:-test}
    # the tests cover the benchmarks' plots and locust file too: the bench extra comes with test
    case ",$extras," in
        *,bench,*) ;;
        *,test,*) extras="$extras,bench" ;;
    esac
    cd "$tg_root"
    if [ ! -x .venv/bin/python ]; then
        tg_log "creating .venv"
        python3 -m venv .venv || { tg_apt_install python3-venv && python3 -m venv .venv; }
    fi
    # reinstall only when pyproject.toml or the C source changed since the last install
    local stamp=.venv/.tidegate-installed
    local want
    want="$(cat pyproject.toml ingress/_logline.c | sha256sum | cut -d' ' -f1) $extras"
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
        tg_setup_compiler
        tg_log "installing tidegate[$extras] into .venv"
        .venv/bin/python -m pip install -q --upgrade pip
        .venv/bin/python -m pip install -q -e ".[$extras]"
        echo "$want" > "$stamp"
    fi
}

tg_setup_compiler() {
    # the access log's line is C (ingress/_logline.c): without a compiler the install still
    # works, with the slower Python line, but the tests want the C one
    local missing=()
    command -v cc >/dev/null 2>&1 || missing+=(gcc libc6-dev)
    .venv/bin/python -c 'import os, sys, sysconfig
sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' ||
        missing+=(python3-dev)
    [ ${#missing[@]} -eq 0 ] || tg_apt_install "${missing[@]}"
}

tg_setup_system() {
    local missing=()
    command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
    dpkg -s busybox-static >/dev/null 2>&1 || missing+=(busybox-static)
    command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
    command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
    [ ${#missing[@]} -eq 0 ] || tg_apt_install "${missing[@]}"
    tg_start_dockerd
}

tg_start_dockerd() {
    command -v dockerd >/dev/null 2>&1 || return 0
    if docker info >/dev/null 2>&1; then
        return 0
    fi
    if [ "$(id -u)" != 0 ]; then
        tg_log "dockerd is not running and we are not root: Docker tests will be skipped"
        return 0
    fi
    tg_log "starting dockerd"
    # no systemd on every machine: start the daemon directly, in a session of its own so
    # that nothing signalling this script's process group (a job control Ctrl-C, a runner
    # killing the test job) takes the engine down with it
    setsid -f dockerd >>/var/log/tidegate-dockerd.log 2>&1 </dev/null
    local deadline=$((SECONDS + 60))
    until docker info >/dev/null 2>&1; do
        if [ $SECONDS -ge $deadline ]; then
            tg_log "dockerd did not come up in 60 s; see /var/log/tidegate-dockerd.log"
            return 1
        fi
        sleep 0.5
    done
}
