"""Which model version a state directory serves, kept across restarts.

Reloading a named version or rolling back pins that version: a restart serves it again, with
the same rollback stack, instead of silently returning to the newest version on disk. Reloading
without a name (the newest) unpins. The choice is one small JSON file in the state directory,
replaced atomically; a missing or unreadable file, or a pinned version no longer on disk, falls
back to the newest version with the reason logged.
"""

from __future__ import annotations

import logging
from pathlib import Path

import msgspec

from server.artifacts import MANIFEST, list_versions
from server.snapshot import atomic_write

log = logging.getLogger("signedrec.rollout")

FILE = "rollout.json"


class Rollout(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The pinned version (None: follow the newest) and the rollback stack, oldest first."""

    pinned: str | None = None
    previous: list[str] = msgspec.field(default_factory=list)


def read(state_dir: Path) -> Rollout:
    """The persisted choice, or the default (newest, empty stack) when there is none usable."""
    path = state_dir / FILE
    try:
        return msgspec.json.decode(path.read_bytes(), type=Rollout)
    except FileNotFoundError:
        return Rollout()
    except (OSError, msgspec.DecodeError) as exc:
        log.warning("ignoring %s (%s): serving the newest version", path, exc)
        return Rollout()


def write(state_dir: Path, rollout: Rollout) -> None:
    """Persist the choice atomically."""
    atomic_write(state_dir / FILE, msgspec.json.encode(rollout))


def choose(artifact: Path, state_dir: Path) -> tuple[Path, Rollout]:
    """The version directory to serve at start and the rollout state that goes with it.

    A version directory given explicitly is served as given; a root serves its pinned version
    when that is still on disk, else its newest.
    """
    rollout = read(state_dir)
    if (artifact / MANIFEST).is_file():
        root, chosen = artifact.parent, artifact.name
        rollout.pinned = chosen
    else:
        root = artifact
        versions = list_versions(root)
        chosen = versions[-1] if versions else ""
        if rollout.pinned is not None:
            if rollout.pinned in versions:
                chosen = rollout.pinned
                log.info("serving pinned version %s (set by an earlier reload or rollback)",
                         chosen)  # fmt: skip
            else:
                log.warning("pinned version %s is no longer under %s: serving the newest",
                            rollout.pinned, root)  # fmt: skip
                rollout.pinned = None
    on_disk = set(list_versions(root))
    rollout.previous = [v for v in rollout.previous if v in on_disk]
    while rollout.previous and rollout.previous[-1] == chosen:  # rolling back to itself: no-op
        rollout.previous.pop()
    return (root / chosen if chosen else root), rollout
