"""Who is a web admin: a password or a one-time login link, then a signed session cookie.

A web admin is whoever proves ``web.admin_password`` (compared in constant time) or, when
no password is set, logs in with the one-time login link printed in the log at start (as
Jupyter does; the link's page asks before it logs in, and each new link is logged too).
Being an admin on Telegram or Discord makes nobody a web admin, nor does being a web
visitor: the two cookies are separate and signed under different labels.

The session cookie is ``<session id>.<expiry>.<HMAC>``; its id is random and new at each
login (a session fixed before login is never honoured), and it must also be one this server
gave out and has not logged out: restarting the server logs every admin out. The CSRF token
of a session is another HMAC of its id.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Callable

from bot.adapters.web.identity import same_secret
from bot.core.dialog import RateLimiter

SESSION_COOKIE = "dishbot_admin"
SESSION_TTL_S = 8 * 3600
LOGIN_TOKEN_BYTES = 24
# Login attempts (right or wrong) one address may make a minute, and all addresses together:
# a password guesser gets a handful of guesses a minute, however many addresses it has.
LOGINS_PER_MINUTE_PER_ADDRESS = 5
LOGINS_PER_MINUTE = 30
_SESSION_ID = re.compile(r"[A-Za-z0-9_-]{32}")  # token_urlsafe(24)
_SESSION_LABEL = b"dishbot web admin session"
_CSRF_LABEL = b"dishbot web admin csrf"


class AdminSessions:
    """Logs admins in and out, and checks their cookies and CSRF tokens."""

    def __init__(
        self,
        secret: bytes,
        password: str | None,
        *,
        ttl_s: float = SESSION_TTL_S,
        clock: Callable[[], float] = time.time,
        on_new_token: Callable[[str], None] = lambda token: None,
    ) -> None:
        """``on_new_token`` is told each login link token made after the first (which
        `login_token` gives), so that the admin can be shown the new link."""
        if len(secret) < 16:
            raise ValueError("the web secret is too short")
        self._secret = secret
        self._password = password
        self._ttl_s = ttl_s
        self._clock = clock
        self._on_new_token = on_new_token
        self._live: dict[str, float] = {}  # session id -> expiry
        self._login_token: str | None = (
            None if password else secrets.token_urlsafe(LOGIN_TOKEN_BYTES)
        )
        self._per_address = RateLimiter(LOGINS_PER_MINUTE_PER_ADDRESS)
        self._overall = RateLimiter(LOGINS_PER_MINUTE)

    @property
    def uses_password(self) -> bool:
        """Whether admins log in with ``web.admin_password`` (else with a one-time link)."""
        return self._password is not None

    @property
    def login_token(self) -> str | None:
        """The one-time login link's token, when no password is set (a new one once used)."""
        return self._login_token

    def may_try(self, address: str) -> bool:
        """Count a login attempt from ``address``; False when too many were made lately."""
        return self._per_address.allow(address) and self._overall.allow("all")

    def log_in_with_password(self, password: str) -> str | None:
        """A new session's cookie when ``password`` is the admin password, else None."""
        if self._password is None:
            return None
        if not same_secret(password, self._password):
            return None
        return self._new_session()

    def log_in_with_token(self, token: str) -> str | None:
        """A new session's cookie when ``token`` is the login link's, else None. The token
        works once: a new one replaces it (see `login_token`), and is told to
        ``on_new_token``."""
        expected = self._login_token
        if expected is None or not same_secret(token, expected):
            return None
        self._login_token = secrets.token_urlsafe(LOGIN_TOKEN_BYTES)
        self._on_new_token(self._login_token)
        return self._new_session()

    def session(self, cookie: str | None) -> str | None:
        """The live session a cookie proves, or None (missing, forged, expired, logged out)."""
        if not cookie:
            return None
        session_id, _, rest = cookie.partition(".")
        expiry_text, _, signature = rest.partition(".")
        if not _SESSION_ID.fullmatch(session_id) or not expiry_text.isdigit():
            return None
        signed = self._sign(_SESSION_LABEL, f"{session_id}.{expiry_text}")
        if not same_secret(signature, signed):
            return None
        now = self._clock()
        if int(expiry_text) <= now or self._live.get(session_id, 0.0) <= now:
            return None
        return session_id

    def log_out(self, session_id: str) -> None:
        """End a session: its cookie is refused from now on."""
        self._live.pop(session_id, None)

    @property
    def ttl_s(self) -> float:
        """How long a session lasts."""
        return self._ttl_s

    def csrf_token(self, session_id: str) -> str:
        """The token a session's state-changing requests must carry."""
        return self._sign(_CSRF_LABEL, session_id)

    def csrf_ok(self, session_id: str, token: str | None) -> bool:
        """Whether ``token`` is this session's CSRF token."""
        return bool(token) and same_secret(str(token), self.csrf_token(session_id))

    def _new_session(self) -> str:
        now = self._clock()
        self._live = {key: expiry for key, expiry in self._live.items() if expiry > now}
        session_id = secrets.token_urlsafe(LOGIN_TOKEN_BYTES)
        expiry = int(now + self._ttl_s)
        self._live[session_id] = expiry
        value = f"{session_id}.{expiry}"
        return f"{value}.{self._sign(_SESSION_LABEL, value)}"

    def _sign(self, label: bytes, value: str) -> str:
        digest = hmac.new(self._secret, label + b"\0" + value.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")
