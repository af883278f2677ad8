"""Artifacts on disk: round trip, checksums, missing files, schema, versions, no pickles."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from server.artifacts import (
    HISTORY_ARRAYS,
    MANIFEST,
    REQUIRED_ARRAYS,
    SCHEMA_VERSION,
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
        assert artifact.arrays[name].dtype == array.dtype
    manifest = artifact.manifest
    assert manifest["schema_version"] == SCHEMA_VERSION
    assert manifest["version"] == artifact.version == "20240101T000000000Z"
    assert artifact.neg_weight == 0.25
    assert artifact.threshold == 4.0
    for key, value in _manifest().items():
        assert manifest[key] == value
    assert "created_at" in manifest
    every = (*REQUIRED_ARRAYS, *WEIGHT_ARRAYS, *HISTORY_ARRAYS)
    assert set(manifest["files"]) == {f"{name}.npy" for name in every}
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
    assert f"expected one of 1, 2, {SCHEMA_VERSION}" in caught.value.message


def _as_older_schema(version: Path, schema: int, added_since: list[str]) -> None:
    """Rewrite a saved version as an older schema wrote it: without the arrays added since."""
    manifest = json.loads((version / MANIFEST).read_text())
    for name in added_since:
        (version / f"{name}.npy").unlink()
        del manifest["files"][f"{name}.npy"]
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
    assert new.graph_fingerprint == old.graph_fingerprint
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


@pytest.mark.parametrize("key", ["version", "files", "model", "dataset"])
def test_manifest_missing_key_is_refused(saved: Path, key: str) -> None:
    manifest = json.loads((saved / MANIFEST).read_text())
    del manifest[key]
    (saved / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=repr(key)):
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
