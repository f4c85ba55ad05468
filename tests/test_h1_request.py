"""RequestReader against h11 as an oracle, plus its own contract (limits, upgrade, keep-alive).

The differential rule, for every byte stream, fed whole and one byte at a time:

- the reader gives the same results both ways;
- where h11 rejects (either way), the reader rejects;
- where both accept, they agree on method, target, version, headers, body bytes and request
  boundaries; in every case the requests the reader completed are a prefix of h11's;
- where the reader rejects and h11 accepts, the case is listed in ``STRICTER`` with why.

h11 gets a minimal response after each request so it moves on to the next; since h11 never
keeps an HTTP/1.0 connection alive, a fresh h11 connection takes over the unread bytes after
an HTTP/1.0 request that asked for keep-alive, as a server implementing RFC 9112 9.3 would.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import h11
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingress.h1.request import RequestError, RequestHead, RequestReader

LIMIT = 65536  # the reader's default max_head_bytes; h11's incomplete-event limit matches it

HOST = b"Host: example.com\r\n"


def _get(target: bytes = b"/", extra: bytes = b"", version: bytes = b"1.1") -> bytes:
    return b"GET " + target + b" HTTP/" + version + b"\r\n" + HOST + extra + b"\r\n"


def _post(extra: bytes, body: bytes) -> bytes:
    return b"POST /submit HTTP/1.1\r\n" + HOST + extra + b"\r\n" + body


def _chunked(body: bytes) -> bytes:
    return _post(b"Transfer-Encoding: chunked\r\n", body)


def _cl(value: bytes, body: bytes) -> bytes:
    return _post(b"Content-Length: " + value + b"\r\n", body)


# Each case: the byte stream and the status the reader must answer (None: accepted).
CORPUS = [
    # -- well-formed --------------------------------------------------------------------
    pytest.param(_get(), None, id="get-minimal"),
    pytest.param(_get(b"/a/b?c=d&e=%20f", b"Accept: */*\r\n"), None, id="get-query"),
    pytest.param(_get(b'/a"<>{}|\\^`b'), None, id="target-odd-vchars"),
    pytest.param(_cl(b"5", b"hello"), None, id="post-content-length"),
    pytest.param(_cl(b"0", b""), None, id="post-content-length-zero"),
    pytest.param(_post(b"Content-Length:\t5\t\r\n", b"hello"), None, id="content-length-tab-ows"),
    pytest.param(_chunked(b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"), None, id="chunked"),
    pytest.param(
        _chunked(b"A\r\n0123456789\r\na\r\nabcdefghij\r\n0\r\n\r\n"), None, id="chunk-hex"
    ),
    pytest.param(_chunked(b"0005\r\nhello\r\n0000\r\n\r\n"), None, id="chunk-size-leading-zeros"),
    pytest.param(_chunked(b"5;name=value;flag\r\nhello\r\n0;last\r\n\r\n"), None, id="chunk-ext"),
    pytest.param(_chunked(b'5;n="a b;\\"c"\r\nhello\r\n0\r\n\r\n'), None, id="chunk-ext-quoted"),
    pytest.param(
        _chunked(b"5\r\nhello\r\n0\r\nX-Sum: abc\r\nContent-Length: 99\r\n\r\n"),
        None,
        id="chunked-trailers-dropped",
    ),
    pytest.param(
        _post(b"Transfer-Encoding: Chunked\r\n", b"3\r\nabc\r\n0\r\n\r\n"), None, id="te-mixed-case"
    ),
    pytest.param(
        _post(b"Transfer-Encoding:\tchunked\r\n", b"3\r\nabc\r\n0\r\n\r\n"), None, id="te-tab-ows"
    ),
    pytest.param(_get(extra=b"X-A:   spaced  value \t\r\nX-Empty:\r\n"), None, id="header-ows"),
    pytest.param(_get(extra=b"X-Latin: caf\xe9\r\n"), None, id="header-obs-text"),
    pytest.param(_get(extra=b"Accept: a\r\nACCEPT: b\r\n"), None, id="header-duplicates"),
    pytest.param(b"GET / HTTP/1.0\r\n\r\n", None, id="http10-no-host"),
    pytest.param(
        b"GET /1 HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /2 HTTP/1.0\r\n\r\n",
        None,
        id="http10-keep-alive-pipelined",
    ),
    pytest.param(
        _get(b"/1")
        + _cl(b"3", b"abc")
        + _chunked(b"2\r\nhi\r\n0\r\n\r\n")
        + _get(b"/4", b"Connection: close\r\n"),
        None,
        id="pipelined-four",
    ),
    pytest.param(
        _chunked(b"0\r\n\r\n") + b"GET /admin HTTP/1.1\r\nHost: example.com\r\n\r\n",
        None,
        id="te-then-pipelined",
    ),
    pytest.param(b"OPTIONS * HTTP/1.1\r\n" + HOST + b"\r\n", None, id="options-asterisk"),
    pytest.param(_get(b"http://example.com/x?y"), None, id="absolute-form"),
    pytest.param(
        b"GET http://EXAMPLE.com:8080/x HTTP/1.1\r\nHost: example.com:8080\r\n\r\n",
        None,
        id="absolute-form-port",
    ),
    pytest.param(b"GET / HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n", None, id="host-ipv6"),
    pytest.param(
        _post(b"Expect: 100-continue\r\nContent-Length: 2\r\n", b"ok"), None, id="expect-continue"
    ),
    pytest.param(
        _get(extra=b"Connection: Upgrade\r\nUpgrade: websocket\r\n") + _get(b"/after"),
        None,
        id="upgrade-declined-then-request",
    ),
    pytest.param(_get(extra=b"Upgrade: websocket\r\n"), None, id="upgrade-without-connection"),
    pytest.param(
        b"HEAD / HTTP/1.1\r\n" + HOST + b"Content-Length: 3\r\n\r\nabc", None, id="head-with-body"
    ),
    pytest.param(b"PURGE /cache HTTP/1.1\r\n" + HOST + b"\r\n", None, id="method-purge"),
    pytest.param(
        b"PATCH /x HTTP/1.1\r\n" + HOST + b"Content-Length: 2\r\n\r\n{}", None, id="method-patch"
    ),
    # -- smuggling classics and other hostile input --------------------------------------
    pytest.param(
        _post(b"Content-Length: 6\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\nX"),
        400,
        id="cl-te",
    ),
    pytest.param(
        _post(
            b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n", b"8\r\nSMUGGLED\r\n0\r\n\r\n"
        ),
        400,
        id="te-cl",
    ),
    pytest.param(
        _post(b"Transfer-Encoding : chunked\r\n", b"0\r\n\r\n"), 400, id="te-space-before-colon"
    ),
    pytest.param(_post(b"Transfer-Encoding: xchunked\r\n", b"0\r\n\r\n"), 400, id="te-xchunked"),
    pytest.param(_post(b"Transfer-Encoding: identity\r\n", b""), 400, id="te-identity"),
    pytest.param(
        _post(b"Transfer-Encoding: gzip, chunked\r\n", b"0\r\n\r\n"), 501, id="te-gzip-chunked"
    ),
    pytest.param(
        _post(b"Transfer-Encoding: chunked, identity\r\n", b"0\r\n\r\n"),
        400,
        id="te-chunked-identity",
    ),
    pytest.param(
        _post(b"Transfer-Encoding: chunked, chunked\r\n", b"0\r\n\r\n"), 400, id="te-chunked-twice"
    ),
    pytest.param(
        _post(b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n"),
        400,
        id="te-duplicate",
    ),
    pytest.param(
        _post(b"Transfer-Encoding: \x0bchunked\r\n", b"0\r\n\r\n"), 400, id="te-vertical-tab"
    ),
    pytest.param(
        _post(b'Transfer-Encoding: "chunked"\r\n', b"0\r\n\r\n"), 400, id="te-quoted-value"
    ),
    pytest.param(
        _post(b"Transfer-Encoding: chunked\t\r\n", b"0\r\n\r\n"), 400, id="te-trailing-tab"
    ),
    pytest.param(
        b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400, id="te-http10"
    ),
    pytest.param(
        _post(b"Content-Length: 5\r\nContent-Length: 5\r\n", b"hello"), 400, id="cl-duplicate-equal"
    ),
    pytest.param(
        _post(b"Content-Length: 5\r\nContent-Length: 6\r\n", b"hello!"), 400, id="cl-conflicting"
    ),
    pytest.param(_cl(b"5, 5", b"hello"), 400, id="cl-list-equal"),
    pytest.param(_cl(b"+5", b"hello"), 400, id="cl-plus"),
    pytest.param(_cl(b"-1", b""), 400, id="cl-negative"),
    pytest.param(_cl(b"05", b"hello"), 400, id="cl-leading-zero"),
    pytest.param(_cl(b"0x5", b"hello"), 400, id="cl-hex"),
    pytest.param(_cl(b"5 5", b"hello"), 400, id="cl-inner-space"),
    pytest.param(_cl(b"", b""), 400, id="cl-empty"),
    pytest.param(_cl(b"9" * 25, b""), 400, id="cl-overflow"),
    pytest.param(_chunked(b"0x10\r\n" + b"a" * 16 + b"\r\n0\r\n\r\n"), 400, id="chunk-size-0x"),
    pytest.param(_chunked(b'1;a"b\r\nx\r\n0\r\n\r\n'), 400, id="chunk-ext-stray-quote"),
    pytest.param(_chunked(b"1; a=b\r\nx\r\n0\r\n\r\n"), 400, id="chunk-ext-bws"),
    pytest.param(_chunked(b"1 ;a=b\r\nx\r\n0\r\n\r\n"), 400, id="chunk-size-space-ext"),
    pytest.param(_chunked(b"5 \r\nhello\r\n0\r\n\r\n"), 400, id="chunk-size-trailing-space"),
    pytest.param(_chunked(b"1" + b"0" * 16 + b"\r\nx"), 400, id="chunk-size-overflow"),
    pytest.param(_chunked(b"0" * 21 + b"5\r\nhello\r\n0\r\n\r\n"), 400, id="chunk-size-21-digits"),
    pytest.param(_chunked(b"-5\r\nhello\r\n0\r\n\r\n"), 400, id="chunk-size-negative"),
    pytest.param(
        _chunked(b"1;x=" + b"y" * 5000 + b"\r\nx\r\n0\r\n\r\n"), 400, id="chunk-line-huge"
    ),
    pytest.param(_chunked(b"5\r\nhelloXY0\r\n\r\n"), 400, id="chunk-data-overrun"),
    pytest.param(_chunked(b"5\nhello\n0\n\n"), 400, id="chunk-lf-only"),
    pytest.param(_chunked(b"1\r\nx\r\n0\r\nX: a\r\n b\r\n\r\n"), 400, id="trailer-obs-fold"),
    pytest.param(_chunked(b"1\r\nx\r\n0\r\nX Y: a\r\n\r\n"), 400, id="trailer-bad-name"),
    pytest.param(b"GET / HTTP/1.1\nHost: example.com\n\n", 400, id="lf-only-head"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: example.com\nX: y\r\n\r\n", 400, id="mixed-lf-head"),
    pytest.param(_get(extra=b"X-A: a\r\n b\r\n"), 400, id="obs-fold"),
    pytest.param(b"GET / HTTP/1.1\r\n " + HOST + b"\r\n", 400, id="obs-fold-first-line"),
    pytest.param(_get(extra=b"X-A: a\x00b\r\n"), 400, id="header-nul"),
    pytest.param(_get(extra=b"X-A: a\x01b\r\n"), 400, id="header-ctl"),
    pytest.param(_get(extra=b"X-A: a\x7fb\r\n"), 400, id="header-del"),
    pytest.param(_get(extra=b"X-A: a\rb\r\n"), 400, id="header-bare-cr"),
    pytest.param(_get(extra=b"X A: b\r\n"), 400, id="header-name-space"),
    pytest.param(_get(extra=b": b\r\n"), 400, id="header-name-empty"),
    pytest.param(_get(extra=b"X@A: b\r\n"), 400, id="header-name-non-token"),
    pytest.param(_get(extra=b"X-A : b\r\n"), 400, id="header-space-before-colon"),
    pytest.param(_get(extra=b"Garbage\r\n"), 400, id="header-no-colon"),
    pytest.param(_get(b"/a\x00b"), 400, id="target-nul"),
    pytest.param(_get(b"/a b"), 400, id="target-space"),
    pytest.param(_get(b"/a\tb"), 400, id="target-tab"),
    pytest.param(_get(b"/caf\xe9"), 400, id="target-obs-text"),
    pytest.param(_get(b"x"), 400, id="target-no-slash"),
    pytest.param(_get(b"*"), 400, id="asterisk-with-get"),
    pytest.param(_get(b"http://evil.example/"), 400, id="absolute-form-host-mismatch"),
    pytest.param(_get(b"http://user@example.com/"), 400, id="absolute-form-userinfo"),
    pytest.param(b"GET  / HTTP/1.1\r\n" + HOST + b"\r\n", 400, id="request-line-double-space"),
    pytest.param(b"GET / HTTP/1.1 \r\n" + HOST + b"\r\n", 400, id="request-line-trailing-space"),
    pytest.param(b"GET  HTTP/1.1\r\n" + HOST + b"\r\n", 400, id="request-line-no-target"),
    pytest.param(b"get / HTTP/1.1\r\n" + HOST + b"\r\n", 400, id="method-lowercase"),
    pytest.param(b"FOO / HTTP/1.1\r\n" + HOST + b"\r\n", 501, id="method-unknown"),
    pytest.param(b"G\x00ET / HTTP/1.1\r\n" + HOST + b"\r\n", 400, id="method-nul"),
    pytest.param(b" GET / HTTP/1.1\r\n" + HOST + b"\r\n", 400, id="leading-space"),
    pytest.param(
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", 501, id="connect"
    ),
    pytest.param(b"GET /\r\n\r\n", 400, id="http09"),
    pytest.param(_get(version=b"2.0"), 505, id="http20"),
    pytest.param(_get(version=b"1.2"), 505, id="http12"),
    pytest.param(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505, id="h2-preface"),
    pytest.param(b"GET / http/1.1\r\n" + HOST + b"\r\n", 400, id="version-lowercase"),
    pytest.param(b"\r\n" + _get(), 400, id="leading-crlf"),
    pytest.param(_get() + b"\r\n" + _get(), 400, id="crlf-between-requests"),
    pytest.param(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400, id="tls-client-hello"),
    pytest.param(b"GET / HTTP/1.1\r\n\r\n", 400, id="host-missing"),
    pytest.param(_get(extra=b"Host: other.example\r\n"), 400, id="host-duplicate"),
    pytest.param(b"GET / HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n", 400, id="host-duplicate-http10"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: exa mple.com\r\n\r\n", 400, id="host-invalid"),
    pytest.param(b"GET / HTTP/1.1\r\nHost:\r\n\r\n", 400, id="host-empty"),
    pytest.param(_get(extra=b"X-Big: " + b"a" * (LIMIT + 100) + b"\r\n"), 431, id="head-oversize"),
    pytest.param(
        _get(extra=b"Connection: upgrade\r\nUpgrade: websocket\r\nContent-Length: 5\r\n")
        + b"hello",
        400,
        id="upgrade-with-body",
    ),
    pytest.param(
        _get(extra=b"Connection: close\r\n") + _get(), 400, id="request-after-connection-close"
    ),
    pytest.param(b"GET / HTTP/1.0\r\n\r\n" + _get(), 400, id="request-after-http10"),
]

# Cases the reader refuses and h11 accepts, fed whole and byte by byte, and why.
STRICTER = {
    "cl-te": "h11 lets Transfer-Encoding win; both fields together are ambiguous (RFC 9112 6.3)",
    "te-cl": "same as cl-te, fields in the other order",
    "te-http10": "RFC 9112 6.1: Transfer-Encoding in HTTP/1.0 means faulty framing",
    "te-trailing-tab": "llhttp reads a trailing HTAB as part of the coding; rare, left refused",
    "cl-duplicate-equal": "h11 collapses equal Content-Length fields; we never forward them",
    "cl-list-equal": "h11 collapses a list of equal lengths; we never forward them",
    "cl-leading-zero": "leading zeros read as octal by some parsers",
    "chunk-ext-stray-quote": "h11 ignores everything after ';'; llhttp's extension grammar",
    "chunk-ext-bws": "h11 ignores everything after ';'; no whitespace in chunk lines",
    "chunk-size-trailing-space": "h11 allows trailing whitespace; no whitespace in chunk lines",
    "chunk-size-overflow": "h11 allows 20 hex digits; llhttp and we stop at 2**64 - 1",
    "chunk-line-huge": "h11 has no cap; chunk lines are buffered, so capped at 4096 like Go",
    "chunk-lf-only": "h11 waits for a CRLF that never comes; a bare LF is refused at once",
    "trailer-obs-fold": "h11 unfolds obs-fold; RFC 9112 5.2 lets us reject it",
    "lf-only-head": "h11 accepts bare LF line endings; llhttp and we do not",
    "mixed-lf-head": "as lf-only-head, for one line",
    "obs-fold": "h11 unfolds obs-fold; RFC 9112 5.2 lets us reject it",
    "header-ctl": "h11 allows CTLs in values; RFC 9110 5.5 and llhttp do not",
    "header-del": "h11 allows DEL in values; RFC 9110 5.5 and llhttp do not",
    "target-no-slash": "not a valid request-target form (RFC 9112 3.2); h11 takes any vchars",
    "asterisk-with-get": "asterisk-form only for OPTIONS (RFC 9112 3.2.4)",
    "absolute-form-host-mismatch": "the instance would route by Host, we by the target",
    "absolute-form-userinfo": "RFC 9110 4.2.4: userinfo in an http URI is an error",
    "method-lowercase": "methods are case-sensitive; llhttp knows only the registered ones",
    "method-unknown": "llhttp knows only registered methods: 501 (RFC 9110 9.1)",
    "connect": "a reverse proxy does not tunnel CONNECT: 501",
    "http20": "HTTP/2.0 in an HTTP/1 request line: 505",
    "http12": "no HTTP/1.2: 505",
    "host-invalid": "RFC 9112 3.2: an invalid Host value is a 400",
    "host-empty": "an http(s) URI always has an authority, so Host cannot be empty",
    "upgrade-with-body": "llhttp would tunnel the body that h11 reads as the body",
}


# -- harness ------------------------------------------------------------------------------


@dataclass
class Message:
    """One request as either parser saw it, normalised for comparison."""

    method: bytes
    target: bytes
    version: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytearray = field(default_factory=bytearray)
    ended: bool = False


@dataclass
class Outcome:
    messages: list[Message]
    rejected: bool
    status: int | None = None
    heads: list[RequestHead] = field(default_factory=list)

    def ended(self) -> list[Message]:
        return [m for m in self.messages if m.ended]


def _normalise(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    # h11 lowercases Transfer-Encoding values; everything else is compared as is.
    return [(n, v.lower() if n == b"transfer-encoding" else v) for n, v in headers]


class Recorder:
    """A RequestSink keeping everything it is told."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.heads: list[RequestHead] = []

    def on_request_head(self, head: RequestHead) -> None:
        self.heads.append(head)
        version = b"1.%d" % head.http_minor
        self.messages.append(Message(head.method, head.target, version, _normalise(head.headers)))

    def on_request_body(self, data: bytes) -> None:
        assert data, "empty body callback"
        self.messages[-1].body += data

    def on_request_end(self) -> None:
        self.messages[-1].ended = True


