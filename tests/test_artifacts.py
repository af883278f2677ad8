"""Artifacts on disk: round trip, checksums, missing files, schema, versions, no pickles."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from server import artifacts
from server.artifacts import (
    HISTORY_ARRAYS,
    MANIFEST,
    REQUIRED_ARRAYS,
    SCHEMA_VERSION,
    USER_ID_ARRAYS,
    WEIGHT_ARRAYS,
    _sha256,
    list_versions,
    load_artifact,
    read_manifest,
    resolve,
    save_artifact,
)
from server.errors import ArtifactError

N_USERS, N_ITEMS, DIM = 5, 7, 3


def _arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "item_table": rng.standard_normal((N_ITEMS, DIM)).astype(np.float32),
        "item_vectors": rng.standard_normal((N_ITEMS, DIM)).astype(np.float32),
        "item_popularity": rng.random(N_ITEMS).astype(np.float32),
        "item_ids": np.asarray([f"item-{i}" for i in range(N_ITEMS)], dtype=str),
        "user_ids": np.asarray([str(u) for u in range(N_USERS)], dtype=str),
        "pos_indptr": np.array([0, 2, 3, 3, 5, 6], dtype=np.int64),
        "pos_items": np.array([0, 4, 1, 2, 6, 3], dtype=np.int32),
        "neg_indptr": np.array([0, 1, 1, 2, 2, 2], dtype=np.int64),
        "neg_items": np.array([5, 0], dtype=np.int32),
        "pos_weights": np.array([1, 1, 0.5, 1, 1, 2], dtype=np.float32),
        "neg_weights": np.array([0.25, 1], dtype=np.float32),
    }


def _manifest() -> dict[str, Any]:
    return {
        "name": "unit",
        "dataset": {"name": "toy", "threshold": 4.0, "n_users": N_USERS, "n_items": N_ITEMS},
        "model": {"kind": "signed-linear-graph", "dim": DIM, "neg_weight": 0.25},
        "ranking": {"suppression_gamma": 0.2, "propensity_beta": 0.1, "propensity_prior": 16.0},
        "metrics": {"valid": {"ndcg@20": 0.5}},
        "watermark": 0,
    }


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "artifacts"


@pytest.fixture
def saved(root: Path) -> Path:
    return save_artifact(root, _arrays(), _manifest(), version="20240101T000000000Z")


def _rewrite_manifest(version: Path, **changes: Any) -> None:
    manifest = json.loads((version / MANIFEST).read_text())
    manifest.update(changes)
    (version / MANIFEST).write_text(json.dumps(manifest))


def test_round_trip(saved: Path, root: Path) -> None:
    assert saved == root / "20240101T000000000Z"
    artifact = load_artifact(saved)
    assert artifact.path == saved
    assert set(artifact.arrays) == set(REQUIRED_ARRAYS) | set(WEIGHT_ARRAYS) | set(HISTORY_ARRAYS)
    for name, array in _arrays().items():
        np.testing.assert_array_equal(artifact.arrays[name], array)
        # User ids are stored packed and come back as str objects, not fixed-width unicode.
        assert artifact.arrays[name].dtype == (object if name == "user_ids" else array.dtype)
    manifest = artifact.manifest
    assert manifest["schema_version"] == SCHEMA_VERSION
    assert manifest["version"] == artifact.version == "20240101T000000000Z"
    assert artifact.neg_weight == 0.25
    assert artifact.threshold == 4.0
    for key, value in _manifest().items():
        assert manifest[key] == value
    assert "created_at" in manifest
    every = (*REQUIRED_ARRAYS, *WEIGHT_ARRAYS, *HISTORY_ARRAYS, *USER_ID_ARRAYS)
    assert set(manifest["files"]) == {f"{name}.npy" for name in every if name != "user_ids"}
    assert len(artifact.arrays["log_seqs"]) == 0  # trained without a log: no logged events
    entry = manifest["files"]["item_table.npy"]
    assert entry["shape"] == [N_ITEMS, DIM]
    assert entry["dtype"] == "float32"
    assert len(entry["sha256"]) == 64
    # Nothing but the version dir (no temp dir) is left under the root.
    assert [p.name for p in root.iterdir()] == [saved.name]
    assert read_manifest(saved) == manifest


def test_default_version_names_sort_by_time(root: Path) -> None:
    first = save_artifact(root, _arrays(), _manifest())
    second = save_artifact(root, _arrays(1), _manifest(), version=first.name + "~later")
    assert list_versions(root) == [first.name, second.name]
    assert first.name.endswith("Z")
    assert len(first.name) == len("20240101T000000000Z")


def test_existing_version_is_not_overwritten(saved: Path, root: Path) -> None:
    with pytest.raises(ArtifactError, match="already exists"):
        save_artifact(root, _arrays(1), _manifest(), version=saved.name)
    np.testing.assert_array_equal(
        load_artifact(saved).arrays["item_table"], _arrays()["item_table"]
    )


def test_missing_array_is_refused_on_save(root: Path) -> None:
    arrays = _arrays()
    del arrays["neg_items"]
    with pytest.raises(ArtifactError, match="neg_items"):
        save_artifact(root, arrays, _manifest())
    assert list_versions(root) == []


@pytest.mark.parametrize("name", ["item_table", "item_ids", "pos_indptr"])
def test_checksum_mismatch_is_refused(saved: Path, name: str) -> None:
    path = saved / f"{name}.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # one bit of the last array element
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="checksum mismatch") as caught:
        load_artifact(saved)
    assert f"{name}.npy" in caught.value.message
    # Without verification the flipped element loads (it is still a valid .npy file).
    assert load_artifact(saved, verify=False).arrays[name].shape == _arrays()[name].shape


def test_missing_file_is_refused(saved: Path) -> None:
    (saved / "pos_items.npy").unlink()
    with pytest.raises(ArtifactError, match=r"pos_items\.npy is missing"):
        load_artifact(saved)


def test_file_not_in_manifest_is_refused(saved: Path) -> None:
    manifest = json.loads((saved / MANIFEST).read_text())
    del manifest["files"]["neg_indptr.npy"]
    (saved / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"does not list neg_indptr\.npy"):
        load_artifact(saved)


def test_missing_manifest_is_refused(saved: Path) -> None:
    (saved / MANIFEST).unlink()
    with pytest.raises(ArtifactError, match=r"manifest\.json is missing"):
        read_manifest(saved)
    with pytest.raises(ArtifactError, match="no artifact"):
        load_artifact(saved)


def test_corrupt_manifest_is_refused(saved: Path) -> None:
    (saved / MANIFEST).write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load_artifact(saved)
    (saved / MANIFEST).write_text("[1, 2]")
    with pytest.raises(ArtifactError, match="not a JSON object"):
        load_artifact(saved)


@pytest.mark.parametrize("schema", [SCHEMA_VERSION + 1, 0, "1", None, True])
def test_wrong_schema_version_is_refused(saved: Path, schema: object) -> None:
    _rewrite_manifest(saved, schema_version=schema)
    with pytest.raises(ArtifactError, match="schema_version") as caught:
        load_artifact(saved)
    assert f"expected one of 1, 2, 3, {SCHEMA_VERSION}" in caught.value.message


def _as_older_schema(version: Path, schema: int, added_since: list[str]) -> None:
    """Rewrite a saved version as an older schema wrote it: without the arrays added since, and
    (before schema 4) its user ids as one fixed-width unicode array."""
    manifest = json.loads((version / MANIFEST).read_text())
    for name in added_since:
        (version / f"{name}.npy").unlink()
        del manifest["files"][f"{name}.npy"]
    if schema < 4:
        packed = [np.load(version / f"{name}.npy") for name in USER_ID_ARRAYS]
        users = np.asarray(artifacts.unpack_ids(*packed), dtype=str)
        for name in USER_ID_ARRAYS:
            (version / f"{name}.npy").unlink()
            del manifest["files"][f"{name}.npy"]
        np.save(version / "user_ids.npy", users, allow_pickle=False)
        manifest["files"]["user_ids.npy"] = {
            "sha256": _sha256(version / "user_ids.npy"),
            "shape": list(users.shape),
            "dtype": str(users.dtype),
        }
    manifest["schema_version"] = schema
    (version / MANIFEST).write_text(json.dumps(manifest))


def test_schema_1_artifact_reads_as_unit_weights(saved: Path) -> None:
    """An artifact from before edge weights (the shipped default) loads with every weight 1,
    and its graph fingerprint is that of the same graph written with explicit unit weights."""
    _as_older_schema(saved, 1, [*WEIGHT_ARRAYS, *HISTORY_ARRAYS])
    old = load_artifact(saved)
    assert old.arrays["pos_weights"].tolist() == [1.0] * 6
    assert old.arrays["neg_weights"].tolist() == [1.0] * 2
    unit = _arrays()
    unit["pos_weights"] = np.ones(6, np.float32)
    unit["neg_weights"] = np.ones(2, np.float32)
    new = load_artifact(save_artifact(saved.parent, unit, _manifest(), version="unit"))
    weighted = load_artifact(save_artifact(saved.parent, _arrays(), _manifest(), version="w"))
    assert new.graph_fingerprint == old.graph_fingerprint  # user ids stored either way
    assert weighted.graph_fingerprint != old.graph_fingerprint


def _history(ids: list[str]) -> dict[str, np.ndarray]:
    blobs = [i.encode() for i in ids]
    return {
        "log_seqs": np.arange(1, len(ids) + 1, dtype=np.int64),
        "log_users": np.arange(len(ids), dtype=np.int32) % N_USERS,
        "log_items": np.arange(len(ids), dtype=np.int32) % N_ITEMS,
        "log_kinds": np.arange(len(ids), dtype=np.uint8) % 4,
        "log_values": np.where(np.arange(len(ids)) % 4 == 3, 3.7, np.nan),
        "log_ts": np.linspace(1.7e9, 1.8e9, len(ids)),
        "log_id_offsets": np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(
            np.int64
        ),
        "log_id_bytes": np.frombuffer(b"".join(blobs), np.uint8),
    }


def test_logged_events_round_trip(root: Path) -> None:
    """The logged events a graph holds come back byte for byte (ids are UTF-8, not pickles)."""
    history = _history(["é-1", "evt-2", "", "日本-4"])
    loaded = load_artifact(save_artifact(root, {**_arrays(), **history}, _manifest()))
    for name, array in history.items():
        np.testing.assert_array_equal(loaded.arrays[name], array)
    ids = loaded.arrays["log_id_bytes"].tobytes().decode()
    assert ids == "é-1evt-2日本-4"


@pytest.mark.parametrize("schema", [3, 4])
def test_user_ids_of_any_length_and_script_round_trip(root: Path, schema: int) -> None:
    """Online user ids (up to 512 characters, any script, a NUL) come back exactly, and from
    schema 4 one long id costs only its own bytes, not its length times every user."""
    long_id = "x" * 512
    users = [long_id, "é", "日本", "a\x00", *[str(u) for u in range(996)]]
    arrays = {**_arrays(), "user_ids": np.asarray(users, dtype=object)}
    saved = save_artifact(root, arrays, _manifest())
    if schema == 3:
        users[3] = "a"  # fixed-width unicode drops a trailing NUL
        _as_older_schema(saved, 3, [])
    loaded = load_artifact(saved)
    assert loaded.arrays["user_ids"].tolist() == users
    assert artifacts.read_ids(saved) == (users, [f"item-{i}" for i in range(N_ITEMS)])
    size = sum((saved / f).stat().st_size for f in read_manifest(saved)["files"]
               if f.startswith("user_id"))  # fmt: skip
    if schema == 4:
        assert size < 2 * sum(len(u.encode()) for u in users) + 8 * (len(users) + 1) + 512
    else:
        assert size >= 4 * 512 * len(users)  # what schema 4 avoids


@pytest.mark.parametrize(
    ("data", "offsets", "problem"),
    [(b"abc", [0, 2, 1, 3], "decrease"), (b"abc", [0, 1, 4], "span"), (b"\xff", [0, 1], "UTF-8"),
     (b"abc", [1, 3], "span")],
)  # fmt: skip
def test_user_ids_that_cannot_be_unpacked_are_refused(
    root: Path, data: bytes, offsets: list[int], problem: str
) -> None:
    saved = save_artifact(root, _arrays(), _manifest())
    manifest = json.loads((saved / MANIFEST).read_text())
    for name, array in (("user_id_bytes", np.frombuffer(data, np.uint8)),
                        ("user_id_offsets", np.asarray(offsets, np.int64))):  # fmt: skip
        np.save(saved / f"{name}.npy", array, allow_pickle=False)
        manifest["files"][f"{name}.npy"].update(sha256=_sha256(saved / f"{name}.npy"),
                                                shape=list(array.shape))  # fmt: skip
    (saved / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=f"the user ids cannot be read: .*{problem}"):
        load_artifact(saved)


def test_schema_2_artifact_reads_as_holding_no_logged_events(saved: Path) -> None:
    _as_older_schema(saved, 2, list(HISTORY_ARRAYS))
    old = load_artifact(saved)
    assert len(old.arrays["log_seqs"]) == 0
    assert old.arrays["log_id_offsets"].tolist() == [0]


@pytest.mark.parametrize(
    ("name", "value"),
    [("log_id_offsets", np.array([0, 3, 2, 9, 14])), ("log_users", np.array([0, 1, 9, 3])),
     ("log_items", np.array([0, -1, 2, 3])), ("log_kinds", np.array([0, 1, 2, 4]))],
)  # fmt: skip
def test_logged_events_that_disagree_are_refused(root: Path, name: str, value: np.ndarray
                                                 ) -> None:  # fmt: skip
    history = _history(["é-1", "evt-2", "", "日本-4"])
    history[name] = value.astype(history[name].dtype)
    saved = save_artifact(root, {**_arrays(), **history}, _manifest())
    with pytest.raises(ArtifactError, match="logged-event arrays"):
        load_artifact(saved)


def test_schema_2_needs_its_weights(saved: Path) -> None:
    (saved / "neg_weights.npy").unlink()
    with pytest.raises(ArtifactError, match=r"neg_weights\.npy is missing"):
        load_artifact(saved)


def test_non_positive_weight_is_refused(root: Path) -> None:
    arrays = _arrays()
    arrays["pos_weights"][2] = 0.0
    path = save_artifact(root, arrays, _manifest())
    with pytest.raises(ArtifactError, match="pos_weights must be one weight > 0 per edge"):
        load_artifact(path)


@pytest.mark.parametrize("key", ["version", "files", "model", "dataset", "ranking"])
def test_manifest_missing_key_is_refused(saved: Path, key: str) -> None:
    manifest = json.loads((saved / MANIFEST).read_text())
    del manifest[key]
    (saved / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=f"manifest field {key} is missing"):
        read_manifest(saved)


def test_dtype_and_shape_must_match_the_manifest(saved: Path) -> None:
    # A float64 table with a consistent checksum is still refused: the dtype is part of the schema.
    path = saved / "item_table.npy"
    np.save(path, _arrays()["item_table"].astype(np.float64), allow_pickle=False)
    manifest = json.loads((saved / MANIFEST).read_text())
    manifest["files"]["item_table.npy"]["sha256"] = _sha256(path)
    (saved / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"item_table\.npy has dtype float64"):
        load_artifact(saved)


def test_resolve_picks_the_newest_version(root: Path) -> None:
    names = ["20240101T000000000Z", "20250101T000000000Z", "20240601T000000000Z"]
    for seed, name in enumerate(names):
        save_artifact(root, _arrays(seed), _manifest(), version=name)
    assert list_versions(root) == sorted(names)
    assert resolve(root) == root / "20250101T000000000Z"
    assert resolve(root / "20240101T000000000Z") == root / "20240101T000000000Z"
    newest = load_artifact(root)
    assert newest.version == "20250101T000000000Z"
    np.testing.assert_array_equal(newest.arrays["item_table"], _arrays(1)["item_table"])


def test_list_versions_ignores_temp_and_incomplete_dirs(saved: Path, root: Path) -> None:
    # A crashed save leaves `.<version>.tmp`, even with a manifest: never a version, never resolved.
    crashed = save_artifact(root / "elsewhere", _arrays(1), _manifest(), version="20990101T0Z")
    crashed.rename(root / ".20990101T0Z.tmp")
    # ... or, as a save names its temp dir now (one per writer), `.<version>.<random>.tmp`.
    other = save_artifact(root / "elsewhere", _arrays(1), _manifest(), version="20990101T1Z")
    other.rename(root / ".20990101T1Z.0123456789ab.tmp")
    (root / "20980101T000000000Z").mkdir()  # no manifest: not a version
    (root / "20970101T000000000Z.txt").write_text("a file, not a dir")
    assert list_versions(root) == [saved.name]
    assert resolve(root) == saved
    assert list_versions(root / "absent") == []
    with pytest.raises(ArtifactError, match="no artifact"):
        resolve(root / "absent")
    with pytest.raises(ArtifactError, match="no artifact"):
        resolve(root / "20980101T000000000Z")


def test_object_arrays_cannot_sneak_in(saved: Path, root: Path) -> None:
    # Saving refuses object arrays (np.save with allow_pickle=False) ...
    arrays = _arrays()
    arrays["item_ids"] = np.asarray([f"item-{i}" for i in range(N_ITEMS)], dtype=object)
    with pytest.raises(ValueError, match="allow_pickle"):
        save_artifact(root, arrays, _manifest(), version="20300101T000000000Z")
    assert "20300101T000000000Z" not in list_versions(root)
    # ... and loading refuses a pickled file even when the manifest's checksum agrees with it.
    path = saved / "item_ids.npy"
    np.save(path, arrays["item_ids"], allow_pickle=True)
    manifest = json.loads((saved / MANIFEST).read_text())
    manifest["files"]["item_ids.npy"].update(sha256=_sha256(path), dtype="object")
    (saved / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"item_ids\.npy cannot be read"):
        load_artifact(saved)


def test_inconsistent_item_arrays_are_refused(root: Path) -> None:
    arrays = _arrays()
    arrays["item_ids"] = arrays["item_ids"][:-1]
    version = save_artifact(root, arrays, _manifest())
    with pytest.raises(ArtifactError, match="disagree"):
        load_artifact(version)


# Concurrent saves: two writers that pick the same version name (the same millisecond).

SAME_MS = "20990101T000000000Z"


def _dot_entries(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


def _interleave(monkeypatch: pytest.MonkeyPatch, target: Any, name: str, root: Path,
                version: str | None = None) -> list[Path]:  # fmt: skip
    """Run a whole second save (seed 1) inside the first call of ``target.name`` that the
    first save makes; returns the path the second save published."""
    real = getattr(target, name)
    second: list[Path] = []

    def hooked(*args: Any, **kwargs: Any) -> Any:
        if not second:
            second.append(Path())  # the inner save's own calls go straight through
            second[0] = save_artifact(root, _arrays(1), _manifest(), version=version)
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, hooked)
    return second


@pytest.mark.parametrize(("target", "name"), [(np, "save"), (os, "rename")])
def test_writers_of_the_same_version_name_both_publish(
    root: Path, monkeypatch: pytest.MonkeyPatch, target: Any, name: str
) -> None:
    """While one save writes (np.save) or is about to rename (os.rename), another with the same
    version name publishes: neither touches the other's temp dir, the later gets the next name
    (a rename onto a taken name is never an overwrite) and each version holds its own arrays."""
    monkeypatch.setattr(artifacts, "new_version", lambda: SAME_MS)
    second = _interleave(monkeypatch, target, name, root)
    first = save_artifact(root, _arrays(0), _manifest())
    assert second == [root / SAME_MS]
    assert first == root / f"{SAME_MS}-01"
    assert list_versions(root) == [SAME_MS, f"{SAME_MS}-01"]
    for path, seed in ((first, 0), (second[0], 1)):
        loaded = load_artifact(path)  # every file there and matching its checksum
        assert loaded.version == path.name
        np.testing.assert_array_equal(loaded.arrays["item_table"], _arrays(seed)["item_table"])
    assert _dot_entries(root) == []


def test_a_chosen_version_taken_while_writing_is_refused_and_cleaned_up(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    second = _interleave(monkeypatch, os, "rename", root, version=SAME_MS)
    with pytest.raises(ArtifactError, match="already exists"):
        save_artifact(root, _arrays(0), _manifest(), version=SAME_MS)
    assert second == [root / SAME_MS]
    loaded = load_artifact(root / SAME_MS)
    np.testing.assert_array_equal(loaded.arrays["item_table"], _arrays(1)["item_table"])
    assert _dot_entries(root) == []


def test_many_saves_in_one_millisecond_get_names_in_order(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(artifacts, "new_version", lambda: SAME_MS)
    names = [save_artifact(root, _arrays(seed), _manifest()).name for seed in range(12)]
    assert names == list_versions(root)  # the order they were saved in is the sorted order
    assert names[-1] == f"{SAME_MS}-11"
    assert names[-1] < "20990101T000000001Z"  # still before the next millisecond


# A failed write leaves nothing behind and is one ArtifactError (exit 2 in the CLI).


def _failing_np_save(monkeypatch: pytest.MonkeyPatch, after: int, code: int) -> None:
    real = np.save
    calls = []

    def save(*args: Any, **kwargs: Any) -> None:
        calls.append(1)
        if len(calls) > after:
            raise OSError(code, os.strerror(code))
        real(*args, **kwargs)

    monkeypatch.setattr(np, "save", save)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EFBIG])
def test_a_failed_write_removes_its_temp_dir_and_the_root_it_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    root = tmp_path / "new" / "root"
    _failing_np_save(monkeypatch, after=3, code=code)
    with pytest.raises(ArtifactError) as caught:
        save_artifact(root, _arrays(), _manifest())
    message = caught.value.message
    assert str(root) in message
    assert errno.errorcode[code] in message
    assert list(tmp_path.iterdir()) == []  # not the root, nor the parent this save made


def test_a_failed_write_into_an_existing_root_leaves_it_as_it_was(
    saved: Path, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _failing_np_save(monkeypatch, after=0, code=errno.ENOSPC)
    with pytest.raises(ArtifactError, match="ENOSPC"):
        save_artifact(root, _arrays(1), _manifest())
    assert [p.name for p in root.iterdir()] == [saved.name]
    assert load_artifact(saved).version == saved.name


def test_a_failed_fsync_after_the_rename_unpublishes_the_version(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The root's fsync makes the new name durable; if it fails the version may not survive a
    crash, so the save fails and takes the version back rather than report an error beside it."""
    real = artifacts.fsync_dir

    def fsync_dir(directory: Path) -> None:
        if directory == root:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(directory)

    monkeypatch.setattr(artifacts, "fsync_dir", fsync_dir)
    with pytest.raises(ArtifactError, match="EIO"):
        save_artifact(root, _arrays(), _manifest())
    assert not root.exists()


