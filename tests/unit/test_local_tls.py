"""``cuga tls init``: the local CA and certificates (cuga.cli.tls), no gRPC."""

from __future__ import annotations

import datetime as dt
import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from cuga.cli.main import build_parser, main
from cuga.cli.tls import (
    CLIENT,
    LocalTls,
    ensure_local_tls,
    issue,
    local_identities,
    make_ca,
    read_pair,
)
from cuga.shared.config import SERVICE_NAMES, load_settings

NAMES = (*SERVICE_NAMES, CLIENT)


@pytest.fixture
def local(tmp_path: Path) -> LocalTls:
    return ensure_local_tls(tmp_path / "tls")


def _cert(local: LocalTls, name: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(local.cert_file(name).read_bytes())


def _ca(local: LocalTls) -> x509.Certificate:
    return x509.load_pem_x509_certificate(local.ca_file.read_bytes())


def _verify_server(ca: x509.Certificate, cert: x509.Certificate, host: str) -> None:
    name: x509.GeneralName
    try:
        name = x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        name = x509.DNSName(host)
    verifier = PolicyBuilder().store(Store([ca])).build_server_verifier(name)
    verifier.verify(cert, [])


def _verify_client(ca: x509.Certificate, cert: x509.Certificate) -> None:
    # The Web PKI profile wants a SAN on client certificates too; gRPC (like RFC 5280)
    # identifies a client by its subject CN, so the CLI's certificate has none. Everything
    # else (chain, validity, key usage, EKU clientAuth) is checked as usual.
    ee = ExtensionPolicy.webpki_defaults_ee().may_be_present(
        x509.SubjectAlternativeName, Criticality.AGNOSTIC, None
    )
    builder = PolicyBuilder().store(Store([ca]))
    builder = builder.extension_policies(
        ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=ee
    )
    builder.build_client_verifier().verify(cert, [])


def test_the_ca_is_a_one_year_p256_signing_authority(local: LocalTls) -> None:
    ca = _ca(local)
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and not usage.digital_signature
    key = ca.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
    lifetime = ca.not_valid_after_utc - ca.not_valid_before_utc
    assert dt.timedelta(days=365) <= lifetime <= dt.timedelta(days=366)
    assert ca.issuer == ca.subject
    ca.verify_directly_issued_by(ca)  # self-signed


def test_every_service_certificate_chains_to_the_ca_for_its_names(local: LocalTls) -> None:
    ca = _ca(local)
    for name in SERVICE_NAMES:
        cert = _cert(local, name)
        cert.verify_directly_issued_by(ca)
        assert cert.subject.rfc4514_string() == f"CN={name}"
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == ["localhost", name]
        assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
        assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        for host in ("localhost", "127.0.0.1", name):
            _verify_server(ca, cert, host)
        _verify_client(ca, cert)  # services dial each other with the same certificate
        with pytest.raises(VerificationError):
            _verify_server(ca, cert, "example.com")
        other = "planning" if name != "planning" else "routing"
        with pytest.raises(VerificationError):  # a service cannot pose as another
            _verify_server(ca, cert, other)


def test_the_client_certificate_is_client_only(local: LocalTls) -> None:
    ca = _ca(local)
    cert = _cert(local, CLIENT)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    _verify_client(ca, cert)
    with pytest.raises(VerificationError):
        _verify_server(ca, cert, "localhost")
    ca_pair = read_pair(local.folder, "ca", key_folder=local.ca_key_file.parent)
    server_only = issue(ca_pair, "web", hosts=("localhost",), client=False)
    with pytest.raises(VerificationError):  # the client check does look at the EKU
        _verify_client(ca, server_only[0])


def test_a_certificate_from_another_ca_does_not_verify(local: LocalTls) -> None:
    stranger = issue(make_ca("another CA"), "routing", hosts=("localhost",))[0]
    with pytest.raises(VerificationError):
        _verify_server(_ca(local), stranger, "localhost")


def test_every_file_is_owner_only_and_the_ca_key_apart(local: LocalTls) -> None:
    assert stat.S_IMODE(local.folder.stat().st_mode) == 0o700
    assert local.ca_key_file.parent == local.folder / "ca"
    assert stat.S_IMODE(local.ca_key_file.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(local.ca_key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(local.ca_file.stat().st_mode) == 0o600
    for name in NAMES:
        assert stat.S_IMODE(local.key_file(name).stat().st_mode) == 0o600
        assert stat.S_IMODE(local.cert_file(name).stat().st_mode) == 0o600
        cert, key = read_pair(local.folder, name)
        assert cert.public_key() == key.public_key()  # each key matches its certificate
    ca_cert, ca_key = read_pair(local.folder, "ca", key_folder=local.ca_key_file.parent)
    assert ca_cert.public_key() == ca_key.public_key()
    # Beside the services' files: certificates and their keys, and the CA's certificate.
    assert sorted(p.name for p in local.folder.iterdir()) == sorted(
        ["ca", "ca.pem", *(f"{n}.{ext}" for n in NAMES for ext in ("pem", "key"))]
    )
    assert [p.name for p in local.ca_key_file.parent.iterdir()] == ["ca.key"]
    for name in NAMES:  # no process is configured with a path in the CA key's folder
        assert all(
            local.ca_key_file.parent not in Path(p).parents for p in local.env(name).values()
        )


def test_init_is_idempotent_and_force_makes_everything_anew(local: LocalTls) -> None:
    assert local.written == ("ca", *NAMES)
    before = {p.name: p.read_bytes() for p in local.folder.iterdir() if p.is_file()}
    ca_key = local.ca_key_file.read_bytes()
    again = ensure_local_tls(local.folder)
    assert again.written == ()
    assert {p.name: p.read_bytes() for p in local.folder.iterdir() if p.is_file()} == before
    assert local.ca_key_file.read_bytes() == ca_key

    local.cert_file("worker").unlink()  # a missing certificate is issued by the same CA
    mended = ensure_local_tls(local.folder)
    assert mended.written == ("worker",)
    assert local.ca_file.read_bytes() == before["ca.pem"]
    _verify_server(_ca(local), _cert(local, "worker"), "worker")
    assert local.cert_file("routing").read_bytes() == before["routing.pem"]

    local.ca_key_file.chmod(0o644)
    forced = ensure_local_tls(local.folder, force=True)
    assert forced.written == ("ca", *NAMES)
    assert stat.S_IMODE(local.ca_key_file.stat().st_mode) == 0o600
    assert local.ca_key_file.read_bytes() != ca_key
    for name in NAMES:
        assert local.cert_file(name).read_bytes() != before[f"{name}.pem"]
        _verify_client(_ca(local), _cert(local, name))


def test_the_printed_settings_are_real_configuration_keys(local: LocalTls) -> None:
    for name in NAMES:
        assert load_settings(env=local.env(name)).common.tls == local.config(name)
    tls = load_settings(env=local.env(CLIENT)).common.tls
    assert tls.enabled and tls.cert_file == local.cert_file(CLIENT)
    assert tls.channel_credentials() is not None


def test_cuga_tls_init(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "certs"
    assert main(["tls", "init", "--dir", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "CUGA_TLS__CA_FILE=" in out and f"{folder}/client.pem" in out
    assert "ca/ca.key" in out and f"{folder}/ca/ca.key" not in out.split("export")[1]
    assert out.count("(written)") == len(NAMES) + 1
    assert main(["tls", "init", "--dir", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "(written)" not in out and out.count("(kept)") == len(NAMES) + 1
    assert main(["tls", "init", "--dir", str(folder), "--force"]) == 0
    assert capsys.readouterr().out.count("(written)") == len(NAMES) + 1


def test_cuga_tls_init_defaults_to_the_data_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUGA_DATA_DIR", str(tmp_path / "data"))
    assert main(["tls", "init"]) == 0
    assert (tmp_path / "data" / "tls" / "ca.pem").exists()


def test_issue_refuses_a_useless_certificate() -> None:
    ca = make_ca()
    with pytest.raises(ValueError, match="server or a client"):
        issue(ca, "x", server=False, client=False)
    with pytest.raises(ValueError, match="needs hosts"):
        issue(ca, "x")
    assert local_identities()[CLIENT] == ()


def test_up_and_demo_take_tls() -> None:
    parser = build_parser()
    assert parser.parse_args(["up", "--tls"]).tls is True
    assert parser.parse_args(["up"]).tls is False
    assert parser.parse_args(["demo", "--tls"]).tls is True
