"""The bytes the reverse proxy writes: request heads upstream, response heads and errors downstream.

Pure functions, no I/O: the proxy hands in a parsed head and gets back the exact bytes to send
plus the decisions it must act on (the request id and trace id to log, how to frame the body).

Rules, for every request:

- Each head is built as a list of byte strings and joined once; no regex runs over a whole head
  (only over single short values) and nothing here makes a syscall.
- Hop-by-hop fields never cross the proxy (RFC 9110 §7.6.1); framing is always re-derived from the
  parsed head, never copied from the received fields (RFC 9112 §6 and §7), so the two sides of the
  proxy cannot disagree about where a message ends.
- Ids come from one pseudo-random generator seeded from the OS once at import: request and trace
  ids must be unique, not secret, and ``os.urandom`` per request is a syscall.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from http import HTTPStatus
from typing import Final, Protocol

__all__ = [
    "BODY_CHUNKED",
    "BODY_CLOSE",
    "BODY_LENGTH",
    "BODY_NONE",
    "LAST_CHUNK",
    "chunk",
    "client_response",
    "error_response",
    "new_request_id",
    "upstream_request",
]


class _RequestHeadLike(Protocol):
    """What this module reads from a parsed request head (see ``ingress.h1.request``)."""

    @property
    def method(self) -> bytes: ...
    @property
    def target(self) -> bytes: ...
    @property
    def http_minor(self) -> int: ...
    @property
    def headers(self) -> Sequence[tuple[bytes, bytes]]: ...
    @property
    def host(self) -> bytes: ...
    @property
    def content_length(self) -> int | None: ...
    @property
    def chunked(self) -> bool: ...
    @property
    def upgrade(self) -> bytes | None: ...
    @property
    def connection_tokens(self) -> tuple[bytes, ...]: ...


class _ResponseHeadLike(Protocol):
    """What this module reads from a parsed response head (see ``ingress.h1.response``)."""

    @property
    def status(self) -> int: ...
    @property
    def reason(self) -> bytes: ...
    @property
    def headers(self) -> Sequence[tuple[bytes, bytes]]: ...
    @property
    def content_length(self) -> int | None: ...
    @property
    def connection_tokens(self) -> tuple[bytes, ...]: ...
    @property
    def body(self) -> str: ...


# How the body that follows a client response head is framed; the proxy writes it accordingly.
BODY_NONE: Final = 0  # nothing follows (HEAD, 1xx, 204, 304): RFC 9112 §6.3 rule 1
BODY_LENGTH: Final = 1  # exactly content-length bytes follow, written as received
BODY_CHUNKED: Final = 2  # chunk() for each piece, then LAST_CHUNK
BODY_CLOSE: Final = 3  # raw bytes, then the proxy closes the client connection (§6.3 rule 8)

# RFC 9112 §7.1: last-chunk with no trailer section.
LAST_CHUNK: Final = b"0\r\n\r\n"

_rng = random.Random()  # seeded once from the OS; see the module docstring
_getrandbits = _rng.getrandbits

# RFC 9110 §7.6.1: Connection, the fields it names, and these are hop-by-hop; a proxy removes them.
# keep-alive is RFC 2068 §19.7.1's; proxy-connection is a pre-standard alias clients still send.
# Any proxy-* field (Proxy-Authorization, Proxy-Authenticate, ...) is for this hop too.
_HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

# Request fields upstream_request drops as received and writes itself, merged or replaced.
# content-length and host are re-derived from the parsed head (RFC 9112 §6.2, §3.2);
# x-forwarded-proto/host are replaced so a client cannot spoof them.
_UPSTREAM_HANDLED: Final = _HOP_BY_HOP | {
    b"content-length",
    b"host",
    b"x-forwarded-for",
    b"x-forwarded-proto",
    b"x-forwarded-host",
    b"via",
    b"x-request-id",
    b"traceparent",
    b"tracestate",
}

# Response fields client_response drops as received: framing is re-derived (RFC 9112 §6).
_RESPONSE_HANDLED: Final = _HOP_BY_HOP | {b"content-length"}

# RFC 9110 §7.6.3: received-protocol is the version of the message this proxy received.
_VIA_11: Final = b"1.1 tidegate"
_VIA_10: Final = b"1.0 tidegate"

# RFC 9110 §5.6.2 VCHAR: the bytes a client-supplied request id may use.
_VCHAR: Final = bytes(range(0x21, 0x7F))
_REQUEST_ID_MAX: Final = 200

# W3C Trace Context §3.2.2: version "-" trace-id "-" parent-id "-" trace-flags, lowercase hex.
# Matched on the one traceparent value only. A later version may append "-" fields after these.
_TRACEPARENT: Final = re.compile(rb"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_TRACEPARENT_V00_LEN: Final = 55
_ZERO_TRACE_ID: Final = b"0" * 32
_ZERO_PARENT_ID: Final = b"0" * 16

# RFC 9112 §3.2.2: in absolute-form the authority ends at the first "/" or "?".
_PATH_START: Final = re.compile(rb"[/?]")

# Status-line prefixes for every 3-digit code, so a response head needs no formatting for it.
_STATUS_PREFIX: Final = {code: b"HTTP/1.1 %d " % code for code in range(100, 600)}


def _error_lines(status: int) -> tuple[bytes, bytes]:
    phrase = _REASONS.get(status, b"Error")
    return b"HTTP/1.1 %d %s\r\n" % (status, phrase), b"%d %s: " % (status, phrase)


_REASONS: Final = {s.value: s.phrase.encode("ascii") for s in HTTPStatus}
# status -> (status line, body prefix) for the responses the ingress makes itself.
_ERROR_LINES: Final = {code: _error_lines(code) for code in _REASONS}


def new_request_id() -> bytes:
    """A fresh request id: 32 lowercase hex characters (128 random bits)."""
    return b"%032x" % _getrandbits(128)


def _valid_request_id(value: bytes) -> bool:
    # Visible ASCII only, so it is safe to echo into logs and error bodies; bounded length.
    return 0 < len(value) <= _REQUEST_ID_MAX and not value.translate(None, _VCHAR)


def _parse_traceparent(value: bytes) -> tuple[bytes, bytes] | None:
    """(trace id, flags) of a valid traceparent value, or None to start a new trace."""
    match = _TRACEPARENT.match(value)
    if match is None:
        return None
    version, trace_id, parent_id, flags = match.groups()
    # W3C Trace Context §3.2.2: version ff and all-zero ids are invalid. Version 00 is exactly
    # 55 bytes; a later version is read as 00 when its extra fields follow a "-" ("Versioning
    # of traceparent"), and is forwarded as 00, the only version this proxy writes.
    if version == b"ff" or trace_id == _ZERO_TRACE_ID or parent_id == _ZERO_PARENT_ID:
        return None
    if len(value) != _TRACEPARENT_V00_LEN and (
        version == b"00" or value[_TRACEPARENT_V00_LEN : _TRACEPARENT_V00_LEN + 1] != b"-"
    ):
        return None
    return trace_id, flags


def _origin_form(method: bytes, target: bytes) -> bytes:
    """The request-target to send an origin server (RFC 9112 §3.2.1), from any form received."""
    if target[:1] == b"/" or target == b"*":
        return target  # origin-form or asterisk-form: the usual case
    scheme_end = target.find(b"://")
    if scheme_end < 0 or target[:scheme_end].lower() not in (b"http", b"https"):
        return target  # authority-form (CONNECT) or junk: the parser's to reject, not ours
    match = _PATH_START.search(target, scheme_end + 3)
    if match is None:
        # RFC 9112 §3.2.4: an absolute-form OPTIONS with an empty path goes to the origin as "*".
        return b"*" if method == b"OPTIONS" else b"/"
    rest = target[match.start() :]
    return b"/" + rest if rest[:1] == b"?" else rest


def upstream_request(
    head: _RequestHeadLike, *, client_ip: bytes, scheme: bytes, tunnel: bool
) -> tuple[bytes, bytes, bytes]:
    """Build the request head to send to an instance.

    Returns ``(head bytes, request id, trace id)``. The request line is always HTTP/1.1 with an
    origin-form target; ``host`` comes first, from ``head.host`` (host names are case-insensitive,
    RFC 3986 §3.2.2, so the lowercased value is the same host). HTTP/1.1 requires a Host field
    even when the client, on HTTP/1.0, sent none: then ``host`` is empty (RFC 9112 §3.2) and
    X-Forwarded-Host is omitted. ``tunnel`` forwards the client's Upgrade (a WebSocket handshake)
    and needs ``head.upgrade``; a ValueError otherwise, as that is the caller's mistake.
    """
    tokens = head.connection_tokens
    host = head.host
    xff: bytes | None = None
    via: bytes | None = None
    request_id: bytes | None = None
    traceparent: bytes | None = None
    tracestate: list[bytes] | None = None

    parts = [
        head.method,
        b" ",
        _origin_form(head.method, head.target),
        b" HTTP/1.1\r\nhost: ",
        host,
        b"\r\n",
    ]
    for name, value in head.headers:
        if tokens and name in tokens:
            continue  # RFC 9110 §7.6.1: named in Connection, so meant for this hop only
        if name in _UPSTREAM_HANDLED:
            if name == b"x-forwarded-for":
                if value:
                    xff = value if xff is None else b"%s, %s" % (xff, value)
            elif name == b"via":
                if value:
                    via = value if via is None else b"%s, %s" % (via, value)
            elif name == b"x-request-id":
                if request_id is None and _valid_request_id(value):
                    request_id = value
            elif name == b"traceparent":
                # A second traceparent makes the field a list, which no version allows: the
                # empty value marks it invalid so a new trace starts.
                traceparent = value if traceparent is None else b""
            elif name == b"tracestate":
                if tracestate is None:
                    tracestate = [value]
                else:
                    tracestate.append(value)
            continue
        if name.startswith(b"proxy-"):
            continue
        parts += (name, b": ", value, b"\r\n")

    # RFC 9112 §6.1: with both, Transfer-Encoding wins (and the parser should have refused it).
    if head.chunked:
        parts.append(b"transfer-encoding: chunked\r\n")
    elif head.content_length is not None:
        parts.append(b"content-length: %d\r\n" % head.content_length)

    if tunnel:
        if head.upgrade is None:
            raise ValueError("tunnel=True for a request that asks for no upgrade")
        # RFC 9110 §7.8: Upgrade is only honoured when Connection lists it.
        parts += (b"connection: upgrade\r\nupgrade: ", head.upgrade, b"\r\n")

    received = _VIA_10 if head.http_minor == 0 else _VIA_11
    parts += (
        b"x-forwarded-for: ",
        client_ip if xff is None else b"%s, %s" % (xff, client_ip),
        b"\r\nx-forwarded-proto: ",
        scheme,
        b"\r\n",
    )
    if host:
        parts += (b"x-forwarded-host: ", host, b"\r\n")
    parts += (b"via: ", received if via is None else b"%s, %s" % (via, received), b"\r\n")

    if request_id is None:
        request_id = new_request_id()
    parsed = _parse_traceparent(traceparent) if traceparent else None
    if parsed is None:
        # W3C Trace Context §4: no valid parent, so start a trace; its tracestate goes with it.
        trace_id = b"%032x" % (_getrandbits(128) or 1)
        flags = b"01"
        tracestate = None
    else:
        trace_id, flags = parsed
    # W3C Trace Context §3.4: same trace id and flags, this proxy's own span as the parent id.
    parts += (
        b"x-request-id: ",
        request_id,
        b"\r\ntraceparent: 00-",
        trace_id,
        b"-%016x-" % (_getrandbits(64) or 1),
        flags,
        b"\r\n",
    )
    if tracestate is not None:
        for value in tracestate:
            parts += (b"tracestate: ", value, b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts), request_id, trace_id


def client_response(
    head: _ResponseHeadLike,
    *,
    request_id: bytes,
    client_minor: int,
    keep_alive: bool,
    head_request: bool,
    tunnel: bool = False,
    server_timing: bytes | None = None,
) -> tuple[bytes, int]:
    """Build the response head for the client; returns ``(head bytes, BODY_* framing mode)``.

    ``keep_alive`` is whether the client connection should stay open after this response.
    A response with no body (HEAD, 1xx, 204, 304, or ``head.body == "none"``) keeps its
    content-length, except on 1xx and 204 where RFC 9110 §8.6 forbids one. A close-delimited
    upstream body is re-chunked for a kept-alive HTTP/1.1 client so its connection survives;
    an HTTP/1.0 client cannot read chunks (RFC 9112 §7), so it gets the body until close.
    ``tunnel`` applies to a 101 only: the Upgrade and ``connection: upgrade`` go through.
    A 101 with ``tunnel`` but no Upgrade field is a ValueError (RFC 9110 §15.2.2 requires one):
    the proxy answers 502.
    """
    status = head.status
    tunnel = tunnel and status == 101
    tokens = head.connection_tokens
    upgrade: bytes | None = None
    has_request_id = False

    parts = [_STATUS_PREFIX.get(status) or b"HTTP/1.1 %d " % status, head.reason, b"\r\n"]
    for name, value in head.headers:
        if name in _RESPONSE_HANDLED:
            # Upgrade is hop-by-hop (and named in Connection), but a tunnel's 101 re-sends it.
            if name == b"upgrade" and upgrade is None:
                upgrade = value
            continue
        if name.startswith(b"proxy-") or (tokens and name in tokens):
            continue  # RFC 9110 §7.6.1
        if name == b"x-request-id":
            has_request_id = True
        parts += (name, b": ", value, b"\r\n")

    # RFC 9112 §6.3: which responses have a body, and how the client will find its end.
    body = head.body
    length = head.content_length
    if body == "none" or head_request or status < 200 or status == 204 or status == 304:
        mode = BODY_NONE
        if length is not None and status >= 200 and status != 204:
            parts.append(b"content-length: %d\r\n" % length)
    elif body == "length":
        if length is None:
            raise ValueError('body "length" without a content_length')
        mode = BODY_LENGTH
        parts.append(b"content-length: %d\r\n" % length)
    elif client_minor and (body == "chunked" or keep_alive):
        mode = BODY_CHUNKED
        parts.append(b"transfer-encoding: chunked\r\n")
    else:
        mode = BODY_CLOSE

    if tunnel:
        if upgrade is None:
            raise ValueError("101 response without an Upgrade field")
        parts += (b"connection: upgrade\r\nupgrade: ", upgrade, b"\r\n")
    elif status < 200:
        pass  # interim response: connection options belong to the final one
    elif mode == BODY_CLOSE or not keep_alive:
        parts.append(b"connection: close\r\n")  # RFC 9112 §9.6
    elif client_minor == 0:
        parts.append(b"connection: keep-alive\r\n")  # RFC 9112 §9.3: 1.0 closes by default

    if not has_request_id:
        parts += (b"x-request-id: ", request_id, b"\r\n")
    if server_timing is not None:
        parts += (b"server-timing: ", server_timing, b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts), mode


def error_response(
    status: int,
    request_id: bytes,
    message: str,
    *,
    close: bool,
    retry_after: int | None = None,
    head_request: bool = False,
    server_timing: bytes | None = None,
) -> bytes:
    """A complete response the ingress makes itself, with a one-line text/plain body.

    The body is ``"<status> <reason>: <message>\\n"``; a HEAD gets none but the same
    content-length (RFC 9110 §9.3.2). ``cache-control: no-store`` keeps a shared cache from
    holding on to a 404 or 503 that is only true for a moment. ``retry_after`` is in seconds
    (RFC 9110 §10.2.3). ``request_id`` must be one this module made or validated.
    """
    status_line, body_prefix = _ERROR_LINES.get(status) or _error_lines(status)
    body = b"%s%s\n" % (body_prefix, message.encode("utf-8", "replace"))
    parts = [
        status_line,
        b"content-type: text/plain; charset=utf-8\r\ncache-control: no-store\r\n"
        b"content-length: %d\r\nx-request-id: " % len(body),
        request_id,
        b"\r\n",
    ]
    if retry_after is not None:
        parts.append(b"retry-after: %d\r\n" % max(retry_after, 0))
    if server_timing is not None:
        parts += (b"server-timing: ", server_timing, b"\r\n")
    if close:
        parts.append(b"connection: close\r\n")
    parts.append(b"\r\n")
    if not head_request:
        parts.append(body)
    return b"".join(parts)


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body (RFC 9112 §7.1); empty data gives b"", never the last-chunk."""
    if not data:
        return b""
    return b"%x\r\n%b\r\n" % (len(data), data)
