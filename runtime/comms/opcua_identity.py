"""The OPC UA server's identity: one certificate a PLC trusts once, kept for years.

asyncua's helper makes a new self-signed certificate whenever the old one expires or the host name changes: a new
identity, silently, that every PLC must trust again. Here the certificate is made once (on first start, if neither
file exists), never replaced by the runtime, warned about in the log before it expires, and renewed with the same
private key only when an operator runs `coft opcua-certificate --renew`. Its subject alternative names carry the
application URI, the box's host names and its IP addresses, which PLCs check against the endpoint they dialled.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import socket
from pathlib import Path

import psutil
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from coft.runtime.model.errors import CoftError

log = logging.getLogger(__name__)

VALID_DAYS = 10 * 365
WARN_DAYS = 60  # a renewal needs each PLC's trust list updated: say so two months ahead


def box_addresses() -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The box's own IP addresses (loopback and link-local left out): what a PLC may dial."""
    found = []
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            ip = ipaddress.ip_address(address.address.split("%")[0])
            if not (ip.is_loopback or ip.is_link_local) and ip not in found:
                found.append(ip)
    return found


def host_names() -> list[str]:
    names = [socket.gethostname()]
    fqdn = socket.getfqdn()
    return names + ([fqdn] if fqdn not in names and fqdn != "localhost" else [])


def _issue(key: rsa.RSAPrivateKey, uri: str, name: str) -> x509.Certificate:
    """A self-signed application instance certificate (OPC 10000-6, 6.2.2) for this box, with `key`."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, "coft")])
    now = datetime.datetime.now(datetime.timezone.utc)
    alternative = [x509.UniformResourceIdentifier(uri), *map(x509.DNSName, host_names()),
                   *map(x509.IPAddress, box_addresses())]
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
            .add_extension(x509.SubjectAlternativeName(alternative), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=True, key_encipherment=True,
                                         data_encipherment=True, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))


def _load_key(path: Path) -> rsa.RSAPrivateKey:
    try:
        return serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise CoftError(f"opcua.private_key: {path} is not a readable PEM private key without a passphrase "
                        f"({getattr(exc, 'strerror', None) or str(exc).splitlines()[0]})") from None


def load_certificate(path: Path) -> x509.Certificate:
    try:
        return x509.load_der_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise CoftError(f"opcua.certificate: {path} is not a readable DER certificate "
                        f"({getattr(exc, 'strerror', None) or str(exc).splitlines()[0]}); restore it from a backup, "
                        "or delete it and the private key to make a new identity every PLC must trust again") from None


def _write(certificate_path: Path, key_path: Path, key: rsa.RSAPrivateKey | None,
           certificate: x509.Certificate) -> None:
    if key is not None:
        key_path.parent.mkdir(parents=True, exist_ok=True)
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        key_path.chmod(0o600)
    certificate_path.parent.mkdir(parents=True, exist_ok=True)
    certificate_path.write_bytes(certificate.public_bytes(serialization.Encoding.DER))


def days_left(certificate: x509.Certificate) -> float:
    return (certificate.not_valid_after_utc - datetime.datetime.now(datetime.timezone.utc)).total_seconds() / 86400


def ensure(certificate_path: Path, key_path: Path, uri: str, name: str) -> x509.Certificate:
    """The server's certificate: made on first start, otherwise the one on disk as it is, with a warning before it
    expires (an expired one is still served, loudly: refusing to start would stop the line, and PLCs decide)."""
    if not key_path.exists() and not certificate_path.exists():
        _write(certificate_path, key_path, key := rsa.generate_private_key(public_exponent=65537, key_size=2048),
               certificate := _issue(key, uri, name))
        log.info("opcua: made the server certificate %s (SHA-256 %s, valid until %s): trust it in each PLC",
                 certificate_path, fingerprint_text(certificate), certificate.not_valid_after_utc.date())
        return certificate
    if not key_path.exists():
        raise CoftError(f"opcua.private_key: {key_path} is missing but the certificate {certificate_path} exists; "
                        "restore the key, or delete the certificate too to make a new identity")
    key = _load_key(key_path)
    if not certificate_path.exists():  # the key is the identity a renewal keeps: issue for it
        _write(certificate_path, key_path, None, certificate := _issue(key, uri, name))
        log.info("opcua: issued a certificate for the existing private key %s", key_path)
        return certificate
    return verify(certificate_path, key_path, key)


def verify(certificate_path: Path, key_path: Path, key: rsa.RSAPrivateKey | None = None) -> x509.Certificate:
    """The certificate on disk, checked against its key, with the log's warning or error about its expiry."""
    key = key or _load_key(key_path)
    certificate = load_certificate(certificate_path)
    if certificate.public_key().public_numbers() != key.public_key().public_numbers():
        raise CoftError(f"opcua.certificate: {certificate_path} does not belong to the private key {key_path}; "
                        "restore the matching pair from a backup")
    left = days_left(certificate)
    if left <= 0:
        log.error("opcua: the server certificate %s expired on %s: PLCs will refuse it; run `coft "
                  "opcua-certificate --config LINE.yaml --renew` (same key) and update each PLC's trust list",
                  certificate_path, certificate.not_valid_after_utc.date())
    elif left <= WARN_DAYS:
        log.warning("opcua: the server certificate %s expires on %s (in %d days); run `coft opcua-certificate "
                    "--config LINE.yaml --renew` (same key) and update each PLC's trust list before then",
                    certificate_path, certificate.not_valid_after_utc.date(), left)
    return certificate


def renew(certificate_path: Path, key_path: Path, uri: str, name: str) -> x509.Certificate:
    """An operator's renewal: a new certificate for the same private key, with today's names and addresses."""
    if not key_path.exists():
        raise CoftError(f"opcua.private_key: {key_path} does not exist: there is no identity to renew "
                        "(the runtime makes one on first start)")
    _write(certificate_path, key_path, None, certificate := _issue(_load_key(key_path), uri, name))
    return certificate


def fingerprint_text(certificate: x509.Certificate) -> str:
    return certificate.fingerprint(hashes.SHA256()).hex(":").upper()


def describe(certificate: x509.Certificate) -> str:
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return (f"subject {certificate.subject.rfc4514_string()}\nSHA-256 {fingerprint_text(certificate)}\n"
            f"valid {certificate.not_valid_before_utc:%Y-%m-%d} to {certificate.not_valid_after_utc:%Y-%m-%d} "
            f"({days_left(certificate):.0f} days left)\n"
            f"URI {', '.join(names.get_values_for_type(x509.UniformResourceIdentifier))}\n"
            f"DNS {', '.join(names.get_values_for_type(x509.DNSName))}\n"
            f"IP {', '.join(map(str, names.get_values_for_type(x509.IPAddress))) or '-'}")
