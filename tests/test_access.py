"""Access control and back-pressure: Guard, RateLimiter and InFlight as units, then over HTTP."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest

from server.access import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    Guard,
    InFlight,
    RateLimiter,
    admit,
    sign,
)
from server.config import AccessConfig, LimitsConfig
from server.errors import ForbiddenError, OverloadedError, RateLimitedError, UnauthenticatedError
from tests.test_service import Server

SECRET = "s3cret"
WINDOW_S = 300.0
KEYS = {"k-admin": "admin", "k-w": "writer", "k-r": "reader"}


class FakeClock:
    """A settable clock for the replay window and the token buckets."""

    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        """The current fake time."""
        return self.now


CLIENT = "127.0.0.1"


# -- Guard: keys and roles ---------------------------------------------------------------------
def test_open_mode_lets_everything_through() -> None:
    guard = Guard(AccessConfig())
    assert guard.open
    for action in ("read", "write", "admin"):
        assert guard.check(action, {}, CLIENT) == f"addr:{CLIENT}"
    # An unknown key is no identity of its own: it cannot dodge the per-address rate limit.
    assert guard.check("admin", {"x-api-key": "whatever"}, CLIENT) == f"addr:{CLIENT}"
    assert guard.check("read", {}, "10.0.0.9") != guard.check("read", {}, CLIENT)


@pytest.mark.parametrize(
    "headers",
    [
        {"sec-fetch-site": "cross-site", "origin": "https://evil.example"},
        {"origin": "https://evil.example", "host": "recs.internal:8000"},
        {"origin": "null", "host": "recs.internal:8000"},
        # Same site is not same origin: a sibling subdomain, another port of localhost.
        {"sec-fetch-site": "same-site", "origin": "https://app.internal", "host": "recs.internal"},
        {"sec-fetch-site": "same-site", "origin": "http://localhost:3000", "host": "localhost:80"},
        {"origin": "http://recs.internal:8080", "host": "recs.internal"},  # another port
        {"origin": "http://evil.example", "host": "recs.internal", "x-forwarded-host": ""},
        {"origin": "https://app.example.evil", "sec-fetch-site": "cross-site"},
    ],
)
def test_open_mode_refuses_writes_from_another_sites_page(headers: dict[str, str]) -> None:
    """Without keys, a browser posting for another site's page is refused; its reads are not."""
    guard = Guard(AccessConfig())
    for action in ("write", "admin"):
        with pytest.raises(ForbiddenError, match="another site"):
            guard.check(action, headers, CLIENT)
    assert guard.check("read", headers, CLIENT) == f"addr:{CLIENT}"


@pytest.mark.parametrize(
    "headers",
    [
        {},  # servers and scripts
        {"sec-fetch-site": "same-origin", "origin": "http://recs.internal:8000"},
        {"sec-fetch-site": "none"},  # typed into the address bar
        {"origin": "http://recs.internal:8000", "host": "recs.internal:8000"},
        # Plain HTTP (no Sec-Fetch-*): default ports and case are not differences.
        {"origin": "http://Recs.Internal", "host": "recs.internal:80"},
        {"origin": "https://recs.internal", "host": "recs.internal:443"},
        {"origin": "http://[::1]:8000", "host": "[::1]:8000"},
        # Behind a proxy that rewrites Host to its upstream.
        {"origin": "http://shop.internal", "host": "127.0.0.1:8000",
         "x-forwarded-host": "shop.internal"},
        # An origin the operator allowed, even cross-site.
        {"origin": "https://app.example", "sec-fetch-site": "cross-site"},
        {"origin": "https://app.example:443", "host": "recs.internal"},
    ],
)  # fmt: skip
def test_open_mode_accepts_writes_from_scripts_and_the_same_site(headers: dict[str, str]) -> None:
    guard = Guard(AccessConfig(allowed_origins=["https://app.example"]))
    assert guard.check("write", headers, CLIENT) == f"addr:{CLIENT}"


def test_missing_key_is_401() -> None:
    guard = Guard(AccessConfig(keys=KEYS))
    with pytest.raises(UnauthenticatedError) as info:
        guard.check("write", {}, CLIENT)
    assert info.value.code == "unauthenticated"


def test_bad_key_is_401() -> None:
    guard = Guard(AccessConfig(keys=KEYS))
    with pytest.raises(UnauthenticatedError):
        guard.check("write", {"x-api-key": "k-nope"}, CLIENT)
    with pytest.raises(UnauthenticatedError):
        guard.check("admin", {"authorization": "Bearer k-admin-but-longer"}, CLIENT)


