"""The embedded default artifact: where it lives, what it learned from, how it is rebuilt.

A fresh clone has no ``../shared``: the default is trained from the copy of amazon-music's
splits kept in ``model_artifacts/default-data``, with the default config and no ``--config``.
"""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ARTIFACTS = REPO_ROOT / "model_artifacts" / "default"
DEFAULT_DATA = REPO_ROOT / "model_artifacts" / "default-data"
DEFAULT_THRESHOLD = 4.0  # amazon-music's: ratings 4 and 5 are likes


def build_default(force: bool = False) -> Path | None:
    """Train the embedded default from the in-repo data with the default config, if absent.

    The same for ``build-default`` and a ``serve`` that finds none: the default never depends
    on a ``--config`` file. Returns the new version, or None when one was already there.
    """
    from server.artifacts import list_versions
    from server.config import load_config
    from server.train import train

    if list_versions(DEFAULT_ARTIFACTS) and not force:
        return None
    return train(
        DEFAULT_DATA, DEFAULT_THRESHOLD, DEFAULT_ARTIFACTS, load_config(None, env={}).model
    )
