"""Tests for ingress.tls: SNI selection and protocol policy over real sockets, the self-signed
state directory's life cycle, and the errors a bad certificate or key file gives."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import logging
import os
import ssl
import stat
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trustme
import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ingress.tls import TLSConfigError, default_state_dir, self_signed_context, server_context

T = TypeVar("T")
Run = Callable[[Coroutine[Any, Any, T]], T]

RESPONSE = b"tidegate says hi\n"


@pytest.fixture(
    params=[
        pytest.param(asyncio.new_event_loop, id="asyncio"),
        pytest.param(uvloop.new_event_loop, id="uvloop"),
    ]
)
def run(request: pytest.FixtureRequest) -> Run[Any]:
    """Run a coroutine to completion on a fresh loop of the parametrized kind."""

    def runner(coro: Coroutine[Any, Any, T]) -> T:
        with asyncio.Runner(loop_factory=request.param) as r:
            return r.run(coro)

    return runner


@dataclass(frozen=True)
class Handshake:
    cert_der: bytes
    alpn: str | None
    body: bytes


async def handshake(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, server_hostname: str | None
) -> Handshake:
    """Serve RESPONSE over TLS on 127.0.0.1:0, connect once and report what the client saw."""

    async def respond(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(RESPONSE)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(respond, "127.0.0.1", 0, ssl=server_ctx)
    async with server:
        port = server.sockets[0].getsockname()[1]
        # With server_hostname None asyncio uses the host, and an IP literal is never sent as
        # SNI, so None means "no SNI".
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_ctx, server_hostname=server_hostname
        )
        try:
            body = await reader.read()
            obj = writer.get_extra_info("ssl_object")
            der = obj.getpeercert(binary_form=True)
            return Handshake(cert_der=der, alpn=obj.selected_alpn_protocol(), body=body)
        finally:
            writer.close()


def _der(blob: trustme.Blob) -> bytes:
    return x509.load_pem_x509_certificate(blob.bytes()).public_bytes(serialization.Encoding.DER)


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path
    der: bytes


def _write_pair(directory: Path, name: str, leaf: trustme.LeafCert) -> Pair:
    cert, key = directory / f"{name}.pem", directory / f"{name}-key.pem"
    for i, blob in enumerate(leaf.cert_chain_pems):
        blob.write_to_path(str(cert), append=i > 0)
    leaf.private_key_pem.write_to_path(str(key))
    return Pair(cert, key, _der(leaf.cert_chain_pems[0]))


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def pairs(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Pair]:
    """Four pairs; the wildcard comes before the exact names to show exact wins regardless."""
    d = tmp_path_factory.mktemp("pairs")
    return {
        "default": _write_pair(d, "default", ca.issue_cert("default.example.net")),
        "wild": _write_pair(d, "wild", ca.issue_cert("*.example.com")),
        "a": _write_pair(d, "a", ca.issue_cert("a.example.com")),
        "b": _write_pair(d, "b", ca.issue_cert("b.example.com")),
    }


@pytest.fixture(scope="module")
def multi_ctx(pairs: dict[str, Pair]) -> ssl.SSLContext:
    return server_context([(str(p.cert), str(p.key)) for p in pairs.values()])


@pytest.fixture
def client_ctx(ca: trustme.CA) -> ssl.SSLContext:
    """A client trusting the CA that checks the chain but not the name (we assert the cert)."""
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    ctx.check_hostname = False
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    return ctx


# ---------------------------------------------------------------------------------------------
# server_context over real sockets
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("server_name", "expected"),
    [
        pytest.param("a.example.com", "a", id="exact-a"),
        pytest.param("b.example.com", "b", id="exact-b"),
        pytest.param("B.Example.COM", "b", id="case-insensitive"),
        pytest.param("c.example.com", "wild", id="wildcard"),
        pytest.param("x.y.example.com", "default", id="wildcard-is-one-label"),
        pytest.param("example.com", "default", id="wildcard-needs-a-label"),
        pytest.param("unknown.test", "default", id="unknown-name"),
        pytest.param(None, "default", id="no-sni"),
    ],
)
def test_sni_picks_pair(
    run: Run[Handshake],
    multi_ctx: ssl.SSLContext,
    client_ctx: ssl.SSLContext,
    pairs: dict[str, Pair],
    server_name: str | None,
    expected: str,
) -> None:
    """The SNI name selects the pair whose SANs match it, else the first pair serves."""
    seen = run(handshake(multi_ctx, client_ctx, server_name))
    assert seen.cert_der == pairs[expected].der
    assert seen.body == RESPONSE


def test_alpn_negotiates_http11_after_sni_swap(
    run: Run[Handshake], multi_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    """A client offering h2 and http/1.1 gets http/1.1, also from a pair picked by SNI."""
    for name in ("default.example.net", "b.example.com"):
        assert run(handshake(multi_ctx, client_ctx, name)).alpn == "http/1.1"


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_tls11_is_refused(
    run: Run[Handshake], multi_ctx: ssl.SSLContext, pairs: dict[str, Pair]
) -> None:
    """A TLS 1.1-only client that a permissive server would accept fails the handshake."""
    if not ssl.HAS_TLSv1_1:
        pytest.skip("this OpenSSL is built without TLS 1.1")

    def tls11(ctx: ssl.SSLContext) -> ssl.SSLContext:
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_1
        # OpenSSL 3 only allows TLS < 1.2 at security level 0.
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        return ctx

    client = tls11(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    control = tls11(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    control.load_cert_chain(pairs["default"].cert, pairs["default"].key)
    try:
        run(handshake(control, client, "a.example.com"))
    except (ssl.SSLError, ConnectionError) as e:
        pytest.skip(f"this OpenSSL cannot negotiate TLS 1.1 even when both sides allow it: {e}")

    with pytest.raises((ssl.SSLError, ConnectionError)):
        run(handshake(multi_ctx, client, "a.example.com"))


def test_expired_certificate_warns_but_loads(
    ca: trustme.CA, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An expired certificate is logged as a warning and still makes a context."""
    now = dt.datetime.now(dt.UTC)
    leaf = ca.issue_cert(
        "old.example.com", not_before=now - dt.timedelta(days=30), not_after=now - dt.timedelta(1)
    )
    pair = _write_pair(tmp_path, "old", leaf)
    with caplog.at_level(logging.WARNING, logger="ingress.tls"):
        assert isinstance(server_context([(str(pair.cert), str(pair.key))]), ssl.SSLContext)
    assert any("expired" in r.message and str(pair.cert) in r.message for r in caplog.records)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "bad", "reason"),
    [
        pytest.param("missing-cert", "cert", "not found", id="missing-cert"),
        pytest.param("missing-key", "key", "not found", id="missing-key"),
        pytest.param("garbage-cert", "cert", "not a PEM certificate", id="garbage-cert"),
        pytest.param("garbage-key", "key", "not a PEM private key", id="garbage-key"),
        pytest.param("key-is-a-cert", "key", "not a PEM private key", id="key-is-a-cert"),
        pytest.param("other-key", "key", "does not match", id="key-does-not-match"),
        pytest.param("cert-is-a-dir", "cert", "directory", id="cert-is-a-directory"),
    ],
)
def test_bad_files_raise_naming_the_file(
    ca: trustme.CA, tmp_path: Path, case: str, bad: str, reason: str
) -> None:
    """Each kind of unusable file raises TLSConfigError naming that file and why."""
    good = _write_pair(tmp_path, "good", ca.issue_cert("good.example.com"))
    other = _write_pair(tmp_path, "other", ca.issue_cert("other.example.com"))
    cert, key = good.cert, good.key
    match case:
        case "missing-cert":
            cert = tmp_path / "nope.pem"
        case "missing-key":
            key = tmp_path / "nope-key.pem"
        case "garbage-cert":
            cert.write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n")
        case "garbage-key":
            key.write_bytes(os.urandom(64))
        case "key-is-a-cert":
            key = other.cert
        case "other-key":
            key = other.key
        case "cert-is-a-dir":
            cert = tmp_path
    with pytest.raises(TLSConfigError) as info:
        server_context([(str(good.cert), str(good.key)), (str(cert), str(key))])
    message = str(info.value)
    assert str(cert if bad == "cert" else key) in message
    assert reason in message


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_key_raises(ca: trustme.CA, tmp_path: Path) -> None:
    """A key file the process may not read raises TLSConfigError saying so."""
    pair = _write_pair(tmp_path, "p", ca.issue_cert("p.example.com"))
    pair.key.chmod(0)
    with pytest.raises(TLSConfigError, match="permission denied"):
        server_context([(str(pair.cert), str(pair.key))])


