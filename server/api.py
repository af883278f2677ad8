"""The litestar app: thin handlers over LiveState, msgspec wire types, one error mapping."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import uvicorn
from litestar import Litestar, MediaType, Request, Response, get, post
from litestar.datastructures import State
from litestar.exceptions import HTTPException
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import OpenAPIMediaType, OpenAPIType, Operation, RequestBody, Schema
from litestar.params import Parameter
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

import kernels
from server import rollout
from server.access import Guard, InFlight, RateLimiter
from server.artifacts import MANIFEST, list_versions, load_artifact, read_manifest, resolve
from server.batcher import MicroBatcher
from server.config import Base, Config, ServerConfig, load_config
from server.errors import (
    ArtifactError,
    ConfigError,
    ForbiddenError,
    InvalidEventError,
    InvalidRequestError,
    LogUnavailableError,
    NotReadyError,
    OverloadedError,
    RateLimitedError,
    SignedrecError,
    UnauthenticatedError,
    UnknownItemError,
    UnknownUserError,
)
from server.events import MAX_ID_CHARS, NewEvent
from server.index import set_cpu_threads
from server.state import ItemSide, LiveState, Recommendation

log = logging.getLogger("signedrec.api")
EXIT_STARTUP_FAILURE = 3  # as uvicorn.run exits when it cannot start

Id = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID_CHARS)]
# A user id is a path segment of the read routes, so it may not contain "/" (decoded before
# routing, even as %2F): such a user could post feedback but never be read back.
USER_ID_PATTERN = "^[^/]+$"
UserId = Annotated[
    str, msgspec.Meta(min_length=1, max_length=MAX_ID_CHARS, pattern=USER_ID_PATTERN)
]


# -- wire types ------------------------------------------------------------------------------
class FeedbackIn(Base):
    """One feedback event as posted to the webhook."""

    event_id: Id
    user_id: UserId
    item_id: Id
    kind: Literal["like", "dislike", "skip", "rating"]
    value: float | None = None
    ts: float | None = None


class FeedbackOut(Base):
    """How many events were new (applied) and how many were repeats (acknowledged only)."""

    accepted: int
    duplicates: int


RESPONSE_ENCODER = msgspec.json.Encoder()


class ScoredItem(Base):
    """One ranked item."""

    item_id: str
    score: float


class RecommendationsOut(Base):
    """A user's top-K."""

    user_id: str
    model_version: str
    items: list[ScoredItem]
    took_ms: float
    fallback: bool


class SimilarOut(Base):
    """Nearest items to an item."""

    item_id: str
    model_version: str
    items: list[ScoredItem]
    took_ms: float


class HistoryEvent(Base):
    """One piece of a user's feedback; event_id and ts are null for trained edges."""

    event_id: str | None
    item_id: str
    kind: str
    value: float | None
    ts: float | None


class HistoryOut(Base):
    """A user's feedback, newest first."""

    user_id: str
    events: list[HistoryEvent]


class ErrorBody(Base):
    """The one error shape."""

    code: str
    message: str
    detail: dict[str, Any] = msgspec.field(default_factory=dict)


class ErrorOut(Base):
    """Envelope of every 4xx/5xx body."""

    error: ErrorBody


class Status(Base):
    """Liveness/readiness answer."""

    status: str
    model_version: str | None = None
    events_applied: int = 0


class ModelVersion(Base):
    """One artifact version with its offline metrics."""

    version: str
    active: bool
    created_at: str | None
    metrics: dict[str, float]


class ModelOut(Base):
    """The active model and the versions available beside it."""

    active: str
    previous: str | None
    versions: list[ModelVersion]


class ReloadIn(Base):
    """Which version to load; the newest when omitted."""

    version: Id | None = None


FEEDBACK_DECODER = msgspec.json.Decoder(FeedbackIn | list[FeedbackIn])


