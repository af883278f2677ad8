"""Reading signed ``user item rating`` files into contiguous arrays; errors name file and line."""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from server.errors import DataError

SPLITS = ("train", "valid", "test")
# Ids are dense (0..n-1): the model holds n_items x n_items and per-user arrays, so an id far
# beyond the ones in use (a typo, an unmapped raw id) would ask for memory nobody has. Refused
# when the id range exceeds this many times the distinct ids, plus a slack for small datasets.
ID_RANGE_FACTOR = 2
ID_RANGE_SLACK = 1000
# Python's float() also reads "1_0", "1e1" and non-ASCII digits ("١٢"): typos that would become
# other ids (or ratings) silently. Ids are plain decimal integers; ratings plain decimals.
_ID = r"\+?[0-9]+(?:\.0*)?"
ID_TOKEN = re.compile(_ID)
_PLAIN_IDS = re.compile(rf"(?:{_ID}\n)*{_ID}")  # every id token of a file, one per line
RATING_TOKEN = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")


@dataclass(frozen=True, slots=True)
class Interactions:
    """One split as parallel arrays of dense user ids, item ids and ratings."""

    users: np.ndarray  # int32
    items: np.ndarray  # int32
    # float64, as online ratings are compared: float32 would turn 3.9999999 into a like at 4.
    ratings: np.ndarray

    def __len__(self) -> int:
        return int(self.users.shape[0])

    def positive(self, threshold: float) -> np.ndarray:
        """Boolean mask of positive interactions (rating at or above the threshold)."""
        return self.ratings >= threshold


@dataclass(frozen=True, slots=True)
class Dataset:
    """Train/valid/test splits sharing one dense id space, plus its source fingerprint."""

    train: Interactions
    valid: Interactions
    test: Interactions | None
    n_users: int
    n_items: int
    threshold: float
    fingerprint: str
    name: str


def _parse_id(token: str, path: str, line: int, what: str) -> int:
    try:
        value = float(token)
    except ValueError:
        raise DataError(path, line, f"{what} id {token!r} is not a number") from None
    if (
        math.isfinite(value)
        and value >= 0
        and value == int(value)
        and not ID_TOKEN.fullmatch(token)
    ):
        raise DataError(path, line, f"{what} id {token!r} is not a plain decimal integer")
    if math.isnan(value) or math.isinf(value):
        raise DataError(path, line, f"{what} id {token!r} is not finite")
    if value < 0:
        raise DataError(path, line, f"{what} id {token!r} is negative")
    if value != int(value):
        raise DataError(path, line, f"{what} id {token!r} is not an integer")
    if value > np.iinfo(np.int32).max:
        raise DataError(path, line, f"{what} id {token!r} is too large")
    return int(value)


def _parse_rating(token: str, path: str, line: int) -> float:
    try:
        value = float(token)
    except ValueError:
        raise DataError(path, line, f"rating {token!r} is not a number") from None
    if math.isnan(value) or math.isinf(value):
        raise DataError(path, line, f"rating {token!r} is not finite")
    if not RATING_TOKEN.fullmatch(token):
        raise DataError(path, line, f"rating {token!r} is not a plain decimal number")
    return value


def _parse_lines(lines: Sequence[str], path: str) -> Interactions:
    """Slow, exact parser that names the first bad line; used when the fast path fails."""
    users: list[int] = []
    items: list[int] = []
    ratings: list[float] = []
    for number, raw in enumerate(lines, start=1):
        fields = raw.split()
        if not fields:
            continue
        if len(fields) != 3:
            raise DataError(
                path, number, f"expected 3 fields 'user item rating', got {len(fields)}"
            )
        users.append(_parse_id(fields[0], path, number, "user"))
        items.append(_parse_id(fields[1], path, number, "item"))
        ratings.append(_parse_rating(fields[2], path, number))
    return Interactions(
        np.asarray(users, dtype=np.int32),
        np.asarray(items, dtype=np.int32),
        np.asarray(ratings, dtype=np.float64),
    )


def read_interactions(path: Path) -> Interactions:
    """Read one ``user item rating`` file; any malformed line raises DataError naming it."""
    name = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8-sig")  # a byte-order mark is not data
    except FileNotFoundError:
        raise DataError(name, None, "file does not exist") from None
    except UnicodeDecodeError as exc:
        raise DataError(name, None, f"not a UTF-8 text file ({exc.reason})") from None
    except OSError as exc:
        raise DataError(name, None, f"cannot be read: {exc.strerror or exc}") from None
    lines = text.split("\n")  # read_text already turned \r\n and \r into \n
    if not any(line.strip() for line in lines):
        raise DataError(name, None, "file is empty")
    # Fast path: one vectorised parse; on any irregularity fall back to the line-naming parser.
    tokens = text.split()
    # numpy's parse takes what float() takes: only ASCII digits, signs, points and exponents
    # reach it, and ids only when every one is plain (one regex over them all).
    plain = (
        text.isascii()
        and "_" not in text
        and all(len(ln.split()) in (0, 3) for ln in lines)
        and _PLAIN_IDS.fullmatch("\n".join(tokens[0::3] + tokens[1::3])) is not None
    )
    if plain:
        try:
            table = np.asarray(tokens, dtype=np.float64).reshape(-1, 3)
        except ValueError:
            table = None
        if table is not None:
            ids = table[:, :2]
            if (
                np.isfinite(table).all()
                and (ids >= 0).all()
                and (ids == np.floor(ids)).all()
                and (ids <= np.iinfo(np.int32).max).all()
            ):
                return Interactions(
                    np.ascontiguousarray(ids[:, 0], dtype=np.int32),
                    np.ascontiguousarray(ids[:, 1], dtype=np.int32),
                    np.ascontiguousarray(table[:, 2]),
                )
    return _parse_lines(lines, name)


