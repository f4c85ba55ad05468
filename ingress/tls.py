"""TLS server contexts for the ingress: operator certificates picked by SNI, or a local CA.

:func:`server_context` turns ``--tls-cert``/``--tls-key`` pairs into one :class:`ssl.SSLContext`
for the listener. :func:`self_signed_context` backs ``--tls-self-signed`` with a CA and a leaf
kept in a state directory (:func:`default_state_dir`), so a client that trusted the CA once keeps
working across restarts.

Rules:

- Every file is checked before OpenSSL sees it, and a bad one raises :class:`TLSConfigError`
  naming the file and the reason. An expired certificate only logs a warning, as nginx and Caddy
  do: refusing to start would turn a late renewal into an outage of every route, HTTP included.
- The first pair is the default. During the handshake the SNI name picks the pair whose
  certificate lists it as a SAN DNS name, exactly or through a single-label wildcard
  (``*.example.com`` matches ``a.example.com``, never ``x.y.example.com``; RFC 6125 §6.4.3),
  case-insensitively. An exact name beats a wildcard; between pairs the earlier one wins. The
  name index is built once, so a handshake costs two dict lookups.
- TLS 1.2 is the minimum (RFC 8996 deprecates 1.0 and 1.1), ALPN offers only ``http/1.1``,
  compression (CRIME) and renegotiation (a client-driven CPU cost) are off, the cipher list is
  Python's default with the server's preference. No client certificates are asked for.
- The self-signed state is written atomically (temp file, fsync, rename) under a lock, the
  directory is 0700 and key files 0600. A leaf that is missing, broken, not signed by the CA,
  for other names or within 30 days of expiry is re-issued; the CA is kept unless it is missing
  or itself within 30 days of expiry.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import ipaddress
import logging
import os
import socket
import ssl
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from itertools import pairwise
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ingress.paths import state_root

__all__ = ["TLSConfigError", "default_state_dir", "self_signed_context", "server_context"]

log = logging.getLogger(__name__)

# Only HTTP/1.1 is spoken; a client offering just h2 gets no ALPN answer and may fall back.
ALPN_PROTOCOLS = ["http/1.1"]

# The local CA outlives many leaves so clients trust it once. The leaf stays under Apple's
# 398-day cap for TLS server certificates (Apple HT211025), and is renewed this long before it
# expires, as ACME clients such as certbot do.
CA_LIFETIME = dt.timedelta(days=3650)
LEAF_LIFETIME = dt.timedelta(days=365)
RENEW_BEFORE = dt.timedelta(days=30)
# Backdate notBefore so a client whose clock runs a little behind still accepts a fresh cert.
CLOCK_SKEW = dt.timedelta(hours=1)

# Names of the files in the self-signed state directory.
CA_CERT, CA_KEY, LEAF_CERT, LEAF_KEY = "ca.pem", "ca-key.pem", "cert.pem", "key.pem"
_LOOPBACK_IPS = (ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"))

_IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class TLSConfigError(ValueError):
    """A certificate or key file cannot be used; the message names the file and the reason."""


# ---------------------------------------------------------------------------------------------
# Operator certificates
# ---------------------------------------------------------------------------------------------


def server_context(pairs: Sequence[tuple[str, str]]) -> ssl.SSLContext:
    """Return the listener's context for ``(cert_file, key_file)`` pairs, the first the default.

    A cert file may hold the chain after the leaf. The other pairs are chosen by SNI (see the
    module docstring). Raises :class:`TLSConfigError` for a missing, unreadable, non-PEM,
    encrypted or mismatched file.
    """
    if not pairs:
        raise TLSConfigError("no certificate given: need at least one (cert_file, key_file) pair")
    now = dt.datetime.now(dt.UTC)
    contexts: list[ssl.SSLContext] = []
    exact: dict[str, ssl.SSLContext] = {}
    wildcard: dict[str, ssl.SSLContext] = {}  # "example.com" for "*.example.com"
    for cert_file, key_file in pairs:
        leaf = _check_pair(cert_file, key_file, now)
        ctx = _new_context(cert_file, key_file)
        contexts.append(ctx)
        for name in _san_dns_names(leaf):
            if name.startswith("*."):
                wildcard.setdefault(name[2:], ctx)
            elif "*" not in name:
                # Partial wildcards ("w*.example.com") are ignored: the CA/Browser Forum
                # forbids them and browsers no longer honour them.
                exact.setdefault(name, ctx)

    default = contexts[0]
    if len(contexts) > 1:

        def on_sni(obj: ssl.SSLObject, server_name: str | None, _ctx: ssl.SSLContext) -> None:
            # server_name is None when the client sent no SNI (e.g. it dialled an IP address);
            # the default pair then serves. Python hands over IDNs as A-labels already.
            if server_name is None:
                return
            name = server_name.rstrip(".").lower()
            ctx = exact.get(name)
            if ctx is None:
                _, dot, parent = name.partition(".")
                ctx = wildcard.get(parent) if dot else None
            if ctx is not None and ctx is not default:
                obj.context = ctx

        default.sni_callback = on_sni
    return default


def _new_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_RENEGOTIATION
    ctx.verify_mode = ssl.CERT_NONE
    # Every pair's context carries ALPN: after an SNI swap OpenSSL consults the new context.
    ctx.set_alpn_protocols(ALPN_PROTOCOLS)
    try:
        ctx.load_cert_chain(cert_file, key_file)
    except (ssl.SSLError, OSError) as e:
        raise TLSConfigError(f"{cert_file}: OpenSSL rejected it with {key_file}: {e}") from e
    return ctx


def _check_pair(cert_file: str, key_file: str, now: dt.datetime) -> x509.Certificate:
    """Validate one pair with clear messages before OpenSSL's terse ones; return the leaf."""
    chain = _load_certs(cert_file)
    leaf = chain[0]
    key = _load_key(key_file)
    if _spki(key.public_key()) != _spki(leaf.public_key()):
        raise TLSConfigError(
            f"{key_file}: private key does not match the certificate in {cert_file}"
        )
    if leaf.not_valid_after_utc <= now:
        log.warning(
            "%s: certificate expired on %s; serving it anyway",
            cert_file,
            leaf.not_valid_after_utc.isoformat(),
        )
    elif leaf.not_valid_before_utc > now:
        log.warning(
            "%s: certificate is not valid before %s; serving it anyway",
            cert_file,
            leaf.not_valid_before_utc.isoformat(),
        )
    # OpenSSL sends the chain as written; a misordered one fails in clients, not here.
    for child, parent in pairwise(chain):
        if child.issuer != parent.subject:
            log.warning(
                "%s: chain out of order: %s is not issued by the next certificate %s",
                cert_file,
                child.subject.rfc4514_string(),
                parent.subject.rfc4514_string(),
            )
            break
    return leaf