def _pieces(stream: bytes, bytewise: bool) -> list[bytes]:
    return [stream[i : i + 1] for i in range(len(stream))] if bytewise else [stream]


def run_reader(stream: bytes, bytewise: bool, max_head_bytes: int = LIMIT) -> Outcome:
    """Feed the reader, declining every upgrade (resume) as an instance answering 200 would."""
    sink = Recorder()
    reader = RequestReader(sink, max_head_bytes=max_head_bytes)
    try:
        for piece in _pieces(stream, bytewise):
            leftover = reader.feed(piece)
            while leftover is not None:
                leftover = reader.resume()
    except RequestError as exc:
        return Outcome(sink.messages, True, exc.status, sink.heads)
    return Outcome(sink.messages, False, None, sink.heads)


def _h11_keeps_1_0_alive(request: h11.Request) -> bool:
    tokens = {
        t.strip().lower()
        for name, value in request.headers
        if name == b"connection"
        for t in value.split(b",")
    }
    return request.http_version == b"1.0" and b"keep-alive" in tokens and b"close" not in tokens


def run_h11(stream: bytes, bytewise: bool) -> Outcome:
    """Feed h11 as a server, answering each request so that it reads the next."""
    messages: list[Message] = []
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=LIMIT)
    try:
        for piece in _pieces(stream, bytewise):
            conn.receive_data(piece)
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA or event is h11.PAUSED:
                    break
                if isinstance(event, h11.Request):
                    request = event
                    messages.append(
                        Message(event.method, event.target, event.http_version, list(event.headers))
                    )
                elif isinstance(event, h11.Data):
                    messages[-1].body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    messages[-1].ended = True
                    conn.send(h11.Response(status_code=404, headers=[(b"content-length", b"0")]))
                    conn.send(h11.EndOfMessage())
                    if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                        conn.start_next_cycle()
                    elif _h11_keeps_1_0_alive(request):
                        unread, _ = conn.trailing_data
                        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=LIMIT)
                        if unread:  # b"" would mean EOF to h11
                            conn.receive_data(unread)
    except h11.RemoteProtocolError:
        return Outcome(messages, True)
    return Outcome(messages, False)


