"""The idempotency window: the ids of the most recently accepted events, in acceptance order.

A repeat of an id inside the window is acknowledged and not applied twice. The window is bounded
by a count of accepted events, not by time (``ts`` is optional on the wire), so memory stays
bounded and replaying the log rebuilds exactly the window the live process had.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator


class RecentIds:
    """The ids among the last ``capacity`` accepted; forgets oldest first."""

    def __init__(self, capacity: int, ids: Iterable[str] = ()) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        # id -> the position it was (last) added at. The queue may hold stale entries for ids
        # re-added since: an entry evicts its id only if the positions still match.
        self._position: dict[str, int] = {}
        self._queue: deque[str] = deque()
        self._added = 0  # positions handed out so far
        self._evicted = 0  # position of the queue's head
        self.add(ids)

    def __contains__(self, event_id: object) -> bool:
        return event_id in self._position

    def __len__(self) -> int:
        return len(self._position)

    def __iter__(self) -> Iterator[str]:
        """Live ids, oldest first (the order a snapshot keeps)."""
        return iter(self.live(*self.entries()))

    def entries(self) -> tuple[list[str], int]:
        """The queue as it is (stale entries included) and its head's position: a snapshot's
        starting point, filtered later with :meth:`live` in steps."""
        return list(self._queue), self._evicted

    def live(self, entries: list[str], offset: int) -> list[str]:
        """The ``entries`` (the first at position ``offset``) still live where they were added."""
        position = self._position
        return [e for o, e in enumerate(entries, offset) if position.get(e) == o]

    def add(self, ids: Iterable[str]) -> None:
        """Remember ids as accepted now, forgetting the oldest beyond the capacity."""
        position, queue = self._position, self._queue
        for event_id in ids:
            position[event_id] = self._added
            queue.append(event_id)
            self._added += 1
        # The window is the last ``capacity`` acceptances.
        while self._added - self._evicted > self.capacity:
            oldest = queue.popleft()
            if position.get(oldest) == self._evicted:
                del position[oldest]
            self._evicted += 1