def _read(path: str | Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise TLSConfigError(f"{path}: file not found") from None
    except PermissionError:
        raise TLSConfigError(f"{path}: not readable (permission denied)") from None
    except IsADirectoryError:
        raise TLSConfigError(f"{path}: is a directory, not a file") from None
    except OSError as e:
        raise TLSConfigError(f"{path}: cannot read: {e.strerror}") from None


def _load_certs(path: str | Path) -> list[x509.Certificate]:
    data = _read(path)
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise TLSConfigError(
            f"{path}: not a PEM certificate (want -----BEGIN CERTIFICATE-----)"
        ) from None


def _load_key(path: str | Path) -> PrivateKeyTypes:
    data = _read(path)
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise TLSConfigError(f"{path}: private key is encrypted; give an unencrypted key") from None
    except (ValueError, UnsupportedAlgorithm):
        raise TLSConfigError(
            f"{path}: not a PEM private key (want -----BEGIN ... PRIVATE KEY-----)"
        ) from None


def _spki(public_key: PublicKeyTypes) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _san_dns_names(cert: x509.Certificate) -> list[str]:
    # SANs only: clients stopped matching the subject CN (RFC 6125 §6.4.4, Chrome 58), so a
    # cert without SANs could not be valid for any SNI name anyway; it can still be the default.
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [name.rstrip(".").lower() for name in san.get_values_for_type(x509.DNSName)]


# ---------------------------------------------------------------------------------------------
# --tls-self-signed
# ---------------------------------------------------------------------------------------------


def default_state_dir() -> Path:
    """Where ``--tls-self-signed`` keeps its CA and leaf: ``tls/`` in tidegate's state
    directory (:func:`ingress.paths.state_root`)."""
    return state_root() / "tls"


def self_signed_context(
    state_dir: Path, hostnames: Sequence[str] = ("localhost",)
) -> ssl.SSLContext:
    """Return a server context over a leaf for ``hostnames`` (+127.0.0.1, ::1) from a local CA.

    The CA (``ca.pem``, ``ca-key.pem``) and the leaf (``cert.pem`` holding leaf + CA,
    ``key.pem``) are reused from ``state_dir`` when still good, else made and written there.
    Raises :class:`TLSConfigError` when ``ca.pem`` exists but its key is missing or wrong: that
    CA may be trusted somewhere, so it is not silently replaced.
    """
    state_dir = Path(state_dir)
    if isinstance(hostnames, str):  # a lone "example.com" must not become seven 1-letter names
        hostnames = (hostnames,)
    dns, ips = _wanted_names(hostnames)
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    # mkdir's mode is masked by the umask and ignored for an existing directory; the CA key
    # lives here, so tighten it either way.
    os.chmod(state_dir, 0o700)
    now = dt.datetime.now(dt.UTC)
    with _locked(state_dir):
        ca_cert, ca_key = _load_or_create_ca(state_dir, now)
        if not _leaf_is_current(state_dir, ca_cert, dns, ips, now):
            leaf, leaf_key = _issue_leaf(ca_cert, ca_key, dns, ips, now)
            # Key first: a crash between the two renames leaves a mismatched pair, which the
            # next start sees and re-issues.
            _write_atomic(state_dir / LEAF_KEY, _key_pem(leaf_key), 0o600)
            _write_atomic(state_dir / LEAF_CERT, _cert_pem(leaf) + _cert_pem(ca_cert), 0o644)
            log.info("%s: issued a certificate for %s", state_dir / LEAF_CERT, ", ".join(dns))
        return server_context([(str(state_dir / LEAF_CERT), str(state_dir / LEAF_KEY))])


def _wanted_names(hostnames: Sequence[str]) -> tuple[frozenset[str], frozenset[_IPAddress]]:
    dns: set[str] = set()
    ips: set[_IPAddress] = set(_LOOPBACK_IPS)
    for raw in hostnames:
        host = raw.strip().rstrip(".").lower()
        try:
            ips.add(ipaddress.ip_address(host.strip("[]")))
            continue
        except ValueError:
            pass
        if not host:
            raise TLSConfigError(f"self-signed certificate: empty hostname in {list(hostnames)}")
        if not host.isascii():
            host = host.encode("idna").decode("ascii")  # SANs hold A-labels (RFC 5280 §7.2)
        dns.add(host)
    return frozenset(dns), frozenset(ips)


def _load_or_create_ca(
    state_dir: Path, now: dt.datetime
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey]:
    cert_path, key_path = state_dir / CA_CERT, state_dir / CA_KEY
    if cert_path.exists():
        try:
            ca_cert = _load_certs(cert_path)[0]
            key = _load_key(key_path)
        except TLSConfigError as e:
            raise TLSConfigError(f"{e}; remove {cert_path} to make a new CA") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise TLSConfigError(f"{key_path}: CA key must be EC or RSA")
        if _spki(key.public_key()) != _spki(ca_cert.public_key()):
            raise TLSConfigError(
                f"{key_path}: does not match {cert_path}; remove both to make a new CA"
            )
        if ca_cert.not_valid_after_utc - RENEW_BEFORE > now:
            return ca_cert, key
        log.warning(
            "%s: local CA expires %s; making a new one, clients must trust the new file",
            cert_path,
            ca_cert.not_valid_after_utc.isoformat(),
        )
    ca_cert, ca_key = _issue_ca(now)
    # Key first: ca.pem appearing is what marks the CA as complete (see the check above).
    _write_atomic(key_path, _key_pem(ca_key), 0o600)
    _write_atomic(cert_path, _cert_pem(ca_cert), 0o644)
    log.info("%s: created a local CA; trust this file in clients", cert_path)
    return ca_cert, ca_key


def _leaf_is_current(
    state_dir: Path,
    ca_cert: x509.Certificate,
    dns: frozenset[str],
    ips: frozenset[_IPAddress],
    now: dt.datetime,
) -> bool:
    """Whether cert.pem/key.pem can be served as they are; any doubt means re-issue."""
    try:
        chain = _load_certs(state_dir / LEAF_CERT)
        key = _load_key(state_dir / LEAF_KEY)
    except TLSConfigError as e:
        if (state_dir / LEAF_CERT).exists() or (state_dir / LEAF_KEY).exists():
            log.warning("%s; issuing a new certificate", e)
        return False
    leaf = chain[0]
    try:
        leaf.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    if chain[1:] != [ca_cert] or _spki(key.public_key()) != _spki(leaf.public_key()):
        return False
    if not leaf.not_valid_before_utc <= now < leaf.not_valid_after_utc - RENEW_BEFORE:
        return False
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    have_dns = {n.lower() for n in san.get_values_for_type(x509.DNSName)}
    have_ips = set(san.get_values_for_type(x509.IPAddress))
    return have_dns == dns and have_ips == ips


def _issue_ca(now: dt.datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    # The host name tells apart the CAs of several machines in a client's trust store.
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "tidegate"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"tidegate local CA ({socket.gethostname()})"),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + CA_LIFETIME)
        # path_length=0: this CA signs leaves only, never another CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _issue_leaf(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
    dns: frozenset[str],
    ips: frozenset[_IPAddress],
    now: dt.datetime,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in sorted(dns)]
    sans += [x509.IPAddress(ip) for ip in sorted(ips, key=lambda ip: (ip.version, int(ip)))]
    common_name = min(dns) if dns else "tidegate"
    # Never outlive the issuer: clients reject a chain once any link has expired.
    not_after = min(now + LEAF_LIFETIME, ca_cert.not_valid_after_utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        # macOS and iOS require serverAuth in the EKU (Apple HT210176).
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Replace ``path`` so a reader sees the old file or the new one, never a partial one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates the file 0600, so a key is never readable by others, even briefly.
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # Make the rename itself durable.
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@contextmanager
def _locked(state_dir: Path) -> Iterator[None]:
    # `tidegate up` and a separately started `tidegate ingress` may share the directory; without
    # the lock both could make a CA at once and one client would trust the loser's.
    fd = os.open(state_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
