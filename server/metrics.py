"""Prometheus metrics of one app: request latency, events, fsyncs, snapshots, the memo, the log."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from server.state import LiveState

ROUTES = ("recommendations", "feedback", "history", "similar")  # signedrec_request_seconds
SHED_ROUTES = ("recommendations", "feedback")  # the routes the in-flight bound sheds
SNAPSHOT_RESULTS = ("written", "failed", "abandoned")


class Metrics:
    """Prometheus collectors in one registry per app."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.latency = Histogram(
            "signedrec_request_seconds", "Handler latency by route", ["route"], registry=r,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        )  # fmt: skip
        self.events = Counter("signedrec_events_applied_total", "Events applied", registry=r)
        self.duplicates = Counter("signedrec_events_duplicate_total", "Repeats", registry=r)
        self.fsync = Histogram(
            "signedrec_fsync_seconds", "Event log fsync latency", registry=r,
            buckets=(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5),
        )  # fmt: skip
        self.index_size = Gauge("signedrec_index_items", "Items in the FAISS index", registry=r)
        self.users = Gauge("signedrec_users", "Users known", registry=r)
        self.model = Gauge("signedrec_model_info", "Loaded model", ["version"], registry=r)
        self.backend = Gauge(
            "signedrec_backend_info",
            "Where the hot path runs: kernel backend, FAISS device, HTTP front",
            ["kernels", "index", "http"], registry=r,
        )  # fmt: skip
        self.shed = Counter(
            "signedrec_shed_total", "Requests shed over the in-flight bound", ["route"], registry=r
        )
        self.batch = Histogram(
            "signedrec_ranking_batch_size", "Recommendation requests ranked per FAISS search",
            registry=r, buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
        )  # fmt: skip
        self.snapshots = Counter(
            "signedrec_snapshots_total", "Periodic snapshots by outcome (written, failed: not "
            "written, e.g. a full disk; abandoned: a model swap or shutdown)", ["result"],
            registry=r,
        )  # fmt: skip
        self.snapshot_seconds = Histogram(
            "signedrec_snapshot_seconds", "Periodic snapshot, start of the copy to written",
            registry=r, buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )  # fmt: skip
        # Grows without bound while snapshots fail: the replay a restart would need.
        self.since_snapshot = Gauge(
            "signedrec_events_since_snapshot",
            "Events a restart would replay: applied since the last snapshot that was written "
            "(or is being written) began",
            registry=r,
        )
        # Every known label starts at 0: a series born at 1 hides its first increment from
        # Prometheus's rate() and increase() (a first failed snapshot would alert nobody).
        for route in ROUTES:
            self.latency.labels(route)
        for route in SHED_ROUTES:
            self.shed.labels(route)
        for result in SNAPSHOT_RESULTS:
            self.snapshots.labels(result)


class CacheCollector(Collector):
    """Ranking-memo hits, misses and size, read from the live state at scrape time."""

    def __init__(self, live: Callable[[], LiveState | None]) -> None:
        self.live = live

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        """Nothing until the state is loaded."""
        state = self.live()
        if state is None:
            return
        lookups = CounterMetricFamily(
            "signedrec_ranking_cache", "Ranking memo lookups by result", labels=["result"]
        )
        lookups.add_metric(["hit"], state.cache.hits)
        lookups.add_metric(["miss"], state.cache.misses)
        yield lookups
        yield GaugeMetricFamily(
            "signedrec_ranking_cache_users", "Users with memoised rankings", value=len(state.cache)
        )


class LogCollector(Collector):
    """The event log's extent and the served model's watermark, read at scrape time: what log
    retention keeps, and what a restart or a retrain would read."""

    def __init__(self, live: Callable[[], LiveState | None]) -> None:
        self.live = live

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """Nothing until the state is loaded."""
        state = self.live()
        if state is None or state.log is None or state.log.closed:
            return
        log = state.log
        yield GaugeMetricFamily("signedrec_log_first_seq", "Oldest event kept in the log",
                                value=log.first_seq)  # fmt: skip
        yield GaugeMetricFamily("signedrec_log_last_seq", "Newest event in the log",
                                value=log.last_seq)  # fmt: skip
        yield GaugeMetricFamily("signedrec_log_segments", "Event log segment files",
                                value=log.segment_count)  # fmt: skip
        yield GaugeMetricFamily(
            "signedrec_model_watermark",
            "Last logged event the served model was trained on (0: trained without the log)",
            value=state.item_side.artifact.watermark,
        )
