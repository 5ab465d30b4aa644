"""A local CA and mutual-TLS certificates for ``cuga up --tls`` and deployments.

``cuga tls init`` makes, once, under ``<data_dir>/tls/`` (or ``--dir``):

* ``ca.pem``: a local certificate authority (EC P-256, one year, ``CA:true``, key usage
  certSign), and its key ``ca/ca.key`` in a directory of its own: services are given
  ``ca.pem`` to verify their peers, and no service's configuration points into ``ca/``
  (only this command signs, so only it reads the key);
* ``<service>.pem`` / ``<service>.key`` for each of the six services: server *and* client
  certificates (a service listens with it and dials the others with it), SANs
  ``localhost``, ``127.0.0.1`` and the service's name;
* ``client.pem`` / ``client.key``: a client-only certificate for the CLI and SDK callers.

Every file is written owner-only (0600, directories 0700). Existing files are kept (and
tightened if an older version left them readable by others), so running services keep
working; a CA key an older version left beside the services' keys (``<dir>/ca.key``) is
moved into ``ca/``. ``--force`` makes a new CA and reissues everything. This module is the
one place that makes certificates: the security tests use :func:`make_ca` and
:func:`issue` too.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import logging
import os
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cuga.cli._output import ConfigProblem, json_line
from cuga.cli._output import out as _out
from cuga.shared.auth import TlsConfig
from cuga.shared.config import SERVICE_NAMES, Settings
from cuga.shared.files import private_dir, tighten, write_private

log = logging.getLogger("cuga.cli.tls")

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
#: The directory of its own, under the TLS folder, holding the CA's key.
CA_KEY_DIR = "ca"
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


def write_pair(
    folder: Path, name: str, pair: KeyPair, *, key_folder: Path | None = None
) -> tuple[Path, Path]:
    """Write ``<name>.pem`` and ``<name>.key`` (PKCS#8, unencrypted), both 0600, each
    replaced atomically.

    Args:
        folder: where the certificate goes.
        name: the files' stem.
        pair: the certificate and its key.
        key_folder: where the key goes (default ``folder``).

    Returns:
        The certificate's and the key's paths.
    """
    cert, key = pair
    cert_path, key_path = folder / f"{name}.pem", (key_folder or folder) / f"{name}.key"
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_private(key_path, pem)
    write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def read_pair(folder: Path, name: str, *, key_folder: Path | None = None) -> KeyPair:
    """Load ``<name>.pem`` and ``<name>.key`` written by :func:`write_pair`.

    Raises:
        OSError: a file cannot be read.
        ValueError: a file is not a PEM certificate / EC private key.
    """
    key_path = (key_folder or folder) / f"{name}.key"
    cert = x509.load_pem_x509_certificate((folder / f"{name}.pem").read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{key_path} is not an EC private key")
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

    @property
    def ca_key_file(self) -> Path:
        """The CA's private key, in a directory no process is configured with: only
        :func:`ensure_local_tls` reads it, to issue certificates."""
        return self.folder / CA_KEY_DIR / f"{CA}.key"

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
    the old ones would no longer verify. The CA's key goes to
    :attr:`LocalTls.ca_key_file`, apart from the files processes are given. Everything
    is owner-only: kept files that are not, and a CA key found beside the service keys
    (an older layout), are fixed with a WARNING naming them.

    Raises:
        OSError: the folder or a file cannot be written or read.
        ValueError: an existing CA file is not a PEM certificate / EC key.
    """
    local = LocalTls(folder=private_dir(folder.absolute()))
    folder = local.folder
    key_folder = private_dir(local.ca_key_file.parent)
    _move_old_ca_key(folder / f"{CA}.key", local.ca_key_file)
    written: list[str] = []
    if force or not (local.ca_file.exists() and local.ca_key_file.exists()):
        ca = make_ca()
        write_pair(folder, CA, ca, key_folder=key_folder)
        written.append(CA)
    else:
        ca = read_pair(folder, CA, key_folder=key_folder)
    renew = bool(written)  # a new CA: the old leaves no longer chain to it
    for name, hosts in local_identities().items():
        if renew or not (local.cert_file(name).exists() and local.key_file(name).exists()):
            pair = issue(ca, name, hosts=hosts, server=bool(hosts), client=True)
            write_pair(folder, name, pair)
            written.append(name)
    for path in (*folder.iterdir(), *key_folder.iterdir()):
        tighten(path)  # kept files an older version wrote 0644
    return LocalTls(folder=folder, written=tuple(written))


def _move_old_ca_key(old: Path, new: Path) -> None:
    """Move a CA key an older version wrote beside the services' keys to its own folder."""
    if not old.exists():
        return
    if new.exists():
        log.warning(
            "%s is a CA key left beside the services' keys; the CA key in use is %s. "
            "Delete %s (or move it to %s if it is the one matching %s)",
            old,
            new,
            old,
            new,
            old.with_suffix(".pem"),
        )
        return
    tighten(old)
    os.replace(old, new)
    log.warning("moved the CA key %s to %s, apart from the services' keys", old, new)


def shell_exports(variables: Mapping[str, str]) -> str:
    """``export K=V ...`` for a shell (paths quoted when they need it)."""
    return "export " + " ".join(f"{k}={shlex.quote(v)}" for k, v in variables.items())


async def _init(args: argparse.Namespace, settings: Settings) -> int:
    """``cuga tls init [--dir D] [--force]``."""
    folder = Path(args.dir) if args.dir else Path(settings.common.data_dir) / "tls"
    try:
        made = ensure_local_tls(folder, force=args.force)
    except (OSError, ValueError) as exc:
        raise ConfigProblem(f"tls init: {exc}") from None
    if getattr(args, "json", False):
        json_line(
            {
                "folder": str(made.folder),
                "written": sorted(made.written),
                "ca_key_file": str(made.ca_key_file),
                "client_env": made.env(CLIENT),
            }
        )
        return 0
    out = _out()
    kept = [n for n in (CA, *local_identities()) if n not in made.written]
    out.print(f"local CA and certificates in {made.folder}/ (owner-only):", highlight=False)
    for name in (CA, *local_identities()):
        state = "written" if name in made.written else "kept"
        key = made.ca_key_file.relative_to(made.folder) if name == CA else f"{name}.key"
        out.print(f"  {name}.pem  {key}  ({state})", highlight=False)
    out.print(f"only this command needs {made.ca_key_file.parent}/; give it to no service")
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
    "CA_KEY_DIR",
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
