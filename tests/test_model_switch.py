"""Reload and rollback edge cases on the real app in the test's loop: vanished rollback targets,
and versions a pruned log can no longer serve."""

from __future__ import annotations

import asyncio
import errno
import shutil
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

from server import rollout
from server.artifacts import load_artifact, save_artifact
from server.config import load_config
from server.errors import ArtifactError
from server.service import Service
from tests.conftest import N_ITEMS
from tests.test_webhook_races import running

RETENTION = {
    "SIGNEDREC_LOG__SEGMENT_BYTES": "4096",
    "SIGNEDREC_LOG__DEDUP_WINDOW": "10",
    "SIGNEDREC_LOG__RETENTION": "trained",
}


def _version(root: Path, source: Path, name: str, watermark: int = 0, scale: float = 1.0) -> str:
    """Another version of ``source``'s model under ``root`` (its graph differs by watermark); a
    ``scale`` other than 1 makes it another model of the same catalogue and graph, its item
    table times ``scale`` (user vectors fold to ``scale`` times theirs: plain to see)."""
    artifact = load_artifact(source)
    arrays = dict(artifact.arrays)
    arrays["item_table"] = arrays["item_table"] * np.float32(scale)
    manifest = {k: v for k, v in artifact.manifest.items()
                if k not in ("files", "version", "created_at", "schema_version")}  # fmt: skip
    manifest["watermark"] = watermark
    return save_artifact(root, arrays, manifest, version=name).name


def _versions(root: Path, source: Path, *names: str) -> None:
    """Versions of ``source``'s model under ``root``, one per name."""
    for name in names:
        _version(root, source, name)


def test_a_vanished_rollback_target_leaves_the_history(tiny_artifact: Path, tmp_path: Path) -> None:
    """The target is a 404 and is dropped, along with the active version left on top beneath
    it; every later rollback moves on, down to 'nothing to roll back to'."""
    root = tmp_path / "root"
    _versions(root, tiny_artifact, "v1", "v2", "v3")

    async def scenario() -> None:
        async with running(root, tmp_path / "state") as (client, service):

            async def admin(action: str, version: str | None = None) -> tuple[int, str]:
                body = {} if version is None else {"version": version}
                answer = await client.post(f"/v1/admin/model/{action}", json=body)
                code = answer.json()["error"]["code"] if answer.status_code != 200 else ""
                return answer.status_code, code

            for version in ("v1", "v2", "v3", "v2"):
                assert await admin("reload", version) == (200, "")
            assert service.previous == ["v3", "v1", "v2", "v3"]
            shutil.rmtree(root / "v3")
            assert await admin("rollback") == (404, "unknown_version")
            assert service.previous == ["v3", "v1"]  # v2, the active one, went with it
            assert await admin("rollback") == (200, "")
            assert service.live().item_side.version == "v1"
            assert await admin("rollback") == (404, "unknown_version")
            assert await admin("rollback") == (409, "no_previous_version")
            assert service.live().item_side.version == "v1"

    asyncio.run(scenario())


def test_a_version_needing_pruned_events_is_refused_by_reload(
    tiny_artifact: Path, tmp_path: Path
) -> None:
    """Retention dropped the segments every version then on disk was trained on; a version added
    later with watermark 0 would need them on its next restart, so reload refuses it (409)."""
    root, state = tmp_path / "root", tmp_path / "state"
    _version(root, tiny_artifact, "v1")

    async def stream() -> None:
        async with running(root, state, RETENTION) as (client, _):
            for start in range(0, 300, 20):
                batch = [{"event_id": f"e{n}", "user_id": f"u{n % 7}", "item_id": str(n % N_ITEMS),
                          "kind": "like"} for n in range(start, start + 20)]  # fmt: skip
                assert (await client.post("/v1/feedback", json=batch)).status_code == 200

    async def after_pruning() -> None:
        async with running(root, state, RETENTION) as (client, service):
            first_seq = service.live().log.first_seq  # type: ignore[union-attr]
            assert first_seq > 1  # retention ran
            later = _version(root, tiny_artifact, "v3", watermark=0)
            answer = await client.post("/v1/admin/model/reload", json={"version": later})
            assert answer.status_code == 409
            assert "log retention has dropped" in answer.json()["error"]["message"]
            assert service.live().item_side.version == "v2"

    asyncio.run(stream())
    _version(root, tiny_artifact, "v2", watermark=250)  # as if trained on the log up to 250
    shutil.rmtree(root / "v1")
    asyncio.run(after_pruning())


