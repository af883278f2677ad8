"""Access control and back-pressure: API-key roles, signed webhooks, token buckets, in-flight cap.

Pure domain logic over plain values (headers as a mapping, a monotonic clock): it raises the
domain errors of ``server.errors`` and knows nothing of the HTTP framework.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import Literal
from urllib.parse import urlsplit

from server.config import AccessConfig, LimitsConfig
from server.errors import (
    ForbiddenError,
    OverloadedError,
    RateLimitedError,
    UnauthenticatedError,
)

log = logging.getLogger("signedrec.access")

Role = Literal["admin", "writer", "reader"]
KEY_HEADER = "x-api-key"
SIGNATURE_HEADER = "x-signedrec-signature"
TIMESTAMP_HEADER = "x-signedrec-timestamp"
# Which roles may perform which action.
ALLOWED: dict[str, frozenset[str]] = {
    "read": frozenset({"admin", "writer", "reader"}),
    "write": frozenset({"admin", "writer"}),
    "admin": frozenset({"admin"}),
}


def _bearer(headers: Mapping[str, str]) -> str | None:
    key = headers.get(KEY_HEADER)
    if key:
        return key
    auth = headers.get("authorization", "")
    return auth[7:].strip() or None if auth.lower().startswith("bearer ") else None


DEFAULT_PORTS = {"http": 80, "https": 443}


def _origin(text: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an Origin, default port filled in and host lowercased; None for
    "null" (a sandboxed or file: page) or anything unparseable."""
    try:
        parts = urlsplit(text.strip())
        port = parts.port or DEFAULT_PORTS.get(parts.scheme.lower())
    except ValueError:
        return None
    if not parts.hostname or port is None:
        return None
    return parts.scheme.lower(), parts.hostname.lower(), port


def _same_host(origin: tuple[str, str, int], host: str) -> bool:
    """Whether a Host header (``name[:port]``, the port defaulting to the origin scheme's)
    names the origin's host and port."""
    parsed = _origin(f"{origin[0]}://{host.strip()}") if host.strip() else None
    return parsed is not None and parsed[1:] == origin[1:]


def _from_another_site(headers: Mapping[str, str], allowed: frozenset[tuple[str, str, int]]
                       ) -> bool:  # fmt: skip
    """True for a request a browser sent on behalf of another site's page.

    Without keys, a page anywhere could post feedback or reload the model through its
    visitors' browsers (a text/plain POST needs no CORS preflight). Browsers say where a request
    comes from; servers and scripts send neither header, so they are unaffected.
    """
    text = headers.get("origin")
    origin = None if text is None else _origin(text)
    if origin is not None and origin in allowed:
        return False
    site = headers.get("sec-fetch-site")  # sent over HTTPS and to localhost only
    if site == "cross-site":
        return True
    if site in ("same-origin", "none"):  # none: typed in the address bar, a bookmark
        return False
    # "same-site" (a sibling subdomain, another port of localhost) or plain HTTP: the origin
    # must be this service's own.
    if text is None:
        return False
    if origin is None:
        return True
    # Behind a proxy the Host may be the proxy's upstream; X-Forwarded-Host is the browser's
    # (a page cannot set it cross-site without a preflight this service never answers).
    forwarded = headers.get("x-forwarded-host", "").split(",")[0]
    return not any(_same_host(origin, h) for h in (headers.get("host", ""), forwarded))


