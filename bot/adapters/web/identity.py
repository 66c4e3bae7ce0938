"""Who a web visitor is: a random id in a signed cookie, and the CSRF token tied to it.

The cookie is ``<visitor id>.<HMAC of it>`` under a server secret kept in the data
directory (so visitors stay who they are across restarts, and every process sharing the
data directory agrees). A cookie that does not verify is ignored and a new visitor made: a
forged one gets nobody's answers. The CSRF token is another HMAC of the visitor id, so a
page of another site, which cannot read the cookie or the page, cannot make one. Every
secret a request brings is compared with `same_secret`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets
from pathlib import Path

SECRET_FILE = "web_secret"  # under the data directory
SECRET_BYTES = 32
VISITOR_ID_BYTES = 16
_VISITOR_ID = re.compile(r"[A-Za-z0-9_-]{22}")  # token_urlsafe(16)
_COOKIE_LABEL = b"dishbot web visitor"
_CSRF_LABEL = b"dishbot web csrf"


def load_secret(data_dir: Path) -> bytes:
    """The server's signing secret, made (readable by this user only) on first use."""
    path = data_dir / SECRET_FILE
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    data_dir.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_bytes(SECRET_BYTES)
    try:
        # O_EXCL: when two processes start at once, one writes and both read its secret.
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_bytes()
    with os.fdopen(descriptor, "wb") as file:
        file.write(secret)
    return secret


def same_secret(given: str, expected: str) -> bool:
    """Whether a secret a request brought is ``expected``, compared in constant time.

    As bytes: `hmac.compare_digest` raises on str with non-ASCII characters, and what a
    request brings may be anything (lone surrogates included, from undecodable bytes).
    """
    return hmac.compare_digest(_as_bytes(given), _as_bytes(expected))


def _as_bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


class Identities:
    """Makes and checks visitor cookies and CSRF tokens with one secret."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("the web secret is too short")
        self._secret = secret

    def new_visitor(self) -> str:
        """A fresh visitor id."""
        return secrets.token_urlsafe(VISITOR_ID_BYTES)

    def cookie(self, visitor_id: str) -> str:
        """The cookie value that proves ``visitor_id``."""
        return f"{visitor_id}.{self._sign(_COOKIE_LABEL, visitor_id)}"

    def visitor(self, cookie: str | None) -> str | None:
        """The visitor a cookie proves, or None when it is missing or forged."""
        if not cookie:
            return None
        visitor_id, _, signature = cookie.partition(".")
        if not _VISITOR_ID.fullmatch(visitor_id):
            return None
        if not same_secret(signature, self._sign(_COOKIE_LABEL, visitor_id)):
            return None
        return visitor_id

    def csrf_token(self, visitor_id: str) -> str:
        """The token a visitor's state-changing requests must carry."""
        return self._sign(_CSRF_LABEL, visitor_id)

    def csrf_ok(self, visitor_id: str, token: str | None) -> bool:
        """Whether ``token`` is this visitor's CSRF token."""
        return token is not None and same_secret(token, self.csrf_token(visitor_id))

    def _sign(self, label: bytes, value: str) -> str:
        digest = hmac.new(self._secret, label + b"\0" + value.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")
