"""Versioned model artifacts: ``<root>/<version>/`` with ``.npy`` arrays, checksummed manifest."""

from __future__ import annotations

import errno
import hashlib
import io
import itertools
import json
import math
import os
import re
import secrets
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import msgspec
import numpy as np

from server.durable import fsync_dir
from server.errors import ArtifactError
from server.events import KIND_CODES
from server.graph import SignedGraph

# 2 added the trained graph's edge weights (feedback folded in from an event log); a version 1
# artifact is read as every edge weighing 1, which is what its trainer used. 3 added the logged
# events the graph holds, so a user's history keeps their ids and times once they are trained;
# older artifacts are read as holding none. 4 stores user ids as UTF-8 bytes and offsets
# (``USER_ID_ARRAYS``): a fixed-width unicode array gave every user the longest id's 4 bytes a
# character, so one 512-character id logged online cost 2 KB a user in the next retrained version.
SCHEMA_VERSION = 4
READABLE_SCHEMAS = (1, 2, 3, 4)
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
# Schema 4 holds the user ids (``arrays["user_ids"]`` once loaded, an object array of str) as
# user k's UTF-8 bytes at user_id_bytes[user_id_offsets[k]:user_id_offsets[k + 1]]; schemas 1-3
# as the fixed-width ``user_ids.npy``.
USER_ID_ARRAYS: dict[str, str] = {"user_id_bytes": "uint8", "user_id_offsets": "int64"}
# The arrays that make up the users and trained signed graph a live state is built on.
GRAPH_FILES = ("pos_indptr", "pos_items", "neg_indptr", "neg_items")


def _finite(owner: msgspec.Struct, *names: str) -> None:
    """Refuse NaN or infinite numbers in a manifest table (JSON from Python can hold them)."""
    for name in names:
        value = getattr(owner, name)
        if value is not msgspec.UNSET and not math.isfinite(value):
            raise ValueError(f"`{name}` must be a finite number")


# The manifest fields the code reads, with their types: ``read_manifest`` refuses a manifest
# that lacks a required one or holds a wrong type, so nothing fails on it later. Fields every
# schema (1-3) writes are required; an ``_Unset`` one may be absent (older artifacts, or only
# written sometimes) but not null or mistyped. Only checked: callers keep reading the dict.
# Unknown fields are allowed, and so is anything in ``metrics`` (read leniently, see
# ``numeric_metrics``).
_Unset = msgspec.UnsetType
_UNSET = msgspec.UNSET
_NonNegative = Annotated[float, msgspec.Meta(ge=0)]


class _FileEntry(msgspec.Struct):
    sha256: Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{64}$")]
    shape: list[Annotated[int, msgspec.Meta(ge=0)]]
    dtype: str


class _ModelEntry(msgspec.Struct):
    neg_weight: _NonNegative
    dim: Annotated[int, msgspec.Meta(ge=1)] | _Unset = _UNSET
    hyper: dict[str, Any] | _Unset = _UNSET  # checked as hyper-parameters where used

    def __post_init__(self) -> None:
        _finite(self, "neg_weight")


class _DatasetEntry(msgspec.Struct):
    threshold: float
    fingerprint: str | _Unset = _UNSET
    n_users: Annotated[int, msgspec.Meta(ge=0)] | _Unset = _UNSET
    n_items: Annotated[int, msgspec.Meta(ge=0)] | _Unset = _UNSET

    def __post_init__(self) -> None:
        _finite(self, "threshold")


class _RankingEntry(msgspec.Struct):
    suppression_gamma: _NonNegative
    propensity_beta: _NonNegative | _Unset = _UNSET  # older artifacts: none
    propensity_prior: Annotated[float, msgspec.Meta(gt=0)] | _Unset = _UNSET

    def __post_init__(self) -> None:
        _finite(self, "suppression_gamma", "propensity_beta", "propensity_prior")


class _LogEntry(msgspec.Struct):
    last_event_id: str | _Unset | None = _UNSET


class _Manifest(msgspec.Struct):
    version: str
    files: dict[str, Any]  # each entry is checked on its own, so an error names the file
    model: _ModelEntry
    dataset: _DatasetEntry
    ranking: _RankingEntry
    watermark: Annotated[int, msgspec.Meta(ge=0)] | _Unset = _UNSET
    created_at: str | _Unset = _UNSET
    log: _LogEntry | _Unset = _UNSET


