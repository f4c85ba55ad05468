"""`python -m bench coldstart`: what tidegate adds to a cold start, next to a bare container.

Two things are timed side by side in one run, taking turns round by round so that drift on a
shared machine hits both alike:

- **bare**: the busybox httpd test image started with the docker SDK, as a user would
  (create, start, read the published port back), until the first HTTP GET / gets a full
  response. The engine calls are part of the time: the timer starts just before the create.
- **tidegate**: the first request to a `min_size: 0` service through `tidegate up` (the same
  image, docker runtime), from a fresh connection to the full response: the cold-start event,
  the container start, the health check and the hand-over of the held request are all in it.

The difference of the two medians is the overhead tidegate adds to a cold start; the target
is a median of at most 25 ms. (For scale: Sablier polls every 5 s, KEDA's HTTP add-on backs
off 500 ms, Knative quotes about 800 ms.)

Every step starts from the same quiet state: no container of the bench and none of the
service (the scaler takes it back to zero by itself, `scale_down_delay` after the request),
and a short settle. Both ends are the first full HTTP response, each read with a new
connection by the same client code.

The pure parts (`plan_steps`, `summarize`, `check_gate`, the formatting, `service_file`,
`host_port`) take values and return values, so the unit tests run them without Docker; `main`
is the shell that starts tidegate and the containers.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import procs, report
from bench.args import non_negative_int, positive_int

__all__ = [
    "BARE",
    "KINDS",
    "SERVICE",
    "TARGET_OVERHEAD_MS",
    "TIDEGATE",
    "Sample",
    "Stats",
    "Step",
    "Summary",
    "add_arguments",
    "check_gate",
    "describe",
    "format_markdown",
    "format_summary",
    "host_port",
    "main",
    "percentile",
    "plan_steps",
    "service_file",
    "summarize",
    "target_line",
]

BARE = "bare"
TIDEGATE = "tidegate"
KINDS = (BARE, TIDEGATE)  # the order in which they take turns within a round
_LABELS = {BARE: "bare container", TIDEGATE: "through tidegate"}

SERVICE = "bench-coldstart"
TARGET_OVERHEAD_MS = 25.0  # the target for the median overhead
MIN_ROUNDS_FOR_RESULT = 10  # the issue asks for at least this many rounds
CONTAINER_PORT = 8080
# The label on the bench's own (bare) containers: never tidegate.service, so no tidegate
# ever adopts or removes them, and the cleanup finds them even after a Ctrl-C.
BENCH_LABEL = ("tidegate.bench", "coldstart")
_SERVICE_LABEL = "tidegate.service"  # scaler.runtime.LABEL_SERVICE

_SCALE_DOWN_DELAY = "1s"  # the scaler's idle time before zero (0s is allowed, 1s is realistic)
_DEFAULT_ROUNDS = 10
_DEFAULT_WARMUP = 1
_DEFAULT_OUT = Path(__file__).resolve().parent / "results"
_REPO_ROOT = Path(__file__).resolve().parent.parent

_READY_TIMEOUT_S = 30.0  # tidegate up until /-/ready is 200
_ZERO_TIMEOUT_S = 120.0  # the service back to zero instances after a request
_ZERO_POLL_S = 0.05
_SETTLE_S = 0.5  # quiet time before each step, after the previous one's containers are gone
_FIRST_RESPONSE_TIMEOUT_S = 30.0  # a bare container answering, or a held request served
_PROBE_INTERVAL_S = 0.001  # between connection attempts while a bare container starts
_PROBE_TIMEOUT_S = 1.0  # one attempt's socket timeout
_ENGINE_TIMEOUT_S = 60  # the docker SDK client's per-call timeout


# --- the pure parts ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Step:
    """One timed cold start: of which kind, in which round, and whether it is a warm-up."""

    kind: str
    round: int
    warmup: bool = False

    def __str__(self) -> str:
        return f"{'warm-up' if self.warmup else 'round'} {self.round} {self.kind}"


@dataclass(frozen=True, slots=True)
class Sample:
    """One step's result: milliseconds from the start to the first full response."""

    step: Step
    ms: float


@dataclass(frozen=True, slots=True)
class Stats:
    """Order statistics of one kind's measured (not warm-up) samples, in milliseconds."""

    n: int
    median: float
    p90: float
    min: float
    max: float