def test_wrong_role_is_403() -> None:
    guard = Guard(AccessConfig(keys=KEYS))
    with pytest.raises(ForbiddenError) as info:
        guard.check("write", {"x-api-key": "k-r"}, CLIENT)
    assert info.value.detail == {"role": "reader"}
    with pytest.raises(ForbiddenError):
        guard.check("admin", {"x-api-key": "k-w"}, CLIENT)


def test_roles_allow_their_actions_via_either_header() -> None:
    guard = Guard(AccessConfig(keys=KEYS))
    assert guard.check("admin", {"x-api-key": "k-admin"}, CLIENT) == "k-admin"
    assert guard.check("write", {"authorization": "Bearer k-w"}, CLIENT) == "k-w"
    assert guard.check("write", {"authorization": "bearer   k-admin "}, CLIENT) == "k-admin"
    assert guard.check("read", {"x-api-key": "k-r"}, CLIENT) == "k-r"
    # The x-api-key header wins over Authorization.
    assert guard.check("read", {"x-api-key": "k-r", "authorization": "Bearer k-w"}, CLIENT) == "k-r"
    with pytest.raises(UnauthenticatedError):
        guard.check("write", {"authorization": "Basic k-w"}, CLIENT)


def test_reads_are_open_unless_read_requires_key() -> None:
    guard = Guard(AccessConfig(keys=KEYS))
    assert guard.check("read", {}, CLIENT) == f"addr:{CLIENT}"
    # An unknown key on an open read is not refused (reads are open), but it is not an identity.
    assert guard.check("read", {"x-api-key": "k-nope"}, CLIENT) == f"addr:{CLIENT}"
    strict = Guard(AccessConfig(keys=KEYS, read_requires_key=True))
    with pytest.raises(UnauthenticatedError):
        strict.check("read", {}, CLIENT)
    with pytest.raises(UnauthenticatedError):
        strict.check("read", {"x-api-key": "k-nope"}, CLIENT)
    assert strict.check("read", {"x-api-key": "k-r"}, CLIENT) == "k-r"


# -- Guard: webhook signatures -----------------------------------------------------------------
def _signed_guard(clock: FakeClock) -> Guard:
    return Guard(AccessConfig(keys=KEYS, hmac_secret=SECRET, hmac_window_s=WINDOW_S), clock)


def _headers(stamp: str, body: bytes, secret: str = SECRET) -> dict[str, str]:
    return {SIGNATURE_HEADER: sign(secret, stamp, body), TIMESTAMP_HEADER: stamp}


def test_signature_ok() -> None:
    clock = FakeClock()
    guard = _signed_guard(clock)
    body = b'{"event_id":"e1"}'
    guard.verify_signature(_headers("1000", body), body)
    prefixed = {**_headers("999.5", body)}
    prefixed[SIGNATURE_HEADER] = "sha256=" + prefixed[SIGNATURE_HEADER]
    guard.verify_signature(prefixed, body)
    # Just inside the window on either side of the server's clock.
    guard.verify_signature(_headers(str(1000 - WINDOW_S), body), body)
    guard.verify_signature(_headers(str(1000 + WINDOW_S), body), body)


@pytest.mark.parametrize(
    "headers",
    [
        {SIGNATURE_HEADER: sign(SECRET, "1000", b"other body"), TIMESTAMP_HEADER: "1000"},
        {SIGNATURE_HEADER: sign("not-the-secret", "1000", b"body"), TIMESTAMP_HEADER: "1000"},
        # Signed for another timestamp than the one sent.
        {SIGNATURE_HEADER: sign(SECRET, "999", b"body"), TIMESTAMP_HEADER: "1000"},
        {SIGNATURE_HEADER: "0" * 64, TIMESTAMP_HEADER: "1000"},
    ],
)
def test_wrong_signature_is_401(headers: dict[str, str]) -> None:
    with pytest.raises(UnauthenticatedError, match="does not match"):
        _signed_guard(FakeClock()).verify_signature(headers, b"body")


def test_upper_case_hex_signature_ok() -> None:
    body = b'{"event_id":"e1"}'
    headers = _headers("1000", body)
    upper = {**headers, SIGNATURE_HEADER: headers[SIGNATURE_HEADER].upper()}
    _signed_guard(FakeClock()).verify_signature(upper, body)
    prefixed = {**headers, SIGNATURE_HEADER: "SHA256=" + headers[SIGNATURE_HEADER].upper()}
    _signed_guard(FakeClock()).verify_signature(prefixed, body)


