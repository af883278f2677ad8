"""The persisted model choice: what a start serves given the state dir's rollout file."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from server import rollout
from server.artifacts import MANIFEST


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """Three version directories (only the manifest matters to the choice)."""
    for version in ("v1", "v2", "v3"):
        (tmp_path / "root" / version).mkdir(parents=True)
        (tmp_path / "root" / version / MANIFEST).write_text("{}")
    return tmp_path / "root"


def test_no_file_serves_the_newest(root: Path, tmp_path: Path) -> None:
    path, choice = rollout.choose(root, tmp_path / "state")
    assert path == root / "v3"
    assert choice == rollout.Rollout()


def test_pin_and_stack_round_trip(root: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    rollout.write(state, rollout.Rollout(pinned="v1", previous=("v3", "v2")))
    path, choice = rollout.choose(root, state)
    assert path == root / "v1"
    assert choice == rollout.Rollout(pinned="v1", previous=("v3", "v2"))
    assert not (state / (rollout.FILE + ".tmp")).exists()


def test_versions_gone_from_disk_are_dropped(
    root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = tmp_path / "state"
    rollout.write(state, rollout.Rollout(pinned="v9", previous=("v1", "v8", "v3")))
    with caplog.at_level(logging.WARNING, "signedrec.rollout"):
        path, choice = rollout.choose(root, state)
    assert "pinned version v9 is no longer under" in caplog.text
    # The newest is served; v8 is gone and v3 (now active) would be a roll back to itself.
    assert path == root / "v3"
    assert choice == rollout.Rollout(pinned=None, previous=("v1",))


@pytest.mark.parametrize(
    "content", [b"", b"{not json", b'{"pinned": 3}', b'{"pinned": "v1", "extra": 1}', b"\xff"]
)
def test_unreadable_file_serves_the_newest(
    root: Path, tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / rollout.FILE).write_bytes(content)
    with caplog.at_level(logging.WARNING, "signedrec.rollout"):
        path, choice = rollout.choose(root, state)
    assert path == root / "v3"
    assert choice == rollout.Rollout()
    assert "ignoring" in caplog.text


def test_an_explicit_version_directory_wins(root: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    rollout.write(state, rollout.Rollout(pinned="v1", previous=("v1",)))
    path, choice = rollout.choose(root / "v2", state)
    assert path == root / "v2"
    assert choice == rollout.Rollout(pinned="v2", previous=("v1",))
