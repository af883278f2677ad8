"""The service behind the handlers: loading, periodic snapshots, model swaps and rollbacks."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kernels
from server import rollout
from server.access import Guard, InFlight, RateLimiter
from server.artifacts import (
    inspect_version,
    is_version,
    list_versions,
    load_artifact,
    model_id_of,
    numeric_metrics,
    read_manifest,
    resolve,
    root_of,
)
from server.batcher import MicroBatcher
from server.config import Config, ServerConfig
from server.errors import (
    ArtifactError,
    ConfigError,
    InvalidRequestError,
    LoadStopped,
    NoPreviousVersionError,
    NotReadyError,
    RolloutNotSavedError,
    SignedrecError,
    StateMismatchError,
    UnknownVersionError,
)
from server.index import set_cpu_threads
from server.metrics import CacheCollector, LogCollector, Metrics
from server.state import ItemSide, LiveState, Recommendation, SnapshotCapture
from server.wire import ModelOut, ModelVersion

log = logging.getLogger("signedrec.service")

SNAPSHOT_MAX_DOUBLINGS = 64


class Service:
    """What the handlers need: the live state once loaded, the batcher, the metrics."""

    def __init__(self, artifact: Path, state_dir: Path, config: Config) -> None:
        # Absolute, so a version dir given as "." still has its root as parent and a name.
        self.artifact = Path(os.path.abspath(artifact))
        self.state_dir = state_dir
        self.config = config
        self.metrics = Metrics()
        self.metrics.since_snapshot.set_function(
            lambda: 0 if self.state is None else self.state.restart_replay()
        )
        self.metrics.registry.register(CacheCollector(lambda: self.state))
        self.metrics.registry.register(LogCollector(lambda: self.state))
        self.guard = Guard(config.access)
        self.limiter = RateLimiter(config.limits)
        self.inflight = InFlight(config.limits)
        self.root = root_of(self.artifact)
        self.previous: list[str] = []  # the rollback stack, oldest first
        self.pinned: str | None = None  # set by a named reload or a rollback; kept on restart
        self.swapping = asyncio.Lock()
        self.snapshotting: asyncio.Task[bool] | None = None
        # Set on shutdown: a replay under way stops, a snapshot being copied gives way to close().
        self.stopping = False
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
        try:
            kernels.warmup()
        except Exception as exc:
            if kernels.backend != "cuda":
                raise
            # e.g. numba-cuda 0.30 beside numpy 2.5 (np.row_stack is gone): seen on a GPU host
            # whose device checks passed; say which setting to change instead of a traceback.
            raise ConfigError(
                f"kernels.backend: the CUDA kernels cannot be compiled here "
                f"({type(exc).__name__}: {exc}); set kernels.backend=cpu or auto"
            ) from exc
        paused = self.config.server.gc_off_while_loading and gc.isenabled()
        if paused:
            gc.disable()
        try:
            return self._open_first_usable(path, rollout.older_versions(self.artifact, choice,
                                                                        path))  # fmt: skip
        except SignedrecError as exc:
            if choice.pinned is not None and not is_version(self.artifact):
                # The operator named a root: say why this version and not the newest.
                exc.message += (f" (version {choice.pinned} is pinned by "
                                f"{self.state_dir / rollout.FILE}, written by an earlier reload "
                                "or rollback; delete that file to serve the newest)")  # fmt: skip
            raise
        finally:
            if paused:
                gc.enable()  # start() then collects once and freezes (tune_gc)

    def _open_first_usable(self, path: Path, older: list[Path]) -> LiveState:
        """Open ``path`` on the state dir, else the newest of ``older`` that can serve it.

        The newest version may refuse this state dir (another item catalogue, trained on
        another log, needing events retention dropped: reload refuses those with 409); a
        restart then serves the newest version that can, with the reason logged, instead of
        not starting at all.
        """
        refusals: list[StateMismatchError] = []
        for candidate in [path, *older]:
            try:
                state = LiveState(candidate, self.state_dir, self.config)
                state.open_log(lambda: self.stopping)
            except StateMismatchError as exc:  # a corrupt version still stops the start
                refusals.append(exc)
                log.warning("version %s cannot serve %s: %s", candidate.name, self.state_dir,
                            exc.message)  # fmt: skip
                continue
            if candidate != path:
                log.warning("serving %s, the newest version that can serve %s (newest on disk: "
                            "%s)", candidate.name, self.state_dir, path.name)  # fmt: skip
                self.previous = [v for v in self.previous if v < candidate.name]
            return state
        raise refusals[0]  # every candidate refused: the newest's reason is the one to fix

    async def start(self) -> None:
        """Load in a worker thread so /healthz answers while the log replays."""
        set_cpu_threads(self.config.index.cpu_threads)  # searches run on this (the loop) thread
        state = await asyncio.to_thread(self.load)
        if state.log is not None:
            state.log.on_commit = lambda seconds, _n: self.metrics.fsync.observe(seconds)
        self.batcher = MicroBatcher(state.recommend_many, self.config.server.recommend_batch,
                                    on_batch=self.metrics.batch.observe)  # fmt: skip
        self.metrics.index_size.set(state.item_side.n_items)
        self.metrics.model.labels(state.item_side.version).set(1)
        self.metrics.backend.labels(
            kernels.backend, state.item_side.index.device, self.config.server.http
        ).set(1)
        self.metrics.events.inc(state.events_applied)
        # A long replay is snapshotted once serving, paced like a periodic one, so the next
        # start is quick and this one's ready is not delayed.
        self.maybe_snapshot(state)
        self.state = state
        await self.prune_log(state)
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
            copied = await self._copy_in_steps(state, capture, share)
        except Exception:  # a bug: the log still has every event, so serving goes on
            log.exception("snapshot not taken: copying the state failed")
            self._snapshot_failed(state, capture)
            return False
        finally:
            state.end_snapshot(capture)
        if not copied:
            return False
        written = await asyncio.to_thread(state.save_snapshot, capture.result())
        if written:
            self.metrics.snapshots.labels("written").inc()
            self.metrics.snapshot_seconds.observe(time.perf_counter() - started_at)
            self.snapshot_failures, self.snapshot_retry_at = 0, 0.0
        else:
            self._snapshot_failed(state, capture)
        return written

    async def _copy_in_steps(self, state: LiveState, capture: SnapshotCapture, share: float
                             ) -> bool:  # fmt: skip
        """Copy the state a step at a time, idling between steps; False if abandoned."""
        while True:
            if self.stopping:  # close() writes a final snapshot in one go
                state.abandon_snapshot("shutting down")
            if capture.abandoned:  # or a model swap: it would mix two models' vectors
                self.metrics.snapshots.labels("abandoned").inc()
                return False
            started = time.perf_counter()
            if capture.step(self.config.log.snapshot_step):
                return True
            # Paced: a request needs several loop turns, and sleep(0) gives it only one per
            # step; idling in proportion lets requests through between steps.
            await asyncio.sleep((time.perf_counter() - started) * (1.0 - share) / share)

    def _snapshot_failed(self, state: LiveState, capture: SnapshotCapture) -> None:
        """Count a failed snapshot, keep its events counted, and back off before the next."""
        self.metrics.snapshots.labels("failed").inc()
        state.snapshot_failed(capture)
        config = self.config.log
        # The exponent is capped: 2.0 ** 1024 overflows, and the cap is far past any maximum.
        doublings = min(self.snapshot_failures, SNAPSHOT_MAX_DOUBLINGS)
        wait = min(config.snapshot_retry_seconds * 2.0**doublings,
                   config.snapshot_retry_max_seconds)  # fmt: skip
        self.snapshot_failures += 1
        self.snapshot_retry_at = time.monotonic() + wait
        log.warning("next snapshot try in %.0f s at the earliest (%d failed in a row)",
                    wait, self.snapshot_failures)  # fmt: skip

    def loaded(self, task: asyncio.Task[None]) -> None:
        """Done-callback of the loading task: a failure is logged with its cause, then reported."""
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        if isinstance(exc, LoadStopped):
            log.info("%s: shutting down", exc)
            return
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
                self._trim_previous(current)
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
                if rollback:  # gone from disk: drop it, so the next rollback can go further back
                    self.previous.pop()
                    self._trim_previous(current)
                    try:  # a restart drops vanished targets anyway: failing to save costs nothing
                        await self._save_rollout(self.pinned, self.previous)
                    except RolloutNotSavedError as exc:
                        log.warning("%s", exc.message)
                    raise UnknownVersionError(
                        f"the rollback target {version!r} is no longer under {self.root}; it was "
                        f"dropped from the rollback history ({len(self.previous)} left)",
                        {"version": version},
                    )
                raise UnknownVersionError(f"no artifact version {version!r} under {self.root}",
                                          {"version": version})  # fmt: skip
            path = resolve(self.root) if version is None else self.root / version
            # A directory of the active name may hold another model by now (replaced on disk,
            # a symlink moved): the manifest tells.
            same = path.name == current and (
                model_id_of(await asyncio.to_thread(read_manifest, path))
                == state.item_side.model_id
            )
            if not same:
                await self._swap_in(state, path, version, current, rollback)
            elif not rollback:
                # "Reload the newest" unpins even when it is active, and a named reload of the
                # version served by an explicit --artifact pins it: compared with the file, which
                # an explicit --artifact never wrote.
                saved = await asyncio.to_thread(rollout.read, self.state_dir)
                if (saved.pinned, list(saved.previous)) != (version, self.previous):
                    await self._save_rollout(version, self.previous)
                self.pinned = version
        # After every reload, of the active version too: versions may have been removed since.
        await self.prune_log(state)

    async def _swap_in(self, state: LiveState, path: Path, version: str | None, current: str,
                       rollback: bool) -> None:  # fmt: skip
        """Load ``path`` and make it the served version (under the swap lock)."""
        side = await asyncio.to_thread(lambda: ItemSide(load_artifact(path), self.config))
        # A version trained on another server's log would take over now and refuse this
        # state dir at the next restart: refused here (409) instead.
        await asyncio.to_thread(state.check_trained_log, side.artifact)
        # Users' vectors are rebuilt in a worker thread; events applied meanwhile are
        # tracked and those users refolded when the new side goes live.
        plan = state.begin_swap(side)
        previous = self.previous[:-1] if rollback else [*self.previous, current]
        if path.name == current and not rollback:  # replaced in place: the old one is gone
            previous.pop()
        try:
            vectors = await asyncio.to_thread(state.build_swap, plan)
            # Saved before the swap: a choice that cannot be saved is refused, not served until
            # the next restart quietly returns to another version.
            await self._save_rollout(version, previous)
        except BaseException:
            state.abort_swap()
            raise
        state.finish_swap(plan, vectors)
        self.previous, self.pinned = previous, version
        self.metrics.model.clear()
        self.metrics.model.labels(side.version).set(1)

    def _trim_previous(self, current: str) -> None:
        """Drop rollback targets equal to the active version from the top of the stack (left
        there when a vanished target was dropped): a rollback to it would do nothing."""
        while self.previous and self.previous[-1] == current:
            self.previous.pop()

    async def prune_log(self, state: LiveState) -> None:
        """Under ``log.retention = "trained"``, delete the log segments that every version under
        the root was trained on, beyond the idempotency window (a failure only costs disk)."""
        if self.config.log.retention != "trained" or state.log is None:
            return
        try:
            marks = await asyncio.to_thread(self._watermarks)
        except (ArtifactError, OSError, ValueError) as exc:
            log.warning("log retention skipped: a version's manifest is unreadable: %s", exc)
            return
        bound = min(marks, default=0) - self.config.log.dedup_window
        if bound <= 0:
            return
        try:
            dropped = await asyncio.to_thread(state.log.drop_segments_before, bound)
        except SignedrecError as exc:
            log.warning("log retention failed: %s", exc)
            return
        if dropped:
            log.info("dropped %d log segments, every event in them at or before seq %d, which "
                     "every version under %s was trained on", dropped, bound,
                     self.root)  # fmt: skip

    def _watermarks(self) -> list[int]:
        """The watermark of every version under the root (manifest reads: off the loop)."""
        return [int(read_manifest(self.root / v).get("watermark", 0))
                for v in list_versions(self.root)]  # fmt: skip

    async def _save_rollout(self, pinned: str | None, previous: list[str]) -> None:
        """Persist the pinned version and rollback stack, or raise RolloutNotSavedError."""
        choice = rollout.Rollout(pinned=pinned, previous=tuple(previous))
        try:
            await asyncio.to_thread(rollout.write, self.state_dir, choice)
        except OSError as exc:
            raise RolloutNotSavedError(
                f"the model choice cannot be saved to {self.state_dir / rollout.FILE} "
                f"({exc.strerror or exc}); the active version is unchanged"
            ) from None

    async def describe(self) -> ModelOut:
        """The active version, the one rollback would restore, and every version on disk."""
        state = self.live()
        versions = []
        for version, manifest, problem in await asyncio.to_thread(self._inspect_versions):
            tables = manifest.get("metrics")
            tables = tables if isinstance(tables, dict) else {}
            created = manifest.get("created_at")
            versions.append(
                ModelVersion(
                    version=version,
                    active=version == state.item_side.version,
                    created_at=created if isinstance(created, str) else None,
                    # Only numbers: a hand-edited "n/a" must not fail the whole listing.
                    metrics=numeric_metrics(tables.get("test") or tables.get("valid")),
                    problem=problem,
                )
            )
        return ModelOut(
            active=state.item_side.version,
            previous=self.previous[-1] if self.previous else None,
            versions=versions,
        )

    def _inspect_versions(self) -> list[tuple[str, dict[str, Any], str | None]]:
        """(version, manifest or {}, why it cannot serve or None) for every version under the
        root: a bad one is listed with its problem, as a plain reload would still pick it."""
        listed = []
        for version in list_versions(self.root):
            manifest, problem = inspect_version(self.root / version)
            listed.append((version, manifest or {}, problem))
        return listed

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
