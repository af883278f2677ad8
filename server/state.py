"""The live state: artifact item side, users' vectors and signed feedback, indexes, the event log.

Every accepted event is made durable in the log first, then applied here: the user's latest
signed strength per item replaces the previous one, and the user's vector moves by exactly the
difference of fold-in weights times the item's table row (one ``kernels.apply_events`` call per
batch), so the served vector always equals ``sum_i weight(u, i) * Q_i`` over the user's graph.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import numpy as np

import kernels
from server import snapshot
from server.artifacts import Artifact, load_artifact
from server.cache import RankingCache
from server.config import Config
from server.data import IdMap
from server.dedup import RecentIds
from server.errors import (
    ArtifactError,
    InvalidEventError,
    InvalidRequestError,
    LoadStopped,
    StateMismatchError,
    UnknownItemError,
)
from server.events import (
    EVENTS_DIR,
    KIND_CODES,
    EventLog,
    EventRecord,
    NewEvent,
    OpenReport,
    check_event,
    claim_catalogue,
)
from server.feedback import rating_strength, strengths_by_kind
from server.graph import DATASET_STRENGTH
from server.index import ItemIndex
from server.propensity import Propensity
from server.ranking import Ragged, candidates, popular_pool, rank_pool, rank_proven

log = logging.getLogger("signedrec.state")


def _warn_if_trained_with_other_weights(artifact: Artifact, config: Config, then: str) -> None:
    """A version trained on a log baked that log's events in with its trainer's ``events``
    weights: a server configured with others folds only later events with its own."""
    trained = artifact.manifest.get("log", {}).get("weights")
    ours = msgspec.to_builtins(config.events)
    if isinstance(trained, dict) and trained != ours:
        log.warning(
            "model %s folded the logged events up to seq %d with events weights %s, this server "
            "is configured with %s: %s (train --events with the server's --config to match)",
            artifact.version, artifact.watermark, trained, ours, then,
        )  # fmt: skip


TRAIN_KIND = {True: "like", False: "dislike"}
# A history row: event id, item id, kind, value, time (id, value and time None for a dataset row).
HistoryRow = tuple[str | None, str, str, float | None, float | None]


class TrainedHistory:
    """The logged events a trained graph holds, by user: what their histories show once trained
    (ids, kinds, values and times as logged), newest first."""

    def __init__(self, arrays: Mapping[str, np.ndarray], n_users: int) -> None:
        users = arrays["log_users"]
        self._order = np.argsort(users, kind="stable")  # seq order within each user
        self._indptr = np.zeros(n_users + 1, np.int64)
        np.cumsum(np.bincount(users, minlength=n_users)[:n_users], out=self._indptr[1:])
        self._seqs = arrays["log_seqs"]
        self._items, self._kinds = arrays["log_items"], arrays["log_kinds"]
        self._values, self._ts = arrays["log_values"], arrays["log_ts"]
        self._offsets, self._ids = arrays["log_id_offsets"], arrays["log_id_bytes"]

    def event_ids(self, after: int, before: int) -> list[str]:
        """Ids of the logged events it holds with ``after < seq < before``, in seq order."""
        rows = np.flatnonzero((self._seqs > after) & (self._seqs < before))
        rows = rows[np.argsort(self._seqs[rows], kind="stable")]
        data, offsets = self._ids.tobytes(), self._offsets
        return [data[offsets[r] : offsets[r + 1]].decode() for r in rows.tolist()]

    def items_of(self, user: int) -> np.ndarray:
        """The items of a trained user's logged events (their pairs' latest sign is logged)."""
        return self._items[self._order[self._indptr[user] : self._indptr[user + 1]]]

    def rows(self, user: int, items: IdMap, limit: int) -> list[HistoryRow]:
        """Up to ``limit`` of a trained user's logged events, newest first."""
        rows = self._order[self._indptr[user] : self._indptr[user + 1]][::-1][:limit]
        names = items.external(self._items[rows])
        out: list[HistoryRow] = []
        for row, item in zip(rows.tolist(), names, strict=True):
            event_id = self._ids[self._offsets[row] : self._offsets[row + 1]].tobytes().decode()
            value = float(self._values[row])
            out.append((event_id, item, KIND_CODES[self._kinds[row]],
                        None if value != value else value, float(self._ts[row])))  # fmt: skip
        return out


@dataclass(slots=True)
class UserFeedback:
    """One user's signed feedback: latest strength per item, recent dislikes, event history."""

    strength: dict[int, float] = field(default_factory=dict)
    # Insertion-ordered: the most recent dislike is last.
    recent_negative: dict[int, None] = field(default_factory=dict)
    history: deque[tuple[int, str, int, str, float | None, float]] = field(default_factory=deque)
    seen_cache: np.ndarray | None = None
    disliked_cache: np.ndarray | None = None  # every item whose latest strength is negative
    negative_cache: np.ndarray | None = None
    # Strength-weighted (likes, dislikes), for the dislike propensity; rebuilt with seen_cache.
    counts: tuple[float, float] = (0.0, 0.0)
    updates: int = 0  # in-place vector updates since the vector was last folded exactly


@dataclass(frozen=True, slots=True)
class Recommendation:
    """A ranked list for one user."""

    items: list[str]
    scores: list[float]
    fallback: bool
    version: str