def check_differential(stream: bytes) -> tuple[Outcome, bool]:
    """Apply the module's differential rule; return the reader's outcome and h11's verdict."""
    whole = run_reader(stream, bytewise=False)
    bytewise = run_reader(stream, bytewise=True)
    assert whole.messages == bytewise.messages
    assert whole.status == bytewise.status
    h11_whole = run_h11(stream, bytewise=False)
    h11_bytes = run_h11(stream, bytewise=True)
    h11_rejects = h11_whole.rejected or h11_bytes.rejected
    if h11_rejects:
        assert whole.rejected, "h11 rejects, the reader accepts"
    for oracle in (h11_whole, h11_bytes):
        done = whole.ended()
        assert done == oracle.ended()[: len(done)]
        if not whole.rejected and not oracle.rejected:
            assert whole.messages == oracle.messages
    return whole, h11_rejects


# -- the corpus ---------------------------------------------------------------------------


@pytest.mark.parametrize(("stream", "status"), CORPUS)
def test_corpus_against_h11(request: pytest.FixtureRequest, stream: bytes, status: int | None):
    """Each corpus stream obeys the differential rule and gets its expected status."""
    outcome, h11_rejects = check_differential(stream)
    assert outcome.status == status
    case = request.node.callspec.id
    stricter = outcome.rejected and not h11_rejects
    assert stricter == (case in STRICTER), f"{case}: reader stricter than h11: {stricter}"


