"""Sans-IO reader of HTTP/1.1 responses from instances: bytes in, sink callbacks out.

Each response is only read after :meth:`ResponseReader.start` says a request was sent, so
any byte that arrives otherwise is an error: the connection is out of step and must not be
reused. Anything malformed or ambiguous raises :class:`ResponseError`; the proxy answers 502
instead of forwarding it. The head is parsed by llhttp (httptools, strict defaults) plus:

- status line ``HTTP/1.0|1.1 SP 3DIGIT [SP reason]``, status 100-599, reason without CTLs;
- framing as for requests (see :mod:`ingress.h1.request`): one Content-Length of plain
  digits, Transfer-Encoding exactly ``chunked`` and never with Content-Length or in HTTP/1.0;
- a 1xx or 204 may not carry Transfer-Encoding or a non-zero Content-Length (RFC 9110 8.6,
  RFC 9112 6.1): a server that sends them may well send a body too.

Framing follows RFC 9112 6.3: no body for HEAD, 1xx, 204 and 304 (whatever the fields say);
else chunked, else Content-Length, else until the instance closes. llhttp cannot be told a
response answers HEAD, so it only ever sees one head, and a fresh parser per head.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Literal, Protocol

import httptools

from ingress.h1._common import (
    ChunkedDecoder,
    FieldCollector,
    HeadBuffer,
    Violation,
    check_line_ends,
    comma_tokens,
    parse_length,
)

__all__ = ["BodyKind", "ResponseError", "ResponseHead", "ResponseReader", "ResponseSink"]

# The same 64 KiB as for request heads (see ingress.h1.request.DEFAULT_MAX_HEAD_BYTES).
DEFAULT_MAX_HEAD_BYTES = 65536

BodyKind = Literal["none", "length", "chunked", "close"]

_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([1-5][0-9][0-9])(?: ([\t\x20-\x7e\x80-\xff]*))?")
_OK_LINE = b"HTTP/1.1 200 OK\r\n"
_FRAMING = frozenset((b"content-length", b"transfer-encoding", b"connection"))


class ResponseError(Exception):
    """A response that must not be forwarded (502), nor its connection reused."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(slots=True)
class ResponseHead:
    """A response head as received, with its framing worked out."""

    status: int
    reason: bytes
    http_minor: int
    headers: list[tuple[bytes, bytes]]  # lowercased names, stripped values, in order
    content_length: int | None  # as the field says, even where there is no body
    chunked: bool  # Transfer-Encoding: chunked was sent, even where there is no body
    keep_alive: bool  # the upstream connection may carry another request afterwards
    connection_tokens: tuple[bytes, ...]
    body: BodyKind  # how the body is framed: "none", "length", "chunked" or "close" (EOF)


class ResponseSink(Protocol):
    """What the reader calls, synchronously from feed() and feed_eof()."""

    def on_response_head(self, head: ResponseHead) -> None: ...

    def on_response_body(self, data: bytes) -> None: ...

    def on_response_end(self) -> None: ...


class _State(enum.Enum):
    IDLE = "idle"  # no response expected
    HEAD = "head"  # a request was sent: waiting for (the rest of) a head
    LENGTH = "length"
    CHUNKED = "chunked"
    CLOSE = "close"  # body runs until EOF
    SWITCHED = "switched"  # after 101: the connection is a tunnel now
    CLOSED = "closed"  # EOF seen
    FAILED = "failed"


# The states as module globals for the hot paths: in Python 3.11 every `_State.X` goes
# through the enum metaclass's __getattr__ hook, about ten times slower than a global.
_IDLE = _State.IDLE
_HEAD = _State.HEAD
_LENGTH = _State.LENGTH
_CHUNKED = _State.CHUNKED
_CLOSE = _State.CLOSE
_SWITCHED = _State.SWITCHED
_CLOSED = _State.CLOSED
_FAILED = _State.FAILED


