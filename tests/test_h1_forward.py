"""Tests for ingress.h1.forward: the heads the proxy writes upstream and downstream."""

from __future__ import annotations

import re
from http import HTTPStatus
from types import SimpleNamespace

import h11
import pytest

from ingress.h1.forward import (
    BODY_CHUNKED,
    BODY_CLOSE,
    BODY_LENGTH,
    BODY_NONE,
    LAST_CHUNK,
    chunk,
    client_response,
    error_response,
    new_request_id,
    upstream_request,
)

HEX32 = re.compile(rb"[0-9a-f]{32}")
TRACE_ID = b"4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = b"00f067aa0ba902b7"
TRACEPARENT = b"00-" + TRACE_ID + b"-" + PARENT_ID + b"-01"
CLIENT_IP = b"203.0.113.7"


def _req(*headers, host=b"app.example", http_minor=1, **fields):
    """A stand-in RequestHead; a host field is listed first unless host is empty."""
    listed = ([(b"host", host)] if host else []) + list(headers)
    values = {
        "method": b"GET",
        "target": b"/",
        "http_minor": http_minor,
        "headers": listed,
        "host": host,
        "content_length": None,
        "chunked": False,
        "keep_alive": True,
        "expect_continue": False,
        "upgrade": None,
        "connection_tokens": (),
    }
    values.update(fields)
    return SimpleNamespace(**values)


def _resp(*headers, status=200, reason=b"OK", body="length", content_length=5, **fields):
    """A stand-in ResponseHead from an HTTP/1.1 instance."""
    values = {
        "status": status,
        "reason": reason,
        "http_minor": 1,
        "headers": list(headers),
        "content_length": content_length,
        "chunked": body == "chunked",
        "keep_alive": body != "close",
        "connection_tokens": (),
        "body": body,
    }
    values.update(fields)
    return SimpleNamespace(**values)


def _forward(head, *, scheme=b"https", tunnel=False):
    return upstream_request(head, client_ip=CLIENT_IP, scheme=scheme, tunnel=tunnel)


def _split(data):
    """(start line, [(name, value), ...]) of a head that ends with an empty line."""
    assert data.endswith(b"\r\n\r\n")
    start, *lines = data[:-4].split(b"\r\n")
    return start, [tuple(line.split(b": ", 1)) for line in lines]


def _values(data, name):
    return [v for n, v in _split(data)[1] if n == name]


def _client_reply(head, **kwargs):
    options = {"request_id": b"rid", "client_minor": 1, "keep_alive": True, "head_request": False}
    options.update(kwargs)
    return client_response(head, **options)


def _h11_server_events(data):
    """Events an h11 server sees for data, up to the end of the first request."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    events = []
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA or event is h11.PAUSED:
            return events
        events.append(event)
        if isinstance(event, h11.EndOfMessage):
            return events


def _h11_client(method=b"GET", headers=()):
    """An h11 client connection that has sent one request and awaits the response."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=method, target=b"/", headers=[(b"host", b"a"), *headers]))
    conn.send(h11.EndOfMessage())
    return conn


def _h11_read_response(conn, data, eof=False):
    """(response event, body, ended) as an h11 client reads data (then EOF when eof)."""
    conn.receive_data(data)
    if eof:
        conn.receive_data(b"")
    response, body = None, b""
    while True:
        event = conn.next_event()
        if isinstance(event, h11.Response):
            response = event
        elif isinstance(event, h11.Data):
            body += bytes(event.data)
        elif isinstance(event, h11.EndOfMessage):
            return response, body, True
        else:
            return response, body, False


# upstream_request ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "target", "http_minor", "line"),
    [
        pytest.param(b"GET", b"/a?b=c", 1, b"GET /a?b=c HTTP/1.1", id="origin-form"),
        pytest.param(b"POST", b"/", 0, b"POST / HTTP/1.1", id="http10-sent-as-11"),
        pytest.param(b"OPTIONS", b"*", 1, b"OPTIONS * HTTP/1.1", id="asterisk-form"),
        pytest.param(b"GET", b"http://app.example/p?q", 1, b"GET /p?q HTTP/1.1", id="absolute"),
        pytest.param(b"GET", b"HTTPS://app.example", 1, b"GET / HTTP/1.1", id="absolute-no-path"),
        pytest.param(b"GET", b"http://app.example?q", 1, b"GET /?q HTTP/1.1", id="absolute-query"),
        pytest.param(b"OPTIONS", b"http://app.example", 1, b"OPTIONS * HTTP/1.1", id="options-*"),
    ],
)
def test_request_line(method, target, http_minor, line):
    """The request line is always HTTP/1.1 with an origin-form (or asterisk) target."""
    data, _, _ = _forward(_req(method=method, target=target, http_minor=http_minor))
    start, headers = _split(data)
    assert start == line
    assert headers[0] == (b"host", b"app.example")


