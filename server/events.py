"""Durable feedback event log: checksummed segment files, group-committed appends, fast replay.

On disk a log is a directory of segment files ``events-<first_seq:020d>.log``. Each record is a
fixed header ``<4sIIQ`` (magic ``SRv1``, payload length, zlib crc32 of the payload, seq) followed
by the msgpack encoding of an :class:`EventRecord`. Seqs start at 1 and are gapless across
segments. The module knows nothing of HTTP.
"""

from __future__ import annotations

import asyncio
import bisect
import errno
import fcntl
import logging
import math
import os
import re
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Final, Literal, get_args

import msgspec

from server.config import Base, EventLogConfig
from server.durable import atomic_write, fsync_dir
from server.errors import (
    ConfigError,
    InvalidEventError,
    LogCorruptError,
    LogUnavailableError,
    StateMismatchError,
)

logger = logging.getLogger("signedrec.events")

FeedbackKind = Literal["like", "dislike", "skip", "rating"]
FEEDBACK_KINDS: Final[frozenset[str]] = frozenset(get_args(FeedbackKind))
# A kind's code in an artifact's logged events (log_kinds) is its index here.
KIND_CODES: Final[tuple[str, ...]] = get_args(FeedbackKind)

MAGIC: Final[bytes] = b"SRv1"
HEADER: Final[struct.Struct] = struct.Struct("<4sIIQ")
HEADER_SIZE: Final[int] = HEADER.size
# Upper bound on one payload; a header claiming more is corrupt. Ids are bounded far below it.
MAX_PAYLOAD_BYTES: Final[int] = 64 * 1024
MAX_ID_CHARS: Final[int] = 512
SEGMENT_PATTERN: Final[re.Pattern[str]] = re.compile(r"events-(\d{20})\.log")
LOCK_NAME: Final[str] = "LOCK"
# Held exclusively by the writer over each write + fsync (or rollback), shared by a lock-free
# reader while it takes the segments' sizes: a reader then sees only whole, durable batches,
# never bytes a failed fsync is about to cut off and whose seqs the next batch reuses.
COMMIT_LOCK_NAME: Final[str] = "COMMIT"
EVENTS_DIR: Final[str] = "events"  # the log's directory inside a server's state dir
# Beside the log: the item catalogue (Artifact.catalogue_fingerprint) whose ids its events name.
CATALOGUE_FILE: Final[str] = "catalogue"

# Indirections so tests can inject disk failures without patching the os module for everyone.
_write: Callable[[int, Any], int] = os.write
_fsync: Callable[[int], None] = os.fsync


