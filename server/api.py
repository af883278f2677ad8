"""The litestar app: thin route handlers over the Service, one error mapping, `serve`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import time
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import msgspec
import uvicorn
from litestar import (
    HttpMethod,
    Litestar,
    MediaType,
    Request,
    Response,
    Router,
    get,
    head,
    post,
    route,
)
from litestar.datastructures import State
from litestar.exceptions import HTTPException, InternalServerException, NotFoundException
from litestar.openapi import OpenAPIConfig
from litestar.params import FromPath, FromQuery, Parameter
from prometheus_client import generate_latest

from server.access import admit
from server.artifacts import list_versions, root_of
from server.config import Config, RankingConfig, ServerConfig, load_config
from server.default import DEFAULT_ARTIFACTS, DEFAULT_DATA, build_default
from server.errors import (
    ArtifactError,
    BodyTooLargeError,
    ForbiddenError,
    IncompleteBodyError,
    InvalidEventError,
    InvalidRequestError,
    LogCorruptError,
    LogUnavailableError,
    MalformedJsonError,
    NoPreviousVersionError,
    NotReadyError,
    OverloadedError,
    RateLimitedError,
    RolloutNotSavedError,
    SchemaError,
    SignedrecError,
    UnauthenticatedError,
    UnknownItemError,
    UnknownUserError,
    UnknownVersionError,
)
from server.events import NewEvent
from server.http_guard import guarded_protocol
from server.service import Service
from server.state import LiveState
from server.wire import (
    FEEDBACK_DECODER,
    NOT_READY,
    READ_ERRORS,
    RELOAD_DECODER,
    RESPONSE_ENCODER,
    WRITE_ERRORS,
    ErrorBody,
    ErrorOut,
    FeedbackOperation,
    FeedbackOut,
    HistoryEvent,
    HistoryOut,
    ModelOut,
    RecommendationsOut,
    ReloadIn,
    ReloadOperation,
    ScoredItem,
    SimilarOut,
    Status,
)

log = logging.getLogger("signedrec.api")
EXIT_STARTUP_FAILURE = 3  # as uvicorn.run exits when it cannot start
API_VERSION = "1"  # the routes under /v1, as the OpenAPI document's info.version


# -- errors ----------------------------------------------------------------------------------
STATUS: dict[type[SignedrecError], int] = {
    UnauthenticatedError: 401,
    ForbiddenError: 403,
    RateLimitedError: 429,
    OverloadedError: 503,
    ArtifactError: 409,
    NoPreviousVersionError: 409,
    MalformedJsonError: 400,
    IncompleteBodyError: 400,
    SchemaError: 422,
    InvalidRequestError: 422,
    InvalidEventError: 422,
    BodyTooLargeError: 413,
    UnknownItemError: 404,
    UnknownUserError: 404,
    UnknownVersionError: 404,
    NotReadyError: 503,
    LogUnavailableError: 503,
    RolloutNotSavedError: 503,
    LogCorruptError: 500,  # the server's own log: nothing a client can fix
}
# A domain error without a status is a server fault (config, data, a new class): never a 4xx.
UNMAPPED_STATUS = 500


def _error_response(status: int, code: str, message: str, detail: dict[str, Any]) -> Response:
    body = msgspec.json.encode(ErrorOut(ErrorBody(code=code, message=message, detail=detail)))
    headers = None
    if status in (429, 503):
        headers = {"Retry-After": str(detail.get("retry_after_s", 1))}
    if status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    return Response(body, status_code=status, media_type=MediaType.JSON, headers=headers)


def domain_error(_: Request, exc: SignedrecError) -> Response:
    """Map a domain exception to its status code and the one error body."""
    status = next((s for t, s in STATUS.items() if isinstance(exc, t)), UNMAPPED_STATUS)
    if status >= 500 and status != 503:
        log.error("%s (answered %d): %s", exc.code, status, exc.message)
    return _error_response(status, exc.code, exc.message, exc.detail)


def http_error(_: Request, exc: HTTPException) -> Response:
    """Framework errors (404 route, 405, 413, validation of path/query) in the same shape."""
    codes = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}
    status = exc.status_code
    code = codes.get(status, "invalid_request" if status < 500 else "internal_error")
    if status == 400 and exc.extra:
        status, code = 422, "invalid_request"
    detail: dict[str, Any] = {"errors": exc.extra} if exc.extra else {}
    first = exc.extra[0] if isinstance(exc.extra, list) and exc.extra else None
    if isinstance(first, dict) and "key" in first:
        detail["field"] = first["key"]  # as a domain check names it: one place to look
    response = _error_response(status, code, str(exc.detail), detail)
    if status == 405 and exc.headers and "allow" in {h.lower() for h in exc.headers}:
        response.headers.update(exc.headers)  # RFC 9110: a 405 names the methods allowed
    return response


@get("/{path:str}", include_in_schema=False, sync_to_thread=False)
def schema_not_found(path: FromPath[str]) -> None:
    """A schema page that does not exist: the one JSON error body, not litestar's HTML page."""
    raise NotFoundException(f"no schema page {path!r}; the schema is /schema/openapi.json")


