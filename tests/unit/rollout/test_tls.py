"""The per-deploy CA (rollout/tls.py): a real chain the stdlib verifies, one per deploy, the
key never printed."""

from __future__ import annotations

import base64
import ipaddress
import json
import logging
import socket
import ssl
import threading

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from rollout import redact, tls
from rollout.seed import Credentials, SeedParams, render_user_data


def test_server_certificate_names_the_front_and_is_signed_by_the_deploys_ca():
    m = tls.generate("10.87.42.200")
    ca = x509.load_pem_x509_certificate(m.ca_pem.encode())
    cert = x509.load_pem_x509_certificate(m.cert_pem.encode())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("10.87.42.200"), ipaddress.ip_address("127.0.0.1")}
    assert san.get_values_for_type(x509.DNSName) == [tls.SERVER_NAME]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert "PRIVATE KEY" in m.key_pem and "PRIVATE KEY" not in m.ca_pem + m.cert_pem


def test_every_deploy_gets_its_own_ca():
    a, b = tls.generate("10.0.0.1"), tls.generate("10.0.0.1")
    assert a.ca_pem != b.ca_pem and a.key_pem != b.key_pem
    cert_a = x509.load_pem_x509_certificate(a.cert_pem.encode())
    with pytest.raises(Exception):  # noqa: B017 - any verification error
        cert_a.verify_directly_issued_by(x509.load_pem_x509_certificate(b.ca_pem.encode()))


def _serve_once(m: tls.TLSMaterial, tmp_path) -> int:
    (tmp_path / "cert.pem").write_text(m.cert_pem)
    (tmp_path / "key.pem").write_text(m.key_pem)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    srv = socket.create_server(("127.0.0.1", 0))

    def run():
        with srv:
            conn, _ = srv.accept()
            try:
                with ctx.wrap_socket(conn, server_side=True) as s:
                    s.sendall(b"ok")
            except (ssl.SSLError, OSError):
                pass

    threading.Thread(target=run, daemon=True).start()
    return srv.getsockname()[1]


def _client(ca_pem: str, port: int, tmp_path, *, hostname: str = "127.0.0.1") -> bytes:
    (tmp_path / "ca.pem").write_text(ca_pem)
    ctx = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock, \
            ctx.wrap_socket(sock, server_hostname=hostname) as s:
        return s.recv(2)


def test_a_client_trusting_the_deploys_ca_verifies_the_front(tmp_path):
    m = tls.generate("10.0.0.9")
    assert _client(m.ca_pem, _serve_once(m, tmp_path), tmp_path) == b"ok"


def test_another_deploys_ca_or_address_is_refused(tmp_path):
    m, other = tls.generate("10.0.0.9"), tls.generate("10.0.0.9")
    with pytest.raises(ssl.SSLCertVerificationError):
        _client(other.ca_pem, _serve_once(m, tmp_path), tmp_path)
    with pytest.raises(ssl.SSLCertVerificationError):  # an address the cert does not name
        _client(m.ca_pem, _serve_once(m, tmp_path), tmp_path, hostname="10.0.0.10")


def test_the_key_never_reaches_a_log_line_nor_a_repr():
    m = tls.generate("10.0.0.9")
    creds = Credentials.generate()
    params = SeedParams(role="front", colour="blue", release="r1", deploy_id="d1", env="dev",
                        credentials=creds, broker_bind="0.0.0.0", broker_peers=("10.0.0.8",),
                        tls=m)
    seed = render_user_data(params)
    body = "".join(tls.secret_lines(m.key_pem)[:-1])
    assert body not in repr(m) + repr(params)
    # the seed as -v output would show it: YAML text, JSON-escaped, and base64 in user_data
    for line in (seed, json.dumps({"x": seed}),
                 json.dumps({"user_data": base64.b64encode(seed.encode()).decode()})):
        clean = redact.redact(line)
        assert all(part not in clean for part in tls.secret_lines(m.key_pem)), line[:80]
        assert creds.broker_password not in clean
    assert m.ca_pem.splitlines()[1] in redact.redact(seed)  # certificates are public


def test_the_log_filter_masks_the_key(caplog):
    m = tls.generate(None)
    logger = logging.getLogger("modelserve.test.tls")
    with caplog.at_level(logging.INFO, logger=logger.name):
        handler = logging.StreamHandler()
        handler.addFilter(redact.RedactFilter())
        seen = []
        handler.emit = seen.append
        logger.addHandler(handler)
        try:
            logger.warning("seed: %s", m.key_pem)
        finally:
            logger.removeHandler(handler)
    assert "PRIVATE KEY" in seen[0].getMessage()
    assert all(p not in seen[0].getMessage() for p in tls.secret_lines(m.key_pem))
