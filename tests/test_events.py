"""Tests of the durable event log: round trips, group commit, torn tails, corruption, failures."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import struct
import tempfile
import threading
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server import events
from server.config import EventLogConfig
from server.errors import InvalidEventError, LogCorruptError, LogUnavailableError
from server.events import EventLog, EventRecord, NewEvent

T = TypeVar("T")
HEADER = struct.Struct("<4sIIQ")  # restated on purpose: the tests pin the on-disk format
DEFAULT = EventLogConfig()
TINY = EventLogConfig(segment_bytes=200)
PROPERTY = settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run one coroutine on a fresh event loop."""
    return asyncio.run(coro)


def event(i: int, kind: str = "like", value: float | None = None) -> NewEvent:
    """A simple valid event numbered ``i``."""
    return NewEvent(
        event_id=f"e{i}", user_id=f"u{i % 7}", item_id=f"i{i % 11}", kind=kind, value=value, ts=i
    )


def expected(items: Sequence[NewEvent], first_seq: int = 1) -> list[EventRecord]:
    """The records the log should hold for ``items`` appended from ``first_seq``."""
    return [
        EventRecord(
            first_seq + n,
            ev.event_id,
            ev.user_id,
            ev.item_id,
            ev.kind,
            None if ev.value is None else float(ev.value),
            float(ev.ts),
        )
        for n, ev in enumerate(items)
    ]


def replay_all(
    log: EventLog, after_seq: int = 0, batch_size: int | None = None
) -> list[EventRecord]:
    """Every replayed record, flattened, checking batch sizes on the way."""
    out: list[EventRecord] = []
    batches = list(log.replay(after_seq, batch_size))
    limit = batch_size or log._config.replay_batch
    for n, batch in enumerate(batches):
        assert 0 < len(batch) <= limit
        if n < len(batches) - 1:
            assert len(batch) == limit
        out.extend(batch)
    return out


def segments(directory: Path) -> list[Path]:
    """Segment files of a log directory in order."""
    return sorted(directory.glob("events-*.log"))


def frames(directory: Path) -> list[tuple[Path, int, int, int]]:
    """(file, start offset, end offset, seq) of every record, read with an independent parser."""
    out: list[tuple[Path, int, int, int]] = []
    for path in segments(directory):
        buf = path.read_bytes()
        pos = 0
        while pos < len(buf):
            magic, length, _, seq = HEADER.unpack_from(buf, pos)
            assert magic == b"SRv1"
            out.append((path, pos, pos + HEADER.size + length, seq))
            pos += HEADER.size + length
    return out


def reopen_records(directory: Path, config: EventLogConfig = DEFAULT) -> list[EventRecord]:
    """Open the log, read everything, close it again."""
    log, _ = EventLog.open(directory, config)
    try:
        return replay_all(log)
    finally:
        log.close_sync()


def fresh_dir(tmp_path: Path) -> Path:
    """A new empty directory per hypothesis example."""
    return Path(tempfile.mkdtemp(dir=tmp_path)) / "log"


# Any text but NUL, which the log refuses in ids (see test_invalid_events_are_refused...).
ids = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=12)
finite = st.floats(allow_nan=False, allow_infinity=False)


@st.composite
def new_events(draw: st.DrawFn) -> NewEvent:
    """Random valid events: any text ids, every kind, optional value (required for ratings)."""
    kind = draw(st.sampled_from(["like", "dislike", "skip", "rating"]))
    value = draw(finite) if kind == "rating" else draw(st.none() | finite)
    return NewEvent(
        event_id=draw(ids),
        user_id=draw(ids),
        item_id=draw(ids),
        kind=kind,
        value=value,
        ts=draw(st.floats(min_value=0, max_value=4e9)),
    )


def split(items: Sequence[T], sizes: Sequence[int]) -> list[list[T]]:
    """Cut ``items`` into consecutive chunks of the given sizes (cycled), none empty."""
    out: list[list[T]] = []
    pos = 0
    n = 0
    while pos < len(items):
        size = sizes[n % len(sizes)]
        out.append(list(items[pos : pos + size]))
        pos += size
        n += 1
    return out


# ---------------------------------------------------------------- round trips


