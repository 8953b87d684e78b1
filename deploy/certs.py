"""Development certificate authority: ``rmiot certs dev`` and ``rmiot certs issue``.

Files under ``<data_dir>/certs``: ``ca.crt``/``ca.key`` (the CA), ``server.crt``/
``server.key`` (every TLS listener; names localhost, 127.0.0.1, ::1 and this
host), ``operator.crt``/``operator.key`` (the operator's client certificate,
used by ``rmiot status``), and one ``<name>.crt``/``<name>.key`` per client
certificate issued. A client
certificate says who holds it: the subject's OU is its kind (``platform`` for a
hospital platform, ``vendor``, ``operator``) and a URI SAN
``urn:rmiot:tenant:<id>`` names the tenant subtree it speaks for.

ECDSA P-256 keeps handshakes cheap. This CA is for development and tests; in
production the commission's own CA issues these (the same fields apply).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CLIENT_KINDS = ("platform", "vendor", "operator")
TENANT_URI = "urn:rmiot:tenant:"


class CertError(Exception):
    pass


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _load(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    if not (directory / "ca.key").exists():
        raise CertError(f"no certificate authority in {directory}: run 'rmiot certs dev' first")
    cert = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
    key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertError(f"{directory / 'ca.key'} is not an EC private key")
    return cert, key


def ensure_dev_ca(directory: Path, force: bool = False) -> list[str]:
    """Create the CA and the server certificate where missing; returns what was written."""
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    written = []
    if force or not (directory / "ca.crt").exists():
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "rmiot"),
                          x509.NameAttribute(NameOID.COMMON_NAME, "rmiot development CA")])
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(_now() - dt.timedelta(minutes=5))
                .not_valid_after(_now() + dt.timedelta(days=3650))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(False, False, False, False, False, True, True,
                                             False, False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                               critical=False)
                .sign(key, hashes.SHA256()))
        _write_key(directory / "ca.key", key)
        _write_cert(directory / "ca.crt", cert)
        written.append("ca.crt")
        force = True
    if force or not (directory / "server.crt").exists():
        names: list[x509.GeneralName] = [
            x509.DNSName("localhost"), x509.DNSName(socket.gethostname()),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1"))]
        _issue(directory, "server", "rmiot server", names, server=True)
        written.append("server.crt")
    if force or not (directory / "operator.crt").exists():
        # The operator's own client certificate: rmiot status checks the mTLS port with it.
        issue_client(directory, "operator", "operator")
        written.append("operator.crt")
    return written


def issue_client(directory: Path, name: str, kind: str, tenant: int | None = None) -> Path:
    """Issue a client certificate ``<name>.crt`` for a platform, vendor or operator."""
    if kind not in CLIENT_KINDS:
        raise CertError(f"kind must be one of {', '.join(CLIENT_KINDS)}")
    if not name.replace("-", "").replace("_", "").isalnum():
        raise CertError("name may hold letters, digits, - and _ only")
    names: list[x509.GeneralName] = []
    if tenant is not None:
        names.append(x509.UniformResourceIdentifier(f"{TENANT_URI}{tenant}"))
    _issue(directory, name, name, names, server=False, unit=kind)
    return directory / f"{name}.crt"


def _issue(directory: Path, filename: str, common_name: str, names: list[x509.GeneralName],
           *, server: bool, unit: str | None = None) -> None:
    ca_cert, ca_key = _load(directory)
    key = ec.generate_private_key(ec.SECP256R1())
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "rmiot")]
    if unit:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit))
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (x509.CertificateBuilder().subject_name(x509.Name(attrs))
               .issuer_name(ca_cert.subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(_now() - dt.timedelta(minutes=5))
               .not_valid_after(_now() + dt.timedelta(days=825))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                   ca_key.public_key()), critical=False))
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    _write_key(directory / f"{filename}.key", key)
    _write_cert(directory / f"{filename}.crt", cert)
