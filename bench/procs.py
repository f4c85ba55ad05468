"""Starting and stopping the processes under test, each with its files in one temp dir.

Rules:
- Everything lives in a `Workspace`: a temp dir plus every process spawned in it. Leaving the
  `with` block, normally, on an exception or on Ctrl-C, stops every process and then removes
  the dir. SIGINT, SIGTERM and SIGHUP are deferred while that happens (and while a process
  is being spawned and registered), so a second Ctrl-C cannot leave an orphan behind.
- Each process starts in its own session, hence its own process group, and is stopped by
  signalling the group: nginx's worker and any helper a proxy forks go with their leader.
- The leader is never reaped before the group is signalled (`waitid(WNOWAIT)`): while it is a
  zombie its pid stays reserved, so the group id cannot have been reused by someone else.
- Every wait has a deadline. The servers offer no readiness notification (nginx and HAProxy
  in the foreground say nothing when they are listening), so readiness is polled with a short
  backoff, and a process that exits while we wait fails at once with its log.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from bench import configs

__all__ = [
    "CpuPlan",
    "Endpoint",
    "Proc",
    "StartError",
    "TidegateUp",
    "Workspace",
    "free_port",
    "plan_cpus",
    "start_backend",
    "start_haproxy",
    "start_nginx_proxy",
    "start_tidegate",
    "start_tidegate_up",
    "tidegate_command",
]

# How long a server may take to become ready: one that is not listening after 10 s is broken.
_READY_TIMEOUT_S = 10.0
# How long a stopped process group gets between SIGTERM and SIGKILL.
_STOP_GRACE_S = 5.0
# If tidegate's metrics listener has never answered for this long while its proxy port
# accepts, the proxy port is taken as the readiness signal instead of /-/ready.
_METRICS_FALLBACK_AFTER_S = 3.0
# Timeout of one probe or sanity request; loopback answers in well under a millisecond.
_PROBE_TIMEOUT_S = 1.0
_LOG_TAIL_BYTES = 2000
_DEFERRED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class StartError(RuntimeError):
    """A process under test failed to start, to become ready, or to answer correctly."""


# --- CPU placement -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CpuPlan:
    """Where load (backend, wrk) and the proxy run; None means "not pinned", for `unpinned_why`."""

    load_cpu: int | None
    proxy_cpu: int | None
    unpinned_why: str = ""

    @property
    def pinned(self) -> bool:
        return self.load_cpu is not None

    def load_prefix(self) -> list[str]:
        return _taskset(self.load_cpu)

    def proxy_prefix(self) -> list[str]:
        return _taskset(self.proxy_cpu)

    def describe(self) -> str:
        if not self.pinned:
            return f"not pinned: {self.unpinned_why}"
        return f"backend and wrk on CPU {self.load_cpu}, each proxy on CPU {self.proxy_cpu}"


def _taskset(cpu: int | None) -> list[str]:
    return [] if cpu is None else ["taskset", "-c", str(cpu)]


def plan_cpus(allowed: set[int], pin: bool = True) -> CpuPlan:
    """Load on the first CPU we may use, proxies on the second; no pinning with only one."""
    cpus = sorted(allowed)
    if not pin:
        return CpuPlan(None, None, "--no-pin given")
    if len(cpus) < 2:
        return CpuPlan(None, None, "only one CPU is available, so load and proxy share it")
    return CpuPlan(cpus[0], cpus[1])


# --- CPU time ------------------------------------------------------------------------------

_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def stat_cpu_ticks(stat: str) -> int:
    """User plus system time, in clock ticks, from the text of /proc/PID/stat (fields 14 and
    15; the name in field 2 may hold spaces and parentheses, so count from its last ")")."""
    fields = stat.rpartition(")")[2].split()
    return int(fields[11]) + int(fields[12])


def _children(pid: int) -> list[int]:
    found = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(c) for c in f.read().split()]
    return found


def cpu_seconds(pid: int) -> float:
    """CPU time (user and system, every thread) used so far by a process and its living
    descendants: nginx's and HAProxy's workers count for their proxy. A process gone in the
    meantime counts nothing, so read it around a run of something that stays."""
    ticks = 0
    todo = [pid]
    while todo:
        current = todo.pop()
        try:
            with open(f"/proc/{current}/stat") as f:
                ticks += stat_cpu_ticks(f.read())
        except OSError:
            continue
        todo += _children(current)
    return ticks / _TICKS_PER_S


# --- processes -----------------------------------------------------------------------------


@dataclass(slots=True)
class Proc:
    """One spawned process group and the file its stdout and stderr go to."""

    name: str
    argv: list[str]
    popen: subprocess.Popen[bytes]
    log_path: Path

    def exited(self) -> bool:
        """True once the leader has exited; does not reap it (see the module rules)."""
        if self.popen.returncode is not None:
            return True
        info = os.waitid(os.P_PID, self.popen.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        return info is not None

    def log_tail(self) -> str:
        try:
            data = self.log_path.read_bytes()[-_LOG_TAIL_BYTES:]
        except OSError:
            return ""
        return data.decode(errors="replace").strip()

    def stop(self, grace_s: float = _STOP_GRACE_S) -> None:
        """SIGTERM the group, SIGKILL it after `grace_s`, then reap the leader."""
        if self.popen.returncode is not None:
            return
        pgid = self.popen.pid  # start_new_session makes the leader's pid the group id
        _killpg(pgid, signal.SIGTERM)
        if not _wait_exited(self, grace_s):
            _killpg(pgid, signal.SIGKILL)
            _wait_exited(self, grace_s)
        # Children that outlived their leader die with the group; the leader is still an
        # unreaped zombie here, which keeps `pgid` ours.
        _killpg(pgid, signal.SIGKILL)
        self.popen.wait(timeout=grace_s)


def _killpg(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _wait_exited(proc: Proc, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    for delay in _backoff():
        if proc.exited():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
    return False  # unreachable: _backoff never ends


def _backoff(first_s: float = 0.005, cap_s: float = 0.1) -> Iterator[float]:
    delay = first_s
    while True:
        yield delay
        delay = min(delay * 2, cap_s)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Defer SIGINT/SIGTERM/SIGHUP until the block ends, then deliver the first one caught.

    Handlers are swapped rather than the signal mask blocked: a blocked mask would be
    inherited by the processes spawned inside the block, which then could not be stopped
    with SIGTERM, whereas caught signals revert to their defaults on exec.
    """
    pending: list[int] = []

    def defer(signum: int, _frame: object) -> None:
        pending.append(signum)

    old = {sig: signal.signal(sig, defer) for sig in _DEFERRED_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        if pending:
            signal.raise_signal(pending[0])


class Workspace(contextlib.AbstractContextManager["Workspace"]):
    """A temp dir and the processes started in it, torn down together on exit."""

    def __init__(self, prefix: str = "tidegate-bench-") -> None:
        self._prefix = prefix
        self._stack = contextlib.ExitStack()
        self.dir = Path()

    def __enter__(self) -> Workspace:
        self.dir = Path(tempfile.mkdtemp(prefix=self._prefix))
        # Registered first, so it runs last: after every process has stopped.
        self._stack.callback(shutil.rmtree, self.dir, ignore_errors=True)
        # When run as root, nginx's worker drops to `nobody` and must read the docroot.
        self.dir.chmod(0o755)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        with _signals_deferred():
            return bool(self._stack.__exit__(exc_type, exc, tb))

    def path(self, *parts: str) -> Path:
        return self.dir.joinpath(*parts)

    def write(self, name: str, content: str | bytes) -> Path:
        path = self.path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        path.chmod(0o644)
        return path

    def spawn(
        self,
        name: str,
        argv: Sequence[str],
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> Proc:
        """Start `argv` in a new session with output to `<dir>/<name>.log`; stopped on exit."""
        log_path = self.path(f"{name}.log")
        with _signals_deferred(), log_path.open("wb") as log:
            # Signals are deferred so a Ctrl-C cannot land between the fork and the registration
            # of the stop callback, which would leave the new process running.
            popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=cwd or self.dir,
                env=env,
                start_new_session=True,
            )
            proc = Proc(name, list(argv), popen, log_path)
            self._stack.callback(proc.stop)
        return proc


# --- readiness -----------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago.

    The kernel picks it (bind to port 0); another program could take it before our server
    binds, in which case that server fails to start and says so in its log.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=_PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def _get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=_PROBE_TIMEOUT_S)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _wait_ready(proc: Proc, probe: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    for delay in _backoff():
        if proc.exited():
            raise StartError(f"{proc.name} exited while starting:\n{proc.log_tail()}")
        if probe():
            return
        if time.monotonic() >= deadline:
            raise StartError(
                f"{proc.name}: {what} not ready after {timeout_s:.0f} s:\n{proc.log_tail()}"
            )
        time.sleep(delay)


def _check_answers(proc: Proc, port: int) -> None:
    """Fail unless both benchmark URLs answer 200 with the expected body through `port`."""
    name = proc.name
    for path, expect in (
        (configs.SMALL_PATH, configs.SMALL_BODY.encode()),
        (configs.LARGE_PATH, None),
    ):
        try:
            status, body = _get(port, path)
        except OSError as exc:
            raise StartError(f"{name}: GET {path} failed: {exc}\n{proc.log_tail()}") from exc
        ok_body = body == expect if expect is not None else len(body) == configs.LARGE_SIZE
        if status != 200 or not ok_body:
            raise StartError(
                f"{name}: GET {path} gave {status} with {len(body)} bytes\n{proc.log_tail()}"
            )


# --- the processes under test --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A started server: where to send requests and how it was started."""

    name: str
    port: int
    proc: Proc
    config: str = ""

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def command(self) -> list[str]:
        return self.proc.argv


def _nginx_argv(nginx: str, prefix: Path, conf: Path) -> list[str]:
    # -p/-c/-e keep nginx away from /etc/nginx and /var/log/nginx entirely.
    return [nginx, "-p", f"{prefix}/", "-c", str(conf), "-e", "stderr"]


def start_backend(ws: Workspace, nginx: str, cpu_prefix: Sequence[str]) -> Endpoint:
    """The fast nginx backend serving /small and /64k."""
    port = free_port()
    prefix = ws.path("backend")
    docroot = prefix / "www"
    ws.write(f"backend/www{configs.LARGE_PATH}", b"x" * configs.LARGE_SIZE)
    docroot.chmod(0o755)
    prefix.chmod(0o755)
    text = configs.backend_nginx_conf(prefix, port, docroot)
    conf = ws.write("backend/nginx.conf", text)
    proc = ws.spawn("backend", [*cpu_prefix, *_nginx_argv(nginx, prefix, conf)])
    _wait_ready(proc, lambda: _accepts(port), _READY_TIMEOUT_S, f"port {port}")
    _check_answers(proc, port)
    return Endpoint("backend", port, proc, text)


def start_nginx_proxy(
    ws: Workspace, nginx: str, upstream_port: int, cpu_prefix: Sequence[str]
) -> Endpoint:
    """nginx as a reverse proxy in front of the backend."""
    port = free_port()
    prefix = ws.path("nginx")
    prefix.mkdir()
    text = configs.proxy_nginx_conf(prefix, port, upstream_port)
    conf = ws.write("nginx/nginx.conf", text)
    proc = ws.spawn("nginx", [*cpu_prefix, *_nginx_argv(nginx, prefix, conf)])
    _wait_ready(proc, lambda: _accepts(port), _READY_TIMEOUT_S, f"port {port}")
    _check_answers(proc, port)
    return Endpoint("nginx", port, proc, text)


def start_haproxy(
    ws: Workspace, haproxy: str, upstream_port: int, cpu_prefix: Sequence[str]
) -> Endpoint:
    """HAProxy in front of the backend, in the foreground (-db) so it stays in our group."""
    port = free_port()
    text = configs.haproxy_conf(port, upstream_port)
    conf = ws.write("haproxy/haproxy.cfg", text)
    proc = ws.spawn("haproxy", [*cpu_prefix, haproxy, "-db", "-f", str(conf)])
    _wait_ready(proc, lambda: _accepts(port), _READY_TIMEOUT_S, f"port {port}")
    _check_answers(proc, port)
    return Endpoint("haproxy", port, proc, text)


def tidegate_command(
    python: str,
    listen_port: int,
    upstream_port: int,
    metrics_port: int,
    access_log: str | None = None,
) -> list[str]:
    """The one place that knows how to start tidegate's ingress in static mode; its access
    log goes to ``access_log`` (None: off)."""
    argv = [
        python,
        "-m",
        "tidegate",
        "ingress",
        "--listen",
        f"127.0.0.1:{listen_port}",
        "--static-upstream",
        f"127.0.0.1:{upstream_port}",
        "--metrics-listen",
        f"127.0.0.1:{metrics_port}",
    ]
    argv += ["--no-access-log"] if access_log is None else ["--access-log", access_log]
    return argv


# `python -m tidegate` must find the package: run it from the checkout this bench belongs to.
_REPO_ROOT = Path(__file__).resolve().parent.parent


def start_tidegate(
    ws: Workspace,
    upstream_port: int,
    cpu_prefix: Sequence[str],
    python: str = sys.executable,
    *,
    name: str = "tidegate",
    access_log: str | None = None,
) -> Endpoint:
    """tidegate's ingress in static mode in front of the backend; ready when /-/ready is 200.
    Metrics are always served (as in production); the access log only when given a path."""
    port, metrics_port = free_port(), free_port()
    argv = [
        *cpu_prefix,
        *tidegate_command(python, port, upstream_port, metrics_port, access_log),
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = ws.spawn(name, argv, env=env, cwd=_REPO_ROOT)
    started = time.monotonic()
    metrics_answered = False

    def ready() -> bool:
        nonlocal metrics_answered
        try:
            status, _ = _get(metrics_port, "/-/ready")
        except OSError:
            # No metrics listener (yet): after a grace period, settle for the proxy port.
            late = time.monotonic() - started >= _METRICS_FALLBACK_AFTER_S
            return not metrics_answered and late and _accepts(port)
        metrics_answered = True
        return status == 200

    _wait_ready(proc, ready, _READY_TIMEOUT_S, "/-/ready")
    _check_answers(proc, port)
    return Endpoint(name, port, proc)


@dataclass(frozen=True, slots=True)
class TidegateUp:
    """A running `tidegate up`: where to send requests, its control socket, its process."""

    proc: Proc
    port: int
    metrics_port: int
    socket: Path

    def check_alive(self) -> None:
        if self.proc.exited():
            raise StartError(f"tidegate up exited:\n{self.proc.log_tail()}")


def start_tidegate_up(
    ws: Workspace, service_path: Path, scope: str, ready_timeout_s: float
) -> TidegateUp:
    """`tidegate up` for ``service_path``, output to a log in the workspace; ready when
    /-/ready is 200. Its state, control socket and scope are its own: `tidegate status` or
    `pause` meant for a real scaler on this host never reach it, and it neither adopts nor
    removes anyone else's containers, nor they its."""
    port, metrics_port = free_port(), free_port()
    socket = ws.path("scaler.sock")
    argv = [
        sys.executable,
        "-m",
        "tidegate",
        "up",
        str(service_path),
        "--listen",
        f"127.0.0.1:{port}",
        "--metrics-listen",
        f"127.0.0.1:{metrics_port}",
        "--state-dir",
        str(ws.path("state")),  # the process runtime's records; docker needs none
        "--scaler-socket",
        str(socket),
        "--scope",
        scope,
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # The log file is drained by nobody and never fills a pipe: tidegate cannot block on it.
    proc = ws.spawn("tidegate", argv, env=env, cwd=_REPO_ROOT)

    def ready() -> bool:
        try:
            status, _ = _get(metrics_port, "/-/ready")
        except (OSError, http.client.HTTPException):
            return False
        return status == 200

    _wait_ready(proc, ready, ready_timeout_s, "/-/ready")
    return TidegateUp(proc, port, metrics_port, socket)