class ItemSide:
    """Everything derived from the artifact that does not change while it is served."""

    def __init__(self, artifact: Artifact, config: Config) -> None:
        arrays = artifact.arrays
        self.artifact = artifact
        self.version = artifact.version
        self.model_id = artifact.model_id
        self.items = IdMap(arrays["item_ids"])
        self.table = np.ascontiguousarray(arrays["item_table"], dtype=np.float32)
        self.vectors = np.ascontiguousarray(arrays["item_vectors"], dtype=np.float32)
        norms = np.linalg.norm(self.vectors, axis=1, keepdims=True)
        self.unit = np.ascontiguousarray(self.vectors / np.where(norms > 0, norms, 1.0))
        self.popular = np.argsort(-arrays["item_popularity"], kind="stable").astype(np.int32)
        self.popular_scores = arrays["item_popularity"][self.popular].astype(np.float32)
        self.neg_weight = artifact.neg_weight
        self.threshold = artifact.threshold
        ranking = artifact.manifest.get("ranking", {})
        trained_gamma = ranking.get("suppression_gamma", 0.0)
        configured = config.ranking.suppression_gamma
        self.gamma = float(trained_gamma if configured is None else configured)
        trained_beta = ranking.get("propensity_beta", 0.0)  # older artifacts: none
        self.beta = float(trained_beta if config.ranking.propensity_beta is None
                          else config.ranking.propensity_beta)  # fmt: skip
        n_items = len(arrays["item_ids"])
        self.propensity = Propensity.from_counts(
            np.bincount(arrays["pos_items"], arrays["pos_weights"], minlength=n_items),
            np.bincount(arrays["neg_items"], arrays["neg_weights"], minlength=n_items),
            float(ranking.get("propensity_prior", config.model.propensity_prior)),
        )
        self.index = ItemIndex(self.vectors, config.index, "score")
        self.similar_index = ItemIndex(self.unit, config.index, "similar")

    @property
    def n_items(self) -> int:
        """Catalogue size."""
        return self.table.shape[0]

    @property
    def dim(self) -> int:
        """Embedding dimension."""
        return self.table.shape[1]


@dataclass(slots=True)
class SwapPlan:
    """A model swap under way: the new side and the online graphs as they were at its start."""

    side: ItemSide
    rows: int
    graphs: dict[int, dict[int, float]]
    touched: set[int]  # users with events applied since the start, refolded at the finish


class SnapshotCapture:
    """A snapshot at one log seq, copied in steps between requests instead of in one stall.

    User ids and the dedup queue are copied at once (flat lists); vector rows and users'
    feedback are copied a step at a time, and a user about to change is copied first
    (``LiveState._apply`` calls :meth:`copy_rows` and :meth:`copy`), so every user is captured as
    of ``seq``. Ids are filtered in steps against the live window: one evicted meanwhile was
    older than everything replay re-adds. A model swap abandons the capture (its snapshot would
    mix two models' vectors, and a restart serves the new model anyway).
    """

    def __init__(self, state: LiveState) -> None:
        self.n = n = len(state.users)
        self.state = state
        self.model_id, self.seq = state.item_side.model_id, state.applied_seq
        self.graph = state.snapshot_key
        self.catalogue = state.catalogue
        self.since = state.since_snapshot  # events counted towards this snapshot
        self.abandoned = False
        self.users = state.users.external(np.arange(n))
        # Filled row range by row range: one flat copy of a large array stalls the loop, mostly
        # on page faults of the fresh memory (54 MB: 130 ms on a 2-core VM).
        self.vectors = np.empty((n, state.item_side.dim), np.float32)
        self.row_copied = np.zeros(n, bool)  # saved before a change: never saved again
        self.row_cursor = 0
        # Rows copied before a change, ahead of the cursor: kept aside and put in place once the
        # steps have reached them, because scattered writes into the fresh array would fault in
        # all of its pages at once (huge pages: ~100 ms for 54 MB), stalling the loop.
        self.early_rows: list[tuple[np.ndarray, np.ndarray]] = []
        self.order = list(state.feedback)
        self.pending = set(self.order)  # users whose feedback is still to copy
        self.cursor = 0
        self.feedback = snapshot.FeedbackChunks(state.config.log.snapshot_step)
        self.ids, self.id_offset = state.event_ids.entries()
        self.id_cursor = 0
        self.live_ids: list[str] = []

    def copy_rows(self, users: np.ndarray) -> None:
        """Copy these users' vector rows before they change, where not yet copied."""
        rows = users[(users >= self.row_cursor) & (users < self.n)]
        rows = rows[~self.row_copied[rows]]
        if rows.size:
            self.early_rows.append((rows, self.state.vectors[rows]))
            self.row_copied[rows] = True

    def copy(self, user: int) -> None:
        """Copy one pending user's feedback as it is now."""
        self.pending.discard(user)
        f = self.state.feedback[user]
        self.feedback.add(
            snapshot.UserSnapshot(user=user, items=list(f.strength),
                                  strengths=list(f.strength.values()),
                                  negatives=list(f.recent_negative), history=list(f.history))
        )  # fmt: skip

    def step(self, budget: int | None = None) -> bool:
        """Copy up to ``budget`` rows, then users, then ids (None: everything); True when done."""
        if self.row_cursor < self.n:
            start = self.row_cursor
            end = self.n if budget is None else min(self.n, start + budget)
            self.vectors[start:end] = self.state.vectors[start:end]
            self.row_cursor = end
            if end == self.n:  # rows saved before a change replace what the steps copied
                for rows, values in self.early_rows:
                    self.vectors[rows] = values
                self.early_rows.clear()
            if budget is not None:
                return False
        end = len(self.order) if budget is None else self.cursor + budget
        for user in self.order[self.cursor : end]:
            if user in self.pending:
                self.copy(user)
        self.cursor = min(end, len(self.order))
        if self.cursor < len(self.order):
            return False
        end = len(self.ids) if budget is None else self.id_cursor + budget
        live = self.state.event_ids.live(self.ids[self.id_cursor : end],
                                         self.id_offset + self.id_cursor)  # fmt: skip
        self.live_ids += live
        self.id_cursor = min(end, len(self.ids))
        return self.id_cursor == len(self.ids)

    def result(self) -> snapshot.Snapshot:
        """The finished snapshot (after :meth:`step` returned True)."""
        return snapshot.Snapshot(self.model_id, self.seq, self.users, self.vectors,
                                 self.feedback.finish(), self.live_ids, self.graph,
                                 self.catalogue)  # fmt: skip


def _fold_graphs(
    side: ItemSide, vectors: np.ndarray, graphs: Mapping[int, dict[int, float]]
) -> None:
    """Overwrite each listed user's vector with the fold of their signed graph under ``side``."""
    if not graphs:
        return
    counts = np.fromiter(map(len, graphs.values()), np.int64, len(graphs))
    owners = np.fromiter(graphs.keys(), np.int32, len(graphs))
    vectors[owners] = 0.0
    total = int(counts.sum())
    if total == 0:
        return
    chain = itertools.chain.from_iterable
    rows = np.fromiter(chain(g.keys() for g in graphs.values()), np.int32, total)
    strengths = np.fromiter(chain(g.values() for g in graphs.values()), np.float32, total)
    # LiveState.fold_weight, vectorised: likes count fully, dislikes by the model's neg_weight.
    weights = np.where(strengths > 0, strengths, -strengths * np.float32(side.neg_weight))
    kernels.apply_events(vectors, side.table, np.repeat(owners, counts), rows,
                         weights.astype(np.float32))  # fmt: skip


