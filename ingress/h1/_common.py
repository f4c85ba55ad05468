"""Pieces shared by the request and the response reader: head splitting, field rules, chunks.

llhttp (through httptools) parses every head, but only ever sees one complete head at a
time: :class:`HeadBuffer` finds where a head ends (its first blank line) with ``bytes.find``,
and the readers frame bodies themselves. That gives exact head-size accounting, exact message
boundaries (nothing can hide between two messages, as CR/LF can when llhttp skips them), and a
fresh parser per head, so a HEAD or 1xx response never leaves llhttp expecting a body.

Everything here raises :class:`Violation`; each reader turns it into its public error.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

# RFC 9110 5.6.2: token = 1*tchar.
TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"

# RFC 9110 5.6.4 quoted-string: qdtext and quoted-pairs, no CTL other than HTAB.
_QUOTED = rb'"(?:[\t !#-\[\]-~\x80-\xff]|\\[\t !-~\x80-\xff])*"'

# RFC 9112 7.1: chunk-size [chunk-ext] CRLF, with chunk-ext = *(";" name ["=" token/quoted]).
# Well-formed extensions are accepted (and ignored), as h11 and llhttp do. BWS around ";" and
# "=" is refused like llhttp refuses it: whitespace in chunk lines is a classic desync lever.
# At most 16 hex digits (2**64 - 1), llhttp's overflow point; h11 allows 20.
_CHUNK_LINE = re.compile(
    rb"([0-9A-Fa-f]{1,16})(?:;" + TOKEN + rb"(?:=(?:" + TOKEN + rb"|" + _QUOTED + rb"))?)*\r\n"
)

# A trailer field line, RFC 9112 5: no whitespace before the colon, no obs-fold (a line may not
# start with whitespace), no CTL other than HTAB in the value (RFC 9110 5.5).
_FIELD_LINE = re.compile(TOKEN + rb":[\t\x20-\x7e\x80-\xff]*")

# A chunk-size line holds a size and optional extensions; Go's net/http caps such lines at
# 4096 bytes (internal/chunked.go, maxLineLength), far above any real extension.
MAX_CHUNK_LINE = 4096

_END = b"\r\n\r\n"
_CR = 0x0D
_LF = 0x0A


class Violation(Exception):
    """Malformed or ambiguous input; `status` is the answer a server would give."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(status, reason)
        self.status = status
        self.reason = reason


class HeadBuffer:
    """Finds the end of one head (or trailer section), keeping any partial head it is fed.

    A head ends at its first CRLF CRLF. Every CR and LF in it must pair up as CRLF, which is
    checked as bytes arrive (with counts, not a loop), so a head with a bare LF or CR is
    refused at once instead of being waited on until the size limit. The size counted is
    every byte up to and including the blank line; the checks look only at bytes within the
    limit, so a stream gets the same verdict however it is split.
    """

    __slots__ = ("_buf", "_limit")

    def __init__(self, limit: int, seed: bytes = b"") -> None:
        self._buf = bytearray(seed)
        self._limit = limit

    def __len__(self) -> int:
        return len(self._buf)

    def push(self, data: bytes, pos: int, *, defer_check: bool = False) -> tuple[bytes, int] | None:
        """Take ``data[pos:]`` (non-empty); return ``(head, end offset in data)`` once complete.

        With `defer_check`, a head found whole in `data` with nothing held (the usual case) is
        returned without its line-end check, the costliest step here: a reader parses it at
        once and calls :func:`check_line_ends` only if that fails, which gives the same verdict
        and reason, because a head with a bare CR or LF never parses (the start-line patterns
        exclude both, and llhttp refuses them in fields: no lenient flag is ever set).
        """
        buf = self._buf
        held = len(buf)
        if defer_check and not held:
            end = data.find(_END, pos) + 4
            if 4 <= end <= pos + self._limit:
                return data[pos:end], end
        end = -1
        if held:
            tail = bytes(buf[-3:])
            j = (tail + data[pos : pos + 3]).find(_END)
            if j != -1:
                end = pos + j + 4 - len(tail)
        if end == -1:
            k = data.find(_END, pos)
            if k != -1:
                end = k + 4
        stop = len(data) if end == -1 else end
        self._check_line_ends(data, pos, min(stop, pos + self._limit - held))
        if held + stop - pos > self._limit:
            raise Violation(431, "header section too large")
        if end == -1:
            buf += memoryview(data)[pos:]
            return None
        if held:
            head = bytes(buf) + data[pos:end]
            buf.clear()
        else:
            head = data[pos:end]
        return head, end

    def _check_line_ends(self, data: bytes, pos: int, stop: int) -> None:
        if stop <= pos:
            return
        crlf = data.count(b"\r\n", pos, stop)
        held_cr = self._buf[-1:] == b"\r"
        if held_cr and data[pos] == _LF:
            crlf += 1  # a CRLF split across two pushes
        if data.count(b"\n", pos, stop) != crlf:
            raise Violation(400, "bare LF line ending")
        open_cr = data[stop - 1] == _CR  # its LF may come with the next bytes
        if data.count(b"\r", pos, stop) + held_cr != crlf + open_cr:
            raise Violation(400, "bare CR in head")