def _check_manifest(manifest_path: Path, manifest: dict[str, Any]) -> None:
    """Raise ArtifactError naming the first manifest field that is missing or mistyped."""
    checks: list[tuple[str, object, type]] = [("", manifest, _Manifest)]
    files = manifest.get("files")
    if isinstance(files, dict):
        checks += [(f"files[{name!r}]", entry, _FileEntry) for name, entry in files.items()]
    for prefix, value, kind in checks:
        try:
            msgspec.convert(value, kind, strict=True)
        except msgspec.ValidationError as exc:
            field, problem = _field_problem(str(exc))
            field = ".".join(p for p in (prefix, field) if p) or "(the whole object)"
            raise ArtifactError(f"{manifest_path}: manifest field {field} {problem}") from None


def _field_problem(message: str) -> tuple[str, str]:
    """A msgspec validation message as (dotted field, "" at the top, and the problem)."""
    problem, _, where = message.rpartition(" - at `$")
    if not problem:  # no location: the top level itself
        problem, where = message, "`"
    field = where.rstrip("`").lstrip(".")
    missing = re.fullmatch(r"Object missing required field `(.+)`", problem)
    if missing:
        return ".".join(p for p in (field, missing[1]) if p), "is missing"
    named = re.fullmatch(r"`(\w+)` (.+)", problem)  # from a __post_init__ check
    if named:
        return ".".join(p for p in (field, named[1]) if p), f"is invalid: {named[2]}"
    return field, f"is invalid: {problem[0].lower()}{problem[1:]}"


def model_id_of(manifest: dict[str, Any]) -> str:
    """Which trained model a manifest describes, wherever it lies: the name it was trained under
    (unique per training run), kept by a renamed copy and changed by another model put in its
    place. Snapshots and swaps compare this, never the directory name."""
    return str(manifest["version"])


@dataclass(frozen=True, slots=True)
class Artifact:
    """A loaded, verified artifact: its manifest and arrays."""

    path: Path
    manifest: dict[str, Any]
    arrays: dict[str, np.ndarray]
    # sha256 of the user ids as ``pack_ids`` lays them out, whatever the schema stored them as.
    users_digest: str

    @property
    def version(self) -> str:
        """The version: its directory's name, which reload and rollback take (the manifest's
        ``version`` is the name it was trained under, kept when a copy is renamed)."""
        return Path(os.path.abspath(self.path)).name

    @property
    def model_id(self) -> str:
        """Which trained model this is (see :func:`model_id_of`)."""
        return model_id_of(self.manifest)

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
        """Digest of the user ids (by content: a schema 3 and a schema 4 copy of one graph agree)
        and the trained signed graph (from the verified file checksums)."""
        files = self.manifest["files"]
        digest = hashlib.sha256(str(self.manifest.get("watermark", 0)).encode())
        digest.update(self.users_digest.encode())
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


