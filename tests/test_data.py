"""Reading signed ``user item rating`` files: round trips, errors naming file and line, IdMap."""

from __future__ import annotations

import io
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.config import EventWeights
from server.data import IdMap, load_dataset, read_interactions
from server.errors import DataError
from server.feedback import rating_strength
from tests.conftest import format_rows, synthetic_rows

if TYPE_CHECKING:
    from conftest import TinyDataset

REPO = Path(__file__).resolve().parent.parent
THRESHOLD = 4.0
Line = tuple[str, tuple[int, int, float] | None]

FILE_SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

# -- strategies --------------------------------------------------------------------------------
ids = st.integers(min_value=0, max_value=50_000)
ratings = st.one_of(
    st.integers(min_value=-5, max_value=5).map(float),
    st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False, width=32),
)
separators = st.sampled_from([" ", "\t", "  ", " \t "])


def _id_text(value: int) -> st.SearchStrategy[str]:
    # An integer id may be written as an integer, or as a float with an integral value.
    return st.sampled_from([str(value), f"{value}.0", f"{value:.2f}"])


@st.composite
def valid_line(draw: st.DrawFn) -> Line:
    """One well-formed line and the row it holds (None for a blank line)."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.sampled_from(["", " ", "\t", "   "])), None
    user, item, rating = draw(ids), draw(ids), draw(ratings)
    sep = draw(separators)
    rating_text = draw(st.sampled_from([repr(rating), f"{rating:.6g}", f"{rating:.2f}"]))
    row = (user, item, float(rating_text))
    lead = draw(st.sampled_from(["", " "]))
    line = lead + sep.join([draw(_id_text(user)), draw(_id_text(item)), rating_text])
    return line, row


def _not_a_float(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return True
    return False


words = st.text(
    alphabet=st.characters(categories=["L", "N", "P", "S"]), min_size=1, max_size=8
).filter(_not_a_float)
nan_tokens = st.sampled_from(["nan", "NaN", "-nan", "NAN"])
inf_tokens = st.sampled_from(["inf", "-inf", "Infinity", "+inf", "1e999"])
negative_ids = st.integers(min_value=1, max_value=10**6).map(lambda v: f"-{v}")
# Plain ASCII that float() reads as a whole number but is no plain id: numpy's fast parse
# took these as ids 0, 0, 5 and 5 while the line parser refused them.
odd_ascii_ids = st.sampled_from(["-0", ".0", "5.0000000000000001", "5e0"])
odd_numbers = st.sampled_from(["1_0", "1_000", "\u0661\u0662", "\uff11", "2_5.0"])
odd_ratings = st.sampled_from(["\u0663.5", "3_5.5"])
fractional_ids = st.builds(
    lambda whole, frac: f"{whole}.{frac}", st.integers(0, 999), st.sampled_from(["5", "25", "001"])
)


@st.composite
def malformed_line(draw: st.DrawFn) -> tuple[str, str]:
    """One bad line and a fragment its error message must contain."""
    kinds = ["columns", "word", "nan", "inf", "negative", "fraction", "big", "odd"]
    kind = draw(st.sampled_from(kinds))
    fields = [str(draw(ids)), str(draw(ids)), str(draw(st.integers(1, 5)))]
    if kind == "columns":
        n = draw(st.sampled_from([1, 2, 4, 5, 7]))
        cells = [str(draw(st.integers(0, 9))) for _ in range(n)]
        return draw(separators).join(cells), f"expected 3 fields 'user item rating', got {n}"
    if kind in ("word", "nan", "inf"):
        column = draw(st.integers(0, 2))
        token = draw({"word": words, "nan": nan_tokens, "inf": inf_tokens}[kind])
        fields[column] = token
        what = ("user id", "item id", "rating")[column]
        problem = "is not a number" if kind == "word" else "is not finite"
        return " ".join(fields), f"{what} {token!r} {problem}"
    if kind == "odd":  # float() reads these as numbers; as data they are typos
        column = draw(st.integers(0, 2))
        fields[column] = token = draw(odd_numbers | (odd_ratings if column == 2 else odd_ascii_ids))
        what = ("user id", "item id", "rating")[column]
        problem = "is not a plain decimal " + ("number" if column == 2 else "integer")
        return " ".join(fields), f"{what} {token!r} {problem}"
    column = draw(st.integers(0, 1))
    what = ("user id", "item id")[column]
    token, problem = {
        "negative": (draw(negative_ids), "is negative"),
        "fraction": (draw(fractional_ids), "is not an integer"),
        "big": (str(2**31 + draw(st.integers(0, 10**6))), "is too large"),
    }[kind]
    fields[column] = token
    return " ".join(fields), f"{what} {token!r} {problem}"


def _rows_of(lines: list[Line]) -> list[tuple[int, int, float]]:
    return [row for _, row in lines if row is not None]


# -- reading files -----------------------------------------------------------------------------
@FILE_SETTINGS
@given(
    lines=st.lists(valid_line(), min_size=1, max_size=40),
    newline=st.sampled_from(["\n", "\r\n"]),
)
def test_valid_file_round_trips(tmp_path: Path, lines: list[Line], newline: str) -> None:
    rows = _rows_of(lines)
    path = tmp_path / "split.txt"
    path.write_bytes(newline.join(text for text, _ in lines).encode() + newline.encode())
    if not rows:
        with pytest.raises(DataError, match="file is empty"):
            read_interactions(path)
        return
    got = read_interactions(path)
    assert len(got) == len(rows)
    assert got.users.dtype == np.int32
    assert got.items.dtype == np.int32
    assert got.ratings.dtype == np.float64
    np.testing.assert_array_equal(got.users, [r[0] for r in rows])
    np.testing.assert_array_equal(got.items, [r[1] for r in rows])
    np.testing.assert_array_equal(got.ratings, [r[2] for r in rows])


@FILE_SETTINGS
@given(
    lines=st.lists(valid_line(), max_size=40),
    bad=malformed_line(),
    position=st.integers(min_value=0, max_value=40),
)
def test_one_malformed_line_is_named_exactly(
    tmp_path: Path,
    lines: list[Line],
    bad: tuple[str, str],
    position: int,
) -> None:
    bad_line, fragment = bad
    position = min(position, len(lines))
    texts = [text for text, _ in lines]
    texts.insert(position, bad_line)
    path = tmp_path / "train.txt"
    path.write_text("\n".join(texts) + "\n")
    with pytest.raises(DataError) as caught:
        read_interactions(path)
    error = caught.value
    assert error.code == "invalid_data"
    assert error.detail["file"] == str(path)
    assert error.detail["line"] == position + 1
    assert error.message.startswith(f"{path}:{position + 1}: ")
    assert fragment in error.detail["problem"]
    assert error.message == f"{path}:{position + 1}: {error.detail['problem']}"


def test_compensating_column_counts_are_not_realigned(tmp_path: Path) -> None:
    # 2 + 4 fields make 6 tokens for 2 lines: a token count alone would shift fields silently.
    path = tmp_path / "train.txt"
    path.write_text("0 0 5\n1 2\n3 4 5 6\n")
    with pytest.raises(DataError) as caught:
        read_interactions(path)
    assert caught.value.detail["line"] == 2
    assert "got 2" in caught.value.detail["problem"]


@pytest.mark.parametrize("odd", ["\x0c", "\x0b", "\x1c", "\x85", "\u2028"])
def test_line_numbers_count_newlines_only(tmp_path: Path, odd: str) -> None:
    # Form feeds and Unicode line separators are whitespace inside a line, not line breaks.
    path = tmp_path / "train.txt"
    path.write_text(f"0 0 5\n1{odd}1 4\n2 2 x\n")
    with pytest.raises(DataError) as caught:
        read_interactions(path)
    assert caught.value.detail["line"] == 3
    assert "rating 'x'" in caught.value.detail["problem"]


@pytest.mark.parametrize("text", ["", "\n", " \n\t\n\n"])
def test_empty_file_is_refused(tmp_path: Path, text: str) -> None:
    path = tmp_path / "valid.txt"
    path.write_text(text)
    with pytest.raises(DataError) as caught:
        read_interactions(path)
    assert caught.value.detail == {"file": str(path), "line": None, "problem": "file is empty"}
    assert caught.value.message == f"{path}: file is empty"


def test_missing_and_undecodable_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    with pytest.raises(DataError, match="does not exist") as caught:
        read_interactions(missing)
    assert caught.value.detail["file"] == str(missing)
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"0 0 5\n\xff\xfe 1 1\n")
    with pytest.raises(DataError, match="not a UTF-8 text file") as caught:
        read_interactions(binary)
    assert caught.value.detail["file"] == str(binary)


def test_a_byte_order_mark_is_not_data(tmp_path: Path) -> None:
    path = tmp_path / "bom.txt"
    path.write_bytes(b"\xef\xbb\xbf0 1 5\n2 3 1\n")
    rows = read_interactions(path)
    assert (rows.users.tolist(), rows.items.tolist()) == ([0, 2], [1, 3])


def test_an_unreadable_file_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A permission or I/O error reading a split is a DataError naming it, not a traceback
    (the tests run as root, so the error is injected)."""
    path = tmp_path / "train.txt"
    path.write_text("0 0 5\n")

    def refused(self: Path, *args: object, **kwargs: object) -> str:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_text", refused)
    with pytest.raises(DataError, match="cannot be read: Permission denied") as caught:
        read_interactions(path)
    assert caught.value.detail["file"] == str(path)