def test_corpus_is_large_and_stricter_ids_exist():
    """The corpus has at least 60 streams and every STRICTER entry names one of them."""
    ids = {param.id for param in CORPUS}
    assert len(ids) == len(CORPUS) >= 60
    assert set(STRICTER) <= ids


# -- generated requests -------------------------------------------------------------------

_PATH = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-._~/%?=&", max_size=10)
_VALUE = st.text(alphabet=[chr(c) for c in range(0x20, 0x7F)] + ["\t", "\xe9"], max_size=12)
_TOKEN = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-!#$%&'*+.^_`|~",
    min_size=1,
    max_size=8,
)


@st.composite
def _chunk_encoding(draw: st.DrawFn, body: bytes, strict: set[str]) -> bytes:
    out = []
    pos = 0
    while pos < len(body):
        size = draw(st.integers(1, len(body) - pos))
        digits = draw(st.sampled_from(["%x", "%X", "%03x"])) % size
        shape = draw(
            st.sampled_from(["plain"] * 30 + ["ext", "quoted", "pad17", "bws", "quote", "sp"])
        )
        line = digits.encode()
        if shape == "ext":
            line += b";a=b;c"
        elif shape == "quoted":
            line += b';q="x y"'
        elif shape == "pad17":
            line = line.rjust(17, b"0")
            strict.add("chunk-size")
        elif shape == "bws":
            line += b"; a=b"
            strict.add("chunk-ext")
        elif shape == "quote":
            line += b';a"b'
            strict.add("chunk-ext")
        elif shape == "sp":
            line += b" "
            strict.add("chunk-ws")
        out.append(line + b"\r\n" + body[pos : pos + size] + b"\r\n")
        pos += size
    out.append(b"0\r\n")
    trailer = draw(st.sampled_from([b""] * 6 + [b"X-T: v\r\n"] * 3 + [b"X-T: v\r\n w\r\n"]))
    if trailer.endswith(b" w\r\n"):
        strict.add("trailer-fold")
    return b"".join(out) + trailer + b"\r\n"


