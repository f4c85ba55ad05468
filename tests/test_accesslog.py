"""The access log (ingress/accesslog.py) and Server-Timing: one JSON line per request, written
in batches by a thread; reopened for logrotate; dropping, not blocking, when it falls behind;
and the timings a client sees in Server-Timing."""

from __future__ import annotations

import asyncio
import json
import os
import re
from pathlib import Path

import aiohttp

from ingress.accesslog import AccessLog, format_batch
from ingress.messages import InstanceSpec
from tests.backends import running_backends
from tests.conftest import routing, running_ingress, url, wait_for


def raw(status: int = 200, **over: object) -> tuple:  # type: ignore[type-arg]
    values: dict[str, object] = {
        "arrived": 100.0,
        "rid": b"r1",
        "trace": b"t1",
        "client": b"127.0.0.1",
        "method": b"GET",
        "path": b"/a?b=1",
        "host": b"h.test",
        "service": "svc",
        "instance": "svc-1",
        "status": status,
        "bytes_in": 3,
        "bytes_out": 5,
        "queue": 0.25,
        "upstream": 0.0125,
        "total": 0.2625,
    }
    values.update(over)
    return tuple(values.values())


def lines(path: Path) -> list[dict]:  # type: ignore[type-arg]
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_format_batch_gives_one_json_line_per_record() -> None:
    data = format_batch([raw(), raw(502, upstream=-1.0, instance="", trace=b"")], 1_764_158_400.0)
    first, second = (json.loads(line) for line in data.decode().splitlines())
    assert first == {
        "time": "2025-11-26T12:01:40.000Z",
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
    assert (second["upstream_ms"], second["instance"], second["trace_id"]) == (None, None, None)
    assert data.endswith(b"\n")


def test_non_ascii_bytes_in_a_path_do_not_break_a_line() -> None:
    data = format_batch([raw(path=b"/caf\xc3\xa9\xff")], 0.0)
    assert json.loads(data)["path"] == "/caf\xc3\xa9\xff"


async def test_records_are_written_in_batches_and_reopened_for_logrotate(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    log = AccessLog(str(path), flush_interval=0.01)
    log.start()
    try:
        log.record(raw())
        log.record(raw(404))
        await wait_for(lambda: path.exists() and len(lines(path)) == 2, 5, "two lines")
        assert [line["status"] for line in lines(path)] == [200, 404]
        rotated = tmp_path / "access.log.1"
        path.rename(rotated)  # what logrotate does, before it signals
        log.reopen()
        log.record(raw(503))
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
        big = raw(path=b"/" + b"x" * 70_000)  # one record is more than the pipe holds
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
            ingress.router.delete_service("svc")
            async with session.get(url(ingress, "/gone")) as r:
                assert r.status == 404
                assert "Server-Timing" in r.headers
    records = lines(path)  # the ingress is closed: everything is written
    assert [r["status"] for r in records] == [200, 404, 404]
    assert (records[1]["instance"], records[1]["host"]) == ("svc-a", "other.test")
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
    match = re.fullmatch(r"queue;dur=([\d.]+), upstream;dur=([\d.]+)", timing)
    assert match is not None, timing
    assert float(match.group(1)) > 0
    assert records[2]["service"] is None and records[2]["upstream_ms"] is None


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