def pack_ids(ids: Sequence[str] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Strings as one uint8 array of their UTF-8 bytes and int64 offsets (one more than ids)."""
    encoded = [str(x).encode() for x in ids]
    offsets = np.zeros(len(encoded) + 1, np.int64)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    return np.frombuffer(b"".join(encoded), np.uint8).copy(), offsets


def unpack_ids(data: np.ndarray, offsets: np.ndarray) -> list[str]:
    """The strings ``pack_ids`` packed; ValueError if the arrays do not hold such strings."""
    if len(offsets) == 0 or offsets[0] != 0 or offsets[-1] != len(data):
        raise ValueError("the offsets do not span the bytes")
    if np.any(np.diff(offsets) < 0):
        raise ValueError("the offsets decrease")
    blob, bounds = data.tobytes(), offsets.tolist()
    try:
        return [blob[a:b].decode() for a, b in itertools.pairwise(bounds)]
    except UnicodeDecodeError as exc:
        raise ValueError(f"an id is not UTF-8 ({exc.reason})") from None


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
    users = arrays.pop("user_ids")
    arrays["user_id_bytes"], arrays["user_id_offsets"] = pack_ids(users)
    root = Path(root)
    chosen = version is not None
    version = version or new_version()
    if chosen and (root / version).exists():
        raise ArtifactError(f"artifact version {root / version} already exists")
    # The root and any parents this call creates, deepest first: removed again on failure.
    created = [p for p in (root, *root.parents) if not p.exists()]
    tmp: Path | None = None
    final: Path | None = None
    try:
        tmp = _new_temp_dir(root, version)
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
        _write_manifest(tmp, body)
        for path in tmp.iterdir():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
        fsync_dir(tmp)
        final = _publish(tmp, root, body, chosen)
        tmp = None
        fsync_dir(root)
        return final
    except BaseException as exc:
        # Nothing of a failed save stays behind: not its temp dir, not a version whose name may
        # not survive a crash (its root's fsync failed), not the directories it created.
        for leftover in (tmp, final):
            if leftover is not None:
                shutil.rmtree(leftover, ignore_errors=True)
        for directory in created:
            try:
                directory.rmdir()  # only if empty: another writer may be using it
            except OSError:
                break
        if isinstance(exc, OSError):
            code = errno.errorcode.get(exc.errno or 0, str(exc.errno))
            raise ArtifactError(
                f"cannot write a new artifact version under {root}: {exc.strerror or exc} ({code})"
            ) from None
        raise


# How many names a save tries before giving up (each try is a collision with another writer).
_NAME_ATTEMPTS = 100


def _new_temp_dir(root: Path, version: str) -> Path:
    """A fresh temp dir under ``root`` that no other writer shares (a dot name: never listed)."""
    for _ in range(_NAME_ATTEMPTS):
        # Created here (not tempfile.mkdtemp) so the published version gets the umask's mode,
        # not 0700. Made in the loop: a concurrent failed save may remove an empty root.
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".{version}.{secrets.token_hex(6)}.tmp"
        try:
            tmp.mkdir()
        except (FileExistsError, FileNotFoundError):
            continue
        return tmp
    raise ArtifactError(f"cannot create a temp dir under {root}")


def _write_manifest(directory: Path, body: dict[str, Any]) -> None:
    """Write (or replace) a temp dir's manifest and fsync it."""
    path = directory / MANIFEST
    with path.open("w") as handle:
        handle.write(json.dumps(body, indent=2, sort_keys=True))
        handle.flush()
        os.fsync(handle.fileno())


def _publish(tmp: Path, root: Path, body: dict[str, Any], chosen: bool) -> Path:
    """Rename a complete temp dir to its version name; a name another writer took first is
    refused when the caller chose it, else the next free name is used (same millisecond)."""
    base = body["version"]
    for attempt in range(_NAME_ATTEMPTS):
        # "-01".."-99" sort after the name and before the next millisecond's.
        version = base if attempt == 0 else f"{base}-{attempt:02d}"
        final = root / version
        if final.exists():  # rename would replace an empty dir: never reuse a name that is there
            if chosen:
                raise ArtifactError(f"artifact version {final} already exists")
            continue
        if version != body["version"]:
            body["version"] = version
            _write_manifest(tmp, body)
            fsync_dir(tmp)
        try:
            # Atomic; refused (ENOTEMPTY/EEXIST) when another writer published this name first.
            os.rename(tmp, final)
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            if chosen:
                raise ArtifactError(f"artifact version {final} already exists") from None
            continue
        return final
    raise ArtifactError(f"no free version name under {root} after {base!r}")


def list_versions(root: Path) -> list[str]:
    """Versions under a root that have a manifest, oldest first (the last is the newest a
    plain load or reload takes); directories that cannot be looked into are not among them."""
    return scan_root(root)[0]


def scan_root(root: Path) -> tuple[list[str], list[str]]:
    """A root's versions (as :func:`list_versions`) and the directories under it that cannot be
    looked into (a version this user may not read, or a volume's lost+found): listed as
    unusable, never taken as the newest version."""
    root = Path(root)
    try:
        if not root.is_dir():
            return [], []
        entries = [p for p in root.iterdir() if not p.name.startswith(".")]
    except OSError as exc:  # e.g. a root this user may not read
        raise ArtifactError(f"cannot read artifact root {root}: {exc.strerror or exc}") from None
    versions, unreadable = [], []
    for entry in entries:
        try:
            if entry.is_dir() and (entry / MANIFEST).is_file():
                versions.append(entry.name)
        except OSError:  # one such entry must not hide the root's versions
            unreadable.append(entry.name)
    return sorted(versions), sorted(unreadable)


def is_version(path: Path) -> bool:
    """True for a version directory (it holds a manifest), false for a root of versions (or a
    directory that cannot be looked into: reading it as a root then names the problem)."""
    try:
        return (Path(path) / MANIFEST).is_file()
    except OSError:
        return False


def root_of(path: Path) -> Path:
    """The artifact root a path names: a version directory's parent, or the root itself."""
    return path.parent if is_version(path) else path


def resolve(path: Path) -> Path:
    """A version directory from either a version dir or a root holding versions (newest wins)."""
    path = Path(path)
    try:
        if (path / MANIFEST).is_file():
            return path
    except OSError as exc:
        raise ArtifactError(f"cannot read artifact {path}: {exc.strerror or exc}") from None
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
    except OSError as exc:  # permissions, a directory in its place, I/O errors
        raise ArtifactError(f"{manifest_path} cannot be read: {exc.strerror or exc}") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{manifest_path} is not a JSON object")
    schema = manifest.get("schema_version")
    if type(schema) is not int or schema not in READABLE_SCHEMAS:
        raise ArtifactError(
            f"{manifest_path}: schema_version {schema!r} is not supported (expected one of "
            f"{', '.join(map(str, READABLE_SCHEMAS))})"
        )
    _check_manifest(manifest_path, manifest)
    return manifest


def expected_arrays(schema_version: int) -> dict[str, str]:
    """The arrays (name -> dtype prefix) a version of this schema must hold."""
    expected = dict(REQUIRED_ARRAYS)
    if schema_version >= 2:
        expected.update(WEIGHT_ARRAYS)
    if schema_version >= 3:
        expected.update(HISTORY_ARRAYS)
    if schema_version >= 4:
        del expected["user_ids"]
        expected.update(USER_ID_ARRAYS)
    return expected


def missing_files(path: Path, manifest: dict[str, Any]) -> list[str]:
    """The array files a version needs that its manifest does not list or its directory lacks
    (presence only: checksums would read every array)."""
    missing = []
    for name in expected_arrays(manifest["schema_version"]):
        file = f"{name}.npy"
        try:
            present = file in manifest["files"] and (Path(path) / file).is_file()
        except OSError:  # unreadable directory, a name the filesystem refuses
            present = False
        if not present:
            missing.append(file)
    return missing


def inspect_version(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """A version's manifest (None if unreadable) and why it cannot serve (None when nothing
    is found wrong): what a listing can tell without reading every array's checksum."""
    try:
        manifest = read_manifest(path)
    except ArtifactError as exc:
        return None, exc.message
    missing = missing_files(path, manifest)
    return manifest, (f"{', '.join(missing)} missing" if missing else None)


def load_artifact(path: Path, verify: bool = True) -> Artifact:
    """Load a version (or the newest under a root), verifying checksums, dtypes and shapes."""
    path = resolve(path)
    manifest = read_manifest(path)
    files = manifest["files"]
    arrays: dict[str, np.ndarray] = {}
    for name, dtype in expected_arrays(manifest["schema_version"]).items():
        file = f"{name}.npy"
        entry = files.get(file)
        if entry is None:
            raise ArtifactError(f"{path}: manifest does not list {file}")
        full = path / file
        try:
            if not full.is_file():
                raise ArtifactError(f"{path}: {file} is missing")
            if verify and _sha256(full) != entry["sha256"]:
                raise ArtifactError(
                    f"{path}: checksum mismatch for {file}; the artifact is corrupt"
                )
            array = np.load(full, allow_pickle=False)
        except OSError as exc:  # permissions, I/O errors
            raise ArtifactError(f"{path}: {file} cannot be read: {exc.strerror or exc}") from None
        except ValueError as exc:
            raise ArtifactError(f"{path}: {file} cannot be read: {exc}") from None
        if not str(array.dtype).startswith(dtype) or list(array.shape) != entry["shape"]:
            raise ArtifactError(
                f"{path}: {file} has dtype {array.dtype} shape {array.shape}, manifest says "
                f"{entry['dtype']} {entry['shape']}"
            )
        arrays[name] = array
    if "user_id_bytes" in arrays:
        packed = arrays.pop("user_id_bytes"), arrays.pop("user_id_offsets")
        try:
            users = unpack_ids(*packed)
        except ValueError as exc:
            raise ArtifactError(f"{path}: the user ids cannot be read: {exc}") from None
        arrays["user_ids"] = np.asarray(users, dtype=object)
    else:
        packed = pack_ids(arrays["user_ids"])
    users_digest = hashlib.sha256(packed[1].tobytes() + packed[0].tobytes()).hexdigest()
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
    return Artifact(path=path, manifest=manifest, arrays=arrays, users_digest=users_digest)


def read_ids(path: Path) -> tuple[list[str], list[str]]:
    """A version's (or a root's newest) external user and item ids, without loading the rest
    (load generators and benchmarks need only these; nothing is verified)."""
    path = resolve(path)
    try:
        items = [str(x) for x in np.load(path / "item_ids.npy", allow_pickle=False).tolist()]
        if (path / "user_ids.npy").is_file():  # schemas 1-3
            return np.load(path / "user_ids.npy", allow_pickle=False).tolist(), items
        packed = [np.load(path / f"{name}.npy", allow_pickle=False) for name in USER_ID_ARRAYS]
        return unpack_ids(*packed), items
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{path}: the ids cannot be read: {exc}") from None


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
