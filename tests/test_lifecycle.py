"""Model lifecycle on the real server: list versions, reload, rollback, refuse bad artifacts."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from server.artifacts import Artifact, list_versions, load_artifact, save_artifact
from tests.conftest import TinyDataset
from tests.test_service import Server, _wait_for_metric

REPO = Path(__file__).resolve().parent.parent
DEFAULT_ROOT = REPO / "model_artifacts" / "default"
# Names chosen so the copied default stays the newest version, the one a plain start serves.
ROTATED = "20000101T000000000Z"
CORRUPT = "19990101T000000000Z"
OTHER_CATALOGUE = "19980101T000000000Z"
ADMIN = {"x-api-key": "k-admin"}


def _server(artifact: Path, state_dir: Path, extra_env: dict[str, str] | None = None) -> Server:
    """A `signedrec serve` subprocess on a given artifact root and state dir."""
    return Server(state_dir, extra_env, artifact=artifact, timeout=60.0)


def _rotated_arrays(arrays: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """The same catalogue with item table and vectors under one random rotation, perturbed."""
    rng = np.random.default_rng(seed)
    dim = arrays["item_table"].shape[1]
    rotation, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    out = dict(arrays)
    for name in ("item_table", "item_vectors"):
        rotated = arrays[name] @ rotation
        noise = rng.standard_normal(rotated.shape) * 0.05 * float(np.std(rotated))
        out[name] = (rotated + noise).astype(np.float32)
    return out


def _manifest(artifact_manifest: dict[str, Any], note: str) -> dict[str, Any]:
    keep = {k: v for k, v in artifact_manifest.items()
            if k not in ("files", "version", "created_at", "schema_version")}  # fmt: skip
    return {**keep, "name": note}


def _two_versions(root: Path, seed: int) -> tuple[str, Artifact]:
    """The default version copied into ``root`` (the one a plain start serves) and a genuine
    second one of its catalogue, ROTATED; returns the default's name and artifact."""
    default = list_versions(DEFAULT_ROOT)[-1]
    shutil.copytree(DEFAULT_ROOT / default, root / default)
    base = load_artifact(root / default)
    save_artifact(root, _rotated_arrays(base.arrays, seed), _manifest(base.manifest, "rotated"),
                  version=ROTATED)  # fmt: skip
    return default, base


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A root with the default version copied and a genuine second (rotated) version."""
    root = tmp_path_factory.mktemp("artifacts")
    _two_versions(root, 0)
    return root


@pytest.fixture(scope="module")
def server(root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The real server on that root; its client sends the admin key."""
    env = {"SIGNEDREC_ACCESS__KEYS": '{"k-admin": "admin"}'}
    srv = _server(root, tmp_path_factory.mktemp("state") / "s", env)
    srv.client.headers.update(ADMIN)
    yield srv
    srv.stop()


def _recs(srv: Server, user: str, k: int = 50) -> dict[str, Any]:
    r = srv.client.get(f"/v1/recommendations/{user}", params={"k": k})
    assert r.status_code == 200, r.text
    return r.json()


def _ids(body: dict[str, Any]) -> list[str]:
    return [i["item_id"] for i in body["items"]]


def _event(user: str, item: str, kind: str) -> dict[str, str]:
    return {"event_id": uuid.uuid4().hex, "user_id": user, "item_id": item, "kind": kind}


def _history(srv: Server, user: str) -> list[dict[str, Any]]:
    r = srv.client.get(f"/v1/users/{user}/history", params={"limit": 5000})
    assert r.status_code == 200, r.text
    return r.json()["events"]  # type: ignore[no-any-return]


def _model(srv: Server) -> dict[str, Any]:
    r = srv.client.get("/v1/model")
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def _admin(srv: Server, action: str, version: str | None = None) -> httpx.Response:
    body = {} if version is None else {"version": version}
    path = f"/v1/admin/model/{action}"
    if action == "rollback":
        return srv.client.post(path, headers=ADMIN)
    return srv.client.post(path, json=body, headers=ADMIN)


