"""Training on a server's event log: the weighted graph merge, the lock-free log reader, and the
round trip live state -> ``train --events`` -> a restart that replays nothing and serves the same
users exactly."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.artifacts import MANIFEST, SCHEMA_VERSION, load_artifact, npy_sha256
from server.cli import main
from server.config import EventWeights, Hyper, load_config
from server.data import IdMap, Interactions
from server.errors import ArtifactError, DataError, LogCorruptError, LogUnavailableError
from server.events import (
    CATALOGUE_FILE,
    EventLog,
    NewEvent,
    claim_catalogue,
    read_records,
    segment_name,
)
from server.feedback import read_feedback
from server.graph import build_graph, with_feedback
from server.state import ItemSide, LiveState
from tests.conftest import N_ITEMS, N_USERS, THRESHOLD, TinyDataset, known_training_warnings_ignored

# -- the graph merge --------------------------------------------------------------------------

pairs = st.tuples(st.integers(0, 5), st.integers(0, 6))
strengths = st.sampled_from([1.0, -1.0, -0.25, 0.5, 0.0, 2.0])


@settings(max_examples=200, deadline=None)
@given(
    rows=st.lists(st.tuples(pairs, st.sampled_from([1.0, 5.0])), max_size=25),
    events=st.lists(
        st.tuples(st.tuples(st.integers(0, 8), st.integers(0, 6)), strengths), max_size=30
    ),
)
def test_with_feedback_is_the_latest_strength_per_pair(
    rows: list[tuple[tuple[int, int], float]], events: list[tuple[tuple[int, int], float]]
) -> None:
    """The merged graph holds, per pair, the last strength given to it (0 removes the pair):
    what the live state's dict holds after the same rows and events."""
    n_users, n_items = 6, 7
    interactions = Interactions(
        np.asarray([u for (u, _), _ in rows], np.int32),
        np.asarray([i for (_, i), _ in rows], np.int32),
        np.asarray([r for _, r in rows], np.float32),
    )
    graph = build_graph(interactions, 4.0, n_users, n_items)
    merged = with_feedback(
        graph,
        np.asarray([u for (u, _), _ in events], np.int64),
        np.asarray([i for (_, i), _ in events], np.int64),
        np.asarray([s for _, s in events], np.float32),
        9,
    )
    expected: dict[tuple[int, int], float] = {}
    for pair, rating in rows:
        expected[pair] = 1.0 if rating >= 4.0 else -1.0
    for pair, strength in events:
        expected[pair] = strength
    expected = {pair: s for pair, s in expected.items() if s != 0}
    users, items, signed = merged.edges()
    assert merged.n_users == 9
    assert dict(zip(zip(users.tolist(), items.tolist(), strict=True), signed.tolist(),
                    strict=True)) == expected  # fmt: skip
    assert np.all(merged.pos_weights > 0)
    assert np.all(merged.neg_weights > 0)
    # Each user's dislikes end with the most recent, as the live state's recent_negative does
    # (a dislike moves an item to the end, any other strength takes it out).
    recent: dict[int, dict[int, None]] = {}
    for u in range(graph.n_users):
        row = graph.neg_items[graph.neg_indptr[u] : graph.neg_indptr[u + 1]]
        recent[u] = dict.fromkeys(row.tolist())
    for (u, i), strength in events:
        recent.setdefault(u, {}).pop(i, None)
        if strength < 0:
            recent[u][i] = None
    for u in range(merged.n_users):
        row = merged.neg_items[merged.neg_indptr[u] : merged.neg_indptr[u + 1]]
        assert row.tolist() == list(recent.get(u, {}))


# -- reading a log without its lock ------------------------------------------------------------


def _event(n: int, user: str = "0", item: str = "3", kind: str = "like") -> NewEvent:
    value = 5.0 if kind == "rating" else None
    return NewEvent(event_id=f"e{n}", user_id=user, item_id=item, kind=kind, ts=float(n),
                    value=value)  # type: ignore[arg-type]  # fmt: skip