@dataclass(frozen=True, slots=True)
class Summary:
    """Both kinds' statistics and the overhead: the difference of their medians."""

    bare: Stats
    tidegate: Stats
    overhead_ms: float  # tidegate's median - bare's median
    paired_overhead_ms: float  # median over rounds of (tidegate - bare) in the same round
    target_ms: float = TARGET_OVERHEAD_MS

    @property
    def target_met(self) -> bool:
        return self.overhead_ms <= self.target_ms


def plan_steps(rounds: int, warmup: int) -> list[Step]:
    """Warm-up rounds, then measured rounds; in each, bare then tidegate (a, b, a, b, ...)."""
    if rounds < 1 or warmup < 0:
        raise ValueError(f"need rounds >= 1 and warmup >= 0 (got {rounds}, {warmup})")
    steps = [Step(kind, r, True) for r in range(1, warmup + 1) for kind in KINDS]
    steps += [Step(kind, r) for r in range(1, rounds + 1) for kind in KINDS]
    return steps


def percentile(values: Iterable[float], q: float) -> float:
    """The q-th percentile (0..100), linear between closest ranks (numpy's default)."""
    xs = sorted(values)
    if not xs:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0..100 (got {q})")
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def describe(values: Sequence[float]) -> Stats:
    """n, median, p90, min and max of `values` (at least one)."""
    if not values:
        raise ValueError("no values to describe")
    return Stats(
        n=len(values),
        median=statistics.median(values),
        p90=percentile(values, 90),
        min=min(values),
        max=max(values),
    )


def summarize(samples: Iterable[Sample], target_ms: float = TARGET_OVERHEAD_MS) -> Summary:
    """Statistics of each kind's measured samples and the overhead; warm-ups are left out."""
    by_kind: dict[str, dict[int, float]] = {kind: {} for kind in KINDS}
    for sample in samples:
        if not sample.step.warmup:
            by_kind[sample.step.kind][sample.step.round] = sample.ms
    missing = [kind for kind, values in by_kind.items() if not values]
    if missing:
        raise ValueError(f"no measured samples of {', '.join(missing)}")
    bare = describe(list(by_kind[BARE].values()))
    tide = describe(list(by_kind[TIDEGATE].values()))
    paired = [ms - by_kind[BARE][r] for r, ms in by_kind[TIDEGATE].items() if r in by_kind[BARE]]
    return Summary(
        bare=bare,
        tidegate=tide,
        overhead_ms=tide.median - bare.median,
        paired_overhead_ms=statistics.median(paired) if paired else math.nan,
        target_ms=target_ms,
    )


def target_line(summary: Summary) -> str:
    """The issue's line: `overhead median X ms <= 25 ms: ok` (or `missed`)."""
    verdict = "ok" if summary.target_met else "missed"
    return f"overhead median {summary.overhead_ms:.1f} ms <= {summary.target_ms:g} ms: {verdict}"


def check_gate(summary: Summary, max_overhead_ms: float | None) -> list[str]:
    """One message when `--max-overhead-ms` is given and missed, else none."""
    if max_overhead_ms is None or summary.overhead_ms <= max_overhead_ms:
        return []
    return [
        f"--max-overhead-ms {max_overhead_ms:g}: the overhead median was "
        f"{summary.overhead_ms:.1f} ms"
    ]


def _rounds_table(samples: Sequence[Sample]) -> list[tuple[str, float | None, float | None]]:
    """(round name, bare ms, tidegate ms) per round, warm-ups first, in the order run."""
    rows: dict[tuple[bool, int], dict[str, float]] = {}
    for s in samples:
        rows.setdefault((not s.step.warmup, s.step.round), {})[s.step.kind] = s.ms
    return [
        (f"{'' if measured else 'warm-up '}{rnd}", ms.get(BARE), ms.get(TIDEGATE))
        for (measured, rnd), ms in sorted(rows.items())
    ]


def _ms(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.1f}"


