"""The ingress as users run it: `tidegate ingress` in a child process, or the whole in-process
daemon with TLS and the control API, driven over real sockets on 127.0.0.1.

What these prove is what the contract (sections 2 and 4) and the README promise an operator:
bodies stream through in bounded memory both ways, SIGTERM drains, HTTPS and the control API
work end to end, the command line's exit codes, and the metrics listener's counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ingress.control import ControlClient
from ingress.messages import (
    ColdStartEvent,
    DrainedEvent,
    Event,
    InstanceSpec,
    ServiceRouting,
    StatsEvent,
)
from ingress.tls import CA_CERT
from tests.backends import running_backends
from tests.conftest import routing, running_ingress, url, wait_for
from tests.procs import (
    READY_TIMEOUT,
    REPO,
    TIDEGATE,
    ingress_process,
    proc_status,
    run_cli,
    stop,
)

MiB = 1024 * 1024
KiB = 1024
DEADLINE = 5.0  # seconds for anything that should happen at once


# -- raw HTTP/1.1 on asyncio streams ------------------------------------------------------------


@contextlib.asynccontextmanager
async def connection(
    port: int, *, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A client connection to 127.0.0.1:`port`, closed on exit."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1",
        port,
        ssl=ssl_context,
        server_hostname="localhost" if ssl_context is not None else None,
    )
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    """Status and lowercased headers of a response head (ending in the blank line)."""
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers


async def read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    async with asyncio.timeout(DEADLINE):
        return parse_head(await reader.readuntil(b"\r\n\r\n"))


async def read_response(
    reader: asyncio.StreamReader, timeout: float = DEADLINE
) -> tuple[int, dict[str, str], bytes]:
    """One response framed by Content-Length (what every instance route here sends)."""
    status, headers = await read_head(reader)
    assert "content-length" in headers, headers
    async with asyncio.timeout(timeout):
        body = await reader.readexactly(int(headers["content-length"]))
    return status, headers, body


async def count_body(reader: asyncio.StreamReader, length: int, timeout: float) -> int:
    """Read `length` body bytes without keeping them (fewer if the connection ends first)."""
    count = 0
    async with asyncio.timeout(timeout):
        while count < length:
            piece = await reader.read(min(MiB, length - count))
            if not piece:
                break
            count += len(piece)
    return count


def generated(size: int, block: int = 256 * KiB) -> Iterator[bytes]:
    """`size` bytes in pieces of `block`, made as they are sent: never held whole."""
    piece = b"u" * block
    left = size
    while left:
        yield piece if left >= block else piece[:left]
        left -= min(left, block)


async def upload(port: int, size: int, *, chunked: bool, timeout: float) -> tuple[int, bytes]:
    """POST a generated body of `size` bytes to the /upload route; (status, the body count)."""
    framing = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: %d" % size
    async with connection(port) as (reader, writer):
        async with asyncio.timeout(timeout):
            writer.write(b"POST /upload HTTP/1.1\r\nHost: e2e\r\n" + framing + b"\r\n\r\n")
            for piece in generated(size):
                if chunked:
                    writer.writelines([b"%x\r\n" % len(piece), piece, b"\r\n"])
                else:
                    writer.write(piece)
                await writer.drain()
            if chunked:
                writer.write(b"0\r\n\r\n")
            status, _headers, body = await read_response(reader, timeout)
    return status, body


def memory_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of `pid` in KiB: the resident set now and its peak so far."""
    status = proc_status(pid)
    return status["VmRSS"], status["VmHWM"]


# -- 1, 2: streaming in bounded memory ---------------------------------------------------------

STREAM_SIZE = 200 * 1000 * 1000