def test_a_log_is_read_while_its_server_holds_it(tmp_path: Path) -> None:
    """Every complete record comes back in order while the log is open for writing; a record
    being written (a partial one at the end) is left out and reported, not an error."""
    config = load_config(env={"SIGNEDREC_LOG__SEGMENT_BYTES": "300"}).log  # several segments
    log, _ = EventLog.open(tmp_path / "events", config)
    for n in range(1, 21):  # one commit each: a segment rolls over between commits
        log.append_sync([_event(n)])
    report, batches = read_records(tmp_path / "events", batch_size=7)
    records = [r for batch in batches for r in batch]
    assert [r.seq for r in records] == list(range(1, 21))
    assert [r.event_id for r in records] == [f"e{n}" for n in range(1, 21)]
    assert report.segments > 1
    assert report.unread_tail is None
    assert report.last_seq == 20
    last = sorted((tmp_path / "events").glob("events-*.log"))[-1]
    with last.open("ab") as handle:  # half of a record, as if its write were in flight
        handle.write(b"SRv1\x10\x00")
    report, batches = read_records(tmp_path / "events")
    assert sum(len(b) for b in batches) == 20
    assert report.last_seq == 20
    assert "partial header" in (report.unread_tail or "")
    log.close_sync()


def test_damage_before_the_end_of_a_log_is_refused(tmp_path: Path) -> None:
    config = load_config(env={"SIGNEDREC_LOG__SEGMENT_BYTES": "300"}).log
    log, _ = EventLog.open(tmp_path / "events", config)
    for n in range(1, 21):
        log.append_sync([_event(n)])
    log.close_sync()
    first = tmp_path / "events" / segment_name(1)
    data = bytearray(first.read_bytes())
    data[30] ^= 0xFF
    first.write_bytes(bytes(data))
    with pytest.raises(LogCorruptError, match="the log is damaged") as caught:
        read_records(tmp_path / "events")
    assert caught.value.detail["file"] == str(first)


def test_read_feedback_maps_kinds_and_creates_users(tmp_path: Path) -> None:
    log, _ = EventLog.open(tmp_path / "events", load_config(env={}).log)
    log.append_sync([_event(1, "0", "3", "like"), _event(2, "new", "4", "skip"),
                     _event(3, "1", "5", "rating"), _event(4, "new", "4", "dislike")])  # fmt: skip
    log.close_sync()
    weights = EventWeights(skip=-0.3)
    users = IdMap.dense(2)
    feedback = read_feedback(tmp_path, users, IdMap.dense(8), weights, 4.0, io.StringIO())
    assert feedback.users.tolist() == [0, 2, 1, 2]
    assert feedback.items.tolist() == [3, 4, 5, 4]
    assert feedback.strengths.tolist() == pytest.approx([1.0, -0.3, 1.0, -1.0])
    assert feedback.new_users == ["new"]
    assert feedback.n_users == 3
    assert feedback.watermark == 4
    assert feedback.last_event_id == "e4"


def test_an_item_outside_the_catalogue_names_the_event(tmp_path: Path) -> None:
    log, _ = EventLog.open(tmp_path / "events", load_config(env={}).log)
    log.append_sync([_event(1, "0", "3"), _event(2, "0", "99")])
    log.close_sync()
    with pytest.raises(DataError, match="event seq 2 names item '99'"):
        read_feedback(tmp_path, IdMap.dense(2), IdMap.dense(8), EventWeights(), 4.0)


def test_a_log_of_another_catalogue_is_refused_before_it_is_read(tmp_path: Path) -> None:
    """The same dense ids in another catalogue name other items: the state dir's marker says."""
    log, _ = EventLog.open(tmp_path / "events", load_config(env={}).log)
    log.append_sync([_event(1, "0", "3")])
    log.close_sync()
    ours, theirs = npy_sha256(IdMap.dense(8).to_array()), npy_sha256(IdMap.dense(9).to_array())
    claim_catalogue(tmp_path, theirs)
    for path in (tmp_path, tmp_path / "events"):  # the state dir or its log dir
        with pytest.raises(DataError, match="another item catalogue"):
            read_feedback(path, IdMap.dense(2), IdMap.dense(8), EventWeights(), 4.0,
                          catalogue=ours)  # fmt: skip
    read_feedback(tmp_path, IdMap.dense(2), IdMap.dense(9), EventWeights(), 4.0,
                  io.StringIO(), catalogue=theirs)  # fmt: skip