class ResponseReader:
    """Reads the responses of one upstream connection, one start() at a time.

    States: IDLE -start-> HEAD -> (LENGTH | CHUNKED | CLOSE ->) IDLE once the final response
    ends; a 1xx other than 101 goes back to HEAD; 101 -> SWITCHED; EOF -> CLOSED; any error
    -> FAILED.
    """

    __slots__ = (
        "_chunks",
        "_ended",
        "_error",
        "_fields",
        "_head",
        "_head_request",
        "_interim",
        "_max_head_bytes",
        "_remaining",
        "_sink",
        "_state",
    )

    def __init__(self, sink: ResponseSink, *, max_head_bytes: int = DEFAULT_MAX_HEAD_BYTES) -> None:
        if max_head_bytes < 64:
            raise ValueError("max_head_bytes must be at least 64")
        self._sink = sink
        self._max_head_bytes = max_head_bytes
        self._state = _IDLE
        self._head = HeadBuffer(max_head_bytes)
        self._fields = FieldCollector(_FRAMING)
        self._head_request = False
        self._interim = False  # a 1xx of the current response was read
        self._remaining = 0
        self._chunks: ChunkedDecoder | None = None
        self._error: ResponseError | None = None
        self._ended = False  # the final response ended during the current feed()

    def start(self, *, head_request: bool) -> None:
        """A request was sent: expect its response (with no body if `head_request`)."""
        if self._state is not _IDLE:
            raise RuntimeError(f"start() while {self._state.value}")
        self._state = _HEAD
        self._head_request = head_request
        self._interim = False

    def feed(self, data: bytes) -> bytes | None:
        """Parse `data`, calling the sink; after a 101, return the bytes that followed it.

        Raises ResponseError on anything malformed or ambiguous, and on any byte that is not
        part of an expected response; the reader then stays failed.
        """
        state = self._state
        if state is _SWITCHED or state is _CLOSED:
            raise RuntimeError(f"feed() while {state.value}")
        if self._error is not None:
            raise self._error
        try:
            return self._parse(data)
        except Violation as exc:
            raise self._fail(exc) from None

    def feed_eof(self) -> None:
        """The instance closed: end a close-delimited body; raise if a response was cut short.

        Expecting a response of which no byte arrived is not an error here: the caller knows
        it sent a request and decides about retrying. After a failure, a 101 or an earlier
        EOF this does nothing.
        """
        state = self._state
        if state is _FAILED or state is _SWITCHED or state is _CLOSED:
            return
        self._state = _CLOSED
        if state is _CLOSE:
            self._sink.on_response_end()
        elif state is _LENGTH or state is _CHUNKED:
            raise self._fail(Violation(502, "response body cut short"))
        elif state is _HEAD and (len(self._head) or self._interim):
            raise self._fail(Violation(502, "response head cut short"))

    def _fail(self, exc: Violation) -> ResponseError:
        self._state = _FAILED
        self._error = ResponseError(exc.reason)
        return self._error

    def _parse(self, data: bytes) -> bytes | None:
        self._ended = False
        pos = 0
        n = len(data)
        sink = self._sink
        while pos < n:
            if self._ended:
                # Bytes after the final response, in the same read: they were sent before the
                # next request could be, whatever the sink did from on_response_end().
                raise Violation(502, "data when no response was expected")
            state = self._state
            if state is _HEAD:
                if data[pos] != 0x48 and not len(self._head):  # "H"
                    raise Violation(502, "invalid status line")
                found = self._head.push(data, pos, defer_check=True)
                if found is None:
                    return None
                head, pos = found
                try:
                    upgrade = self._start(head)
                except Violation:
                    check_line_ends(head)  # deferred by push(): this verdict comes first
                    raise
                if upgrade:
                    return data[pos:]
            elif state is _LENGTH:
                take = min(self._remaining, n - pos)
                sink.on_response_body(data if take == n else data[pos : pos + take])
                pos += take
                self._remaining -= take
                if not self._remaining:
                    self._end()
            elif state is _CHUNKED:
                assert self._chunks is not None
                pos = self._chunks.feed(data, pos)
                if self._chunks.done:
                    self._chunks = None
                    self._end()
            elif state is _CLOSE:
                sink.on_response_body(data if pos == 0 else data[pos:])
                return None
            else:
                raise Violation(502, "data when no response was expected")
        return None

    def _end(self) -> None:
        self._state = _IDLE
        self._ended = True
        self._sink.on_response_end()

    def _start(self, raw: bytes) -> bool:
        """Parse one complete head, call the sink; True after a 101."""
        head = _parse_head(raw, self._head_request, self._fields)
        sink = self._sink
        status = head.status
        if status < 200 and status != 101:
            self._interim = True
            sink.on_response_head(head)
            return False
        if status == 101:
            self._state = _SWITCHED
            sink.on_response_head(head)
            sink.on_response_end()
            return True
        body = head.body
        if body == "chunked":
            self._state = _CHUNKED
            self._chunks = ChunkedDecoder(sink.on_response_body, self._max_head_bytes)
        elif body == "close":
            self._state = _CLOSE
        elif body == "length" and head.content_length:
            self._state = _LENGTH
            self._remaining = head.content_length
        else:
            sink.on_response_head(head)
            self._end()
            return False
        sink.on_response_head(head)
        return False


def _parse_head(raw: bytes, head_request: bool, collector: FieldCollector) -> ResponseHead:
    if raw.startswith(_OK_LINE):  # by far the most common status line; _STATUS_LINE matches it
        minor, status, reason = 1, 200, b"OK"
    else:
        match = _STATUS_LINE.fullmatch(raw[: raw.find(b"\r\n")])
        if match is None:
            raise Violation(502, "invalid status line")
        minor = 1 if match[1] == b"1" else 0
        status = int(match[2])
        reason = match[3] or b""

    collector.reset()
    try:
        httptools.HttpResponseParser(collector).feed_data(raw)
    except httptools.HttpParserUpgrade:
        pass  # a 101 with Upgrade fields: llhttp stops after the head
    except httptools.HttpParserError as exc:
        # llhttp pauses after every 101 head; with no Upgrade field that surfaces as an error.
        if status != 101 or not collector.complete:
            raise Violation(502, f"malformed response head: {exc}") from None
    if not collector.complete:
        raise Violation(502, "malformed response head")

    special = collector.special

    content_length = None
    lengths = special.get(b"content-length")
    if lengths is not None:
        content_length = parse_length(lengths, 502)
    codings = special.get(b"transfer-encoding")
    chunked = codings is not None
    if codings is not None:
        if lengths is not None:
            raise Violation(502, "both Content-Length and Transfer-Encoding")
        if minor == 0:
            raise Violation(502, "Transfer-Encoding in an HTTP/1.0 response")
        if len(codings) != 1 or codings[0].lower() != b"chunked":
            raise Violation(502, "Transfer-Encoding other than chunked")
    if (status < 200 or status == 204) and (chunked or content_length):
        raise Violation(502, f"{status} response with body framing")

    body: BodyKind
    if status < 200 or status == 204 or status == 304 or head_request:
        body = "none"
    elif chunked:
        body = "chunked"
    elif content_length is not None:
        body = "length"
    else:
        body = "close"
    connection = special.get(b"connection")
    tokens = () if connection is None else comma_tokens(connection)
    keep_alive = (
        body != "close"
        and status != 101
        and b"close" not in tokens
        and (minor == 1 or b"keep-alive" in tokens)
    )
    # Positional: this runs for every response, and keyword passing costs measurably more.
    return ResponseHead(
        status, reason, minor, collector.fields, content_length, chunked, keep_alive, tokens, body
    )