@pytest.mark.parametrize(
    "signature",
    ["é" * 64, "sha256=" + "ü" * 64, "\u2603", "\udcff" * 64],
    ids=["latin-1", "prefixed", "snowman", "surrogates"],
)
def test_non_ascii_signature_is_401(signature: str) -> None:
    """Not a TypeError from compare_digest (a 500 over HTTP): a signature that does not match."""
    headers = {SIGNATURE_HEADER: signature, TIMESTAMP_HEADER: "1000"}
    with pytest.raises(UnauthenticatedError, match="does not match"):
        _signed_guard(FakeClock()).verify_signature(headers, b"body")


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {TIMESTAMP_HEADER: "1000"},
        {SIGNATURE_HEADER: sign(SECRET, "1000", b"body")},
        {SIGNATURE_HEADER: "", TIMESTAMP_HEADER: "1000"},
    ],
)
def test_missing_signature_is_401(headers: dict[str, str]) -> None:
    with pytest.raises(UnauthenticatedError, match="need"):
        _signed_guard(FakeClock()).verify_signature(headers, b"body")


@pytest.mark.parametrize("stamp", ["yesterday", "nan", "inf", "-inf"])
def test_unusable_timestamp_is_401(stamp: str) -> None:
    with pytest.raises(UnauthenticatedError):
        _signed_guard(FakeClock()).verify_signature(_headers(stamp, b"body"), b"body")


def test_signature_outside_window_is_401_even_when_valid() -> None:
    clock = FakeClock(1000.0)
    guard = _signed_guard(clock)
    body = b'{"event_id":"e1"}'
    headers = _headers("1000", body)
    guard.verify_signature(headers, body)
    # The same request replayed later than the window allows.
    clock.now = 1000.0 + WINDOW_S + 0.5
    with pytest.raises(UnauthenticatedError, match="replay window") as info:
        guard.verify_signature(headers, body)
    assert info.value.detail == {"window_s": WINDOW_S}
    # A timestamp too far in the future is refused as well.
    clock.now = 1000.0 - WINDOW_S - 0.5
    with pytest.raises(UnauthenticatedError, match="replay window"):
        guard.verify_signature(headers, body)


def test_no_secret_means_no_signature_needed() -> None:
    Guard(AccessConfig(keys=KEYS)).verify_signature({}, b"anything")


# -- RateLimiter ---------------------------------------------------------------------------
def test_rate_limiter_burst_then_429_then_refill() -> None:
    clock = FakeClock(0.0)
    limiter = RateLimiter(LimitsConfig(rate_per_s=2.0, burst=3.0), clock)
    for _ in range(3):
        limiter.take("a")
    with pytest.raises(RateLimitedError) as info:
        limiter.take("a")
    assert info.value.code == "rate_limited"
    assert info.value.detail["retry_after_s"] == 1
    # Another identity has its own bucket.
    limiter.take("b")
    # Half a second at 2/s refills one token: one more request, then limited again.
    clock.now = 0.5
    limiter.take("a")
    with pytest.raises(RateLimitedError):
        limiter.take("a")
    # A long pause refills only up to the burst.
    clock.now = 100.0
    for _ in range(3):
        limiter.take("a")
    with pytest.raises(RateLimitedError):
        limiter.take("a")


def test_rate_limiter_retry_after_rounds_up() -> None:
    clock = FakeClock(0.0)
    limiter = RateLimiter(LimitsConfig(rate_per_s=0.25, burst=1.0), clock)
    limiter.take("a")
    with pytest.raises(RateLimitedError) as info:
        limiter.take("a")
    assert info.value.detail["retry_after_s"] == 4
    clock.now = 4.0
    limiter.take("a")


def test_rate_limiter_disabled_at_zero() -> None:
    limiter = RateLimiter(LimitsConfig(rate_per_s=0.0, burst=1.0), FakeClock())
    for _ in range(1000):
        limiter.take("a")