def test_a_full_disk_at_the_first_claim_is_the_logs_one_line_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The catalogue marker is the first write of a fresh state dir: on a full disk it raised a
    bare OSError (exit 3 and a traceback at start) where the log's own open says ENOSPC."""

    def full(path: Path, data: bytes) -> None:
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr("server.events.atomic_write", full)
    with pytest.raises(LogUnavailableError, match="ENOSPC") as caught:
        claim_catalogue(tmp_path, "f" * 64)
    assert caught.value.detail["file"] == str(tmp_path / "catalogue")


def test_npy_sha256_is_the_checksum_an_artifact_records(tiny_artifact: Path) -> None:
    artifact = load_artifact(tiny_artifact)
    assert npy_sha256(artifact.arrays["item_ids"]) == artifact.catalogue_fingerprint
    assert npy_sha256(IdMap.dense(N_ITEMS).to_array()) == artifact.catalogue_fingerprint


def test_a_state_dir_is_claimed_by_one_catalogue(tiny_artifact: Path, tmp_path: Path) -> None:
    """A fresh or unmarked state dir is claimed; one marked for another catalogue is refused
    before its log is opened, so nothing of it is replayed onto the wrong items."""
    state = _live(tiny_artifact, tmp_path / "state")
    _post(state, [("e1", "0", "3", "like", None)])
    state.log.close_sync()  # type: ignore[union-attr]
    marker = tmp_path / "state" / CATALOGUE_FILE
    assert marker.read_text().strip() == load_artifact(tiny_artifact).catalogue_fingerprint
    marker.unlink()  # a state dir from before the marker: claimed as it is
    _live(tiny_artifact, tmp_path / "state").log.close_sync()  # type: ignore[union-attr]
    assert marker.exists()
    marker.write_text("f" * 64 + "\n")
    segments = sorted((tmp_path / "state" / "events").iterdir())
    before = [p.read_bytes() for p in segments]
    with pytest.raises(ArtifactError, match=r"another item catalogue.*--state-dir"):
        _live(tiny_artifact, tmp_path / "state")
    assert [p.read_bytes() for p in sorted((tmp_path / "state" / "events").iterdir())] == before


def test_a_directory_without_a_log_is_refused(tmp_path: Path) -> None:
    (tmp_path / "somewhere").mkdir()
    with pytest.raises(DataError, match="no event log segments"):
        read_feedback(tmp_path / "somewhere", IdMap.dense(2), IdMap.dense(8), EventWeights(), 4.0)
    with pytest.raises(LogUnavailableError, match="does not exist"):
        read_feedback(tmp_path / "nowhere", IdMap.dense(2), IdMap.dense(8), EventWeights(), 4.0)


def test_a_log_missing_its_first_events_is_refused(tmp_path: Path) -> None:
    config = load_config(env={"SIGNEDREC_LOG__SEGMENT_BYTES": "300"}).log
    log, _ = EventLog.open(tmp_path / "events", config)
    for n in range(1, 21):
        log.append_sync([_event(n)])
    assert log.drop_segments_before(10) > 0
    log.close_sync()
    with pytest.raises(DataError, match="were dropped"):
        read_feedback(tmp_path, IdMap.dense(2), IdMap.dense(8), EventWeights(), 4.0)


# -- the round trip ---------------------------------------------------------------------------

ONLINE = [
    ("a", "0", str(N_ITEMS - 1), "like", None),  # cluster 0 user likes a cluster 1 item
    ("b", "new", "3", "like", None),  # a user the dataset does not have
    ("c", "new", "4", "skip", None),
    ("d", "1", "6", "rating", 2.0),
    ("e", "1", "6", "rating", 5.0),  # a change of mind: the latest wins
    ("f", "2", "9", "dislike", None),
    ("s", "3", "10", "skip", None),  # stays: a weak dislike, weight 0.25 in the trained graph
    ("g", "new", "4", "like", None),
]


def _live(artifact: Path, state_dir: Path, env: dict[str, str] | None = None) -> LiveState:
    state = LiveState(artifact, state_dir, load_config(env=env or {}))
    state.open_log()
    return state


def _post(state: LiveState, events: list[tuple[str, str, str, str, float | None]]) -> None:
    new = [NewEvent(event_id=e, user_id=u, item_id=i, kind=k, ts=1.0, value=v)  # type: ignore[arg-type]
           for e, u, i, k, v in events]  # fmt: skip
    state.apply(state.log.append_sync(new))  # type: ignore[union-attr]