# -- OpenAPI documentation of what the raw-body handlers accept and every error they answer -----
def _text(pattern: str | None = None) -> Schema:
    return Schema(type=OpenAPIType.STRING, min_length=1, max_length=MAX_ID_CHARS, pattern=pattern)


_NUMBER_OR_NULL = Schema(one_of=[Schema(type=OpenAPIType.NUMBER), Schema(type=OpenAPIType.NULL)])
_EVENT = Schema(
    type=OpenAPIType.OBJECT,
    required=["event_id", "user_id", "item_id", "kind"],
    properties={
        "event_id": _text(),
        "user_id": _text(USER_ID_PATTERN),
        "item_id": _text(),
        "kind": Schema(type=OpenAPIType.STRING, enum=["like", "dislike", "skip", "rating"]),
        "value": _NUMBER_OR_NULL,
        "ts": _NUMBER_OR_NULL,
    },
    additional_properties=False,
)
_BODIES: dict[str, Schema] = {
    "feedback": Schema(one_of=[_EVENT, Schema(type=OpenAPIType.ARRAY, items=_EVENT, min_items=1)]),
    "reload": Schema(
        type=OpenAPIType.OBJECT,
        properties={"version": Schema(one_of=[_text(), Schema(type=OpenAPIType.NULL)])},
        additional_properties=False,
    ),
}


@dataclass
class FeedbackOperation(Operation):
    """The feedback route's operation, with the body its handler decodes itself."""

    def __post_init__(self) -> None:
        self.request_body = RequestBody(
            content={"application/json": OpenAPIMediaType(schema=_BODIES["feedback"])},
            required=True,
        )


@dataclass
class ReloadOperation(Operation):
    """The reload route's operation, with its optional body."""

    def __post_init__(self) -> None:
        self.request_body = RequestBody(
            content={"application/json": OpenAPIMediaType(schema=_BODIES["reload"])}
        )


def _errors(*codes: int) -> dict[int, ResponseSpec]:
    return {
        code: ResponseSpec(ErrorOut, generate_examples=False, description="the one error shape")
        for code in codes
    }


READ_ERRORS = _errors(400, 401, 403, 404, 422, 429, 503)
WRITE_ERRORS = _errors(400, 401, 403, 404, 409, 413, 422, 429, 503)
RELOAD_DECODER = msgspec.json.Decoder(ReloadIn)


# -- errors ----------------------------------------------------------------------------------
class MalformedJsonError(SignedrecError):
    """The body is not JSON."""

    code = "malformed_json"


class SchemaError(SignedrecError):
    """The body is JSON but violates the schema."""

    code = "invalid_body"


class BodyTooLargeError(SignedrecError):
    """The body exceeds the configured size."""

    code = "body_too_large"


class NoPreviousVersionError(SignedrecError):
    """Rollback asked for with nothing to roll back to."""

    code = "no_previous_version"


STATUS: dict[type[SignedrecError], int] = {
    UnauthenticatedError: 401,
    ForbiddenError: 403,
    RateLimitedError: 429,
    OverloadedError: 503,
    ArtifactError: 409,
    NoPreviousVersionError: 409,
    MalformedJsonError: 400,
    SchemaError: 422,
    InvalidRequestError: 422,
    InvalidEventError: 422,
    BodyTooLargeError: 413,
    UnknownItemError: 404,
    UnknownUserError: 404,
    NotReadyError: 503,
    LogUnavailableError: 503,
}


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
    status = next((s for t, s in STATUS.items() if isinstance(exc, t)), 400)
    return _error_response(status, exc.code, exc.message, exc.detail)


def http_error(_: Request, exc: HTTPException) -> Response:
    """Framework errors (404 route, 405, 413, validation of path/query) in the same shape."""
    codes = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}
    status = exc.status_code
    code = codes.get(status, "invalid_request" if status < 500 else "internal_error")
    if status == 400 and exc.extra:
        status, code = 422, "invalid_request"
    detail = {"errors": exc.extra} if exc.extra else {}
    return _error_response(status, code, str(exc.detail), detail)