@pytest.mark.parametrize("column", ["user", "item"])
@pytest.mark.parametrize("token", ["2000000", "0002000000", "+2000000", "2000000.0"])
def test_an_id_far_beyond_the_ids_in_use_is_refused_by_line(
    dataset_factory: Callable[..., Path], column: str, token: str
) -> None:
    """Ids are dense: one of 2,000,000 among a few dozen would make the model allocate
    terabytes. The error names the file and line of the largest id, however it is written."""
    rows = synthetic_rows()["train"]
    row = f"0 {token} 5" if column == "item" else f"{token} 0 5"
    directory = dataset_factory(train=format_rows(rows) + row + "\n")
    with pytest.raises(DataError, match=f"{column} id 2000000 but only") as caught:
        load_dataset(directory, THRESHOLD)
    assert caught.value.detail["file"] == str(directory / "train.txt")
    assert caught.value.detail["line"] == len(rows) + 1


# -- datasets ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "token", ["3.9999999", "3.99999999999", "4", "4.0000001", "1e300", "-1e300", "3"]
)
def test_a_file_rating_takes_the_sign_an_online_rating_would(tmp_path: Path, token: str) -> None:
    # Parsed as float32, 3.9999999 became 4.0: a like in training, a dislike on the webhook.
    path = tmp_path / "split.txt"
    path.write_text(f"0 0 {token}\n")
    offline = bool(read_interactions(path).positive(4.0)[0])
    online = rating_strength(float(token), 4.0, EventWeights()) > 0
    assert offline == online == (float(token) >= 4.0)


