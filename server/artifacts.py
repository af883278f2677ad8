"""Versioned model artifacts: ``<root>/<version>/`` with ``.npy`` arrays, checksummed manifest."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from server.durable import fsync_dir
from server.errors import ArtifactError
from server.events import KIND_CODES
from server.graph import SignedGraph

# 2 added the trained graph's edge weights (feedback folded in from an event log); a version 1
# artifact is read as every edge weighing 1, which is what its trainer used. 3 added the logged
# events the graph holds, so a user's history keeps their ids and times once they are trained;
# older artifacts are read as holding none.
SCHEMA_VERSION = 3
READABLE_SCHEMAS = (1, 2, 3)
MANIFEST = "manifest.json"

# Every array an artifact must hold, with its dtype; shapes are checked against the manifest.
REQUIRED_ARRAYS: dict[str, str] = {
    "item_table": "float32",  # Q: what one event adds to a user vector (rows = items)
    "item_vectors": "float32",  # V: the FAISS side, score = u . V_i
    "item_popularity": "float32",  # fallback ranking for users with no feedback yet
    "item_ids": "<U",
    "user_ids": "<U",
    "pos_indptr": "int64",
    "pos_items": "int32",
    "neg_indptr": "int64",
    "neg_items": "int32",
}
# Arrays a schema 2 artifact also holds (``load_artifact`` fills them with ones for schema 1).
WEIGHT_ARRAYS: dict[str, str] = {"pos_weights": "float32", "neg_weights": "float32"}
# Arrays a schema 3 artifact also holds: the logged events folded into its graph, in seq order
# (empty without a log). Event ids are UTF-8 in one byte array, event k's at
# log_id_bytes[log_id_offsets[k]:log_id_offsets[k + 1]]; log_kinds index events.KIND_CODES.
HISTORY_ARRAYS: dict[str, str] = {
    "log_seqs": "int64",
    "log_users": "int32",  # index into user_ids
    "log_items": "int32",
    "log_kinds": "uint8",
    "log_values": "float64",  # as logged; NaN: the event had no value
    "log_ts": "float64",
    "log_id_offsets": "int64",
    "log_id_bytes": "uint8",
}
# The arrays that make up the users and trained signed graph a live state is built on.
GRAPH_FILES = ("user_ids", "pos_indptr", "pos_items", "neg_indptr", "neg_items")


@dataclass(frozen=True, slots=True)
class Artifact:
    """A loaded, verified artifact: its manifest and arrays."""

    path: Path
    manifest: dict[str, Any]
    arrays: dict[str, np.ndarray]

    @property
    def version(self) -> str:
        """The version string (the directory name)."""
        return str(self.manifest["version"])

    @property
    def neg_weight(self) -> float:
        """The signed-input weight of a negative edge."""
        return float(self.manifest["model"]["neg_weight"])

    @property
    def threshold(self) -> float:
        """Rating threshold: at or above is positive."""
        return float(self.manifest["dataset"]["threshold"])

    @property
    def catalogue_fingerprint(self) -> str:
        """Digest of the item ids (their file's verified checksum): what item indices mean."""
        return str(self.manifest["files"]["item_ids.npy"]["sha256"])

    @property
    def graph_fingerprint(self) -> str:
        """Digest of the user ids and trained signed graph (from the verified file checksums)."""
        files = self.manifest["files"]
        digest = hashlib.sha256(str(self.manifest.get("watermark", 0)).encode())
        for name in GRAPH_FILES:
            digest.update(files[f"{name}.npy"]["sha256"].encode())
        # Unit weights (every schema 1 graph, any graph of dataset rows only) add nothing, so
        # the same graph has the same fingerprint in either schema.
        for name in WEIGHT_ARRAYS:
            if not np.all(self.arrays[name] == 1.0):
                digest.update(files[f"{name}.npy"]["sha256"].encode())
        return digest.hexdigest()

    def trained_graph(self) -> SignedGraph:
        """The signed graph the model was trained on (dataset rows and any logged feedback)."""
        a = self.arrays
        return SignedGraph(len(a["user_ids"]), len(a["item_ids"]), a["pos_indptr"],
                           a["pos_items"], a["neg_indptr"], a["neg_items"], a["pos_weights"],
                           a["neg_weights"])  # fmt: skip

    @property
    def watermark(self) -> int:
        """The last event-log seq folded into the trained graph (0: none)."""
        return int(self.manifest.get("watermark", 0))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def npy_sha256(array: np.ndarray) -> str:
    """The checksum ``save_artifact`` records for this array's file, without writing it."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return hashlib.sha256(buffer.getvalue()).hexdigest()


def new_version() -> str:
    """A sortable, unique version name: UTC time to the millisecond."""
    now = time.time()
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f"{int(now * 1000) % 1000:03d}Z"


def save_artifact(
    root: Path, arrays: dict[str, np.ndarray], manifest: dict[str, Any], version: str | None = None
) -> Path:
    """Write a new version atomically (temp dir, fsync, rename) and return its directory."""
    arrays = {**empty_history(), **arrays}  # a version trained without a log holds no events
    missing = sorted((set(REQUIRED_ARRAYS) | set(WEIGHT_ARRAYS)) - set(arrays))
    if missing:
        raise ArtifactError(f"artifact is missing arrays {missing}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    version = version or new_version()
    final = root / version
    if final.exists():
        raise ArtifactError(f"artifact version {final} already exists")
    tmp = root / f".{version}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    files: dict[str, Any] = {}
    for name, array in arrays.items():
        path = tmp / f"{name}.npy"
        np.save(path, np.ascontiguousarray(array), allow_pickle=False)
        files[f"{name}.npy"] = {
            "sha256": _sha256(path),
            "shape": list(array.shape),
            "dtype": str(array.dtype),
        }
    body = {
        "schema_version": SCHEMA_VERSION,
        "version": version,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **manifest,
        "files": files,
    }
    (tmp / MANIFEST).write_text(json.dumps(body, indent=2, sort_keys=True))
    for path in tmp.iterdir():
        with path.open("rb") as handle:
            os.fsync(handle.fileno())
    fsync_dir(tmp)
    os.rename(tmp, final)
    fsync_dir(root)
    return final


def list_versions(root: Path) -> list[str]:
    """Versions under a root that have a manifest, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(
        p.name
        for p in root.iterdir()
        if p.is_dir() and not p.name.startswith(".") and (p / MANIFEST).is_file()
    )


def resolve(path: Path) -> Path:
    """A version directory from either a version dir or a root holding versions (newest wins)."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path
    versions = list_versions(path)
    if not versions:
        raise ArtifactError(f"no artifact at {path}: no {MANIFEST} and no versions under it")
    return path / versions[-1]


def numeric_metrics(metrics: object) -> dict[str, float]:
    """The numeric entries of one of a manifest's metrics tables; anything else is left out."""
    if not isinstance(metrics, dict):
        return {}
    out = {}
    for name, value in metrics.items():
        try:
            out[str(name)] = float(value)
        except (TypeError, ValueError):  # e.g. "n/a" written by hand or another tool
            continue
    return out


def read_manifest(path: Path) -> dict[str, Any]:
    """Parse and schema-check a version's manifest without loading arrays."""
    manifest_path = Path(path) / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{manifest_path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{manifest_path} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{manifest_path} is not a JSON object")
    schema = manifest.get("schema_version")
    if type(schema) is not int or schema not in READABLE_SCHEMAS:
        raise ArtifactError(
            f"{manifest_path}: schema_version {schema!r} is not supported (expected one of "
            f"{', '.join(map(str, READABLE_SCHEMAS))})"
        )
    for key in ("version", "files", "model", "dataset"):
        if key not in manifest:
            raise ArtifactError(f"{manifest_path}: missing key {key!r}")
    return manifest


def load_artifact(path: Path, verify: bool = True) -> Artifact:
    """Load a version (or the newest under a root), verifying checksums, dtypes and shapes."""
    path = resolve(path)
    manifest = read_manifest(path)
    files = manifest["files"]
    arrays: dict[str, np.ndarray] = {}
    expected = dict(REQUIRED_ARRAYS)
    if manifest["schema_version"] >= 2:
        expected.update(WEIGHT_ARRAYS)
    if manifest["schema_version"] >= 3:
        expected.update(HISTORY_ARRAYS)
    for name, dtype in expected.items():
        file = f"{name}.npy"
        entry = files.get(file)
        if entry is None:
            raise ArtifactError(f"{path}: manifest does not list {file}")
        full = path / file
        if not full.is_file():
            raise ArtifactError(f"{path}: {file} is missing")
        if verify and _sha256(full) != entry["sha256"]:
            raise ArtifactError(f"{path}: checksum mismatch for {file}; the artifact is corrupt")
        try:
            array = np.load(full, allow_pickle=False)
        except ValueError as exc:
            raise ArtifactError(f"{path}: {file} cannot be read: {exc}") from None
        if not str(array.dtype).startswith(dtype) or list(array.shape) != entry["shape"]:
            raise ArtifactError(
                f"{path}: {file} has dtype {array.dtype} shape {array.shape}, manifest says "
                f"{entry['dtype']} {entry['shape']}"
            )
        arrays[name] = array
    n_items, dim = arrays["item_table"].shape
    if arrays["item_vectors"].shape != (n_items, dim) or len(arrays["item_ids"]) != n_items:
        raise ArtifactError(f"{path}: item arrays disagree on the number of items or dimension")
    for sign in ("pos", "neg"):
        weights = arrays.setdefault(f"{sign}_weights", np.ones(len(arrays[f"{sign}_items"]),
                                                                np.float32))  # fmt: skip
        if len(weights) != len(arrays[f"{sign}_items"]) or not np.all(weights > 0):
            raise ArtifactError(f"{path}: {sign}_weights must be one weight > 0 per edge")
    for name, array in empty_history().items():
        arrays.setdefault(name, array)
    _check_history(path, arrays)
    return Artifact(path=path, manifest=manifest, arrays=arrays)


def empty_history() -> dict[str, np.ndarray]:
    """The logged-event arrays of a version whose graph holds no logged events."""
    out = {name: np.zeros(0, dtype) for name, dtype in HISTORY_ARRAYS.items()}
    out["log_id_offsets"] = np.zeros(1, np.int64)
    return out


def _check_history(path: Path, a: dict[str, np.ndarray]) -> None:
    """Refuse logged-event arrays that disagree with each other or with the graph."""
    n = len(a["log_seqs"])
    offsets = a["log_id_offsets"]
    per_event = [name for name in HISTORY_ARRAYS if name not in ("log_id_offsets", "log_id_bytes")]
    if any(len(a[name]) != n for name in per_event) or len(offsets) != n + 1:
        raise ArtifactError(f"{path}: the logged-event arrays disagree on their length")
    if n and (
        offsets[0] != 0 or offsets[-1] != len(a["log_id_bytes"]) or np.any(np.diff(offsets) < 0)
        or a["log_users"].min() < 0 or a["log_users"].max() >= len(a["user_ids"])
        or a["log_items"].min() < 0 or a["log_items"].max() >= len(a["item_ids"])
        or a["log_kinds"].max() >= len(KIND_CODES)
    ):  # fmt: skip
        raise ArtifactError(f"{path}: the logged-event arrays point outside the artifact")
