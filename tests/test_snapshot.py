"""The snapshot file: framed chunks round-trip exactly, and any damage makes it ignored."""

from __future__ import annotations

import errno
import tempfile
from pathlib import Path

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server import snapshot

VERSION, GRAPH, ITEMS = "v1", "g" * 64, "i" * 64
text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)  # UTF-8 encodable

history_rows = st.tuples(
    st.integers(0, 2**40), text, st.integers(0, 1000),
    st.sampled_from(["like", "dislike", "skip", "rating"]),
    st.none() | st.floats(1, 5), st.floats(0, 2e9),
)  # fmt: skip
user_feedback = st.builds(
    lambda user, items, history: snapshot.UserSnapshot(
        user=user, items=items, strengths=[float(i % 3 - 1) for i in items],
        negatives=items[::2], history=history,
    ),
    st.integers(0, 10_000), st.lists(st.integers(0, 1000), max_size=6, unique=True),
    st.lists(history_rows, max_size=4),
)  # fmt: skip


def _snapshot(n_users: int, dim: int, feedback: list[snapshot.UserSnapshot], ids: list[str],
              size: int) -> snapshot.Snapshot:  # fmt: skip
    chunks = snapshot.FeedbackChunks(size)
    for user in feedback:
        chunks.add(user)
    vectors = np.arange(n_users * dim, dtype=np.float32).reshape(n_users, dim) / 7
    return snapshot.Snapshot(VERSION, 42, [f"u{i}" for i in range(n_users)], vectors,
                             chunks.finish(), ids, GRAPH, ITEMS)  # fmt: skip


@settings(max_examples=60, deadline=None)
@given(
    n_users=st.integers(0, 20),
    dim=st.integers(1, 8),
    feedback=st.lists(user_feedback, max_size=40),
    ids=st.lists(text, max_size=70),
    size=st.integers(1, 17),  # chunks of 1..17 entries, across the msgpack array header sizes
)
def test_a_written_snapshot_reads_back_exactly(
    n_users: int, dim: int, feedback: list[snapshot.UserSnapshot], ids: list[str], size: int
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        snapshot.write(Path(tmp), _snapshot(n_users, dim, feedback, ids, size), chunk=size)
        back = snapshot.read(Path(tmp), VERSION, GRAPH, ITEMS)
    assert back is not None
    assert back.seq == 42
    assert back.users == [f"u{i}" for i in range(n_users)]
    assert back.vectors.shape == (n_users, dim)
    np.testing.assert_array_equal(back.vectors, _snapshot(n_users, dim, [], [], 1).vectors)
    assert list(back.user_feedback()) == feedback
    assert back.event_ids == ids


def test_a_large_chunk_uses_the_array_32_header() -> None:
    """70,000 users in one chunk: more than an array 16 header can count."""
    users = [snapshot.UserSnapshot(user=i, items=[], strengths=[], negatives=[], history=[])
             for i in range(70_000)]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        snapshot.write(Path(tmp), _snapshot(2, 3, users, ["a"], 70_000), 70_000)
        back = snapshot.read(Path(tmp), VERSION, GRAPH, ITEMS)
    assert back is not None
    assert [u.user for u in back.user_feedback()] == list(range(70_000))


@settings(max_examples=40, deadline=None)
@given(position=st.floats(0, 1, exclude_max=True), flip=st.integers(1, 255))
def test_any_damaged_byte_makes_the_snapshot_ignored(position: float, flip: int) -> None:
    """A flipped byte anywhere (header, frame lengths, payload, trailer) is caught, never
    restored as a different state; a truncated file likewise."""
    row = (1, "e1", 1, "like", None, 0.0)
    feedback = [snapshot.UserSnapshot(user=3, items=[1, 2], strengths=[1.0, -1.0],
                                      negatives=[2], history=[row])]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        path = snapshot.write(Path(tmp), _snapshot(3, 4, feedback, ["e1", "e2"], 1), 1)
        data = bytearray(path.read_bytes())
        data[int(position * len(data))] ^= flip
        path.write_bytes(bytes(data))
        assert snapshot.read(Path(tmp), VERSION, GRAPH, ITEMS) is None
        path.write_bytes(bytes(data[: int(position * len(data))]))
        assert snapshot.read(Path(tmp), VERSION, GRAPH, ITEMS) is None


def test_another_graph_or_catalogue_is_not_restored(tmp_path: Path) -> None:
    """Another version of the same graph and item catalogue may restore it (refolding the
    vectors); another graph never; another catalogue only under the version it was taken under."""
    snapshot.write(tmp_path, _snapshot(2, 2, [], [], 1), 1)
    assert snapshot.read(tmp_path, VERSION, GRAPH, ITEMS) is not None
    assert snapshot.read(tmp_path, "v2", GRAPH, ITEMS) is not None
    assert snapshot.read(tmp_path, "v2", GRAPH, "j" * 64) is None
    assert snapshot.read(tmp_path, VERSION, "h" * 64, ITEMS) is None
    assert snapshot.read(tmp_path, "v2", "h" * 64, ITEMS) is None


def test_a_file_written_before_the_catalogue_field_serves_its_own_version_only(
    tmp_path: Path,
) -> None:
    # An older head is a 7-element array: it decodes with no catalogue.
    seven = msgspec.msgpack.encode([VERSION, 42, ["u0"], 2, GRAPH, 0, 0])
    assert snapshot._HEAD.decode(seven).items == ""
    old = _snapshot(2, 2, [], [], 1)
    old.items = ""
    snapshot.write(tmp_path, old, 1)
    assert snapshot.read(tmp_path, VERSION, GRAPH, ITEMS) is not None
    assert snapshot.read(tmp_path, "v2", GRAPH, ITEMS) is None


def test_a_failed_write_leaves_the_old_snapshot_and_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A snapshot that cannot be written (disk full) must not leave its partial copy taking the
    space the event log needs; the previous snapshot stays as it was."""
    snapshot.write(tmp_path, _snapshot(3, 2, [], ["a"], 4), chunk=4)
    before = (tmp_path / snapshot.FILE).read_bytes()

    def full(_fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("server.durable.os.fsync", full)
    with pytest.raises(OSError, match="No space"):
        snapshot.write(tmp_path, _snapshot(5, 2, [], ["a", "b"], 4), chunk=4)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == [snapshot.FILE]
    assert (tmp_path / snapshot.FILE).read_bytes() == before


def test_reading_removes_a_temporary_file_a_crash_left(tmp_path: Path) -> None:
    snapshot.write(tmp_path, _snapshot(3, 2, [], ["a"], 4), chunk=4)
    stale = tmp_path / (snapshot.FILE + ".tmp")
    stale.write_bytes(b"half a snapshot")
    back = snapshot.read(tmp_path, VERSION, GRAPH, ITEMS)
    assert back is not None
    assert back.event_ids == ["a"]
    assert not stale.exists()