def fingerprint_files(paths: Sequence[Path]) -> str:
    """A sha256 over the named files' bytes, so an artifact records exactly what it learned from."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(Path(path).name.encode())
        try:
            digest.update(Path(path).read_bytes())
        except OSError as exc:
            raise DataError(str(path), None, f"cannot be read: {exc.strerror or exc}") from None
    return digest.hexdigest()


def _check_dense(paths: Sequence[Path], parts: Sequence[Interactions]) -> None:
    """Refuse ids so sparse that the dense model arrays could not be built (see ID_RANGE_*)."""
    for kind, column in (("user", 0), ("item", 1)):
        ids = [p.users if column == 0 else p.items for p in parts]
        largest = max(int(c.max()) for c in ids)
        distinct = int(np.unique(np.concatenate(ids)).size)
        if largest + 1 <= ID_RANGE_FACTOR * distinct + ID_RANGE_SLACK:
            continue
        where = next(i for i, c in enumerate(ids) if int(c.max()) == largest)
        raise DataError(
            str(paths[where]), _line_of(paths[where], column, largest),
            f"{kind} id {largest} but only {distinct} distinct {kind} ids in use: ids must be "
            f"dense (0..n-1), renumber them",
        )  # fmt: skip


def _line_of(path: Path, column: int, value: int) -> int | None:
    """The first line whose ``column`` field is ``value`` (to name it in an error)."""
    text = Path(path).read_text(encoding="utf-8-sig")
    for number, line in enumerate(text.split("\n"), start=1):
        fields = line.split()
        if len(fields) > column and _number(fields[column]) == value:
            return number
    return None


def _number(token: str) -> float | None:
    try:
        return float(token)
    except ValueError:
        return None


def _is_file(path: Path) -> bool:
    """Whether a split file is there; a directory that cannot be looked into is named."""
    try:
        return path.is_file()
    except OSError as exc:
        raise DataError(str(path), None, f"cannot be read: {exc.strerror or exc}") from None


def load_dataset(directory: Path, threshold: float, require_test: bool = False) -> Dataset:
    """Load train/valid(/test) from a directory; missing splits and bad rows raise DataError."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(str(directory), None, "data directory does not exist")
    if not math.isfinite(threshold):
        raise DataError(str(directory), None, f"threshold {threshold} is not a finite number")
    needed = SPLITS if require_test else SPLITS[:2]
    for split in needed:
        if not _is_file(directory / f"{split}.txt"):
            raise DataError(str(directory / f"{split}.txt"), None, f"missing {split} split")
    train = read_interactions(directory / "train.txt")
    valid = read_interactions(directory / "valid.txt")
    test_path = directory / "test.txt"
    test = read_interactions(test_path) if _is_file(test_path) else None
    parts = [train, valid] + ([test] if test is not None else [])
    _check_dense([directory / f"{s}.txt" for s in SPLITS[: len(parts)]], parts)
    n_users = int(max(int(p.users.max()) for p in parts)) + 1
    n_items = int(max(int(p.items.max()) for p in parts)) + 1
    files = [directory / f"{s}.txt" for s in SPLITS[:2]]
    return Dataset(
        train=train,
        valid=valid,
        test=test,
        n_users=n_users,
        n_items=n_items,
        threshold=float(threshold),
        fingerprint=fingerprint_files(files),
        name=directory.name,
    )


class IdMap:
    """Bidirectional map between external string ids and dense int32 indices."""

    def __init__(self, external: Sequence[str] | np.ndarray) -> None:
        self._list: list[str] = [str(x) for x in external]
        self._index: dict[str, int] = {s: i for i, s in enumerate(self._list)}
        if len(self._index) != len(self._list):
            raise ValueError("IdMap has duplicate external ids")
        self._array: np.ndarray | None = None

    @classmethod
    def dense(cls, n: int) -> IdMap:
        """The map for datasets whose ids are already dense integers: id ``i`` is ``str(i)``."""
        return cls([str(i) for i in range(n)])

    def __len__(self) -> int:
        return len(self._list)

    def get(self, external: str) -> int | None:
        """The dense index of an external id, or None when unknown."""
        return self._index.get(external)

    def add(self, external: str) -> int:
        """The dense index of an external id, appending it when new (online users)."""
        index = self._index.get(external)
        if index is None:
            index = len(self._list)
            self._index[external] = index
            self._list.append(external)
            self._array = None
        return index

    def external(self, indices: np.ndarray) -> list[str]:
        """External ids for an array of dense indices (vectorised through a cached array)."""
        return self.objects()[indices].tolist()

    def objects(self) -> np.ndarray:
        """The external ids as an object array of str: no fixed width, for ``pack_ids``."""
        if self._array is None:
            self._array = np.asarray(self._list, dtype=object)
        return self._array

    def to_array(self) -> np.ndarray:
        """The external ids as a unicode array, storable with ``allow_pickle=False``."""
        return np.asarray(self._list, dtype=str)