@st.composite
def _request(draw: st.DrawFn, strict: set[str]) -> bytes:
    version = draw(st.sampled_from([b"1.1"] * 24 + [b"1.0"] * 4 + [b"2.0", b"1.2"]))
    if version not in (b"1.0", b"1.1"):
        strict.add("version")
    methods = [b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"HEAD", b"OPTIONS", b"PURGE"]
    method = draw(st.sampled_from(methods * 5 + [b"get", b"FOO", b"CONNECT"]))
    if method not in methods:
        strict.add("method")
    host = draw(st.sampled_from([b"example.com", b"Shop.example:8080", b"127.0.0.1", b"[::1]"]))
    path = draw(_PATH).encode()
    shape = draw(
        st.sampled_from(["origin"] * 24 + ["absolute"] * 3 + ["asterisk", "bare", "hostile"])
    )
    if shape == "origin":
        target = b"/" + path
    elif shape == "absolute":
        target = b"http://" + host.lower() + b"/" + path
    elif shape == "asterisk":
        target = b"*"
        if method != b"OPTIONS":
            strict.add("asterisk")
    elif shape == "bare":
        target = b"x" + path
        strict.add("target")
    else:
        bad = draw(st.sampled_from([b" ", b"\x00", b"\x7f", b"\x80", b"\t"]))
        target = b"/" + path + bad + b"z"

    headers: list[tuple[bytes, bytes]] = []
    host_shape = draw(st.sampled_from(["one"] * 30 + ["none", "two", "bad"]))
    if host_shape in ("one", "two"):
        headers.append((b"Host", host))
    if host_shape == "two":
        headers.append((b"host", host))
    if host_shape == "bad":
        headers.append((b"Host", b"exa mple.com"))
        strict.add("host")
    for _ in range(draw(st.integers(0, 3))):
        name = draw(
            st.sampled_from([b"Accept", b"X-Custom", b"user-agent"]) | _TOKEN.map(str.encode)
        )
        value = draw(_VALUE).encode("latin-1")
        hostile = draw(st.sampled_from([None] * 40 + ["ctl", "del", "nul", "vt", "fold"]))
        if hostile == "ctl":
            value += b"\x01x"
            strict.add("ctl")
        elif hostile == "del":
            value += b"\x7fx"
            strict.add("ctl")
        elif hostile == "nul":
            value += b"\x00x"
        elif hostile == "vt":
            value += b"\x0bx"
        elif hostile == "fold":
            value += b"\r\n fold"
            strict.add("fold")
        headers.append((name, value))
    connection = draw(st.sampled_from([None] * 6 + [b"close", b"keep-alive", b"Upgrade"]))
    if connection is not None:
        headers.append((b"Connection", connection))
    upgrade = draw(st.booleans())
    if upgrade:
        headers.append((b"Upgrade", b"websocket"))
    if draw(st.booleans()):
        headers.append((b"Expect", b"100-continue"))

    body = draw(st.binary(max_size=24))
    framing = draw(
        st.sampled_from(
            ["none"] * 8
            + ["length"] * 8
            + ["chunked"] * 8
            + ["cl-te", "cl-zero", "cl-dup", "cl-list", "cl-plus", "te-gzip"]
        )
    )
    length = str(len(body)).encode()
    payload = body
    if framing == "none":
        payload = b""
    elif framing == "length":
        headers.append((b"Content-Length", length))
    elif framing in ("chunked", "cl-te"):
        headers.append((b"Transfer-Encoding", draw(st.sampled_from([b"chunked", b"Chunked"]))))
        payload = draw(_chunk_encoding(body, strict))
        if framing == "cl-te":
            headers.insert(draw(st.integers(0, len(headers))), (b"Content-Length", length))
            strict.add("cl-te")
        elif version == b"1.0":
            strict.add("te-http10")
    elif framing == "cl-zero":
        headers.append((b"Content-Length", b"0" + length))
        strict.add("cl-zero")
    elif framing == "cl-dup":
        headers += [(b"Content-Length", length), (b"Content-Length", length)]
        strict.add("cl-dup")
    elif framing == "cl-list":
        headers.append((b"Content-Length", length + b", " + length))
        strict.add("cl-list")
    elif framing == "cl-plus":
        headers.append((b"Content-Length", b"+" + length))
    else:
        headers.append((b"Transfer-Encoding", b"gzip, chunked"))
        payload = draw(_chunk_encoding(body, strict))
    upgrading = upgrade and connection == b"Upgrade" and version == b"1.1"
    if upgrading and (framing == "chunked" or (framing == "length" and body)):
        strict.add("upgrade-body")

    head = method + b" " + target + b" HTTP/" + version + b"\r\n"
    head += b"".join(n + b": " + v + b"\r\n" for n, v in headers)
    return head + b"\r\n" + payload


