"""Snapshots of the live state at a log sequence number, so a restart replays only what follows.

A snapshot file is a header (magic, schema), length-prefixed frames and a crc32 trailer over the
frames: a msgpack head, the raw float32 user vectors, then users' feedback and the recent event
ids in msgpack chunks (arrays). Users' feedback is encoded as it is copied (``FeedbackChunks``):
bytes are invisible to the garbage collector, so copying a large state allocates no lasting
containers that would set off full collections, and the writer thread only frames and writes
(short holds of the GIL, so the event loop keeps answering). The file is written to a temp
file, fsync'd and renamed. A snapshot is only trusted for the users and trained graph the state
was built on (after a live swap to a version trained on another graph, the state keeps the graph
it started on) and the item catalogue: under the version it was taken under it is restored as
is; under another version of the same graph and catalogue (a crash after a live swap, then a
restart on the other version) its feedback is restored and the vectors refolded. Anything else
(another graph or catalogue, a bad checksum, an unreadable file) is reported and ignored, and the
full log is replayed. Log segments are never deleted on the strength of a snapshot, so a lost
snapshot never loses data.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec
import numpy as np

from server.durable import atomic_write, fsync_dir, temporary

log = logging.getLogger("signedrec.snapshot")

SCHEMA = 3  # 2: graph; 3: framed, chunked feedback and ids
FILE = "snapshot.msgpack"
AHEAD_SUFFIX = "ahead-of-log"  # a snapshot set aside because its log ends before it
HEADER = struct.Struct("<4sI")  # magic, schema
FRAME = struct.Struct("<Q")  # the length of the frame that follows
TRAILER = struct.Struct("<I")  # crc32 of everything between header and trailer
MAGIC = b"SRsn"

HistoryRow = tuple[int, str, int, str, float | None, float]


class UserSnapshot(msgspec.Struct, array_like=True):
    """One user's online feedback, in insertion (recency) order."""

    user: int
    items: list[int]
    strengths: list[float]
    negatives: list[int]
    history: list[HistoryRow]


class Head(msgspec.Struct, array_like=True):
    """The first frame: what the snapshot is of, and how many chunk frames follow the vectors."""

    artifact_version: str  # Artifact.model_id (not the directory name: that may be reused)
    seq: int
    users: list[str]
    dim: int
    # Artifact.graph_fingerprint of the users and trained graph the state holds.
    graph: str
    feedback_chunks: int
    id_chunks: int
    # Artifact.catalogue_fingerprint of the item ids ("" in files written before it existed:
    # those are trusted for their own version only).
    items: str = ""


_ENCODER = msgspec.msgpack.Encoder()
_HEAD = msgspec.msgpack.Decoder(Head)
_FEEDBACK = msgspec.msgpack.Decoder(list[UserSnapshot])
_IDS = msgspec.msgpack.Decoder(list[str])


def _array_header(n: int) -> bytes:
    """The msgpack header of an array of ``n`` elements (fixarray, array 16 or array 32)."""
    if n < 16:
        return bytes([0x90 | n])
    if n < 1 << 16:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


@dataclass(slots=True)
class Snapshot:
    """Everything replay would rebuild, as of log sequence ``seq``."""

    artifact_version: str
    seq: int
    users: list[str]
    vectors: np.ndarray  # float32 (len(users), dim), C-contiguous
    feedback: list[bytes | memoryview]  # msgpack arrays of UserSnapshot (FeedbackChunks)
    event_ids: list[str]  # the dedup window, oldest first
    graph: str
    items: str = ""

    def user_feedback(self) -> Iterator[UserSnapshot]:
        """Every user's feedback, decoded a chunk at a time."""
        for chunk in self.feedback:
            yield from _FEEDBACK.decode(chunk)


class FeedbackChunks:
    """Users' feedback msgpack-encoded as it is added, in arrays of ``size`` users."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.chunks: list[bytes | memoryview] = []
        self._buffer = bytearray()
        self._count = 0

    def add(self, user: UserSnapshot) -> None:
        """Encode one user's feedback into the open chunk."""
        _ENCODER.encode_into(user, self._buffer, -1)
        self._count += 1
        if self._count == self.size:
            self._close()

    def _close(self) -> None:
        self.chunks.append(_array_header(self._count) + self._buffer)
        self._buffer, self._count = bytearray(), 0

    def finish(self) -> list[bytes | memoryview]:
        """The chunks, the open one closed."""
        if self._count:
            self._close()
        return self.chunks


