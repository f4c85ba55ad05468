"""Sans-IO reader of HTTP/1.1 requests from clients: bytes in, sink callbacks out.

The head is parsed by llhttp (httptools) with its strict defaults; this module adds what a
reverse proxy must refuse and llhttp lets through, so that every request it passes on has one
reading only. Anything malformed or ambiguous raises :class:`RequestError`; the proxy answers
its status and closes. The rules, beyond llhttp's:

- request line: ``METHOD SP target SP HTTP/1.0|1.1`` with single spaces and a target of
  visible ASCII only; other versions get 505, HTTP/0.9 gets 400; methods llhttp does not know
  get 501 (RFC 9110 9.1), as does CONNECT (RFC 9110 9.3.6: we are no forward proxy);
- no empty line before a request (RFC 9112 2.2 allows servers to skip one; h11 refuses it and
  llhttp skips it silently, which would hide bytes between two requests);
- bare LF line endings are refused (RFC 9112 2.2 allows accepting them; llhttp refuses
  them, h11 accepts them), as is a bare CR, as soon as it arrives;
- ``*`` only with OPTIONS (RFC 9112 3.2.4); an absolute-form target must carry the same
  authority as Host and no userinfo (RFC 9112 3.2.2, RFC 9110 4.2.4), so the instance and we
  cannot route the request differently;
- HTTP/1.1 needs exactly one Host, any version at most one, with a valid non-empty value
  (RFC 9112 3.2);
- framing (RFC 9112 6): Content-Length is one field of plain digits (see
  :func:`~ingress.h1._common.parse_length`); Transfer-Encoding is one field whose only coding
  is ``chunked`` (case-insensitive): a list not ending in chunked is 400 (RFC 9112 6.3), one
  ending in chunked after other codings is 501 (RFC 9112 6.1); Transfer-Encoding with
  Content-Length, or in an HTTP/1.0 request, is 400 (RFC 9112 6.1, 6.3);
- an upgrade request may not carry a body: llhttp would hand the body to the tunnel while h11
  and the instance read it as the body;
- after a request whose `keep_alive` is false, any further byte is refused (RFC 9112 9.6:
  the server must not process further requests).

Chunked bodies are decoded here (:class:`~ingress.h1._common.ChunkedDecoder`): well-formed
chunk extensions are accepted and ignored, trailers are checked and dropped.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Protocol

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

__all__ = ["RequestError", "RequestHead", "RequestReader", "RequestSink"]

# Bytes of request line and fields, up to and including the blank line: 64 KiB, what AWS's
# Application Load Balancer allows (its quotas page: "whole request header: 64K"). For
# comparison: h11 allows 16 KiB of incomplete event, nginx 4 x 8 KiB buffers, Go 1 MiB.
DEFAULT_MAX_HEAD_BYTES = 65536

_REQUEST_LINE = re.compile(rb"([A-Z][A-Z-]*) ([\x21-\x7e]+) HTTP/1\.([01])")
_ANY_VERSION = re.compile(rb"[A-Z][A-Z-]* [\x21-\x7e]+ HTTP/[0-9]\.[0-9]")
# RFC 9110 7.2: Host = uri-host [":" port], a reg-name or an IP literal.
_HOST = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]+)(?::[0-9]*)?")
_ABSOLUTE = re.compile(rb"[A-Za-z][A-Za-z0-9+.-]*://([^/?#]*)")
_METHOD_START = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ")
_FRAMING = frozenset(
    (b"host", b"content-length", b"transfer-encoding", b"connection", b"upgrade", b"expect")
)


class RequestError(Exception):
    """A request the proxy must refuse: answer `status`, then close the connection.

    `status` is 400 (malformed or ambiguous), 431 (head or trailers over the limit),
    501 (CONNECT, a method llhttp does not know, a transfer coding other than chunked) or
    505 (an HTTP version other than 1.0 and 1.1). `reason` never echoes client bytes.
    """

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(status, reason)
        self.status = status
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.status} {self.reason}"


@dataclass(slots=True)
class RequestHead:
    """A request head as received, with the facts the proxy needs already worked out."""

    method: bytes
    target: bytes
    http_minor: int
    # (lowercased name, value without surrounding OWS), in order, duplicates kept
    headers: list[tuple[bytes, bytes]]
    # Host lowercased (or the absolute-form authority); b"" only for HTTP/1.0 without either
    host: bytes
    content_length: int | None
    chunked: bool
    keep_alive: bool  # RFC 9112 9.3
    expect_continue: bool
    upgrade: bytes | None  # lowercased Upgrade value when Connection lists "upgrade"
    connection_tokens: tuple[bytes, ...]


class RequestSink(Protocol):
    """What the reader calls, synchronously from feed() or resume()."""

    def on_request_head(self, head: RequestHead) -> None: ...

    def on_request_body(self, data: bytes) -> None: ...

    def on_request_end(self) -> None: ...


class _State(enum.Enum):
    HEAD = "head"  # waiting for (the rest of) a head
    LENGTH = "length"  # Content-Length body
    CHUNKED = "chunked"
    UPGRADED = "upgraded"  # an upgrade request ended; feed() waits for resume()
    CLOSING = "closing"  # a request without keep-alive ended; nothing more may come
    FAILED = "failed"


# The states as module globals for the hot paths: in Python 3.11 every `_State.X` goes
# through the enum metaclass's __getattr__ hook, about ten times slower than a global.
_HEAD = _State.HEAD
_LENGTH = _State.LENGTH
_CHUNKED = _State.CHUNKED
_UPGRADED = _State.UPGRADED
_CLOSING = _State.CLOSING
_FAILED = _State.FAILED


class RequestReader:
    """Reads requests from one client connection; see the module docstring for the rules.

    States: HEAD -> (LENGTH | CHUNKED ->) HEAD after each request, CLOSING after one without
    keep-alive, UPGRADED after an upgrade request (back to HEAD or CLOSING on resume()), and
    FAILED after any error.
    """

    __slots__ = (
        "_chunks",
        "_error",
        "_fields",
        "_head",
        "_keep_alive",
        "_leftover",
        "_max_head_bytes",
        "_remaining",
        "_sink",
        "_state",
    )

    def __init__(self, sink: RequestSink, *, max_head_bytes: int = DEFAULT_MAX_HEAD_BYTES) -> None:
        if max_head_bytes < 64:
            raise ValueError("max_head_bytes must be at least 64")
        self._sink = sink
        self._max_head_bytes = max_head_bytes
        self._state = _HEAD
        self._head = HeadBuffer(max_head_bytes)
        self._fields = FieldCollector(_FRAMING)
        self._remaining = 0
        self._chunks: ChunkedDecoder | None = None
        self._keep_alive = True
        self._leftover = b""
        self._error: RequestError | None = None

    @property
    def in_message(self) -> bool:
        """Whether some bytes of a request arrived but not its end (what EOF would cut)."""
        state = self._state
        return state is _LENGTH or state is _CHUNKED or (state is _HEAD and len(self._head) > 0)

    def feed(self, data: bytes) -> bytes | None:
        """Parse `data`, calling the sink; return the tunnel bytes once an upgrade request ends.

        Raises RequestError on malformed input, after which the reader stays failed. After a
        non-None return, call resume() (upgrade declined) before feeding again.
        """
        if self._state is _UPGRADED:
            raise RuntimeError("feed() after an upgrade request: call resume() first")
        if self._error is not None:
            raise self._error
        try:  # _run() inlined: feed() is called for every read
            return self._parse(data)
        except Violation as exc:
            raise self._fail(exc) from None

    def resume(self) -> bytes | None:
        """Go on with HTTP after a declined upgrade, parsing the bytes that followed it.

        Returns like feed(): not None if those bytes hold another complete upgrade request.
        """
        if self._state is not _UPGRADED:
            raise RuntimeError("resume() without a pending upgrade")
        self._state = _HEAD if self._keep_alive else _CLOSING
        data, self._leftover = self._leftover, b""
        return self._run(data)

    def _run(self, data: bytes) -> bytes | None:
        if self._error is not None:
            raise self._error
        try:
            return self._parse(data)
        except Violation as exc:
            raise self._fail(exc) from None

    def _fail(self, exc: Violation) -> RequestError:
        self._state = _FAILED
        self._error = RequestError(exc.status, exc.reason)
        return self._error

    def _parse(self, data: bytes) -> bytes | None:
        pos = 0
        n = len(data)
        sink = self._sink
        while pos < n:
            state = self._state
            if state is _HEAD:
                if data[pos] not in _METHOD_START and not len(self._head):
                    raise Violation(400, "invalid request line")
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
                    self._leftover = data[pos:]
                    return self._leftover
            elif state is _LENGTH:
                take = min(self._remaining, n - pos)
                sink.on_request_body(data if take == n else data[pos : pos + take])
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
            else:
                raise Violation(400, "data after a request that closes the connection")
        return None

    def _end(self) -> None:
        self._state = _HEAD if self._keep_alive else _CLOSING
        self._sink.on_request_end()

    def _start(self, raw: bytes) -> bool:
        """Parse one complete head, call the sink; True if it was an upgrade request."""
        head = _parse_head(raw, self._fields)
        sink = self._sink
        self._keep_alive = head.keep_alive
        if head.upgrade is not None:
            self._state = _UPGRADED
            sink.on_request_head(head)
            sink.on_request_end()
            return True
        if head.chunked:
            self._state = _CHUNKED
            self._chunks = ChunkedDecoder(sink.on_request_body, self._max_head_bytes)
            sink.on_request_head(head)
        elif head.content_length:
            self._state = _LENGTH
            self._remaining = head.content_length
            sink.on_request_head(head)
        else:
            sink.on_request_head(head)
            self._end()
        return False


def _parse_head(raw: bytes, collector: FieldCollector) -> RequestHead:
    line = raw[: raw.find(b"\r\n")]
    match = _REQUEST_LINE.fullmatch(line)
    if match is None:
        if _ANY_VERSION.fullmatch(line) is not None:
            raise Violation(505, "HTTP version not supported")
        raise Violation(400, "invalid request line")
    method, target, minor = match[1], match[2], 1 if match[3] == b"1" else 0
    if method == b"CONNECT":
        raise Violation(501, "CONNECT not supported")

    collector.reset()
    try:
        httptools.HttpRequestParser(collector).feed_data(raw)
    except httptools.HttpParserUpgrade:
        pass  # llhttp stops after the head of an upgrade request: exactly what was fed
    except httptools.HttpParserInvalidMethodError:
        raise Violation(501, "method not implemented") from None
    except httptools.HttpParserError as exc:
        raise Violation(400, f"malformed request head: {exc}") from None
    if not collector.complete:
        raise Violation(400, "malformed request head")

    special = collector.special

    host = _host(special.get(b"host"), minor)
    if target == b"*":
        if method != b"OPTIONS":
            raise Violation(400, "asterisk-form target needs OPTIONS")
    elif target[0] != 0x2F:  # not origin-form: absolute-form (llhttp refused the rest)
        absolute = _ABSOLUTE.match(target)
        authority = absolute[1].lower() if absolute is not None else b""
        if not authority or b"@" in authority or _HOST.fullmatch(authority) is None:
            raise Violation(400, "invalid absolute-form target")
        if b"host" not in special:
            host = authority
        elif authority != host:
            raise Violation(400, "absolute-form target does not match Host")

    content_length = None
    lengths = special.get(b"content-length")
    if lengths is not None:
        content_length = parse_length(lengths, 400)
    chunked = False
    codings = special.get(b"transfer-encoding")
    if codings is not None:
        if lengths is not None:
            raise Violation(400, "both Content-Length and Transfer-Encoding")
        if minor == 0:
            raise Violation(400, "Transfer-Encoding in an HTTP/1.0 request")
        if len(codings) != 1:
            raise Violation(400, "several Transfer-Encoding fields")
        chain = [c.strip(b" \t").lower() for c in codings[0].split(b",")]
        if chain[-1] != b"chunked" or chain.count(b"chunked") != 1 or not all(chain):
            raise Violation(400, "invalid Transfer-Encoding")
        if len(chain) != 1:
            raise Violation(501, "unsupported transfer coding")
        chunked = True

    connection = special.get(b"connection")
    tokens = () if connection is None else comma_tokens(connection)
    # RFC 9112 9.3: persistent unless "close"; HTTP/1.0 only with "keep-alive".
    keep_alive = b"close" not in tokens and (minor == 1 or b"keep-alive" in tokens)
    upgrade = None
    upgrades = special.get(b"upgrade")
    # RFC 9110 7.8: an Upgrade field in an HTTP/1.0 request is ignored.
    if upgrades is not None and minor == 1 and b"upgrade" in tokens:
        if chunked or content_length:
            raise Violation(400, "upgrade request with a body")
        upgrade = b", ".join(upgrades).lower()
    expect = special.get(b"expect")
    expect_continue = expect is not None and minor == 1 and b"100-continue" in comma_tokens(expect)

    # Positional: this runs for every request, and keyword passing costs measurably more.
    return RequestHead(
        method,
        target,
        minor,
        collector.fields,
        host,
        content_length,
        chunked,
        keep_alive,
        expect_continue,
        upgrade,
        tokens,
    )


def _host(values: list[bytes] | None, minor: int) -> bytes:
    if values is None:
        if minor == 1:
            raise Violation(400, "missing Host")
        return b""
    if len(values) != 1:
        raise Violation(400, "several Host fields")
    # Empty is valid only for a URI without authority (RFC 9112 3.2), never for http(s).
    if not values[0] or _HOST.fullmatch(values[0]) is None:
        raise Violation(400, "invalid Host")
    return values[0].lower()