@st.composite
def request_streams(draw: st.DrawFn) -> tuple[bytes, frozenset[str]]:
    strict: set[str] = set()
    count = draw(st.integers(1, 3))
    stream = b"".join(draw(_request(strict)) for _ in range(count))
    return stream, frozenset(strict)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(request_streams())
def test_generated_requests_against_h11(case: tuple[bytes, frozenset[str]]):
    """Generated requests obey the differential rule, and the reader is stricter than h11
    exactly when a generator choice known to be stricter was made."""
    stream, strict = case
    outcome, h11_rejects = check_differential(stream)
    if strict:
        assert outcome.rejected, f"expected a rejection for {sorted(strict)}"
    if outcome.rejected and not h11_rejects:
        assert strict, f"reader alone rejects ({outcome.status}) without a known reason"


# -- the reader's own contract ------------------------------------------------------------


def _head_of_size(size: int) -> bytes:
    """A valid GET head of exactly `size` bytes, padded with one field."""
    base = _get(extra=b"X-Pad: \r\n")
    pad = size - len(base)
    assert pad >= 0
    return _get(extra=b"X-Pad: " + b"p" * pad + b"\r\n")


@pytest.mark.parametrize(
    ("limit", "delta", "bytewise", "status"),
    [
        pytest.param(
            limit, delta, bytewise, None if delta <= 0 else 431, id=f"{limit}{delta:+}-{way}"
        )
        for limit, deltas in ((1024, (-100, 0, 1, 100)), (LIMIT, (-100, 100)))
        for delta in deltas
        for bytewise, way in ((False, "whole"), (True, "bytewise"))
    ],
)
def test_head_limit_boundary(limit: int, delta: int, bytewise: bool, status: int | None):
    """A head of max_head_bytes or less passes and one byte more is a 431, fed either way."""
    stream = _head_of_size(limit + delta) + _get(b"/next")
    outcome = run_reader(stream, bytewise, max_head_bytes=limit)
    assert outcome.status == status
    assert len(outcome.ended()) == (0 if status else 2)