def internal_error(_: Request, exc: Exception) -> Response:
    """Anything unexpected: logged with its traceback, answered 500 without internals."""
    log.exception("unhandled error", exc_info=exc)
    return _error_response(500, "internal_error", "internal server error", {})


# The bounds are config (ranking.max_k, server.history_max_limit): checked in the handlers,
# and named here for the schema with their defaults.
K_PARAMETER = Parameter(
    ge=1,
    description=f"how many items, at most ranking.max_k ({RankingConfig().max_k} by default); "
    f"ranking.default_k ({RankingConfig().default_k} by default) when omitted",
)
LIMIT_PARAMETER = Parameter(
    description="how many events, 1 to server.history_max_limit "
    f"({ServerConfig().history_max_limit} by default); server.history_default_limit "
    f"({ServerConfig().history_default_limit} by default) when omitted",
)


def _client(request: Request) -> str:
    return request.client.host if request.client is not None else "unknown"


def _service(request: Request) -> Service:
    return request.app.state.service  # type: ignore[no-any-return]


@get("/healthz", sync_to_thread=False)
def healthz(request: Request) -> Status:
    """Liveness: the process answers (and, once loaded, with what it serves)."""
    state = _service(request).state
    if state is None:
        return Status(status="ok")
    return Status(status="ok", model_version=state.item_side.version,
                  events_applied=state.events_applied)  # fmt: skip


@get("/readyz", sync_to_thread=False, responses=NOT_READY)
def readyz(request: Request) -> Response:
    """Readiness: artifact loaded and log replayed."""
    service = _service(request)
    if service.state is None:
        failed = service.loading is not None and service.loading.done()
        return _error_response(503, "not_ready", "failed to load" if failed else "loading", {})
    s = service.state
    body = Status(
        status="ready", model_version=s.item_side.version, events_applied=s.events_applied
    )
    return Response(msgspec.json.encode(body), media_type=MediaType.JSON)


@head("/healthz", sync_to_thread=False, include_in_schema=False)
def healthz_head() -> None:
    """Liveness for probes that send HEAD (load balancers, uptime monitors)."""


@head("/readyz", sync_to_thread=False, include_in_schema=False)
def readyz_head(request: Request) -> Response[None]:
    """Readiness for probes that send HEAD: the status of GET /readyz, no body."""
    return Response(None, status_code=200 if _service(request).state is not None else 503)


@route(["/healthz", "/readyz"], http_method=HttpMethod.OPTIONS, sync_to_thread=False,
       include_in_schema=False)  # fmt: skip
def probes_options() -> Response[None]:
    """The probes' methods: litestar's own OPTIONS answer names only the first handler's."""
    return Response(None, status_code=204, headers={"Allow": "GET, HEAD, OPTIONS"})


@get("/metrics", sync_to_thread=False, media_type=MediaType.TEXT)
def metrics(request: Request) -> Response:
    """Prometheus text exposition."""
    service = _service(request)
    if service.state is not None:
        service.metrics.users.set(service.state.user_count())
    return Response(
        generate_latest(service.metrics.registry), media_type="text/plain; version=0.0.4"
    )