class EventRecord(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """One accepted feedback event with its log seq; also the compact on-disk payload."""

    seq: int
    event_id: str
    user_id: str
    item_id: str
    kind: FeedbackKind
    value: float | None
    ts: float


class NewEvent(Base):
    """A feedback event to append; the log assigns its seq, the caller fills ``ts``."""

    event_id: str
    user_id: str
    item_id: str
    kind: FeedbackKind
    ts: float
    value: float | None = None


class OpenReport(Base):
    """What opening the log found, including any torn tail it cut off the last segment."""

    records: int
    first_seq: int
    last_seq: int
    segments: int
    truncated_bytes: int = 0
    problem: str | None = None


class _Segment(msgspec.Struct, frozen=True):
    """One segment file and the seq of its first record (from its name)."""

    first_seq: int
    path: Path


class _Tail(msgspec.Struct, frozen=True):
    """Durable state swapped atomically: segments, bytes durable in the last one, last seq."""

    segments: tuple[_Segment, ...]
    offset: int
    last_seq: int


class _Pending(msgspec.Struct):
    """One caller's framed records waiting for the next group commit."""

    data: bytes
    records: list[EventRecord]
    future: asyncio.Future[list[EventRecord]]


_DECODER: Final = msgspec.msgpack.Decoder(EventRecord)


def segment_name(first_seq: int) -> str:
    """File name of the segment whose first record has ``first_seq``."""
    return f"events-{first_seq:020d}.log"


def _errno_name(exc: OSError) -> str:
    """Symbolic errno (``ENOSPC``) of an OSError, for messages and metrics labels."""
    return errno.errorcode.get(exc.errno or 0, f"errno {exc.errno}")


def _unavailable(
    what: str, exc: OSError, path: Path | None = None, note: str = ""
) -> LogUnavailableError:
    """Build the LogUnavailableError for an OSError, naming errno and file."""
    name = _errno_name(exc)
    where = f" on {path}" if path is not None else ""
    return LogUnavailableError(
        f"event log {what} failed{where}: {name} ({exc.strerror or exc}){note}",
        {"errno": name, "file": str(path) if path is not None else None},
    )


def _write_all(fd: int, data: bytes) -> None:
    """Write every byte of ``data`` to ``fd``, looping over short writes."""
    view = memoryview(data)
    while view:
        written = _write(fd, view)
        if written <= 0:
            raise OSError(errno.EIO, "write wrote no bytes")
        view = view[written:]


def _fsync_dir(directory: Path) -> None:
    """Fsync a directory through the injectable ``_fsync`` (fault-injection tests)."""
    fsync_dir(directory, _fsync)


def _read_file(path: Path, limit: int = -1) -> bytes:
    """Read a whole file (or its first ``limit`` bytes) with one read call."""
    with open(path, "rb") as fh:
        return fh.read() if limit < 0 else fh.read(limit)


def _scan(buf: bytes, first_seq: int) -> tuple[int, int, str | None]:
    """Validate framing, crc and seq continuity; return (records, good end offset, problem)."""
    view = memoryview(buf)
    size = len(buf)
    pos = 0
    count = 0
    expected = first_seq
    unpack = HEADER.unpack_from
    crc32 = zlib.crc32
    while pos < size:
        if size - pos < HEADER_SIZE:
            return count, pos, f"partial header ({size - pos} of {HEADER_SIZE} bytes)"
        magic, length, crc, seq = unpack(buf, pos)
        end = pos + HEADER_SIZE + length
        if magic != MAGIC:
            return count, pos, f"bad magic {magic!r}"
        if length == 0 or length > MAX_PAYLOAD_BYTES:
            return count, pos, f"bad payload length {length}"
        if end > size:
            return count, pos, f"partial payload ({size - pos - HEADER_SIZE} of {length} bytes)"
        if crc32(view[pos + HEADER_SIZE : end]) != crc:
            return count, pos, f"crc mismatch in record seq {seq}"
        if seq != expected:
            return count, pos, f"seq {seq} where {expected} was expected"
        count += 1
        expected += 1
        pos = end
    return count, pos, None


def _next_valid_record(buf: bytes, start: int) -> int:
    """Offset of the first fully valid record at or after ``start``, or -1 if there is none."""
    view = memoryview(buf)
    size = len(buf)
    pos = buf.find(MAGIC, start)
    while 0 <= pos <= size - HEADER_SIZE:
        _, length, crc, seq = HEADER.unpack_from(buf, pos)
        end = pos + HEADER_SIZE + length
        if 0 < length <= MAX_PAYLOAD_BYTES and end <= size:
            payload = view[pos + HEADER_SIZE : end]
            if zlib.crc32(payload) == crc:
                try:
                    if _DECODER.decode(payload).seq == seq:
                        return pos
                except msgspec.DecodeError:
                    pass
        pos = buf.find(MAGIC, pos + 1)
    return -1


def _list_segments(directory: Path) -> list[_Segment]:
    """Segment files of a log directory in seq order; other files are ignored."""
    found: list[_Segment] = []
    for entry in directory.iterdir():
        match = SEGMENT_PATTERN.fullmatch(entry.name)
        if match is None or not entry.is_file():
            continue
        first_seq = int(match.group(1))
        if first_seq < 1:
            raise LogCorruptError(f"{entry}: segment name claims first seq 0", {"file": str(entry)})
        found.append(_Segment(first_seq, entry))
    found.sort(key=lambda seg: seg.first_seq)
    return found


def _check_config(config: EventLogConfig) -> None:
    """Reject log settings that cannot work."""
    if config.segment_bytes < HEADER_SIZE + 1:
        raise ConfigError(f"log.segment_bytes must be > {HEADER_SIZE}, got {config.segment_bytes}")
    if config.replay_batch < 1:
        raise ConfigError(f"log.replay_batch must be >= 1, got {config.replay_batch}")


def check_event(event: NewEvent, index: int) -> None:
    """Raise InvalidEventError when one event is semantically unusable (``index``: its place
    in the request, for the error)."""

    def bad(field: str, problem: str) -> InvalidEventError:
        return InvalidEventError(
            f"event {index}: {field} {problem}",
            {"index": index, "field": field, "problem": problem},
        )

    if not isinstance(event, NewEvent):
        raise TypeError(f"event {index}: expected NewEvent, got {type(event).__name__}")
    for field in ("event_id", "user_id", "item_id"):
        ident = getattr(event, field)
        if not isinstance(ident, str):
            raise bad(field, "must be a string")
        if not ident:
            raise bad(field, "must not be empty")
        if len(ident) > MAX_ID_CHARS:
            raise bad(field, f"is longer than {MAX_ID_CHARS} characters")
        if "\x00" in ident:
            # Id maps are stored as numpy unicode arrays, which drop trailing NULs: 'a\x00' would
            # come back from a snapshot as 'a' and collide with another user.
            raise bad(field, "must not contain NUL characters")
    if event.kind not in FEEDBACK_KINDS:
        raise bad("kind", f"must be one of {sorted(FEEDBACK_KINDS)}, got {event.kind!r}")
    value = event.value
    if value is None:
        if event.kind == "rating":
            raise bad("value", "is required for a rating")
    elif isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise bad("value", f"must be a finite number, got {value!r}")
    ts = event.ts
    if isinstance(ts, bool) or not isinstance(ts, int | float) or not math.isfinite(ts) or ts < 0:
        raise bad("ts", f"must be finite unix seconds >= 0, got {ts!r}")


def catalogue_problem(state_dir: Path, fingerprint: str) -> str | None:
    """Why a state dir's events belong to another item catalogue (None: this one, or unmarked)."""
    try:
        claimed = (Path(state_dir) / CATALOGUE_FILE).read_text().strip()
    except FileNotFoundError:
        return None
    if claimed == fingerprint:
        return None
    return (
        f"{state_dir} holds the events of another item catalogue (items {claimed[:12]}..., "
        f"here {fingerprint[:12]}...): the same item ids there name other items"
    )


def claim_catalogue(state_dir: Path, fingerprint: str) -> None:
    """Mark a state dir as this catalogue's, refusing one marked for another.

    Its log names items by id, and two artifact roots of one name share the default state dir:
    replaying one catalogue's events into another would silently move them onto other items. A
    state dir from before the marker is claimed as it is (nothing to check it against).
    """
    problem = catalogue_problem(state_dir, fingerprint)
    if problem is not None:
        raise StateMismatchError(
            f"{problem}; serve with --state-dir set to this catalogue's own state, or a new one",
            {"state_dir": str(state_dir), "catalogue": fingerprint},
        )
    marker = Path(state_dir) / CATALOGUE_FILE
    if not marker.exists():
        try:
            atomic_write(marker, f"{fingerprint}\n".encode())
        except OSError as exc:  # a full or read-only disk: the same one-line error as the log's
            raise _unavailable("catalogue marker write", exc, marker) from exc


def _pread_all(fd: int, size: int) -> bytes:
    """The first ``size`` bytes of an open file, looping over short reads."""
    pieces: list[bytes] = []
    offset = 0
    while offset < size:
        piece = os.pread(fd, size - offset, offset)
        if not piece:
            raise OSError(errno.EIO, f"file shrank below {size} bytes while read")
        pieces.append(piece)
        offset += len(piece)
    return b"".join(pieces)


def _failed_rotation(segments: list[_Segment]) -> bool:
    """Whether the last segment is an empty leftover of a failed rotation: its name claims a
    seq the previous segment went on to hold (an earlier version did not retry the rotation)."""
    if len(segments) < 2 or segments[-1].path.stat().st_size:
        return False
    buf = _read_file(segments[-2].path)
    count, _, _ = _scan(buf, segments[-2].first_seq)
    return segments[-1].first_seq < segments[-2].first_seq + count


def _drop_failed_rotation(directory: Path, segments: list[_Segment]) -> list[_Segment]:
    """Remove an empty leftover of a failed rotation (it holds nothing; see _failed_rotation)."""
    if not _failed_rotation(segments):
        return segments
    logger.warning("event log: removing %s, an empty leftover of a failed rotation",
                   segments[-1].path)  # fmt: skip
    segments[-1].path.unlink()
    _fsync_dir(directory)
    return segments[:-1]


def _read_durable(directory: Path) -> tuple[list[_Segment], list[bytes]]:
    """Every segment's bytes up to where the writer had committed when they were opened.

    The segments are opened and sized under the shared commit lock, then read without it: the
    writer waits only for the listing, and a segment that retention deletes meanwhile stays
    readable through its open descriptor. A log whose writer predates the commit lock (no file)
    is read as it stands.
    """
    handles: list[tuple[int, int]] = []
    try:
        try:
            lock_fd: int | None = os.open(directory / COMMIT_LOCK_NAME, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            lock_fd = None
        try:
            if lock_fd is not None:
                fcntl.flock(lock_fd, fcntl.LOCK_SH)
            segments = _list_segments(directory)
            if _failed_rotation(segments):
                segments = segments[:-1]  # the writer's next open removes it
            for seg in segments:
                fd = os.open(seg.path, os.O_RDONLY | os.O_CLOEXEC)
                handles.append((fd, os.fstat(fd).st_size))
        finally:
            if lock_fd is not None:
                os.close(lock_fd)  # releases the shared lock
        buffers = [_pread_all(fd, size) for fd, size in handles]
    finally:
        for fd, _ in handles:
            os.close(fd)
    return segments, buffers


class ReadReport(Base):
    """What a lock-free read of a log saw: its seq range and anything cut off its end."""

    directory: str
    first_seq: int
    last_seq: int
    segments: int
    unread_tail: str | None = None


def read_records(
    directory: Path, batch_size: int = 65536
) -> tuple[ReadReport, Iterator[list[EventRecord]]]:
    """Read a log without its writer lock (a running server may be appending): every record
    committed when the read began, in seq order, in lists; a partial record at the very end (a
    torn tail the next open will cut) is left out and reported. Damage anywhere else raises."""
    directory = Path(directory)
    if not directory.is_dir():
        problem = "is not a directory" if directory.exists() else "does not exist"
        raise LogUnavailableError(f"event log {directory} {problem}", {"file": str(directory)})
    try:
        segments, buffers = _read_durable(directory)
    except OSError as exc:
        raise _unavailable("read", exc, directory) from exc
    expected = segments[0].first_seq if segments else 1
    ends: list[int] = []
    unread: str | None = None
    for index, (seg, buf) in enumerate(zip(segments, buffers, strict=True)):
        if seg.first_seq != expected:
            raise LogCorruptError(
                f"{seg.path}: starts at seq {seg.first_seq}, not {expected} (missing segment)",
                {"file": str(seg.path), "offset": 0},
            )
        count, end, problem = _scan(buf, seg.first_seq)
        if problem is not None:
            if index != len(segments) - 1 or _next_valid_record(buf, end + 1) >= 0:
                raise LogCorruptError(
                    f"{seg.path} offset {end}: {problem}; the log is damaged",
                    {"file": str(seg.path), "offset": end, "problem": problem},
                )
            unread = f"{seg.path.name} offset {end}: {problem} ({len(buf) - end} bytes)"
        ends.append(end)
        expected = seg.first_seq + count
    report = ReadReport(
        directory=str(directory),
        first_seq=segments[0].first_seq if segments else 1,
        last_seq=expected - 1,
        segments=len(segments),
        unread_tail=unread,
    )

    def batches() -> Iterator[list[EventRecord]]:
        batch: list[EventRecord] = []
        for buf, end in zip(buffers, ends, strict=True):
            pos = 0
            while pos < end:
                _, length, _, _ = HEADER.unpack_from(buf, pos)
                start = pos + HEADER_SIZE
                try:
                    batch.append(_DECODER.decode(buf[start : start + length]))
                except msgspec.DecodeError as exc:
                    raise LogCorruptError(
                        f"{directory}: undecodable record at offset {pos}: {exc}",
                        {"file": str(directory), "offset": pos, "problem": str(exc)},
                    ) from exc
                pos += HEADER_SIZE + length
                if len(batch) >= batch_size:
                    yield batch
                    batch = []
        if batch:
            yield batch

    return report, batches()


class EventLog:
    """Append-only durable feedback log; use from one asyncio event loop only (not thread-safe).

    Build it with :meth:`EventLog.open`. ``append`` group-commits: concurrent callers share one
    write and one fsync, done in a private worker thread so the event loop never blocks on disk.
    ``last_seq`` is the last durable seq. ``replay`` reads the records durable when it is called.
    A cancelled ``append`` caller may or may not have had its events written.
    """

    def __init__(
        self,
        directory: Path,
        config: EventLogConfig,
        tail: _Tail,
        fd: int,
        lock_fd: int,
        commit_fd: int,
    ) -> None:
        """Wrap already-recovered state; call :meth:`EventLog.open` instead."""
        self._dir = directory
        self._config = config
        self._tail = tail
        self._tail_lock = threading.Lock()
        self._fd: int | None = fd
        self._lock_fd: int | None = lock_fd
        self._commit_fd: int | None = commit_fd
        # Set when a rotation failed: its empty segment file may be left behind, so the next
        # batch (whose first seq is that file's, seqs being rolled back) must rotate into it
        # rather than land in the old segment and make the two overlap.
        self._must_rotate = False
        self._next_seq = tail.last_seq + 1
        self._pending: list[_Pending] = []
        self._flusher: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(EventRecord)
        self._closing = False
        self._closed = False
        self._broken: str | None = None
        self.fsync_count = 0
        self.fsync_seconds_total = 0.0
        self.last_fsync_seconds = 0.0
        self.records_written = 0
        self.commits = 0
        # Metrics hook: called on the committing side with (fsync seconds, records in the batch).
        self.on_commit: Callable[[float, int], None] | None = None

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(cls, directory: Path, config: EventLogConfig) -> tuple[EventLog, OpenReport]:
        """Open or create a log, validating every record and cutting a torn tail off the end."""
        _check_config(config)
        directory = Path(directory)
        try:
            if not directory.is_dir():
                directory.mkdir(parents=True, exist_ok=True)
                _fsync_dir(directory.parent)  # the new directory's name survives a power cut
            lock_fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise _unavailable("open", exc, directory) from exc
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(lock_fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise LogUnavailableError(
                    f"event log {directory} is already open (locked by another EventLog)",
                    {"errno": _errno_name(exc), "file": str(directory / LOCK_NAME)},
                ) from exc
            raise _unavailable("lock", exc, directory / LOCK_NAME) from exc
        try:
            commit_fd = os.open(
                directory / COMMIT_LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644
            )
        except OSError as exc:
            os.close(lock_fd)
            raise _unavailable("open", exc, directory / COMMIT_LOCK_NAME) from exc
        try:
            return cls._recover(directory, config, lock_fd, commit_fd)
        except BaseException:
            os.close(commit_fd)
            os.close(lock_fd)
            raise

    @classmethod
    def _recover(
        cls, directory: Path, config: EventLogConfig, lock_fd: int, commit_fd: int
    ) -> tuple[EventLog, OpenReport]:
        """Scan all segments under the held lock and build the log (see :meth:`open`)."""
        try:
            segments = _list_segments(directory)
            segments = _drop_failed_rotation(directory, segments)
        except OSError as exc:
            raise _unavailable("listing", exc, directory) from exc
        records = 0
        expected: int | None = None
        good_end = 0
        truncated = 0
        problem: str | None = None
        for index, seg in enumerate(segments):
            if expected is not None and seg.first_seq != expected:
                raise LogCorruptError(
                    f"{seg.path}: starts at seq {seg.first_seq} but the previous segment ends at "
                    f"seq {expected - 1} (missing or overlapping segment)",
                    {"file": str(seg.path), "offset": 0},
                )
            try:
                buf = _read_file(seg.path)
            except OSError as exc:
                raise _unavailable("read", exc, seg.path) from exc
            count, end, found = _scan(buf, seg.first_seq)
            if found is not None:
                is_last = index == len(segments) - 1
                follower = _next_valid_record(buf, end + 1) if is_last else -1
                if not is_last or follower >= 0:
                    why = (
                        "in a segment that is not the last"
                        if not is_last
                        else f"followed by a valid record at offset {follower}"
                    )
                    raise LogCorruptError(
                        f"{seg.path} offset {end}: {found}, {why}; refusing to drop accepted data",
                        {"file": str(seg.path), "offset": end, "problem": found},
                    )
                truncated = len(buf) - end
                problem = f"{seg.path.name} offset {end}: {found}"
            records += count
            good_end = end
            expected = seg.first_seq + count
        fd: int | None = None
        try:
            if not segments:
                seg = _Segment(1, directory / segment_name(1))
                fd = os.open(seg.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
                _fsync(fd)
                _fsync_dir(directory)
                segments = [seg]
                expected = 1
            else:
                fd = os.open(segments[-1].path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
                if truncated:
                    logger.warning(
                        "event log: truncating torn tail of %s: %d bytes at offset %d (%s)",
                        segments[-1].path,
                        truncated,
                        good_end,
                        problem,
                    )
                    os.ftruncate(fd, good_end)
                    _fsync(fd)
        except OSError as exc:
            if fd is not None:
                os.close(fd)
            raise _unavailable(
                "recovery", exc, segments[-1].path if segments else directory
            ) from exc
        last_seq = (expected or 1) - 1
        tail = _Tail(tuple(segments), good_end, last_seq)
        report = OpenReport(
            records=records,
            first_seq=segments[0].first_seq,
            last_seq=last_seq,
            segments=len(segments),
            truncated_bytes=truncated,
            problem=problem,
        )
        return cls(directory, config, tail, fd, lock_fd, commit_fd), report

    # ------------------------------------------------------------------ state

    @property
    def directory(self) -> Path:
        """The log directory."""
        return self._dir

    @property
    def last_seq(self) -> int:
        """Seq of the last durable record (0 for an empty log)."""
        return self._tail.last_seq

    @property
    def first_seq(self) -> int:
        """Seq the oldest kept segment starts at (older records were dropped)."""
        return self._tail.segments[0].first_seq

    @property
    def segment_count(self) -> int:
        """Number of segment files currently in the log."""
        return len(self._tail.segments)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has completed."""
        return self._closed

    def _check_writable(self) -> None:
        """Refuse appends on a closed or broken log."""
        if self._closing or self._closed:
            raise LogUnavailableError(f"event log {self._dir} is closed", {"file": str(self._dir)})
        if self._broken is not None:
            raise LogUnavailableError(self._broken, {"file": str(self._dir)})

    # ------------------------------------------------------------------ writing

    def _encode(
        self, events: Sequence[NewEvent], first_seq: int
    ) -> tuple[list[EventRecord], bytes]:
        """Validate events and frame them as records numbered from ``first_seq``."""
        encode = self._encoder.encode
        pack = HEADER.pack
        crc32 = zlib.crc32
        records: list[EventRecord] = []
        frames: list[bytes] = []
        for index, event in enumerate(events):
            check_event(event, index)
            value = None if event.value is None else float(event.value)
            rec = EventRecord(
                first_seq + index,
                event.event_id,
                event.user_id,
                event.item_id,
                event.kind,
                value,
                float(event.ts),
            )
            try:
                payload = encode(rec)
            except (msgspec.EncodeError, UnicodeEncodeError) as exc:
                raise InvalidEventError(
                    f"event {index}: cannot be encoded: {exc}",
                    {"index": index, "problem": str(exc)},
                ) from exc
            if len(payload) > MAX_PAYLOAD_BYTES:
                raise InvalidEventError(
                    f"event {index}: encoded size {len(payload)} exceeds {MAX_PAYLOAD_BYTES} bytes",
                    {"index": index, "problem": "too large"},
                )
            records.append(rec)
            frames.append(pack(MAGIC, len(payload), crc32(payload), rec.seq))
            frames.append(payload)
        return records, b"".join(frames)

    def _sync(self, fd: int) -> float:
        """Fsync ``fd`` unless fsync is disabled; return the seconds it took."""
        if not self._config.fsync:
            return 0.0
        start = time.perf_counter()
        _fsync(fd)
        return time.perf_counter() - start

    def _reopen_blocking(self) -> None:
        """Reopen the active segment after a failed rollback, cutting it to its durable size."""
        tail = self._tail
        path = tail.segments[-1].path
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        try:
            if os.fstat(fd).st_size != tail.offset:
                os.ftruncate(fd, tail.offset)
            _fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def _rotate_blocking(self, first_seq: int) -> None:
        """Start a new segment for records from ``first_seq``, durable in its directory."""
        path = self._dir / segment_name(first_seq)
        # A file of this name can only be left over from a failed rotation: no acked data in it.
        fd = os.open(
            path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644
        )
        try:
            if self._config.fsync:
                _fsync(fd)
                _fsync_dir(self._dir)
        except BaseException:
            os.close(fd)
            raise
        old = self._fd
        self._fd = fd
        with self._tail_lock:
            tail = self._tail
            self._tail = _Tail((*tail.segments, _Segment(first_seq, path)), 0, tail.last_seq)
        if old is not None:
            os.close(old)

    def _rollback_blocking(self, fd: int, offset: int) -> None:
        """Cut a failed batch off the active segment; on failure force a reopen-and-cut later."""
        try:
            os.ftruncate(fd, offset)
            _fsync(fd)
        except OSError as exc:
            logger.warning(
                "event log: rollback of %s to %d bytes not confirmed (%s); will retry",
                self._tail.segments[-1].path,
                offset,
                _errno_name(exc),
            )
            os.close(fd)
            self._fd = None

    def _commit_blocking(self, data: bytes, first_seq: int, last_seq: int) -> float:
        """Durably write one batch (rotating first if needed); on OSError leave no trace."""
        commit_fd = self._commit_fd
        if commit_fd is None:  # pragma: no cover - only a closed log lacks it, and it refuses
            raise OSError(errno.EBADF, "event log is closed")
        fcntl.flock(commit_fd, fcntl.LOCK_EX)
        try:
            return self._commit_locked(data, first_seq, last_seq)
        finally:
            fcntl.flock(commit_fd, fcntl.LOCK_UN)

    def _commit_locked(self, data: bytes, first_seq: int, last_seq: int) -> float:
        """:meth:`_commit_blocking` under the commit lock."""
        if self._fd is None:
            self._reopen_blocking()
        tail = self._tail
        full = tail.offset > 0 and tail.offset + len(data) > self._config.segment_bytes
        if full or self._must_rotate:
            self._must_rotate = True
            self._rotate_blocking(first_seq)
            self._must_rotate = False
        fd = self._fd
        if fd is None:  # pragma: no cover - both branches above leave an fd
            raise OSError(errno.EBADF, "no active segment")
        offset = self._tail.offset
        try:
            _write_all(fd, data)
            seconds = self._sync(fd)
        except OSError:
            self._rollback_blocking(fd, offset)
            raise
        with self._tail_lock:
            tail = self._tail
            self._tail = _Tail(tail.segments, offset + len(data), last_seq)
        return seconds

    def _committed(self, seconds: float, records: int) -> None:
        """Account one successful commit and notify the metrics hook."""
        self.commits += 1
        self.records_written += records
        if self._config.fsync:
            self.fsync_count += 1
            self.fsync_seconds_total += seconds
            self.last_fsync_seconds = seconds
        if self.on_commit is not None:
            try:
                self.on_commit(seconds, records)
            except Exception:
                logger.exception("event log: on_commit hook failed")

    def _failure(self, exc: OSError, count: int) -> LogUnavailableError:
        """The error reported to each caller of a failed batch."""
        note = f"; {count} event(s) not written, retry later"
        err = _unavailable("append", exc, self._tail.segments[-1].path, note)
        err.detail["events"] = count
        return err

    async def append(self, events: Sequence[NewEvent]) -> list[EventRecord]:
        """Append events durably (group-committed) and return them with their seqs."""
        self._check_writable()
        if not events:
            return []
        records, data = self._encode(events, self._next_seq)
        self._next_seq += len(records)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[EventRecord]] = loop.create_future()
        self._pending.append(_Pending(data, records, future))
        if self._flusher is None:
            self._flusher = loop.create_task(self._flush_loop(), name="signedrec-event-flusher")
        return await future

    async def _flush_loop(self) -> None:
        """Commit everything queued, one batch per write+fsync, until the queue is empty."""
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                await self._commit(batch)
        finally:
            self._flusher = None

    async def _commit(self, batch: list[_Pending]) -> None:
        """Write and fsync one group of callers off the loop, then resolve their futures."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="signedrec-events")
        first_seq = batch[0].records[0].seq
        last_seq = batch[-1].records[-1].seq
        data = batch[0].data if len(batch) == 1 else b"".join(p.data for p in batch)
        count = last_seq - first_seq + 1
        loop = asyncio.get_running_loop()
        try:
            seconds = await loop.run_in_executor(
                self._executor, self._commit_blocking, data, first_seq, last_seq
            )
        except OSError as exc:
            # Everything queued behind this batch has seqs after it: fail it too, roll seqs back.
            failed = batch + self._pending
            self._pending = []
            self._next_seq = self._tail.last_seq + 1
            total = sum(len(p.records) for p in failed)
            logger.warning(
                "event log: append of %d event(s) failed: %s (%s)",
                total,
                _errno_name(exc),
                exc.strerror,
            )
            for pending in failed:
                if not pending.future.done():
                    pending.future.set_exception(self._failure(exc, len(pending.records)))
            return
        except BaseException as exc:
            # Cancelled or a bug: the worker may still be writing, so stop accepting appends.
            self._broken = f"event log {self._dir} writer stopped ({type(exc).__name__}); reopen it"
            failed = batch + self._pending
            self._pending = []
            for pending in failed:
                if not pending.future.done():
                    pending.future.set_exception(
                        LogUnavailableError(self._broken, {"file": str(self._dir)})
                    )
            if isinstance(exc, asyncio.CancelledError):
                raise
            logger.exception("event log: writer failed")
            return
        self._committed(seconds, count)
        for pending in batch:
            if not pending.future.done():
                pending.future.set_result(pending.records)

    def append_sync(self, events: Sequence[NewEvent]) -> list[EventRecord]:
        """Append without an event loop (tools, benchmarks); not while async appends run."""
        if self._flusher is not None or self._pending:
            raise RuntimeError("append_sync called while async appends are in flight")
        self._check_writable()
        if not events:
            return []
        records, data = self._encode(events, self._next_seq)
        try:
            seconds = self._commit_blocking(data, records[0].seq, records[-1].seq)
        except OSError as exc:
            raise self._failure(exc, len(records)) from exc
        self._next_seq = records[-1].seq + 1
        self._committed(seconds, len(records))
        return records

    # ------------------------------------------------------------------ closing

    def _final_sync(self) -> None:
        """Fsync the active segment once more (matters when per-batch fsync is off)."""
        if self._fd is not None:
            _fsync(self._fd)

    def _release(self) -> None:
        """Close the segment fd, release the directory lock and stop the worker thread."""
        self._closed = True
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._commit_fd is not None:
            os.close(self._commit_fd)
            self._commit_fd = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    async def close(self) -> None:
        """Wait for queued appends, fsync, and release files; idempotent."""
        if self._closed:
            return
        self._closing = True
        if self._flusher is not None:
            await asyncio.wait([self._flusher])
        try:
            if self._executor is not None and self._fd is not None:
                await asyncio.get_running_loop().run_in_executor(self._executor, self._final_sync)
            else:
                self._final_sync()
        except OSError as exc:
            raise _unavailable("final fsync", exc, self._tail.segments[-1].path) from exc
        finally:
            self._release()

    def close_sync(self) -> None:
        """Synchronous :meth:`close` for code without an event loop; idempotent."""
        if self._closed:
            return
        if self._flusher is not None or self._pending:
            raise RuntimeError("close_sync called while async appends are in flight")
        self._closing = True
        try:
            self._final_sync()
        except OSError as exc:
            raise _unavailable("final fsync", exc, self._tail.segments[-1].path) from exc
        finally:
            self._release()

    # ------------------------------------------------------------------ reading

    def replay(
        self, after_seq: int = 0, batch_size: int | None = None
    ) -> Iterator[list[EventRecord]]:
        """Yield durable records with seq > ``after_seq`` in seq order, in lists of batch_size."""
        size = self._config.replay_batch if batch_size is None else batch_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"batch_size must be a positive int, got {size!r}")
        if isinstance(after_seq, bool) or not isinstance(after_seq, int) or after_seq < 0:
            raise ValueError(f"after_seq must be an int >= 0, got {after_seq!r}")
        tail = self._tail
        first = tail.segments[0].first_seq
        if after_seq + 1 < first:
            raise LogCorruptError(
                f"event log {self._dir}: records {after_seq + 1}..{first - 1} were dropped; "
                f"cannot replay after seq {after_seq}",
                {"file": str(tail.segments[0].path), "after_seq": after_seq, "first_seq": first},
            )
        return self._replay(tail, after_seq, size)

    def _replay(self, tail: _Tail, after_seq: int, size: int) -> Iterator[list[EventRecord]]:
        """Generator behind :meth:`replay`, reading a fixed snapshot of the log."""
        if after_seq >= tail.last_seq:
            return
        segments = tail.segments
        starts = [seg.first_seq for seg in segments]
        begin = max(bisect.bisect_right(starts, after_seq + 1) - 1, 0)
        last_index = len(segments) - 1
        decode = self._decoder.decode
        unpack = HEADER.unpack_from
        crc32 = zlib.crc32
        magic_ok = MAGIC
        hsize = HEADER_SIZE
        batch: list[EventRecord] = []
        add = batch.append
        expected = segments[begin].first_seq
        for index in range(begin, len(segments)):
            seg = segments[index]
            if seg.first_seq != expected:
                raise self._corrupt(seg.path, 0, f"starts at seq {seg.first_seq}, not {expected}")
            try:
                buf = _read_file(seg.path, tail.offset if index == last_index else -1)
            except FileNotFoundError as exc:
                raise self._corrupt(seg.path, 0, "segment vanished during replay") from exc
            view = memoryview(buf)
            size_buf = len(buf)
            pos = 0
            while pos < size_buf:
                if size_buf - pos < hsize:
                    raise self._corrupt(seg.path, pos, "partial header")
                magic, length, crc, seq = unpack(buf, pos)
                start = pos + hsize
                end = start + length
                if magic != magic_ok or seq != expected or end > size_buf:
                    raise self._corrupt(seg.path, pos, "bad header")
                expected += 1
                if seq > after_seq:
                    payload = view[start:end]
                    if crc32(payload) != crc:
                        raise self._corrupt(seg.path, pos, "crc mismatch")
                    try:
                        rec = decode(payload)
                    except msgspec.DecodeError as exc:
                        raise self._corrupt(seg.path, pos, f"undecodable payload: {exc}") from exc
                    if rec.seq != seq:
                        raise self._corrupt(seg.path, pos, "payload seq differs from header")
                    add(rec)
                    if len(batch) >= size:
                        yield batch
                        batch = []
                        add = batch.append
                pos = end
            view.release()
        if expected - 1 != tail.last_seq:
            raise self._corrupt(segments[-1].path, tail.offset, "log ends before its last seq")
        if batch:
            yield batch

    def _corrupt(self, path: Path, offset: int, problem: str) -> LogCorruptError:
        """A LogCorruptError naming the file and byte offset."""
        return LogCorruptError(
            f"{path} offset {offset}: {problem}",
            {"file": str(path), "offset": offset, "problem": problem},
        )

    # ------------------------------------------------------------------ retention

    def drop_segments_before(self, seq: int) -> int:
        """Delete whole segments whose records are all <= ``seq``; return how many were deleted."""
        if self._closed or self._closing:
            raise LogUnavailableError(f"event log {self._dir} is closed", {"file": str(self._dir)})
        with self._tail_lock:
            tail = self._tail
            segments = tail.segments
            keep = 0
            # Never the last segment: it is the one being written.
            while keep < len(segments) - 1 and segments[keep + 1].first_seq - 1 <= seq:
                keep += 1
            if keep == 0:
                return 0
            self._tail = _Tail(segments[keep:], tail.offset, tail.last_seq)
        try:
            for seg in segments[:keep]:
                seg.path.unlink(missing_ok=True)
            _fsync_dir(self._dir)
        except OSError as exc:
            raise _unavailable("segment removal", exc, self._dir) from exc
        return keep