def internal_error(_: Request, exc: Exception) -> Response:
    """Anything unexpected: logged with its traceback, answered 500 without internals."""
    log.exception("unhandled error", exc_info=exc)
    return _error_response(500, "internal_error", "internal server error", {})


# -- metrics ---------------------------------------------------------------------------------
class Metrics:
    """Prometheus collectors in one registry per app."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.latency = Histogram(
            "signedrec_request_seconds", "Handler latency by route", ["route"], registry=r,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        )  # fmt: skip
        self.events = Counter("signedrec_events_applied_total", "Events applied", registry=r)
        self.duplicates = Counter("signedrec_events_duplicate_total", "Repeats", registry=r)
        self.fsync = Histogram(
            "signedrec_fsync_seconds", "Event log fsync latency", registry=r,
            buckets=(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5),
        )  # fmt: skip
        self.index_size = Gauge("signedrec_index_items", "Items in the FAISS index", registry=r)
        self.users = Gauge("signedrec_users", "Users known", registry=r)
        self.model = Gauge("signedrec_model_info", "Loaded model", ["version"], registry=r)
        self.shed = Counter(
            "signedrec_shed_total", "Requests shed over the in-flight bound", ["route"], registry=r
        )
        self.batch = Histogram(
            "signedrec_ranking_batch_size", "Recommendation requests ranked per FAISS search",
            registry=r, buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
        )  # fmt: skip
        self.snapshots = Counter(
            "signedrec_snapshots_total", "Periodic snapshots by outcome (written, failed: not "
            "written, e.g. a full disk; abandoned: a model swap or shutdown)", ["result"],
            registry=r,
        )  # fmt: skip
        self.snapshot_seconds = Histogram(
            "signedrec_snapshot_seconds", "Periodic snapshot, start of the copy to written",
            registry=r, buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )  # fmt: skip
        # Grows without bound while snapshots fail: the replay a restart would need.
        self.since_snapshot = Gauge(
            "signedrec_events_since_snapshot",
            "Events a restart would replay: applied since the last snapshot that was written "
            "(or is being written) began",
            registry=r,
        )


class CacheCollector(Collector):
    """Ranking-memo hits, misses and size, read from the live state at scrape time."""

    def __init__(self, service: Service) -> None:
        self.service = service

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        """Nothing until the state is loaded."""
        state = self.service.state
        if state is None:
            return
        lookups = CounterMetricFamily(
            "signedrec_ranking_cache", "Ranking memo lookups by result", labels=["result"]
        )
        lookups.add_metric(["hit"], state.cache.hits)
        lookups.add_metric(["miss"], state.cache.misses)
        yield lookups
        yield GaugeMetricFamily(
            "signedrec_ranking_cache_users", "Users with memoised rankings", value=len(state.cache)
        )


# -- app -------------------------------------------------------------------------------------
class Service:
    """What the handlers need: the live state once loaded, the batcher, the metrics."""

    def __init__(self, artifact: Path, state_dir: Path, config: Config) -> None:
        self.artifact = artifact
        self.state_dir = state_dir
        self.config = config
        self.metrics = Metrics()
        self.metrics.since_snapshot.set_function(
            lambda: 0 if self.state is None else self.state.since_snapshot
        )
        self.metrics.registry.register(CacheCollector(self))
        self.guard = Guard(config.access)
        self.limiter = RateLimiter(config.limits)
        self.inflight = InFlight(config.limits)
        self.root = artifact if not (artifact / MANIFEST).is_file() else artifact.parent
        self.previous: list[str] = []  # the rollback stack, oldest first
        self.pinned: str | None = None  # set by a named reload or a rollback; kept on restart
        self.swapping = asyncio.Lock()
        self.snapshotting: asyncio.Task[bool] | None = None
        self.stopping = False  # set on shutdown: a snapshot being copied gives way to close()
        self.snapshot_failures = 0  # failed writes in a row: the next try backs off
        self.snapshot_retry_at = 0.0  # time.monotonic() before which no snapshot is started
        self.state: LiveState | None = None
        self.batcher: MicroBatcher[Recommendation] | None = None
        self.loading: asyncio.Task[None] | None = None
        self.load_error: BaseException | None = None
        # Called once if loading fails; `serve` sets it to stop the server, so a process that
        # cannot serve exits (and says why) instead of answering 503 forever.
        self.on_load_failure: Callable[[], None] | None = None

    def load(self) -> LiveState:
        """Load artifact, warm kernels, replay the log (blocking; runs off the event loop)."""
        # Which version to load first: a wrong --artifact fails here, before any kernel compiles.
        path, choice = rollout.choose(self.artifact, self.state_dir)
        self.pinned, self.previous = choice.pinned, list(choice.previous)
        try:
            kernels.select_backend(self.config.kernels.backend)
        except (RuntimeError, ValueError) as exc:  # e.g. cuda requested on a host without one
            raise ConfigError(f"kernels.backend: {exc}") from None
        kernels.warmup()
        paused = self.config.server.gc_off_while_loading and gc.isenabled()
        if paused:
            gc.disable()
        try:
            state = LiveState(path, self.state_dir, self.config)
            state.open_log()
        finally:
            if paused:
                gc.enable()  # start() then collects once and freezes (tune_gc)
        return state

    async def start(self) -> None:
        """Load in a worker thread so /healthz answers while the log replays."""
        set_cpu_threads(self.config.index.cpu_threads)  # searches run on this (the loop) thread
        state = await asyncio.to_thread(self.load)
        if state.log is not None:
            state.log.on_commit = lambda seconds, _n: self.metrics.fsync.observe(seconds)
        self.batcher = MicroBatcher(state.recommend_many, on_batch=self.metrics.batch.observe)
        self.metrics.index_size.set(state.item_side.n_items)
        self.metrics.model.labels(state.item_side.version).set(1)
        self.metrics.events.inc(state.events_applied)
        # A long replay is snapshotted once serving, paced like a periodic one, so the next
        # start is quick and this one's ready is not delayed.
        self.maybe_snapshot(state)
        self.state = state
        tune_gc(self.config.server)
        log.info("ready: model %s, %d users", state.item_side.version, state.user_count())

    def maybe_snapshot(self, state: LiveState) -> None:
        """Start a paced snapshot once enough events await one, unless one is under way or a
        failed write's back-off has not run out."""
        if (
            state.since_snapshot >= self.config.log.snapshot_every_events
            and (self.snapshotting is None or self.snapshotting.done())
            and time.monotonic() >= self.snapshot_retry_at
        ):
            self.snapshotting = asyncio.create_task(self.snapshot(state))

    async def snapshot(self, state: LiveState) -> bool:
        """Copy the state in steps between requests, then encode and write it in a thread."""
        started_at = time.perf_counter()
        capture = state.begin_snapshot()
        share = self.config.log.snapshot_loop_share
        try:
            while True:
                if self.stopping:  # close() writes a final snapshot in one go
                    state.abandon_snapshot("shutting down")
                if capture.abandoned:  # or a model swap: it would mix two models' vectors
                    self.metrics.snapshots.labels("abandoned").inc()
                    return False
                started = time.perf_counter()
                if capture.step(self.config.log.snapshot_step):
                    break
                # Paced: a request needs several loop turns, and sleep(0) gives it only one
                # per step; idling in proportion lets requests through between steps.
                await asyncio.sleep((time.perf_counter() - started) * (1.0 - share) / share)
        finally:
            state.end_snapshot(capture)
        written = await asyncio.to_thread(state.save_snapshot, capture.result())
        self.metrics.snapshots.labels("written" if written else "failed").inc()
        if written:
            self.metrics.snapshot_seconds.observe(time.perf_counter() - started_at)
            self.snapshot_failures, self.snapshot_retry_at = 0, 0.0
        else:
            state.snapshot_failed(capture)
            config = self.config.log
            wait = min(config.snapshot_retry_seconds * 2.0**self.snapshot_failures,
                       config.snapshot_retry_max_seconds)  # fmt: skip
            self.snapshot_failures += 1
            self.snapshot_retry_at = time.monotonic() + wait
            log.warning("next snapshot try in %.0f s at the earliest (%d failed in a row)",
                        wait, self.snapshot_failures)  # fmt: skip
        return written

    def loaded(self, task: asyncio.Task[None]) -> None:
        """Done-callback of the loading task: a failure is logged with its cause, then reported."""
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        self.load_error = exc
        if isinstance(exc, SignedrecError):
            log.error("failed to load: %s", exc.message)
        else:
            log.error("failed to load", exc_info=exc)
        if self.on_load_failure is not None:
            self.on_load_failure()

    async def switch(self, version: str | None, rollback: bool = False) -> None:
        """Load a version off the event loop, then swap it in; the old one serves until then."""
        state = self.live()
        async with self.swapping:
            current = state.item_side.version
            if rollback:
                if not self.previous:
                    raise NoPreviousVersionError("no previous model version to roll back to")
                version = self.previous[-1]
            if version is not None and (Path(version).name != version or version.startswith(".")):
                raise InvalidRequestError(
                    f"version {version!r} is not a version name", {"field": "version"}
                )
            # Only names that exist on disk reach the filesystem: an arbitrary name (too long, odd
            # bytes) must be a clean "no such version", not an OSError from a path lookup.
            if version is not None and version not in list_versions(self.root):
                raise ArtifactError(f"no artifact version {version!r} under {self.root}")
            path = resolve(self.root) if version is None else self.root / version
            if path.name == current:
                if not rollback and version != self.pinned:
                    self.pinned = version  # "reload the newest" unpins even when it is active
                    await self._save_rollout()
                return
            side = await asyncio.to_thread(lambda: ItemSide(load_artifact(path), self.config))
            # Users' vectors are rebuilt in a worker thread; events applied meanwhile are
            # tracked and those users refolded when the new side goes live.
            plan = state.begin_swap(side)
            try:
                vectors = await asyncio.to_thread(state.build_swap, plan)
            except BaseException:
                state.abort_swap()
                raise
            state.finish_swap(plan, vectors)
            if rollback:
                self.previous.pop()
            else:
                self.previous.append(current)
            self.pinned = version
            await self._save_rollout()
            self.metrics.model.clear()
            self.metrics.model.labels(side.version).set(1)

    async def _save_rollout(self) -> None:
        """Persist the pinned version and rollback stack; a failure only costs them on restart."""
        choice = rollout.Rollout(pinned=self.pinned, previous=tuple(self.previous))
        try:
            await asyncio.to_thread(rollout.write, self.state_dir, choice)
        except OSError as exc:
            log.warning("model choice not saved (a restart serves the newest version): %s", exc)

    def describe(self) -> ModelOut:
        """The active version, the one rollback would restore, and every version on disk."""
        state = self.live()
        versions = []
        for version in list_versions(self.root):
            try:
                manifest = read_manifest(self.root / version)
            except ArtifactError:
                continue
            metrics = manifest.get("metrics", {}).get("test") or manifest.get("metrics", {}).get(
                "valid", {}
            )
            versions.append(
                ModelVersion(
                    version=version,
                    active=version == state.item_side.version,
                    created_at=manifest.get("created_at"),
                    metrics={k: float(v) for k, v in metrics.items()},
                )
            )
        return ModelOut(
            active=state.item_side.version,
            previous=self.previous[-1] if self.previous else None,
            versions=versions,
        )

    def live(self) -> LiveState:
        """The state, or NotReadyError while loading."""
        if self.state is None:
            raise NotReadyError("the service is still loading its model or replaying its log")
        return self.state


