"""The access log (ingress/accesslog.py) and Server-Timing: one JSON line per request, written
in batches by a thread; reopened for logrotate; dropping, not blocking, when it falls behind;
and the timings a client sees in Server-Timing."""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from pathlib import Path

import aiohttp
import pytest

from ingress.accesslog import AccessLog, Entry
from ingress.messages import InstanceSpec
from tests.backends import running_backends
from tests.conftest import raw_exchange, routing, running_ingress, url, wait_for

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
    "queue_ms": 250.0,
    "upstream_ms": 12.5,
    "total_ms": 262.5,
}


def entry(status: int = 200, **over: object) -> Entry:
    return Entry(**{**EXPECTED, "status": status, **over})  # type: ignore[arg-type]


def lines(path: Path) -> list[dict]:  # type: ignore[type-arg]
    return [json.loads(line) for line in path.read_text().splitlines()]


async def test_an_entry_is_one_json_line_with_nulls_and_escapes(tmp_path: Path) -> None:
    """Fields in the documented order; what is missing is null; quotes, backslashes and
    control characters stay inside one line."""
    path = tmp_path / "access.log"
    log = AccessLog(str(path), flush_interval=0.01)
    log.start()
    try:
        log.record(entry())
        log.record(
            entry(502, trace_id=None, host=None, service=None, instance=None, upstream_ms=None)
        )
        log.record(entry(path='/a"b\\c\x01', host="h\x7f"))
        await wait_for(lambda: path.exists() and len(lines(path)) == 3, 5, "three lines")
    finally:
        await log.close()
    first, missing, escaped = lines(path)
    assert list(first) == list(EXPECTED) and first == EXPECTED
    assert missing == {
        **EXPECTED,
        "status": 502,
        "trace_id": None,
        "host": None,
        "service": None,
        "instance": None,
        "upstream_ms": None,
    }
    assert (escaped["path"], escaped["host"]) == ('/a"b\\c\x01', "h\x7f")


def test_stamps_are_arrival_times_kept_per_millisecond(monkeypatch: pytest.MonkeyPatch) -> None:
    """stamp_at turns monotonic nanoseconds into wall-clock text and keeps the newest
    millisecond's text with its bounds; an older time gets its own text without displacing
    it."""
    s = 1_000_000_000  # ns
    monkeypatch.setattr(time, "time_ns", lambda: 1_764_158_400 * s + s // 2)  # 12:00:00.5Z
    monkeypatch.setattr(time, "monotonic_ns", lambda: 1000 * s + s // 2)
    log = AccessLog("-")
    t = 1000 * s + 123_456_789  # 12:00:00.123456789
    assert log.stamp_at(t) == "2025-11-26T12:00:00.123Z"
    assert log.stamp == "2025-11-26T12:00:00.123Z"
    assert (log.stamp_from, log.stamp_until) == (1000 * s + 123_000_000, 1000 * s + 124_000_000)
    assert log.stamp_at(999 * s + 999_999_999) == "2025-11-26T11:59:59.999Z"  # older: not kept
    assert log.stamp == "2025-11-26T12:00:00.123Z"
    assert log.stamp_at(1001 * s) == "2025-11-26T12:00:01.000Z"
    assert log.stamp == "2025-11-26T12:00:01.000Z"


def test_a_stepped_wall_clock_shows_from_the_next_new_millisecond(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Texts are kept per wall-clock millisecond and the clocks' offset is read again only
    for a millisecond not seen yet: a step of the wall clock shows from the next one, and a
    millisecond's text never changes. However many are kept, each time still gets its own."""
    s = 1_000_000_000  # ns
    wall = [1_764_158_400 * s]  # 2025-11-26T12:00:00Z
    monkeypatch.setattr(time, "time_ns", lambda: wall[0])
    monkeypatch.setattr(time, "monotonic_ns", lambda: 1000 * s)
    log = AccessLog("-")
    assert log.stamp_at(1000 * s) == "2025-11-26T12:00:00.000Z"
    wall[0] += 3600 * s  # NTP steps the wall clock an hour ahead
    assert log.stamp_at(1000 * s + 999_999) == "2025-11-26T12:00:00.000Z"
    assert log.stamp_at(1000 * s + 1_000_000) == "2025-11-26T13:00:00.001Z"
    for ms in range(2, 10_000):
        expected = f"2025-11-26T13:00:{ms // 1000:02d}.{ms % 1000:03d}Z"
        assert log.stamp_at(1000 * s + ms * 1_000_000) == expected


async def test_records_are_written_in_batches_and_reopened_for_logrotate(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    log = AccessLog(str(path), flush_interval=0.01)
    log.start()
    try:
        log.record(entry())
        log.record(entry(404))
        await wait_for(lambda: path.exists() and len(lines(path)) == 2, 5, "two lines")
        assert [line["status"] for line in lines(path)] == [200, 404]
        rotated = tmp_path / "access.log.1"
        path.rename(rotated)  # what logrotate does, before it signals
        log.reopen()
        log.record(entry(503))
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
        big = entry(path="/" + "x" * 70_000)  # one record is more than the pipe holds
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
    assert held["queue_ms"] > 0
    assert held["total_ms"] >= held["queue_ms"] + held["upstream_ms"] - 0.01
    # integer nanoseconds underneath: no float noise past the sixth decimal
    for key in ("queue_ms", "upstream_ms", "total_ms"):
        assert len(repr(held[key]).partition(".")[2]) <= 6, held
    match = re.fullmatch(r"queue;dur=([\d.]+), upstream;dur=([\d.]+)", timing)
    assert match is not None, timing
    assert float(match.group(1)) > 0
    assert records[3]["service"] is None and records[3]["upstream_ms"] is None


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
    assert (gone["instance"], gone["upstream_ms"]) == (None, None)
    assert gone["queue_ms"] > 0 and gone["total_ms"] >= gone["queue_ms"]
    assert rejected["request_id"] == rejected_id.group(1).decode()
    assert (rejected["method"], rejected["path"], rejected["service"]) == (None, None, None)
    assert (tunnel["path"], tunnel["instance"]) == ("/ws", "svc-a")
    assert tunnel["upstream_ms"] is not None