def test_no_pairs_raises() -> None:
    """An empty pair list is a configuration error, not an empty context."""
    with pytest.raises(TLSConfigError):
        server_context([])


# ---------------------------------------------------------------------------------------------
# self_signed_context
# ---------------------------------------------------------------------------------------------


def _files(state: Path) -> dict[str, bytes]:
    return {n: (state / n).read_bytes() for n in ("ca.pem", "ca-key.pem", "cert.pem", "key.pem")}


def _leaf(state: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificates((state / "cert.pem").read_bytes())[0]


def _ca(state: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate((state / "ca.pem").read_bytes())


def _sans(cert: x509.Certificate) -> set[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(v) for v in san.get_values_for_type(x509.DNSName)} | {
        str(v) for v in san.get_values_for_type(x509.IPAddress)
    }


def test_self_signed_creates_private_state(tmp_path: Path) -> None:
    """A fresh state directory is made 0700 with both keys 0600 and a leaf chained to the CA."""
    state = tmp_path / "state" / "tls"
    self_signed_context(state)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in state.iterdir()}
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert modes["ca-key.pem"] == modes["key.pem"] == 0o600
    assert modes["ca.pem"] == modes["cert.pem"] == 0o644
    assert not [n for n in modes if n.endswith(".tmp")]
    chain = x509.load_pem_x509_certificates((state / "cert.pem").read_bytes())
    assert chain[1:] == [_ca(state)]
    chain[0].verify_directly_issued_by(chain[1])
    assert _sans(chain[0]) == {"localhost", "127.0.0.1", "::1"}
    lifetime = chain[0].not_valid_after_utc - chain[0].not_valid_before_utc
    assert lifetime <= dt.timedelta(days=397)


@pytest.mark.parametrize("server_hostname", ["localhost", "127.0.0.1"])
def test_self_signed_verifies_with_hostname_check(
    run: Run[Handshake], tmp_path: Path, server_hostname: str
) -> None:
    """A client trusting only ca.pem, checking the hostname, connects by name and by IP."""
    server = self_signed_context(tmp_path)
    client = ssl.create_default_context(cafile=tmp_path / "ca.pem")
    assert client.check_hostname
    seen = run(handshake(server, client, server_hostname))
    assert seen.body == RESPONSE
    assert seen.cert_der == _leaf(tmp_path).public_bytes(serialization.Encoding.DER)


def test_self_signed_reuses_state(tmp_path: Path) -> None:
    """A second start with the same names leaves every file byte for byte as it was."""
    self_signed_context(tmp_path, ["localhost", "app.test"])
    before = _files(tmp_path)
    self_signed_context(tmp_path, ["APP.test", "localhost"])
    assert _files(tmp_path) == before


def test_changed_hostnames_reissue_leaf_under_same_ca(tmp_path: Path) -> None:
    """Asking for other names re-issues the leaf but keeps the CA clients already trust."""
    self_signed_context(tmp_path, ["localhost"])
    before = _files(tmp_path)
    self_signed_context(tmp_path, ["localhost", "app.test", "10.0.0.5"])
    after = _files(tmp_path)
    assert after["ca.pem"] == before["ca.pem"]
    assert after["ca-key.pem"] == before["ca-key.pem"]
    assert after["cert.pem"] != before["cert.pem"]
    leaf = _leaf(tmp_path)
    leaf.verify_directly_issued_by(_ca(tmp_path))
    assert _sans(leaf) == {"localhost", "app.test", "10.0.0.5", "127.0.0.1", "::1"}


def _plant_leaf(state: Path, days_left: int, *, foreign_ca: bool) -> int:
    """Write a leaf for the default names expiring in days_left; return its serial."""
    ca = _ca(state)
    if foreign_ca:
        signer = ec.generate_private_key(ec.SECP256R1())
    else:
        loaded = serialization.load_pem_private_key((state / "ca-key.pem").read_bytes(), None)
        assert isinstance(loaded, ec.EllipticCurvePrivateKey)
        signer = loaded
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    sans: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=300))
        .not_valid_after(now + dt.timedelta(days=days_left))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(signer, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    (state / "cert.pem").write_bytes(leaf.public_bytes(pem) + ca.public_bytes(pem))
    (state / "key.pem").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return leaf.serial_number


@pytest.mark.parametrize(
    ("days_left", "foreign_ca", "reissued"),
    [
        pytest.param(10, False, True, id="expires-in-10-days"),
        pytest.param(100, False, False, id="expires-in-100-days"),
        pytest.param(100, True, True, id="signed-by-another-ca"),
    ],
)
def test_planted_leaf_is_kept_or_reissued(
    tmp_path: Path, days_left: int, foreign_ca: bool, reissued: bool
) -> None:
    """A leaf near expiry or not from our CA is re-issued by the same CA; a good one is kept."""
    self_signed_context(tmp_path)
    ca_before = (tmp_path / "ca.pem").read_bytes()
    planted = _plant_leaf(tmp_path, days_left, foreign_ca=foreign_ca)
    self_signed_context(tmp_path)
    leaf = _leaf(tmp_path)
    assert (leaf.serial_number != planted) is reissued
    assert (tmp_path / "ca.pem").read_bytes() == ca_before
    if reissued:
        leaf.verify_directly_issued_by(_ca(tmp_path))
        assert leaf.not_valid_after_utc > dt.datetime.now(dt.UTC) + dt.timedelta(days=300)


def test_mismatched_leaf_key_is_reissued(tmp_path: Path) -> None:
    """A key.pem that does not belong to cert.pem (a torn write) gets a fresh leaf and key."""
    self_signed_context(tmp_path)
    before = _files(tmp_path)
    (tmp_path / "key.pem").write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    self_signed_context(tmp_path)
    after = _files(tmp_path)
    assert after["cert.pem"] != before["cert.pem"]
    assert after["ca.pem"] == before["ca.pem"]


def test_ca_without_its_key_is_an_error(tmp_path: Path) -> None:
    """A ca.pem whose key is gone raises instead of silently replacing a CA clients trust."""
    self_signed_context(tmp_path)
    (tmp_path / "ca-key.pem").unlink()
    with pytest.raises(TLSConfigError, match=r"ca-key\.pem: file not found"):
        self_signed_context(tmp_path)


# ---------------------------------------------------------------------------------------------
# default_state_dir
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "euid", "expected"),
    [
        pytest.param(
            {"STATE_DIRECTORY": "/var/lib/tg:/var/lib/other", "XDG_STATE_HOME": "/x"},
            1000,
            "/var/lib/tg/tls",
            id="systemd-first-entry",
        ),
        pytest.param({}, 0, "/var/lib/tidegate/tls", id="root"),
        pytest.param({"XDG_STATE_HOME": "/xdg"}, 1000, "/xdg/tidegate/tls", id="xdg"),
        pytest.param(
            {"XDG_STATE_HOME": "rel"}, 1000, "HOME/.local/state/tidegate/tls", id="xdg-relative"
        ),
        pytest.param({}, 1000, "HOME/.local/state/tidegate/tls", id="home"),
    ],
)
def test_default_state_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, env: dict[str, str], euid: int, expected: str
) -> None:
    """The state directory follows systemd, then root's /var/lib, then the XDG spec."""
    for name in ("STATE_DIRECTORY", "XDG_STATE_HOME"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(os, "geteuid", lambda: euid)
    assert default_state_dir() == Path(expected.replace("HOME", str(tmp_path)))


# ---------------------------------------------------------------------------------------------
# reload (SIGHUP): renewed certificates, same listener
# ---------------------------------------------------------------------------------------------


async def _peer_der(port: int, client_ctx: ssl.SSLContext, server_name: str | None) -> bytes:
    _reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=client_ctx, server_hostname=server_name
    )
    try:
        der: bytes = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        return der
    finally:
        writer.close()


