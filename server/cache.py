"""Finished rankings memoised per user until something that feeds them changes.

A user's ranking is a pure function of the item side (model version), that user's vector and
that user's signed feedback; nobody else's events touch it. So it stays exact until that user's
next event or the next model swap, and the state invalidates on exactly those. Bounded: at most
``capacity`` users (when full, the user cached longest ago is dropped first) and at most
``variants`` rankings per user (a client cycling through every k would otherwise make one user's
entry grow without limit; the oldest variant goes first).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Generic, TypeVar

Value = TypeVar("Value")
Variant = tuple[int, bool]  # (k, include_liked)


class RankingCache(Generic[Value]):
    """Per-user memo of rankings by (k, include_liked), at most ``capacity`` users (0: off)."""

    def __init__(self, capacity: int, variants: int = 8) -> None:
        if variants < 1:
            raise ValueError(f"variants must be >= 1, got {variants}")
        self.capacity = capacity
        self.variants = variants
        self._users: dict[int, dict[Variant, Value]] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._users)

    def get(self, user: int, variant: Variant) -> Value | None:
        """The memoised ranking, or None (counted as a miss)."""
        entry = self._users.get(user)
        value = None if entry is None else entry.get(variant)
        if value is None:
            self.misses += 1
        else:
            self.hits += 1
        return value

    def put(self, user: int, variant: Variant, value: Value) -> None:
        """Memoise one ranking, dropping the oldest user when over capacity."""
        if self.capacity <= 0:
            return
        entry = self._users.get(user)
        if entry is None:
            if len(self._users) >= self.capacity:
                del self._users[next(iter(self._users))]
            entry = self._users[user] = {}
        elif variant not in entry and len(entry) >= self.variants:
            del entry[next(iter(entry))]
        entry[variant] = value

    def invalidate(self, users: Iterable[int]) -> None:
        """Forget these users' rankings (their feedback changed)."""
        if self._users:
            pop = self._users.pop
            for user in users:
                pop(user, None)

    def clear(self) -> None:
        """Forget everything (the item side changed)."""
        self._users.clear()