def test_trailer_section_is_limited_too():
    """Trailers count against max_head_bytes like a head, so they cannot grow without bound."""
    stream = _chunked(b"1\r\nx\r\n0\r\nX-T: " + b"t" * 2000 + b"\r\n\r\n")
    assert run_reader(stream, bytewise=False, max_head_bytes=1024).status == 431
    assert run_reader(stream, bytewise=False, max_head_bytes=4096).status is None


def test_upgrade_returns_leftover_and_resume_parses_it():
    """feed() stops at the end of an upgrade request with the bytes after it, and resume()
    parses those bytes as HTTP when the instance declined."""
    sink = Recorder()
    reader = RequestReader(sink)
    upgrade = _get(b"/ws", b"Connection: keep-alive, Upgrade\r\nUpgrade: WebSocket\r\n")
    assert reader.feed(upgrade + _get(b"/next")[:10]) == _get(b"/next")[:10]
    assert sink.heads[0].upgrade == b"websocket"
    assert sink.messages[0].ended
    in_message = [reader.in_message]
    with pytest.raises(RuntimeError):
        reader.feed(b"x")
    assert reader.resume() is None
    in_message.append(reader.in_message)
    assert in_message == [False, True]
    assert reader.feed(_get(b"/next")[10:]) is None
    assert [m.target for m in sink.messages if m.ended] == [b"/ws", b"/next"]


def test_upgrade_fed_bytewise_returns_empty_leftover():
    """Fed one byte at a time, the upgrade request's last byte makes feed() return b""."""
    reader = RequestReader(Recorder())
    stream = _get(extra=b"Connection: upgrade\r\nUpgrade: h2c\r\n")
    results = [reader.feed(stream[i : i + 1]) for i in range(len(stream))]
    assert results[-1] == b"" and results[:-1] == [None] * (len(stream) - 1)


def test_resume_reports_a_second_upgrade():
    """If the bytes after a declined upgrade hold another upgrade request, resume() returns
    what follows that one."""
    reader = RequestReader(Recorder())
    upgrade = _get(extra=b"Connection: upgrade\r\nUpgrade: websocket\r\n")
    assert reader.feed(upgrade + upgrade + b"TUNNEL") == upgrade + b"TUNNEL"
    assert reader.resume() == b"TUNNEL"


def test_upgrade_ignored_in_http10():
    """RFC 9110 7.8: an HTTP/1.0 request's Upgrade field is ignored, so it is no upgrade."""
    outcome = run_reader(
        b"GET / HTTP/1.0\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n", False
    )
    assert outcome.heads[0].upgrade is None and not outcome.rejected


def test_in_message_tracks_partial_requests():
    """in_message is true from a request's first byte until its end, and false between."""
    reader = RequestReader(Recorder())
    seen = [reader.in_message]
    for piece in (b"PO", _cl(b"4", b"ab")[2:], b"cd", _chunked(b"2\r\nab\r\n"), b"0\r\n\r\n"):
        reader.feed(piece)
        seen.append(reader.in_message)
    assert seen == [False, True, True, False, True, False]