def test_a_renamed_copy_of_a_version_is_served_under_its_directory_name(
    tiny_artifact: Path, tmp_path: Path
) -> None:
    """A version copied in under another name (its manifest keeps the old one) is reported,
    reloaded and rolled back by the name on disk, the one operators see and type."""
    root = tmp_path / "root"
    _version(root, tiny_artifact, "v1")
    shutil.copytree(root / "v1", root / "v2-import")

    async def scenario() -> None:
        async with running(root, tmp_path / "state") as (client, service):
            model = (await client.get("/v1/model")).json()
            assert model["active"] == "v2-import"
            assert [v["version"] for v in model["versions"] if v["active"]] == ["v2-import"]
            answer = await client.post("/v1/admin/model/reload", json={"version": "v1"})
            assert answer.status_code == 200
            assert service.previous == ["v2-import"]
            assert (await client.post("/v1/admin/model/rollback", json={})).status_code == 200
            assert (await client.get("/v1/model")).json()["active"] == "v2-import"

    asyncio.run(scenario())


def test_a_choice_that_cannot_be_saved_is_refused(tiny_artifact: Path, tmp_path: Path) -> None:
    """Disk full while saving rollout.json: the reload answers 503 and the old version keeps
    serving, so a restart serves what the operator was told is active."""
    root, state = tmp_path / "root", tmp_path / "state"
    _versions(root, tiny_artifact, "v1", "v2")
    full = OSError(errno.ENOSPC, "No space left on device")

    async def scenario() -> None:
        async with running(root, state) as (client, service):
            with mock.patch("server.rollout.write", side_effect=full):
                answer = await client.post("/v1/admin/model/reload", json={"version": "v1"})
                assert answer.status_code == 503
                assert answer.json()["error"]["code"] == "rollout_not_saved"
                assert service.live().item_side.version == "v2"
                assert (service.pinned, service.previous) == (None, [])
            assert (await client.post("/v1/admin/model/reload", json={"version": "v1"})
                    ).status_code == 200  # fmt: skip
            with mock.patch("server.rollout.write", side_effect=full):
                answer = await client.post("/v1/admin/model/rollback", json={})
                assert answer.status_code == 503
                assert service.live().item_side.version == "v1"
                assert (service.pinned, service.previous) == ("v1", ["v2"])
                # Reloading the newest while it is not active, and unpinning the active newest.
                answer = await client.post("/v1/admin/model/reload", json={})
                assert answer.status_code == 503
                assert service.live().item_side.version == "v1"
            assert rollout.read(state) == rollout.Rollout(pinned="v1", previous=("v2",))
            assert (await client.post("/v1/admin/model/reload", json={})).status_code == 200
            with mock.patch("server.rollout.write", side_effect=full):
                # Pinning the active version (no swap) is refused all the same.
                answer = await client.post("/v1/admin/model/reload", json={"version": "v2"})
                assert answer.status_code == 503
                assert service.pinned is None
        assert rollout.read(state) == rollout.Rollout(pinned=None, previous=("v2", "v1"))

    asyncio.run(scenario())


def test_a_pinned_version_that_cannot_serve_names_the_pin(
    tiny_artifact: Path, tmp_path: Path
) -> None:
    """The start stops on a damaged pinned version (no silent fallback), and says the version
    was chosen by rollout.json, not by the --artifact the operator typed."""
    root, state = tmp_path / "root", tmp_path / "state"
    _versions(root, tiny_artifact, "v1", "v2")
    with (root / "v1" / "item_ids.npy").open("ab") as handle:
        handle.write(b"rot")
    rollout.write(state, rollout.Rollout(pinned="v1"))
    with pytest.raises(ArtifactError, match="checksum mismatch") as refused:
        Service(root, state, load_config(env={})).load()
    assert f"pinned by {state / 'rollout.json'}" in refused.value.message


