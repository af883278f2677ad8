"""A full disk under the event log: writes answer 503, reads go on, writes recover with the disk."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_service import Server

DISK_BYTES = 4 * 1024 * 1024


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs; skipped where this process may not mount one."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES}", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(path: Path) -> None:
    """Write until the filesystem has no page left (down to single bytes, unbuffered)."""
    with path.open("ab", buffering=0) as handle:
        for chunk in (65536, 4096, 1):
            try:
                while True:
                    handle.write(b"\0" * chunk)
            except OSError:
                continue


def _events(user: str, n: int) -> list[dict[str, object]]:
    return [
        {"event_id": uuid.uuid4().hex, "user_id": user, "item_id": str(i), "kind": "like"}
        for i in range(n)
    ]


def test_full_disk_refuses_writes_keeps_reads_and_recovers(small_disk: Path) -> None:
    srv = Server(small_disk / "state")
    try:
        ok = srv.client.post("/v1/feedback", json=_events("disk-user", 3))
        assert ok.json() == {"accepted": 3, "duplicates": 0}
        filler = small_disk / "filler"
        _fill(filler)
        refused = srv.client.post("/v1/feedback", json=_events("disk-user", 400))
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "log_unavailable"
        assert "retry-after" in refused.headers
        # Reads keep working while the log cannot be written.
        assert srv.client.get("/v1/recommendations/disk-user").status_code == 200
        assert srv.client.get("/healthz").status_code == 200
        filler.unlink()
        again = srv.client.post("/v1/feedback", json=_events("disk-user", 2))
        assert again.json() == {"accepted": 2, "duplicates": 0}
        history = srv.client.get("/v1/users/disk-user/history").json()["events"]
        # The refused batch left nothing behind; everything accepted is there once.
        assert len(history) == 5
        # Shutting down on a full disk (no room for the snapshot) still loses nothing.
        _fill(filler)
    finally:
        srv.stop()
    # The shutdown snapshot found no room (the server log shares the full disk, so the evidence
    # is the missing file, not a log line); the process still shut down cleanly.
    assert not (small_disk / "state" / "snapshot.msgpack").exists()
    filler.unlink()
    restarted = Server(small_disk / "state")
    try:
        history = restarted.client.get("/v1/users/disk-user/history").json()["events"]
        assert len(history) == 5
    finally:
        restarted.stop()
