"""A local CA and mutual-TLS certificates for ``cuga up --tls`` and deployments.

``cuga tls init`` makes, once, under ``<data_dir>/tls/`` (or ``--dir``):

* ``ca.pem`` / ``ca.key``: a local certificate authority (EC P-256, one year,
  ``CA:true``, key usage certSign);
* ``<service>.pem`` / ``<service>.key`` for each of the six services: server *and* client
  certificates (a service listens with it and dials the others with it), SANs
  ``localhost``, ``127.0.0.1`` and the service's name;
* ``client.pem`` / ``client.key``: a client-only certificate for the CLI and SDK callers.

Keys are written owner-only (0600, directory 0700). Existing files are kept, so running
services keep working; ``--force`` makes a new CA and reissues everything. This module is
the one place that makes certificates: the security tests use :func:`make_ca` and
:func:`issue` too.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from rich.console import Console

from cuga.shared.auth import TlsConfig
from cuga.shared.config import SERVICE_NAMES, Settings

#: A certificate with its private key.
KeyPair = tuple[x509.Certificate, ec.EllipticCurvePrivateKey]

#: How long the local CA and the certificates it issues are valid.
VALIDITY = dt.timedelta(days=365)
#: Hosts every local service certificate is valid for, besides the service's own name.
LOCAL_HOSTS = ("localhost", "127.0.0.1")
#: The client-only identity of CLI and SDK callers.
CLIENT = "client"
#: Name of the CA's files (``ca.pem``, ``ca.key``).
CA = "ca"
#: The configuration keys (``CUGA_TLS__*``) a process sets to use a certificate.
ENV_CERT, ENV_KEY, ENV_CA = "CUGA_TLS__CERT_FILE", "CUGA_TLS__KEY_FILE", "CUGA_TLS__CA_FILE"

# Backdating covers small clock differences between the machines that check the chain.
_BACKDATE = dt.timedelta(minutes=5)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(hosts: Iterable[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def make_ca(common_name: str = "cuga local CA", *, valid_for: dt.timedelta = VALIDITY) -> KeyPair:
    """A self-signed CA: EC P-256, ``CA:true`` (no intermediates), key usage certSign.

    Args:
        common_name: the CA's subject CN.
        valid_for: how long it is valid from now.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + valid_for)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def issue(
    ca: KeyPair,
    common_name: str,
    *,
    hosts: Iterable[str] = (),
    server: bool = True,
    client: bool = True,
    valid_for: dt.timedelta = VALIDITY,
) -> KeyPair:
    """A leaf certificate signed by ``ca``, with a new EC P-256 key.

    Args:
        ca: the issuing CA's certificate and key.
        common_name: the subject CN, which is the caller's identity with mutual TLS
            (``tls.identities``).
        hosts: DNS names and IP addresses (``127.0.0.1``) for the SAN extension; a
            server certificate needs the names its clients dial.
        server: allow it as a TLS server certificate (EKU serverAuth).
        client: allow it as a TLS client certificate (EKU clientAuth).
        valid_for: how long it is valid from now (never past the CA's own expiry).

    Raises:
        ValueError: neither ``server`` nor ``client``, or a server certificate without
            ``hosts``.
    """
    if not (server or client):
        raise ValueError("a certificate must be a server or a client certificate (or both)")
    hosts = tuple(hosts)
    if server and not hosts:
        raise ValueError(f"server certificate {common_name!r} needs hosts for its SAN")
    ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    usages = [ExtendedKeyUsageOID.SERVER_AUTH] * server + [ExtendedKeyUsageOID.CLIENT_AUTH] * client
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(min(now + valid_for, ca_cert.not_valid_after_utc))
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
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if hosts:
        builder = builder.add_extension(x509.SubjectAlternativeName(_san(hosts)), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def _write(path: Path, data: bytes, mode: int) -> None:
    # A fresh file replaced into place: the mode is the one asked for even when the file
    # existed (O_CREAT's mode applies only to new files), and readers never see half a key.
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def write_pair(folder: Path, name: str, pair: KeyPair) -> tuple[Path, Path]:
    """Write ``<name>.pem`` (0644) and ``<name>.key`` (PKCS#8, unencrypted, 0600).

    Returns:
        The certificate's and the key's paths.
    """
    cert, key = pair
    cert_path, key_path = folder / f"{name}.pem", folder / f"{name}.key"
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write(key_path, pem, 0o600)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert_path, key_path


def read_pair(folder: Path, name: str) -> KeyPair:
    """Load ``<name>.pem`` and ``<name>.key`` written by :func:`write_pair`.

    Raises:
        OSError: a file cannot be read.
        ValueError: a file is not a PEM certificate / EC private key.
    """
    cert = x509.load_pem_x509_certificate((folder / f"{name}.pem").read_bytes())
    key = serialization.load_pem_private_key((folder / f"{name}.key").read_bytes(), None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{folder / name}.key is not an EC private key")
    return cert, key


def local_identities() -> dict[str, tuple[str, ...]]:
    """Each local certificate's name -> the hosts of its SAN (empty: client-only)."""
    names: dict[str, tuple[str, ...]] = {name: (*LOCAL_HOSTS, name) for name in SERVICE_NAMES}
    names[CLIENT] = ()
    return names


@dataclass(frozen=True)
class LocalTls:
    """Where the local CA and certificates are, and what the last init wrote."""

    folder: Path
    written: tuple[str, ...] = ()
    """Names (``ca``, services, ``client``) whose files this call (re)wrote."""

    @property
    def ca_file(self) -> Path:
        """The CA certificate every process trusts (``tls.ca_file``)."""
        return self.folder / f"{CA}.pem"

    def cert_file(self, name: str) -> Path:
        """``name``'s certificate (a service name or ``client``)."""
        return self.folder / f"{name}.pem"

    def key_file(self, name: str) -> Path:
        """``name``'s private key."""
        return self.folder / f"{name}.key"

    def config(self, name: str) -> TlsConfig:
        """The ``tls:`` settings of a process presenting ``name``'s certificate."""
        return TlsConfig(
            cert_file=self.cert_file(name), key_file=self.key_file(name), ca_file=self.ca_file
        )

    def env(self, name: str) -> dict[str, str]:
        """The ``CUGA_TLS__*`` variables of a process presenting ``name``'s certificate."""
        return {
            ENV_CERT: str(self.cert_file(name)),
            ENV_KEY: str(self.key_file(name)),
            ENV_CA: str(self.ca_file),
        }


def ensure_local_tls(folder: Path, *, force: bool = False) -> LocalTls:
    """Create (once) the local CA and a certificate per local identity under ``folder``.

    Existing files are kept; a missing certificate is issued by the existing CA. Without
    a CA (or with ``force``) a new CA is made and every certificate is reissued, since
    the old ones would no longer verify.

    Raises:
        OSError: the folder or a file cannot be written or read.
        ValueError: an existing CA file is not a PEM certificate / EC key.
    """
    folder = folder.absolute()
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(folder, 0o700)
    written: list[str] = []
    have_ca = (folder / f"{CA}.pem").exists() and (folder / f"{CA}.key").exists()
    if force or not have_ca:
        ca = make_ca()
        write_pair(folder, CA, ca)
        written.append(CA)
    else:
        ca = read_pair(folder, CA)
    renew = bool(written)  # a new CA: the old leaves no longer chain to it
    for name, hosts in local_identities().items():
        exists = (folder / f"{name}.pem").exists() and (folder / f"{name}.key").exists()
        if renew or not exists:
            pair = issue(ca, name, hosts=hosts, server=bool(hosts), client=True)
            write_pair(folder, name, pair)
            written.append(name)
    return LocalTls(folder=folder, written=tuple(written))


def shell_exports(variables: Mapping[str, str]) -> str:
    """``export K=V ...`` for a shell (paths quoted when they need it)."""
    return "export " + " ".join(f"{k}={shlex.quote(v)}" for k, v in variables.items())


async def _init(args: argparse.Namespace, settings: Settings) -> int:
    """``cuga tls init [--dir D] [--force]``."""
    folder = Path(args.dir) if args.dir else Path(settings.common.data_dir) / "tls"
    err = Console(stderr=True)
    try:
        made = ensure_local_tls(folder, force=args.force)
    except (OSError, ValueError) as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False)
        return 1
    out = Console()
    kept = [n for n in (CA, *local_identities()) if n not in made.written]
    out.print(f"local CA and certificates in {made.folder}/ (keys owner-only):", highlight=False)
    for name in (CA, *local_identities()):
        state = "written" if name in made.written else "kept"
        out.print(f"  {name}.pem  {name}.key  ({state})", highlight=False)
    if kept and not args.force:
        out.print("existing files were kept; --force makes a new CA and reissues everything")
    out.print("each service (its own pair, e.g. routing):", highlight=False)
    out.print(f"  {shell_exports(made.env('routing'))}", highlight=False, soft_wrap=True)
    out.print("the CLI and SDK callers:", highlight=False)
    out.print(f"  {shell_exports(made.env(CLIENT))}", highlight=False, soft_wrap=True)
    out.print("or run `cuga up --tls`, which does all of this itself", highlight=False)
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``cuga tls init``."""
    parser = subparsers.add_parser("tls", help="a local CA and mutual-TLS certificates")
    sub = parser.add_subparsers(dest="tls_command", required=True, metavar="ACTION")
    p = sub.add_parser(
        "init", help="a local CA, a certificate per service and one for the CLI (once)"
    )
    p.add_argument("--dir", help="where to write them (default: <data_dir>/tls)")
    p.add_argument(
        "--force", action="store_true", help="make a new CA and reissue every certificate"
    )
    p.set_defaults(handler=_init)


__all__ = [
    "CLIENT",
    "ENV_CA",
    "ENV_CERT",
    "ENV_KEY",
    "LOCAL_HOSTS",
    "VALIDITY",
    "KeyPair",
    "LocalTls",
    "ensure_local_tls",
    "issue",
    "local_identities",
    "make_ca",
    "read_pair",
    "shell_exports",
    "write_pair",
]
