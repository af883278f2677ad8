"""The CLI's one-line refusals of unusable paths and data, and version listings of odd manifests."""

from __future__ import annotations

import asyncio
import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from server.artifacts import list_versions, resolve
from server.cli import main
from server.config import load_config
from server.service import Service
from tests.conftest import (
    THRESHOLD,
    TINY_MODEL_TOML,
    TinyDataset,
    format_rows,
    known_training_warnings_ignored,
    synthetic_rows,
)


def _one_error_line(capsys: pytest.CaptureFixture[str], command: str) -> str:
    """The last stderr line, which must be the CLI's `signedrec CMD: error: ...`."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"signedrec {command}: error: "), err
    return line


def _train_args(dataset: TinyDataset, out: Path, *extra: str) -> list[str]:
    """`signedrec train` on the tiny dataset into ``out``."""
    return ["train", "--data", str(dataset.path), "--threshold", str(dataset.threshold),
            "--out", str(out), *extra]  # fmt: skip


@pytest.mark.parametrize("where", ["file", "file/below"])
def test_train_refuses_an_out_that_cannot_be_a_directory_before_training(
    where: str,
    tiny_dataset: TinyDataset,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (tmp_path / "file").write_text("not a directory\n")

    def no_training(*args: object, **kwargs: object) -> Path:
        raise AssertionError("trained although --out cannot be written")

    monkeypatch.setattr("server.train.train", no_training)
    out = tmp_path / where
    code = main(_train_args(tiny_dataset, out))
    assert code == 2
    line = _one_error_line(capsys, "train")
    assert f"--out {out}" in line
    assert "is not a directory" in line
    assert (tmp_path / "file").read_text() == "not a directory\n"


def test_evaluate_with_no_positive_in_the_split_is_one_line(
    tiny_artifact: Path, tiny_dataset: TinyDataset, capsys: pytest.CaptureFixture[str]
) -> None:
    # The tiny dataset's ratings are 1, 2, 4 and 5: none reaches 6.
    code = main(["evaluate", "--artifact", str(tiny_artifact), "--data", str(tiny_dataset.path),
                 "--split", "valid", "--threshold", "6"])  # fmt: skip
    assert code == 2
    line = _one_error_line(capsys, "evaluate")
    assert str(tiny_dataset.path / "valid.txt") in line
    assert "valid split" in line
    assert ">= 6" in line


def _root_with_an_odd_manifest(tiny_artifact: Path, root: Path) -> Path:
    """v1 as trained; v2 the same arrays with a hand-edited, non-numeric test metric."""
    for version in ("v1", "v2"):
        shutil.copytree(tiny_artifact, root / version)
        manifest = json.loads((root / version / "manifest.json").read_text())
        manifest["version"] = version
        if version == "v2":
            manifest["metrics"]["test"]["ndcg@20"] = "n/a"
            manifest["metrics"]["test"]["recall@20"] = None
        (root / version / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_versions_lists_a_non_numeric_metric_as_nan(
    tiny_artifact: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _root_with_an_odd_manifest(tiny_artifact, tmp_path / "root")
    assert main(["versions", str(root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["v1", "v2"]
    assert "ndcg@20(test)=nan" not in lines[0]
    assert "ndcg@20(test)=nan" in lines[1]


def test_versions_lists_an_unusable_version_and_goes_on(
    tiny_artifact: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A version whose manifest is damaged is listed as unusable, with why; the others still
    show (an operator looks at the listing to find exactly that kind of version)."""
    root = tmp_path / "root"
    for name in ("v1", "v2"):
        shutil.copytree(tiny_artifact, root / name)
    manifest = json.loads((root / "v1" / "manifest.json").read_text())
    manifest["watermark"] = "abc"
    (root / "v1" / "manifest.json").write_text(json.dumps(manifest))
    assert main(["versions", str(root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["v1", "v2"]
    assert "unusable" in lines[0]
    assert "watermark" in lines[0]
    assert "ndcg@20(test)=" in lines[1]


def test_versions_of_a_version_dir_lists_its_roots(
    tiny_artifact: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """Not an empty listing (which reads as "no versions"): the versions beside it."""
    root = tmp_path / "root"
    for name in ("v1", "v2"):
        shutil.copytree(tiny_artifact, root / name)
    monkeypatch.chdir(root / "v1")
    for given in (str(root / "v2"), "."):
        assert main(["versions", given]) == 0
        assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == ["v1", "v2"]


def test_versions_lists_a_version_missing_an_array_as_unusable(
    tiny_artifact: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A version that lost a file (a partial copy) is what reload refuses: listed as such."""
    root = tmp_path / "root"
    for name in ("v1", "v2", "v3"):
        shutil.copytree(tiny_artifact, root / name)
    (root / "v2" / "item_ids.npy").unlink()
    # Gone from the manifest too: still an array every version needs.
    manifest = json.loads((root / "v3" / "manifest.json").read_text())
    del manifest["files"]["item_table.npy"]
    (root / "v3" / "manifest.json").write_text(json.dumps(manifest))
    (root / "v3" / "item_table.npy").unlink()
    assert main(["versions", str(root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "ndcg@20(test)=" in lines[0]
    assert lines[1:] == ["v2 unusable: item_ids.npy missing", "v3 unusable: item_table.npy missing"]


@pytest.mark.parametrize("case", ["out is a version", "hyper-from is corrupt"])
def test_train_refuses_a_version_as_out_and_a_corrupt_hyper_from_before_training(
    case: str,
    tiny_artifact: Path,
    tiny_dataset: TinyDataset,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A version written inside a version is found by nothing; a corrupt source of
    hyper-parameters is refused like any corrupt artifact a command is given."""

    def no_training(*args: object, **kwargs: object) -> Path:
        raise AssertionError("trained anyway")

    monkeypatch.setattr("server.train.train", no_training)
    source = tmp_path / "root" / "v1"
    shutil.copytree(tiny_artifact, source)
    if case == "out is a version":
        code, expected = main(_train_args(tiny_dataset, source)), "is an artifact version"
    else:
        with (source / "item_table.npy").open("ab") as handle:
            handle.write(b"rot")
        out = tmp_path / "out"
        code = main(_train_args(tiny_dataset, out, "--hyper-from", str(source)))
        expected = "checksum mismatch"
    assert code == 2
    assert expected in _one_error_line(capsys, "train")
    assert sorted(p.name for p in (tmp_path / "root").iterdir()) == ["v1"]


def test_describe_leaves_out_non_numeric_metrics(tiny_artifact: Path, tmp_path: Path) -> None:
    """What GET /v1/model answers: every version, with only its numeric metrics."""
    root = _root_with_an_odd_manifest(tiny_artifact, tmp_path / "root")
    service = Service(root, tmp_path / "state", load_config(env={"SIGNEDREC_KERNELS__BACKEND":
                                                                 "cpu"}))  # fmt: skip
    service.state = service.load()
    try:
        described = asyncio.run(service.describe())
    finally:
        if service.state.log is not None:
            service.state.log.close_sync()
    assert described.active == "v2"
    by_version = {v.version: v.metrics for v in described.versions}
    assert set(by_version) == {"v1", "v2"}
    assert "ndcg@20" in by_version["v1"]
    assert "ndcg@20" not in by_version["v2"]
    assert "recall@20" not in by_version["v2"]
    assert by_version["v2"]["precision@20"] == by_version["v1"]["precision@20"]
    assert all(isinstance(v, float) and math.isfinite(v) for v in by_version["v2"].values())


def test_describe_lists_a_version_that_cannot_serve_with_its_problem(
    tiny_artifact: Path, tmp_path: Path
) -> None:
    """GET /v1/model lists every version a plain reload could pick: one with a damaged
    manifest was left out, so the listing's newest was not the version a reload refused."""
    root = tmp_path / "root"
    shutil.copytree(tiny_artifact, root / "v1")
    service = Service(root, tmp_path / "state", load_config(env={"SIGNEDREC_KERNELS__BACKEND":
                                                                 "cpu"}))  # fmt: skip
    service.state = service.load()
    shutil.copytree(tiny_artifact, root / "v2")
    (root / "v2" / "item_table.npy").unlink()
    shutil.copytree(tiny_artifact, root / "v3")
    (root / "v3" / "manifest.json").write_text("{not json")
    try:
        described = asyncio.run(service.describe())
    finally:
        if service.state.log is not None:
            service.state.log.close_sync()
    by_version = {v.version: v for v in described.versions}
    assert list(by_version) == ["v1", "v2", "v3"]
    assert by_version["v1"].problem is None
    assert by_version["v1"].active
    assert by_version["v2"].problem == "item_table.npy missing"
    assert "ndcg@20" in by_version["v2"].metrics  # its manifest is fine: what it claimed
    assert "manifest.json is not valid JSON" in by_version["v3"].problem
    assert by_version["v3"].metrics == {}
    assert by_version["v3"].created_at is None


@pytest.mark.parametrize("keep", ["positives", "negatives"])
def test_train_on_a_valid_split_of_one_sign(
    keep: str,
    dataset_factory: Callable[..., Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A valid split without dislikes still trains (nothing to sink look-alikes of); one
    without likes has nothing to select on: one line naming it, exit 2, nothing written."""
    rows = synthetic_rows()["valid"]
    sign = (lambda r: r >= THRESHOLD) if keep == "positives" else (lambda r: r < THRESHOLD)
    directory = dataset_factory(valid=format_rows([row for row in rows if sign(row[2])]))
    config = tmp_path / "model.toml"
    config.write_text(TINY_MODEL_TOML)
    out = tmp_path / "out"
    with known_training_warnings_ignored():
        code = main(["train", "--data", str(directory), "--threshold", str(THRESHOLD),
                     "--out", str(out), "--config", str(config)])  # fmt: skip
    if keep == "positives":
        assert code == 0
        assert len(list_versions(out)) == 1
        return
    assert code == 2
    line = _one_error_line(capsys, "train")
    assert str(directory / "valid.txt") in line
    assert "no user has a positive" in line
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--data", "d", "--threshold", "4", "--out", ""],
        ["train", "--data", "", "--threshold", "4", "--out", "o"],
        ["train", "--data", "d", "--threshold", "4", "--out", "o", "--events", " "],
        ["evaluate", "--artifact", "", "--data", "d"],
        ["versions", ""],
        ["serve", "--state-dir", ""],
        ["serve", "--config", ""],
    ],
)
def test_an_empty_path_argument_is_refused(
    argv: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    # Path("") is ".": `--out ''` trained into the current directory.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2
    assert "must not be empty" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_an_unreadable_artifact_root_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "private"
    root.mkdir()

    def refused(self: Path) -> object:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "iterdir", refused)
    assert main(["versions", str(root)]) == 2
    assert "cannot read artifact root" in _one_error_line(capsys, "versions")
    assert main(["evaluate", "--artifact", str(root), "--data", str(tmp_path)]) == 2
    assert "Permission denied" in _one_error_line(capsys, "evaluate")


def test_a_catalogue_too_large_to_fit_is_refused_before_training(
    tiny_dataset: TinyDataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    # 200,000 items asked numpy for 149 GiB and died with a traceback, exit 1.
    monkeypatch.setattr("server.train.memory_bytes", lambda: 1024)
    out = tmp_path / "out"
    code = main(_train_args(tiny_dataset, out))
    assert code == 2
    line = _one_error_line(capsys, "train")
    assert f"{tiny_dataset.path / 'train.txt'}: {tiny_dataset.n_items} items" in line
    assert "GiB of memory to train" in line
    assert not out.exists() or not any(out.iterdir())


def test_train_events_that_is_a_file_says_so(
    tiny_dataset: TinyDataset, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "afile"
    log.write_text("not a log\n")
    code = main(_train_args(tiny_dataset, tmp_path / "o", "--events", str(log)))
    assert code == 2
    assert f"event log {log} is not a directory" in _one_error_line(capsys, "train")


def test_a_root_and_its_versions_share_the_default_state_dir(
    tiny_artifact: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Serving a version by name (as the README shows) started on a fresh, empty state dir named
    after the version: every user's logged feedback gone and retries applied again."""
    from server.api import default_state_dir

    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    root = tiny_artifact.parent
    assert default_state_dir(root) == tmp_path / "xdg" / "signedrec" / root.name
    assert default_state_dir(tiny_artifact) == default_state_dir(root)


def _refuse_under(monkeypatch: pytest.MonkeyPatch, method: str, below: Path) -> None:
    """``Path.<method>`` raises EACCES for paths under ``below``, as for a user who may not read
    it (the tests run as root, so the error is injected)."""
    original = getattr(Path, method)

    def refused(self: Path, *args: object, **kwargs: object) -> object:
        if self.is_relative_to(below) and self != below:
            raise PermissionError(13, "Permission denied", str(self))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Path, method, refused)


def test_an_unreadable_version_is_listed_as_unusable_beside_the_others(
    tiny_artifact: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """One dir this user may not read (a version, or a volume's lost+found) refused the whole
    root, blaming the root, and hid the good versions; it is listed as unusable and never
    taken as the newest. An unreadable root was a PermissionError traceback."""
    root = tmp_path / "root"
    for name in ("v1", "v2"):
        shutil.copytree(tiny_artifact, root / name)
    (root / "lost+found").mkdir()
    _refuse_under(monkeypatch, "is_file", root / "v1")
    _refuse_under(monkeypatch, "read_text", root / "v1")
    _refuse_under(monkeypatch, "is_file", root / "lost+found")
    _refuse_under(monkeypatch, "read_text", root / "lost+found")
    assert list_versions(root) == ["v2"]
    assert resolve(root) == root / "v2"
    assert main(["versions", str(root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["lost+found", "v1", "v2"]
    assert lines[0].startswith("lost+found unusable: ")
    assert lines[1].startswith("v1 unusable: ")
    assert "Permission denied" in lines[1]
    assert lines[2].startswith("v2 ndcg@20(test)=")
    monkeypatch.undo()
    _refuse_under(monkeypatch, "iterdir", tmp_path)
    _refuse_under(monkeypatch, "is_file", tmp_path)
    assert main(["versions", str(root)]) == 2
    assert "cannot read artifact root" in _one_error_line(capsys, "versions")


def test_an_unreadable_array_is_a_one_line_refusal(
    tiny_artifact: Path, tiny_dataset: TinyDataset, tmp_path: Path,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """An array the checksum cannot read was a PermissionError traceback with exit 1."""
    version = tmp_path / "v1"
    shutil.copytree(tiny_artifact, version)
    original = Path.open

    def refused(self: Path, *args: object, **kwargs: object) -> object:
        if self == version / "item_table.npy":
            raise PermissionError(13, "Permission denied", str(self))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", refused)
    code = main(["evaluate", "--artifact", str(version), "--data", str(tiny_dataset.path)])
    assert code == 2
    assert "item_table.npy cannot be read: Permission denied" in _one_error_line(capsys, "evaluate")


def test_an_unreadable_data_dir_and_an_unknown_item_are_named(
    tiny_artifact: Path, tiny_dataset: TinyDataset, tmp_path: Path,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """A split past the artifact's items names its file and row (it named the folder only);
    a data dir that cannot be looked into names the split (it was a traceback)."""
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset.path, data)
    n_items = int(json.loads((tiny_artifact / "manifest.json").read_text())["dataset"]["n_items"])
    with (data / "test.txt").open("a") as handle:
        handle.write(f"3 {n_items + 5} 5\n")
    assert main(["evaluate", "--artifact", str(tiny_artifact), "--data", str(data)]) == 2
    assert f"{data / 'test.txt'}: the row of user 3 and item {n_items + 5} names an item" in (
        _one_error_line(capsys, "evaluate")
    )
    _refuse_under(monkeypatch, "is_file", data)
    assert main(["train", "--data", str(data), "--threshold", str(tiny_dataset.threshold),
                 "--out", str(tmp_path / "out")]) == 2  # fmt: skip
    assert f"{data / 'train.txt'}: cannot be read: Permission denied" in _one_error_line(
        capsys, "train"
    )
    assert not (tmp_path / "out").exists()
