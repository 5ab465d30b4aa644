"""How the console serves (``cuga console`` options; the cluster's addresses, deadlines and
mutual TLS for its gRPC calls come from the common configuration, as for every client)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cuga.shared.config import ConfigError


@dataclass(frozen=True)
class ConsoleConfig:
    """The web console's own settings."""

    host: str = "127.0.0.1"
    """Address to listen on (``0.0.0.0`` in a container)."""
    port: int = 8080
    """TCP port; 0 picks a free one (tests)."""
    tls_cert_file: Path | None = None
    """PEM certificate for HTTPS. With it (and ``tls_key_file``) the console serves HTTPS
    and its session cookie is ``Secure`` (named ``__Host-cuga_session``)."""
    tls_key_file: Path | None = None
    """PEM private key of ``tls_cert_file``."""
    secure_cookies: bool | None = None
    """Mark the session cookie ``Secure`` even without ``tls_cert_file`` (behind a proxy
    that terminates TLS, as on Kubernetes with an ingress). Unset: only with TLS."""
    session_idle_s: float = 8 * 3600.0
    """Seconds without a request after which a session ends. > 0."""
    audit_public_key: str | None = None
    """The audit checkpoint key to pin (``ed25519:...`` as ``cuga tokens init`` prints it);
    unset: inclusion proofs are checked against the key the audit service states."""

    def __post_init__(self) -> None:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ConfigError("console.tls", "give both the certificate and its key, or neither")
        if not 0 <= self.port <= 65535:
            raise ConfigError("console.port", "must be 0..65535")
        if not self.session_idle_s > 0:
            raise ConfigError("console.session_idle_s", "must be > 0")

    @property
    def https(self) -> bool:
        """Whether the console itself serves HTTPS."""
        return self.tls_cert_file is not None

    @property
    def cookie_secure(self) -> bool:
        """Whether the session cookie carries ``Secure``."""
        return self.https if self.secure_cookies is None else self.secure_cookies

    @property
    def cookie_name(self) -> str:
        """``__Host-`` prefixed when Secure: the browser then refuses the cookie from any
        other host or path, or without HTTPS."""
        return "__Host-cuga_session" if self.cookie_secure else "cuga_session"


__all__ = ["ConsoleConfig"]