def tune_gc(config: ServerConfig) -> None:
    """Freeze what loading built and space out young collections (see ServerConfig)."""
    if config.gc_freeze_after_load:
        gc.collect()
        gc.freeze()
    if config.gc_threshold0 > 0:
        _, gen1, gen2 = gc.get_threshold()
        gc.set_threshold(config.gc_threshold0, gen1, gen2)


def _client(request: Request) -> str:
    return request.client.host if request.client is not None else "unknown"


def _service(request: Request) -> Service:
    return request.app.state.service  # type: ignore[no-any-return]


@get("/healthz", sync_to_thread=False)
def healthz() -> Status:
    """Liveness: the process answers."""
    return Status(status="ok")


@get("/readyz", sync_to_thread=False)
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
    user_id: str,
    k: Annotated[int | None, Parameter(ge=1)] = None,
    include_liked: bool = False,
) -> Response[RecommendationsOut]:
    """Top-K for a user: no items they gave feedback on, dislike look-alikes pushed down."""
    started = time.perf_counter()
    service = _service(request)
    state = service.live()
    identity = service.guard.check("read", request.headers, _client(request))
    service.limiter.take(identity)
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
    identity = service.guard.check("write", request.headers, _client(request))
    service.limiter.take(identity)
    try:
        service.inflight.refuse_write()
    except OverloadedError:
        service.metrics.shed.labels("feedback").inc()
        raise
    service.inflight.current += 1
    try:
        return await _feedback(service, state, request, started)
    finally:
        service.inflight.current -= 1