@pytest.mark.slow
async def test_200mb_each_way_streams_through_in_flat_memory(tmp_path: Path) -> None:
    """200 MB uploaded with Content-Length, 200 MB chunked and 200 MB downloaded arrive to
    the byte, while the ingress's peak resident memory grows by less than 30 MB."""
    async with (
        running_backends(1) as (backend,),
        ingress_process(tmp_path, "--static-upstream", backend.address) as ingress,
    ):
        rss_ready, _ = memory_kib(ingress.pid)
        for chunked in (False, True):
            status, body = await upload(ingress.port, STREAM_SIZE, chunked=chunked, timeout=20)
            assert (status, int(body)) == (200, STREAM_SIZE), f"chunked={chunked}"
        async with connection(ingress.port) as (reader, writer):
            writer.write(b"GET /stream?bytes=%d HTTP/1.1\r\nHost: e2e\r\n\r\n" % STREAM_SIZE)
            status, headers = await read_head(reader)
            assert status == 200
            assert int(headers["content-length"]) == STREAM_SIZE
            assert await count_body(reader, STREAM_SIZE, timeout=20) == STREAM_SIZE
        assert backend.bytes_sent == STREAM_SIZE
        _, peak = memory_kib(ingress.pid)
    assert peak - rss_ready < 30 * KiB, f"peak RSS grew by {(peak - rss_ready) // KiB} MiB"


def kernel_queued(ports: set[int]) -> int:
    """Bytes in the kernel's socket queues (sent but not yet read) of every IPv4 TCP socket
    with a local or remote port in `ports`, from /proc/net/tcp."""
    queued = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = (int(address.rsplit(":", 1)[1], 16) for address in fields[1:3])
        if local in ports or remote in ports:
            tx, rx = (int(count, 16) for count in fields[4].split(":"))
            queued += tx + rx
    return queued


@pytest.mark.slow
async def test_slow_reader_stalls_the_instance_not_the_ingress_memory(tmp_path: Path) -> None:
    """A client that asks for 100 MB and does not read stops the instance once the socket
    buffers on the way are full: the ingress holds under 1 MB of it, its memory stays flat,
    and reading later gets every byte."""
    total = 100 * 1000 * 1000
    loop = asyncio.get_running_loop()
    async with (
        running_backends(1) as (backend,),
        ingress_process(tmp_path, "--static-upstream", backend.address) as ingress,
    ):
        rss_ready, _ = memory_kib(ingress.pid)
        with socket.socket() as sock:
            # a small receive window, set before connecting so the handshake advertises it
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * KiB)
            sock.setblocking(False)
            await loop.sock_connect(sock, ("127.0.0.1", ingress.port))
            request = b"GET /stream?bytes=%d HTTP/1.1\r\nHost: e2e\r\n\r\n" % total
            await loop.sock_sendall(sock, request)

            # the instance writes until every buffer on the way is full, then waits
            deadline = loop.time() + 15
            stable, last = 0, -1
            while stable < 10:
                assert loop.time() < deadline, "the instance never stopped writing"
                sent = backend.bytes_sent
                stable = stable + 1 if sent == last and sent > 0 else 0
                last = sent
                await asyncio.sleep(0.05)
            # Most of what was written sits in the kernel: the instance's send queue, the
            # ingress's receive and send queues (Linux sizes them up to tcp_wmem/tcp_rmem's
            # maximum, several MB each) and the client's small receive queue. The rest is in
            # user space: the ingress's buffers and the instance's own write buffer.
            in_user_space = sent - kernel_queued({ingress.port, backend.port})
            assert in_user_space < MiB, f"{in_user_space} bytes held outside the kernel"
            assert sent < total // 4, f"the instance could write {sent} bytes"
            _, peak = memory_kib(ingress.pid)
            assert peak - rss_ready < 20 * KiB, f"peak RSS grew {(peak - rss_ready) // KiB} MiB"

            received = await recv_response_body(loop, sock, timeout=30)
        assert received == total
        assert backend.bytes_sent == total