def test_a_version_with_an_unreadable_manifest_is_listed_with_its_problem(
    tiny_artifact: Path, tmp_path: Path
) -> None:
    """Left out of the listing (with a warning in the log only), a damaged newest version was
    still what a plain reload tried: its 409 named a version the listing never showed."""
    root = tmp_path / "root"
    _versions(root, tiny_artifact, "v1", "v2")
    (root / "v1" / "manifest.json").write_text("{not json")

    async def scenario() -> None:
        async with running(root, tmp_path / "state") as (client, _):
            shutil.copytree(root / "v1", root / "v3")
            model = (await client.get("/v1/model")).json()
            assert [v["version"] for v in model["versions"]] == ["v1", "v2", "v3"]
            problems = {v["version"]: v["problem"] for v in model["versions"]}
            assert problems["v2"] is None
            assert "manifest.json is not valid JSON" in problems["v3"]
            refused = await client.post("/v1/admin/model/reload")
            assert refused.status_code == 409
            assert "v3" in refused.json()["error"]["message"]

    asyncio.run(scenario())


def test_another_model_put_under_the_served_name_is_not_mistaken_for_it(
    tiny_artifact: Path, tmp_path: Path
) -> None:
    """`prod` replaced on disk by another model: a reload of `prod` swaps it in, and a restart
    does not restore the old model's vectors from the snapshot (directory names are reused;
    the snapshot and the swap check the model itself)."""
    other, root, state = tmp_path / "other", tmp_path / "root", tmp_path / "state"
    _version(other, tiny_artifact, "A")
    _version(other, tiny_artifact, "B", scale=2.0)
    shutil.copytree(other / "A", root / "prod")
    likes = [{"event_id": f"e{n}", "user_id": f"u{n % 3}", "item_id": str(n), "kind": "like"}
             for n in range(6)]  # fmt: skip

    async def reload_in_place() -> np.ndarray:
        async with running(root, state) as (client, service):
            assert (await client.post("/v1/feedback", json=likes)).status_code == 200
            before = service.live().vectors[: len(service.live().users)].copy()
            shutil.rmtree(root / "prod")
            shutil.copytree(other / "B", root / "prod")
            answer = await client.post("/v1/admin/model/reload", json={"version": "prod"})
            assert answer.status_code == 200
            live = service.live()
            assert live.item_side.model_id == "B"
            np.testing.assert_allclose(live.vectors[: len(live.users)], 2 * before, rtol=1e-5)
            assert service.previous == []  # A is gone: nothing to roll back to
            return 2 * before

    async def vectors() -> np.ndarray:
        async with running(root, state) as (_, service):
            live = service.live()
            return live.vectors[: len(live.users)].copy()

    expected = asyncio.run(reload_in_place())
    shutil.rmtree(root / "prod")  # and back to A, under the same name, while stopped
    shutil.copytree(other / "A", root / "prod")
    np.testing.assert_allclose(asyncio.run(vectors()), expected / 2, rtol=1e-5)


def test_a_named_reload_of_the_explicitly_served_version_pins_it(
    tiny_artifact: Path, tmp_path: Path
) -> None:
    root, state = tmp_path / "root", tmp_path / "state"
    _versions(root, tiny_artifact, "v1", "v2")

    async def reload(artifact: Path, version: str) -> None:
        async with running(artifact, state) as (client, _):
            answer = await client.post("/v1/admin/model/reload", json={"version": version})
            assert answer.status_code == 200

    asyncio.run(reload(root, "v1"))
    asyncio.run(reload(root / "v2", "v2"))  # served as given, then pinned by name
    assert rollout.read(state).pinned == "v2"


def test_a_version_dir_given_as_dot_still_has_its_root(
    tiny_artifact: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`serve --artifact .` from inside a version: its siblings are listed and reloadable."""
    root = tmp_path / "root"
    _versions(root, tiny_artifact, "v1", "v2")
    monkeypatch.chdir(root / "v2")

    async def scenario() -> None:
        async with running(Path("."), tmp_path / "state") as (client, service):
            model = (await client.get("/v1/model")).json()
            assert (model["active"], [v["version"] for v in model["versions"]]) == (
                "v2", ["v1", "v2"])  # fmt: skip
            answer = await client.post("/v1/admin/model/reload", json={"version": "v1"})
            assert answer.status_code == 200
            assert service.previous == ["v2"]

    asyncio.run(scenario())
