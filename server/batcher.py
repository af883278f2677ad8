"""Micro-batching: recommendation requests that arrive in the same event-loop tick share one
FAISS search and one suppression kernel call, instead of one of each per request."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

Result = TypeVar("Result")
Key = tuple[str, int, bool]


class MicroBatcher(Generic[Result]):
    """Collects (user, k, include_liked) requests and runs them as one batch per tick."""

    def __init__(
        self,
        run: Callable[[Sequence[str], int, bool], list[Result]],
        max_batch: int,
        on_batch: Callable[[int], object] | None = None,
    ) -> None:
        self._run = run
        self._on_batch = on_batch
        self._max_batch = max_batch
        self._pending: list[tuple[Key, asyncio.Future[Result]]] = []
        self._scheduled = False

    def submit(self, user_id: str, k: int, include_liked: bool) -> asyncio.Future[Result]:
        """Queue one request; the future resolves when its batch has been ranked."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Result] = loop.create_future()
        self._pending.append(((user_id, k, include_liked), future))
        if len(self._pending) >= self._max_batch:
            self._flush()
        elif not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        self._scheduled = False
        pending, self._pending = self._pending, []
        if not pending:
            return
        # One ranking call per (k, include_liked) group; usually every request shares k.
        groups: dict[tuple[int, bool], list[tuple[str, asyncio.Future[Result]]]] = {}
        for (user_id, k, include_liked), future in pending:
            groups.setdefault((k, include_liked), []).append((user_id, future))
        for (k, include_liked), members in groups.items():
            if self._on_batch is not None:
                self._on_batch(len(members))
            try:
                results = self._run([m[0] for m in members], k, include_liked)
            except Exception as exc:  # delivered to every waiter, who maps it to a response
                for _, future in members:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), result in zip(members, results, strict=True):
                if not future.done():
                    future.set_result(result)