def format_summary(summary: Summary, samples: Sequence[Sample]) -> str:
    """The text printed at the end: statistics, the overhead, the target line, every round."""
    head = ("", "median", "p90", "min", "max", "n")
    body = [
        (_LABELS[kind], *(_ms(v) for v in (st.median, st.p90, st.min, st.max)), str(st.n))
        for kind, st in ((BARE, summary.bare), (TIDEGATE, summary.tidegate))
    ]
    widths = [max(len(row[i]) for row in (head, *body)) for i in range(len(head))]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))
        return "  ".join((first, *rest)).rstrip()

    out = ["cold start, ms from the start to the first full response", ""]
    out += [line(head), *(line(row) for row in body), ""]
    out.append(
        f"overhead (difference of medians): {_ms(summary.overhead_ms)} ms; "
        f"median of per-round differences: {_ms(summary.paired_overhead_ms)} ms"
    )
    out.append(target_line(summary))
    out += ["", "per round (ms): bare / tidegate / tidegate - bare"]
    for name, bare, tide in _rounds_table(samples):
        diff = None if bare is None or tide is None else tide - bare
        out.append(f"  {name:>10}: {_ms(bare):>8} / {_ms(tide):>8} / {_ms(diff):>7}")
    return "\n".join(out)


def service_file(image: str, scale_down_delay: str = _SCALE_DOWN_DELAY) -> str:
    """The benchmark service: `image` from zero, one instance at most, a TCP health check."""
    return (
        f"name: {SERVICE}\n"
        "runtime: docker\n"
        f"image: {json.dumps(image)}\n"
        f"port: {CONTAINER_PORT}\n"
        "autoscaling:\n"
        "  min_size: 0\n"
        "  max_size: 1\n"
        "  max_concurrency: 10\n"
        f"  scale_down_delay: {scale_down_delay}\n"
        "health_check:\n"
        "  protocol: tcp\n"
    )


def host_port(attrs: Mapping[str, Any], container_port: str = f"{CONTAINER_PORT}/tcp") -> int:
    """The host port the engine published `container_port` on, from an inspect document."""
    ports = (attrs.get("NetworkSettings") or {}).get("Ports") or {}
    for binding in ports.get(container_port) or []:
        if binding.get("HostPort"):
            return int(binding["HostPort"])
    raise ValueError(f"{container_port} is not published (ports: {dict(ports)})")


# --- the report ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ColdstartReport:
    """Everything one `bench coldstart` run produced, ready to be written out."""

    started_at: datetime
    machine: dict[str, Any]
    settings: dict[str, Any]
    commands: dict[str, list[str]]
    service_file: str
    summary: Summary
    samples: Sequence[Sample]
    gates: dict[str, float | None]
    missed: list[str] = field(default_factory=list)

    def stamp(self) -> str:
        """UTC timestamp used in the file names, e.g. 20250101T120000Z."""
        return self.started_at.strftime("%Y%m%dT%H%M%SZ")

    def to_json(self) -> dict[str, Any]:
        s = self.summary
        return {
            "benchmark": "coldstart",
            "date": self.started_at.isoformat(timespec="seconds"),
            "machine": self.machine,
            "settings": self.settings,
            "commands": {name: report._shell(argv) for name, argv in self.commands.items()},
            "service_file": self.service_file,
            "results": {
                "unit": "ms",
                BARE: _rounded(asdict(s.bare)),
                TIDEGATE: _rounded(asdict(s.tidegate)),
                "overhead_ms": _us(s.overhead_ms),
                "paired_overhead_ms": _us(s.paired_overhead_ms),
                "target_ms": s.target_ms,
                "target_met": s.target_met,
                "target_line": target_line(s),
            },
            "runs": [{**asdict(x.step), "ms": _us(x.ms)} for x in self.samples],
            "gates": {**self.gates, "missed": self.missed},
        }


def _us(ms: float) -> float | None:
    """Milliseconds to the microsecond for the JSON (the clock says more than is true); NaN
    (no paired rounds) becomes null, which JSON has and NaN is not."""
    return None if math.isnan(ms) else round(ms, 3)


def _rounded(stats: dict[str, Any]) -> dict[str, Any]:
    return {k: v if isinstance(v, int) else _us(v) for k, v in stats.items()}


