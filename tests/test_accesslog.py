"""The access log (ingress/accesslog.py) and Server-Timing: one JSON line per request, written
in batches by a thread; reopened for logrotate; dropping, not blocking, when it falls behind;
and the timings a client sees in Server-Timing."""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingress import accesslog
from ingress.accesslog import IMPLEMENTATION, AccessLog, line, py_line
from ingress.messages import InstanceSpec
from tests.backends import running_backends
from tests.conftest import raw_exchange, routing, running_ingress, url, wait_for

S = 1_000_000_000  # ns
T0 = 1000 * S  # a monotonic arrival time
WALL = 1_764_158_400 * S  # 2025-11-26T12:00:00Z
# (name, value) in line()'s order: the arguments of a proxied request
ARGS = {
    "offset": WALL + 100 * S + 125_000_000 - T0,  # arrival: 12:01:40.125
    "t0": T0,
    "granted": T0 + 250_000_000,
    "answered": T0 + 262_500_000,
    "end": T0 + 263_000_999,
    "request_id": b"r1",
    "trace_id": b"t1",
    "client": "127.0.0.1",
    "method": b"GET",
    "path": b"/a?b=1",
    "host": b"h.test",
    "service": "svc",
    "instance": "svc-1",
    "status": 200,
    "bytes_in": 3,
    "bytes_out": 5,
}
EXPECTED = {
    "time": "2025-11-26T12:01:40.125Z",
    "request_id": "r1",
    "trace_id": "t1",
    "client": "127.0.0.1",
    "method": "GET",
    "path": "/a?b=1",
    "host": "h.test",
    "service": "svc",
    "instance": "svc-1",
    "status": 200,
    "bytes_in": 3,
    "bytes_out": 5,
    "queue_us": 250_000,
    "upstream_us": 12_500,
    "total_us": 263_000,
}
BOTH = pytest.mark.parametrize("make", [line, py_line], ids=["c", "python"])


def make_line(make: Callable[..., bytes] = line, **over: object) -> bytes:
    return make(*{**ARGS, **over}.values())


def lines(path: Path) -> list[dict]:  # type: ignore[type-arg]
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_line_is_made_in_c() -> None:
    """The install built ingress/_logline.c (setup installs a compiler when missing): the
    Python line is the fallback, at several times the cost."""
    assert IMPLEMENTATION == "c"
    assert line is not py_line


@BOTH
def test_a_line_is_one_json_object_with_nulls_and_escapes(make: Callable[..., bytes]) -> None:
    """Fields in the documented order, durations in whole microseconds; what is missing is
    null; quotes, backslashes and control characters stay inside one line, and a stray
    non-ASCII byte is read as latin-1, so the line stays UTF-8."""
    first = make_line(make)
    assert first.endswith(b"}\n") and first.count(b"\n") == 1
    parsed = json.loads(first)
    assert list(parsed) == list(EXPECTED) and parsed == EXPECTED
    missing = make_line(
        make,
        granted=-1,
        answered=-1,
        trace_id=None,
        method=None,
        path=None,
        host=None,
        service=None,
        instance=None,
        status=499,
    )
    assert json.loads(missing) == {
        **EXPECTED,
        "status": 499,
        "trace_id": None,
        "method": None,
        "path": None,
        "host": None,
        "service": None,
        "instance": None,
        "queue_us": 263_000,  # waited until the end
        "upstream_us": None,
    }
    escaped = make_line(make, path=b'/a"b\\c\x01\n', host=b"h\x7f\xe9", client="\u00e9\x1f")
    assert escaped.count(b"\n") == 1
    parsed = json.loads(escaped.decode("utf-8"))
    assert (parsed["path"], parsed["host"], parsed["client"]) == (
        '/a"b\\c\x01\n',
        "h\x7f\u00e9",
        "\u00e9\x1f",
    )