def _frames(snap: Snapshot, chunk: int) -> Iterator[bytes | memoryview]:
    """The file's pieces, encoded one chunk at a time (each a short hold of the GIL)."""
    starts = range(0, len(snap.event_ids), chunk)
    head = Head(snap.artifact_version, snap.seq, snap.users, snap.vectors.shape[1], snap.graph,
                len(snap.feedback), len(starts), snap.items)  # fmt: skip
    array = np.ascontiguousarray(snap.vectors, dtype=np.float32)
    vectors = memoryview(array).cast("B") if array.size else b""  # no byte view of 0 rows
    encoded = (_ENCODER.encode(snap.event_ids[i : i + chunk]) for i in starts)  # one at a time
    crc = 0
    yield HEADER.pack(MAGIC, SCHEMA)
    for part in itertools.chain((_ENCODER.encode(head), vectors), snap.feedback, encoded):
        prefix = FRAME.pack(len(part))
        crc = zlib.crc32(part, zlib.crc32(prefix, crc))
        yield prefix
        yield part
    yield TRAILER.pack(crc)


def write(directory: Path, snap: Snapshot, chunk: int) -> Path:
    """Atomically replace the snapshot in ``directory``, encoding ``chunk`` event ids at once."""
    return atomic_write(directory / FILE, _frames(snap, chunk))


def set_aside(directory: Path) -> Path:
    """Rename the snapshot so no later start restores it (kept for inspection), e.g. one ahead
    of its log: once the log grows past its seq again it would silently skip those events."""
    path = directory / FILE
    aside = path.with_name(f"{FILE}.{AHEAD_SUFFIX}")
    os.replace(path, aside)
    fsync_dir(directory)
    return aside


def _parse(data: memoryview) -> Snapshot:
    """Decode a checked payload (frames only); raises ValueError on a malformed layout."""
    frames: list[memoryview] = []
    offset = 0
    while offset < len(data):
        if offset + FRAME.size > len(data):
            raise ValueError("truncated frame length")
        (size,) = FRAME.unpack_from(data, offset)
        offset += FRAME.size
        if offset + size > len(data):
            raise ValueError("truncated frame")
        frames.append(data[offset : offset + size])
        offset += size
    if len(frames) < 2:
        raise ValueError("no head or vectors")
    head = _HEAD.decode(frames[0])
    if len(frames) != 2 + head.feedback_chunks + head.id_chunks:
        raise ValueError(f"{len(frames)} frames, the head announces "
                         f"{2 + head.feedback_chunks + head.id_chunks}")  # fmt: skip
    if len(frames[1]) != len(head.users) * head.dim * 4:
        raise ValueError("vectors do not match the head's users and dim")
    vectors = np.frombuffer(frames[1], dtype=np.float32).reshape(len(head.users), head.dim)
    split = 2 + head.feedback_chunks
    feedback = frames[2:split]  # decoded as restored (Snapshot.user_feedback)
    ids: list[str] = []
    for frame in frames[split:]:
        ids.extend(_IDS.decode(frame))
    return Snapshot(head.artifact_version, head.seq, head.users, vectors, feedback, ids,
                    head.graph, head.items)  # fmt: skip


def state_key(graph: str, weights: msgspec.Struct) -> str:
    """What a snapshot's state depends on beside the item side: the trained graph (its
    fingerprint) and the weights events fold in with."""
    return hashlib.sha256(graph.encode() + b"|" + msgspec.json.encode(weights)).hexdigest()


def read(directory: Path, artifact_version: str, graph: str, items: str) -> Snapshot | None:
    """The snapshot for this graph, under this version or another with the same item catalogue
    ``items`` (the caller refolds the vectors then), or None with the reason logged."""
    path = directory / FILE
    try:
        temporary(path).unlink(missing_ok=True)  # a write cut short by a crash
    except OSError as exc:
        log.warning("cannot remove %s: %s", temporary(path), exc)
    if not path.is_file():
        return None
    try:
        data = memoryview(path.read_bytes())
    except OSError as exc:
        log.warning("ignoring snapshot %s: %s", path, exc)
        return None
    if len(data) < HEADER.size + TRAILER.size:
        log.warning("ignoring snapshot %s: truncated", path)
        return None
    magic, schema = HEADER.unpack_from(data)
    payload = data[HEADER.size : len(data) - TRAILER.size]
    (crc,) = TRAILER.unpack_from(data, len(data) - TRAILER.size)
    if magic != MAGIC or schema != SCHEMA or zlib.crc32(payload) != crc:
        log.warning("ignoring snapshot %s: bad magic, schema or checksum", path)
        return None
    try:
        snap = _parse(payload)
    except (ValueError, msgspec.DecodeError) as exc:
        log.warning("ignoring snapshot %s: %s", path, exc)
        return None
    same_catalogue = snap.artifact_version == artifact_version or bool(
        snap.items and snap.items == items
    )
    if snap.graph != graph or not same_catalogue:
        log.info(
            "snapshot %s holds users built on trained graph and event weights %s (taken while "
            "serving %s); %s starts from %s%s: replaying the log instead",
            path,
            snap.graph[:12],
            snap.artifact_version,
            artifact_version,
            graph[:12],
            "" if same_catalogue else " with another item catalogue",
        )
        return None
    return snap