def test_load_dataset_round_trips_the_tiny_dataset(tiny_dataset: TinyDataset) -> None:
    dataset = load_dataset(tiny_dataset.path, THRESHOLD, require_test=True)
    assert dataset.n_users == tiny_dataset.n_users
    assert dataset.n_items == tiny_dataset.n_items
    assert dataset.threshold == THRESHOLD == tiny_dataset.threshold
    assert dataset.name == tiny_dataset.path.name
    for split in ("train", "valid", "test"):
        part = getattr(dataset, split)
        rows = np.asarray(tiny_dataset.rows[split])
        np.testing.assert_array_equal(part.users, rows[:, 0].astype(np.int32))
        np.testing.assert_array_equal(part.items, rows[:, 1].astype(np.int32))
        np.testing.assert_array_equal(part.ratings, rows[:, 2])
        np.testing.assert_array_equal(part.positive(THRESHOLD), rows[:, 2] >= THRESHOLD)
    assert len(dataset.fingerprint) == 64
    assert dataset.fingerprint == load_dataset(tiny_dataset.path, THRESHOLD).fingerprint


def test_fingerprint_follows_the_files(dataset_factory: Callable[..., Path]) -> None:
    first = load_dataset(dataset_factory("a"), THRESHOLD)
    same = load_dataset(dataset_factory("b"), THRESHOLD)
    assert first.fingerprint == same.fingerprint
    changed = dataset_factory("c", train="0 0 5\n47 31 1\n")
    assert load_dataset(changed, THRESHOLD).fingerprint != first.fingerprint


def test_test_split_is_optional_unless_required(dataset_factory: Callable[..., Path]) -> None:
    directory = dataset_factory()
    (directory / "test.txt").unlink()
    assert load_dataset(directory, THRESHOLD).test is None
    with pytest.raises(DataError) as caught:
        load_dataset(directory, THRESHOLD, require_test=True)
    assert caught.value.detail["file"] == str(directory / "test.txt")
    assert caught.value.detail["problem"] == "missing test split"


@pytest.mark.parametrize("split", ["train", "valid"])
def test_missing_split_is_refused(dataset_factory: Callable[..., Path], split: str) -> None:
    directory = dataset_factory()
    (directory / f"{split}.txt").unlink()
    with pytest.raises(DataError) as caught:
        load_dataset(directory, THRESHOLD)
    assert caught.value.detail["file"] == str(directory / f"{split}.txt")
    assert caught.value.detail["line"] is None
    assert caught.value.detail["problem"] == f"missing {split} split"


def test_missing_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError) as caught:
        load_dataset(tmp_path / "absent", THRESHOLD)
    assert caught.value.detail["file"] == str(tmp_path / "absent")
    assert "does not exist" in caught.value.message


def test_bad_line_in_any_split_is_named(dataset_factory: Callable[..., Path]) -> None:
    text = "0 0 5.00\n1 1 4.00\n2 two 1\n"
    for split in ("train", "valid", "test"):
        directory = dataset_factory(split, **{split: text})
        with pytest.raises(DataError) as caught:
            load_dataset(directory, THRESHOLD, require_test=True)
        path = directory / f"{split}.txt"
        assert caught.value.message == f"{path}:3: item id 'two' is not a number"