@get("/v1/recommendations/{user_id:str}", responses=READ_ERRORS)
async def recommendations(
    request: Request,
    user_id: FromPath[str],
    k: Annotated[int | None, K_PARAMETER] = None,
    include_liked: FromQuery[bool] = False,
) -> Response[RecommendationsOut]:
    """Top-K for a user: no items they gave feedback on, dislike look-alikes pushed down."""
    started = time.perf_counter()
    service = _service(request)
    state = service.live()
    admit(service.guard, service.limiter, "read", request.headers, _client(request))
    k = state.config.ranking.default_k if k is None else k
    state.check_k(k)
    if service.inflight.over():
        # Degrade rather than queue: the popularity list costs nothing to serve.
        service.metrics.shed.labels("recommendations").inc()
        result = state.popular(k, user_id, include_liked)
    else:
        service.inflight.current += 1
        try:
            result = await service.batcher.submit(user_id, k, include_liked)  # type: ignore[union-attr]
        finally:
            service.inflight.current -= 1
    took = (time.perf_counter() - started) * 1000.0
    service.metrics.latency.labels("recommendations").observe(took / 1000.0)
    body = RecommendationsOut(
        user_id=user_id,
        model_version=result.version,
        items=[ScoredItem(i, s) for i, s in zip(result.items, result.scores, strict=True)],
        took_ms=round(took, 3),
        fallback=result.fallback,
    )
    # Encoded here with one reused encoder: the hottest route skips litestar's serialisation hooks.
    return Response(RESPONSE_ENCODER.encode(body), media_type=MediaType.JSON)


@post("/v1/feedback", status_code=200, responses=WRITE_ERRORS, operation_class=FeedbackOperation)
async def feedback(request: Request) -> FeedbackOut:
    """Log events durably (group-commit fsync), then apply them; repeats are acknowledged."""
    started = time.perf_counter()
    service = _service(request)
    state = service.live()
    admit(service.guard, service.limiter, "write", request.headers, _client(request))
    # Read before it counts: a body still arriving is no work of ours, and slow uploads
    # holding the in-flight bound would shed every other client's writes.
    body = await _read_body(request)
    try:
        service.inflight.refuse_write()
    except OverloadedError:
        service.metrics.shed.labels("feedback").inc()
        raise
    service.inflight.current += 1
    try:
        return await _feedback(service, state, request, body, started)
    finally:
        service.inflight.current -= 1


async def _feedback(
    service: Service, state: LiveState, request: Request, body: bytes, started: float
) -> FeedbackOut:
    limits = state.config.server
    if len(body) > limits.max_body_bytes:
        raise BodyTooLargeError(f"body exceeds {limits.max_body_bytes} bytes")
    service.guard.verify_signature(request.headers, body)
    decoded = _decode(FEEDBACK_DECODER, body)
    events = decoded if isinstance(decoded, list) else [decoded]
    if not events:
        raise SchemaError("an empty list of events")
    if len(events) > limits.max_events_per_batch:
        raise SchemaError(f"at most {limits.max_events_per_batch} events per request")
    now = time.time()
    new = [
        NewEvent(event_id=e.event_id, user_id=e.user_id, item_id=e.item_id, kind=e.kind,
                 value=e.value, ts=now if e.ts is None else e.ts)
        for e in events
    ]  # fmt: skip
    state.validate(new)
    # A repeat of an id whose write is in flight (a client retrying after a timeout) waits for
    # it: acknowledged as a duplicate only once that write is applied, written again if it failed.
    while waiting := state.in_flight(new):
        await asyncio.wait([reservation.wait() for reservation in waiting])
    fresh, duplicates = state.split_duplicates(new)
    if fresh:
        state.reserve(fresh)
        # Shielded: a request cancelled mid-write (a client gone, a shutdown's grace period over)
        # must still apply what the log committed, or the live state and its snapshots would
        # miss an event the log holds.
        write = asyncio.ensure_future(_log_and_apply(service, state, fresh))
        write.add_done_callback(_retrieve)
        await asyncio.shield(write)
    service.metrics.duplicates.inc(duplicates)
    service.metrics.latency.labels("feedback").observe(time.perf_counter() - started)
    return FeedbackOut(accepted=len(fresh), duplicates=duplicates)


async def _read_body(request: Request) -> bytes:
    """The whole body; one that ends early is the client's fault (400), not a 500."""
    try:
        return await request.body()
    except InternalServerException as exc:  # litestar's answer to a disconnect mid-body
        raise IncompleteBodyError(f"the request body ended early: {exc.detail}") from None