async def _feedback(
    service: Service, state: LiveState, request: Request, started: float
) -> FeedbackOut:
    body = await request.body()
    limits = state.config.server
    if len(body) > limits.max_body_bytes:
        raise BodyTooLargeError(f"body exceeds {limits.max_body_bytes} bytes")
    service.guard.verify_signature(request.headers, body)
    try:
        decoded = FEEDBACK_DECODER.decode(body)
    except msgspec.ValidationError as exc:
        raise SchemaError(str(exc), {"problem": str(exc)}) from None
    except msgspec.DecodeError as exc:
        raise MalformedJsonError(f"body is not valid JSON: {exc}") from None
    events = decoded if isinstance(decoded, list) else [decoded]
    if not events:
        raise SchemaError("an empty list of events")
    if len(events) > limits.max_events_per_batch:
        raise SchemaError(f"at most {limits.max_events_per_batch} events per request")
    state.validate(events)
    fresh, duplicates = state.split_duplicates(events)
    if fresh:
        now = time.time()
        new = [
            NewEvent(event_id=e.event_id, user_id=e.user_id, item_id=e.item_id, kind=e.kind,
                     value=e.value, ts=now if e.ts is None else e.ts)
            for e in fresh
        ]  # fmt: skip
        state.reserve(fresh)
        try:
            records = await state.log.append(new)  # type: ignore[union-attr]
        except BaseException:
            state.release(fresh)
            raise
        state.apply(records)
        service.metrics.events.inc(len(records))
        service.maybe_snapshot(state)
    service.metrics.duplicates.inc(duplicates)
    service.metrics.latency.labels("feedback").observe(time.perf_counter() - started)
    return FeedbackOut(accepted=len(fresh), duplicates=duplicates)


