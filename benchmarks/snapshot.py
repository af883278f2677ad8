"""How long a periodic snapshot stalls the server: read and write latency while one is taken.

Run from the repository root: ``python -m benchmarks.snapshot``. Writes
``benchmarks/reports/snapshot.{md,json,png}``.

For each size N it starts the real server on the embedded default with
``log.snapshot_every_events = N``, loads N - 2,000 feedback events over HTTP (on 50,000 users),
then runs a reader (one GET /v1/recommendations after another) while a writer posts 100 events
every 50 ms: the first seconds are the baseline, then the posts cross N and the server takes its
periodic snapshot. Latencies of the requests that overlap the snapshot (from the post that
crossed N to the "snapshot written" log line) are reported against the baseline.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from benchmarks.host import command_line
from benchmarks.quality import REPORTS, git_state, load_avg, machine, report_header
from server.artifacts import load_artifact, resolve
from server.default import DEFAULT_ARTIFACTS
from server.launch import ServeProcess

USERS = 50_000
LOAD_BATCH = 5_000  # events per loading request (the server's max_events_per_batch)
BEFORE = 2_000  # events short of N when measuring starts
POST = 100  # events per measured post
POST_EVERY_S = 0.05
BASELINE_S = 2.0
AFTER_S = 60.0  # give up on a snapshot not written this long after crossing N
AFTER_WRITTEN_S = 1.0  # keep measuring this long after it is written
WRITTEN = re.compile(r"^(\S+ \S+) .*snapshot written at seq \d+")


def progress(message: str) -> None:
    """One progress line on stderr."""
    print(f"[snapshot] {message}", file=sys.stderr, flush=True)


def events(rng: np.random.Generator, n: int, items: np.ndarray) -> list[dict[str, str]]:
    """``n`` likes and dislikes of random users on random items."""
    users, picks = rng.integers(0, USERS, n), rng.integers(0, len(items), n)
    return [{"event_id": uuid.uuid4().hex, "user_id": f"u{u}", "item_id": str(items[i]),
             "kind": "dislike" if i % 3 == 0 else "like"}
            for u, i in zip(users, picks, strict=True)]  # fmt: skip


def written_at(log: str) -> float | None:
    """When the server logged its first "snapshot written" line (epoch seconds), if it has."""
    for line in log.splitlines():
        m = WRITTEN.match(line)
        if m:
            return datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return None


def summary(latencies: list[float]) -> dict[str, float]:
    """Count, p50, p99 and max in ms."""
    a = np.asarray(latencies) * 1e3
    if a.size == 0:
        return {"n": 0, "p50_ms": 0.0, "p99_ms": 0.0, "max_ms": 0.0}
    return {"n": int(a.size), "p50_ms": float(np.percentile(a, 50)),
            "p99_ms": float(np.percentile(a, 99)), "max_ms": float(a.max())}  # fmt: skip


def measure(size: int, seed: int) -> dict[str, Any]:
    """Load ``size`` - BEFORE events, then time requests across the periodic snapshot at size."""
    work = Path(tempfile.mkdtemp(prefix="signedrec-snapshot-"))
    env = {"SIGNEDREC_LOG__SNAPSHOT_EVERY_EVENTS": str(size), "SIGNEDREC_KERNELS__BACKEND": "cpu"}
    server = ServeProcess(DEFAULT_ARTIFACTS, work / "state", work / "server.log", env)
    rng, reader_rng = np.random.default_rng(seed), np.random.default_rng(seed + 1)
    items = load_artifact(resolve(DEFAULT_ARTIFACTS)).arrays["item_ids"]
    try:
        server.wait_ready()
        with httpx.Client(base_url=server.url, timeout=120) as client:
            sent, started = 0, time.perf_counter()
            while sent < size - BEFORE:
                batch = min(LOAD_BATCH, size - BEFORE - sent)
                client.post("/v1/feedback", json=events(rng, batch, items)).raise_for_status()
                sent += batch
                if sent % 100_000 < LOAD_BATCH:
                    progress(f"N={size:,}: loaded {sent:,} events "
                             f"({sent / (time.perf_counter() - started):,.0f}/s)")  # fmt: skip
            reads: list[tuple[float, float]] = []
            stop = threading.Event()

            def reader() -> None:
                with httpx.Client(base_url=server.url, timeout=120) as rc:
                    while not stop.is_set():
                        t = time.time()
                        user = int(reader_rng.integers(0, USERS))
                        rc.get(f"/v1/recommendations/u{user}").raise_for_status()
                        reads.append((t, time.time() - t))

            thread = threading.Thread(target=reader)
            thread.start()
            time.sleep(BASELINE_S)
            writes: list[tuple[float, float]] = []
            crossed = written = None
            while crossed is None or time.time() - crossed < AFTER_S:
                t = time.time()
                client.post("/v1/feedback", json=events(rng, POST, items)).raise_for_status()
                writes.append((t, time.time() - t))
                sent += POST
                if crossed is None and sent >= size:
                    crossed = t
                if crossed is not None and written is None:
                    written = written_at(server.log_text())
                if written is not None and time.time() - written > AFTER_WRITTEN_S:
                    break
                time.sleep(POST_EVERY_S)
            stop.set()
            thread.join()
    finally:
        server.stop()
    if crossed is None or written is None:
        raise SystemExit(f"N={size}: no periodic snapshot was written; see {work / 'server.log'}")
    t0 = reads[0][0]
    during = [d for t, d in reads if t + d >= crossed and t <= written]
    baseline = [d for t, d in reads if t < crossed - 0.2]
    row = {
        "events": size,
        "users": USERS,
        "snapshot_s": written - crossed,
        "reads_baseline": summary(baseline),
        "reads_during": summary(during),
        "writes_baseline": summary([d for t, d in writes if t + d < crossed]),
        "writes_during": summary([d for t, d in writes if t + d >= crossed and t <= written]),
        "timeline": {
            "t": [t - t0 for t, _ in reads],
            "ms": [d * 1e3 for _, d in reads],
            "crossed": crossed - t0,
            "written": written - t0,
        },
    }
    progress(
        f"N={size:,}: snapshot in {row['snapshot_s']:.2f} s; reads max "
        f"{row['reads_during']['max_ms']:.0f} ms during (baseline "
        f"{row['reads_baseline']['max_ms']:.0f}), posts max {row['writes_during']['max_ms']:.0f} ms"
    )
    return row


def write_report(result: dict[str, Any], out: Path) -> None:
    """Markdown, JSON and a latency timeline per size."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "snapshot.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        *report_header(
            "Periodic snapshot: how long it stalls requests",
            result["command"],
            result["machine"],
            result["load_start"],
            result["code"],
        ),
        "The real server on the embedded default, `log.snapshot_every_events = N`; N - 2,000 "
        f"events loaded over HTTP on {USERS:,} users, then one reader (GETs back to back) and a "
        f"writer posting {POST} events every {POST_EVERY_S * 1e3:.0f} ms, which crosses N. "
        "*During*: requests overlapping the snapshot (from the post that crossed N to the "
        "server's `snapshot written` line, which includes the fsync); *baseline*: the reader's "
        "requests in the seconds before. Posts include the event log's fsync.",
        "",
        "| events N | snapshot s | reads baseline p99 / max ms | reads during p50 / p99 / max "
        "ms | posts baseline max ms | posts during max ms |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        b, d = r["reads_baseline"], r["reads_during"]
        lines.append(
            f"| {r['events']:,} | {r['snapshot_s']:.2f} | {b['p99_ms']:.1f} / {b['max_ms']:.1f} "
            f"| {d['p50_ms']:.1f} / {d['p99_ms']:.1f} / {d['max_ms']:.1f} "
            f"| {r['writes_baseline']['max_ms']:.0f} | {r['writes_during']['max_ms']:.0f} |"
        )
    (out / "snapshot.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, axes = plt.subplots(1, len(rows), figsize=(6 * len(rows), 3.8), squeeze=False)
    for ax, r in zip(axes[0], rows, strict=True):
        tl = r["timeline"]
        ax.plot(tl["t"], tl["ms"], ".", ms=2)
        ax.axvspan(tl["crossed"], tl["written"], color="orange", alpha=0.3, label="snapshot")
        ax.set_yscale("log")
        ax.set_xlabel("s")
        ax.set_ylabel("GET /v1/recommendations ms")
        ax.set_title(f"N = {r['events']:,} events")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "snapshot.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Measure a periodic snapshot at each size and write the report."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.snapshot", description=__doc__)
    p.add_argument("--events", type=int, nargs="+", default=[400_000, 1_000_000])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=REPORTS)
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    result: dict[str, Any] = {
        "command": command_line("benchmarks.snapshot", argv),
        "machine": machine(),
        "load_start": load_avg(),
        "code": git_state(),
        "rows": [measure(n, args.seed) for n in args.events],
    }
    write_report(result, args.out)
    progress(f"wrote {args.out / 'snapshot.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
