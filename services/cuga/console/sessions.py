"""Signed-in users: an opaque session id in a cookie, the user's tokens in this process.

The cookie carries 256 random bits and nothing else; the tokens a user signed in with stay
in this process's memory (never in the cookie, never on disk), so signing out, or the
session's idle time running out, or a restart of the console, forgets them. One token per
service the user signed in for: each service only ever receives the token meant for it
(a client token is never shown to the approval service), as the security model asks of
every caller (docs/security.md, "a person's role reaches exactly one service").

Each session has its own CSRF token, which every form carries and every action checks
(:meth:`Session.csrf_ok`, constant time).
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

#: Services a user may hold a token for, as the sign-in form names them.
AREAS: Mapping[str, str] = {
    "coordinator": "runs",
    "approval": "approvals",
    "audit": "audit",
}


@dataclass
class Session:
    """One signed-in user."""

    sid: str
    csrf: str
    #: service name -> the bearer token the user gave for it.
    tokens: dict[str, str]
    #: service name -> "" when the service answered the sign-in probe, else its refusal.
    access: dict[str, str] = field(default_factory=dict)
    last_seen: float = 0.0

    def csrf_ok(self, presented: str) -> bool:
        """Whether ``presented`` is this session's CSRF token (constant-time compare)."""
        return bool(presented) and hmac.compare_digest(presented.encode(), self.csrf.encode())

    def may_use(self, service: str) -> bool:
        """Whether the service accepted this user's token at sign-in (for what the pages
        offer; every action is still decided by the service itself)."""
        return service in self.tokens and not self.access.get(service)


class SessionStore:
    """Sessions by id, forgotten after ``idle_s`` without a request.

    Args:
        idle_s: seconds of inactivity after which a session ends.
        max_sessions: most sessions held; the least recently used one is dropped first.
        clock: seconds, monotonic (tests pass a fake one).
    """

    def __init__(
        self,
        idle_s: float = 8 * 3600,
        max_sessions: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._idle_s = idle_s
        self._max = max_sessions
        self._clock = clock
        self._sessions: dict[str, Session] = {}

    def create(self, tokens: dict[str, str], access: dict[str, str]) -> Session:
        """A new session for these tokens."""
        self._expire()
        while len(self._sessions) >= self._max:
            oldest = min(self._sessions.values(), key=lambda s: s.last_seen)
            del self._sessions[oldest.sid]
        session = Session(
            sid=secrets.token_urlsafe(32),
            csrf=secrets.token_urlsafe(32),
            tokens=dict(tokens),
            access=dict(access),
            last_seen=self._clock(),
        )
        self._sessions[session.sid] = session
        return session

    def get(self, sid: str | None) -> Session | None:
        """The live session of this id (its idle time restarts), or None."""
        if not sid:
            return None
        session = self._sessions.get(sid)
        if session is None:
            return None
        now = self._clock()
        if now - session.last_seen > self._idle_s:
            del self._sessions[sid]
            return None
        session.last_seen = now
        return session

    def end(self, sid: str) -> None:
        """Forget a session (sign-out)."""
        self._sessions.pop(sid, None)

    def _expire(self) -> None:
        now = self._clock()
        for sid in [s.sid for s in self._sessions.values() if now - s.last_seen > self._idle_s]:
            del self._sessions[sid]

    def __len__(self) -> int:
        return len(self._sessions)


__all__ = ["AREAS", "Session", "SessionStore"]