# The manifest's fields are checked when it is read: an edited one is one ArtifactError that
# names the field, never a KeyError/TypeError later. (The manifest is not among the checksummed
# files, so an edit needs no re-hash to reach these checks.)


def _edit(manifest: dict[str, Any], path: str, value: Any) -> None:
    """Set (or, with ``...``, delete) a dotted field of a manifest."""
    *parents, last = path.split(".")
    for key in parents:
        manifest = manifest[key]
    if value is ...:
        del manifest[last]
    else:
        manifest[last] = value


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        ("ranking", ..., "ranking is missing"),
        ("ranking.suppression_gamma", ..., "ranking.suppression_gamma is missing"),
        ("model.neg_weight", ..., "model.neg_weight is missing"),
        ("model.neg_weight", "0.5", "model.neg_weight is invalid"),
        ("model.neg_weight", float("nan"), "model.neg_weight is invalid"),
        ("dataset.threshold", ..., "dataset.threshold is missing"),
        ("dataset.threshold", float("inf"), "dataset.threshold is invalid"),
        ("watermark", "abc", "watermark is invalid"),
        ("watermark", None, "watermark is invalid"),
        ("watermark", -1, "watermark is invalid"),
        ("files", [], "files is invalid"),
        ("version", 7, "version is invalid"),
        ("model", "signed", "model is invalid"),
        # Optional fields may be absent, but must have their type when present.
        ("log", None, "log is invalid"),
        ("log", {"last_event_id": 3}, "log.last_event_id is invalid"),
        ("ranking.propensity_beta", "high", "ranking.propensity_beta is invalid"),
        ("ranking.propensity_prior", 0, "ranking.propensity_prior is invalid"),
        ("dataset.fingerprint", 1, "dataset.fingerprint is invalid"),
        ("model.hyper", [], "model.hyper is invalid"),
        ("created_at", 5, "created_at is invalid"),
    ],
)  # fmt: skip
def test_an_edited_manifest_is_refused_naming_the_field(
    saved: Path, path: str, value: Any, field: str
) -> None:
    manifest = json.loads((saved / MANIFEST).read_text())
    manifest["log"] = {"last_event_id": "e-1", "last_seq": 0}
    _edit(manifest, path, value)
    (saved / MANIFEST).write_text(json.dumps(manifest))
    for read in (read_manifest, load_artifact):
        with pytest.raises(ArtifactError, match=f"manifest field {field}") as caught:
            read(saved)
        assert str(saved / MANIFEST) in caught.value.message


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda files: files["item_table.npy"].pop("sha256"),
         r"files\['item_table.npy'\].sha256 is missing"),
        (lambda files: files["item_ids.npy"].update(sha256="not-a-digest"),
         r"files\['item_ids.npy'\].sha256 is invalid"),
        (lambda files: files["pos_items.npy"].update(shape="6"),
         r"files\['pos_items.npy'\].shape is invalid"),
        (lambda files: files.update({"neg_items.npy": None}),
         r"files\['neg_items.npy'\] is invalid"),
    ],
)  # fmt: skip
def test_an_edited_file_entry_is_refused_naming_the_file(saved: Path, edit: Any, field: str
                                                          ) -> None:  # fmt: skip
    manifest = json.loads((saved / MANIFEST).read_text())
    edit(manifest["files"])
    (saved / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=f"manifest field {field}"):
        load_artifact(saved)