def test_round_trip_async(tmp_path: Path) -> None:
    """Async appends in mixed batch sizes survive close and reopen, gapless from seq 1."""
    directory = tmp_path / "a" / "log"
    items = [event(i, "rating", i / 2) if i % 3 == 0 else event(i) for i in range(50)]

    async def write() -> tuple[list[EventRecord], events.OpenReport]:
        log, report = EventLog.open(directory, DEFAULT)
        try:
            out: list[EventRecord] = []
            for chunk in split(items, [1, 7, 13]):
                out.extend(await log.append(chunk))
            assert await log.append([]) == []
            assert log.last_seq == 50
            return out, report
        finally:
            await log.close()

    written, first_report = run(write())
    assert first_report == events.OpenReport(
        records=0, first_seq=1, last_seq=0, segments=1, truncated_bytes=0, problem=None
    )
    assert written == expected(items)
    log, report = EventLog.open(directory, DEFAULT)
    try:
        assert (report.records, report.last_seq, report.problem) == (50, 50, None)
        assert log.last_seq == 50
        assert replay_all(log) == written
        assert replay_all(log, batch_size=8) == written
        assert replay_all(log, after_seq=49) == written[49:]
        assert replay_all(log, after_seq=50) == []
    finally:
        log.close_sync()


def test_empty_log_replays_nothing(tmp_path: Path) -> None:
    """A new log creates its directory and first segment and replays nothing."""
    log, report = EventLog.open(tmp_path / "empty", DEFAULT)
    try:
        assert report.records == 0
        assert log.last_seq == 0
        assert list(log.replay()) == []
    finally:
        log.close_sync()
    assert [p.name for p in segments(tmp_path / "empty")] == ["events-00000000000000000001.log"]


@PROPERTY
@given(
    items=st.lists(new_events(), max_size=40),
    write_sizes=st.lists(st.integers(1, 10), min_size=1, max_size=5),
    read_size=st.integers(1, 12),
    tiny=st.booleans(),
)
def test_property_round_trip(
    tmp_path: Path, items: list[NewEvent], write_sizes: list[int], read_size: int, tiny: bool
) -> None:
    """Any events appended in any batch sizes replay identically in any batch size."""
    directory = fresh_dir(tmp_path)
    config = TINY if tiny else DEFAULT

    async def write() -> list[EventRecord]:
        log, _ = EventLog.open(directory, config)
        try:
            out: list[EventRecord] = []
            for chunk in split(items, write_sizes):
                out.extend(await log.append(chunk))
            return out
        finally:
            await log.close()

    written = run(write())
    assert written == expected(items)
    log, report = EventLog.open(directory, config)
    try:
        assert report.problem is None
        assert report.records == len(items)
        assert replay_all(log, batch_size=read_size) == written
    finally:
        log.close_sync()


# ---------------------------------------------------------------- group commit


def test_group_commit_shares_fsyncs(tmp_path: Path) -> None:
    """Concurrent appends share fsyncs and still all become durable with distinct seqs."""
    calls = 200

    async def go() -> list[list[EventRecord]]:
        log, _ = EventLog.open(tmp_path / "log", DEFAULT)
        try:
            results = await asyncio.gather(*(log.append([event(i)]) for i in range(calls)))
            assert log.fsync_count < calls
            assert log.fsync_count == log.commits
            assert log.records_written == calls
            assert log.last_fsync_seconds >= 0.0
            return results
        finally:
            await log.close()

    results = run(go())
    seqs = [batch[0].seq for batch in results]
    assert sorted(seqs) == list(range(1, calls + 1))
    # Queue order is seq order: gather starts the calls in order.
    assert seqs == list(range(1, calls + 1))
    durable = reopen_records(tmp_path / "log")
    assert [r.seq for r in durable] == list(range(1, calls + 1))
    assert {r.event_id for r in durable} == {f"e{i}" for i in range(calls)}