@pytest.mark.parametrize("threshold", [math.nan, math.inf, -math.inf])
def test_a_threshold_that_is_not_finite_is_refused(
    tiny_dataset: TinyDataset, threshold: float
) -> None:
    # -inf made every rating a like and a manifest with "-Infinity" no command could load.
    with pytest.raises(DataError, match=r"threshold .* is not a finite number"):
        load_dataset(tiny_dataset.path, threshold)


@pytest.mark.parametrize("token", ["1e1", "1E1", "0.1e2"])
def test_an_id_with_an_exponent_is_refused_by_line(tmp_path: Path, token: str) -> None:
    path = tmp_path / "train.txt"
    path.write_text(f"0 0 5\n1 1 1e0\n{token} 2 5\n3 {token} 5\n")
    with pytest.raises(DataError, match=f"user id '{token}' is not a plain decimal integer") as e:
        read_interactions(path)
    assert e.value.detail["line"] == 3
    path.write_text(f"0 0 5\n3 {token} 5\n")
    with pytest.raises(DataError, match=f"item id '{token}' is not a plain"):
        read_interactions(path)


def test_shared_datasets_load_with_the_published_counts(shared_datasets: Path) -> None:
    # The counts of ../shared/datasets/README.md's table.
    expected = {
        "amazon-music": (3472, 2498, 34915, 4986, 9974),
        "kuairand": (16974, 4373, 184172, 26309, 52619),
    }
    for name, (users, items, train, valid, test) in expected.items():
        dataset = load_dataset(shared_datasets / name, 4.0 if name == "amazon-music" else 1.0)
        assert dataset.test is not None
        sizes = (len(dataset.train), len(dataset.valid), len(dataset.test))
        assert (dataset.n_users, dataset.n_items, *sizes) == (users, items, train, valid, test)


def test_cli_train_on_bad_data_exits_2_and_writes_nothing(
    dataset_factory: Callable[..., Path], tmp_path: Path
) -> None:
    directory = dataset_factory(valid="0 0 5\n1 1 4\n2 2 nan\n3 3 4\n")
    out = tmp_path / "artifacts"
    result = subprocess.run(
        [sys.executable, "-m", "server.cli", "train", "--data", str(directory),
         "--threshold", "4", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    expected = f"{directory / 'valid.txt'}:3: rating 'nan' is not finite"
    assert expected in result.stderr
    assert f"signedrec train: error: {expected}" in result.stderr.splitlines()
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    assert not out.exists() or not any(out.iterdir())


# -- IdMap -------------------------------------------------------------------------------------
# numpy's fixed-width unicode arrays cannot hold trailing NUL characters (see the xfail below).
text_ids = st.text(alphabet=st.characters(exclude_characters="\x00"), max_size=12)


@settings(max_examples=200, deadline=None)
@given(external=st.lists(text_ids, unique=True, max_size=30), new=st.lists(text_ids, max_size=10))
def test_idmap_round_trips_through_npy(external: list[str], new: list[str]) -> None:
    idmap = IdMap(external)
    array = idmap.to_array()
    assert array.dtype.kind == "U"
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    buffer.seek(0)
    loaded = IdMap(np.load(buffer, allow_pickle=False))
    assert len(loaded) == len(external)
    assert loaded.external(np.arange(len(external))) == external
    for index, name in enumerate(external):
        assert loaded.get(name) == index
    # New ids are appended in order; known ones keep their index; lookups see the additions.
    assert loaded.external(np.arange(len(loaded))) == external  # fills the cache before adds
    expected = list(external)
    for name in new:
        if name not in expected:
            expected.append(name)
        assert loaded.add(name) == expected.index(name)
    assert len(loaded) == len(expected)
    assert loaded.external(np.arange(len(expected))) == expected
    assert loaded.to_array().tolist() == expected


def test_idmap_basics() -> None:
    idmap = IdMap.dense(3)
    assert idmap.external(np.array([2, 0])) == ["2", "0"]
    assert idmap.get("1") == 1
    assert idmap.get("3") is None
    assert idmap.add("u-new") == 3
    assert idmap.add("u-new") == 3
    assert idmap.get("u-new") == 3
    assert len(idmap) == 4
    assert IdMap([]).to_array().shape == (0,)
    with pytest.raises(ValueError, match="duplicate"):
        IdMap(["a", "b", "a"])


def test_idmap_array_drops_trailing_nul_so_ids_with_nul_are_refused_at_the_log() -> None:
    # Why the event log refuses NUL in ids (test_events): numpy unicode arrays lose trailing NULs.
    assert IdMap(["a\x00", "a"]).to_array().tolist() == ["a", "a"]