class Reservation:
    """One request's event ids whose log write is in flight; repeats of them wait on it."""

    __slots__ = ("_settled", "_waiters")

    def __init__(self) -> None:
        self._waiters: list[asyncio.Future[None]] = []
        self._settled = False

    def wait(self) -> asyncio.Future[None]:
        """A future resolved once the write has been applied or has failed (event loop only)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._settled:
            future.set_result(None)
        else:
            self._waiters.append(future)
        return future

    def settle(self) -> None:
        """Wake every waiter: the ids are now applied, or free again."""
        self._settled = True
        for future in self._waiters:
            if not future.done():
                future.set_result(None)
        self._waiters.clear()


class LiveState:
    """The serving state; used from one asyncio event loop (not thread-safe)."""

    def __init__(self, artifact_path: Path, state_dir: Path, config: Config) -> None:
        self.config = config
        self.state_dir = Path(state_dir)
        self.ready = False
        artifact = load_artifact(artifact_path)
        self.item_side = ItemSide(artifact, config)
        arrays = artifact.arrays
        self.users = IdMap(arrays["user_ids"])
        # The users and trained graph this state holds: a swap changes only the item side, so
        # snapshots name both (the graph by Artifact.graph_fingerprint).
        self.base_version = artifact.version
        self.graph = artifact.graph_fingerprint
        self.catalogue = artifact.catalogue_fingerprint  # a swap requires the same one
        # Snapshots hold folded strengths, not events: one taken under other `events` weights
        # would restore other strengths than a replay derives, so their key includes them.
        self.snapshot_key = snapshot.state_key(self.graph, config.events)
        _warn_if_trained_with_other_weights(artifact, config, "its logged events keep those")
        self._pos_indptr, self._pos_items = arrays["pos_indptr"], arrays["pos_items"]
        self._neg_indptr, self._neg_items = arrays["neg_indptr"], arrays["neg_items"]
        # Edge weights: 1 for dataset rows, an event kind's strength for feedback from a log.
        self._pos_weights, self._neg_weights = arrays["pos_weights"], arrays["neg_weights"]
        self.watermark = artifact.watermark
        self.n_trained_users = len(self._pos_indptr) - 1
        # The dataset's users come first; the rest of the trained rows are users a log created.
        dataset_users = artifact.manifest.get("dataset", {}).get("n_users", self.n_trained_users)
        self.n_dataset_users = min(int(dataset_users), self.n_trained_users)
        self._trained_history = TrainedHistory(arrays, self.n_trained_users)
        self.vectors = np.zeros((max(16, len(self.users) * 2), self.item_side.dim), np.float32)
        self._fold_trained(self.item_side, self.vectors)
        self.feedback: dict[int, UserFeedback] = {}
        self.cache: RankingCache[bytes] = RankingCache(
            config.ranking.cache_users, config.ranking.cache_variants_per_user
        )
        # Ids of applied events only: a write in flight is in ``reserved`` until it is applied
        # (or fails), so a failed or refused write never takes a place in the window, and a
        # snapshot (as of ``applied_seq``) never holds an id whose write may yet fail.
        self.event_ids = RecentIds(config.log.dedup_window)
        self.reserved: dict[str, Reservation] = {}
        self._swap: SwapPlan | None = None
        self._capture: SnapshotCapture | None = None  # a snapshot being copied in steps
        self.events_applied = 0
        self.applied_seq = 0
        self.since_snapshot = 0
        self.log: EventLog | None = None
        self._weights = w = config.events
        # A trained skip is told from a dislike by its strength, when no dislike has that one.
        dislikes = (-DATASET_STRENGTH, w.dislike, w.rating_negative)
        self._named_skip = None if w.skip in dislikes else np.float32(w.skip)

    # -- construction ------------------------------------------------------------------------
    def _fold_trained(self, side: ItemSide, out: np.ndarray) -> None:
        """Every trained user's vector from the trained signed graph (one kernel call)."""
        n = self.n_trained_users
        pos_deg = np.diff(self._pos_indptr)
        neg_deg = np.diff(self._neg_indptr)
        indptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(pos_deg + neg_deg, out=indptr[1:])
        rows = np.empty(indptr[-1], dtype=np.int32)
        weights = np.empty(indptr[-1], dtype=np.float32)
        # Each user's positives then negatives, laid out by vectorised offsets.
        pos_owner = np.repeat(np.arange(n), pos_deg)
        neg_owner = np.repeat(np.arange(n), neg_deg)
        pos_at = indptr[pos_owner] + (np.arange(len(self._pos_items)) - self._pos_indptr[pos_owner])
        neg_at = indptr[neg_owner] + pos_deg[neg_owner]
        neg_at += np.arange(len(self._neg_items)) - self._neg_indptr[neg_owner]
        rows[pos_at], weights[pos_at] = self._pos_items, self._pos_weights
        rows[neg_at], weights[neg_at] = self._neg_items, self._neg_weights * side.neg_weight
        kernels.fold_csr(indptr, rows, weights, side.table, out[:n])

    def _trained_edges(self, user: int) -> tuple[np.ndarray, np.ndarray]:
        """A trained user's liked and disliked items in the artifact's graph."""
        pos = self._pos_items[self._pos_indptr[user] : self._pos_indptr[user + 1]]
        return pos, self._neg_items[self._neg_indptr[user] : self._neg_indptr[user + 1]]

    def _trained_strengths(self, user: int) -> tuple[np.ndarray, np.ndarray]:
        """The sizes of a trained user's positive and negative strengths (parallel to edges)."""
        pos = self._pos_weights[self._pos_indptr[user] : self._pos_indptr[user + 1]]
        return pos, self._neg_weights[self._neg_indptr[user] : self._neg_indptr[user + 1]]

    def begin_swap(self, side: ItemSide) -> SwapPlan:
        """Start a swap to a new item side: check its catalogue, copy the online graphs (loop)."""
        old = self.item_side
        if len(side.items) != len(old.items) or not np.array_equal(
            side.artifact.arrays["item_ids"], old.artifact.arrays["item_ids"]
        ):
            raise StateMismatchError(
                f"model {side.version} has a different item catalogue than {old.version}; "
                "it cannot take over the live users"
            )
        _warn_if_trained_with_other_weights(
            side.artifact, self.config,
            "live users keep this server's weights until a restart on it gives those to the "
            "events it was trained on",
        )  # fmt: skip
        if side.threshold != old.threshold:
            # Live strengths were derived from logged ratings with the old threshold; a restart
            # would re-derive them with the new one, so the live users would differ from it.
            raise ArtifactError(
                f"model {side.version} counts ratings >= {side.threshold:g} as likes, the live "
                f"state >= {old.threshold:g}: logged ratings would change sign at the next "
                "restart; restart the server on it instead of reloading"
            )
        watermark = side.artifact.watermark
        first_seq = self.log.first_seq if self.log is not None else 1
        if watermark + 1 < first_seq:
            # A restart serves a version on its own graph plus the log after its watermark;
            # retention has dropped some of those events, so that restart could not happen
            # (whichever graph this server started on: a restart takes the version's own).
            raise StateMismatchError(
                f"model {side.version} needs the logged events after seq {watermark}, but log "
                f"retention has dropped those before seq {first_seq}: a restart on it could not "
                "replay them; train it with --events on this state (or --since a served version)"
            )
        if side.artifact.graph_fingerprint != self.graph and 0 < watermark <= self.applied_seq:
            log.info(
                "model %s was trained on the events up to seq %d: live users keep this server's "
                "graph, which holds those events and the %d after them, as a restart on it will",
                side.version, watermark, self.applied_seq - watermark,
            )  # fmt: skip
        elif side.artifact.graph_fingerprint != self.graph:
            new = side.artifact.arrays
            log.warning(
                "model %s was trained on another signed graph than %s (%d users, %d edges vs "
                "%d, %d): live users keep this server's graph (%s's plus every logged event) "
                "until a restart serves %s on its own graph",
                side.version, self.base_version, len(new["user_ids"]),
                len(new["pos_items"]) + len(new["neg_items"]), self.n_trained_users,
                len(self._pos_items) + len(self._neg_items), self.base_version, side.version,
            )  # fmt: skip
        # dict copies run at C speed; the Python-level fold then happens off the event loop.
        graphs = {user: dict(f.strength) for user, f in self.feedback.items()}
        self._swap = SwapPlan(side, self.vectors.shape[0], graphs, set())
        return self._swap

    def build_swap(self, plan: SwapPlan) -> np.ndarray:
        """Every user's vector under the new side as of ``begin_swap``; safe in a worker thread
        (reads only the plan and the trained graph, which never changes)."""
        vectors = np.zeros((plan.rows, plan.side.dim), np.float32)
        self._fold_trained(plan.side, vectors)
        _fold_graphs(plan.side, vectors, plan.graphs)
        return vectors

    def finish_swap(self, plan: SwapPlan, vectors: np.ndarray) -> None:
        """Swap in the built vectors, refolding users whose feedback arrived meanwhile (loop)."""
        if self._swap is not plan:
            raise RuntimeError("finish_swap: this swap is not the one in progress")
        self._swap = None
        self.abandon_snapshot(f"model {plan.side.version} swapped in")
        if self.vectors.shape[0] > vectors.shape[0]:  # users arrived and the array grew
            grown = np.zeros((self.vectors.shape[0], vectors.shape[1]), np.float32)
            grown[: vectors.shape[0]] = vectors
            vectors = grown
        touched = {user: self.feedback[user].strength for user in plan.touched}
        _fold_graphs(plan.side, vectors, touched)
        old = self.item_side
        self.item_side, self.vectors = plan.side, vectors
        self.cache.clear()
        log.info("model %s replaced %s for %d users (%d refolded after events during the swap)",
                 plan.side.version, old.version, len(self.users), len(touched))  # fmt: skip

    def abort_swap(self) -> None:
        """Drop a swap that failed or was cancelled; the current side keeps serving."""
        self._swap = None

    def swap(self, side: ItemSide) -> None:
        """Serve a new item side now, all on the calling thread (tests, tools)."""
        plan = self.begin_swap(side)
        self.finish_swap(plan, self.build_swap(plan))

    def open_log(self, stop: Callable[[], bool] | None = None) -> OpenReport:
        """Open the event log, restore the snapshot if it fits, replay what follows it; a
        ``stop()`` that turns true (a shutdown) ends the replay with LoadStopped."""
        claim_catalogue(self.state_dir, self.catalogue)  # before the log: never replay a stranger
        self.log, report = EventLog.open(self.state_dir / EVENTS_DIR, self.config.log)
        try:
            self._restore_and_replay(report, stop)
        except BaseException:
            self.log.close_sync()  # its lock too: a retry in this process can open it again
            raise
        self.ready = True
        return report

    def _restore_and_replay(
        self, report: OpenReport, stop: Callable[[], bool] | None = None
    ) -> None:
        """:meth:`open_log` once the log is open: check it against the model, restore the
        snapshot if it fits, replay what follows."""
        if self.log is None:
            raise RuntimeError("_restore_and_replay: the log is not open")
        after = self.watermark
        self.check_trained_log(self.item_side.artifact)
        started = time.perf_counter()
        snap = snapshot.read(self.state_dir, self.item_side.model_id, self.snapshot_key,
                             self.catalogue)  # fmt: skip
        if snap is not None and snap.seq <= report.last_seq:
            self.restore(snap)
            after = max(after, snap.seq)
        elif snap is not None:
            aside = snapshot.set_aside(self.state_dir)
            log.warning("snapshot at seq %d is ahead of the log (%d): ignored, moved to %s",
                        snap.seq, report.last_seq, aside)  # fmt: skip
        if after + 1 < report.first_seq:
            raise StateMismatchError(
                f"model {self.base_version} needs the logged events after seq {after}, but log "
                f"retention has dropped those before seq {report.first_seq}: train a version "
                "with --events on this state (or --since a served version) and serve that"
            )
        if after == self.watermark > 0:
            self._remember_trained_ids(report.first_seq)
        replayed = self.events_applied
        for batch in self.log.replay(after_seq=after):
            if stop is not None and stop():
                raise LoadStopped(f"stopped replaying the event log at seq {self.applied_seq}")
            self._apply(batch)
        replayed = self.events_applied - replayed
        log.info(
            "replayed %d events in %.2fs after seq %d (log: %d records, %d segments%s)",
            replayed,
            time.perf_counter() - started,
            after,
            report.records,
            report.segments,
            f", repaired tail: {report.problem}" if report.problem else "",
        )

    def check_trained_log(self, artifact: Artifact) -> None:
        """Refuse a version trained with ``--events`` on another log, or on more of it than this
        log holds: every event up to its watermark is in its graph and none is replayed, so the
        event at the watermark must be the one its manifest names (reads the log: call it at
        start or from a worker thread)."""
        if self.log is None:
            raise RuntimeError("check_trained_log: the log is not open")
        watermark, version = artifact.watermark, artifact.version
        if watermark <= 0:
            return
        if watermark > self.log.last_seq:
            raise StateMismatchError(
                f"model {version} was trained on this state's events up to seq {watermark}, "
                f"but the log in {self.log.directory} ends at seq {self.log.last_seq}: "
                "serve it with the state dir whose log it was trained on"
            )
        if watermark < self.log.first_seq:
            return  # dropped by retention after training: nothing left to compare
        expected = artifact.manifest.get("log", {}).get("last_event_id")
        found = next(iter(self.log.replay(after_seq=watermark - 1, batch_size=1)))[0].event_id
        if expected is not None and found != expected:
            raise StateMismatchError(
                f"model {version} was trained on a log whose event {watermark} is "
                f"{expected!r}, but in {self.log.directory} it is {found!r}: serve it with the "
                "state dir whose log it was trained on"
            )

    def _remember_trained_ids(self, first_seq: int) -> None:
        """Refill the idempotency window with the ids of the events the model was trained on
        (their feedback is in its graph already), so a late retry of one stays a duplicate."""
        if self.log is None:
            raise RuntimeError("_remember_trained_ids: the log is not open")
        window_start = self.watermark - self.config.log.dedup_window
        if window_start < first_seq - 1 and first_seq > 1:
            # Retention dropped part of the window from the log (a window raised since): the
            # version still holds each user's latest logged events, ids included.
            held = self._trained_history.event_ids(window_start, first_seq)
            self.event_ids.add(held)
            missing = min(first_seq - 1, self.watermark) - max(window_start, 0) - len(held)
            if missing > 0:
                log.warning(
                    "the idempotency window reaches back to seq %d but the log starts at %d: "
                    "retries of %d trained events there are not recognised as duplicates",
                    window_start + 1, first_seq, missing,
                )  # fmt: skip
        start = max(window_start, first_seq - 1)
        for batch in self.log.replay(after_seq=start):
            ids = [record.event_id for record in batch if record.seq <= self.watermark]
            self.event_ids.add(ids)
            if len(ids) < len(batch):
                break
        self.applied_seq = self.watermark

    def take_snapshot(self) -> snapshot.Snapshot:
        """The state as of ``applied_seq``, copied in one go."""
        capture = SnapshotCapture(self)
        capture.step()
        return capture.result()

    def begin_snapshot(self) -> SnapshotCapture:
        """Start a snapshot as of ``applied_seq`` that the caller copies in steps between
        requests; users changed meanwhile are copied before their change."""
        self._capture = SnapshotCapture(self)
        self.since_snapshot = 0
        return self._capture

    def end_snapshot(self, capture: SnapshotCapture) -> None:
        """Stop copying users for this snapshot (finished, or its task cancelled)."""
        if self._capture is capture:
            self._capture = None

    def abandon_snapshot(self, why: str) -> None:
        """Drop the snapshot being copied; its events count towards the next one."""
        capture = self._capture
        if capture is not None:
            capture.abandoned = True
            self.since_snapshot += capture.since  # so the next snapshot is not put off
            self._capture = None
            log.info("snapshot at seq %d abandoned: %s", capture.seq, why)

    def snapshot_failed(self, capture: SnapshotCapture) -> None:
        """A captured snapshot was not written: its events still await one (replay counts them)."""
        self.since_snapshot += capture.since

    def write_snapshot(self) -> None:
        """Take and write a snapshot now."""
        if self.save_snapshot(self.take_snapshot()):
            self.since_snapshot = 0

    def save_snapshot(self, snap: snapshot.Snapshot) -> bool:
        """Write a snapshot; a failure (disk full) only costs replay time later, so it is logged."""
        try:
            snapshot.write(self.state_dir, snap, self.config.log.snapshot_step)
        except OSError as exc:
            log.warning("snapshot at seq %d not written: %s", snap.seq, exc)
            return False
        except Exception:  # a bug, not the disk: loud, but the log still has every event
            log.exception("snapshot at seq %d not written", snap.seq)
            return False
        log.info("snapshot written at seq %d", snap.seq)
        return True

    def restore(self, snap: snapshot.Snapshot) -> None:
        """Load a snapshot of this graph: its vectors as they are when it was taken under the
        version served now, else every user refolded from its feedback under this version."""
        for external in snap.users[len(self.users) :]:
            self.users.add(external)
        n = len(snap.users)
        self.vectors = np.zeros((max(16, n * 2), self.item_side.dim), np.float32)
        maxlen = self.config.server.history_max_limit
        for u in snap.user_feedback():
            self.feedback[u.user] = UserFeedback(
                strength=dict(zip(u.items, u.strengths, strict=True)),
                recent_negative=dict.fromkeys(u.negatives),
                history=deque((tuple(row) for row in u.history), maxlen=maxlen),
            )
        side = self.item_side
        if snap.artifact_version == side.model_id and snap.vectors.shape[1] == side.dim:
            self.vectors[:n] = snap.vectors
        else:
            self._fold_trained(self.item_side, self.vectors)
            _fold_graphs(self.item_side, self.vectors,
                         {user: f.strength for user, f in self.feedback.items()})  # fmt: skip
            log.info("snapshot taken under model %s: %d users refolded under %s",
                     snap.artifact_version, n, self.item_side.version)  # fmt: skip
        self.event_ids = RecentIds(self.config.log.dedup_window, snap.event_ids)
        self.applied_seq = snap.seq
        self.cache.clear()
        log.info("restored snapshot at seq %d: %d users, %d with feedback", snap.seq, n,
                 len(self.feedback))  # fmt: skip

    async def close(self) -> None:
        """Flush and close the event log, leaving a snapshot so the next start is quick."""
        if self.log is not None:
            await self.log.close()
            if self.ready and self.since_snapshot:
                self.write_snapshot()

    # -- feedback ----------------------------------------------------------------------------
    @staticmethod
    def fold_weight(strength: float, neg_weight: float) -> float:
        """How much of an item's table row a signed strength adds to the user vector."""
        return strength if strength > 0 else -strength * neg_weight

    def validate(self, events: Sequence[NewEvent]) -> None:
        """Refuse the whole batch before logging if any event is unusable or names an unknown
        item; errors carry the event's index in the request."""
        items = self.item_side.items
        for position, event in enumerate(events):
            check_event(event, position)
            if items.get(event.item_id) is None:
                raise UnknownItemError(
                    f"item {event.item_id!r} is not in model {self.item_side.version}",
                    {"index": position, "item_id": event.item_id},
                )

    def in_flight(self, events: Sequence[NewEvent]) -> list[Reservation]:
        """The writes in flight that hold some of these ids: a repeat waits for their outcome
        (a duplicate if they land, its own write if they fail) instead of guessing."""
        reserved = self.reserved
        found = {id(r): r for e in events if (r := reserved.get(e.event_id)) is not None}
        return list(found.values())

    def split_duplicates(self, events: Sequence[NewEvent]) -> tuple[list[NewEvent], int]:
        """New events (first occurrence of each id) and how many were repeats."""
        fresh: list[NewEvent] = []
        batch_ids: set[str] = set()
        seen, reserved = self.event_ids, self.reserved
        for event in events:
            event_id = event.event_id
            if event_id in seen or event_id in reserved or event_id in batch_ids:
                continue
            batch_ids.add(event_id)
            fresh.append(event)
        return fresh, len(events) - len(fresh)

    def reserve(self, events: Iterable[NewEvent]) -> None:
        """Mark ids as taken before the log write, so a concurrent repeat is not applied twice."""
        self.reserved.update(dict.fromkeys((e.event_id for e in events), Reservation()))

    def release(self, events: Iterable[NewEvent]) -> None:
        """Undo ``reserve`` when the write failed and nothing was accepted."""
        self._settle(e.event_id for e in events)

    def _settle(self, ids: Iterable[str]) -> None:
        """End these ids' reservations and wake the repeats waiting on them."""
        reserved = self.reserved
        for event_id in ids:
            reservation = reserved.pop(event_id, None)
            if reservation is not None:
                reservation.settle()

    def _user_feedback(self, user: int) -> UserFeedback:
        record = self.feedback.get(user)
        if record is None:
            record = UserFeedback(history=deque(maxlen=self.config.server.history_max_limit))
            if user < self.n_trained_users:
                pos, neg = self._trained_edges(user)
                pos_w, neg_w = self._trained_strengths(user)
                record.strength = dict(zip(pos.tolist(), pos_w.tolist(), strict=True))
                record.strength.update(zip(neg.tolist(), (-neg_w).tolist(), strict=True))
                record.recent_negative = dict.fromkeys(neg.tolist())
            self.feedback[user] = record
        return record

    def _user_index(self, external: str) -> int:
        index = self.users.add(external)
        if index >= self.vectors.shape[0]:
            grown = np.zeros((self.vectors.shape[0] * 2, self.vectors.shape[1]), np.float32)
            grown[: self.vectors.shape[0]] = self.vectors
            self.vectors = grown
        return index

    def apply(self, records: Sequence[EventRecord]) -> None:
        """Apply durable records to graph and vectors (in seq order), one kernel call per batch."""
        try:
            self._apply(records)
        finally:
            if self.reserved:
                self._settle(r.event_id for r in records)

    def _apply(self, records: Sequence[EventRecord]) -> None:
        # The per-record loop is the replay hot path: locals are bound once and the numeric
        # columns gathered in lists, then handed to one kernel call.
        items_get = self.item_side.items.get
        neg_weight = self.item_side.neg_weight
        fold = self.fold_weight
        w = self._weights
        fixed = strengths_by_kind(w)
        threshold = self.item_side.threshold
        refold_every = self.config.kernels.refold_every
        refold: dict[int, UserFeedback] = {}
        applied_ids: list[str] = []
        feedback_get = self.feedback.get
        users: list[int] = []
        rows: list[int] = []
        deltas: list[float] = []
        capture = self._capture
        uncopied = capture.pending if capture is not None else ()
        for record in records:
            item = items_get(record.item_id)
            if item is None:  # a log written under another catalogue; skip, never mis-apply
                continue
            applied_ids.append(record.event_id)
            user = self._user_index(record.user_id)
            feedback = feedback_get(user) or self._user_feedback(user)
            if user in uncopied:  # a snapshot under way needs this user as it was
                capture.copy(user)  # type: ignore[union-attr]
            new = fixed.get(record.kind)
            if new is None:
                value = record.value
                if value is None:
                    raise InvalidEventError("a rating event needs a value")
                new = rating_strength(value, threshold, w)
            strength = feedback.strength
            old = strength.get(item)
            strength[item] = new
            negatives = feedback.recent_negative
            negatives.pop(item, None)
            if new < 0:
                negatives[item] = None
            feedback.seen_cache = None
            feedback.history.append(
                (record.seq, record.event_id, item, record.kind, record.value, record.ts)
            )
            delta = fold(new, neg_weight)
            if old is not None:
                delta -= fold(old, neg_weight)
            users.append(user)
            rows.append(item)
            deltas.append(delta)
            feedback.updates += 1
            if feedback.updates >= refold_every:
                refold[user] = feedback
        self.event_ids.add(applied_ids)
        if records:
            self.applied_seq = max(self.applied_seq, records[-1].seq)
        if users:
            owners = np.asarray(users, np.int32)
            if capture is not None:
                capture.copy_rows(owners)
            kernels.apply_events(
                self.vectors, self.item_side.table, owners, np.asarray(rows, np.int32),
                np.asarray(deltas, np.float32),
            )  # fmt: skip
            if refold:  # after the batch's updates, so the fold is of their final strengths
                _fold_graphs(self.item_side, self.vectors,
                             {user: fb.strength for user, fb in refold.items()})  # fmt: skip
                for fb in refold.values():
                    fb.updates = 0
            self.cache.invalidate(users)
            if self._swap is not None:
                self._swap.touched.update(users)
        self.events_applied += len(users)
        self.since_snapshot += len(users)

    # -- reads -------------------------------------------------------------------------------
    def _seen_and_negative(
        self, user: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[float, float]]:
        """Items with feedback, every disliked item (both sorted), the recent dislikes (newest
        first, for suppression), and (likes, dislikes) counted by strength."""
        feedback = self.feedback.get(user)
        recent = self.config.ranking.suppression_recent
        if feedback is None:
            if user >= self.n_trained_users:
                empty = np.empty(0, np.int32)
                return empty, empty, empty, (0.0, 0.0)
            pos, neg = self._trained_edges(user)
            pos_w, neg_w = self._trained_strengths(user)
            seen = np.sort(np.concatenate([pos, neg]))
            counts = (float(pos_w.sum(dtype=np.float64)), float(neg_w.sum(dtype=np.float64)))
            # max(): with fewer than `recent`, a negative start would keep only the last few.
            return seen, np.sort(neg), neg[max(len(neg) - recent, 0) :], counts
        if feedback.seen_cache is None:
            items = np.fromiter(feedback.strength, np.int32, len(feedback.strength))
            strengths = np.fromiter(feedback.strength.values(), np.float64, len(items))
            feedback.seen_cache = np.sort(items)
            feedback.disliked_cache = np.sort(items[strengths < 0])
            negatives = np.fromiter(feedback.recent_negative, np.int32)
            feedback.negative_cache = np.ascontiguousarray(
                negatives[max(len(negatives) - recent, 0) :][::-1]
            )
            feedback.counts = (
                float(strengths[strengths > 0].sum()),
                float(-strengths[strengths < 0].sum()),
            )
        return (feedback.seen_cache, feedback.disliked_cache, feedback.negative_cache,
                feedback.counts)  # type: ignore[return-value]  # fmt: skip

    def excluded(self, user: int, include_liked: bool) -> np.ndarray:
        """Sorted items never to return: every dislike always; everything seen by default."""
        seen, disliked, _, _ = self._seen_and_negative(user)
        return seen if self.config.ranking.exclude_seen and not include_liked else disliked

    def check_k(self, k: int) -> None:
        """Refuse a list length outside 1..ranking.max_k."""
        if not 1 <= k <= self.config.ranking.max_k:
            raise InvalidRequestError(
                f"k must be between 1 and {self.config.ranking.max_k}", {"field": "k", "value": k}
            )

    def recommend_many(
        self, user_ids: Sequence[str], k: int, include_liked: bool = False
    ) -> list[Recommendation]:
        """Recommendations for a batch of users: one FAISS search and one kernel call."""
        self.check_k(k)
        known: list[int] = []
        positions: list[int] = []
        out: list[Recommendation | None] = [None] * len(user_ids)
        variant = (k, include_liked)
        for position, external in enumerate(user_ids):
            user = self.users.get(external)
            if user is None or (user >= self.n_trained_users and user not in self.feedback):
                out[position] = self.popular(k)
            elif (packed := self.cache.get(user, variant)) is not None:
                out[position] = self._unpack(packed)
            else:
                known.append(user)
                positions.append(position)
        if known:
            self._rank_known(known, positions, k, include_liked, out)
        return [r for r in out if r is not None]

    def _rank_known(
        self,
        known: list[int],
        positions: list[int],
        k: int,
        include_liked: bool,
        out: list[Recommendation | None],
    ) -> None:
        """Rank users the state holds feedback or a trained row for, into ``out[positions]``.

        A user known only from live feedback who has no like yet (only dislikes or skips) is
        ranked from the popularity list, with the same exclusion, look-alike suppression and
        dislike propensity: the model folds a dislike in as weak interest (``neg_weight`` > 0),
        so a newcomer's first dislike would put the item's neighbours on top, as a like does.
        A user of the training dataset keeps the model's ranking: the search chose
        ``neg_weight`` on such histories, and on kuairand it serves users with only dislikes far
        better (0.061 test NDCG@20 against popularity's 0.023). A user a log created stays a
        newcomer once a version is trained on that log, so retraining changes nothing for them.
        """
        side = self.item_side
        queries = self.vectors[np.asarray(known, dtype=np.int64)]
        excluded: list[np.ndarray] = []
        disliked: list[np.ndarray] = []
        counts = np.empty((len(known), 2), np.float64)
        keep_seen = self.config.ranking.exclude_seen and not include_liked
        for row, user in enumerate(known):
            seen, every_dislike, negative, counts[row] = self._seen_and_negative(user)
            excluded.append(seen if keep_seen else every_dislike)
            disliked.append(negative)
        # A vector of zeros (a user with no edges, or only dislikes under neg_weight 0) would
        # score every item 0 and FAISS answer in id order: popularity is the answer there too.
        from_dataset = np.asarray(known, dtype=np.int64) < self.n_dataset_users
        personal = ((counts[:, 0] > 0) | from_dataset) & queries.any(axis=1)
        for is_personal in (True, False):
            rows = np.flatnonzero(personal == is_personal)
            if not rows.size:
                continue
            ids, scores = self._rank_group(
                queries[rows] if is_personal else None, [excluded[r] for r in rows],
                [disliked[r] for r in rows], counts[rows], k,
            )  # fmt: skip
            for row, (r_ids, r_scores) in zip(rows.tolist(), zip(ids, scores, strict=True),
                                               strict=True):  # fmt: skip
                keep = r_ids >= 0
                kept_ids = r_ids[keep].astype(np.int32)
                kept_scores = r_scores[keep].astype(np.float32)
                out[positions[row]] = Recommendation(
                    side.items.external(kept_ids), kept_scores.tolist(), not is_personal,
                    side.version,
                )  # fmt: skip
                if is_personal:
                    # Packed (8 bytes an item): lists of ids and floats took ~49 bytes an item.
                    packed = np.concatenate([kept_ids, kept_scores.view(np.int32)]).tobytes()
                    self.cache.put(known[row], (k, include_liked), packed)

    def _rank_group(
        self,
        queries: np.ndarray | None,
        excluded: list[np.ndarray],
        disliked: list[np.ndarray],
        counts: np.ndarray,
        k: int,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k of users ranked from their ``queries`` (None: from the popularity list), with
        their exclusions, recent dislikes and (likes, dislikes) counts; exact for the scoring."""
        side, config = self.item_side, self.config.ranking
        seen = np.fromiter((len(x) for x in excluded), np.int64, len(excluded))
        logits = side.propensity.user_logit(counts[:, 0], counts[:, 1]) if side.beta else None

        def pools(rows: np.ndarray, at_least: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
            if queries is None:
                return popular_pool(side.popular, side.popular_scores, seen[rows], k, config,
                                    at_least)  # fmt: skip
            return candidates(side.index, np.ascontiguousarray(queries[rows]), seen[rows], k,
                              config, at_least)  # fmt: skip

        def rank(rows: np.ndarray, scores: np.ndarray, ids: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
            excl = Ragged.from_lists([excluded[r] for r in rows.tolist()])
            neg = Ragged.from_lists([disliked[r] for r in rows.tolist()])
            return rank_pool(scores, ids, side.unit, excl, neg, k, side.gamma, side.propensity,
                             None if logits is None else logits[rows], side.beta)  # fmt: skip

        # Every item loses at least beta x the user's least P(dislike): a tighter bound on what
        # lies outside a pool, so fewer rows are searched again.
        slack = None if logits is None else side.beta * side.propensity.least_probability(logits)
        return rank_proven(pools, rank, len(excluded), k, side.n_items, slack)

    def _unpack(self, packed: bytes) -> Recommendation:
        """A memoised ranking back as a Recommendation (ids, then float32 scores)."""
        words = np.frombuffer(packed, np.int32)
        n = len(words) // 2
        return Recommendation(
            self.item_side.items.external(words[:n]),
            words[n:].view(np.float32).tolist(),
            False,
            self.item_side.version,
        )

    def popular(self, k: int, user_id: str | None = None, include_liked: bool = False
                ) -> Recommendation:  # fmt: skip
        """The popularity list (unknown users, overload), without what ``user_id`` excludes."""
        side = self.item_side
        user = None if user_id is None else self.users.get(user_id)
        if user is None or (user >= self.n_trained_users and user not in self.feedback):
            return Recommendation(side.items.external(side.popular[:k]),
                                  side.popular_scores[:k].tolist(), True, side.version)  # fmt: skip
        excluded = self.excluded(user, include_liked)
        head = side.popular[: k + len(excluded)]  # enough that k survive the exclusion
        keep = np.flatnonzero(~np.isin(head, excluded, assume_unique=True))[:k]
        return Recommendation(side.items.external(head[keep]),
                              side.popular_scores[keep].tolist(), True, side.version)  # fmt: skip

    def similar(self, item_id: str, k: int) -> tuple[list[str], list[float]]:
        """Nearest items by cosine of item vectors, the item itself left out."""
        self.check_k(k)
        item = self.item_side.items.get(item_id)
        if item is None:
            raise UnknownItemError(f"item {item_id!r} is not in model {self.item_side.version}",
                                   {"item_id": item_id})  # fmt: skip
        query = self.item_side.unit[item : item + 1]
        scores, ids = self.item_side.similar_index.search(query, k + 1)
        keep = (ids[0] >= 0) & (ids[0] != item)
        ids_kept, scores_kept = ids[0][keep][:k], scores[0][keep][:k]
        return self.item_side.items.external(ids_kept), scores_kept.tolist()

    def history(self, user_id: str, limit: int) -> list[HistoryRow]:
        """The user's signed feedback newest first: events logged since the trained graph, the
        logged events it holds, then its other edges (dataset rows: no id, kind by sign)."""
        user = self.users.get(user_id)
        if user is None:
            return []
        items = self.item_side.items
        out: list[HistoryRow] = []
        feedback = self.feedback.get(user)
        if feedback is not None:
            rows = list(itertools.islice(reversed(feedback.history), limit))
            names = items.external(np.asarray([row[2] for row in rows], np.int64))
            for (_, event_id, _, kind, value, ts), name in zip(rows, names, strict=True):
                out.append((event_id, name, kind, value, ts))
            if len(out) >= limit:
                return out
        if user < self.n_trained_users:
            out += self._trained_history.rows(user, items, limit - len(out))
        if user < self.n_trained_users and len(out) < limit:
            pos, neg = self._trained_edges(user)
            pos_w, neg_w = self._trained_strengths(user)
            # Pairs a logged event set are listed above, by that event.
            edges = np.concatenate([pos, neg])
            keep = ~np.isin(edges, self._trained_history.items_of(user))
            trained = edges[keep][: limit - len(out)]
            signed = np.concatenate([pos_w, -neg_w])[keep][: len(trained)]
            kinds = np.where(signed > 0, TRAIN_KIND[True], TRAIN_KIND[False])
            if self._named_skip is not None:
                # A logged skip trained into the graph (beyond the history kept) keeps its name.
                kinds[signed == self._named_skip] = "skip"
            names = items.external(trained)
            out += [(None, name, kind, None, None)
                    for name, kind in zip(names, kinds.tolist(), strict=True)]  # fmt: skip
        return out

    def restart_replay(self) -> int:
        """Logged events a restart on the served version would replay: those since the last
        snapshot, or, once a version trained on another graph is served (a restart builds its
        users from that graph, which no snapshot of this state fits), all after its watermark."""
        served = self.item_side.artifact
        if served.graph_fingerprint == self.graph:
            return self.since_snapshot
        return max(self.applied_seq - served.watermark, 0)

    def user_count(self) -> int:
        """Users known to the state (trained plus created online)."""
        return len(self.users)