def format_markdown(rep: ColdstartReport) -> str:
    """The report as a Markdown page: context, statistics, target, every round, commands."""
    m, s = rep.machine, rep.summary
    v = m["versions"]
    rounds, warmup = rep.settings["rounds"], rep.settings["warmup"]
    few = (
        f" (fewer than {MIN_ROUNDS_FOR_RESULT}: indicative only)"
        if rounds < MIN_ROUNDS_FOR_RESULT
        else ""
    )
    lines = [
        f"# Cold-start benchmark, {rep.started_at.strftime('%Y-%m-%d %H:%M:%S')} UTC",
        "",
        f"- CPU: {m['cpu_model']}, nproc {m['nproc']}",
        f"- kernel {m['kernel']}; Docker Engine {v['docker_engine']} (SDK {v['docker_sdk']}); "
        f"Python {v['python']}; tidegate {v['tidegate_commit']}",
        f"- {rounds} round(s){few} after {warmup} warm-up round(s); in each, a bare container "
        "start then a cold request through tidegate, each from a quiet state "
        f"(no container, then {rep.settings['settle_s']:g} s)",
        "- both end at the first full HTTP response to `GET /`, read on a new connection",
        "",
        "| ms | median | p90 | min | max | n |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    for kind, st in ((BARE, s.bare), (TIDEGATE, s.tidegate)):
        cells = (_ms(x) for x in (st.median, st.p90, st.min, st.max))
        lines.append(f"| {_LABELS[kind]} | {' | '.join(cells)} | {st.n} |")
    lines += [
        "",
        f"Overhead (difference of medians): **{_ms(s.overhead_ms)} ms**; median of the "
        f"per-round differences: {_ms(s.paired_overhead_ms)} ms.",
        "",
        f"`{target_line(s)}`",
        "",
        "## Every round",
        "",
        "| round | bare ms | tidegate ms | tidegate - bare ms |",
        "|---|--:|--:|--:|",
    ]
    for name, bare, tide in _rounds_table(rep.samples):
        diff = None if bare is None or tide is None else tide - bare
        lines.append(f"| {name} | {_ms(bare)} | {_ms(tide)} | {_ms(diff)} |")
    lines += ["", "## SLO gates", ""]
    set_gates = {k: g for k, g in rep.gates.items() if g is not None}
    if not set_gates:
        lines.append("none set")
    else:
        lines.append(", ".join(f"{k} = {g:g}" for k, g in set_gates.items()))
        lines += [""] + ([f"- MISSED: {msg}" for msg in rep.missed] or ["- all passed"])
    lines += [""]
    lines += report.commands_markdown(rep.commands, SERVICE, rep.service_file)
    return "\n".join(lines) + "\n"


def write(rep: ColdstartReport, out_dir: Path) -> tuple[Path, Path]:
    """Write coldstart-<stamp>.json and .md into `out_dir`; return their paths."""
    return report.write_pair(
        out_dir, f"coldstart-{rep.stamp()}", rep.to_json(), format_markdown(rep)
    )


def machine_info(engine_version: str, sdk_version: str) -> dict[str, Any]:
    """What `bench proxy` records of the machine, with the Docker engine in place of nginx,
    HAProxy and wrk."""
    return report.machine_with({"docker_engine": engine_version, "docker_sdk": sdk_version})


# --- the shell: Docker, tidegate, the clock ------------------------------------------------


def _get(port: int, timeout_s: float, path: str = "/") -> tuple[int, bytes]:
    """GET `path` on a new connection to 127.0.0.1:`port`; the status and the whole body."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _docker_client() -> Any:
    """A client for the local engine, or StartError (exit 2) saying why there is none."""
    try:
        import docker
    except ImportError as exc:
        raise procs.StartError(f"the docker SDK is not installed: {exc}") from None
    try:
        client = docker.from_env(timeout=_ENGINE_TIMEOUT_S)
        client.ping()
    except Exception as exc:  # any reason at all: the benchmark cannot run here
        raise procs.StartError(
            f"no Docker engine answers (is dockerd running, and DOCKER_HOST right?): {exc}"
        ) from None
    return client


def _build_image(client: Any) -> str:
    """The httpd test image's tag, built FROM scratch with the host's busybox if missing."""
    # The tests' image builder is reused rather than copied: one definition of the image, and
    # the bench then measures exactly what the Docker tests run. It lives in tests/, which is
    # importable from the checkout `python -m bench` runs in (it imports pytest, a dev
    # dependency, like the bench's own ruff and mypy).
    if str(_REPO_ROOT) not in sys.path and (_REPO_ROOT / "tests" / "images.py").is_file():
        sys.path.append(str(_REPO_ROOT))  # run from elsewhere, bench installed in the venv
    try:
        from tests.images import BUSYBOX, build_images
    except ImportError as exc:
        raise procs.StartError(
            f"run from the checkout with the dev dependencies: cannot import tests.images: {exc}"
        ) from None
    if not BUSYBOX.is_file():
        raise procs.StartError(f"the test image is built from {BUSYBOX}, which is missing")
    try:
        return build_images(client).httpd
    except Exception as exc:
        raise procs.StartError(f"building the test image failed: {exc}") from None


def _containers(client: Any, label: str) -> list[Any]:
    return list(client.containers.list(all=True, filters={"label": [label]}, ignore_removed=True))


def _ours(client: Any) -> list[Any]:
    """Every container this benchmark may own: its bare ones and the service's instances."""
    key, value = BENCH_LABEL
    bench = _containers(client, f"{key}={value}")
    service = _containers(client, f"{_SERVICE_LABEL}={SERVICE}")
    return list({c.id: c for c in [*bench, *service]}.values())


def _remove_ours(client: Any) -> None:
    """Force-remove the bench's containers; never raises (it runs on the way out)."""
    try:
        for container in _ours(client):
            with contextlib.suppress(Exception):
                container.remove(force=True, v=True)
    except Exception as exc:
        print(f"bench coldstart: cleanup: listing containers failed: {exc}", file=sys.stderr)


def _until(
    done: Callable[[], bool],
    timeout_s: float,
    what: str,
    poll_s: float,
    alive: Callable[[], None] = lambda: None,
) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        alive()
        if done():
            return
        if time.monotonic() >= deadline:
            raise procs.StartError(f"{what} not within {timeout_s:g} s")
        time.sleep(poll_s)


def _start_tidegate(ws: procs.Workspace, service_path: Path) -> procs.TidegateUp:
    return procs.start_tidegate_up(ws, service_path, "bench-coldstart", _READY_TIMEOUT_S)


def _wait_quiet(client: Any, tidegate: procs.TidegateUp) -> None:
    """Until no container of the bench or the service exists, then a short settle."""
    _until(
        lambda: not _ours(client),
        _ZERO_TIMEOUT_S,
        f"{SERVICE} back to zero instances",
        _ZERO_POLL_S,
        tidegate.check_alive,
    )
    time.sleep(_SETTLE_S)


def _time_bare(client: Any, image: str) -> float:
    """ms from the create call to the first full response of a new bare container."""
    key, value = BENCH_LABEL
    container = None
    try:
        # create + start, as containers.run() does (and as tidegate's runtime does), minus
        # run()'s fallback of pulling a missing image: nothing is pulled here.
        t0 = time.perf_counter()
        container = client.containers.create(
            image,
            detach=True,
            ports={f"{CONTAINER_PORT}/tcp": ("127.0.0.1", None)},
            environment={"PORT": str(CONTAINER_PORT)},
            labels={key: value},
            # what a tidegate instance gets by default (0.5 vCPU, 1GB, no-new-privileges), so
            # the difference between the two timings is tidegate's own
            nano_cpus=500_000_000,
            mem_limit=1_000_000_000,
            memswap_limit=1_000_000_000,
            security_opt=["no-new-privileges"],
        )
        container.start()
        container.reload()  # the engine picks the host port; it is known only after start
        port = host_port(container.attrs)
        deadline = t0 + _FIRST_RESPONSE_TIMEOUT_S
        while True:
            try:
                status, _ = _get(port, _PROBE_TIMEOUT_S)
                break
            except (OSError, http.client.HTTPException):
                # refused, or reset by a proxy in front of a container not yet listening
                if time.perf_counter() >= deadline:
                    raise procs.StartError(
                        f"the bare container did not answer within {_FIRST_RESPONSE_TIMEOUT_S:g}"
                        f" s:\n{container.logs(tail=20).decode(errors='replace')}"
                    ) from None
                time.sleep(_PROBE_INTERVAL_S)
        elapsed = time.perf_counter() - t0
        if status != 200:
            raise procs.StartError(f"the bare container answered GET / with {status}")
        return elapsed * 1000
    finally:
        if container is not None:
            with contextlib.suppress(Exception):
                container.remove(force=True, v=True)


def _time_tidegate(tidegate: procs.TidegateUp) -> float:
    """ms from connecting to the ingress to the full response of a cold request."""
    t0 = time.perf_counter()
    try:
        status, body = _get(tidegate.port, _FIRST_RESPONSE_TIMEOUT_S)
    except (OSError, http.client.HTTPException) as exc:
        tidegate.check_alive()
        raise procs.StartError(
            f"GET / through tidegate failed: {exc}\n{tidegate.proc.log_tail()}"
        ) from None
    elapsed = time.perf_counter() - t0
    if status != 200:
        raise procs.StartError(
            f"GET / through tidegate gave {status}: {body[:200]!r}\n{tidegate.proc.log_tail()}"
        )
    return elapsed * 1000


def _run_steps(
    client: Any, image: str, tidegate: procs.TidegateUp, steps: Sequence[Step]
) -> Iterator[Sample]:
    for i, step in enumerate(steps, 1):
        _wait_quiet(client, tidegate)
        ms = _time_bare(client, image) if step.kind == BARE else _time_tidegate(tidegate)
        print(f"[{i}/{len(steps)}] {step}: {ms:.1f} ms", file=sys.stderr, flush=True)
        yield Sample(step, ms)


@contextlib.contextmanager
def _cleanup_deferred(client: Any) -> Iterator[None]:
    """On the way out, remove the bench's containers with Ctrl-C deferred meanwhile."""
    try:
        yield
    finally:
        # procs' helper: a second Ctrl-C must not cut the cleanup short.
        with procs._signals_deferred():
            _remove_ours(client)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `coldstart` subcommand's flags."""
    parser.add_argument(
        "--rounds",
        type=positive_int,
        default=_DEFAULT_ROUNDS,
        metavar="N",
        help=f"measured rounds, each one bare start and one cold request through tidegate "
        f"(default {_DEFAULT_ROUNDS}; results want at least {MIN_ROUNDS_FOR_RESULT})",
    )
    parser.add_argument(
        "--warmup",
        type=non_negative_int,
        default=_DEFAULT_WARMUP,
        metavar="N",
        help=f"rounds run first and not counted (default {_DEFAULT_WARMUP})",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=_DEFAULT_OUT,
        metavar="DIR",
        help="where the JSON and Markdown results go (default bench/results)",
    )
    parser.add_argument(
        "--max-overhead-ms",
        type=float,
        default=None,
        metavar="MS",
        help="fail (exit 1) unless the overhead median is at most MS "
        f"(the target is {TARGET_OVERHEAD_MS:g})",
    )


def main(args: argparse.Namespace) -> int:
    """Run the rounds, print and save the results; 1 if the gate was missed, else 0."""
    steps = plan_steps(args.rounds, args.warmup)
    started_at = datetime.now(UTC)
    client = _docker_client()
    import docker.errors
    import requests.exceptions

    try:
        engine = str(client.version().get("Version", "unknown"))
        image = _build_image(client)
        text = service_file(image)
        with _cleanup_deferred(client):
            _remove_ours(client)  # left by a run that was killed
            # Leaving the workspace stops tidegate (which stops its instances) first; the
            # cleanup above then removes whatever is left.
            with procs.Workspace(prefix="tidegate-bench-coldstart-") as ws:
                service_path = ws.write(f"{SERVICE}.yaml", text)
                print(f"bench coldstart: image {image}; starting tidegate up", file=sys.stderr)
                tidegate = _start_tidegate(ws, service_path)
                argv = [a.replace(str(ws.dir), "<tmp>") for a in tidegate.proc.argv]
                samples = list(_run_steps(client, image, tidegate, steps))
        machine = machine_info(engine, docker.__version__)
    except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
        # an engine call failed or timed out: the run cannot go on (exit 2, not a traceback)
        raise procs.StartError(f"Docker engine error: {exc}") from exc
    finally:
        client.close()

    summary = summarize(samples)
    missed = check_gate(summary, args.max_overhead_ms)
    result = ColdstartReport(
        started_at=started_at,
        machine=machine,
        settings={
            "rounds": args.rounds,
            "warmup": args.warmup,
            "image": image,
            "service": SERVICE,
            "scale_down_delay": _SCALE_DOWN_DELAY,
            "settle_s": _SETTLE_S,
            "probe_interval_ms": _PROBE_INTERVAL_S * 1000,
            "order": "per round: bare, then tidegate",
        },
        commands={"tidegate": argv},
        service_file=text,
        summary=summary,
        samples=samples,
        gates={"max_overhead_ms": args.max_overhead_ms},
        missed=missed,
    )
    print(format_summary(summary, samples))
    json_path, md_path = write(result, args.out)
    print(f"\nwrote {json_path}\n      {md_path}")
    for message in missed:
        print(f"SLO gate missed: {message}", file=sys.stderr)
    return 1 if missed else 0
