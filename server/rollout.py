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

from server.artifacts import is_version, list_versions, root_of
from server.config import Base
from server.durable import atomic_write

log = logging.getLogger("signedrec.rollout")

FILE = "rollout.json"


class Rollout(Base):
    """The pinned version (None: follow the newest) and the rollback stack, oldest first."""

    pinned: str | None = None
    previous: tuple[str, ...] = ()


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
    saved = read(state_dir)
    explicit = is_version(artifact)
    root = root_of(artifact)
    versions = list_versions(root)
    pinned = saved.pinned
    if explicit:
        pinned = chosen = artifact.name
    else:
        chosen = versions[-1] if versions else ""
        if pinned in versions:
            chosen = pinned
            log.info("serving pinned version %s (set by an earlier reload or rollback)", chosen)
        elif pinned is not None:
            log.warning("pinned version %s is no longer under %s: serving the newest",
                        pinned, root)  # fmt: skip
            pinned = None
    previous = [v for v in saved.previous if v in versions]
    while previous and previous[-1] == chosen:  # rolling back to itself would do nothing
        previous.pop()
    return (root / chosen if chosen else root), Rollout(pinned=pinned, previous=tuple(previous))


def older_versions(artifact: Path, rollout: Rollout, chosen: Path) -> list[Path]:
    """Versions to fall back to, newest first, when ``chosen`` cannot serve the state dir:
    only when following the newest (a root, nothing pinned); an explicit or pinned version is
    what the operator asked for, so its refusal stands."""
    if is_version(artifact) or rollout.pinned is not None:
        return []
    versions = list_versions(artifact)
    return [artifact / v for v in reversed(versions) if v < chosen.name]