def test_admit_spends_from_the_address_bucket_when_the_key_is_refused() -> None:
    guard = Guard(AccessConfig(keys=KEYS))
    limiter = RateLimiter(LimitsConfig(rate_per_s=1.0, burst=2.0), FakeClock())
    for _ in range(2):
        with pytest.raises(UnauthenticatedError):
            admit(guard, limiter, "write", {"x-api-key": "k-nope"}, CLIENT)
    with pytest.raises(RateLimitedError):  # a third guess waits, whichever key it tries
        admit(guard, limiter, "write", {"x-api-key": "k-other"}, CLIENT)
    with pytest.raises(RateLimitedError):  # a wrong role is refused too, and so spends
        admit(guard, limiter, "admin", {"x-api-key": "k-r"}, CLIENT)
    assert admit(guard, limiter, "write", {"x-api-key": "k-w"}, CLIENT) == "k-w"
    assert admit(guard, limiter, "read", {"x-api-key": "k-r"}, "10.0.0.9") == "k-r"


# -- InFlight ------------------------------------------------------------------------------
def test_inflight_bound() -> None:
    inflight = InFlight(LimitsConfig(max_inflight=2, retry_after_s=3))
    assert not inflight.over()
    inflight.current = 1
    assert not inflight.over()
    inflight.refuse_write()  # under the bound: no error
    inflight.current = 2
    assert inflight.over()
    with pytest.raises(OverloadedError) as info:
        inflight.refuse_write()
    assert info.value.code == "overloaded"
    assert info.value.detail == {"retry_after_s": 3}
    assert inflight.shed == 2
    inflight.current = 1
    assert not inflight.over()


# -- over HTTP -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A real server with keys and webhook signatures configured through the environment."""
    env = {
        "SIGNEDREC_ACCESS__KEYS": json.dumps(KEYS),
        "SIGNEDREC_ACCESS__HMAC_SECRET": SECRET,
        "SIGNEDREC_ACCESS__HMAC_WINDOW_S": str(WINDOW_S),
    }
    srv = Server(tmp_path_factory.mktemp("guarded") / "s", env)
    yield srv
    srv.stop()


def _body(user: str, item: str = "21", kind: str = "like") -> bytes:
    event = {"event_id": uuid.uuid4().hex, "user_id": user, "item_id": item, "kind": kind}
    return json.dumps(event).encode()


def _post(
    srv: Server, body: bytes, key: str | None, stamp: str | None = None, signed: bool = True
) -> httpx.Response:
    headers = {"content-type": "application/json"}
    if key is not None:
        headers["x-api-key"] = key
    if signed:
        stamp = stamp if stamp is not None else f"{time.time():.3f}"
        headers |= _headers(stamp, body)
    return srv.client.post("/v1/feedback", content=body, headers=headers)


def _assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "detail"}
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    assert isinstance(body["error"]["detail"], dict)


def test_http_feedback_without_key_is_401(guarded: Server) -> None:
    response = _post(guarded, _body("acc-nokey"), key=None)
    _assert_error(response, 401, "unauthenticated")
    assert response.headers["www-authenticate"] == "Bearer"
    _assert_error(_post(guarded, _body("acc-nokey"), key="k-bogus"), 401, "unauthenticated")
    # Nothing was logged for that user.
    assert guarded.client.get("/v1/users/acc-nokey/history").status_code == 404


def test_http_reader_key_on_feedback_is_403(guarded: Server) -> None:
    _assert_error(_post(guarded, _body("acc-reader"), key="k-r"), 403, "forbidden")


def test_http_writer_with_valid_signature_is_200(guarded: Server) -> None:
    user = f"acc-w-{uuid.uuid4().hex}"
    response = _post(guarded, _body(user), key="k-w")
    assert response.status_code == 200, response.text
    assert response.json() == {"accepted": 1, "duplicates": 0}
    body = _body(user, "50", "dislike")
    stamp = f"{time.time():.3f}"
    headers = {"authorization": "Bearer k-w", "content-type": "application/json"}
    headers |= _headers(stamp, body)
    assert guarded.client.post("/v1/feedback", content=body, headers=headers).status_code == 200
    history = guarded.client.get(f"/v1/users/{user}/history").json()["events"]
    assert [e["kind"] for e in history] == ["dislike", "like"]