async def test_reload_serves_renewed_certificates_on_the_same_listener(
    ca: trustme.CA, tmp_path: Path, client_ctx: ssl.SSLContext
) -> None:
    from ingress.server import Ingress, IngressSettings

    first = _write_pair(tmp_path, "site", ca.issue_cert("site.example.com"))
    other = _write_pair(tmp_path, "other", ca.issue_cert("other.example.com"))
    ingress = Ingress(
        IngressSettings(
            listen=[],
            tls_listen=["127.0.0.1:0"],
            tls_certs=[(str(first.cert), str(first.key)), (str(other.cert), str(other.key))],
            metrics_listen=None,
        )
    )
    try:
        await ingress.start()
        port = ingress.https_addresses[0][1]
        assert await _peer_der(port, client_ctx, "site.example.com") == first.der
        renewed = _write_pair(tmp_path, "site", ca.issue_cert("site.example.com"))  # in place
        renewed_other = _write_pair(tmp_path, "other", ca.issue_cert("other.example.com"))
        assert renewed.der != first.der
        assert await _peer_der(port, client_ctx, "site.example.com") == first.der  # not yet
        assert ingress.reload_tls()
        assert await _peer_der(port, client_ctx, "site.example.com") == renewed.der
        assert await _peer_der(port, client_ctx, None) == renewed.der  # the default pair
        assert await _peer_der(port, client_ctx, "other.example.com") == renewed_other.der
        first.key.write_text("not a key")
        with pytest.raises(TLSConfigError):
            ingress.reload_tls()
        assert await _peer_der(port, client_ctx, "site.example.com") == renewed.der  # kept
    finally:
        await ingress.close()