async def recv_response_body(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, timeout: float
) -> int:
    """Read a Content-Length response from a non-blocking socket; the body's length."""
    buffer = bytearray(MiB)
    view = memoryview(buffer)
    head = b""
    async with asyncio.timeout(timeout):
        while b"\r\n\r\n" not in head:
            n = await loop.sock_recv_into(sock, view)
            assert n, "closed before the response head"
            head += bytes(view[:n])
        head, _, rest = head.partition(b"\r\n\r\n")
        status, headers = parse_head(head + b"\r\n\r\n")
        assert status == 200
        length = int(headers["content-length"])
        count = len(rest)
        while count < length:
            n = await loop.sock_recv_into(sock, view)
            if not n:
                break
            count += n
    return count


# -- 3: SIGTERM drains -------------------------------------------------------------------------


async def test_sigterm_drains_in_flight_requests_and_exits_zero(tmp_path: Path) -> None:
    """On SIGTERM the ingress turns unready, stops accepting, closes an idle keep-alive
    connection, still answers the request in flight (with Connection: close) and exits 0."""
    async with (
        running_backends(1) as (backend,),
        ingress_process(
            tmp_path, "--static-upstream", backend.address, "--drain-timeout", "20s"
        ) as ingress,
        connection(ingress.port) as (idle_reader, idle_writer),
        connection(ingress.port) as (busy_reader, busy_writer),
        aiohttp.ClientSession() as session,
    ):
        idle_writer.write(b"GET /echo HTTP/1.1\r\nHost: e2e\r\n\r\n")
        status, headers, _ = await read_response(idle_reader)
        assert status == 200 and headers.get("connection", "").lower() != "close"
        busy_writer.write(b"GET /slow HTTP/1.1\r\nHost: e2e\r\n\r\n")
        await wait_for(lambda: backend.inflight == 1, what="the slow request to reach b0")

        ingress.process.send_signal(signal.SIGTERM)

        # the idle keep-alive connection is closed by the ingress
        async with asyncio.timeout(DEADLINE):
            assert await idle_reader.read(1) == b""
        # readiness goes (503, or the metrics listener is gone)
        await poll_until_unready(session, ingress.metrics_url("/-/ready"))
        # and new connections are refused
        await poll_until_refused(ingress.port)
        assert ingress.process.returncode is None, "exited with a request in flight"

        backend.release.set()
        status, headers, body = await read_response(busy_reader)
        assert status == 200
        assert headers["connection"].lower() == "close"
        assert body == b"slow from b0\n"
        async with asyncio.timeout(DEADLINE):
            assert await busy_reader.read(1) == b""
        assert await ingress.wait(timeout=10) == 0, ingress.output()


async def test_sigterm_still_serves_a_request_held_in_the_queue(tmp_path: Path) -> None:
    """A request waiting in the hold queue when SIGTERM arrives is served once the slot ahead
    of it frees, with Connection: close, before the ingress exits 0."""
    async with (
        running_backends(1) as (backend,),
        ingress_process(
            tmp_path, "--static-upstream", backend.address, "--max-concurrency", "1"
        ) as ingress,
        connection(ingress.port) as (first_reader, first_writer),
        connection(ingress.port) as (held_reader, held_writer),
        aiohttp.ClientSession() as session,
    ):
        first_writer.write(b"GET /slow HTTP/1.1\r\nHost: e2e\r\n\r\n")
        await wait_for(lambda: backend.inflight == 1, what="the first request to reach b0")
        held_writer.write(b"GET /slow HTTP/1.1\r\nHost: e2e\r\n\r\n")
        queued = ("tidegate_queued_requests", {"service": "static"})
        await poll_metric(session, ingress.metrics_url(), *queued, until=1)

        ingress.process.send_signal(signal.SIGTERM)
        await poll_until_refused(ingress.port)  # draining has begun

        backend.release.set()
        for reader in (first_reader, held_reader):
            status, headers, _ = await read_response(reader)
            assert (status, headers["connection"].lower()) == (200, "close")
        assert backend.requests == 2
        assert await ingress.wait(timeout=10) == 0, ingress.output()