def test_an_old_manifest_without_the_optional_fields_loads(saved: Path) -> None:
    """What schema 1 did not write, or wrote only sometimes, may be absent: defaults apply."""
    _as_older_schema(saved, 1, [*WEIGHT_ARRAYS, *HISTORY_ARRAYS])
    manifest = json.loads((saved / MANIFEST).read_text())
    for key in ("watermark", "created_at", "metrics", "log"):
        manifest.pop(key, None)
    manifest["ranking"] = {"suppression_gamma": 0.0}
    manifest["model"] = {"neg_weight": 0.5}
    manifest["dataset"] = {"threshold": 3}  # an integral threshold is a number too
    (saved / MANIFEST).write_text(json.dumps(manifest))
    loaded = load_artifact(saved)
    assert (loaded.watermark, loaded.neg_weight, loaded.threshold) == (0, 0.5, 3.0)


def test_the_shipped_default_still_loads() -> None:
    root = Path(__file__).resolve().parent.parent / "model_artifacts" / "default"
    versions = list_versions(root)
    assert versions
    assert read_manifest(root / versions[-1])["schema_version"] == 1
    assert load_artifact(root).version == versions[-1]


def test_a_manifest_that_cannot_be_read_is_an_artifact_error(tiny_artifact: Path, tmp_path: Path
                                                              ) -> None:  # fmt: skip
    """A directory in the manifest's place (or a permission error) is refused like any other
    unusable manifest, so listings skip or name that version instead of failing."""
    broken = tmp_path / "v1"
    shutil.copytree(tiny_artifact, broken)
    (broken / MANIFEST).unlink()
    (broken / MANIFEST).mkdir()
    with pytest.raises(ArtifactError, match="cannot be read"):
        read_manifest(broken)