@pytest.mark.parametrize(
    ("version", "connection", "keep_alive"),
    [
        (b"1.1", b"", True),
        (b"1.1", b"Connection: close\r\n", False),
        (b"1.1", b"Connection: keep-alive, Close\r\n", False),
        (b"1.1", b"Connection: te\r\nConnection: close\r\n", False),
        (b"1.0", b"", False),
        (b"1.0", b"Connection: Keep-Alive\r\n", True),
        (b"1.0", b"Connection: keep-alive, close\r\n", False),
    ],
)
def test_keep_alive_per_version_and_connection(version: bytes, connection: bytes, keep_alive: bool):
    """keep_alive follows RFC 9112 9.3 for the version and every Connection field."""
    outcome = run_reader(_get(extra=connection, version=version), bytewise=False)
    assert outcome.heads[0].keep_alive is keep_alive


def test_head_fields_are_worked_out():
    """host, content_length, chunked, expect_continue and connection_tokens are filled in."""
    stream = (
        b"PUT /x HTTP/1.1\r\nHost: Example.COM:80\r\nExpect: 100-Continue\r\n"
        b"Connection: Keep-Alive, X-Trace\r\nContent-Length: 3\r\n\r\nabc"
        b"POST /y HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    )
    first, second = run_reader(stream, bytewise=False).heads
    assert first.host == b"example.com:80"
    assert (first.content_length, first.chunked, first.expect_continue) == (3, False, True)
    assert first.connection_tokens == (b"keep-alive", b"x-trace")
    assert first.headers[0] == (b"host", b"Example.COM:80")
    assert (second.content_length, second.chunked, second.upgrade) == (None, True, None)


def test_absolute_form_supplies_host_for_http10():
    """An HTTP/1.0 absolute-form request without Host takes its host from the target."""
    outcome = run_reader(b"GET http://Example.com/ HTTP/1.0\r\n\r\n", bytewise=False)
    assert outcome.heads[0].host == b"example.com"


def test_reader_stays_failed():
    """After a RequestError every later feed raises the same error."""
    reader = RequestReader(Recorder())
    with pytest.raises(RequestError) as first:
        reader.feed(b"GET / HTTP/1.1\r\n\r\n")
    with pytest.raises(RequestError) as again:
        reader.feed(_get())
    assert again.value is first.value and first.value.status == 400


@pytest.mark.parametrize(
    ("stream", "status", "reason"),
    [
        pytest.param(
            b"GET / HTTP/2.0\r\nHost: a\r\nX: a\nb\r\n\r\n", 400, "bare LF line ending", id="lf-505"
        ),
        pytest.param(
            b"CONNECT a:1 HTTP/1.1\r\nX: a\rb\r\n\r\n", 400, "bare CR in head", id="cr-501"
        ),
        pytest.param(
            _get(extra=b"Host: b\r\nX: a\rb\r\n"), 400, "bare CR in head", id="cr-2-hosts"
        ),
    ],
)
@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
def test_line_end_verdict_comes_first(stream: bytes, status: int, reason: str, bytewise: bool):
    """A bare CR or LF in a head is the error reported, whatever else is wrong, fed either way."""
    reader = RequestReader(Recorder())
    with pytest.raises(RequestError) as caught:
        for piece in _pieces(stream, bytewise):
            reader.feed(piece)
    assert (caught.value.status, caught.value.reason) == (status, reason)


@pytest.mark.parametrize(
    ("value", "length"),
    [
        pytest.param(b"0", 0, id="zero"),
        pytest.param(b"10", 10, id="ten"),
        pytest.param(b"00", None, id="double-zero"),
        pytest.param(b"010", None, id="leading-zero"),
        pytest.param(b"\xb2", None, id="latin1-superscript-two"),
        pytest.param(b"1\xb9", None, id="latin1-superscript-one"),
        pytest.param(b"+1", None, id="plus"),
        pytest.param(b"1_0", None, id="underscore"),
    ],
)
def test_content_length_is_plain_ascii_digits(value: bytes, length: int | None):
    """Content-Length takes 1*DIGIT in ASCII without a leading zero, and nothing else."""
    outcome = run_reader(_cl(value, b"x" * (length or 0)), bytewise=False)
    if length is None:
        assert outcome.status == 400
    else:
        assert outcome.heads[0].content_length == length


@pytest.mark.parametrize(
    ("connection", "tokens"),
    [
        pytest.param(b"Connection: Keep-Alive\r\n", (b"keep-alive",), id="one"),
        pytest.param(b"Connection: \r\n", (), id="empty"),
        pytest.param(b"Connection: close\r\nConnection: X-A\r\n", (b"close", b"x-a"), id="two"),
        pytest.param(b"Connection: ,a ,, B\r\n", (b"a", b"b"), id="list"),
    ],
)
def test_connection_tokens(connection: bytes, tokens: tuple[bytes, ...]):
    """connection_tokens lists the lowercased non-empty members of every Connection field."""
    assert run_reader(_get(extra=connection), bytewise=False).heads[0].connection_tokens == tokens