@pytest.mark.parametrize(
    ("name", "tokens"),
    [
        pytest.param(b"connection", (b"close",), id="connection"),
        pytest.param(b"keep-alive", (b"keep-alive",), id="keep-alive"),
        pytest.param(b"te", (b"te",), id="te"),
        pytest.param(b"trailer", (), id="trailer"),
        pytest.param(b"transfer-encoding", (), id="transfer-encoding"),
        pytest.param(b"upgrade", (b"upgrade",), id="upgrade-without-tunnel"),
        pytest.param(b"proxy-connection", (), id="proxy-connection"),
        pytest.param(b"proxy-authorization", (), id="proxy-authorization"),
        pytest.param(b"x-hop-secret", (b"x-hop-secret",), id="named-in-connection"),
        pytest.param(b"x-forwarded-for", (b"x-forwarded-for",), id="named-xff-chain-dropped"),
    ],
)
def test_request_hop_by_hop_removed(name, tokens):
    """Hop-by-hop fields, proxy-* ones and any named in Connection never reach the instance."""
    head = _req((b"x-keep", b"1"), (name, b"value"), (b"x-after", b"2"), connection_tokens=tokens)
    data, _, _ = _forward(head)
    assert _values(data, name) in ([], [CLIENT_IP])  # x-forwarded-for is rewritten, not kept
    assert b"value" not in data
    assert _values(data, b"x-keep") == [b"1"]
    assert _values(data, b"x-after") == [b"2"]


def test_request_end_to_end_headers_keep_order_and_duplicates():
    """End-to-end fields go through in their order, duplicates included, after host."""
    head = _req((b"accept", b"*/*"), (b"cookie", b"a=1"), (b"x-a", b""), (b"cookie", b"b=2"))
    _, headers = _split(_forward(head)[0])
    kept = [h for h in headers if h[0] in {b"host", b"accept", b"cookie", b"x-a"}]
    assert kept == [
        (b"host", b"app.example"),
        (b"accept", b"*/*"),
        (b"cookie", b"a=1"),
        (b"x-a", b""),
        (b"cookie", b"b=2"),
    ]


@pytest.mark.parametrize(
    ("received", "expected"),
    [
        pytest.param([], CLIENT_IP, id="none"),
        pytest.param([b"198.51.100.1"], b"198.51.100.1, " + CLIENT_IP, id="one"),
        pytest.param(
            [b"198.51.100.1, 10.0.0.2", b"10.0.0.3"],
            b"198.51.100.1, 10.0.0.2, 10.0.0.3, " + CLIENT_IP,
            id="chain-in-two-fields",
        ),
        pytest.param([b""], CLIENT_IP, id="empty-ignored"),
    ],
)
def test_x_forwarded_for_appended(received, expected):
    """X-Forwarded-For is the received chain plus the client address, in one field."""
    head = _req(*[(b"x-forwarded-for", v) for v in received])
    assert _values(_forward(head)[0], b"x-forwarded-for") == [expected]


def test_x_forwarded_proto_and_host_replaced():
    """A client's own X-Forwarded-Proto/Host are replaced, so it cannot spoof them."""
    head = _req((b"x-forwarded-proto", b"https"), (b"x-forwarded-host", b"admin.internal"))
    data, _, _ = _forward(head, scheme=b"http")
    assert _values(data, b"x-forwarded-proto") == [b"http"]
    assert _values(data, b"x-forwarded-host") == [b"app.example"]


def test_http10_without_host_sends_empty_host():
    """An HTTP/1.0 request without Host goes up with an empty Host (1.1 needs one) and no XFH."""
    data, _, _ = _forward(_req(host=b"", http_minor=0))
    assert _values(data, b"host") == [b""]
    assert _values(data, b"x-forwarded-host") == []
    assert isinstance(_h11_server_events(data)[0], h11.Request)