@BOTH
def test_times_are_arrival_times_on_the_wall_clock(make: Callable[..., bytes]) -> None:
    """The monotonic arrival plus the offset, as RFC 3339 UTC with milliseconds; a second's
    text is kept, and a line from an earlier second (a long request ending among short ones)
    still gets its own."""
    offset = WALL - T0  # T0 is 12:00:00.000

    def stamp(t0: int) -> str:
        text: str = json.loads(make_line(make, offset=offset, t0=t0, end=t0))["time"]
        return text

    assert stamp(T0 + 123_456_789) == "2025-11-26T12:00:00.123Z"
    assert stamp(T0 + 999_999_999) == "2025-11-26T12:00:00.999Z"
    assert stamp(T0 + S) == "2025-11-26T12:00:01.000Z"
    assert stamp(T0 - 1) == "2025-11-26T11:59:59.999Z"
    assert stamp(T0 + 86_400 * S + 7_000_000) == "2025-11-27T12:00:00.007Z"
    assert stamp(T0 + S + 1) == "2025-11-26T12:00:01.000Z"


_TEXT = st.one_of(st.none(), st.binary(max_size=40), st.text(max_size=20))
_TIME = st.integers(min_value=0, max_value=2**50)


@settings(max_examples=300, deadline=None)
@given(
    offset=st.integers(min_value=0, max_value=2**61),
    t0=_TIME,
    granted=st.one_of(st.just(-1), _TIME),
    answered=st.one_of(st.just(-1), _TIME),
    end=_TIME,
    request_id=st.one_of(st.binary(max_size=40), st.text(max_size=20)),
    client=st.one_of(st.binary(max_size=40), st.text(max_size=20)),
    texts=st.tuples(*[_TEXT] * 6),
    counts=st.tuples(*[st.integers(min_value=0, max_value=2**62)] * 3),
)
def test_the_c_line_and_the_python_line_are_the_same_bytes(
    offset: int,
    t0: int,
    granted: int,
    answered: int,
    end: int,
    request_id: bytes | str,
    client: bytes | str,
    texts: tuple[bytes | str | None, ...],
    counts: tuple[int, int, int],
) -> None:
    """Any texts (bytes or str, escapes, non-ASCII), any times (nonsense orders too: then
    durations are negative alike): the fallback is no different from what runs."""
    trace_id, method, path, host, service, instance = texts
    args: list[Any] = [offset, t0, granted, answered, end, request_id, trace_id, client]
    args += [method, path, host, service, instance, *counts]
    made = line(*args)
    assert made == py_line(*args)
    assert json.loads(made)["total_us"] == (end - t0) // 1000


def test_the_c_line_rejects_what_is_not_a_line() -> None:
    """Wrong types are a TypeError naming the argument, not a crash or a wrong line."""
    with pytest.raises(TypeError, match="request_id must be bytes or str, not NoneType"):
        make_line(request_id=None)
    with pytest.raises(TypeError, match="instance must be bytes or str or None, not int"):
        make_line(instance=5)
    with pytest.raises(TypeError, match="takes 16 arguments"):
        line(*[1, 2, 3])  # type: ignore[arg-type]
    with pytest.raises(OverflowError):
        make_line(t0=2**64)


async def test_the_python_line_is_said_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An install without the C module still logs, and says so once, at start."""
    for implementation, warned in (("c", False), ("python", True)):
        monkeypatch.setattr(accesslog, "IMPLEMENTATION", implementation)
        caplog.clear()
        log = AccessLog(str(tmp_path / "access.log"))
        log.start()
        await log.close()
        assert ("made in Python" in caplog.text) is warned, (implementation, caplog.text)


async def test_a_stepped_wall_clock_shows_within_a_refresh(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The offset is read again every CLOCK_REFRESH: a step of the wall clock (NTP, say)
    shows in the next lines without a restart; closing stops the refresh."""
    monkeypatch.setattr(accesslog, "CLOCK_REFRESH", 0.01)
    real = time.time_ns
    log = AccessLog("-")
    log.start()
    try:
        before = log.offset
        monkeypatch.setattr(time, "time_ns", lambda: real() + 3600 * S)
        await wait_for(lambda: log.offset - before > 3599 * S, 5, "the stepped offset")
    finally:
        await log.close()
    assert log._clock_timer is None


