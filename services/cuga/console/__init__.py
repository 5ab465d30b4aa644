"""The web console (``cuga console``): runs, approvals and the audit trail in a browser,
called as the signed-in user over gRPC (docs/console.md)."""

from cuga.console.app import build_app
from cuga.console.backend import Backend
from cuga.console.config import ConsoleConfig
from cuga.console.sessions import Session, SessionStore

__all__ = ["Backend", "ConsoleConfig", "Session", "SessionStore", "build_app"]