def _assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert error["message"]


def test_lifecycle(server: Server, root: Path) -> None:
    """One story in order: list, reload, check users, rollback, then the refusals."""
    (first,) = [v for v in list_versions(root) if v != ROTATED]
    model = _model(server)
    assert model["active"] == first
    assert model["previous"] is None
    assert [v["version"] for v in model["versions"]] == [ROTATED, first]
    assert [v["active"] for v in model["versions"]] == [False, True]
    assert all(isinstance(v["metrics"], dict) for v in model["versions"])

    # Rollback with nothing to roll back to.
    _assert_error(_admin(server, "rollback"), 409, "no_previous_version")

    # Users with feedback before the reload: one new, one trained.
    users = {f"life-{uuid.uuid4().hex}": ["21", "50", "29"], "3": ["7", "10"]}
    disliked: dict[str, set[str]] = {}
    for user, liked in users.items():
        target = _ids(_recs(server, user, 5))[0]
        events = [_event(user, item, "like") for item in liked] + [_event(user, target, "dislike")]
        r = server.client.post("/v1/feedback", json=events)
        assert r.json() == {"accepted": len(events), "duplicates": 0}
        disliked[user] = {target}
    before = {u: (_recs(server, u), _history(server, u)) for u in users}
    for user, (recs, _) in before.items():
        assert recs["model_version"] == first
        assert not disliked[user] & set(_ids(recs))

    # Reload to the rotated version.
    r = _admin(server, "reload", ROTATED)
    assert r.status_code == 200, r.text
    assert r.json()["active"] == ROTATED
    assert r.json()["previous"] == first
    assert server.client.get("/readyz").json()["model_version"] == ROTATED
    for user, (recs, history) in before.items():
        now = _recs(server, user)
        assert now["model_version"] == ROTATED
        assert now["fallback"] is False
        assert not disliked[user] & set(_ids(now))
        assert _history(server, user) == history
        # The rotation is perturbed, so scores move but the neighbourhood is close.
        assert [i["score"] for i in now["items"]] != [i["score"] for i in recs["items"]]
        assert len(set(_ids(now)) & set(_ids(recs))) >= len(recs["items"]) // 2
    similar = server.client.get("/v1/items/21/similar", params={"k": 5}).json()
    assert similar["model_version"] == ROTATED

    # Feedback under the new model, then rollback: both events still count.
    for user in users:
        r = server.client.post("/v1/feedback", json=[_event(user, "76", "dislike")])
        assert r.status_code == 200, r.text
        disliked[user].add("76")
    r = _admin(server, "rollback")
    assert r.status_code == 200, r.text
    assert r.json()["active"] == first
    assert r.json()["previous"] is None
    for user, (_, history) in before.items():
        now = _recs(server, user)
        assert now["model_version"] == first
        assert not disliked[user] & set(_ids(now))
        assert _history(server, user)[1:] == history
    _assert_error(_admin(server, "rollback"), 409, "no_previous_version")

    # A corrupt version (a flipped byte in one array) is refused; the old model keeps serving.
    shutil.copytree(root / first, root / CORRUPT)
    table = root / CORRUPT / "item_vectors.npy"
    data = bytearray(table.read_bytes())
    data[len(data) // 2] ^= 0x01
    table.write_bytes(bytes(data))
    _assert_error(_admin(server, "reload", CORRUPT), 409, "invalid_artifact")
    assert _model(server)["active"] == first
    assert _recs(server, "3")["model_version"] == first

    # A version with another catalogue (same shapes, different item ids) is refused too.
    base = load_artifact(root / first)
    arrays = dict(base.arrays)
    arrays["item_ids"] = np.asarray([f"x{i}" for i in arrays["item_ids"]])
    save_artifact(root, arrays, _manifest(base.manifest, "other"), version=OTHER_CATALOGUE)
    r = _admin(server, "reload", OTHER_CATALOGUE)
    _assert_error(r, 409, "invalid_artifact")
    assert "catalogue" in r.json()["error"]["message"]
    # A missing version as well, including names no filesystem would take (schemathesis found
    # a 300-byte Unicode name turning into a 500 from the path lookup).
    _assert_error(_admin(server, "reload", "no-such-version"), 404, "unknown_version")
    _assert_error(_admin(server, "reload", "\u1e70\u033a" * 150), 404, "unknown_version")

    model = _model(server)
    assert model["active"] == first
    assert model["previous"] is None
    assert {v["version"] for v in model["versions"]} == {first, ROTATED, CORRUPT, OTHER_CATALOGUE}
    for user in users:
        recs = _recs(server, user)
        assert recs["model_version"] == first
        assert not disliked[user] & set(_ids(recs))
    assert server.client.get("/readyz").status_code == 200


def test_reload_without_body_takes_newest(server: Server, root: Path) -> None:
    """A bare reload loads the newest version on disk (here: the one already active)."""
    newest = list_versions(root)[-1]
    r = server.client.post("/v1/admin/model/reload", headers=ADMIN)
    assert r.status_code == 200, r.text
    assert r.json()["active"] == newest
    _assert_error(
        server.client.post("/v1/admin/model/reload", content=b"{", headers=ADMIN),
        400,
        "malformed_json",
    )
    _assert_error(
        server.client.post("/v1/admin/model/reload", json={"version": 3}, headers=ADMIN),
        422,
        "invalid_body",
    )


NEWER = "29990101T000000000Z"


def test_model_choice_survives_restarts(tmp_path: Path) -> None:
    """A named reload or a rollback pins the version across restarts (SIGKILL included), with
    the rollback stack; reloading the newest unpins; a pinned version gone from disk falls back
    to the newest with a warning."""
    root = tmp_path / "artifacts"
    default, base = _two_versions(root, 1)
    env = {"SIGNEDREC_ACCESS__KEYS": '{"k-admin": "admin"}'}
    state = tmp_path / "state"

    def start() -> Server:
        srv = _server(root, state, env)
        srv.client.headers.update(ADMIN)
        return srv

    def choice(srv: Server) -> tuple[str, str | None]:
        body = _model(srv)
        return body["active"], body["previous"]

    srv = start()
    assert choice(srv) == (default, None)
    assert _admin(srv, "reload", ROTATED).status_code == 200
    srv.stop(signal.SIGKILL)  # saved when the swap happened, not at shutdown

    srv = start()
    assert choice(srv) == (ROTATED, default)
    assert _admin(srv, "rollback").status_code == 200
    assert choice(srv) == (default, None)
    srv.stop()
    save_artifact(root, base.arrays, _manifest(base.manifest, "newer"), version=NEWER)

    srv = start()
    assert choice(srv) == (default, None)  # the rollback pinned it, though NEWER is on disk now
    assert _admin(srv, "reload").status_code == 200  # the newest: unpins
    assert choice(srv) == (NEWER, default)
    assert _admin(srv, "reload", ROTATED).status_code == 200
    assert choice(srv) == (ROTATED, NEWER)
    srv.stop()
    shutil.rmtree(root / ROTATED)

    srv = start()
    try:
        # The stack was [default, NEWER]; NEWER is now active, so rollback goes to default.
        assert choice(srv) == (NEWER, default)
        # A rollback target deleted from disk is a 404 and leaves the history, so the operator
        # is not stuck on it: the next rollback says there is nothing left to go back to.
        shutil.move(root / default, tmp_path / "aside")
        _assert_error(_admin(srv, "rollback"), 404, "unknown_version")
        assert choice(srv) == (NEWER, None)
        _assert_error(_admin(srv, "rollback"), 409, "no_previous_version")
    finally:
        srv.stop()
    assert f"pinned version {ROTATED} is no longer under" in srv.log_path.read_text()


def test_a_kill_after_a_reload_restores_the_older_versions_snapshot(tmp_path: Path) -> None:
    """The snapshot on disk was taken before a reload; a SIGKILL before the next one leaves the
    restart (on the reloaded, pinned version) that snapshot plus a short tail: it is restored
    with every vector refolded under the served version, and the users' answers are as before."""
    root = tmp_path / "artifacts"
    _two_versions(root, 2)
    env = {"SIGNEDREC_ACCESS__KEYS": '{"k-admin": "admin"}',
           "SIGNEDREC_LOG__SNAPSHOT_EVERY_EVENTS": "3"}  # fmt: skip
    srv = _server(root, tmp_path / "state", env)
    srv.client.headers.update(ADMIN)
    early = [_event("kill-a", "10", "like"), _event("kill-b", "11", "dislike"),
             _event("5", "12", "like")]  # fmt: skip
    assert srv.client.post("/v1/feedback", json=early).status_code == 200
    _wait_for_metric(srv, 'signedrec_snapshots_total{result="written"} 1.0')
    assert _admin(srv, "reload", ROTATED).status_code == 200
    late = [_event("kill-a", "13", "dislike"), _event("kill-c", "10", "like")]
    assert srv.client.post("/v1/feedback", json=late).status_code == 200
    users = ["kill-a", "kill-b", "kill-c", "5", "6"]
    before = {u: _recs(srv, u, 20) for u in users}
    srv.stop(signal.SIGKILL)

    again = _server(root, tmp_path / "state", env)
    try:
        for user in users:
            after = _recs(again, user, 20)
            assert after["model_version"] == ROTATED
            assert _ids(after) == _ids(before[user])
            np.testing.assert_allclose([i["score"] for i in after["items"]],
                                       [i["score"] for i in before[user]["items"]],
                                       rtol=1e-5, atol=1e-6)  # fmt: skip
    finally:
        again.stop(signal.SIGKILL)
    log = again.log_path.read_text()
    assert f"refolded under {ROTATED}" in log
    assert "replayed 2 events" in log


def test_retrain_on_the_servers_log_then_restart_on_it(
    tiny_dataset: TinyDataset, tiny_artifact: Path, tmp_path: Path
) -> None:
    """`signedrec train --events STATE` while the server runs, then a restart on the new version:
    it replays nothing (the events are in its graph), a user created online is a trained user,
    a dislike is still never returned, a retry of an old event is still a duplicate, and the
    events after the watermark replay after a SIGKILL."""
    root = tmp_path / "artifacts"
    shutil.copytree(tiny_artifact, root / tiny_artifact.name)
    state = tmp_path / "state"
    srv = _server(root, state)
    online = [
        {**_event("online", "3", "like"), "event_id": "first"},
        _event("online", "4", "like"),
        _event("0", "5", "dislike"),
        _event("1", "6", "skip"),
        {**_event("2", "7", "rating"), "value": 5.0},
    ]
    assert srv.client.post("/v1/feedback", json=online).json()["accepted"] == len(online)
    assert _recs(srv, "online")["fallback"] is False
    posted = sorted({e["user_id"] for e in online})
    histories = {user: _history(srv, user) for user in posted}
    config = tmp_path / "tiny.toml"
    config.write_text(tiny_dataset.model_toml)
    train = subprocess.run(
        [sys.executable, "-m", "server.cli", "train", "--data", str(tiny_dataset.path),
         "--threshold", str(tiny_dataset.threshold), "--out", str(root), "--config", str(config),
         "--hyper-from", str(root / tiny_artifact.name), "--events", str(state)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert train.returncode == 0, train.stderr
    assert f"{len(online)} events, seq 1..{len(online)} (1 new users)" in train.stderr
    new_version = Path(train.stdout.strip().splitlines()[-1]).name
    srv.stop()

    again = _server(root, state)
    try:
        assert _model(again)["active"] == new_version
        # Trained now, and each history reads as before: the logged events with their ids,
        # kinds, values and times, newest first, then the dataset rows.
        assert {user: _history(again, user) for user in posted} == histories
        assert histories["online"][-1]["event_id"] == "first"
        assert histories["2"][0]["value"] == 5.0
        assert "5" not in _ids(_recs(again, "0"))
        retry = again.client.post("/v1/feedback", json=[online[0]]).json()
        assert retry == {"accepted": 0, "duplicates": 1}
        late = _event("online", "8", "dislike")
        assert again.client.post("/v1/feedback", json=[late]).json()["accepted"] == 1
        before = _recs(again, "online")
    finally:
        again.stop(signal.SIGKILL)
    log = again.log_path.read_text()
    assert "replayed 0 events in" in log
    assert f"after seq {len(online)}" in log

    third = _server(root, state)
    try:
        after = _recs(third, "online")
        assert _ids(after) == _ids(before)
        np.testing.assert_allclose([i["score"] for i in after["items"]],
                                   [i["score"] for i in before["items"]],
                                   rtol=1e-5, atol=1e-6)  # fmt: skip
    finally:
        third.stop()
    assert "replayed 1 events" in third.log_path.read_text()


def _train_on_log(
    tiny_dataset: TinyDataset, root: Path, state: Path, base: Path, *since: str
) -> subprocess.CompletedProcess[str]:
    """`signedrec train --events STATE` with ``base``'s hyper-parameters (no search)."""
    config = state.parent / "tiny.toml"
    config.write_text(tiny_dataset.model_toml)
    return subprocess.run(
        [sys.executable, "-m", "server.cli", "train", "--data", str(tiny_dataset.path),
         "--threshold", str(tiny_dataset.threshold), "--out", str(root), "--config", str(config),
         "--hyper-from", str(base), "--events", str(state), *since],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_log_retention_drops_only_what_every_version_was_trained_on(
    tiny_dataset: TinyDataset, tiny_artifact: Path, tmp_path: Path
) -> None:
    """With log.retention = "trained" a restart deletes the segments every version under the
    root holds (beyond the dedup window): none while a version trained without the log is
    there, some once it is removed; later versions train `--since` the newest, and a plain
    `--events` on the shortened log is refused."""
    root, state = tmp_path / "artifacts", tmp_path / "state"
    shutil.copytree(tiny_artifact, root / tiny_artifact.name)
    env = {"SIGNEDREC_LOG__SEGMENT_BYTES": "300", "SIGNEDREC_LOG__RETENTION": "trained",
           "SIGNEDREC_LOG__DEDUP_WINDOW": "2"}  # fmt: skip
    srv = _server(root, state, env)
    events = [_event(str(n % 5), str(n + 8), "like" if n % 3 else "dislike") for n in range(12)]
    for event in events:  # one commit each, so the log rolls over into several segments
        assert srv.client.post("/v1/feedback", json=[event]).json()["accepted"] == 1
    trained = _train_on_log(tiny_dataset, root, state, root / tiny_artifact.name)
    assert trained.returncode == 0, trained.stderr
    b_version = Path(trained.stdout.strip().splitlines()[-1]).name
    srv.stop()
    segments = sorted((state / "events").glob("events-*.log"))
    assert len(segments) > 3

    _server(root, state, env).stop()  # the first version (watermark 0) still needs every event
    assert sorted((state / "events").glob("events-*.log")) == segments

    listed = subprocess.run([sys.executable, "-m", "server.cli", "versions", str(root)], cwd=REPO,
                            capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    assert [line.split()[-1] for line in listed.stdout.splitlines()] == [
        "watermark=0", f"watermark={len(events)}"]  # fmt: skip
    shutil.rmtree(root / tiny_artifact.name)
    third = _server(root, state, env)
    try:
        # Retention runs once the state is up, just before the "ready" log line: wait for it.
        deadline = time.monotonic() + 30.0
        while "ready: model" not in third.log_path.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        kept = sorted((state / "events").glob("events-*.log"))
        assert segments[0] not in kept
        assert int(kept[0].name[7:27]) <= len(events) - 2 + 1  # the dedup window is kept
        metrics = third.client.get("/metrics").text
        assert f"signedrec_log_first_seq {int(kept[0].name[7:27])}.0" in metrics
        assert f"signedrec_model_watermark {len(events)}.0" in metrics
        assert f"signedrec_log_segments {len(kept)}.0" in metrics
        retry = third.client.post("/v1/feedback", json=[events[-1]]).json()
        assert retry == {"accepted": 0, "duplicates": 1}
        late = [_event("online", "3", "like"), _event("0", "4", "dislike")]
        assert third.client.post("/v1/feedback", json=late).json()["accepted"] == 2
    finally:
        third.stop()
    assert "log segments, every event in them at or before seq 10" in third.log_path.read_text()

    plain = _train_on_log(tiny_dataset, root, state, root / b_version)
    assert plain.returncode == 2
    assert "were dropped" in plain.stderr
    assert "--since" in plain.stderr
    since = _train_on_log(tiny_dataset, root, state, root / b_version, "--since",
                          str(root / b_version))  # fmt: skip
    assert since.returncode == 0, since.stderr
    assert "2 events, seq 13..14 (1 new users)" in since.stderr
    fourth = _server(root, state, env)
    try:
        assert _model(fourth)["active"] == Path(since.stdout.strip().splitlines()[-1]).name
        assert "4" not in _ids(_recs(fourth, "0"))
        # The base version's logged events came along: user 0's history still names them,
        # though their log segments are gone, newest (the late dislike) first.
        ids = [e["event_id"] for e in _history(fourth, "0") if e["event_id"] is not None]
        assert ids == [late[1]["event_id"], *(e["event_id"] for e in events[::-1]
                                              if e["user_id"] == "0")]  # fmt: skip
    finally:
        fourth.stop()
    assert "replayed 0 events" in fourth.log_path.read_text()


def test_a_state_dir_of_another_catalogue_is_refused_at_start(tmp_path: Path) -> None:
    """Two artifact roots of one name share the default state dir: serving the second must stop
    with a clear error instead of replaying the first's events onto its own items."""
    first, second = tmp_path / "a" / "models", tmp_path / "b" / "models"
    default = list_versions(DEFAULT_ROOT)[-1]
    shutil.copytree(DEFAULT_ROOT / default, first / default)
    base = load_artifact(first / default)
    arrays = dict(base.arrays)
    arrays["item_ids"] = np.asarray([f"x{i}" for i in arrays["item_ids"]])
    save_artifact(second, arrays, _manifest(base.manifest, "other"), version=OTHER_CATALOGUE)
    state = tmp_path / "state"
    srv = _server(first, state)
    try:
        item = str(base.arrays["item_ids"][0])
        assert srv.client.post("/v1/feedback", json=_event("u", item, "like")).status_code == 200
    finally:
        srv.stop()
    segments = sorted((state / "events").iterdir())
    before = [p.read_bytes() for p in segments]
    refused = subprocess.run(
        [sys.executable, "-m", "server.cli", "serve", "--artifact", str(second),
         "--state-dir", str(state), "--port", "0"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert refused.returncode == 2, refused.stderr
    assert "another item catalogue" in refused.stderr
    assert "--state-dir" in refused.stderr
    assert [p.read_bytes() for p in sorted((state / "events").iterdir())] == before
    again = _server(first, state)
    try:  # the first catalogue still owns it, its event intact
        history = again.client.get("/v1/users/u/history").json()["events"]
        assert [e["item_id"] for e in history] == [item]
    finally:
        again.stop()


def test_a_version_trained_on_another_servers_log_is_refused_and_never_blocks_a_restart(
    tiny_dataset: TinyDataset, tiny_artifact: Path, tmp_path: Path
) -> None:
    """Two servers share a root (replicas). A version trained on A's log would have taken over
    B on reload (200) and refused B's state dir at its next restart (exit 2). Reload refuses it
    (409); a restart of B that follows the newest serves the newest version that can serve B's
    state dir, saying why, and A restarts on the version trained on its own log."""
    root = tmp_path / "artifacts"
    shutil.copytree(tiny_artifact, root / tiny_artifact.name)
    env = {"SIGNEDREC_ACCESS__KEYS": '{"k-admin": "admin"}'}
    state_a, state_b = tmp_path / "a" / "state", tmp_path / "b" / "state"
    a, b = _server(root, state_a, env), _server(root, state_b, env)
    try:
        for srv, user in ((a, "ua"), (b, "ub")):
            events = [_event(user, str(n + 3), "like") for n in range(4)]
            assert srv.client.post("/v1/feedback", json=events, headers=ADMIN).status_code == 200
        trained = _train_on_log(tiny_dataset, root, state_a, root / tiny_artifact.name)
        assert trained.returncode == 0, trained.stderr
        version = Path(trained.stdout.strip().splitlines()[-1]).name
        refused = _admin(b, "reload", version)
        _assert_error(refused, 409, "invalid_artifact")
        assert "serve it with the state dir whose log it was trained on" in refused.text
        assert b.client.get("/v1/model", headers=ADMIN).json()["active"] == tiny_artifact.name
        assert _admin(a, "reload", version).status_code == 200
    finally:
        a.stop()
        b.stop()
    restarted = _server(root, state_b, env)
    try:
        assert restarted.client.get("/v1/model", headers=ADMIN).json()["active"] == (
            tiny_artifact.name)  # fmt: skip
        assert "ub" in restarted.client.get("/v1/users/ub/history", headers=ADMIN).text
    finally:
        restarted.stop()
    assert f"version {version} cannot serve {state_b}" in restarted.log_path.read_text()
    again = _server(root, state_a, env)
    try:
        assert again.client.get("/v1/model", headers=ADMIN).json()["active"] == version
    finally:
        again.stop()


def test_a_corrupt_newest_version_still_stops_the_start(tmp_path: Path) -> None:
    """The fallback at start covers versions that cannot serve this state dir, not damage: a
    newest version with a flipped byte stops the start (exit 2, naming it) rather than being
    hidden behind a warning while an older version serves."""
    root = tmp_path / "models"
    default = list_versions(DEFAULT_ROOT)[-1]
    shutil.copytree(DEFAULT_ROOT / default, root / default)
    newest = root / "29990101T000000000Z"
    shutil.copytree(root / default, newest)
    vectors = newest / "item_vectors.npy"
    data = bytearray(vectors.read_bytes())
    data[-1] ^= 0xFF
    vectors.write_bytes(bytes(data))
    refused = subprocess.run(
        [sys.executable, "-m", "server.cli", "serve", "--artifact", str(root),
         "--state-dir", str(tmp_path / "state"), "--port", "0"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert refused.returncode == 2, refused.stderr
    assert "checksum mismatch" in refused.stderr.strip().splitlines()[-1]


def _pruning_server(
    tiny_dataset: TinyDataset, tiny_artifact: Path, tmp_path: Path
) -> tuple[Server, Path, Path, str]:
    """A server under log retention (small segments, a dedup window of 2) on a root with the tiny
    dataset-only version, after 12 events, each its own commit so the log rolls over into several
    segments, and a version trained on them; returns it, the root, the state dir and that
    version's name. The caller stops the server."""
    root, state = tmp_path / "artifacts", tmp_path / "state"
    shutil.copytree(tiny_artifact, root / tiny_artifact.name)
    env = {"SIGNEDREC_LOG__SEGMENT_BYTES": "300", "SIGNEDREC_LOG__RETENTION": "trained",
           "SIGNEDREC_LOG__DEDUP_WINDOW": "2",
           "SIGNEDREC_ACCESS__KEYS": '{"k-admin": "admin"}'}  # fmt: skip
    srv = _server(root, state, env)
    try:
        for n in range(12):
            event = _event(str(n % 5), str(n + 8), "like" if n % 3 else "dislike")
            assert srv.client.post("/v1/feedback", json=[event], headers=ADMIN).status_code == 200
        trained = _train_on_log(tiny_dataset, root, state, root / tiny_artifact.name)
        assert trained.returncode == 0, trained.stderr
    except BaseException:
        srv.stop()
        raise
    return srv, root, state, Path(trained.stdout.strip().splitlines()[-1]).name


def test_reload_refuses_a_version_needing_dropped_events_whatever_graph_the_server_holds(
    tiny_dataset: TinyDataset, tiny_artifact: Path, tmp_path: Path
) -> None:
    """The server started on a dataset-only version, moved to one trained on its log, and
    retention pruned the log. A dataset-only version (watermark 0) added back has the graph the
    server started on, so the reload check passed it over (200, pinned) and the restart after a
    crash exited 2; it is refused (409) like any version needing dropped events."""
    srv, root, _, on_log = _pruning_server(tiny_dataset, tiny_artifact, tmp_path)
    try:
        shutil.move(root / tiny_artifact.name, tmp_path / "aside")
        assert _admin(srv, "reload", on_log).status_code == 200  # then retention prunes
        deadline = time.monotonic() + 30.0
        while "log segments, every event in them at or before seq" not in srv.log_path.read_text():
            assert time.monotonic() < deadline, "the log was not pruned"
            time.sleep(0.05)
        shutil.copytree(tmp_path / "aside", root / "29990101T000000000Z")
        refused = _admin(srv, "reload", "29990101T000000000Z")
        _assert_error(refused, 409, "invalid_artifact")
        assert "retention has dropped those" in refused.text
        assert srv.client.get("/v1/model", headers=ADMIN).json()["active"] == on_log
    finally:
        srv.stop()


def test_a_reload_reading_a_damaged_log_is_a_server_error(
    tiny_dataset: TinyDataset, tiny_artifact: Path, tmp_path: Path
) -> None:
    """Checking a version trained on the log rereads it; bit rot found there was answered 400, a
    client error for what no client can fix. It is a 500 (logged), and the server serves on."""
    root, state = tmp_path / "artifacts", tmp_path / "state"
    shutil.copytree(tiny_artifact, root / tiny_artifact.name)
    env = {"SIGNEDREC_ACCESS__KEYS": '{"k-admin": "admin"}'}
    srv = _server(root, state, env)
    try:
        events = [_event("u", str(n + 3), "like") for n in range(4)]
        assert srv.client.post("/v1/feedback", json=events, headers=ADMIN).status_code == 200
        trained = _train_on_log(tiny_dataset, root, state, root / tiny_artifact.name)
        assert trained.returncode == 0, trained.stderr
        version = Path(trained.stdout.strip().splitlines()[-1]).name
        segment = next((state / "events").glob("events-*.log"))
        data = bytearray(segment.read_bytes())
        data[len(data) // 2] ^= 0xFF
        segment.write_bytes(bytes(data))
        _assert_error(_admin(srv, "reload", version), 500, "log_corrupt")
        assert srv.client.get("/v1/model", headers=ADMIN).json()["active"] == tiny_artifact.name
        assert _recs(srv, "u")["items"]
    finally:
        srv.stop()
    assert "log_corrupt (answered 500)" in srv.log_path.read_text()


def test_reloading_the_active_version_applies_retention(
    tiny_dataset: TinyDataset, tiny_artifact: Path, tmp_path: Path
) -> None:
    """Retention runs after each reload: an operator removes the last version that needed the
    old events, then reloads; with the asked version already active nothing was pruned until
    a restart."""
    srv, root, state, on_log = _pruning_server(tiny_dataset, tiny_artifact, tmp_path)
    try:
        assert _admin(srv, "reload", on_log).status_code == 200
        segments = sorted((state / "events").glob("events-*.log"))
        shutil.rmtree(root / tiny_artifact.name)  # the version that needed every event
        assert _admin(srv, "reload", on_log).status_code == 200  # already active
        assert "log segments, every event in them at or before seq 10" in srv.log_path.read_text()
        assert segments[0] not in sorted((state / "events").glob("events-*.log"))
    finally:
        srv.stop()