@get("/v1/users/{user_id:str}/history", responses=READ_ERRORS)
async def history(request: Request, user_id: str, limit: int | None = None) -> HistoryOut:
    """The user's signed feedback, newest first."""
    started = time.perf_counter()
    service = _service(request)
    state = service.live()
    service.limiter.take(service.guard.check("read", request.headers, _client(request)))
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
    request: Request, item_id: str, k: Annotated[int | None, Parameter(ge=1)] = None
) -> SimilarOut:
    """Nearest items by cosine of the model's item vectors."""
    started = time.perf_counter()
    service = _service(request)
    state = service.live()
    service.limiter.take(service.guard.check("read", request.headers, _client(request)))
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
    service.limiter.take(service.guard.check("read", request.headers, _client(request)))
    return service.describe()


@post(
    "/v1/admin/model/reload",
    status_code=200,
    responses=WRITE_ERRORS,
    operation_class=ReloadOperation,
)
async def reload_model(request: Request) -> ModelOut:
    """Swap in the newest (or a named) version while requests keep flowing."""
    service = _service(request)
    service.guard.check("admin", request.headers, _client(request))
    body = await request.body()
    try:
        wanted = RELOAD_DECODER.decode(body) if body.strip() else ReloadIn()
    except msgspec.ValidationError as exc:
        raise SchemaError(str(exc), {"problem": str(exc)}) from None
    except msgspec.DecodeError as exc:
        raise MalformedJsonError(f"body is not valid JSON: {exc}") from None
    await service.switch(wanted.version)
    return service.describe()