def check_line_ends(head: bytes) -> None:
    """Raise what HeadBuffer.push would for a bare LF or CR in a complete `head`."""
    crlf = head.count(b"\r\n")
    if head.count(b"\n") != crlf:
        raise Violation(400, "bare LF line ending")
    if head.count(b"\r") != crlf:
        raise Violation(400, "bare CR in head")


class FieldCollector:
    """The httptools callback object for a head: its fields, normalised as they arrive.

    `fields` holds (lowercased name, value without surrounding OWS) in order; `special` holds
    the values of the names in `watch`, the ones that decide framing and routing. A reader
    keeps one and calls reset() before each head (each still gets a fresh parser): that is
    cheaper than a new object, and the lists handed out with a head are never touched again.
    """

    __slots__ = ("complete", "fields", "special", "watch")

    def __init__(self, watch: frozenset[bytes]) -> None:
        self.watch = watch
        self.reset()

    def reset(self) -> None:
        self.fields: list[tuple[bytes, bytes]] = []
        self.special: dict[bytes, list[bytes]] = {}
        self.complete = False

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        value = value.strip(b" \t")  # llhttp drops leading OWS, not trailing
        self.fields.append((name, value))
        if name in self.watch:
            self.special.setdefault(name, []).append(value)

    def on_headers_complete(self) -> None:
        self.complete = True


def comma_tokens(values: Sequence[bytes]) -> tuple[bytes, ...]:
    """Lowercased, OWS-stripped, non-empty members of comma-separated field values."""
    # The usual single token, e.g. keep-alive. find(), not "in": bytes.__contains__ first
    # tries its argument as an int and raises and clears a TypeError, several times the search.
    if len(values) == 1 and values[0].find(b",") < 0:
        item = values[0].strip(b" \t")
        return (item.lower(),) if item else ()
    out = []
    for value in values:
        for item in value.split(b","):
            item = item.strip(b" \t")
            if item:
                out.append(item.lower())
    return tuple(out)


def parse_length(values: list[bytes], status: int) -> int:
    """The one Content-Length value, or Violation.

    Several fields, or a list such as ``5, 5``, are refused even when all members agree:
    RFC 9112 6.3 lets a recipient either reject or collapse them, implementations differ
    (h11 collapses, llhttp rejects), and a proxy must not forward a length its instance could
    read otherwise. Leading zeros are refused for the same reason: some parsers read ``010``
    as octal.
    """
    if len(values) != 1:
        raise Violation(status, "several Content-Length fields")
    value = values[0]
    # bytes.isdigit is ASCII-only (and false for b""): exactly 1*DIGIT, without a leading zero.
    if not value.isdigit() or (value[0] == 0x30 and len(value) > 1):
        raise Violation(status, "invalid Content-Length")
    return int(value)


class ChunkedDecoder:
    """Decodes one chunked body (RFC 9112 7.1), calling `emit` with the data; trailers dropped."""

    __slots__ = ("_crlf", "_emit", "_limit", "_line", "_remaining", "_trailer", "done")

    def __init__(self, emit: Callable[[bytes], None], trailer_limit: int) -> None:
        self._emit = emit
        self._limit = trailer_limit
        self._line = bytearray()  # partial chunk-size line
        self._remaining = 0  # data bytes left in the current chunk
        self._crlf = 0  # bytes of the CRLF after chunk data still expected (0: none)
        self._trailer: HeadBuffer | None = None
        self.done = False

    def feed(self, data: bytes, pos: int) -> int:
        """Consume from ``data[pos:]`` up to the end of the body; return the new offset."""
        n = len(data)
        while pos < n:
            if self._remaining:
                take = min(self._remaining, n - pos)
                self._emit(data if take == n else data[pos : pos + take])
                self._remaining -= take
                pos += take
                if not self._remaining:
                    self._crlf = 2
            elif self._crlf:
                want = b"\r\n"[2 - self._crlf :]
                got = data[pos : pos + len(want)]
                if not want.startswith(got):
                    raise Violation(400, "chunk data not followed by CRLF")
                self._crlf -= len(got)
                pos += len(got)
            elif self._trailer is not None:
                found = self._trailer.push(data, pos)
                if found is None:
                    return n
                section, pos = found
                for line in section[2:-4].split(b"\r\n") if len(section) > 4 else ():
                    if _FIELD_LINE.fullmatch(line) is None:
                        raise Violation(400, "invalid trailer field")
                self.done = True
                return pos
            else:
                pos = self._size_line(data, pos)
        return pos

    def _size_line(self, data: bytes, pos: int) -> int:
        nl = data.find(b"\n", pos)
        held = len(self._line)
        if nl == -1:
            if held + len(data) - pos > MAX_CHUNK_LINE:
                raise Violation(400, "chunk-size line too long")
            self._line += memoryview(data)[pos:]
            return len(data)
        if held + nl + 1 - pos > MAX_CHUNK_LINE:
            raise Violation(400, "chunk-size line too long")
        if held:
            line = bytes(self._line) + data[pos : nl + 1]
            self._line.clear()
        else:
            line = data[pos : nl + 1]
        match = _CHUNK_LINE.fullmatch(line)
        if match is None:
            raise Violation(400, "invalid chunk-size line")
        size = int(match[1], 16)
        if size:
            self._remaining = size
        else:
            # The CRLF closing the last-chunk line starts the search for the blank line.
            self._trailer = HeadBuffer(self._limit, seed=b"\r\n")
        return nl + 1