def _decode(decoder: msgspec.json.Decoder[Any], body: bytes) -> Any:
    """A JSON body as its wire type; a 400 for bytes that are not JSON (or not UTF-8), a 422
    for JSON of the wrong shape."""
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise SchemaError(str(exc), {"problem": str(exc)}) from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise MalformedJsonError(f"body is not valid JSON: {exc}") from None


async def _log_and_apply(service: Service, state: LiveState, fresh: list[NewEvent]) -> None:
    """Write reserved events to the log, then apply them; free their ids if the write fails."""
    try:
        records = await state.log.append(fresh)  # type: ignore[union-attr]
    except BaseException:
        state.release(fresh)
        raise
    try:
        state.apply(records)
    except Exception:
        # Logged here, not only by the request's error handler: its client may be gone.
        log.exception("events seq %d..%d are in the log but not applied (a restart replays "
                      "them)", records[0].seq, records[-1].seq)  # fmt: skip
        raise
    service.metrics.events.inc(len(records))
    service.maybe_snapshot(state)


def _retrieve(task: asyncio.Future[None]) -> None:
    """Mark a shielded write's error as seen (its request may be gone; it was logged)."""
    if not task.cancelled():
        task.exception()


@get("/v1/users/{user_id:str}/history", responses=READ_ERRORS)
async def history(
    request: Request, user_id: FromPath[str], limit: Annotated[int | None, LIMIT_PARAMETER] = None
) -> HistoryOut:
    """The user's signed feedback, newest first."""
    started = time.perf_counter()
    service = _service(request)
    state = service.live()
    admit(service.guard, service.limiter, "read", request.headers, _client(request))
    limits = state.config.server
    limit = limits.history_default_limit if limit is None else limit
    if not 1 <= limit <= limits.history_max_limit:
        raise InvalidRequestError(
            f"limit must be between 1 and {limits.history_max_limit}", {"field": "limit"}
        )
    rows = state.history(user_id, limit)
    if not rows and state.users.get(user_id) is None:
        raise UnknownUserError(f"user {user_id!r} has no feedback", {"user_id": user_id})
    service.metrics.latency.labels("history").observe(time.perf_counter() - started)
    return HistoryOut(user_id=user_id, events=[HistoryEvent(*row) for row in rows])


@get("/v1/items/{item_id:str}/similar", responses=READ_ERRORS)
async def similar(
    request: Request, item_id: FromPath[str], k: Annotated[int | None, K_PARAMETER] = None
) -> SimilarOut:
    """Nearest items by cosine of the model's item vectors."""
    started = time.perf_counter()
    service = _service(request)
    state = service.live()
    admit(service.guard, service.limiter, "read", request.headers, _client(request))
    k = state.config.ranking.default_k if k is None else k
    items, scores = state.similar(item_id, k)
    took = time.perf_counter() - started
    service.metrics.latency.labels("similar").observe(took)
    return SimilarOut(
        item_id=item_id,
        model_version=state.item_side.version,
        items=[ScoredItem(i, s) for i, s in zip(items, scores, strict=True)],
        took_ms=round(took * 1000.0, 3),
    )


@get("/v1/model", responses=READ_ERRORS)
async def model(request: Request) -> ModelOut:
    """The active model version, the rollback target, and every version with its metrics."""
    service = _service(request)
    admit(service.guard, service.limiter, "read", request.headers, _client(request))
    return await service.describe()


@post(
    "/v1/admin/model/reload",
    status_code=200,
    responses=WRITE_ERRORS,
    operation_class=ReloadOperation,
)
async def reload_model(request: Request) -> ModelOut:
    """Swap in the newest (or a named) version while requests keep flowing."""
    service = _service(request)
    # Admin calls spend from the caller's bucket like any other: a reload loads a whole version.
    admit(service.guard, service.limiter, "admin", request.headers, _client(request))
    body = await _read_body(request)
    wanted = _decode(RELOAD_DECODER, body) if body.strip() else ReloadIn()
    await service.switch(wanted.version)
    return await service.describe()


@post("/v1/admin/model/rollback", status_code=200, responses=WRITE_ERRORS)
async def rollback_model(request: Request) -> ModelOut:
    """Go back to the version that was active before the last reload."""
    service = _service(request)
    admit(service.guard, service.limiter, "admin", request.headers, _client(request))
    await service.switch(None, rollback=True)
    return await service.describe()


