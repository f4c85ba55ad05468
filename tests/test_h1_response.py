"""ResponseReader framing, fed whole and one byte at a time, with h11 as the oracle where it
applies: for each case h11 plays the client that sent the request, and where h11 rejects the
reader must too; where the reader alone rejects the case is listed in ``STRICTER``."""

from __future__ import annotations

from dataclasses import dataclass, field

import h11
import pytest

from ingress.h1.response import ResponseError, ResponseHead, ResponseReader

Event = tuple[object, ...]


class Recorder:
    """A ResponseSink keeping a compact event list (body pieces merged)."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.heads: list[ResponseHead] = []

    def on_response_head(self, head: ResponseHead) -> None:
        self.heads.append(head)
        self.events.append(("head", head.status, head.body, head.keep_alive))

    def on_response_body(self, data: bytes) -> None:
        assert data, "empty body callback"
        if self.events and self.events[-1][0] == "body":
            self.events[-1] = ("body", self.events[-1][1] + data)  # type: ignore[operator]
        else:
            self.events.append(("body", data))

    def on_response_end(self) -> None:
        self.events.append(("end",))


@dataclass
class Outcome:
    events: list[Event]
    heads: list[ResponseHead] = field(default_factory=list)
    tunnel: bytes | None = None
    error: str | None = None


def _pieces(stream: bytes, bytewise: bool) -> list[bytes]:
    return [stream[i : i + 1] for i in range(len(stream))] if bytewise else [stream]


def run_reader(
    stream: bytes, *, head_request: bool, eof: bool, bytewise: bool, max_head_bytes: int = 65536
) -> Outcome:
    """Start one exchange, feed `stream`, then EOF if asked; collect what the sink saw."""
    sink = Recorder()
    reader = ResponseReader(sink, max_head_bytes=max_head_bytes)
    reader.start(head_request=head_request)
    tunnel = None
    try:
        for piece in _pieces(stream, bytewise):
            if tunnel is not None:
                tunnel += piece
                continue
            tunnel = reader.feed(piece)
        if eof and tunnel is None:
            reader.feed_eof()
    except ResponseError as exc:
        return Outcome(sink.events, sink.heads, tunnel, exc.reason)
    return Outcome(sink.events, sink.heads, tunnel)


@dataclass
class H11Outcome:
    heads: list[tuple[int, list[tuple[bytes, bytes]]]] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    ended: bool = False
    tunnel: bytes | None = None
    rejected: bool = False


def run_h11(stream: bytes, *, head_request: bool, eof: bool, bytewise: bool) -> H11Outcome:
    """h11 as the client that sent GET (or HEAD), proposing an upgrade so a 101 is allowed."""
    out = H11Outcome()
    conn = h11.Connection(h11.CLIENT)
    conn.send(
        h11.Request(
            method=b"HEAD" if head_request else b"GET",
            target=b"/",
            headers=[(b"host", b"a"), (b"connection", b"upgrade"), (b"upgrade", b"websocket")],
        )
    )
    conn.send(h11.EndOfMessage())
    try:
        for piece in [*_pieces(stream, bytewise), *([b""] if eof else [])]:
            conn.receive_data(piece)
            while True:
                event = conn.next_event()
                if isinstance(event, h11.InformationalResponse | h11.Response):
                    out.heads.append((event.status_code, list(event.headers)))
                elif isinstance(event, h11.Data):
                    out.body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    out.ended = True
                else:
                    break
        if conn.their_state is h11.SWITCHED_PROTOCOL:
            out.tunnel = conn.trailing_data[0]
    except h11.RemoteProtocolError:
        out.rejected = True
    return out


OK = "HTTP/1.1 200 OK\r\n"


def _r(text: str, body: bytes = b"") -> bytes:
    return text.encode("latin-1") + body


# (stream, head_request, eof, expected events, expected tunnel, expected error or None)
CASES = [
    pytest.param(
        _r(OK + "Content-Length: 5\r\n\r\n", b"hello"),
        False,
        False,
        [("head", 200, "length", True), ("body", b"hello"), ("end",)],
        None,
        None,
        id="length",
    ),
    pytest.param(
        _r(OK + "Content-Length: 0\r\n\r\n"),
        False,
        False,
        [("head", 200, "length", True), ("end",)],
        None,
        None,
        id="length-zero",
    ),
    pytest.param(
        _r(OK + "Transfer-Encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n1\r\n!\r\n0\r\n\r\n"),
        False,
        False,
        [("head", 200, "chunked", True), ("body", b"hello!"), ("end",)],
        None,
        None,
        id="chunked",
    ),
    pytest.param(
        _r(OK + "Transfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\nX-Sum: 1\r\n\r\n"),
        False,
        False,
        [("head", 200, "chunked", True), ("body", b"hi"), ("end",)],
        None,
        None,
        id="chunked-trailers",
    ),
    pytest.param(
        _r(OK + "\r\n", b"until close"),
        False,
        True,
        [("head", 200, "close", False), ("body", b"until close"), ("end",)],
        None,
        None,
        id="close-delimited",
    ),
    pytest.param(
        _r("HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n", b"hi"),
        False,
        False,
        [("head", 200, "length", False), ("body", b"hi"), ("end",)],
        None,
        None,
        id="http10-length",
    ),
    pytest.param(
        _r("HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\n", b"hi"),
        False,
        False,
        [("head", 200, "length", True), ("body", b"hi"), ("end",)],
        None,
        None,
        id="http10-keep-alive",
    ),
    pytest.param(
        _r(OK + "Connection: close\r\nContent-Length: 2\r\n\r\n", b"hi"),
        False,
        False,
        [("head", 200, "length", False), ("body", b"hi"), ("end",)],
        None,
        None,
        id="connection-close",
    ),
    pytest.param(
        _r(OK + "Content-Length: 5\r\n\r\n"),
        True,
        False,
        [("head", 200, "none", True), ("end",)],
        None,
        None,
        id="head-with-length",
    ),
    pytest.param(
        _r(OK + "Transfer-Encoding: chunked\r\n\r\n"),
        True,
        False,
        [("head", 200, "none", True), ("end",)],
        None,
        None,
        id="head-with-chunked",
    ),
    pytest.param(
        _r(OK + "\r\n"),
        True,
        False,
        [("head", 200, "none", True), ("end",)],
        None,
        None,
        id="head-without-length",
    ),
    pytest.param(
        _r("HTTP/1.1 204 No Content\r\n\r\n"),
        False,
        False,
        [("head", 204, "none", True), ("end",)],
        None,
        None,
        id="204",
    ),
    pytest.param(
        _r("HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n"),
        False,
        False,
        [("head", 304, "none", True), ("end",)],
        None,
        None,
        id="304-with-length",
    ),
    pytest.param(
        _r("HTTP/1.1 100 Continue\r\n\r\n" + OK + "Content-Length: 2\r\n\r\n", b"ok"),
        False,
        False,
        [("head", 100, "none", True), ("head", 200, "length", True), ("body", b"ok"), ("end",)],
        None,
        None,
        id="100-then-200",
    ),
    pytest.param(
        _r("HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\nHTTP/1.1 102 Processing\r\n\r\n")
        + _r("HTTP/1.1 204 No Content\r\n\r\n"),
        True,
        False,
        [
            ("head", 103, "none", True),
            ("head", 102, "none", True),
            ("head", 204, "none", True),
            ("end",),
        ],
        None,
        None,
        id="two-interims-then-204",
    ),
    pytest.param(
        _r("HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n")
        + b"\r\n\x81\x05hello",
        False,
        False,
        [("head", 101, "none", False), ("end",)],
        b"\x81\x05hello",
        None,
        id="101-with-tunnel-bytes",
    ),
    pytest.param(
        _r("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n"),
        False,
        False,
        [("head", 101, "none", False), ("end",)],
        b"",
        None,
        id="101-no-connection-field",
    ),
    pytest.param(
        _r(OK + "Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", b"0\r\n\r\n"),
        False,
        False,
        [],
        None,
        "Content-Length",
        id="cl-te",
    ),
    pytest.param(
        _r(OK + "Content-Length: 2\r\nContent-Length: 2\r\n\r\n", b"hi"),
        False,
        False,
        [],
        None,
        "Content-Length",
        id="several-cl",
    ),
    pytest.param(
        _r(OK + "Content-Length: 2, 2\r\n\r\n", b"hi"),
        False,
        False,
        [],
        None,
        "malformed response head",
        id="cl-list",
    ),
    pytest.param(
        _r(OK + "Content-Length: 02\r\n\r\n", b"hi"),
        False,
        False,
        [],
        None,
        "invalid Content-Length",
        id="cl-leading-zero",
    ),
    pytest.param(
        _r(OK + "Transfer-Encoding: gzip, chunked\r\n\r\n", b"0\r\n\r\n"),
        False,
        False,
        [],
        None,
        "Transfer-Encoding other than chunked",
        id="te-gzip-chunked",
    ),
    pytest.param(
        _r(OK + "Transfer-Encoding: gzip\r\n\r\n", b"data"),
        False,
        True,
        [],
        None,
        "Transfer-Encoding other than chunked",
        id="te-gzip-close",
    ),
    pytest.param(
        _r("HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"0\r\n\r\n"),
        False,
        False,
        [],
        None,
        "HTTP/1.0",
        id="te-http10",
    ),
    pytest.param(
        _r("HTTP/1.1 204 No Content\r\nTransfer-Encoding: chunked\r\n\r\n", b"0\r\n\r\n"),
        False,
        False,
        [],
        None,
        "204 response with body framing",
        id="204-with-chunked",
    ),
    pytest.param(
        _r("HTTP/1.1 100 Continue\r\nContent-Length: 2\r\n\r\nhi" + OK + "\r\n"),
        False,
        False,
        [],
        None,
        "100 response with body framing",
        id="100-with-length",
    ),
    pytest.param(
        _r(OK + "Content-Length: 2\r\n\r\n", b"hiX"),
        False,
        False,
        [("head", 200, "length", True), ("body", b"hi"), ("end",)],
        None,
        "no response was expected",
        id="bytes-after-length-body",
    ),
    pytest.param(
        _r(OK + "Transfer-Encoding: chunked\r\n\r\n", b"0\r\n\r\n\r\n"),
        False,
        False,
        [("head", 200, "chunked", True), ("end",)],
        None,
        "no response was expected",
        id="crlf-after-chunked-body",
    ),
    pytest.param(
        _r(OK + "Content-Length: 5\r\n\r\n", b"hello"),
        True,
        False,
        [("head", 200, "none", True), ("end",)],
        None,
        "no response was expected",
        id="head-response-with-body",
    ),
    pytest.param(
        _r(OK + "Content-Length: 5\r\n\r\n", b"hel"),
        False,
        True,
        [("head", 200, "length", True), ("body", b"hel")],
        None,
        "response body cut short",
        id="truncated-length",
    ),
    pytest.param(
        _r(OK + "Transfer-Encoding: chunked\r\n\r\n", b"5\r\nhel"),
        False,
        True,
        [("head", 200, "chunked", True), ("body", b"hel")],
        None,
        "response body cut short",
        id="truncated-chunked",
    ),
    pytest.param(
        _r(OK + "Content-Len"),
        False,
        True,
        [],
        None,
        "response head cut short",
        id="truncated-head",
    ),
    pytest.param(
        _r("HTTP/1.1 100 Continue\r\n\r\n"),
        False,
        True,
        [("head", 100, "none", True)],
        None,
        "response head cut short",
        id="eof-after-interim",
    ),
    pytest.param(b"", False, True, [], None, None, id="eof-before-any-byte"),
    pytest.param(
        _r(OK + "X-A: a\r\n b\r\nContent-Length: 0\r\n\r\n"),
        False,
        False,
        [],
        None,
        "malformed response head",
        id="obs-fold",
    ),
    pytest.param(
        _r(OK + "X A: b\r\nContent-Length: 0\r\n\r\n"),
        False,
        False,
        [],
        None,
        "malformed response head",
        id="invalid-header-name",
    ),
    pytest.param(
        _r(OK + "X-A: a\x01b\r\nContent-Length: 0\r\n\r\n"),
        False,
        False,
        [],
        None,
        "malformed response head",
        id="header-ctl",
    ),
    pytest.param(
        _r("HTTP/1.1 200 OK\nContent-Length: 0\n\n"),
        False,
        False,
        [],
        None,
        "bare LF",
        id="lf-only",
    ),
    pytest.param(
        _r("HTTP/1.1 2000 OK\r\n\r\n"), False, False, [], None, "status line", id="status-4-digits"
    ),
    pytest.param(
        _r("HTTP/1.1 099 Odd\r\n\r\n"), False, False, [], None, "status line", id="status-below-100"
    ),
    pytest.param(
        _r("HTTP/2.0 200 OK\r\n\r\n"), False, False, [], None, "status line", id="status-http20"
    ),
    pytest.param(
        _r("HTTP/1.1 200 O\x01K\r\n\r\n"), False, False, [], None, "status line", id="reason-ctl"
    ),
    pytest.param(_r("ICY 200 OK\r\n\r\n"), False, False, [], None, "status line", id="icy"),
    pytest.param(
        _r(OK + "Transfer-Encoding: chunked\r\n\r\n", b"0x2\r\nhi\r\n0\r\n\r\n"),
        False,
        False,
        [("head", 200, "chunked", True)],
        None,
        "invalid chunk-size line",
        id="bad-chunk-size",
    ),
    pytest.param(
        _r(OK + "X-Big: " + "b" * 70000 + "\r\n\r\n"),
        False,
        False,
        [],
        None,
        "header section too large",
        id="head-too-large",
    ),
    pytest.param(
        _r("HTTP/1.1 200\r\nContent-Length: 1\r\n\r\n", b"x"),
        False,
        False,
        [("head", 200, "length", True), ("body", b"x"), ("end",)],
        None,
        None,
        id="no-reason-phrase",
    ),
]

# Cases the reader refuses and h11 (fed whole and byte by byte) accepts, and why.
STRICTER = {
    "cl-te": "h11 lets Transfer-Encoding win; both together are ambiguous (RFC 9112 6.3)",
    "several-cl": "h11 collapses equal lengths; we never forward them",
    "cl-list": "h11 collapses equal lengths; we never forward them",
    "cl-leading-zero": "leading zeros read as octal by some parsers",
    "te-http10": "RFC 9112 6.1: Transfer-Encoding in HTTP/1.0 means faulty framing",
    "204-with-chunked": "RFC 9112 6.1 forbids it; a server sending it may send a body too",
    "bytes-after-length-body": "h11 keeps them for the next cycle; nobody asked for them",
    "crlf-after-chunked-body": "h11 keeps them for the next cycle; nobody asked for them",
    "head-response-with-body": "h11 keeps them for the next cycle; nobody asked for them",
    "obs-fold": "h11 unfolds obs-fold; RFC 9112 5.2 lets a client reject it",
    "header-ctl": "h11 allows CTLs in values; RFC 9110 5.5 and llhttp do not",
    "lf-only": "h11 accepts bare LF line endings; llhttp and we do not",
    "reason-ctl": "h11 allows CTLs in the reason phrase; RFC 9112 4 does not",
    "status-http20": "an HTTP/1 connection cannot carry an HTTP/2.0 status line",
}

# Cases h11 rejects and the reader deliberately does not, and why.
LEFT_TO_CALLER = {
    "eof-before-any-byte": "EOF before any byte of the response: the caller, which knows it "
    "sent a request, decides between a retry and a 502",
}


@pytest.mark.parametrize(("stream", "head_request", "eof", "events", "tunnel", "error"), CASES)
def test_framing_table(
    request: pytest.FixtureRequest,
    stream: bytes,
    head_request: bool,
    eof: bool,
    events: list[Event],
    tunnel: bytes | None,
    error: str | None,
):
    """Each case gives the expected events, tunnel bytes and error, fed whole or bytewise, and
    disagrees with h11 only where listed in STRICTER."""
    results = [
        run_reader(stream, head_request=head_request, eof=eof, bytewise=bytewise)
        for bytewise in (False, True)
    ]
    for outcome in results:
        assert outcome.events == events
        assert outcome.tunnel == tunnel
        if error is None:
            assert outcome.error is None
        else:
            assert outcome.error is not None and error in outcome.error

    case = request.node.callspec.id
    oracles = [
        run_h11(stream, head_request=head_request, eof=eof, bytewise=bytewise)
        for bytewise in (False, True)
    ]
    h11_rejects = any(o.rejected for o in oracles) and case not in LEFT_TO_CALLER
    if h11_rejects:
        assert error is not None, "h11 rejects, the reader accepts"
    assert (error is not None and not h11_rejects) == (case in STRICTER)
    if error is None:
        ours = results[0]
        for oracle in oracles:
            assert [(h.status, h.headers) for h in ours.heads] == oracle.heads
            assert b"".join(e[1] for e in ours.events if e[0] == "body") == oracle.body  # type: ignore[misc]
            assert (("end",) in ours.events and ours.heads[-1].status != 101) == oracle.ended
            assert ours.tunnel == oracle.tunnel


def test_stricter_ids_exist():
    """Every STRICTER and LEFT_TO_CALLER entry names a case of the table."""
    assert set(STRICTER) | set(LEFT_TO_CALLER) <= {param.id for param in CASES}


def test_bytes_when_no_response_expected():
    """Bytes before start() is called are an error: the connection is out of step."""
    reader = ResponseReader(Recorder())
    with pytest.raises(ResponseError, match="no response was expected"):
        reader.feed(b"HTTP/1.1 200 OK\r\n\r\n")
    with pytest.raises(ResponseError):
        reader.feed(b"")


def test_keep_alive_connection_carries_several_exchanges():
    """start() once per request lets one reader read successive responses, each framed anew."""
    sink = Recorder()
    reader = ResponseReader(sink)
    reader.start(head_request=True)
    assert reader.feed(_r(OK + "Content-Length: 9\r\n\r\n")) is None
    reader.start(head_request=False)
    reader.feed(_r(OK + "Transfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n\r\n"))
    reader.start(head_request=False)
    reader.feed(_r(OK + "Content-Length: 1\r\n\r\ny"))
    assert sink.events == [
        ("head", 200, "none", True),
        ("end",),
        ("head", 200, "chunked", True),
        ("body", b"x"),
        ("end",),
        ("head", 200, "length", True),
        ("body", b"y"),
        ("end",),
    ]
    assert sink.heads[0].content_length == 9


def test_bytes_after_end_are_refused_even_if_the_sink_starts_again():
    """Bytes read along with the end of a response predate the next request, so they are
    refused even when the sink calls start() from on_response_end()."""

    class Eager(Recorder):
        def on_response_end(self) -> None:
            super().on_response_end()
            reader.start(head_request=False)

    sink = Eager()
    reader = ResponseReader(sink)
    reader.start(head_request=False)
    with pytest.raises(ResponseError, match="no response was expected"):
        reader.feed(_r(OK + "Content-Length: 0\r\n\r\n" + OK + "Content-Length: 0\r\n\r\n"))
    assert sink.events == [("head", 200, "length", True), ("end",)]


def test_start_twice_is_a_programming_error():
    """start() while a response is still expected raises RuntimeError, not ResponseError."""
    reader = ResponseReader(Recorder())
    reader.start(head_request=False)
    with pytest.raises(RuntimeError):
        reader.start(head_request=False)


def test_feed_after_101_is_a_programming_error():
    """After a 101 the connection is a tunnel: feeding the reader again raises RuntimeError."""
    reader = ResponseReader(Recorder())
    reader.start(head_request=False)
    assert reader.feed(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n") == b""
    with pytest.raises(RuntimeError):
        reader.feed(b"tunnel")
    reader.feed_eof()  # the tunnel's EOF is not the reader's business


def test_eof_when_idle_does_nothing():
    """EOF on an idle pooled connection is no error, and neither is a second EOF."""
    sink = Recorder()
    reader = ResponseReader(sink)
    reader.feed_eof()
    reader.feed_eof()
    assert sink.events == []


def test_response_head_fields():
    """headers are lowercased and stripped in order; tokens, chunked and length are filled in."""
    sink = Recorder()
    reader = ResponseReader(sink)
    reader.start(head_request=True)
    reader.feed(
        _r("HTTP/1.1 200 Fine\r\nX-A:  1 \r\nConnection: Keep-Alive, X-Hop\r\n")
        + _r("Transfer-Encoding: Chunked\r\n\r\n")
    )
    head = sink.heads[0]
    assert head.headers[:2] == [(b"x-a", b"1"), (b"connection", b"Keep-Alive, X-Hop")]
    assert head.connection_tokens == (b"keep-alive", b"x-hop")
    assert (head.reason, head.http_minor, head.chunked, head.content_length) == (
        b"Fine",
        1,
        True,
        None,
    )


@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
def test_head_limit_boundary(bytewise: bool):
    """A response head of max_head_bytes passes and one byte more fails, fed either way."""
    base = _r(OK + "X-Pad: \r\n\r\n")
    for extra, ok in ((0, True), (1, False)):
        stream = _r(OK + "X-Pad: " + "p" * (1024 - len(base) + extra) + "\r\n\r\n")
        outcome = run_reader(
            stream, head_request=True, eof=False, bytewise=bytewise, max_head_bytes=1024
        )
        assert (outcome.error is None) is ok


@pytest.mark.parametrize(
    ("line", "status", "reason"),
    [
        pytest.param("HTTP/1.1 200 OK", 200, b"OK", id="ok"),
        pytest.param("HTTP/1.1 200 OK ", 200, b"OK ", id="ok-trailing-space"),
        pytest.param("HTTP/1.1 200 OKAY", 200, b"OKAY", id="okay"),
        pytest.param("HTTP/1.1 200 ", 200, b"", id="empty-reason"),
        pytest.param("HTTP/1.0 200 OK", 200, b"OK", id="http10"),
    ],
)
def test_status_line_fields(line: str, status: int, reason: bytes):
    """status, reason and http_minor come from the status line as sent."""
    outcome = run_reader(
        _r(line + "\r\nContent-Length: 0\r\n\r\n"), head_request=False, eof=False, bytewise=False
    )
    head = outcome.heads[0]
    assert (head.status, head.reason, head.http_minor) == (status, reason, int(line[7]))


@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
def test_line_end_verdict_comes_first(bytewise: bool):
    """A bare CR in a 101 head is the error reported, as for any head, fed either way."""
    stream = _r("HTTP/1.1 101 Switching Protocols\r\nUpgrade: a\rb\r\n\r\n")
    outcome = run_reader(stream, head_request=False, eof=False, bytewise=bytewise)
    assert outcome.error == "bare CR in head"