@post("/v1/admin/model/rollback", status_code=200, responses=WRITE_ERRORS)
async def rollback_model(request: Request) -> ModelOut:
    """Go back to the version that was active before the last reload."""
    service = _service(request)
    service.guard.check("admin", request.headers, _client(request))
    await service.switch(None, rollback=True)
    return service.describe()


def create_app(artifact: Path, state_dir: Path, config: Config) -> Litestar:
    """Build the app; loading starts at startup in the background, /readyz says when done."""
    service = Service(artifact, state_dir, config)

    async def on_startup(app: Litestar) -> None:
        service.loading = asyncio.create_task(service.start())
        service.loading.add_done_callback(service.loaded)

    async def on_shutdown(app: Litestar) -> None:
        if service.loading is not None and not service.loading.done():
            await asyncio.wait([service.loading])
        service.stopping = True
        if service.snapshotting is not None:
            await asyncio.wait([service.snapshotting])
        if service.state is not None:
            await service.state.close()

    return Litestar(
        route_handlers=[
            healthz,
            readyz,
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
    """Per-artifact state under the user's data directory (XDG), never inside the package."""
    # An unset or empty XDG_DATA_HOME means the default (XDG Base Directory spec).
    base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "signedrec" / artifact.resolve().name


def bind_listener(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (IPv6 when the host is), for uvicorn to listen on."""
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
    """``signedrec serve``: resolve artifact/state/config, then run uvicorn on uvloop."""
    from server.cli import DEFAULT_ARTIFACTS, DEFAULT_DATA, build_default

    config = load_config(args.config)
    artifact = DEFAULT_ARTIFACTS if args.artifact is None else Path(args.artifact)
    host = args.host or config.server.host
    port = args.port if args.port is not None else config.server.port
    state_dir = Path(args.state_dir or config.server.state_dir or default_state_dir(artifact))
    app = create_app(artifact, state_dir, config)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            loop="uvloop",
            http="httptools",
            log_level=config.server.log_level,
            access_log=False,
            timeout_graceful_shutdown=5,
        )
    )
    # Bind before anything loads: a taken port then fails in milliseconds instead of after
    # training, loading and replaying the event log.
    try:
        sock = bind_listener(host, port)
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", host, port, exc)
        return EXIT_STARTUP_FAILURE
    log.info("listening on http://%s:%d; loading %s", host, sock.getsockname()[1], artifact)
    if args.artifact is None and not list_versions(artifact):
        log.info("no embedded default artifact yet: training it from %s", DEFAULT_DATA)
        build_default()
    service: Service = app.state["service"]
    service.on_load_failure = lambda: setattr(server, "should_exit", True)
    server.run(sockets=[sock])
    failure = service.load_error
    if isinstance(failure, SignedrecError):
        raise failure  # the CLI prints its message and exits 2, like any bad input
    if failure is not None or not server.started:
        return EXIT_STARTUP_FAILURE  # a bug: its traceback is in the log
    return 0