def create_app(artifact: Path, state_dir: Path, config: Config) -> Litestar:
    """Build the app; loading starts at startup in the background, /readyz says when done."""
    service = Service(artifact, state_dir, config)

    async def on_startup(app: Litestar) -> None:
        service.loading = asyncio.create_task(service.start())
        service.loading.add_done_callback(service.loaded)

    async def on_shutdown(app: Litestar) -> None:
        # First: a replay under way stops at its next batch instead of holding the shutdown
        # (granian cancels a shutdown hook after its kill timeout: exit 3, no clean stop).
        service.stopping = True
        if service.loading is not None and not service.loading.done():
            await asyncio.wait([service.loading])
        if service.snapshotting is not None:
            await asyncio.wait([service.snapshotting])
        if service.state is not None:
            await service.state.close()

    return Litestar(
        route_handlers=[
            # Before the probes' GET and HEAD: a route creates its own OPTIONS handler with the
            # first one registered on its path, and a second would be refused.
            probes_options,
            healthz,
            healthz_head,
            readyz,
            readyz_head,
            metrics,
            recommendations,
            feedback,
            history,
            similar,
            model,
            reload_model,
            rollback_model,
        ],
        on_startup=[on_startup],
        on_shutdown=[on_shutdown],
        state=State({"service": service}),
        openapi_config=OpenAPIConfig(
            title="signedrec",
            version=API_VERSION,
            openapi_router=Router(
                "/schema", route_handlers=[schema_not_found], include_in_schema=False
            ),
        ),
        exception_handlers={
            SignedrecError: domain_error,
            HTTPException: http_error,
            Exception: internal_error,
        },
        request_max_body_size=config.server.max_body_bytes,
        debug=False,
        logging_config=None,  # keep the CLI's one log format; our handlers do the logging
    )


def default_state_dir(artifact: Path) -> Path:
    """Per-root state under the user's data directory (XDG), never inside the package; a
    version of a root shares the root's, so serving one by name keeps the users' feedback."""
    # An unset or empty XDG_DATA_HOME means the default (XDG Base Directory spec).
    base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "signedrec" / root_of(artifact.resolve()).name


def bind_listener(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (IPv6 when the host is): uvicorn listens on it, for
    granian it is the check that the address is free before anything loads."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family=family)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def serve(args: argparse.Namespace) -> int:
    """``signedrec serve``: resolve artifact/state/config, then run the HTTP front on uvloop."""
    config = load_config(args.config)
    artifact = DEFAULT_ARTIFACTS if args.artifact is None else Path(args.artifact)
    host = args.host or config.server.host
    port = args.port if args.port is not None else config.server.port
    state_dir = Path(args.state_dir or config.server.state_dir or default_state_dir(artifact))
    app = create_app(artifact, state_dir, config)
    # Bind before anything loads: a taken port then fails in milliseconds instead of after
    # training, loading and replaying the event log.
    try:
        sock = bind_listener(host, port)
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", host, port, exc)
        return EXIT_STARTUP_FAILURE
    with StopSignals() as stops:
        if args.artifact is None and not list_versions(artifact):
            # Bound but not accepting yet: connections are refused until this is done (~20 s).
            log.info("no embedded default artifact yet: training it from %s before serving",
                     DEFAULT_DATA)  # fmt: skip
            if not build_default_unless_stopped():
                return 0
        if stops.received:
            log.info("%s before serving: stopped", stops.received[0])
            return 0
        log.info("listening on http://%s:%d (%s); loading %s", host, sock.getsockname()[1],
                 config.server.http, artifact)  # fmt: skip
        service: Service = app.state["service"]
        run = run_granian if config.server.http == "granian" else run_uvicorn
        started = run(app, sock, service, config, stops)
    failure = service.load_error
    if isinstance(failure, SignedrecError):
        raise failure  # the CLI prints its message and exits 2, like any bad input
    if failure is not None or not started:
        return EXIT_STARTUP_FAILURE  # a bug: its traceback is in the log
    return 0


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """SIGTERM and SIGINT from the start of ``serve`` until its front takes them over, and in
    the gaps between (after the default's training, before a front's own handlers): each is
    remembered and honoured as soon as a front runs, instead of being lost or killing the
    process by the signal's default action."""

    def __init__(self) -> None:
        self.received: list[str] = []
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        self._previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
        self.remember_again()
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _remember(self, signum: int, frame: FrameType | None) -> None:
        self.received.append(signal.Signals(signum).name)

    def remember_again(self) -> None:
        """Take the signals back once a front that replaced the handlers has stopped."""
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._remember)


