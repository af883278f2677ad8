"""Reload and rollback edge cases on the real app in the test's loop: vanished rollback targets,
and versions a pruned log can no longer serve."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

from server.artifacts import load_artifact, save_artifact
from tests.conftest import N_ITEMS
from tests.test_webhook_races import running

RETENTION = {
    "SIGNEDREC_LOG__SEGMENT_BYTES": "4096",
    "SIGNEDREC_LOG__DEDUP_WINDOW": "10",
    "SIGNEDREC_LOG__RETENTION": "trained",
}


def _version(root: Path, source: Path, name: str, watermark: int = 0) -> str:
    """Another version of ``source``'s model under ``root`` (its graph differs by watermark)."""
    artifact = load_artifact(source)
    manifest = {k: v for k, v in artifact.manifest.items()
                if k not in ("files", "version", "created_at", "schema_version")}  # fmt: skip
    manifest["watermark"] = watermark
    return save_artifact(root, dict(artifact.arrays), manifest, version=name).name


def test_a_vanished_rollback_target_leaves_the_history(tiny_artifact: Path, tmp_path: Path) -> None:
    """The target is a 404 and is dropped, along with the active version left on top beneath
    it; every later rollback moves on, down to 'nothing to roll back to'."""
    root = tmp_path / "root"
    for name in ("v1", "v2", "v3"):
        _version(root, tiny_artifact, name)

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
