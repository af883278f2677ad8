"""Realistic signedrec traffic for Locust: Zipf-like users, 90% reads, 10% feedback writes.

Configured by environment (the runner sets these):
  SIGNEDREC_LT_ARTIFACT  artifact version dir (user and item ids are read from it)
  SIGNEDREC_LT_RATE      requests per second each simulated user offers (constant throughput)
  SIGNEDREC_LT_TARGET    "mixed" (default) or "healthz" (the framework's ceiling)
"""

from __future__ import annotations

import os
import random
import uuid
from pathlib import Path

import numpy as np
from locust import FastHttpUser, between, constant_throughput, events, task
from locust.contrib.fasthttp import FastResponse

from server.artifacts import read_ids

ZIPF_EXPONENT = 1.1
NEW_USER_SHARE = 0.05
FEEDBACK_SHARE = 0.10
KINDS = ("like", "dislike", "skip", "rating")
KIND_WEIGHTS = (0.45, 0.2, 0.2, 0.15)
K = 20


class Traffic:
    """Ids to draw from: users weighted Zipf-like by rank, items uniformly from the catalogue."""

    def __init__(self, artifact: Path) -> None:
        self.users, self.items = read_ids(artifact)
        ranks = np.arange(1, len(self.users) + 1, dtype=np.float64)
        weights = ranks**-ZIPF_EXPONENT
        self.cumulative = np.cumsum(weights / weights.sum())
        self.rng = random.Random(os.getpid())

    def user(self) -> str:
        """A known user (Zipf-like) or, 5% of the time, a brand-new one."""
        if self.rng.random() < NEW_USER_SHARE:
            return f"lt-new-{uuid.uuid4().hex[:12]}"
        index = int(np.searchsorted(self.cumulative, self.rng.random()))
        return self.users[min(index, len(self.users) - 1)]

    def event(self) -> dict[str, object]:
        """One feedback event on a real item with a realistic kind mix."""
        kind = self.rng.choices(KINDS, KIND_WEIGHTS)[0]
        body: dict[str, object] = {
            "event_id": uuid.uuid4().hex,
            "user_id": self.user(),
            "item_id": self.rng.choice(self.items),
            "kind": kind,
        }
        if kind == "rating":
            body["value"] = float(self.rng.randint(1, 5))
        return body


_traffic: Traffic | None = None


@events.init.add_listener
def _load(environment: object, **_: object) -> None:
    global _traffic
    _traffic = Traffic(Path(os.environ["SIGNEDREC_LT_ARTIFACT"]))


def _rate() -> float:
    return float(os.environ.get("SIGNEDREC_LT_RATE", "1.0"))


class RecommenderUser(FastHttpUser):
    """An app calling for recommendations and posting feedback; every response is checked."""

    wait_time = constant_throughput(_rate()) if _rate() > 0 else between(0, 0)

    def on_start(self) -> None:
        """Pick the traffic mix for this run."""
        self.healthz_only = os.environ.get("SIGNEDREC_LT_TARGET", "mixed") == "healthz"

    @task
    def one_request(self) -> None:
        """90% GET recommendations, 10% POST feedback (or /healthz for the ceiling run)."""
        if self.healthz_only:
            with self.client.get("/healthz", name="healthz", catch_response=True) as r:
                if r.status_code != 200 or r.json().get("status") != "ok":
                    r.failure(f"healthz: {r.status_code}")
            return
        traffic = _traffic
        if traffic is None:
            raise RuntimeError("traffic not initialised")
        if traffic.rng.random() < FEEDBACK_SHARE:
            with self.client.post(
                "/v1/feedback", json=traffic.event(), name="feedback", catch_response=True
            ) as r:
                body = r.json() if r.status_code == 200 else {}
                if r.status_code != 200 or body.get("accepted", 0) + body.get("duplicates", 0) != 1:
                    r.failure(f"feedback: {_why(r)}")
            return
        user = traffic.user()
        with self.client.get(
            f"/v1/recommendations/{user}?k={K}", name="recommendations", catch_response=True
        ) as r:
            if r.status_code != 200:
                r.failure(f"recommendations: {_why(r)}")
                return
            body = r.json()
            items = body.get("items")
            # Fewer than K is right for a user who has given feedback on nearly the whole
            # catalogue (seen items are excluded): the Zipf-top user gets ~16% of all events.
            if not isinstance(items, list) or len(items) > K or body.get("user_id") != user:
                r.failure("recommendations: wrong shape")


def _why(response: FastResponse) -> str:
    """Status and body start of a failed response; for no response at all (a reset, a refused
    connection: Locust's ErrorResponse has status 0 and no text), the error itself."""
    error = getattr(response, "error", None)
    if response.status_code == 0 and error is not None:
        return f"no response: {type(error).__name__}: {error}"
    return f"{response.status_code} {(response.text or '')[:200]}"