async def test_drain_timeout_cuts_off_what_is_left_and_exits_zero(tmp_path: Path) -> None:
    """A request still in flight when --drain-timeout runs out is cut off without a response,
    and the ingress still exits 0 without logging a traceback."""
    async with (
        running_backends(1) as (backend,),
        ingress_process(
            tmp_path, "--static-upstream", backend.address, "--drain-timeout", "300ms"
        ) as ingress,
        connection(ingress.port) as (reader, writer),
    ):
        writer.write(b"GET /slow HTTP/1.1\r\nHost: e2e\r\n\r\n")
        await wait_for(lambda: backend.inflight == 1, what="the slow request to reach b0")
        ingress.process.send_signal(signal.SIGTERM)
        assert await ingress.wait(timeout=10) == 0, ingress.output()
        async with asyncio.timeout(DEADLINE):
            assert await reader.read() == b""
    assert "Traceback" not in ingress.output()


async def poll_until_unready(session: aiohttp.ClientSession, ready_url: str) -> None:
    """Poll /-/ready until it answers 503 or stops answering, within the deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE
    while True:
        try:
            async with session.get(ready_url) as response:
                if response.status == 503:
                    return
                assert response.status == 200
        except aiohttp.ClientConnectionError:
            return
        assert loop.time() < deadline, "/-/ready still answers 200 after SIGTERM"
        await asyncio.sleep(0.02)


async def poll_until_refused(port: int) -> None:
    """Poll connecting to 127.0.0.1:`port` until it is refused, within the deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE
    while True:
        try:
            _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except ConnectionRefusedError:
            return
        writer.close()
        assert loop.time() < deadline, "the ingress still accepts connections after SIGTERM"
        await asyncio.sleep(0.02)


