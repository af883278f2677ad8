"""Feedback strengths: how an event becomes a signed strength, live and when training from a log.

The live state and ``signedrec train --events`` share :func:`strengths_by_kind` and
:func:`rating_strength`, so a model retrained on the log holds each user's graph exactly as the
server held it after the same events (the latest strength per pair wins in both).
"""

from __future__ import annotations

import math
import sys
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np

from server.config import EventWeights
from server.data import IdMap
from server.errors import DataError
from server.events import EVENTS_DIR, KIND_CODES, ReadReport, catalogue_problem, read_records

PROGRESS_EVERY = 1_000_000  # records between progress lines while reading a log


def strengths_by_kind(weights: EventWeights) -> dict[str, float]:
    """The signed strength of each kind whose strength does not depend on a value."""
    return {"like": weights.like, "dislike": weights.dislike, "skip": weights.skip}


def rating_strength(value: float, threshold: float, weights: EventWeights) -> float:
    """A rating's signed strength: positive at or above the threshold."""
    return weights.rating_positive if value >= threshold else weights.rating_negative


@dataclass(frozen=True, slots=True)
class LogFeedback:
    """A log's events as parallel arrays in seq order, with the users it created."""

    users: np.ndarray  # int64 dense user index (existing users first, then new ones)
    items: np.ndarray  # int64 dense item index
    strengths: np.ndarray  # float32 signed strength
    n_users: int  # users after the log: the given map plus the ones the log created
    new_users: list[str]
    report: ReadReport
    last_event_id: str | None  # the id of the event at the watermark: which log this was
    weights: EventWeights
    history: dict[str, np.ndarray]  # the events read, as an artifact's logged-event arrays

    @property
    def watermark(self) -> int:
        """The last seq read: what a model trained on this feedback has folded in."""
        return self.report.last_seq


def log_directory(path: Path) -> Path:
    """The event log directory from either a server's state dir or the log dir itself."""
    path = Path(path)
    return path / EVENTS_DIR if (path / EVENTS_DIR).is_dir() else path


def read_feedback(
    path: Path, users: IdMap, items: IdMap, weights: EventWeights, threshold: float,
    out: TextIO | None = None, after_seq: int = 0, after_event_id: str | None = None,
    catalogue: str | None = None,
) -> LogFeedback:  # fmt: skip
    """The complete events of a log after ``after_seq`` (a base version's watermark, whose event
    there must be ``after_event_id``) as training feedback. An item outside the catalogue, a state
    dir marked for another ``catalogue`` (fingerprint of the items' ids), or a log that lacks
    events the model needs, is refused naming the log and the seq."""
    out = sys.stderr if out is None else out  # the stream at call time, not import
    directory = log_directory(path)

    def refuse(problem: str) -> DataError:
        return DataError(str(directory), None, problem)

    foreign = None if catalogue is None else catalogue_problem(directory.parent, catalogue)
    if foreign is not None:
        raise refuse(f"{foreign}; train on the dataset whose items that server served")
    report, batches = read_records(directory)

    if report.segments == 0:  # a server's log always has one: this is not a log directory
        raise refuse("no event log segments (events-*.log) here: give the server's state dir")

    if report.first_seq > after_seq + 1:
        raise refuse(
            f"the log starts at seq {report.first_seq}: events {after_seq + 1}.."
            f"{report.first_seq - 1} were dropped, so the model would miss them"
            + ("" if after_seq else " (train --since a version that holds them)")
        )
    if report.last_seq < after_seq:
        raise refuse(f"the log ends at seq {report.last_seq}, before the base version's "
                     f"watermark {after_seq}: it is another server's log")  # fmt: skip
    fixed = strengths_by_kind(weights)
    kind_code = {kind: code for code, kind in enumerate(KIND_CODES)}
    known = len(users)
    user_ix: list[int] = []
    item_ix: list[int] = []
    strength: list[float] = []
    # What a user's history shows of each event, kept compact (array module, one id blob).
    seqs, kinds, values, stamps = array("q"), array("B"), array("d"), array("d")
    id_bytes, id_ends = bytearray(), array("q")
    add_user, item_get = users.add, items.get
    done = 0
    last_id = after_event_id
    for batch in batches:
        for record in batch:
            if record.seq <= after_seq:
                if record.seq == after_seq and after_event_id not in (None, record.event_id):
                    raise refuse(f"event seq {after_seq} is {record.event_id!r}, but the base "
                                 f"version was trained up to {after_event_id!r} there: it is "
                                 "another server's log")  # fmt: skip
                continue
            item = item_get(record.item_id)
            if item is None:
                raise refuse(
                    f"event seq {record.seq} names item {record.item_id!r}, which is not in the "
                    "dataset's catalogue (a log written for another catalogue?)"
                )
            value = fixed.get(record.kind)
            if value is None:
                if record.value is None:
                    raise refuse(f"event seq {record.seq}: a rating without a value")
                value = rating_strength(record.value, threshold, weights)
            user_ix.append(add_user(record.user_id))
            item_ix.append(item)
            strength.append(value)
            seqs.append(record.seq)
            kinds.append(kind_code[record.kind])
            values.append(math.nan if record.value is None else record.value)
            stamps.append(record.ts)
            id_bytes += record.event_id.encode()
            id_ends.append(len(id_bytes))
        if batch[-1].seq > after_seq:
            last_id = batch[-1].event_id
        if done // PROGRESS_EVERY != (done + len(batch)) // PROGRESS_EVERY:
            print(f"log: {done + len(batch):,} of {report.last_seq - report.first_seq + 1:,} "
                  "events read", file=out, flush=True)  # fmt: skip
        done += len(batch)
    new_users = users.external(np.arange(known, len(users)))
    return LogFeedback(
        users=np.asarray(user_ix, np.int64),
        items=np.asarray(item_ix, np.int64),
        strengths=np.asarray(strength, np.float32),
        n_users=len(users),
        new_users=new_users,
        report=report,
        last_event_id=last_id,
        weights=weights,
        history={
            "log_seqs": np.frombuffer(seqs, np.int64).copy(),
            "log_users": np.asarray(user_ix, np.int32),
            "log_items": np.asarray(item_ix, np.int32),
            "log_kinds": np.frombuffer(kinds, np.uint8).copy(),
            "log_values": np.frombuffer(values, np.float64).copy(),
            "log_ts": np.frombuffer(stamps, np.float64).copy(),
            "log_id_offsets": np.concatenate([[0], np.frombuffer(id_ends, np.int64)]),
            "log_id_bytes": np.frombuffer(bytes(id_bytes), np.uint8).copy(),
        },
    )
