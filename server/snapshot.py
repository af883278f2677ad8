"""Snapshots of the live state at a log sequence number, so a restart replays only what follows.

A snapshot is one msgpack file with a crc32 header, written to a temp file, fsync'd and renamed.
It is only trusted for the artifact version it was taken under and the users and trained graph
the state was built on (after a live swap to a version trained on another graph, the state keeps
the graph it started on); anything else (another version or graph, a bad checksum, an unreadable
file) is reported and ignored, and the full log is replayed. Log segments are never deleted on
the strength of a snapshot, so a lost snapshot never loses data.
"""

from __future__ import annotations

import logging
import struct
import zlib
from pathlib import Path

import msgspec

from server.durable import atomic_write

log = logging.getLogger("signedrec.snapshot")

SCHEMA = 2  # 2: graph
FILE = "snapshot.msgpack"
HEADER = struct.Struct("<4sII")  # magic, schema, crc32 of payload
MAGIC = b"SRsn"

HistoryRow = tuple[int, str, int, str, float | None, float]


class UserSnapshot(msgspec.Struct, array_like=True):
    """One user's online feedback, in insertion (recency) order."""

    user: int
    items: list[int]
    strengths: list[float]
    negatives: list[int]
    history: list[HistoryRow]


class Snapshot(msgspec.Struct, array_like=True):
    """Everything replay would rebuild, as of log sequence ``seq``."""

    artifact_version: str
    seq: int
    users: list[str]
    dim: int
    vectors: bytes
    feedback: list[UserSnapshot]
    event_ids: list[str]
    # Artifact.graph_fingerprint of the users and trained graph the state holds.
    graph: str


_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(Snapshot)


def write(directory: Path, snapshot: Snapshot) -> Path:
    """Atomically replace the snapshot in ``directory``."""
    payload = _ENCODER.encode(snapshot)
    return atomic_write(directory / FILE, HEADER.pack(MAGIC, SCHEMA, zlib.crc32(payload)) + payload)


def read(directory: Path, artifact_version: str, graph: str) -> Snapshot | None:
    """The snapshot for this artifact version on this graph, or None (with the reason logged)."""
    path = directory / FILE
    if not path.is_file():
        return None
    try:
        data = path.read_bytes()
    except OSError as exc:
        log.warning("ignoring snapshot %s: %s", path, exc)
        return None
    if len(data) < HEADER.size:
        log.warning("ignoring snapshot %s: truncated header", path)
        return None
    magic, schema, crc = HEADER.unpack_from(data)
    payload = memoryview(data)[HEADER.size :]
    if magic != MAGIC or schema != SCHEMA or zlib.crc32(payload) != crc:
        log.warning("ignoring snapshot %s: bad magic, schema or checksum", path)
        return None
    try:
        snapshot = _DECODER.decode(payload)
    except msgspec.DecodeError as exc:
        log.warning("ignoring snapshot %s: %s", path, exc)
        return None
    if snapshot.artifact_version != artifact_version or snapshot.graph != graph:
        log.info(
            "snapshot %s was taken under model %s (graph %s), serving %s (graph %s): "
            "replaying the log instead",
            path,
            snapshot.artifact_version,
            snapshot.graph[:12],
            artifact_version,
            graph[:12],
        )
        return None
    return snapshot