def test_http_unsigned_or_badly_signed_is_401(guarded: Server) -> None:
    user = f"acc-sig-{uuid.uuid4().hex}"
    _assert_error(_post(guarded, _body(user), key="k-w", signed=False), 401, "unauthenticated")
    body = _body(user)
    stamp = f"{time.time():.3f}"
    headers = {"x-api-key": "k-w", "content-type": "application/json"}
    headers |= _headers(stamp, body, secret="wrong")
    _assert_error(guarded.client.post("/v1/feedback", content=body, headers=headers), 401,
                  "unauthenticated")  # fmt: skip
    # A body altered after signing.
    headers = {"x-api-key": "k-w", "content-type": "application/json"} | _headers(stamp, body)
    tampered = body.replace(b'"like"', b'"dislike"')
    _assert_error(guarded.client.post("/v1/feedback", content=tampered, headers=headers), 401,
                  "unauthenticated")  # fmt: skip
    assert guarded.client.get(f"/v1/users/{user}/history").status_code == 404


def test_http_non_ascii_signature_is_401(guarded: Server) -> None:
    user = f"acc-sig8-{uuid.uuid4().hex}"
    body = _body(user)
    headers = {"x-api-key": "k-w", "content-type": "application/json",
               TIMESTAMP_HEADER: f"{time.time():.3f}", SIGNATURE_HEADER: "\xe9" * 64}  # fmt: skip
    raw = {name: value.encode("latin-1") for name, value in headers.items()}  # obs-text bytes
    _assert_error(guarded.client.post("/v1/feedback", content=body, headers=raw), 401,
                  "unauthenticated")  # fmt: skip
    assert guarded.client.get(f"/v1/users/{user}/history").status_code == 404


def test_http_replay_outside_window_is_401(guarded: Server) -> None:
    user = f"acc-replay-{uuid.uuid4().hex}"
    body = _body(user)
    sent = time.time()
    assert _post(guarded, body, key="k-w", stamp=f"{sent:.3f}").status_code == 200
    # Inside the window a replay is only acknowledged as a duplicate, never applied twice.
    again = _post(guarded, body, key="k-w", stamp=f"{sent:.3f}")
    assert again.json() == {"accepted": 0, "duplicates": 1}
    # The same body, correctly signed, but with a timestamp outside the window either side.
    for stamp in (sent - WINDOW_S - 30, time.time() + WINDOW_S + 30):
        response = _post(guarded, body, key="k-w", stamp=f"{stamp:.3f}")
        _assert_error(response, 401, "unauthenticated")
        assert "window" in response.json()["error"]["message"]
    events = guarded.client.get(f"/v1/users/{user}/history").json()["events"]
    assert len(events) == 1


def test_http_admin_routes_need_admin(guarded: Server) -> None:
    for key in ("k-w", "k-r"):
        headers = {"x-api-key": key}
        reload = guarded.client.post("/v1/admin/model/reload", headers=headers)
        _assert_error(reload, 403, "forbidden")
        _assert_error(guarded.client.post("/v1/admin/model/rollback", headers=headers), 403,
                      "forbidden")  # fmt: skip
    _assert_error(guarded.client.post("/v1/admin/model/reload"), 401, "unauthenticated")
    # An admin gets through the guard: reload of the one version is a no-op, rollback a 409.
    admin = {"x-api-key": "k-admin"}
    assert guarded.client.post("/v1/admin/model/reload", headers=admin).status_code == 200
    _assert_error(guarded.client.post("/v1/admin/model/rollback", headers=admin), 409,
                  "no_previous_version")  # fmt: skip


def test_http_reads_stay_open(guarded: Server) -> None:
    assert guarded.client.get("/v1/recommendations/3").status_code == 200
    assert guarded.client.get("/v1/model").status_code == 200
    assert guarded.client.get("/v1/model", headers={"x-api-key": "k-r"}).status_code == 200


