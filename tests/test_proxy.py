"""The ingress end to end on real sockets: routing, framing, holding, limits and errors.

Each test starts real aiohttp instances and an in-process ingress on port 0, on the default
loop and on uvloop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket

import aiohttp
import pytest

from tests.backends import running_backends
from tests.conftest import raw_exchange, routing, running_ingress, url, wait_for

pytestmark = pytest.mark.both_loops


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_get_is_forwarded_with_proxy_headers() -> None:
    """A GET reaches the instance with X-Forwarded-*, Via, X-Request-Id and traceparent set."""
    async with (
        running_backends(1) as (backend,),
        running_ingress([routing(addresses=[backend.address])]) as ingress,
        aiohttp.ClientSession() as session,
    ):
        async with session.get(url(ingress, "/echo?x=1"), headers={"X-Request-Id": "abc"}) as r:
            assert r.status == 200
            assert r.headers["X-Request-Id"] == "abc"
            seen = await r.json()
    headers = {k.lower(): v for k, v in seen["headers"]}
    assert seen["path"] == "/echo?x=1"
    assert headers["x-forwarded-for"] == "127.0.0.1"
    assert headers["x-forwarded-proto"] == "http"
    assert headers["x-forwarded-host"].startswith("127.0.0.1:")
    assert headers["x-request-id"] == "abc"
    assert "tidegate" in headers["via"]
    version, trace, span, flags = headers["traceparent"].split("-")
    assert (version, len(trace), len(span), flags) == ("00", 32, 16, "01")


async def test_routes_by_host_and_404s_unknown_hosts() -> None:
    """Host picks the service; a Host no service claims gets 404 with X-Request-Id."""
    async with (
        running_backends(2) as (a, b),
        running_ingress(
            [
                routing("a", [a.address], domains=["a.test"], default=False),
                routing("b", [b.address], domains=["b.test"], default=False),
            ]
        ) as ingress,
        aiohttp.ClientSession() as session,
    ):
        for host, name in (("a.test", "b0"), ("b.test:8080", "b1")):
            async with session.get(url(ingress, "/echo"), headers={"Host": host}) as r:
                assert (await r.json())["backend"] == name
        async with session.get(url(ingress, "/echo"), headers={"Host": "c.test"}) as r:
            assert r.status == 404
            assert r.headers["X-Request-Id"]


async def test_keep_alive_and_pipelining_answer_in_order() -> None:
    """Three pipelined requests in one write get three responses, in order, on one connection."""
    async with (
        running_backends(1) as (backend,),
        running_ingress([routing(addresses=[backend.address])]) as ingress,
    ):
        request = b"GET /echo/%d HTTP/1.1\r\nHost: x\r\n\r\n"
        data = b"".join(request % i for i in range(3))
        data += b"GET /echo/last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        answer = await raw_exchange(ingress, data)
    paths = [
        json.loads(part.split(b"\r\n\r\n", 1)[1].split(b"\r\n")[0] or b"{}").get("path")
        for part in answer.split(b"HTTP/1.1 ")[1:]
    ]
    assert answer.count(b"HTTP/1.1 200") == 4
    assert paths == ["/echo/0", "/echo/1", "/echo/2", "/echo/last"]


async def test_chunked_request_and_body_lengths() -> None:
    """A chunked upload arrives whole and re-chunked; a Content-Length one keeps its length."""
    async with (
        running_backends(1) as (backend,),
        running_ingress([routing(addresses=[backend.address])]) as ingress,
    ):
        chunked = (
            b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            b"Connection: close\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        )
        answer = await raw_exchange(ingress, chunked)
        seen = json.loads(answer.split(b"\r\n\r\n", 1)[1])
        assert seen["body_length"] == 11
        assert seen["chunked"] is True
        sized = (
            b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc"
        )
        seen = json.loads((await raw_exchange(ingress, sized)).split(b"\r\n\r\n", 1)[1])
        assert seen["body_length"] == 3 and seen["chunked"] is False


@pytest.mark.parametrize(
    ("request_line", "expect_body"),
    [
        pytest.param(b"HEAD /echo", False, id="head"),
        pytest.param(b"GET /status/204", False, id="204"),
        pytest.param(b"GET /status/304", False, id="304"),
        pytest.param(b"GET /status/500", True, id="500"),
    ],
)
async def test_bodyless_responses_keep_the_connection_usable(
    request_line: bytes, expect_body: bool
) -> None:
    """HEAD, 204 and 304 carry no body, and the next request on the connection still works."""
    async with (
        running_backends(1) as (backend,),
        running_ingress([routing(addresses=[backend.address])]) as ingress,
    ):
        data = request_line + b" HTTP/1.1\r\nHost: x\r\n\r\n"
        data += b"GET /echo/after HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        answer = await raw_exchange(ingress, data)
    _first, rest = answer.split(b"\r\n\r\n", 1)
    assert b"/echo/after" in rest
    assert rest.startswith(b"HTTP/1.1 200") != expect_body


async def test_expect_100_continue_is_answered() -> None:
    """A client that sends Expect: 100-continue gets the interim 100 and then the response."""
    async with (
        running_backends(1) as (backend,),
        running_ingress([routing(addresses=[backend.address])]) as ingress,
    ):
        host, port = ingress.http_addresses[0]
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(
                b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
                b"Expect: 100-continue\r\nConnection: close\r\n\r\n"
            )
            async with asyncio.timeout(5):
                interim = await reader.readuntil(b"\r\n\r\n")
            assert interim.startswith(b"HTTP/1.1 100")
            writer.write(b"body")
            async with asyncio.timeout(5):
                answer = await reader.read()
        finally:
            writer.close()
    assert answer.startswith(b"HTTP/1.1 200")
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["body_length"] == 4


async def test_max_concurrency_holds_and_fifo() -> None:
    """50 concurrent slow requests on 2 instances at max_concurrency 3: never more than 3 in
    flight on either (counted by the instances), all 50 succeed, released in FIFO order."""
    order: list[tuple[str, str]] = []
    async with (
        running_backends(2, order) as backends,
        running_ingress(
            [routing(addresses=[b.address for b in backends], max_concurrency=3)]
        ) as ingress,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session,
    ):
        service = ingress.router.service("svc")
        assert service is not None

        async def one(i: int) -> int:
            async with session.get(url(ingress, "/slow?ms=100"), headers={"X-Index": str(i)}) as r:
                await r.read()
                return r.status

        tasks = []
        for i in range(50):
            tasks.append(asyncio.create_task(one(i)))
            # each request is in the ingress (in flight or held) before the next is sent,
            # so the order of arrival is the order of the index
            await wait_for(lambda i=i: service.balancer.arrivals == i + 1, what=f"arrival {i}")
        statuses = await asyncio.gather(*tasks)
    assert statuses == [200] * 50
    assert [b.max_inflight for b in backends] == [3, 3]
    assert sum(b.requests for b in backends) == 50
    assert [int(index) for _, index in order] == list(range(50))


async def test_queue_full_and_queue_timeout_give_503_with_retry_after() -> None:
    """One slot, a queue of 10, a 1 s queue timeout: 1 served, the rest 503 + Retry-After."""
    async with (
        running_backends(1) as (backend,),
        running_ingress(
            [
                routing(
                    addresses=[backend.address],
                    max_concurrency=1,
                    queue_max_length=10,
                    queue_timeout=1.0,
                )
            ]
        ) as ingress,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session,
    ):

        async def one() -> tuple[int, str | None]:
            async with session.get(url(ingress, "/slow?ms=2500")) as r:
                await r.read()
                return r.status, r.headers.get("Retry-After")

        results = await asyncio.gather(*(one() for _ in range(15)))
    statuses = sorted(status for status, _ in results)
    assert statuses == [200] + [503] * 14
    assert all(retry == "1" for status, retry in results if status == 503)


async def test_unreachable_instance_is_retried_on_another() -> None:
    """A refused connection is retried once on another instance, so the GET succeeds."""
    dead = f"127.0.0.1:{_free_port()}"
    async with (
        running_backends(1) as (backend,),
        running_ingress([routing(addresses=[dead, backend.address])]) as ingress,
        aiohttp.ClientSession() as session,
    ):
        for _ in range(4):
            async with session.get(url(ingress, "/echo")) as r:
                assert r.status == 200
        service = ingress.router.service("svc")
        assert service is not None and service.errors == {}
        assert service.balancer.inflight == 0


async def test_an_instance_that_resets_is_ejected_for_a_moment() -> None:
    """An instance that accepts and closes at once (a dead container behind Docker's proxy)
    fails one request, which is retried elsewhere; then it gets nothing while ejected, so no
    later request pays for it."""
    accepted = 0

    async def slam(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        writer.close()

    dead = await asyncio.start_server(slam, "127.0.0.1", 0)
    dead_address = f"127.0.0.1:{dead.sockets[0].getsockname()[1]}"
    async with (
        dead,
        running_backends(1) as (backend,),
        running_ingress([routing(addresses=[dead_address, backend.address])]) as ingress,
        aiohttp.ClientSession() as session,
    ):
        for _ in range(20):
            async with session.get(url(ingress, "/echo")) as r:
                assert r.status == 200
        service = ingress.router.service("svc")
        assert service is not None
        assert accepted == 1  # ties rotate: without ejection it would get every other one
        assert backend.requests == 20
        assert service.balancer.inflight == 0


async def test_all_instances_unreachable_gives_502() -> None:
    """When no instance accepts the connection, the client gets a 502 made by the ingress."""
    async with (
        running_ingress([routing(addresses=[f"127.0.0.1:{_free_port()}"])]) as ingress,
        aiohttp.ClientSession() as session,
    ):
        async with session.get(url(ingress, "/")) as r:
            assert r.status == 502
            assert r.headers["X-Request-Id"]
        service = ingress.router.service("svc")
        assert service is not None and service.errors.get("connect") == 1
        assert service.balancer.inflight == 0


async def test_request_timeout_gives_504_and_frees_the_slot() -> None:
    """No response within request_timeout: 504, and the instance's slot is released."""
    async with (
        running_backends(1) as (backend,),
        running_ingress([routing(addresses=[backend.address], request_timeout=0.3)]) as ingress,
        aiohttp.ClientSession() as session,
    ):
        async with session.get(url(ingress, "/slow")) as r:
            assert r.status == 504
        service = ingress.router.service("svc")
        assert service is not None
        assert service.balancer.inflight == 0


async def test_held_request_served_when_an_instance_appears() -> None:
    """A request for a service with no instance is held, then served once one is put."""
    async with (
        running_backends(1) as (backend,),
        running_ingress([routing(addresses=[])]) as ingress,
        aiohttp.ClientSession() as session,
    ):
        events = []
        ingress.router.add_listener(events.append)

        async def get() -> int:
            async with session.get(url(ingress, "/echo")) as r:
                await r.read()
                return r.status

        task = asyncio.create_task(get())
        service = ingress.router.service("svc")
        assert service is not None
        await wait_for(lambda: service.balancer.queued == 1, what="the request to be held")
        assert [type(e).__name__ for e in events] == ["ColdStartEvent"]
        from ingress.messages import InstanceSpec

        ingress.router.put_instances("svc", [InstanceSpec(id="i1", address=backend.address)])
        assert await task == 200


async def test_body_over_limit_gives_413() -> None:
    """A declared body over max_body_bytes gets 413 without reaching the instance."""
    async with (
        running_backends(1) as (backend,),
        running_ingress([routing(addresses=[backend.address], max_body_bytes=10)]) as ingress,
    ):
        answer = await raw_exchange(
            ingress, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\n01234567890"
        )
    assert answer.startswith(b"HTTP/1.1 413")
    assert backend.requests == 0


@pytest.mark.parametrize(
    ("data", "status"),
    [
        pytest.param(
            b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            400,
            id="cl-te",
        ),
        pytest.param(b"GET /\r\n\r\n", 400, id="http09"),
        pytest.param(
            b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 70000 + b"\r\n\r\n",
            431,
            id="oversized-head",
        ),
        pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\nX: a\r\n b\r\n\r\n", 400, id="obs-fold"),
    ],
)
async def test_malformed_requests_are_rejected_and_closed(data: bytes, status: int) -> None:
    """Ambiguous or malformed requests get 400/431, never reach an instance, and the
    connection is closed."""
    async with (
        running_backends(1) as (backend,),
        running_ingress([routing(addresses=[backend.address])]) as ingress,
    ):
        answer = await raw_exchange(ingress, data)
    assert answer.startswith(b"HTTP/1.1 %d" % status)
    assert b"x-request-id:" in answer.lower()
    assert backend.requests == 0


async def test_websocket_is_tunnelled_and_counted_in_flight() -> None:
    """A WebSocket upgrade is tunnelled both ways and counts as in flight until it closes."""
    async with (
        running_backends(1) as (backend,),
        running_ingress([routing(addresses=[backend.address])]) as ingress,
        aiohttp.ClientSession() as session,
    ):
        service = ingress.router.service("svc")
        assert service is not None
        async with session.ws_connect(url(ingress, "/ws")) as ws:
            await ws.send_str("hi")
            message = await ws.receive(timeout=5)
            assert message.data == "echo:hi"
            await ws.send_bytes(b"\x00" * 100_000)
            message = await ws.receive(timeout=5)
            assert message.data == b"\x00" * 100_000
            assert service.balancer.inflight == 1
        await wait_for(lambda: service.balancer.inflight == 0, what="the tunnel to be released")


async def test_close_delimited_response_is_rechunked_for_keep_alive() -> None:
    """A response ended by the instance closing is re-framed as chunked for an HTTP/1.1 client."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with running_ingress([routing(addresses=[f"127.0.0.1:{port}"])]) as ingress:
            data = (
                b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
                b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            answer = await raw_exchange(ingress, data)
    finally:
        server.close()
    assert answer.count(b"HTTP/1.1 200") == 2
    assert b"transfer-encoding: chunked" in answer.lower()
    assert b"d\r\nuntil the end\r\n0\r\n\r\n" in answer


async def test_ambiguous_response_becomes_502() -> None:
    """A response with both Content-Length and chunked framing is never forwarded: 502."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        )
        await writer.drain()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with (
            running_ingress([routing(addresses=[f"127.0.0.1:{port}"])]) as ingress,
            aiohttp.ClientSession() as session,
            session.get(url(ingress, "/")) as r,
        ):
            assert r.status == 502
    finally:
        server.close()


async def test_held_request_of_a_departed_client_leaves_the_queue() -> None:
    """A client that hangs up while its request is held is dropped from the queue at once."""
    async with running_ingress([routing(addresses=[])]) as ingress:
        service = ingress.router.service("svc")
        assert service is not None
        host, port = ingress.http_addresses[0]
        _reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await wait_for(lambda: service.balancer.queued == 1, what="the request to be held")
        writer.close()
        await wait_for(lambda: service.balancer.queued == 0, what="the queue to drop it")


async def test_slow_request_head_gets_408_and_close() -> None:
    """A request head that does not complete within head_timeout gets 408 and is closed."""
    async with (
        running_backends(1) as (backend,),
        running_ingress([routing(addresses=[backend.address])], head_timeout=0.2) as ingress,
    ):
        answer = await raw_exchange(ingress, b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    assert answer.startswith(b"HTTP/1.1 408")
    assert backend.requests == 0


async def test_idle_keep_alive_connection_is_closed() -> None:
    """A kept-alive connection idle past keepalive_timeout is closed by the ingress."""
    async with (
        running_backends(1) as (backend,),
        running_ingress([routing(addresses=[backend.address])], keepalive_timeout=0.2) as ingress,
    ):
        answer = await raw_exchange(ingress, b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
    # raw_exchange reads until the ingress closes: the response, then EOF, well before 5 s
    assert answer.startswith(b"HTTP/1.1 200")
    assert b"connection: close" not in answer.lower()


async def test_websocket_closed_by_the_instance_is_a_normal_end() -> None:
    """An instance closing its WebSocket ends the tunnel without counting an upstream error,
    and the 101 is counted among the responses."""
    async with (
        running_backends(1) as (backend,),
        running_ingress([routing(addresses=[backend.address])]) as ingress,
        aiohttp.ClientSession() as session,
    ):
        service = ingress.router.service("svc")
        assert service is not None
        async with session.ws_connect(url(ingress, "/ws")) as ws:
            await ws.send_str("bye")
            message = await ws.receive(timeout=5)
            assert message.type == aiohttp.WSMsgType.CLOSE
        await wait_for(lambda: service.balancer.inflight == 0, what="the tunnel to be released")
        await wait_for(lambda: service.codes[1] == 1, what="the 101 to be counted")
        assert service.errors == {}


async def test_held_request_gets_100_continue_when_granted() -> None:
    """A held Expect: 100-continue request gets its interim 100 as soon as another client's
    response frees the slot, from the ingress itself (this instance never sends one)."""
    release = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # keep-alive instance that ignores Expect: it waits for the body it was promised
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while head := await reader.readuntil(b"\r\n\r\n"):
                if head.startswith(b"GET /slow"):
                    await release.wait()
                else:
                    await reader.readexactly(4)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        async with running_ingress([routing(addresses=[address], max_concurrency=1)]) as ingress:
            service = ingress.router.service("svc")
            assert service is not None
            host, port = ingress.http_addresses[0]
            first = asyncio.create_task(
                raw_exchange(ingress, b"GET /slow HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            )
            await wait_for(lambda: service.balancer.inflight == 1, what="the first in flight")
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(
                    b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
                    b"Expect: 100-continue\r\nConnection: close\r\n\r\n"
                )
                await wait_for(lambda: service.balancer.queued == 1, what="the POST to be held")
                release.set()
                assert (await first).startswith(b"HTTP/1.1 200")
                async with asyncio.timeout(5):
                    interim = await reader.readuntil(b"\r\n\r\n")
                assert interim.startswith(b"HTTP/1.1 100")
                writer.write(b"body")
                async with asyncio.timeout(5):
                    answer = await reader.read()
            finally:
                writer.close()
    finally:
        server.close()
    assert answer.startswith(b"HTTP/1.1 200")
