"""A per-deploy certificate authority for the broker path (AMQP and Redis over TLS).

``--workers N`` puts the front's RabbitMQ and Redis on the network. Each deploy generates a
fresh CA (ECDSA P-256) and signs exactly one server certificate with it, for the front: its
subject alternative names are the front's fixed address (when the cloud tells it before the
launch) and 127.0.0.1 (the front's own clients). The CA's key is never written anywhere: it
lives in this process until the certificate is signed, so nothing else can ever be issued
under this CA, and a worker that trusts it (and only it) talks to this deploy's front only.

The seed delivers the CA certificate to every instance of the release, and the server
certificate and key to the front (rollout/seed.py); none of it is baked or kept in the repo.
The key's PEM body is registered with ``redact`` so it is masked in every log line.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass

from rollout import redact

#: the DNS name every front certificate carries (a name no resolver answers)
SERVER_NAME = "modelserve-broker.invalid"
#: certificates outlive any release kept warm for rollback; the CA key is gone after signing
VALID_DAYS = 3650


@dataclass(frozen=True)
class TLSMaterial:
    """PEM text: the deploy's CA certificate, and the front's certificate and key."""

    ca_pem: str
    cert_pem: str
    key_pem: str
    server_ip: str | None  # the front address in the certificate (None: not known beforehand)

    def __post_init__(self) -> None:
        redact.register(*secret_lines(self.key_pem))

    def __repr__(self) -> str:  # never print the key
        return f"TLSMaterial(server_ip={self.server_ip!r}, ...)"


def secret_lines(pem: str) -> list[str]:
    """The base64 lines of a PEM body (what must never appear in a log), and their join."""
    body = [line.strip() for line in pem.splitlines()
            if line.strip() and not line.startswith("-----")]
    return body + ["".join(body)]


def generate(server_ip: str | None, *, now: dt.datetime | None = None) -> TLSMaterial:
    """A fresh CA and a server certificate for ``server_ip`` (plus 127.0.0.1 and
    SERVER_NAME), signed by it; the CA key is dropped on return."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = now or dt.datetime.now(dt.timezone.utc)
    start, end = now - dt.timedelta(minutes=5), now + dt.timedelta(days=VALID_DAYS)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "modelserve"),
                         x509.NameAttribute(NameOID.COMMON_NAME, "modelserve deploy CA")])
    ca = (x509.CertificateBuilder()
          .subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, key_cert_sign=True, crl_sign=True,
                                       encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))

    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName(SERVER_NAME),
                                     x509.IPAddress(ipaddress.IPv4Address("127.0.0.1"))]
    if server_ip:
        names.insert(0, x509.IPAddress(ipaddress.ip_address(server_ip)))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "modelserve"),
                                     x509.NameAttribute(NameOID.COMMON_NAME, SERVER_NAME)]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=True, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    return TLSMaterial(ca_pem=ca.public_bytes(pem).decode(), cert_pem=cert.public_bytes(pem).decode(),
                       key_pem=key_pem, server_ip=server_ip)