def _retrain(tiny_dataset: TinyDataset, tiny_artifact: Path, state_dir: Path, root: Path,
             history_cap: int = 5000, weights: EventWeights | None = None) -> Path:  # fmt: skip
    hyper = load_artifact(tiny_artifact).manifest["model"]["hyper"]
    with known_training_warnings_ignored():
        from server.train import train

        return train(tiny_dataset.path, THRESHOLD, root, tiny_dataset.model, out=io.StringIO(),
                     fixed=Hyper(**hyper), events=state_dir, weights=weights or EventWeights(),
                     history_cap=history_cap)  # fmt: skip


@pytest.fixture
def retrained(
    tiny_dataset: TinyDataset, tiny_artifact: Path, tmp_path: Path
) -> tuple[LiveState, Path]:
    """A live state on the tiny artifact after ONLINE, closed, and a model trained on its log."""
    live = _live(tiny_artifact, tmp_path / "state")
    _post(live, ONLINE)
    asyncio.run(live.close())
    return live, _retrain(tiny_dataset, tiny_artifact, tmp_path / "state", tmp_path / "root")


def test_evaluating_a_log_version_on_a_split_with_users_its_log_created_is_refused(
    retrained: tuple[LiveState, Path],
    tiny_dataset: TinyDataset,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The version's user rows past the dataset's are the log's users ("new" here): a test file
    added since that names id N_USERS would be scored with their feedback. One line, exit 2."""
    _, artifact = retrained
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset.path, data)
    with (data / "test.txt").open("a") as handle:
        handle.write(f"{N_USERS} 3 5\n")
    code = main(["evaluate", "--artifact", str(artifact), "--data", str(data), "--json"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("signedrec evaluate: error: ")
    # The file and the row, as every data error names them.
    assert f"{data / 'test.txt'}: the row of user {N_USERS} and item 3 names a user beyond" in err


def test_a_model_trained_on_the_log_holds_the_live_graph(
    retrained: tuple[LiveState, Path], tmp_path: Path
) -> None:
    """Restarting on it replays nothing, every user has the feedback the live server had, and
    every served vector is the new model's fold of that feedback (the model contract)."""
    live, artifact = retrained
    manifest = load_artifact(artifact).manifest
    assert manifest["watermark"] == len(ONLINE)
    assert manifest["schema_version"] == SCHEMA_VERSION
    assert manifest["log"]["new_users"] == 1
    assert manifest["log"]["last_event_id"] == "g"
    restarted = _live(artifact, tmp_path / "state")
    assert restarted.events_applied == 0
    assert restarted.applied_seq == len(ONLINE)
    assert restarted.users.get("new") == N_USERS  # the log's new user is a trained user now
    for user in ["0", "1", "2", "new", "5"]:
        old, new = live.users.get(user), restarted.users.get(user)
        assert old is not None
        assert new is not None
        assert restarted._user_feedback(new).strength == live._user_feedback(old).strength
        # Dislikes in the order they came, so suppression reads the same most recent ones.
        assert list(restarted._user_feedback(new).recent_negative) == list(
            live._user_feedback(old).recent_negative
        )
    assert restarted._user_feedback(1).strength[6] == 1.0  # the rating's change of mind
    assert restarted._user_feedback(N_USERS).strength == {3: 1.0, 4: 1.0}
    assert restarted._user_feedback(3).strength[10] == -0.25
    # Histories read as the live server's: logged events as logged, newest first, then the
    # dataset rows, except a dataset row a logged event replaced (the graph has only the latest).
    for user in {u for _, u, _, _, _ in ONLINE} | {"4"}:
        logged = {row[1] for row in live.history(user, 100) if row[0] is not None}
        expected = [row for row in live.history(user, 100)
                    if row[0] is not None or row[1] not in logged]  # fmt: skip
        assert restarted.history(user, 100) == expected
    assert ("s", "10", "skip", None, 1.0) in restarted.history("3", 100)
    assert restarted.history("1", 100)[:2] == [("e", "6", "rating", 5.0, 1.0),
                                               ("d", "6", "rating", 2.0, 1.0)]  # fmt: skip
    table, neg_weight = restarted.item_side.table, restarted.item_side.neg_weight
    for user in range(len(restarted.users)):
        strength = restarted._user_feedback(user).strength
        items = np.fromiter(strength, np.int64)
        weights = np.asarray([LiveState.fold_weight(s, neg_weight) for s in strength.values()])
        expected = weights @ table[items] if len(items) else np.zeros(table.shape[1])
        np.testing.assert_allclose(restarted.vectors[user], expected, rtol=1e-5, atol=1e-5)
    assert restarted.recommend_many(["2"], 8)[0].items.count("9") == 0  # still disliked
    asyncio.run(restarted.close())


def test_events_after_the_watermark_replay_and_earlier_ids_stay_duplicates(
    retrained: tuple[LiveState, Path], tmp_path: Path
) -> None:
    _, artifact = retrained
    state = _live(artifact, tmp_path / "state")
    retry = NewEvent(event_id="c", user_id="new", item_id="4", kind="skip", ts=2.0)
    assert state.split_duplicates([retry])[1] == 1  # trained on, never applied twice
    _post(state, [("h", "new", "5", "dislike", None)])
    expected = state.vectors[state.users.get("new")].copy()
    state.log.close_sync()  # type: ignore[union-attr]  # a crash: no snapshot on the way out
    restarted = _live(artifact, tmp_path / "state")
    assert restarted.events_applied == 1  # only the event after the watermark
    np.testing.assert_allclose(restarted.vectors[N_USERS], expected, rtol=1e-5, atol=1e-6)
    asyncio.run(restarted.close())


def test_a_model_trained_on_another_log_is_refused(
    retrained: tuple[LiveState, Path], tiny_artifact: Path, tmp_path: Path
) -> None:
    _, artifact = retrained
    shorter = _live(tiny_artifact, tmp_path / "shorter")
    _post(shorter, ONLINE[:3])
    asyncio.run(shorter.close())
    with pytest.raises(ArtifactError, match="ends at seq 3"):
        LiveState(artifact, tmp_path / "shorter", load_config(env={})).open_log()
    other = _live(tiny_artifact, tmp_path / "other")
    _post(other, [(f"x{n}", "0", "3", "like", None) for n in range(len(ONLINE))])
    asyncio.run(other.close())
    with pytest.raises(ArtifactError, match="whose event 8 is 'g'"):
        LiveState(artifact, tmp_path / "other", load_config(env={})).open_log()
    # Refused without taking the log with it: the right state still opens.
    reopened = _live(tiny_artifact, tmp_path / "other")
    assert reopened.applied_seq == len(ONLINE)
    asyncio.run(reopened.close())


def test_retraining_without_events_writes_unit_weights(tiny_artifact: Path) -> None:
    artifact = load_artifact(tiny_artifact)
    assert artifact.watermark == 0
    assert "log" not in artifact.manifest
    assert np.all(artifact.arrays["pos_weights"] == 1)
    assert np.all(artifact.arrays["neg_weights"] == 1)
    files = json.loads((artifact.path / MANIFEST).read_text())["files"]
    assert {"pos_weights.npy", "neg_weights.npy"} <= set(files)


def test_reading_after_a_watermark_checks_the_log_is_the_same(tmp_path: Path) -> None:
    log, _ = EventLog.open(tmp_path / "events", load_config(env={}).log)
    log.append_sync([_event(n, "0", str(n)) for n in range(1, 5)])
    log.close_sync()
    read = read_feedback(tmp_path, IdMap.dense(2), IdMap.dense(8), EventWeights(), 4.0,
                         io.StringIO(), after_seq=2, after_event_id="e2")  # fmt: skip
    assert read.items.tolist() == [3, 4]
    assert read.watermark == 4
    with pytest.raises(DataError, match=r"event seq 2 is 'e2'.*another server's log"):
        read_feedback(tmp_path, IdMap.dense(2), IdMap.dense(8), EventWeights(), 4.0,
                      io.StringIO(), after_seq=2, after_event_id="other")  # fmt: skip
    with pytest.raises(DataError, match="ends at seq 4, before the base version's watermark 9"):
        read_feedback(tmp_path, IdMap.dense(2), IdMap.dense(8), EventWeights(), 4.0,
                      io.StringIO(), after_seq=9)  # fmt: skip
    nothing_new = read_feedback(tmp_path, IdMap.dense(2), IdMap.dense(8), EventWeights(), 4.0,
                                io.StringIO(), after_seq=4, after_event_id="e4")  # fmt: skip
    assert len(nothing_new.strengths) == 0
    assert nothing_new.last_event_id == "e4"


def test_since_a_version_of_other_data_is_refused(
    tiny_dataset: TinyDataset,
    tiny_artifact: Path,
    dataset_factory: Callable[..., Path],
    tmp_path: Path,
) -> None:
    other = dataset_factory("other", train="0 1 5\n1 2 1\n")
    log, _ = EventLog.open(tmp_path / "state" / "events", load_config(env={}).log)
    log.close_sync()
    with known_training_warnings_ignored():
        from server.train import train

        with pytest.raises(ArtifactError, match="other data"):
            train(other, THRESHOLD, tmp_path / "root", tiny_dataset.model, out=io.StringIO(),
                  events=tmp_path / "state", since=tiny_artifact)  # fmt: skip


def test_a_log_of_the_valid_rows_keeps_the_served_strengths_of_the_refit_source(
    tiny_dataset: TinyDataset,
    tiny_artifact: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Streamed valid rows in the log are train input: they leave the held-out truth, a search
    on them is refused, and a refit (--hyper-from) keeps its source's serving strengths instead
    of picking them on a split it trained on (which chose the largest, as every row scored 0)."""
    live = _live(tiny_artifact, tmp_path / "state")
    valid = tiny_dataset.rows["valid"]
    _post(live, [(f"v{n}", str(u), str(i), "rating", float(r))
                 for n, (u, i, r) in enumerate(valid)])  # fmt: skip
    asyncio.run(live.close())
    source = load_artifact(tiny_artifact)
    with known_training_warnings_ignored():
        from server.train import RankingChoice, train

        with pytest.raises(DataError, match="every valid row is in the logged feedback"):
            train(tiny_dataset.path, THRESHOLD, tmp_path / "root", tiny_dataset.model,
                  out=io.StringIO(), events=tmp_path / "state")  # fmt: skip
        progress = io.StringIO()
        choice = RankingChoice.of(source.manifest, tiny_dataset.model)
        hyper = Hyper(**source.manifest["model"]["hyper"])
        refit = train(tiny_dataset.path, THRESHOLD, tmp_path / "root", tiny_dataset.model,
                      out=progress, events=tmp_path / "state", fixed=hyper,
                      fixed_ranking=choice)  # fmt: skip
    assert f"{len(valid)} valid and 0 test rows are in the train graph now" in progress.getvalue()
    manifest = load_artifact(refit).manifest
    for key in ("suppression_gamma", "propensity_beta", "propensity_prior"):
        assert manifest["ranking"][key] == source.manifest["ranking"][key]
    assert "valid" not in manifest["metrics"]
    assert manifest["metrics"]["test"]["recall@20"] > 0.5
    # `signedrec evaluate` scores it the way its training did: its own graph, log rows not held
    # out (with the dataset's train graph instead, the new users' and logged rows would differ).
    capsys.readouterr()
    assert main(["evaluate", "--artifact", str(refit), "--data", str(tiny_dataset.path),
                 "--json"]) == 0  # fmt: skip
    printed = capsys.readouterr()
    result = json.loads(printed.out)
    for key, value in manifest["metrics"]["test"].items():
        if key != "users":
            assert result[key] == pytest.approx(value, abs=1e-6), key
    assert "0 test rows are in it, not held out" in printed.err
    # Every valid row is train input now: the refusal says so instead of doubting the threshold.
    assert main(["evaluate", "--artifact", str(refit), "--data", str(tiny_dataset.path),
                 "--split", "valid"]) == 2  # fmt: skip
    refused = capsys.readouterr().err
    assert f"{len(valid)} of its rows are in the artifact's graph" in refused
    assert "threshold" not in refused.split("evaluate against;")[1]


def test_a_newcomer_stays_one_once_a_version_is_trained_on_its_log(
    tiny_dataset: TinyDataset, tiny_artifact: Path, tmp_path: Path
) -> None:
    """A user the log created with only a dislike is ranked from the popularity list; a version
    trained on that log made them a trained user, so a restart on it ranked them from their
    dislike-built vector (the item's look-alikes on top) while a reload kept popularity."""
    live = _live(tiny_artifact, tmp_path / "state")
    _post(live, [("d", "newbie", "3", "dislike", None)])
    before = live.recommend_many(["newbie"], 5, False)[0]
    asyncio.run(live.close())
    assert before.fallback
    version = _retrain(tiny_dataset, tiny_artifact, tmp_path / "state", tmp_path / "root")
    restarted = _live(version, tmp_path / "state")
    assert restarted.users.get("newbie") < restarted.n_trained_users  # a trained row now
    after = restarted.recommend_many(["newbie", "0"], 5, False)
    assert after[0].fallback  # popularity as before the retrain (the new version's counts)
    assert "3" not in after[0].items
    assert not after[1].fallback  # a dataset user is ranked from the model as before
    asyncio.run(restarted.close())


def test_a_window_raised_after_retention_still_knows_the_trained_ids(
    tiny_dataset: TinyDataset, tiny_artifact: Path, tmp_path: Path
) -> None:
    """Retention keeps the log back to (watermark - dedup_window); a window raised later was
    refilled from the log alone, so retries of trained events that retention had dropped were
    accepted and applied twice. The version's logged-event ids fill that part."""
    small = {"SIGNEDREC_LOG__SEGMENT_BYTES": "300", "SIGNEDREC_LOG__DEDUP_WINDOW": "2"}
    live = _live(tiny_artifact, tmp_path / "state", small)
    for n in range(30):  # one commit each, so the log rolls over into several segments
        _post(live, [(f"e{n}", str(n % 5), str(n % N_ITEMS), "like", None)])
    asyncio.run(live.close())
    version = _retrain(tiny_dataset, tiny_artifact, tmp_path / "state", tmp_path / "root")
    log, _ = EventLog.open(tmp_path / "state" / "events", load_config(env=small).log)
    assert log.drop_segments_before(30 - 2) > 0  # what retention does once every version has it
    first = log.first_seq
    log.close_sync()
    assert first > 1
    restarted = _live(version, tmp_path / "state", {**small, "SIGNEDREC_LOG__DEDUP_WINDOW": "1000"})
    assert [n for n in range(30) if f"e{n}" not in restarted.event_ids] == []
    asyncio.run(restarted.close())


def test_history_names_dataset_dislikes_by_sign_whatever_the_skip_weight(
    tiny_artifact: Path, tmp_path: Path
) -> None:
    """With skips weighted as dislikes (-1) every dataset dislike was listed as a skip."""
    state = _live(tiny_artifact, tmp_path / "state", {"SIGNEDREC_EVENTS__SKIP": "-1.0"})
    kinds = {row[2] for user in range(N_USERS) for row in state.history(str(user), 1000)}
    assert kinds == {"like", "dislike"}


def test_a_trained_skip_beyond_the_kept_history_is_named_skip(
    tiny_dataset: TinyDataset, tiny_artifact: Path, tmp_path: Path
) -> None:
    """A skip past the version's per-user history cap is told by its strength, compared in the
    graph's float32 (-0.3 as a Python float never equalled it)."""
    env = {"SIGNEDREC_EVENTS__SKIP": "-0.3"}
    live = _live(tiny_artifact, tmp_path / "state", env)
    pos, neg = live._trained_edges(3)
    free = sorted(set(range(N_ITEMS)) - set(pos.tolist()) - set(neg.tolist()))
    _post(live, [("s", "3", str(free[0]), "skip", None), ("t", "3", str(free[1]), "like", None)])
    asyncio.run(live.close())
    capped = _retrain(tiny_dataset, tiny_artifact, tmp_path / "state", tmp_path / "root", 1,
                      load_config(env=env).events)  # fmt: skip
    restarted = _live(capped, tmp_path / "state", env)
    history = restarted.history("3", 1000)
    assert history[0][:3] == ("t", str(free[1]), "like")  # the one logged event kept
    assert (None, str(free[0]), "skip", None, None) in history
    assert sum(row[2] == "skip" for row in history) == 1


def test_a_version_keeps_at_most_history_cap_logged_events_per_user(
    tiny_dataset: TinyDataset, tiny_artifact: Path, tmp_path: Path
) -> None:
    live = _live(tiny_artifact, tmp_path / "state")
    _post(live, ONLINE)
    asyncio.run(live.close())
    capped = _retrain(tiny_dataset, tiny_artifact, tmp_path / "state", tmp_path / "root", 1)
    arrays = load_artifact(capped).arrays
    assert len(arrays["log_users"]) == len({u for _, u, _, _, _ in ONLINE})  # one per user
    assert arrays["log_seqs"].tolist() == sorted(arrays["log_seqs"].tolist())
    newest = {u: n for n, (_, u, _, _, _) in enumerate(ONLINE, start=1)}
    assert sorted(arrays["log_seqs"].tolist()) == sorted(newest.values())


@settings(max_examples=50, deadline=None)
@given(
    events=st.lists(st.tuples(st.integers(0, 3), st.text(max_size=6)), max_size=40),
    cap=st.integers(1, 5),
)
def test_a_version_keeps_each_users_latest_logged_events(
    events: list[tuple[int, str]], cap: int
) -> None:
    """The cap keeps each user's newest ``cap`` events, in seq order, ids intact."""
    from server.train import latest_per_user

    blobs = [f"{n}:{text}".encode() for n, (_, text) in enumerate(events)]
    history = {
        "log_seqs": np.arange(1, len(events) + 1, dtype=np.int64),
        "log_users": np.asarray([u for u, _ in events], np.int32),
        "log_items": np.arange(len(events), dtype=np.int32),
        "log_kinds": np.zeros(len(events), np.uint8),
        "log_values": np.full(len(events), np.nan),
        "log_ts": np.arange(len(events), dtype=np.float64),
        "log_id_offsets": np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(
            np.int64
        ),
        "log_id_bytes": np.frombuffer(b"".join(blobs), np.uint8),
    }
    kept = latest_per_user(history, cap)
    expected = [n for n, (u, _) in enumerate(events)
                if sum(1 for v, _ in events[n + 1 :] if v == u) < cap]  # fmt: skip
    assert kept["log_items"].tolist() == expected
    assert kept["log_seqs"].tolist() == [n + 1 for n in expected]
    offsets, data = kept["log_id_offsets"], kept["log_id_bytes"].tobytes()
    ids = [data[offsets[k] : offsets[k + 1]] for k in range(len(expected))]
    assert ids == [blobs[n] for n in expected]


def test_the_replay_a_restart_needs_counts_every_event_after_a_swapped_in_graph(
    tiny_dataset: TinyDataset, tiny_artifact: Path, tmp_path: Path
) -> None:
    """Served a version trained on the log (another graph), a restart builds users from its
    graph and replays all after its watermark, as no snapshot of this state fits it: the
    metric said the events since the last snapshot (0 right after one)."""
    live = _live(tiny_artifact, tmp_path / "state")
    _post(live, ONLINE)
    version = _retrain(tiny_dataset, tiny_artifact, tmp_path / "state", tmp_path / "root")
    _post(live, [("late1", "2", "11", "like", None), ("late2", "3", "12", "dislike", None)])
    assert live.restart_replay() == live.since_snapshot  # its own graph: the snapshot's count
    live.swap(ItemSide(load_artifact(version), live.config))
    live.write_snapshot()
    assert live.since_snapshot == 0
    expected = live.applied_seq - load_artifact(version).watermark
    assert live.restart_replay() == expected == 2
    asyncio.run(live.close())
    restarted = _live(version, tmp_path / "state")
    try:
        assert restarted.events_applied == expected  # what the restart really replayed
        assert restarted.restart_replay() == restarted.since_snapshot
    finally:
        asyncio.run(restarted.close())


def test_a_server_with_other_event_weights_than_a_log_version_was_trained_with_warns(
    retrained: tuple[LiveState, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The version baked its log's events in with the trainer's weights; a server configured
    with others re-weighted none of them, silently (review L)."""
    _, version = retrained
    caplog.set_level(logging.WARNING, logger="signedrec.state")
    state = LiveState(version, tmp_path / "same", load_config(env={}))
    assert "events weights" not in caplog.text
    state = LiveState(version, tmp_path / "other",
                      load_config(env={"SIGNEDREC_EVENTS__LIKE": "5"}))  # fmt: skip
    assert "folded the logged events up to seq" in caplog.text
    assert "'like': 5.0" in caplog.text
    del state
