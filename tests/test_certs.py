"""The development CA: chains verify, client certificates say who they are."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from rmiot.deploy import certs


def test_dev_ca_issues_verifiable_server_and_client_certificates(tmp_path: Path) -> None:
    assert certs.ensure_dev_ca(tmp_path) == ["ca.crt", "server.crt", "operator.crt"]
    assert certs.ensure_dev_ca(tmp_path) == []  # idempotent
    assert oct((tmp_path / "ca.key").stat().st_mode & 0o777) == "0o600"
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((tmp_path / "server.crt").read_bytes())
    server.verify_directly_issued_by(ca)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in sans.get_values_for_type(x509.DNSName)

    path = certs.issue_client(tmp_path, "hospital-12", "platform", tenant=12)
    client = x509.load_pem_x509_certificate(path.read_bytes())
    client.verify_directly_issued_by(ca)
    unit = client.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    assert unit[0].value == "platform"
    uris = client.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert uris.get_values_for_type(x509.UniformResourceIdentifier) == ["urn:rmiot:tenant:12"]
    usage = client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_bad_requests_are_refused(tmp_path: Path) -> None:
    with pytest.raises(certs.CertError, match="rmiot certs dev"):
        certs.issue_client(tmp_path, "x", "vendor")
    certs.ensure_dev_ca(tmp_path)
    with pytest.raises(certs.CertError, match="kind"):
        certs.issue_client(tmp_path, "x", "admin")
    with pytest.raises(certs.CertError, match="name"):
        certs.issue_client(tmp_path, "../x", "vendor")