class _StopRequested(Exception):
    """SIGTERM or SIGINT arrived while the default was training."""


def _request_stop(signum: int, frame: FrameType | None) -> None:
    """Unwind the training at its next Python step (a partial version is removed on the way)."""
    raise _StopRequested(signal.Signals(signum).name)


def build_default_unless_stopped() -> bool:
    """Train the missing default before serving; False when a stop signal ended it, so a
    SIGTERM'd serve exits 0 whether it came before, during or after that training."""
    previous = {sig: signal.signal(sig, _request_stop) for sig in STOP_SIGNALS}
    try:
        build_default()
    except _StopRequested as stop:
        log.info("%s while training the default: stopped before serving, nothing written",
                 stop.args[0])  # fmt: skip
        return False
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return True


def run_uvicorn(
    app: Litestar, sock: socket.socket, service: Service, config: Config, stops: StopSignals
) -> bool:
    """Serve ``app`` on ``sock`` with uvicorn (httptools on the loop thread); whether it started."""
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            loop="uvloop",
            http=guarded_protocol(
                config.server.request_read_timeout_s, config.server.max_pipelined
            ),
            log_level=config.server.log_level,
            access_log=False,
            timeout_graceful_shutdown=config.server.graceful_shutdown_s,
            backlog=config.server.listen_backlog,
        )
    )
    service.on_load_failure = lambda: setattr(server, "should_exit", True)

    def exit_soon(signum: int, frame: FrameType | None) -> None:
        # Until uvicorn installs its own handlers (a signal there was lost), and after its
        # graceful shutdown, when it raises the stop signal again: then a no-op, so a SIGTERM'd
        # serve exits 0 as it does under granian instead of dying by the signal.
        server.should_exit = True

    for sig in STOP_SIGNALS:
        signal.signal(sig, exit_soon)
    server.should_exit = bool(stops.received)  # one that came in the gap before
    try:
        server.run(sockets=[sock])
    finally:
        stops.remember_again()
    return bool(server.started)


def run_granian(
    app: Litestar, sock: socket.socket, service: Service, config: Config, stops: StopSignals
) -> bool:
    """Serve ``app`` with granian embedded in this process (HTTP on its Rust threads, the app on
    this uvloop loop); whether it started. SIGTERM and SIGINT stop it gracefully."""
    import uvloop
    from granian.constants import Interfaces
    from granian.log import LogLevels
    from granian.server.embed import Server

    host, port = sock.getsockname()[:2]
    # granian binds its own socket (SO_REUSEPORT on Linux), so the check socket goes first.
    sock.close()
    server = Server(
        app,
        address=host,
        port=port,
        interface=Interfaces.ASGI,
        runtime_threads=config.server.http_threads,
        backlog=config.server.listen_backlog,
        websockets=False,
        log_level=LogLevels(config.server.log_level),
        # Its messages go through the CLI's handler and format, like everything else's.
        log_dictconfig={"loggers": {"_granian": {"handlers": [], "propagate": True}}},
        log_access=False,
    )
    server.workers_kill_timeout = config.server.graceful_shutdown_s
    stop_signalled = False

    def stop() -> None:
        nonlocal stop_signalled
        stop_signalled = True
        server.stop()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for signum in STOP_SIGNALS:
            loop.add_signal_handler(signum, stop)
        if stops.received:  # one that came while granian was being set up
            loop.call_soon(stop)
        service.on_load_failure = server.stop
        await server.serve()

    try:
        uvloop.run(main())
    except TimeoutError:
        if not stop_signalled:
            log.exception("granian stopped with an error")
            return False
        # Its workers did not join within the grace period: a client connection was still
        # open (a stalled upload, say). The app's shutdown ran; the stop is as graceful as
        # uvicorn's, which closes such connections at the same point.
        log.warning("connections still open %d s after the stop signal were closed "
                    "(server.graceful_shutdown_s)", config.server.graceful_shutdown_s)  # fmt: skip
    except Exception:  # granian's own startup errors
        log.exception("granian stopped with an error")
        return False
    finally:
        stops.remember_again()  # the loop's handlers went with it
    # The app's startup hook is what starts loading: it ran, so the server listened.
    return service.loading is not None