class Guard:
    """Checks a request's key and role, and (for webhooks) its HMAC signature and age."""

    def __init__(self, config: AccessConfig, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock
        self.open = not config.keys
        self.allowed_origins = frozenset(
            o for o in (_origin(text) for text in config.allowed_origins) if o is not None
        )
        if self.open:
            log.warning("no API keys configured: feedback and admin routes are open to anyone")

    def check(
        self, action: Literal["read", "write", "admin"], headers: Mapping[str, str], client: str
    ) -> str:
        """The caller's rate-limit identity; raises 401/403-class errors.

        A valid key is its own identity; anyone else is identified by client address, so
        made-up keys can neither dodge the rate limit nor grow its table.
        """
        if self.open and action != "read" and _from_another_site(headers, self.allowed_origins):
            raise ForbiddenError(
                "no API keys are configured, so writes from a web page of another site are "
                "refused (configure keys to accept browser clients)",
                {"reason": "cross_site"},
            )
        if self.open or (action == "read" and not self.config.read_requires_key):
            key = _bearer(headers)
            return key if key is not None and self._role(key) is not None else f"addr:{client}"
        key = _bearer(headers)
        if key is None:
            raise UnauthenticatedError(f"this route needs an API key in the {KEY_HEADER} header")
        role = self._role(key)
        if role is None:
            raise UnauthenticatedError("the API key is not valid")
        if role not in ALLOWED[action]:
            raise ForbiddenError(f"a {role} key may not {action}", {"role": role})
        return key

    def _role(self, key: str) -> str | None:
        # Constant-time comparison against every configured key.
        found = None
        for candidate, role in self.config.keys.items():
            if hmac.compare_digest(candidate.encode(), key.encode()):
                found = role
        return found

    def verify_signature(self, headers: Mapping[str, str], body: bytes) -> None:
        """Refuse an unsigned, wrongly signed, or too old (replayed) webhook body."""
        secret = self.config.hmac_secret
        if not secret:
            return
        signature = headers.get(SIGNATURE_HEADER)
        stamp = headers.get(TIMESTAMP_HEADER)
        if not signature or not stamp:
            raise UnauthenticatedError(
                f"signed webhooks need {SIGNATURE_HEADER} and {TIMESTAMP_HEADER} headers"
            )
        try:
            sent = float(stamp)
        except ValueError:
            raise UnauthenticatedError(f"{TIMESTAMP_HEADER} is not a number") from None
        age = abs(self.clock() - sent)
        if not math.isfinite(age) or age > self.config.hmac_window_s:
            raise UnauthenticatedError(
                "the signature timestamp is outside the replay window",
                {"window_s": self.config.hmac_window_s},
            )
        expected = sign(secret, stamp, body).encode()
        # Compared as bytes: compare_digest refuses str with non-ASCII characters (a TypeError,
        # not a mismatch). bytes.lower() folds only ASCII, so upper-case hex is accepted too.
        given = signature.encode("utf-8", "replace").lower().removeprefix(b"sha256=")
        if not hmac.compare_digest(expected, given):
            raise UnauthenticatedError("the webhook signature does not match the body")


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The hex HMAC-SHA256 a sender puts in the signature header for ``timestamp`` and body."""
    message = timestamp.encode() + b"." + body
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


class RateLimiter:
    """A token bucket per identity; ``rate_per_s = 0`` disables it. Least recently seen
    identities are forgotten beyond ``max_identities`` (a forgotten one starts full again)."""

    def __init__(self, config: LimitsConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = config.rate_per_s
        self.burst = config.burst
        self.max_identities = config.max_identities
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, identity: str, cost: float = 1.0) -> None:
        """Spend tokens or raise RateLimitedError with how long to wait."""
        if self.rate <= 0:
            return
        now = self.clock()
        tokens, last = self._buckets.pop(identity, (self.burst, now))
        if self._buckets and len(self._buckets) >= self.max_identities:
            del self._buckets[next(iter(self._buckets))]
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens < cost:
            wait = max(1, math.ceil((cost - tokens) / self.rate))
            self._buckets[identity] = (tokens, now)
            raise RateLimitedError(
                f"rate limit of {self.rate:g} requests/s exceeded", {"retry_after_s": wait}
            )
        self._buckets[identity] = (tokens - cost, now)


def admit(
    guard: Guard,
    limiter: RateLimiter,
    action: Literal["read", "write", "admin"],
    headers: Mapping[str, str],
    client: str,
) -> str:
    """Check the caller's key and spend from its bucket; a refused caller spends from its
    address's bucket, so keys cannot be guessed at full speed (429 once it is empty)."""
    try:
        identity = guard.check(action, headers, client)
    except (UnauthenticatedError, ForbiddenError):
        limiter.take(f"addr:{client}")
        raise
    limiter.take(identity)
    return identity


class InFlight:
    """Counts requests in flight; beyond the bound, reads degrade and writes are shed."""

    def __init__(self, config: LimitsConfig) -> None:
        self.limit = config.max_inflight
        self.retry_after = config.retry_after_s
        self.current = 0
        self.shed = 0

    def over(self) -> bool:
        """True when a new request would exceed the bound (it is counted as shed)."""
        if self.current >= self.limit:
            self.shed += 1
            return True
        return False

    def refuse_write(self) -> None:
        """Raise OverloadedError for a write arriving while over the bound (counted as shed)."""
        if self.over():
            raise OverloadedError(
                "too many requests in flight; retry shortly", {"retry_after_s": self.retry_after}
            )