def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text as {(sample name, sorted labels): value}."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def poll_metric(
    session: aiohttp.ClientSession,
    metrics_url: str,
    name: str,
    labels: dict[str, str],
    *,
    until: float,
) -> None:
    """Scrape `metrics_url` until the sample `name{labels}` equals `until`, within the deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE
    key = (name, tuple(sorted(labels.items())))
    while True:
        async with session.get(metrics_url) as response:
            value = metric_samples(await response.text()).get(key)
        if value == until:
            return
        assert loop.time() < deadline, f"{name}{labels} is {value}, not {until}"
        await asyncio.sleep(0.02)


# -- 4: TLS ------------------------------------------------------------------------------------


@pytest.mark.both_loops
async def test_https_with_self_signed_ca_negotiates_http11(tmp_path: Path) -> None:
    """A client trusting the self-signed CA gets 200 over HTTPS with ALPN http/1.1, and the
    instance sees X-Forwarded-Proto: https."""
    async with (
        running_backends(1) as (backend,),
        running_ingress(
            [routing(addresses=[backend.address])],
            tls_listen=["127.0.0.1:0"],
            tls_self_signed=True,
            tls_state_dir=str(tmp_path),
        ) as ingress,
    ):
        client = ssl.create_default_context(cafile=str(tmp_path / CA_CERT))
        client.set_alpn_protocols(["h2", "http/1.1"])
        _host, port = ingress.https_addresses[0]
        async with connection(port, ssl_context=client) as (reader, writer):
            tls = writer.get_extra_info("ssl_object")
            assert tls.selected_alpn_protocol() == "http/1.1"
            writer.write(b"GET /echo HTTP/1.1\r\nHost: localhost\r\n\r\n")
            status, _headers, body = await read_response(reader)
    assert status == 200
    seen = {name.lower(): value for name, value in json.loads(body)["headers"]}
    assert seen["x-forwarded-proto"] == "https"


# -- 5: the control API ------------------------------------------------------------------------


@pytest.mark.both_loops
async def test_control_api_cold_start_instances_and_drain(tmp_path: Path) -> None:
    """Through the control socket: a request to a service with no instance is held and
    announced as a cold start, served once an instance is put, and a draining instance is
    reported drained only after its last request ends; stats count every request."""
    async with (
        running_backends(1) as (backend,),
        running_ingress([], control_socket=str(tmp_path / "c.sock")) as ingress,
        aiohttp.ClientSession() as session,
    ):
        client = ControlClient(tmp_path / "c.sock")
        events: asyncio.Queue[Event] = asyncio.Queue()

        async def collect() -> None:
            async for event in client.subscribe():
                events.put_nowait(event)

        collector = asyncio.create_task(collect())
        try:
            await client.put_service(ServiceRouting(name="svc", default=True))
            assert isinstance(await next_event(events), StatsEvent)

            port = ingress.http_addresses[0][1]

            async def get(path: str) -> tuple[int, str]:
                async with session.get(f"http://127.0.0.1:{port}{path}") as response:
                    return response.status, await response.text()

            held = asyncio.create_task(get("/echo"))
            cold = await next_event(events, ColdStartEvent)
            assert isinstance(cold, ColdStartEvent)
            assert cold.service == "svc" and cold.queued == 1
            assert not held.done()

            await client.put_instances("svc", [InstanceSpec(id="i1", address=backend.address)])
            async with asyncio.timeout(DEADLINE):
                status, _ = await held
            assert status == 200

            slow = asyncio.create_task(get("/slow"))
            await wait_for(lambda: backend.inflight == 1, what="the slow request to reach b0")
            draining = [InstanceSpec(id="i1", address=backend.address, state="draining")]
            await client.put_instances("svc", draining)
            # Wait for a snapshot showing the change with the request still in flight: events
            # arrive in the order they happen, so a drained event sent early would come first.
            async with asyncio.timeout(DEADLINE):
                while True:
                    event = await next_event(events, (StatsEvent, DrainedEvent))
                    assert isinstance(event, StatsEvent), "drained with a request in flight"
                    seen = [
                        (i.id, i.state, i.inflight) for i in event.snapshot.services[0].instances
                    ]
                    if seen == [("i1", "draining", 1)]:
                        break

            backend.release.set()
            async with asyncio.timeout(DEADLINE):
                assert await slow == (200, "slow from b0\n")
            drained = await next_event(events, DrainedEvent)
            assert isinstance(drained, DrainedEvent)
            assert (drained.service, drained.instance) == ("svc", "i1")

            stats = await client.stats()
            (svc,) = stats.services
            assert (svc.arrivals, svc.completions, svc.inflight, svc.queued) == (2, 2, 0, 0)
        finally:
            await client.close()
            collector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await collector


async def next_event(
    events: asyncio.Queue[Event], kind: type[Event] | tuple[type[Event], ...] | None = None
) -> Event:
    """The next event (of `kind`, skipping others) within the deadline."""
    async with asyncio.timeout(DEADLINE):
        while True:
            event = await events.get()
            if kind is None or isinstance(event, kind):
                return event


# -- 6: the command line -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "code", "stream", "fragment"),
    [
        pytest.param(
            [
                "ingress",
                "--listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "off",
                "--static-upstream",
                "nonsense",
            ],
            2,
            "stderr",
            "--static-upstream",
            id="bad-static-upstream",
        ),
        pytest.param([], 2, "stderr", "usage: tidegate", id="no-subcommand"),
        pytest.param(["ingress", "--help"], 0, "stdout", "--static-upstream", id="help"),
    ],
)
def test_cli_exit_codes(args: list[str], code: int, stream: str, fragment: str) -> None:
    """Usage errors exit 2 naming what is wrong, and --help exits 0 listing the flags."""
    done = run_cli(*args)
    assert done.returncode == code, done.stderr
    assert fragment in getattr(done, stream)


def test_cli_listen_port_in_use_exits_1_with_a_clear_message() -> None:
    """A --listen address another socket holds exits 1, naming the address and the reason."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_cli(
            "ingress",
            "--listen",
            f"127.0.0.1:{port}",
            "--metrics-listen",
            "127.0.0.1:0",
            "--static-upstream",
            "127.0.0.1:9",
        )
    assert done.returncode == 1, done.stderr
    assert f"127.0.0.1:{port}" in done.stderr
    assert "in use" in done.stderr.lower()
    assert "Traceback" not in done.stderr


