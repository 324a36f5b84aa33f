"""Who may use the dashboard: HTTP Basic auth, compared in constant time, with failed
attempts limited per client address; and the token its actions carry."""

from __future__ import annotations

import base64
import binascii
import hmac
import math
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass

#: Failed attempts a client may make within :data:`WINDOW` seconds; past them, every
#: request from it is a 429 until the oldest failure leaves the window.
MAX_FAILURES = 10
WINDOW = 60.0
#: Clients whose failures are remembered (the oldest forgotten first): bounded memory.
REMEMBERED = 10_000
REALM = 'Basic realm="signup dashboard", charset="UTF-8"'


@dataclass(frozen=True, slots=True)
class Verdict:
    """What to answer instead of the page: a status, and seconds to wait (for a 429)."""

    status: int
    retry_after: int = 0


class Guard:
    """Checks each request's ``Authorization`` header against one user and password. With no
    password it lets everything through (the CLI allows that on loopback only)."""

    def __init__(self, user: str, password: str | None) -> None:
        self._expected = (user.encode(), (password or "").encode())
        self.open = password is None
        self._failures: OrderedDict[str, list[float]] = OrderedDict()
        #: The token every action (a POST) must carry: this process's own, in the page.
        self.token = secrets.token_urlsafe(32)

    def check(self, authorization: str | None, client: str) -> Verdict | None:
        """None to let the request through; else the 401 or 429 to answer."""
        if self.open:
            return None
        now = time.monotonic()
        recent = [t for t in self._failures.get(client, ()) if now - t < WINDOW]
        if len(recent) >= MAX_FAILURES:
            return Verdict(429, max(1, math.ceil(WINDOW - (now - recent[0]))))
        if self._matches(authorization):
            return None
        recent.append(now)
        self._failures[client] = recent
        self._failures.move_to_end(client)
        while len(self._failures) > REMEMBERED:
            self._failures.popitem(last=False)
        return Verdict(401)

    def _matches(self, authorization: str | None) -> bool:
        scheme, _, encoded = (authorization or "").partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        user, colon, password = decoded.partition(b":")
        # Both compared, always, in constant time: the answer's timing says nothing.
        user_ok = hmac.compare_digest(user, self._expected[0])
        password_ok = hmac.compare_digest(password, self._expected[1])
        return bool(colon) and user_ok and password_ok

    def token_matches(self, sent: str | None) -> bool:
        """Whether ``sent`` is this process's action token."""
        return hmac.compare_digest((sent or "").encode(), self.token.encode())