async def test_records_are_written_in_batches_and_reopened_for_logrotate(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    log = AccessLog(str(path), flush_interval=0.01)
    log.start()
    try:
        log.record(make_line())
        log.record(make_line(status=404))
        await wait_for(lambda: path.exists() and len(lines(path)) == 2, 5, "two lines")
        assert [line["status"] for line in lines(path)] == [200, 404]
        rotated = tmp_path / "access.log.1"
        path.rename(rotated)  # what logrotate does, before it signals
        log.reopen()
        log.record(make_line(status=503))
        await wait_for(lambda: path.exists() and len(lines(path)) == 1, 5, "the reopened file")
        assert [line["status"] for line in lines(rotated)] == [200, 404]
        assert lines(path)[0]["status"] == 503
    finally:
        await log.close()
    assert log.dropped == 0
    assert oct(path.stat().st_mode & 0o777) == "0o640"


async def test_a_stalled_destination_drops_records_instead_of_blocking(tmp_path: Path) -> None:
    """A FIFO nobody reads fills up; the writer thread blocks on it, and once max_pending
    batches wait, further records are dropped and counted while the loop carries on."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # so opening it to write cannot block
    log = AccessLog(str(fifo), flush_interval=10.0, max_pending=2)
    log.start()
    try:
        big = make_line(path=b"/" + b"x" * 70_000)  # one record is more than the pipe holds
        for _ in range(10):
            log.record(big)
            log.flush()  # each one handed over at once
        assert log.dropped > 0
        assert log.written + log.dropped == 10
    finally:
        while True:  # drain so the writer can finish and close
            try:
                if not os.read(reader, 1 << 20):
                    break
            except BlockingIOError:
                if log._handed == log._done:
                    break
                await asyncio.sleep(0.01)
        await log.close()
        os.close(reader)


async def test_every_request_is_logged_with_its_timings(tmp_path: Path) -> None:
    """The ingress writes a line per request, with the id the client got, the trace id it
    sent, the instance, and the queue wait a cold start caused; Server-Timing says the same."""
    path = tmp_path / "access.log"
    async with running_backends(1) as (backend,):
        svc = routing(queue_timeout=5.0)
        async with (
            running_ingress([svc], access_log=str(path)) as ingress,
            aiohttp.ClientSession() as session,
        ):
            trace = "4bf92f3577b34da6a3ce929d0e0e4736"
            headers = {"traceparent": f"00-{trace}-00f067aa0ba902b7-01"}
            request = asyncio.ensure_future(session.get(url(ingress, "/echo"), headers=headers))
            service = ingress.router.service("svc")
            assert service is not None
            await wait_for(lambda: service.balancer.queued == 1, 5, "the request held")
            ingress.router.put_instances("svc", [InstanceSpec(id="svc-a", address=backend.address)])
            async with await request as response:
                assert response.status == 200
                request_id = response.headers["X-Request-Id"]
                timing = response.headers["Server-Timing"]
            async with session.get(url(ingress, "/nope"), headers={"Host": "other.test"}) as r:
                assert r.status == 404  # the default route takes any host; the app has no /nope
            # quote and backslash are visible ASCII, so allowed in a target: escaped in the log
            answer = await raw_exchange(
                ingress, b'GET /q"\\ HTTP/1.1\r\nHost: h.test\r\nConnection: close\r\n\r\n'
            )
            assert answer.startswith(b"HTTP/1.1 404 ")
            ingress.router.delete_service("svc")
            async with session.get(url(ingress, "/gone")) as r:
                assert r.status == 404
                assert "Server-Timing" in r.headers
    records = lines(path)  # the ingress is closed: everything is written
    assert [r["status"] for r in records] == [200, 404, 404, 404]
    assert (records[1]["instance"], records[1]["host"]) == ("svc-a", "other.test")
    assert (records[2]["path"], records[2]["instance"]) == ('/q"\\', "svc-a")
    held = records[0]
    assert held["request_id"] == request_id
    assert held["trace_id"] == trace
    assert (held["service"], held["instance"], held["method"], held["path"]) == (
        "svc",
        "svc-a",
        "GET",
        "/echo",
    )
    assert held["queue_us"] > 0
    assert held["total_us"] >= held["queue_us"] + held["upstream_us"]
    match = re.fullmatch(r"queue;dur=([\d.]+), upstream;dur=([\d.]+)", timing)
    assert match is not None, timing
    assert float(match.group(1)) > 0
    assert records[3]["service"] is None and records[3]["upstream_us"] is None


def test_the_access_log_is_on_by_default_and_off_with_a_flag() -> None:
    from ingress.cli import settings_from_args
    from tidegate.cli import build_parser

    def settings(*flags: str) -> str | None:
        args = build_parser().parse_args(["ingress", "--static-upstream", "127.0.0.1:9", *flags])
        return settings_from_args(args).access_log

    assert settings() == "-"
    assert settings("--access-log", "/var/log/tidegate/access.log") == (
        "/var/log/tidegate/access.log"
    )
    assert settings("--no-access-log") is None


async def test_requests_that_end_without_a_whole_response_are_logged_too(tmp_path: Path) -> None:
    """A line for every request, not only those that got a whole response: a client that
    gives up in the queue (499, as nginx logs it: what a cold start that took too long looks
    like), a malformed request (the 400 and the id the client got; no method or path, as the
    head never came whole) and a WebSocket the client closed (101). The reject is counted."""
    path = tmp_path / "access.log"
    async with running_backends(1) as (backend,):
        svc = routing(queue_timeout=30.0)
        async with running_ingress([svc], access_log=str(path)) as ingress:
            service = ingress.router.service("svc")
            assert service is not None
            host, port = ingress.http_addresses[0]
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"GET /waiting HTTP/1.1\r\nHost: h.test\r\n\r\n")
            await wait_for(lambda: service.balancer.queued == 1, 5, "the request held")
            writer.close()  # no instance came in time for this client
            await wait_for(lambda: service.balancer.queued == 0, 5, "the request given up")
            answer = await raw_exchange(ingress, b"GET / HTTP/1.1\r\nHost h.test\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 400 "), answer
            rejected_id = re.search(rb"(?i)x-request-id: (\S+)", answer)
            assert rejected_id is not None, answer
            assert ingress.router.unrouted[4] == 1
            ingress.router.put_instances("svc", [InstanceSpec(id="svc-a", address=backend.address)])
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(
                b"GET /ws HTTP/1.1\r\nHost: h.test\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
            )
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 101 "), head
            writer.close()  # the client hangs up: the tunnel ends on its side
            await wait_for(lambda: service.codes[1] == 1, 5, "the tunnel counted at its end")
    records = lines(path)  # the ingress is closed: everything is written
    assert [r["status"] for r in records] == [499, 400, 101]
    gone, rejected, tunnel = records
    assert (gone["method"], gone["path"], gone["service"]) == ("GET", "/waiting", "svc")
    assert (gone["instance"], gone["upstream_us"]) == (None, None)
    assert gone["queue_us"] > 0 and gone["total_us"] >= gone["queue_us"]
    assert rejected["request_id"] == rejected_id.group(1).decode()
    assert (rejected["method"], rejected["path"], rejected["service"]) == (None, None, None)
    assert (tunnel["path"], tunnel["instance"]) == ("/ws", "svc-a")
    assert tunnel["upstream_us"] is not None