@pytest.fixture(scope="module")
def strict(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A real server whose reads need a key too, with a small per-key token bucket."""
    env = {
        "SIGNEDREC_ACCESS__KEYS": json.dumps({**KEYS, "k-r2": "reader"}),
        "SIGNEDREC_ACCESS__READ_REQUIRES_KEY": "true",
        "SIGNEDREC_LIMITS__RATE_PER_S": "0.5",
        "SIGNEDREC_LIMITS__BURST": "3",
    }
    srv = Server(tmp_path_factory.mktemp("strict") / "s", env)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def keyed_reads(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A real server whose reads need a key, without a rate limit (refusals are not limited)."""
    env = {
        "SIGNEDREC_ACCESS__KEYS": json.dumps(KEYS),
        "SIGNEDREC_ACCESS__READ_REQUIRES_KEY": "true",
    }
    srv = Server(tmp_path_factory.mktemp("keyed") / "s", env)
    yield srv
    srv.stop()


def test_http_read_requires_key(keyed_reads: Server) -> None:
    client = keyed_reads.client
    _assert_error(client.get("/v1/recommendations/3"), 401, "unauthenticated")
    _assert_error(client.get("/v1/model", headers={"x-api-key": "k-nope"}), 401,
                  "unauthenticated")  # fmt: skip
    assert client.get("/v1/model", headers={"x-api-key": "k-r"}).status_code == 200


@pytest.mark.parametrize(
    "path", ["/v1/recommendations/3", "/v1/users/3/history", "/v1/items/21/similar", "/v1/model"]
)
def test_http_every_read_needs_key_when_configured(keyed_reads: Server, path: str) -> None:
    _assert_error(keyed_reads.client.get(path), 401, "unauthenticated")
    _assert_error(keyed_reads.client.get(path, headers={"x-api-key": "k-nope"}), 401,
                  "unauthenticated")  # fmt: skip


def test_http_guessing_keys_is_rate_limited_by_address(strict: Server) -> None:
    """Refused keys spend from the caller's address bucket: made-up keys cannot be tried at
    full speed, and a valid key keeps its own bucket meanwhile."""
    codes = [strict.client.get("/v1/model", headers={"x-api-key": f"guess-{n}"}).status_code
             for n in range(6)]  # fmt: skip
    assert codes[:3] == [401, 401, 401]
    _assert_error(strict.client.get("/v1/model", headers={"x-api-key": "guess-x"}), 429,
                  "rate_limited")  # fmt: skip
    guess = strict.client.post("/v1/feedback", content=_body("acc-guess"),
                               headers={"x-api-key": "k-r"})  # a reader may not write  # fmt: skip
    _assert_error(guess, 429, "rate_limited")
    assert strict.client.get("/v1/model", headers={"x-api-key": "k-r"}).status_code == 200


def test_http_rate_limit_429_with_retry_after(strict: Server) -> None:
    headers = {"x-api-key": "k-r2"}
    codes = [strict.client.get("/v1/recommendations/3", headers=headers) for _ in range(4)]
    assert [r.status_code for r in codes[:3]] == [200, 200, 200]
    limited = codes[3]
    _assert_error(limited, 429, "rate_limited")
    retry_after = int(limited.headers["retry-after"])
    assert retry_after >= 1
    assert limited.json()["error"]["detail"]["retry_after_s"] == retry_after
    # Every read route spends from the same bucket.
    for path in ("/v1/users/3/history", "/v1/items/21/similar", "/v1/model"):
        _assert_error(strict.client.get(path, headers=headers), 429, "rate_limited")
    # Another key has its own bucket.
    assert strict.client.get("/v1/recommendations/3", headers={"x-api-key": "k-r"}).is_success
    # Feedback spends from the same per-key bucket as reads.
    admin = {"x-api-key": "k-admin"}
    for _ in range(3):
        assert strict.client.get("/v1/recommendations/3", headers=admin).status_code == 200
    response = strict.client.post("/v1/feedback", content=_body("acc-limited"), headers=admin)
    _assert_error(response, 429, "rate_limited")
    assert "retry-after" in response.headers
    # So do the admin routes (a reload loads a whole version).
    for path in ("/v1/admin/model/reload", "/v1/admin/model/rollback"):
        _assert_error(strict.client.post(path, headers=admin), 429, "rate_limited")
    # Nothing was logged.
    writer = {"x-api-key": "k-w"}
    assert strict.client.get("/v1/users/acc-limited/history", headers=writer).status_code == 404


def test_rate_limiter_forgets_least_recent_identities() -> None:
    clock = FakeClock()
    limiter = RateLimiter(LimitsConfig(rate_per_s=1.0, burst=1.0, max_identities=2), clock)
    limiter.take("a")
    limiter.take("b")
    limiter.take("c")  # "a" is forgotten: the table stays bounded
    with pytest.raises(RateLimitedError):
        limiter.take("c")
    limiter.take("a")  # starts full again


def test_rate_limiter_with_a_table_of_zero_identities_still_limits() -> None:
    """A limiter built with max_identities=0 (the config refuses it) keeps one, not a crash."""
    clock = FakeClock()
    limiter = RateLimiter(LimitsConfig(rate_per_s=1.0, burst=1.0, max_identities=0), clock)
    limiter.take("a")
    limiter.take("b")
    with pytest.raises(RateLimitedError):
        limiter.take("b")