def test_cli_malformed_listen_is_a_usage_error_naming_the_flag() -> None:
    """A malformed --listen address is a usage error (exit 2) whose message names --listen."""
    done = run_cli(
        "ingress",
        "--listen",
        "nonsense",
        "--metrics-listen",
        "off",
        "--static-upstream",
        "127.0.0.1:9",
    )
    assert done.returncode == 2, done.stderr
    assert "--listen" in done.stderr


def test_cli_unusable_control_socket_exits_1_without_a_traceback(tmp_path: Path) -> None:
    """A --control-socket path taken by a regular file exits 1 with a one-line explanation."""
    taken = tmp_path / "not-a-socket"
    taken.write_text("")
    done = run_cli(
        "ingress",
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "off",
        "--control-socket",
        str(taken),
    )
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert str(taken) in done.stderr
    assert taken.read_text() == ""


# -- 7: metrics --------------------------------------------------------------------------------


async def test_metrics_count_requests_by_class(tmp_path: Path) -> None:
    """After 3 successes, 2 not-founds and 1 server error from the instance, /metrics counts
    them by class for service "static", nothing is left in flight, and /-/healthy is 200."""
    async with (
        running_backends(1) as (backend,),
        ingress_process(tmp_path, "--static-upstream", backend.address) as ingress,
        aiohttp.ClientSession() as session,
    ):
        for path in ["/echo"] * 3 + ["/status/404"] * 2 + ["/status/503"]:
            async with session.get(ingress.url(path)) as response:
                await response.read()
        async with session.get(ingress.metrics_url("/metrics")) as response:
            assert response.status == 200
            text = await response.text()
        async with session.get(ingress.metrics_url("/-/healthy")) as response:
            assert response.status == 200
    samples = metric_samples(text)

    def requests(code_class: str) -> float:
        key = (("code_class", code_class), ("service", "static"))
        return samples[("tidegate_requests_total", key)]

    assert [requests(c) for c in ("2xx", "3xx", "4xx", "5xx")] == [3, 0, 2, 1]
    inflight = (("instance", "static-0"), ("service", "static"))
    assert samples[("tidegate_inflight_requests", inflight)] == 0
    assert samples[("tidegate_queued_requests", (("service", "static"),))] == 0


async def test_metrics_include_the_contracts_histograms() -> None:
    """/metrics has the request-duration and queue-wait histograms the contract names."""
    async with (
        running_backends(1) as (backend,),
        running_ingress(
            [routing(addresses=[backend.address])], metrics_listen="127.0.0.1:0"
        ) as ingress,
        aiohttp.ClientSession() as session,
    ):
        assert ingress.admin is not None
        async with session.get(url(ingress, "/echo")) as response:
            assert response.status == 200
        async with session.get(f"http://127.0.0.1:{ingress.admin.port}/metrics") as response:
            families = {
                f.name: f.type for f in text_string_to_metric_families(await response.text())
            }
    assert families.get("tidegate_request_duration_seconds") == "histogram"
    assert families.get("tidegate_queue_wait_seconds") == "histogram"


async def test_startup_lines_name_the_ports_actually_bound() -> None:
    """With port 0 for both listeners, the startup lines name the ports that were bound."""
    process = await asyncio.create_subprocess_exec(
        *TIDEGATE,
        "ingress",
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--static-upstream",
        "127.0.0.1:9",
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert process.stdout is not None
        lines: list[str] = []
        async with asyncio.timeout(READY_TIMEOUT):
            while not lines or "metrics on" not in lines[-1]:
                line = await process.stdout.readline()
                assert line, f"stdout ended after {lines}"
                lines.append(line.decode().strip())
    finally:
        await stop(process)
    assert not any(line.endswith(":0") for line in lines), lines