def test_appends_during_fsync_wait_for_the_next_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Appends made while an fsync is in flight are committed together by the next one."""
    entered = threading.Event()
    gate = threading.Event()
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        entered.set()
        gate.wait(10)
        real_fsync(fd)

    async def go() -> None:
        log, _ = EventLog.open(tmp_path / "log", DEFAULT)
        seen: list[tuple[float, int]] = []
        log.on_commit = lambda seconds, records: seen.append((seconds, records))
        monkeypatch.setattr(events, "_fsync", slow_fsync)
        try:
            first = asyncio.ensure_future(log.append([event(0)]))
            assert await asyncio.to_thread(entered.wait, 10)
            rest = [asyncio.ensure_future(log.append([event(i)])) for i in range(1, 51)]
            await asyncio.sleep(0)
            assert not first.done()
            gate.set()
            results = await asyncio.gather(first, *rest)
            assert [r[0].seq for r in results] == list(range(1, 52))
            assert log.fsync_count == 2
            assert [records for _, records in seen] == [1, 50]
        finally:
            gate.set()
            await log.close()

    run(go())
    assert len(reopen_records(tmp_path / "log")) == 51


def test_append_sync_and_hook(tmp_path: Path) -> None:
    """The loop-less append path numbers, counts and calls the metrics hook."""
    log, _ = EventLog.open(tmp_path / "log", DEFAULT)
    seen: list[int] = []
    log.on_commit = lambda _seconds, records: seen.append(records)
    try:
        assert [r.seq for r in log.append_sync([event(0), event(1)])] == [1, 2]
        assert [r.seq for r in log.append_sync([event(2)])] == [3]
        assert log.append_sync([]) == []
        assert seen == [2, 1]
        assert log.fsync_count == 2
    finally:
        log.close_sync()
    log.close_sync()  # idempotent
    assert reopen_records(tmp_path / "log") == expected([event(0), event(1), event(2)])


# ---------------------------------------------------------------- torn tails


@PROPERTY
@given(
    items=st.lists(new_events(), min_size=1, max_size=25),
    tiny=st.booleans(),
    mode=st.sampled_from(["truncate", "garbage", "flip"]),
    data=st.data(),
)
def test_property_torn_tail(
    tmp_path: Path, items: list[NewEvent], tiny: bool, mode: str, data: st.DataObject
) -> None:
    """A torn, garbage-tailed or bit-flipped tail is cut off; prefix and new appends survive."""
    directory = fresh_dir(tmp_path)
    config = TINY if tiny else DEFAULT
    log, _ = EventLog.open(directory, config)
    for chunk in split(items, [data.draw(st.integers(1, 5), label="write size")]):
        log.append_sync(chunk)
    log.close_sync()

    layout = frames(directory)
    last = segments(directory)[-1]
    in_last = [f for f in layout if f[0] == last]
    size = last.stat().st_size
    if mode == "truncate":
        k = data.draw(st.integers(1, min(4, len(in_last))), label="k")
        cut = data.draw(st.integers(in_last[-k][1], size - 1), label="cut")
        with open(last, "r+b") as fh:
            fh.truncate(cut)
        lost = sum(1 for f in in_last if f[2] > cut)
        torn = cut not in {f[1] for f in in_last}
        removed = cut - max([f[2] for f in in_last if f[2] <= cut], default=0)
    elif mode == "garbage":
        garbage = data.draw(st.binary(min_size=1, max_size=64), label="garbage")
        with open(last, "ab") as fh:
            fh.write(garbage)
        lost, torn, removed = 0, True, len(garbage)
    else:
        _, start, end, _ = in_last[-1]
        where = data.draw(st.integers(start + HEADER.size, end - 1), label="byte")
        mask = data.draw(st.integers(1, 255), label="mask")
        buf = bytearray(last.read_bytes())
        buf[where] ^= mask
        last.write_bytes(bytes(buf))
        lost, torn, removed = 1, True, end - start

    intact = expected(items)[: len(items) - lost]
    log, report = EventLog.open(directory, config)
    try:
        assert (report.problem is not None) == torn
        assert report.truncated_bytes == removed
        assert report.last_seq == len(intact) == log.last_seq
        assert replay_all(log, batch_size=3) == intact
        more = [event(1000 + i) for i in range(3)]
        assert log.append_sync(more) == expected(more, len(intact) + 1)
    finally:
        log.close_sync()
    log, report = EventLog.open(directory, config)
    try:
        assert report.problem is None
        assert replay_all(log) == intact + expected(more, len(intact) + 1)
    finally:
        log.close_sync()


def test_torn_tail_is_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Cutting a torn tail logs a warning on the signedrec.events logger."""
    directory = tmp_path / "log"
    log, _ = EventLog.open(directory, DEFAULT)
    log.append_sync([event(i) for i in range(3)])
    log.close_sync()
    last = segments(directory)[-1]
    with open(last, "r+b") as fh:
        fh.truncate(last.stat().st_size - 2)
    with caplog.at_level(logging.WARNING, logger="signedrec.events"):
        log, report = EventLog.open(directory, DEFAULT)
    log.close_sync()
    assert report.last_seq == 2
    assert report.problem is not None
    assert "partial payload" in report.problem
    assert any("torn tail" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------- corruption before the tail


@PROPERTY
@given(
    count=st.integers(2, 20),
    tiny=st.booleans(),
    data=st.data(),
)
def test_property_corruption_before_tail_raises(
    tmp_path: Path, count: int, tiny: bool, data: st.DataObject
) -> None:
    """A damaged record followed by good ones refuses to open, naming file and offset."""
    directory = fresh_dir(tmp_path)
    config = TINY if tiny else DEFAULT
    log, _ = EventLog.open(directory, config)
    for i in range(count):
        log.append_sync([event(i)])
    log.close_sync()
    layout = frames(directory)
    path, start, end, _ = layout[data.draw(st.integers(0, len(layout) - 2), label="record")]
    where = data.draw(st.integers(start, end - 1), label="byte")
    buf = bytearray(path.read_bytes())
    buf[where] ^= data.draw(st.integers(1, 255), label="mask")
    path.write_bytes(bytes(buf))
    with pytest.raises(LogCorruptError) as info:
        EventLog.open(directory, config)
    assert path.name in str(info.value)
    assert info.value.detail["file"] == str(path)
    assert info.value.detail["offset"] == start
    # The refusal must not have modified anything, and must release the lock.
    assert path.read_bytes() == bytes(buf)


def test_torn_end_of_non_last_segment_raises(tmp_path: Path) -> None:
    """A short non-last segment is corruption, not a tail to cut."""
    directory = tmp_path / "log"
    log, _ = EventLog.open(directory, TINY)
    for i in range(12):
        log.append_sync([event(i)])
    log.close_sync()
    first = segments(directory)[0]
    assert len(segments(directory)) > 1
    with open(first, "r+b") as fh:
        fh.truncate(first.stat().st_size - 1)
    with pytest.raises(LogCorruptError, match=first.name):
        EventLog.open(directory, TINY)


def test_missing_middle_segment_raises(tmp_path: Path) -> None:
    """A seq gap between segments refuses to open."""
    directory = tmp_path / "log"
    log, _ = EventLog.open(directory, TINY)
    for i in range(12):
        log.append_sync([event(i)])
    log.close_sync()
    files = segments(directory)
    assert len(files) >= 3
    files[1].unlink()
    with pytest.raises(LogCorruptError, match=files[2].name):
        EventLog.open(directory, TINY)


# ---------------------------------------------------------------- segments


def test_rotation_replay_and_drop(tmp_path: Path) -> None:
    """Tiny segments rotate, replay across and after any seq, and old ones can be dropped."""
    directory = tmp_path / "log"
    items = [event(i) for i in range(40)]

    async def write() -> None:
        log, _ = EventLog.open(directory, TINY)
        try:
            for chunk in split(items, [1, 2, 3]):
                await log.append(chunk)
        finally:
            await log.close()

    run(write())
    files = segments(directory)
    assert len(files) > 3
    layout = frames(directory)
    for path in files:
        mine = [f for f in layout if f[0] == path]
        # Each segment is named after its first seq and only exceeds the bound by one batch.
        assert path.name == f"events-{mine[0][3]:020d}.log"
        assert path.stat().st_size <= TINY.segment_bytes or len(mine) <= 3
    want = expected(items)
    log, report = EventLog.open(directory, TINY)
    try:
        assert report.segments == len(files)
        assert replay_all(log, batch_size=7) == want
        for after in range(41):
            assert replay_all(log, after_seq=after, batch_size=5) == want[after:]
        dropped = log.drop_segments_before(20)
        assert dropped > 0
        kept = segments(directory)
        assert len(kept) == len(files) - dropped
        assert log.first_seq <= 21
        assert replay_all(log, after_seq=20) == want[20:]
        assert replay_all(log, after_seq=log.first_seq - 1) == want[log.first_seq - 1 :]
        with pytest.raises(LogCorruptError, match="dropped"):
            list(log.replay(after_seq=0))
        assert log.drop_segments_before(0) == 0
        # The active segment is never dropped, whatever the bound.
        log.drop_segments_before(10**9)
        assert len(segments(directory)) == 1
        assert replay_all(log, after_seq=log.first_seq - 1) == want[log.first_seq - 1 :]
        first_kept = log.first_seq
    finally:
        log.close_sync()
    log, report = EventLog.open(directory, TINY)
    try:
        assert report.first_seq == first_kept
        assert report.last_seq == 40
        assert log.append_sync([event(99)])[0].seq == 41
    finally:
        log.close_sync()


def test_drop_keeps_segments_with_newer_records(tmp_path: Path) -> None:
    """Only segments whose every record is at or below the bound are dropped."""
    directory = tmp_path / "log"
    log, _ = EventLog.open(directory, TINY)
    try:
        for i in range(12):
            log.append_sync([event(i)])
        starts = [int(p.name[7:27]) for p in segments(directory)]
        assert len(starts) >= 3
        # A bound one short of the end of the first segment keeps it.
        assert log.drop_segments_before(starts[1] - 2) == 0
        assert log.drop_segments_before(starts[1] - 1) == 1
        assert log.first_seq == starts[1]
    finally:
        log.close_sync()


# ---------------------------------------------------------------- disk failures


def enospc(_fd: int) -> None:
    """An fsync that always fails with ENOSPC."""
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def dir_enospc(_directory: Path) -> None:
    """A directory fsync that always fails with ENOSPC (a segment's creation)."""
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_failed_fsync_leaves_no_record_and_recovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC on fsync fails the append, leaves no record and later appends continue."""
    directory = tmp_path / "log"
    before = [event(i) for i in range(5)]

    async def go() -> None:
        log, _ = EventLog.open(directory, DEFAULT)
        try:
            await log.append(before)
            good_size = segments(directory)[-1].stat().st_size
            monkeypatch.setattr(events, "_fsync", enospc)
            with pytest.raises(LogUnavailableError, match="ENOSPC") as info:
                await log.append([event(100), event(101)])
            assert info.value.detail["errno"] == "ENOSPC"
            assert segments(directory)[-1].stat().st_size == good_size
            assert [f[3] for f in frames(directory)] == [1, 2, 3, 4, 5]
            assert log.last_seq == 5
            with pytest.raises(LogUnavailableError, match="ENOSPC"):
                await log.append([event(102)])
            assert segments(directory)[-1].stat().st_size == good_size
            monkeypatch.undo()
            assert [r.seq for r in await log.append([event(6), event(7)])] == [6, 7]
        finally:
            await log.close()

    run(go())
    assert reopen_records(directory) == expected([*before, event(6), event(7)])


def test_failed_partial_write_is_cut_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A short write followed by an error is cut back to the last durable byte."""
    directory = tmp_path / "log"
    writes: list[int] = []

    def short_then_full(fd: int, data: Any) -> int:
        writes.append(len(data))
        if len(writes) == 1:
            return os.write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    log, _ = EventLog.open(directory, DEFAULT)
    try:
        log.append_sync([event(0)])
        good_size = segments(directory)[-1].stat().st_size
        monkeypatch.setattr(events, "_write", short_then_full)
        with pytest.raises(LogUnavailableError, match="EIO"):
            log.append_sync([event(i) for i in range(1, 20)])
        assert len(writes) == 2
        assert segments(directory)[-1].stat().st_size == good_size
        monkeypatch.undo()
        assert log.append_sync([event(1)])[0].seq == 2
    finally:
        log.close_sync()
    assert reopen_records(directory) == expected([event(0), event(1)])


def test_failed_commit_fails_every_waiting_caller(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed commit fails every caller queued behind it and rolls seqs back."""
    entered = threading.Event()
    gate = threading.Event()

    calls: list[int] = []
    real_fsync = os.fsync

    def gated_enospc(fd: int) -> None:
        calls.append(fd)
        if len(calls) > 1:  # only the in-flight commit fails; the queued one would succeed
            real_fsync(fd)
            return
        entered.set()
        gate.wait(10)
        enospc(fd)

    async def go() -> None:
        log, _ = EventLog.open(tmp_path / "log", DEFAULT)
        try:
            await log.append([event(0)])
            monkeypatch.setattr(events, "_fsync", gated_enospc)
            first = asyncio.ensure_future(log.append([event(1)]))
            assert await asyncio.to_thread(entered.wait, 10)
            rest = [asyncio.ensure_future(log.append([event(i)])) for i in range(2, 12)]
            await asyncio.sleep(0)
            gate.set()
            results = await asyncio.gather(first, *rest, return_exceptions=True)
            # Callers queued behind the failed batch fail too: their seqs came after it.
            assert all(isinstance(r, LogUnavailableError) for r in results)
            assert log.last_seq == 1
            assert [r.seq for r in await log.append([event(20), event(21)])] == [2, 3]
        finally:
            gate.set()
            await log.close()

    run(go())
    assert reopen_records(tmp_path / "log") == expected([event(0), event(20), event(21)])


def test_failed_rotation_retries_same_segment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed segment creation leaves an empty segment that reopen and appends accept."""
    directory = tmp_path / "log"

    log, _ = EventLog.open(directory, TINY)
    try:
        log.append_sync([event(0)])
        monkeypatch.setattr(events, "_fsync_dir", dir_enospc)

        # Append until one needs a new segment, whose creation then fails.
        def fill() -> None:
            for i in range(1, 20):
                log.append_sync([event(i)])

        with pytest.raises(LogUnavailableError, match="ENOSPC"):
            fill()
        last = log.last_seq
        stray = directory / f"events-{last + 1:020d}.log"
        assert stray.exists()
        assert stray.stat().st_size == 0
    finally:
        log.close_sync()
    monkeypatch.undo()
    # The empty segment left behind is a valid (empty) last segment; appends go on into it.
    log, report = EventLog.open(directory, TINY)
    try:
        assert (report.last_seq, report.problem) == (last, None)
        assert log.append_sync([event(100)])[0].seq == last + 1
        assert stray.stat().st_size > 0
    finally:
        log.close_sync()
    assert [r.seq for r in reopen_records(directory, TINY)] == list(range(1, last + 2))


def test_a_failed_rotation_is_retried_by_the_next_batch_even_a_small_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A big batch's rotation fails; the next, smaller batch would fit the old segment but must
    go to the new one, or the leftover file would overlap it and the log would not reopen."""
    directory = tmp_path / "log"

    log, _ = EventLog.open(directory, TINY)
    try:
        log.append_sync([event(0)])
        monkeypatch.setattr(events, "_fsync_dir", dir_enospc)
        with pytest.raises(LogUnavailableError, match="ENOSPC"):
            log.append_sync([event(i) for i in range(1, 8)])  # does not fit: rotates
        monkeypatch.undo()
        assert log.append_sync([event(9)])[0].seq == 2  # would fit the first segment
    finally:
        log.close_sync()
    assert [p.name for p in segments(directory)] == [events.segment_name(1), events.segment_name(2)]
    assert reopen_records(directory, TINY) == expected([event(0), event(9)])
    report, batches = events.read_records(directory)
    assert (report.last_seq, [r.seq for b in batches for r in b]) == (2, [1, 2])


def test_an_empty_leftover_overlapping_the_last_segment_is_removed_on_open(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A log left by a writer that did not retry a failed rotation: an empty segment named
    for a seq the previous segment went on to hold. It holds nothing, so it goes, with a
    warning; a lock-free reader skips it meanwhile."""
    directory = tmp_path / "log"
    written = [event(i) for i in range(3)]
    log, _ = EventLog.open(directory, DEFAULT)
    log.append_sync(written)
    log.close_sync()
    leftover = directory / events.segment_name(2)
    leftover.touch()
    _, batches = events.read_records(directory)
    assert [r.seq for b in batches for r in b] == [1, 2, 3]
    with caplog.at_level(logging.WARNING, logger="signedrec.events"):
        assert reopen_records(directory) == expected(written)
    assert not leftover.exists()
    assert "leftover of a failed rotation" in caplog.text


def test_a_reader_never_sees_a_batch_whose_fsync_then_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``read_records`` (train --events reads a live log) waits out a commit in flight: records
    written but cut back after a failed fsync, their seqs reused, are never read."""
    directory = tmp_path / "log"
    entered, gate = threading.Event(), threading.Event()

    def gated_enospc(_fd: int) -> None:
        entered.set()
        gate.wait(10)
        enospc(_fd)

    log, _ = EventLog.open(directory, DEFAULT)
    seen: list[list[EventRecord]] = []
    try:
        log.append_sync([event(0)])
        monkeypatch.setattr(events, "_fsync", gated_enospc)
        failed: list[BaseException] = []

        def write() -> None:
            try:
                log.append_sync([event(1), event(2)])
            except LogUnavailableError as exc:
                failed.append(exc)

        writer = threading.Thread(target=write)
        writer.start()
        assert entered.wait(10)  # the batch is written, its fsync pending
        reader = threading.Thread(
            target=lambda: seen.append([r for b in events.read_records(directory)[1] for r in b])
        )
        reader.start()
        reader.join(0.3)
        assert reader.is_alive()  # waits for the commit to end
        gate.set()
        writer.join(10)
        reader.join(10)
        monkeypatch.undo()
        assert log.append_sync([event(7)])[0].seq == 2  # the failed batch's seq, reused
    finally:
        gate.set()
        log.close_sync()
    assert seen == [expected([event(0)])]
    assert len(failed) == 1


# ---------------------------------------------------------------- misuse


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"event_id": ""}, "event_id"),
        ({"user_id": "x" * 513}, "user_id"),
        ({"kind": "rating", "value": None}, "value"),
        ({"value": float("nan")}, "value"),
        ({"ts": float("inf")}, "ts"),
        ({"ts": -1.0}, "ts"),
        ({"kind": "love"}, "kind"),
        ({"item_id": "bad\udc80"}, "item_id"),
        ({"user_id": "a\x00"}, "user_id"),
        ({"event_id": "e\x00x"}, "event_id"),
    ],
)
def test_invalid_events_are_refused_without_using_seqs(
    tmp_path: Path, changes: dict[str, Any], field: str
) -> None:
    """Semantically invalid events raise InvalidEventError and consume no seq."""
    fields: dict[str, Any] = {
        "event_id": "e",
        "user_id": "u",
        "item_id": "i",
        "kind": "like",
        "value": None,
        "ts": 1.0,
    }
    fields.update(changes)
    bad = NewEvent(**fields)
    log, _ = EventLog.open(tmp_path / "log", DEFAULT)
    try:
        with pytest.raises(InvalidEventError) as info:
            log.append_sync([event(0), bad])
        assert info.value.detail["index"] == 1
        if field != "item_id":
            assert info.value.detail["field"] == field
        assert log.append_sync([event(1)])[0].seq == 1
    finally:
        log.close_sync()


def test_second_open_is_refused_and_closed_log_refuses(tmp_path: Path) -> None:
    """The directory lock refuses a second open; a closed log refuses appends."""
    directory = tmp_path / "log"
    log, _ = EventLog.open(directory, DEFAULT)
    try:
        with pytest.raises(LogUnavailableError, match="already open"):
            EventLog.open(directory, DEFAULT)
    finally:
        run(log.close())
    run(log.close())  # idempotent
    assert log.closed
    with pytest.raises(LogUnavailableError, match="closed"):
        log.append_sync([event(0)])
    with pytest.raises(LogUnavailableError, match="closed"):
        run(log.append([event(0)]))
    with pytest.raises(ValueError, match="batch_size"):
        log.replay(batch_size=0)
    log2, _ = EventLog.open(directory, DEFAULT)
    log2.close_sync()


def test_fsync_off_counts_no_fsyncs(tmp_path: Path) -> None:
    """With fsync off appends still land but no fsync is counted."""
    config = EventLogConfig(fsync=False)
    log, _ = EventLog.open(tmp_path / "log", config)
    try:
        run(log.append([event(0)]))
        assert log.fsync_count == 0
        assert log.records_written == 1
    finally:
        log.close_sync()
    assert len(reopen_records(tmp_path / "log", config)) == 1