@pytest.mark.parametrize(
    ("http_minor", "received", "expected"),
    [
        pytest.param(1, [], b"1.1 tidegate", id="http11"),
        pytest.param(0, [], b"1.0 tidegate", id="http10"),
        pytest.param(1, [b"1.1 cdn", b"1.1 lb"], b"1.1 cdn, 1.1 lb, 1.1 tidegate", id="chain"),
    ],
)
def test_via_appended(http_minor, received, expected):
    """Via gains this proxy with the client's protocol version (RFC 9110 §7.6.3)."""
    head = _req(*[(b"via", v) for v in received], http_minor=http_minor)
    assert _values(_forward(head)[0], b"via") == [expected]


@pytest.mark.parametrize(
    ("received", "kept"),
    [
        pytest.param([b"abc-123"], b"abc-123", id="kept"),
        pytest.param([b"x" * 200], b"x" * 200, id="200-chars-kept"),
        pytest.param([b"!~"], b"!~", id="visible-ascii-edges-kept"),
        pytest.param([b"x" * 201], None, id="too-long"),
        pytest.param([b""], None, id="empty"),
        pytest.param([b"a b"], None, id="space"),
        pytest.param([b"a\x01b"], None, id="control"),
        pytest.param(["é".encode()], None, id="non-ascii"),
        pytest.param([], None, id="absent"),
        pytest.param([b"bad id", b"good", b"other"], b"good", id="first-valid-of-many"),
    ],
)
def test_request_id(received, kept):
    """A valid client X-Request-Id is kept, otherwise a new one is made; exactly one goes up."""
    head = _req(*[(b"x-request-id", v) for v in received])
    data, request_id, _ = _forward(head)
    assert _values(data, b"x-request-id") == [request_id]
    if kept is None:
        assert HEX32.fullmatch(request_id)
    else:
        assert request_id == kept


def test_new_request_id_is_32_hex_and_unique():
    """new_request_id gives 32 lowercase hex characters that do not repeat."""
    ids = {new_request_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(HEX32.fullmatch(i) for i in ids)


@pytest.mark.parametrize(
    ("traceparent", "flags"),
    [
        pytest.param(TRACEPARENT, b"01", id="sampled"),
        pytest.param(b"00-" + TRACE_ID + b"-" + PARENT_ID + b"-00", b"00", id="not-sampled"),
        pytest.param(b"cc-" + TRACE_ID + b"-" + PARENT_ID + b"-01-what", b"01", id="future-ver"),
    ],
)
def test_traceparent_continued(traceparent, flags):
    """A valid traceparent keeps its trace id and flags, gets a new parent id, keeps tracestate."""
    head = _req((b"tracestate", b"a=1"), (b"traceparent", traceparent), (b"tracestate", b"b=2,c=3"))
    data, _, trace_id = _forward(head)
    assert trace_id == TRACE_ID
    [sent] = _values(data, b"traceparent")
    version, sent_trace, parent, sent_flags = sent.split(b"-")
    assert (version, sent_trace, sent_flags) == (b"00", TRACE_ID, flags)
    assert re.fullmatch(rb"[0-9a-f]{16}", parent) and parent not in (PARENT_ID, b"0" * 16)
    assert _values(data, b"tracestate") == [b"a=1", b"b=2,c=3"]


@pytest.mark.parametrize(
    "traceparents",
    [
        pytest.param([], id="absent"),
        pytest.param([b"00-" + b"0" * 32 + b"-" + PARENT_ID + b"-01"], id="zero-trace-id"),
        pytest.param([b"00-" + TRACE_ID + b"-" + b"0" * 16 + b"-01"], id="zero-parent-id"),
        pytest.param([b"00-" + TRACE_ID[:-1] + b"-" + PARENT_ID + b"-01"], id="short-trace-id"),
        pytest.param([b"00-" + TRACE_ID + b"-" + PARENT_ID + b"0-01"], id="long-parent-id"),
        pytest.param([b"00-" + TRACE_ID + b"-" + PARENT_ID + b"-1"], id="short-flags"),
        pytest.param([TRACEPARENT.upper()], id="uppercase-hex"),
        pytest.param([b"ff" + TRACEPARENT[2:]], id="version-ff"),
        pytest.param([TRACEPARENT + b"-extra"], id="v00-with-extra-field"),
        pytest.param([b"cc" + TRACEPARENT[2:] + b"x"], id="future-version-no-dash"),
        pytest.param([TRACEPARENT.replace(b"a", b"g")], id="not-hex"),
        pytest.param([TRACEPARENT, TRACEPARENT], id="two-fields"),
        pytest.param([b""], id="empty"),
    ],
)
def test_traceparent_started(traceparents):
    """Absent or invalid traceparent starts a new trace (flags 01) and drops tracestate."""
    head = _req((b"tracestate", b"a=1"), *[(b"traceparent", v) for v in traceparents])
    data, _, trace_id = _forward(head)
    assert HEX32.fullmatch(trace_id) and trace_id not in (TRACE_ID, b"0" * 32)
    [sent] = _values(data, b"traceparent")
    assert re.fullmatch(rb"00-([0-9a-f]{32})-[0-9a-f]{16}-01", sent).group(1) == trace_id
    assert _values(data, b"tracestate") == []


@pytest.mark.parametrize(
    ("fields", "framing", "body", "sent"),
    [
        pytest.param(
            {"content_length": 5},
            [(b"content-length", b"5")],
            b"hello",
            b"hello",
            id="content-length",
        ),
        pytest.param(
            {"chunked": True},
            [(b"transfer-encoding", b"chunked")],
            chunk(b"hel") + chunk(b"lo") + LAST_CHUNK,
            b"hello",
            id="chunked",
        ),
        pytest.param({}, [], b"", b"", id="none"),
    ],
)
def test_request_framing(fields, framing, body, sent):
    """Framing comes from the parsed head, never from the client's fields, and h11 agrees."""
    head = _req(
        (b"content-length", b"999"), (b"transfer-encoding", b"gzip"), method=b"POST", **fields
    )
    data, _, _ = _forward(head)
    headers = _split(data)[1]
    assert [h for h in headers if h[0] in {b"content-length", b"transfer-encoding"}] == framing
    events = _h11_server_events(data + body)
    assert isinstance(events[0], h11.Request)
    assert b"".join(bytes(e.data) for e in events if isinstance(e, h11.Data)) == sent
    assert isinstance(events[-1], h11.EndOfMessage)


def test_request_parses_with_h11():
    """A full forwarded head is accepted by an h11 server with every added field in place."""
    head = _req(
        (b"accept", b"text/html"),
        (b"connection", b"keep-alive, x-hop"),
        (b"x-hop", b"1"),
        (b"x-forwarded-for", b"198.51.100.1"),
        (b"traceparent", TRACEPARENT),
        target=b"/path?x=1",
        connection_tokens=(b"keep-alive", b"x-hop"),
    )
    data, request_id, trace_id = _forward(head)
    [request] = [e for e in _h11_server_events(data) if isinstance(e, h11.Request)]
    assert request.method == b"GET" and request.target == b"/path?x=1"
    assert request.http_version == b"1.1"
    fields = dict(request.headers)
    assert fields[b"host"] == b"app.example"
    assert fields[b"accept"] == b"text/html"
    assert fields[b"x-forwarded-for"] == b"198.51.100.1, " + CLIENT_IP
    assert fields[b"x-forwarded-proto"] == b"https"
    assert fields[b"x-forwarded-host"] == b"app.example"
    assert fields[b"via"] == b"1.1 tidegate"
    assert fields[b"x-request-id"] == request_id
    assert fields[b"traceparent"].startswith(b"00-" + trace_id + b"-")
    assert b"x-hop" not in fields and b"connection" not in fields


def test_tunnel_keeps_upgrade():
    """A forwarded WebSocket handshake carries Connection: upgrade and the client's Upgrade."""
    head = _req(
        (b"connection", b"Upgrade"),
        (b"upgrade", b"websocket"),
        (b"sec-websocket-key", b"dGhlIHNhbXBsZSBub25jZQ=="),
        upgrade=b"websocket",
        connection_tokens=(b"upgrade",),
    )
    data, _, _ = _forward(head, tunnel=True)
    assert _values(data, b"connection") == [b"upgrade"]
    assert _values(data, b"upgrade") == [b"websocket"]
    assert _values(data, b"sec-websocket-key") == [b"dGhlIHNhbXBsZSBub25jZQ=="]
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    assert isinstance(conn.next_event(), h11.Request)
    assert isinstance(conn.next_event(), h11.EndOfMessage)
    assert conn.next_event() is h11.PAUSED  # h11 waits for the 101: it saw the upgrade


def test_tunnel_without_upgrade_is_an_error():
    """Asking to tunnel a request that asked for no upgrade is the caller's bug."""
    with pytest.raises(ValueError):
        _forward(_req(), tunnel=True)


# client_response ---------------------------------------------------------------------------

_BODY_SHAPES = {
    # a 304 carrying the length the GET would have had: no body whatever the method
    "none": {"status": 304, "reason": b"Not Modified", "content_length": 10},
    "length": {"content_length": 5},
    "chunked": {"content_length": None},
    "close": {"content_length": None},
}

_NONE, _LEN, _CHK, _CLS = BODY_NONE, BODY_LENGTH, BODY_CHUNKED, BODY_CLOSE
_TE = (b"transfer-encoding", b"chunked")
_KA, _CL = b"keep-alive", b"close"


def _cl(n):
    return (b"content-length", str(n).encode())


# (upstream body, client minor, keep_alive, HEAD) -> (mode, framing field, connection value)
_REFRAMING = [
    ("none", 1, True, False, _NONE, _cl(10), None),
    ("none", 1, True, True, _NONE, _cl(10), None),
    ("none", 1, False, False, _NONE, _cl(10), _CL),
    ("none", 1, False, True, _NONE, _cl(10), _CL),
    ("none", 0, True, False, _NONE, _cl(10), _KA),
    ("none", 0, True, True, _NONE, _cl(10), _KA),
    ("none", 0, False, False, _NONE, _cl(10), _CL),
    ("none", 0, False, True, _NONE, _cl(10), _CL),
    ("length", 1, True, False, _LEN, _cl(5), None),
    ("length", 1, True, True, _NONE, _cl(5), None),
    ("length", 1, False, False, _LEN, _cl(5), _CL),
    ("length", 1, False, True, _NONE, _cl(5), _CL),
    ("length", 0, True, False, _LEN, _cl(5), _KA),
    ("length", 0, True, True, _NONE, _cl(5), _KA),
    ("length", 0, False, False, _LEN, _cl(5), _CL),
    ("length", 0, False, True, _NONE, _cl(5), _CL),
    ("chunked", 1, True, False, _CHK, _TE, None),
    ("chunked", 1, True, True, _NONE, None, None),
    ("chunked", 1, False, False, _CHK, _TE, _CL),
    ("chunked", 1, False, True, _NONE, None, _CL),
    ("chunked", 0, True, False, _CLS, None, _CL),
    ("chunked", 0, True, True, _NONE, None, _KA),
    ("chunked", 0, False, False, _CLS, None, _CL),
    ("chunked", 0, False, True, _NONE, None, _CL),
    ("close", 1, True, False, _CHK, _TE, None),
    ("close", 1, True, True, _NONE, None, None),
    ("close", 1, False, False, _CLS, None, _CL),
    ("close", 1, False, True, _NONE, None, _CL),
    ("close", 0, True, False, _CLS, None, _CL),
    ("close", 0, True, True, _NONE, None, _KA),
    ("close", 0, False, False, _CLS, None, _CL),
    ("close", 0, False, True, _NONE, None, _CL),
]


def _reframing_id(body, minor, keep_alive, head_request):
    return (
        f"{body}-http1{minor}-{'ka' if keep_alive else 'close'}-{'HEAD' if head_request else 'GET'}"
    )


@pytest.mark.parametrize(
    ("body", "minor", "keep_alive", "head_request", "mode", "framing", "connection"),
    [pytest.param(*row, id=_reframing_id(*row[:4])) for row in _REFRAMING],
)
def test_response_reframing(body, minor, keep_alive, head_request, mode, framing, connection):
    """Each upstream body shape is framed for the client's version, keep-alive and method."""
    head = _resp(
        (b"content-length", b"999"),
        (b"transfer-encoding", b"chunked"),
        (b"connection", b"keep-alive"),
        (b"content-type", b"text/plain"),
        body=body,
        **_BODY_SHAPES[body],
    )
    data, got_mode = _client_reply(
        head, client_minor=minor, keep_alive=keep_alive, head_request=head_request
    )
    assert got_mode == mode
    headers = _split(data)[1]
    framed = [h for h in headers if h[0] in {b"content-length", b"transfer-encoding"}]
    assert framed == ([framing] if framing else [])
    assert _values(data, b"connection") == ([connection] if connection else [])
    assert _values(data, b"content-type") == [b"text/plain"]

    client = _h11_client(b"HEAD" if head_request else b"GET")
    payload = {
        _NONE: b"",
        _LEN: b"hello",
        _CHK: chunk(b"he") + chunk(b"llo") + LAST_CHUNK,
        _CLS: b"hello",
    }[mode]
    response, received, ended = _h11_read_response(client, data + payload, eof=mode == _CLS)
    assert response is not None and response.status_code == head.status
    assert (received, ended) == (b"" if mode == _NONE else b"hello", True)


@pytest.mark.parametrize(
    ("name", "tokens"),
    [
        pytest.param(b"keep-alive", (), id="keep-alive"),
        pytest.param(b"te", (), id="te"),
        pytest.param(b"trailer", (), id="trailer"),
        pytest.param(b"upgrade", (b"upgrade",), id="upgrade-without-tunnel"),
        pytest.param(b"proxy-connection", (), id="proxy-connection"),
        pytest.param(b"proxy-authenticate", (), id="proxy-authenticate"),
        pytest.param(b"x-internal", (b"x-internal",), id="named-in-connection"),
        pytest.param(b"x-request-id", (b"x-request-id",), id="named-request-id-replaced"),
    ],
)
def test_response_hop_by_hop_removed(name, tokens):
    """Hop-by-hop fields and any the instance named in Connection never reach the client."""
    head = _resp((b"x-keep", b"1"), (name, b"value"), connection_tokens=tokens)
    data, _ = _client_reply(head)
    assert _values(data, name) in ([], [b"rid"])
    assert b"value" not in data
    assert _values(data, b"x-keep") == [b"1"]


@pytest.mark.parametrize(
    ("status", "head_request", "content_length"),
    [
        pytest.param(204, False, None, id="204-never"),
        pytest.param(304, False, b"10", id="304-kept"),
        pytest.param(200, True, b"10", id="head-kept"),
        pytest.param(103, False, None, id="1xx-never"),
    ],
)
def test_response_without_body_content_length(status, head_request, content_length):
    """Bodiless responses keep the content-length HEAD/304 may carry; 1xx and 204 get none."""
    head = _resp(status=status, body="none", content_length=10)
    data, mode = _client_reply(head, head_request=head_request)
    assert mode == BODY_NONE
    assert _values(data, b"content-length") == ([content_length] if content_length else [])


def test_interim_response_has_no_connection_field():
    """A 1xx never says close or keep-alive: that belongs to the final response."""
    data, mode = _client_reply(
        _resp(status=100, reason=b"Continue", body="none"), client_minor=0, keep_alive=False
    )
    assert (mode, _values(data, b"connection")) == (BODY_NONE, [])


@pytest.mark.parametrize(
    ("reason", "line"),
    [
        pytest.param(b"OK", b"HTTP/1.1 200 OK", id="reason"),
        pytest.param(b"Fine By Me", b"HTTP/1.1 200 Fine By Me", id="custom-reason"),
        pytest.param(b"", b"HTTP/1.1 200 ", id="empty-reason"),
    ],
)
def test_response_status_line(reason, line):
    """The status line is HTTP/1.1 with the reason as received, even an empty one."""
    data, _ = _client_reply(_resp(reason=reason))
    assert _split(data)[0] == line
    response, body, ended = _h11_read_response(_h11_client(), data + b"hello")
    assert (response.status_code, response.reason, body, ended) == (200, reason, b"hello", True)


def test_tunnel_response_keeps_upgrade():
    """A 101 for a tunnel keeps Upgrade and Connection: upgrade, and h11 switches protocol."""
    head = _resp(
        (b"connection", b"Upgrade"),
        (b"upgrade", b"websocket"),
        (b"sec-websocket-accept", b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        status=101,
        reason=b"Switching Protocols",
        body="none",
        content_length=None,
        connection_tokens=(b"upgrade",),
    )
    data, mode = _client_reply(head, tunnel=True, keep_alive=False)
    assert mode == BODY_NONE
    assert _values(data, b"connection") == [b"upgrade"]
    assert _values(data, b"upgrade") == [b"websocket"]
    client = _h11_client(headers=[(b"connection", b"upgrade"), (b"upgrade", b"websocket")])
    client.receive_data(data + b"\x81\x00")
    event = client.next_event()
    assert isinstance(event, h11.InformationalResponse) and event.status_code == 101
    assert client.next_event() is h11.PAUSED
    assert client.trailing_data == (b"\x81\x00", False)


def test_tunnel_flag_ignored_on_a_refusal():
    """tunnel=True on a non-101 answer (the instance refused the upgrade) forwards no Upgrade."""
    head = _resp((b"upgrade", b"websocket"), status=400, reason=b"Bad Request")
    data, mode = _client_reply(head, tunnel=True)
    assert mode == BODY_LENGTH
    assert _values(data, b"upgrade") == []


def test_tunnel_101_without_upgrade_is_an_error():
    """A 101 with no Upgrade field cannot be tunnelled: the caller answers 502."""
    head = _resp(status=101, reason=b"Switching Protocols", body="none", content_length=None)
    with pytest.raises(ValueError):
        _client_reply(head, tunnel=True)


@pytest.mark.parametrize(
    ("headers", "server_timing", "request_ids", "timings"),
    [
        pytest.param([], None, [b"rid"], [], id="request-id-added"),
        pytest.param([(b"x-request-id", b"app")], None, [b"app"], [], id="instance-id-kept"),
        pytest.param(
            [(b"server-timing", b"db;dur=2")],
            b"queue;dur=0.1, upstream;dur=3.2",
            [b"rid"],
            [b"db;dur=2", b"queue;dur=0.1, upstream;dur=3.2"],
            id="server-timing-appended",
        ),
    ],
)
def test_response_request_id_and_server_timing(headers, server_timing, request_ids, timings):
    """X-Request-Id is added unless the instance sent one; Server-Timing is appended when given."""
    data, _ = _client_reply(_resp(*headers), server_timing=server_timing)
    assert _values(data, b"x-request-id") == request_ids
    assert _values(data, b"server-timing") == timings


# error_response ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "reason", "close", "retry_after"),
    [
        pytest.param(400, b"Bad Request", True, None, id="400"),
        pytest.param(404, b"Not Found", False, None, id="404"),
        # Python 3.13 renamed 413 to RFC 9110's "Content Too Large": whichever this one has.
        pytest.param(413, HTTPStatus(413).phrase.encode(), True, None, id="413"),
        pytest.param(431, b"Request Header Fields Too Large", True, None, id="431"),
        pytest.param(501, b"Not Implemented", True, None, id="501"),
        pytest.param(502, b"Bad Gateway", False, None, id="502"),
        pytest.param(503, b"Service Unavailable", False, 5, id="503-retry-after"),
        pytest.param(504, b"Gateway Timeout", False, None, id="504"),
        pytest.param(599, b"Error", True, None, id="unknown-status"),
    ],
)
@pytest.mark.parametrize("head_request", [False, True], ids=["GET", "HEAD"])
def test_error_response(status, reason, close, retry_after, head_request):
    """The ingress's own responses parse with h11 and carry x-request-id, retry-after, a body."""
    data = error_response(
        status,
        b"req-1",
        "no instance — try later",
        close=close,
        retry_after=retry_after,
        head_request=head_request,
    )
    body = b"%d %s: no instance \xe2\x80\x94 try later\n" % (status, reason)
    client = _h11_client(b"HEAD" if head_request else b"GET")
    response, received, ended = _h11_read_response(client, data)
    assert ended and response.status_code == status and response.reason == reason
    assert received == (b"" if head_request else body)
    fields = dict(response.headers)
    assert fields[b"content-length"] == b"%d" % len(body)
    assert fields[b"content-type"] == b"text/plain; charset=utf-8"
    assert fields[b"x-request-id"] == b"req-1"
    assert fields.get(b"retry-after") == (None if retry_after is None else b"%d" % retry_after)
    assert fields.get(b"connection") == (b"close" if close else None)


# chunk -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        pytest.param(b"", b"", id="empty-is-nothing"),
        pytest.param(b"a", b"1\r\na\r\n", id="one-byte"),
        pytest.param(b"x" * 16, b"10\r\n" + b"x" * 16 + b"\r\n", id="hex-size"),
        pytest.param(b"y" * 255, b"ff\r\n" + b"y" * 255 + b"\r\n", id="lowercase-hex"),
    ],
)
def test_chunk(data, expected):
    """chunk frames one piece with its hex size and never produces the last-chunk."""
    assert chunk(data) == expected
    assert LAST_CHUNK == b"0\r\n\r\n"


def test_body_modes_are_distinct():
    """The four framing modes are distinct values the proxy can switch on."""
    assert len({BODY_NONE, BODY_LENGTH, BODY_CHUNKED, BODY_CLOSE}) == 4
