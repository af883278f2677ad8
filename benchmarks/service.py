"""Benchmark the real ``signedrec serve`` process over loopback HTTP and check the service bars.

Run from the repository root: ``python -m benchmarks.service [--kuairand-artifact DIR]``.
It starts the server as a subprocess (CPU kernels), measures client-side latency of
recommendations, feedback (fsync'd) and ``/healthz`` at concurrency 1 and 32, times the replay
of a 1,000,000-event log, reads idle RSS, and writes ``benchmarks/reports/service.{md,json,png}``.
Progress lines go to stderr.
"""

from __future__ import annotations

import os

# The client side must not fan NumPy work out over the two shared cores.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import asyncio
import contextlib
import itertools
import json
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import httpx
import matplotlib
import msgspec
import numpy as np
import numpy.typing as npt
import psutil

from benchmarks.host import command_line, cpu_model, git_state
from server.artifacts import read_ids, resolve
from server.config import EventLogConfig
from server.data import load_dataset
from server.events import EventLog, NewEvent
from server.launch import ServeProcess

matplotlib.use("Agg")
import matplotlib.pyplot as plt

REPO = Path(__file__).resolve().parent.parent
REPORTS = Path(__file__).resolve().parent / "reports"
DEFAULT_ARTIFACT = REPO / "model_artifacts" / "default"
DEFAULT_DATA = REPO / "model_artifacts" / "default-data"  # what the embedded default learned
START_TIMEOUT_S = 600.0

BAR_RECS_P99_MS = 5.0
BAR_FEEDBACK_P99_MS = 15.0
BAR_REPLAY_S = 10.0
SNAPSHOT_WAIT_S = 60.0  # for the snapshot a server takes after a long replay

KINDS = ("like", "dislike", "skip", "rating")
KIND_P = (0.4, 0.2, 0.25, 0.15)
REPLAY_LINE = re.compile(r"replayed (\d+) events in ([0-9.]+)s")

Request = tuple[str, str, dict[str, Any] | None]
F64 = npt.NDArray[np.float64]


def progress(message: str) -> None:
    """One progress line on stderr."""
    print(f"[service] {message}", file=sys.stderr, flush=True)


def load_avg() -> list[float]:
    """The 1/5/15-minute load averages, rounded."""
    return [round(x, 2) for x in os.getloadavg()]


def filesystem_of(path: Path) -> str:
    """The filesystem type holding ``path`` (fsync cost depends on it)."""
    best = ("", "unknown")
    target = str(path.resolve())
    for part in psutil.disk_partitions(all=True):
        mount = part.mountpoint
        if (target == mount or target.startswith(mount.rstrip("/") + "/")) and len(mount) > len(
            best[0]
        ):
            best = (mount, part.fstype)
    return f"{best[1]} on {best[0] or '?'}"


class ServerProcess(ServeProcess):
    """The real server on CPU kernels, with the server's own BLAS defaults."""

    def __init__(self, artifact: Path, state_dir: Path, log_path: Path) -> None:
        # The client's OPENBLAS_NUM_THREADS=1 is not the server's: it runs with its defaults.
        env = {"SIGNEDREC_KERNELS__BACKEND": "cpu", "OPENBLAS_NUM_THREADS": None}
        super().__init__(artifact, state_dir, log_path, env)

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S, poll_s: float = 0.01) -> float:
        """Seconds from process start to the first /readyz 200, polled finely (it is timed)."""
        return super().wait_ready(timeout_s, poll_s)

    def rss_mb(self) -> float:
        """Resident set size of the server process in MiB."""
        return self.rss_bytes() / 2**20


class CpuMeter:
    """CPU seconds used by this (client) process and by the server process."""

    def __init__(self, server_pid: int) -> None:
        self.server = psutil.Process(server_pid)

    def read(self) -> tuple[float, float]:
        """(client CPU s, server CPU s) so far."""
        me = resource.getrusage(resource.RUSAGE_SELF)
        srv = self.server.cpu_times()
        return me.ru_utime + me.ru_stime, srv.user + srv.system


class OtherCpu:
    """CPU that processes other than this benchmark and its servers used during a phase."""

    def __init__(self) -> None:
        self.server: psutil.Process | None = None
        self._start = self._read()
        self._wall = time.perf_counter()

    def _read(self) -> tuple[float, float, float]:
        """(busy CPU s of the whole machine, CPU s of ours, steal s)."""
        t = psutil.cpu_times()
        busy = t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)
        me = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)  # servers already waited for
        ours = me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
        if self.server is not None and self.server.is_running():
            with contextlib.suppress(psutil.Error):
                c = self.server.cpu_times()
                ours += c.user + c.system
        return busy, ours, getattr(t, "steal", 0.0)

    def track(self, pid: int) -> OtherCpu:
        """Count a running server as ours (call at phase start, before it is stopped)."""
        self.server = psutil.Process(pid)
        self._start = self._read()
        return self

    def cores(self) -> dict[str, float]:
        """Average cores used by others, and stolen by the hypervisor, since the start."""
        busy, ours, steal = self._read()
        wall = max(time.perf_counter() - self._wall, 1e-9)
        b0, o0, s0 = self._start
        other = max(0.0, (busy - b0) - (ours - o0))
        return {"other_cores": round(other / wall, 2), "steal_cores": round((steal - s0) / wall, 2)}


# -- request generators ------------------------------------------------------------------------
class Workload:
    """Seeded request makers for the three endpoints under test."""

    def __init__(self, users: list[str], items: list[str], seed: int, run_id: str) -> None:
        self.users = users
        self.items = items
        self.rng = np.random.default_rng(seed)
        self.run_id = run_id
        self.counter = itertools.count()

    def healthz(self) -> Request:
        """The framework floor: an empty liveness handler."""
        return ("GET", "/healthz", None)

    def recommendations(self) -> Request:
        """Top-20 for a random trained user."""
        user = self.users[int(self.rng.integers(len(self.users)))]
        return ("GET", f"/v1/recommendations/{user}?k=20", None)

    def feedback(self) -> Request:
        """One fresh event: random trained user, random real item, mixed kinds."""
        rng = self.rng
        kind = KINDS[int(rng.choice(4, p=KIND_P))]
        body: dict[str, Any] = {
            "event_id": f"bench-{self.run_id}-{next(self.counter)}",
            "user_id": self.users[int(rng.integers(len(self.users)))],
            "item_id": self.items[int(rng.integers(len(self.items)))],
            "kind": kind,
        }
        if kind == "rating":
            body["value"] = float(rng.integers(1, 6))
        return ("POST", "/v1/feedback", body)


def summarize(samples_ms: F64, wall_s: float, errors: int) -> dict[str, Any]:
    """Percentiles, max, mean, throughput and error count of one case."""
    return {
        "n": len(samples_ms),
        "errors": errors,
        "p50_ms": float(np.percentile(samples_ms, 50)),
        "p95_ms": float(np.percentile(samples_ms, 95)),
        "p99_ms": float(np.percentile(samples_ms, 99)),
        "max_ms": float(samples_ms.max()),
        "mean_ms": float(samples_ms.mean()),
        "throughput_rps": len(samples_ms) / wall_s if wall_s > 0 else 0.0,
        "wall_s": wall_s,
    }


def took_summary(took: list[float]) -> dict[str, float] | None:
    """Distribution of the server's own ``took_ms`` field."""
    if not took:
        return None
    arr = np.asarray(took, np.float64)
    return {
        "p50_ms": float(np.percentile(arr, 50)),
        "p95_ms": float(np.percentile(arr, 95)),
        "p99_ms": float(np.percentile(arr, 99)),
        "max_ms": float(arr.max()),
    }


# -- concurrency 1 -----------------------------------------------------------------------------
def run_sync_block(
    client: httpx.Client, make: Callable[[], Request], n: int, out: list[float], took: list[float]
) -> tuple[float, int]:
    """n requests one after another; latencies (ms) appended to out; (wall s, errors)."""
    errors = 0
    clock = time.perf_counter
    start_block = clock()
    for _ in range(n):
        method, url, body = make()
        start = clock()
        response = client.request(method, url, json=body)
        elapsed = clock() - start
        out.append(elapsed * 1e3)
        if response.status_code != 200:
            errors += 1
        elif url.startswith("/v1/recommendations"):
            took.append(float(response.json()["took_ms"]))
    return clock() - start_block, errors


def bench_concurrency_1(
    url: str, work: Workload, n: int, warmup: int, rounds: int, meter: CpuMeter
) -> dict[str, dict[str, Any]]:
    """Interleave the cases in rounds on one keep-alive client, so drift hits all alike."""
    makers = {
        "healthz": work.healthz,
        "recommendations": work.recommendations,
        "feedback": work.feedback,
    }
    samples: dict[str, list[float]] = {name: [] for name in makers}
    took: dict[str, list[float]] = {name: [] for name in makers}
    walls = dict.fromkeys(makers, 0.0)
    errors = dict.fromkeys(makers, 0)
    cpu = {name: [0.0, 0.0] for name in makers}
    per_round = max(1, n // rounds)
    with httpx.Client(base_url=url, timeout=30.0) as client:
        for name, make in makers.items():
            run_sync_block(client, make, warmup, [], [])
            progress(f"c=1 warm-up {name}: {warmup} requests")
        for r in range(rounds):
            for name, make in makers.items():
                before = meter.read()
                wall, errs = run_sync_block(client, make, per_round, samples[name], took[name])
                after = meter.read()
                cpu[name][0] += after[0] - before[0]
                cpu[name][1] += after[1] - before[1]
                walls[name] += wall
                errors[name] += errs
            progress(f"c=1 round {r + 1}/{rounds} done ({per_round} requests per case)")
    out: dict[str, dict[str, Any]] = {}
    for name in makers:
        arr = np.asarray(samples[name], np.float64)
        out[name] = summarize(arr, walls[name], errors[name])
        out[name]["server_took"] = took_summary(took[name])
        out[name]["client_cpu_us_per_req"] = cpu[name][0] / len(arr) * 1e6
        out[name]["server_cpu_us_per_req"] = cpu[name][1] / len(arr) * 1e6
        out[name]["samples_ms"] = arr
    return out


# -- concurrency N -----------------------------------------------------------------------------
class RawConnection:
    """A minimal HTTP/1.1 keep-alive client on asyncio streams (one connection, one request
    at a time): about 20 us of client CPU per request, against ~0.7-1.5 ms for httpx's
    AsyncClient on this machine, so the client does not starve the server of the shared cores."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Open the connection on first use or after the server closed it."""
        if self._reader is None or self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        return self._reader, self._writer

    async def request(self, method: str, path: str, body: dict[str, Any] | None) -> tuple[
        int, bytes
    ]:  # fmt: skip
        """Send one request, read one Content-Length response; (status, body)."""
        reader, writer = await self._connect()
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
        if body is None:
            writer.write(f"{head}\r\n".encode())
        else:
            payload = msgspec.json.encode(body)
            writer.write(
                f"{head}Content-Type: application/json\r\nContent-Length: {len(payload)}"
                "\r\n\r\n".encode()
                + payload
            )
        raw = await reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        length = -1
        close = False
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "connection" and value.strip().lower() == "close":
                close = True
        if length < 0:
            raise RuntimeError(f"response without Content-Length: {raw!r}")
        data = await reader.readexactly(length)
        if close:
            await self.aclose()
        return status, data

    async def aclose(self) -> None:
        """Close the connection."""
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()
        self._reader = self._writer = None


async def run_async_case(
    url: str, make: Callable[[], Request], n: int, warmup: int, concurrency: int, client: str
) -> dict[str, Any]:
    """n requests from `concurrency` workers, each with one request in flight at a time."""
    samples: list[float] = []
    took: list[float] = []
    errors = 0
    parsed = httpx.URL(url)
    shared: httpx.AsyncClient | None = None
    raws: list[RawConnection] = []
    senders: list[Callable[[str, str, dict[str, Any] | None], Awaitable[tuple[int, bytes]]]]
    if client == "httpx":
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        shared = httpx.AsyncClient(base_url=url, timeout=60.0, limits=limits)

        async def via_httpx(
            method: str, path: str, body: dict[str, Any] | None
        ) -> tuple[int, bytes]:
            response = await shared.request(method, path, json=body)  # type: ignore[union-attr]
            return response.status_code, response.content

        senders = [via_httpx] * concurrency
    else:
        raws = [RawConnection(parsed.host, parsed.port or 80) for _ in range(concurrency)]
        senders = [r.request for r in raws]

    async def worker(
        send: Callable[[str, str, dict[str, Any] | None], Awaitable[tuple[int, bytes]]],
        budget: itertools.count[int],
        limit: int,
        record: bool,
    ) -> None:
        nonlocal errors
        clock = time.perf_counter
        while next(budget) < limit:
            method, path, body = make()
            start = clock()
            status, data = await send(method, path, body)
            elapsed = clock() - start
            if not record:
                continue
            samples.append(elapsed * 1e3)
            if status != 200:
                errors += 1
            elif path.startswith("/v1/recommendations"):
                took.append(float(msgspec.json.decode(data)["took_ms"]))

    try:
        warm = itertools.count()
        await asyncio.gather(*(worker(s, warm, warmup, False) for s in senders))
        budget = itertools.count()
        started = time.perf_counter()
        await asyncio.gather(*(worker(s, budget, n, True) for s in senders))
        wall = time.perf_counter() - started
    finally:
        if shared is not None:
            await shared.aclose()
        for r in raws:
            await r.aclose()
    arr = np.asarray(samples, np.float64)
    result = summarize(arr, wall, errors)
    result["server_took"] = took_summary(took)
    result["samples_ms"] = arr
    return result


def run_loop(coro: Coroutine[Any, Any, dict[str, Any]]) -> dict[str, Any]:
    """Run a coroutine on uvloop when available (less client overhead), else asyncio."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def bench_concurrency_n(
    url: str, work: Workload, n: int, concurrency: int, client: str, meter: CpuMeter
) -> dict[str, dict[str, Any]]:
    """Each case in turn at the given concurrency; plus /healthz through httpx for contrast."""
    cases: dict[str, tuple[Callable[[], Request], str, int]] = {
        "healthz": (work.healthz, client, n),
        "recommendations": (work.recommendations, client, n),
        "feedback": (work.feedback, client, n),
    }
    if client != "httpx":
        cases["healthz via httpx.AsyncClient"] = (work.healthz, "httpx", max(1, n // 5))
    out: dict[str, dict[str, Any]] = {}
    for name, (make, kind, count) in cases.items():
        before = meter.read()
        out[name] = run_loop(run_async_case(url, make, count, concurrency * 10, concurrency, kind))
        after = meter.read()
        out[name]["client"] = kind
        out[name]["client_cpu_us_per_req"] = (after[0] - before[0]) / count * 1e6
        out[name]["server_cpu_us_per_req"] = (after[1] - before[1]) / count * 1e6
        progress(
            f"c={concurrency} {name}: p50 {out[name]['p50_ms']:.2f} ms, "
            f"p99 {out[name]['p99_ms']:.2f} ms, {out[name]['throughput_rps']:.0f} req/s"
        )
    return out


# -- replay ------------------------------------------------------------------------------------
def write_event_log(
    state_dir: Path, users: list[str], items: list[str], n: int, batch: int, seed: int
) -> dict[str, Any]:
    """Write n events with EventLog.append_sync (fsync off for this step only)."""
    rng = np.random.default_rng(seed + 1)
    config = EventLogConfig(fsync=False)
    log, _ = EventLog.open(state_dir / "events", config)
    new_pool = max(1, n // 20)  # up to 50k users created online for 1M events
    started = time.perf_counter()
    base_ts = time.time() - n * 0.001
    new_users_seen: set[int] = set()
    try:
        for first in range(0, n, batch):
            size = min(batch, n - first)
            is_new = rng.random(size) < 0.2
            known = rng.integers(len(users), size=size)
            fresh = rng.integers(new_pool, size=size)
            item_idx = rng.integers(len(items), size=size)
            kinds = rng.choice(4, size=size, p=KIND_P)
            ratings = rng.integers(1, 6, size=size).astype(np.float64)
            new_users_seen.update(fresh[is_new].tolist())
            events = [
                NewEvent(
                    event_id=f"replay-{first + j}",
                    user_id=f"new-{fresh[j]}" if is_new[j] else users[known[j]],
                    item_id=items[item_idx[j]],
                    kind=KINDS[kinds[j]],
                    ts=base_ts + (first + j) * 0.001,
                    value=float(ratings[j]) if kinds[j] == 3 else None,
                )
                for j in range(size)
            ]
            log.append_sync(events)
            if (first // batch) % 20 == 0:
                progress(f"replay log: {first + size:,}/{n:,} events written")
    finally:
        log.close_sync()
    seconds = time.perf_counter() - started
    size_bytes = sum(p.stat().st_size for p in (state_dir / "events").glob("events-*.log"))
    return {
        "events": n,
        "batch": batch,
        "write_s": seconds,
        "log_mb": size_bytes / 2**20,
        "new_users": len(new_users_seen),
        "existing_user_share": 0.8,
    }


def parse_replay(log_text: str) -> tuple[int, float] | None:
    """(events, seconds) from the server's "replayed N events in X s" line."""
    found = REPLAY_LINE.findall(log_text)
    if not found:
        return None
    events, seconds = found[-1]
    return int(events), float(seconds)


def bench_replay(
    artifact: Path, work_dir: Path, users: list[str], items: list[str], n: int, seed: int,
    train_data: Path | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Write an n-event log, then time process start -> /readyz and the server's replay; with
    ``train_data`` (the artifact's dataset) also a version trained on that log, and a restart
    on it (nothing to replay; the dedup window's ids are read back from the log)."""
    state = work_dir / "replay-state"
    shutil.rmtree(state, ignore_errors=True)
    state.mkdir(parents=True)
    progress(f"replay: writing {n:,} events into {state / 'events'}")
    written = write_event_log(state, users, items, n, 10_000, seed)
    progress(f"replay: log written in {written['write_s']:.1f} s ({written['log_mb']:.0f} MiB)")
    result: dict[str, Any] = {"log": written, "load_at_start": load_avg()}
    server = ServerProcess(artifact, state, work_dir / "server-replay.log")
    try:
        ready = server.wait_ready()
        parsed = parse_replay(server.log_text())
        # After a long replay the server snapshots once ready (paced copy, then a worker write).
        deadline = time.monotonic() + SNAPSHOT_WAIT_S
        while "snapshot written" not in server.log_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        result.update(
            start_to_ready_s=ready,
            replayed_events=parsed[0] if parsed else None,
            replay_s=parsed[1] if parsed else None,
            snapshot_written="snapshot written" in server.log_text(),
            idle_rss_mb_after_replay=server.rss_mb(),
        )
        progress(
            f"replay: ready after {ready:.2f} s from process start; server log: "
            f"{parsed[0] if parsed else '?'} events in {parsed[1] if parsed else '?'} s"
        )
    finally:
        server.stop()
    # A restart on the same state: the snapshot written after the big replay is restored.
    again = ServerProcess(artifact, state, work_dir / "server-replay-restart.log")
    try:
        result["restart_with_snapshot_to_ready_s"] = again.wait_ready()
        parsed = parse_replay(again.log_text())
        result["restart_replayed_events"] = parsed[0] if parsed else None
        result["restart_replay_s"] = parsed[1] if parsed else None
        progress(f"replay: restart with snapshot ready after "
                 f"{result['restart_with_snapshot_to_ready_s']:.2f} s")  # fmt: skip
    finally:
        again.stop()
    if train_data is not None:
        result.update(bench_log_trained_restart(artifact, state, work_dir, train_data))
    return result


def trained_on(artifact: Path, data: Path) -> bool:
    """Whether ``data`` is the dataset an artifact was trained on (its manifest fingerprint)."""
    dataset = json.loads((resolve(artifact) / "manifest.json").read_text())["dataset"]
    if not (data / "train.txt").is_file():
        return False
    return load_dataset(data, float(dataset["threshold"])).fingerprint == dataset["fingerprint"]


def bench_log_trained_restart(
    artifact: Path, state: Path, work_dir: Path, train_data: Path
) -> dict[str, Any]:
    """`signedrec train --events STATE --hyper-from ARTIFACT`, then a restart on that version."""
    version = resolve(artifact)
    threshold = json.loads((version / "manifest.json").read_text())["dataset"]["threshold"]
    command = [sys.executable, "-m", "server.cli", "train", "--data", str(train_data),
               "--threshold", str(threshold), "--out", str(work_dir / "log-trained"),
               "--hyper-from", str(version), "--events", str(state)]  # fmt: skip
    progress("replay: training a version on the log (train --events --hyper-from)")
    started = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
    train_s = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"train --events failed: {proc.stderr[-3000:]}")
    trained = Path(proc.stdout.strip().splitlines()[-1])
    server = ServerProcess(trained, state, work_dir / "server-replay-trained.log")
    try:
        ready = server.wait_ready()
        parsed = parse_replay(server.log_text())
    finally:
        server.stop()
    progress(f"replay: trained on the log in {train_s:.1f} s; restart on it ready after "
             f"{ready:.2f} s")  # fmt: skip
    return {
        "train_on_log_s": train_s,
        "restart_on_log_trained_to_ready_s": ready,
        "log_trained_replayed_events": parsed[0] if parsed else None,
        "log_trained_replay_s": parsed[1] if parsed else None,
    }


def bench_idle_rss(artifact: Path, work_dir: Path, name: str) -> dict[str, Any]:
    """Start on an empty state dir, wait ready, sleep 2 s, read RSS."""
    state = work_dir / f"rss-{name}"
    shutil.rmtree(state, ignore_errors=True)
    server = ServerProcess(artifact, state, work_dir / f"server-rss-{name}.log")
    try:
        ready = server.wait_ready()
        time.sleep(2.0)
        rss = server.rss_mb()
    finally:
        server.stop()
    version = resolve(artifact)
    manifest = json.loads((version / "manifest.json").read_text())
    dataset = manifest.get("dataset", {})
    progress(f"idle RSS {name}: {rss:.0f} MiB (ready after {ready:.2f} s)")
    return {
        "artifact": str(version),
        "n_items": dataset.get("n_items"),
        "n_users": dataset.get("n_users"),
        "start_to_ready_s": ready,
        "idle_rss_mb": rss,
    }


# -- bars and reports --------------------------------------------------------------------------
def verdict(passed: bool) -> str:
    """PASS or FAIL."""
    return "PASS" if passed else "FAIL"


def bars(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The three bars, computed from the measurements."""
    c1 = results["latency"]["c1"]
    rec = c1["recommendations"]["p99_ms"]
    fb = c1["feedback"]["p99_ms"]
    replay = results["replay"]
    replay_s = replay.get("replay_s")
    out = [
        {"bar": f"recommendations p99 <= {BAR_RECS_P99_MS:g} ms at concurrency 1",
         "value": f"{rec:.2f} ms", "passed": rec <= BAR_RECS_P99_MS},
        {"bar": f"feedback (fsync) p99 <= {BAR_FEEDBACK_P99_MS:g} ms at concurrency 1",
         "value": f"{fb:.2f} ms", "passed": fb <= BAR_FEEDBACK_P99_MS},
        {"bar": f"replay of {replay['log']['events']:,} events <= {BAR_REPLAY_S:g} s "
                "(server's own replay time)",
         "value": f"{replay_s:.2f} s" if replay_s is not None else "not found in log",
         "passed": replay_s is not None and replay_s <= BAR_REPLAY_S},
        {"bar": f"same log, process start -> /readyz 200 <= {BAR_REPLAY_S:g} s (stricter reading)",
         "value": f"{replay['start_to_ready_s']:.2f} s",
         "passed": replay["start_to_ready_s"] <= BAR_REPLAY_S},
    ]  # fmt: skip
    return out


def fmt(x: float | None, digits: int = 2) -> str:
    """A number for a table cell."""
    return "-" if x is None else f"{x:.{digits}f}"


def write_markdown(path: Path, results: dict[str, Any]) -> None:
    """The human-readable report."""
    m = results["machine"]
    lat = results["latency"]
    lines = [
        "# Service benchmark (real server over loopback HTTP)",
        "",
        f"Command: `{results['command']}`  ",
        f"Machine: {m['cpu_model']}, {m['cpu_count']} logical CPUs, {m['platform']}, "
        f"Python {m['python']}. State dirs on {m['state_fs']}. Code: {m['git']}.  ",
        f"Load average (1/5/15 min) at start {m['load_start']}, at end {m['load_end']}; "
        f"per phase: {', '.join(f'{k} {v}' for k, v in m['load_phases'].items())}.  ",
        "CPU used by other processes during each phase (average cores of the "
        f"{m['cpu_count']}; 0 = the machine was ours): "
        + ", ".join(
            f"{k} {v['other_cores']:.2f} (steal {v['steal_cores']:.2f})"
            for k, v in m["other_cpu"].items()
        )
        + ".  ",
        "Client and server share the same cores; latency is client-side wall clock per request "
        "over loopback keep-alive connections, so it includes the client's own overhead — "
        "`/healthz` in the same run is that floor. Concurrency 1 uses one `httpx.Client`; "
        "concurrency N uses N asyncio workers, each with one request in flight on its own "
        "connection, through a minimal raw HTTP/1.1 client by default (`--client raw`): "
        "`httpx.AsyncClient` costs far more client CPU per request than the server spends "
        "(see the `via httpx.AsyncClient` row and the CPU columns), so on two shared cores it "
        "would measure the client. CPU columns: process CPU time over the case divided by "
        "requests (client includes its percentile bookkeeping). Kernels backend: cpu.",
        "",
        "## Latency",
        "",
        "| endpoint | concurrency | client | requests | errors | p50 ms | p95 ms | p99 ms "
        "| max ms | mean ms | req/s | p99 / healthz p99 | client CPU us/req | server CPU us/req |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, conc in (("c1", 1), ("cn", results["config"]["concurrency"])):
        floor = lat[key]["healthz"]["p99_ms"]
        for name, r in lat[key].items():
            lines.append(
                f"| {name} | {conc} | {r.get('client', 'httpx')} | {r['n']} | {r['errors']} | "
                f"{fmt(r['p50_ms'])} | {fmt(r['p95_ms'])} | {fmt(r['p99_ms'])} | "
                f"{fmt(r['max_ms'])} | {fmt(r['mean_ms'])} | {r['throughput_rps']:.0f} | "
                f"{r['p99_ms'] / floor:.2f} | {r['client_cpu_us_per_req']:.0f} | "
                f"{r['server_cpu_us_per_req']:.0f} |"
            )
    lines += [
        "",
        "Server-side `took_ms` of recommendations (handler time, includes the micro-batch tick):",
        "",
        "| concurrency | p50 ms | p95 ms | p99 ms | max ms |",
        "|---|---|---|---|---|",
    ]
    for key, conc in (("c1", 1), ("cn", results["config"]["concurrency"])):
        t = lat[key]["recommendations"]["server_took"] or {}
        lines.append(
            f"| {conc} | {fmt(t.get('p50_ms'), 3)} | {fmt(t.get('p95_ms'), 3)} | "
            f"{fmt(t.get('p99_ms'), 3)} | {fmt(t.get('max_ms'), 3)} |"
        )
    rp = results["replay"]
    log = rp["log"]
    lines += [
        "",
        "## Replay",
        "",
        f"Log: {log['events']:,} events written with `EventLog.append_sync` in batches of "
        f"{log['batch']:,} (fsync off for writing only) in {log['write_s']:.1f} s, "
        f"{log['log_mb']:.0f} MiB; 80% of events from artifact users, 20% from "
        f"{log['new_users']:,} new users; real item ids; kinds like/dislike/skip/rating "
        f"= {'/'.join(f'{p:g}' for p in KIND_P)}.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| server log: replayed events | {rp.get('replayed_events')} |",
        f"| server log: replay time (snapshot read + log read/decode + apply; the timer starts "
        "after `EventLog.open` has scanned and CRC-checked the log) | "
        f"{fmt(rp.get('replay_s'))} s |",
        f"| process start -> /readyz 200 | {rp['start_to_ready_s']:.2f} s |",
        f"| same, empty state dir (fixed start cost) | {results['empty_start_to_ready_s']:.2f} s |",
        f"| snapshot of the replayed state (replayed >= snapshot_every_events: copied in paced "
        f"steps once ready, then written by a worker thread) | {rp.get('snapshot_written')} |",
        f"| restart on the same state (snapshot restored) -> /readyz 200 | "
        f"{fmt(rp.get('restart_with_snapshot_to_ready_s'))} s "
        f"(replayed {rp.get('restart_replayed_events')} events in "
        f"{fmt(rp.get('restart_replay_s'))} s) |",
        *(
            [
                f"| `signedrec train --events` on that log (`--hyper-from`, no search), wall | "
                f"{fmt(rp['train_on_log_s'])} s |",
                f"| restart on the version trained on it -> /readyz 200 | "
                f"{fmt(rp['restart_on_log_trained_to_ready_s'])} s (replayed "
                f"{rp.get('log_trained_replayed_events')} events in "
                f"{fmt(rp.get('log_trained_replay_s'))} s, the dedup window's ids read back) |",
            ]
            if "train_on_log_s" in rp
            else []
        ),
        f"| idle RSS after replaying {log['events']:,} events | "
        f"{rp['idle_rss_mb_after_replay']:.0f} MiB |",
        "",
        "## Idle RSS",
        "",
        "| artifact | items | users | start -> ready s | idle RSS MiB |",
        "|---|---|---|---|---|",
    ]
    for name, r in results["rss"].items():
        lines.append(
            f"| {name} (`{r['artifact']}`) | {r['n_items']} | {r['n_users']} | "
            f"{r['start_to_ready_s']:.2f} | {r['idle_rss_mb']:.0f} |"
        )
    if "default_after_load_mb" in results:
        lines.append(
            f"\nDefault artifact RSS after the latency runs: "
            f"{results['default_after_load_mb']:.0f} MiB."
        )
    lines += ["", "## Bars", ""]
    for bar in results["bars"]:
        lines.append(f"- {bar['bar']}: **{verdict(bar['passed'])}** ({bar['value']})")
    if results.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in results["notes"]]
    lines += ["", "![latency](service.png)", ""]
    path.write_text("\n".join(lines))


def write_plot(path: Path, results: dict[str, Any]) -> None:
    """Percentile bars per case and the concurrency-1 latency CDFs."""
    lat = results["latency"]
    conc = results["config"]["concurrency"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    labels: list[str] = []
    values: dict[str, list[float]] = {"p50_ms": [], "p95_ms": [], "p99_ms": []}
    for key, c in (("c1", 1), ("cn", conc)):
        for name in ("healthz", "recommendations", "feedback"):
            labels.append(f"{name}\nc={c}")
            for q in values:
                values[q].append(lat[key][name][q])
    x = np.arange(len(labels))
    for offset, (q, vals) in zip((-0.27, 0.0, 0.27), values.items(), strict=True):
        ax1.bar(x + offset, vals, width=0.27, label=q.replace("_ms", ""))
    ax1.axhline(BAR_RECS_P99_MS, color="tab:red", ls="--", lw=1, label="recs p99 bar (c=1)")
    ax1.axhline(BAR_FEEDBACK_P99_MS, color="tab:purple", ls=":", lw=1,
                label="feedback p99 bar (c=1)")  # fmt: skip
    ax1.set_xticks(x, labels, fontsize=8)
    ax1.set_yscale("log")
    ax1.set_ylabel("client latency, ms (log)")
    ax1.set_title("latency percentiles")
    ax1.legend(fontsize=8)
    for name in ("healthz", "recommendations", "feedback"):
        s = np.sort(lat["c1"][name]["samples_ms"])
        ax2.plot(s, np.arange(1, len(s) + 1) / len(s), label=name)
    ax2.set_xscale("log")
    ax2.set_xlabel("client latency, ms (log)")
    ax2.set_ylabel("fraction of requests")
    ax2.set_title("concurrency 1: latency CDF")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def strip_samples(obj: Any) -> Any:
    """A copy of the results without the raw sample arrays (for JSON)."""
    if isinstance(obj, dict):
        return {k: strip_samples(v) for k, v in obj.items() if k != "samples_ms"}
    if isinstance(obj, list):
        return [strip_samples(v) for v in obj]
    return obj


# -- main --------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--artifact", type=Path, default=DEFAULT_ARTIFACT)
    p.add_argument("--kuairand-artifact", type=Path, default=None,
                   help="a kuairand artifact (root or version) for its idle RSS")  # fmt: skip
    p.add_argument("--requests", type=int, default=3000, help="per case at concurrency 1")
    p.add_argument("--warmup", type=int, default=200, help="per case at concurrency 1")
    p.add_argument("--rounds", type=int, default=6, help="interleaved rounds at concurrency 1")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--concurrent-requests", type=int, default=5000, help="per case")
    p.add_argument(
        "--client",
        choices=("raw", "httpx"),
        default="raw",
        help="client at concurrency N: raw asyncio HTTP/1.1 or httpx.AsyncClient",
    )
    p.add_argument("--replay-events", type=int, default=1_000_000)
    p.add_argument("--train-data", type=Path, default=DEFAULT_DATA,
                   help="the artifact's dataset, to train a version on the replay log")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", type=Path, default=None, help="default: a new temp dir")
    p.add_argument("--keep", action="store_true", help="keep the work dir (server logs, state)")
    p.add_argument("--out", type=Path, default=REPORTS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run every phase and write the reports."""
    args = parse_args(argv)
    command = command_line("benchmarks.service", sys.argv[1:] if argv is None else argv)
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="signedrec-service-bench-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    users, items = read_ids(args.artifact)
    phases: dict[str, list[float]] = {"start": load_avg()}
    foreign: dict[str, dict[str, float]] = {}
    results: dict[str, Any] = {
        "command": command.strip(),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "notes": [],
    }
    progress(f"work dir {work_dir}; load average {phases['start']}; "
             f"{len(users)} users, {len(items)} items")  # fmt: skip
    try:
        # 1-2. latency on a fresh default server; its idle RSS first.
        server = ServerProcess(args.artifact, work_dir / "latency-state",
                               work_dir / "server-latency.log")  # fmt: skip
        try:
            results["empty_start_to_ready_s"] = server.wait_ready()
            time.sleep(2.0)
            results["rss"] = {
                "default": {
                    "artifact": str(resolve(args.artifact)),
                    "n_items": len(items),
                    "n_users": len(users),
                    "start_to_ready_s": results["empty_start_to_ready_s"],
                    "idle_rss_mb": server.rss_mb(),
                }
            }
            progress(f"server ready after {results['empty_start_to_ready_s']:.2f} s, "
                     f"idle RSS {results['rss']['default']['idle_rss_mb']:.0f} MiB")  # fmt: skip
            work = Workload(users, items, args.seed, f"{os.getpid()}-{int(time.time())}")
            phases["latency c=1"] = load_avg()
            meter = CpuMeter(server.proc.pid)
            others = OtherCpu().track(server.proc.pid)
            c1 = bench_concurrency_1(
                server.url, work, args.requests, args.warmup, args.rounds, meter
            )
            foreign["latency c=1"] = others.cores()
            for name, r in c1.items():
                progress(f"c=1 {name}: p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms")
            phases[f"latency c={args.concurrency}"] = load_avg()
            others = OtherCpu().track(server.proc.pid)
            cn = bench_concurrency_n(
                server.url, work, args.concurrent_requests, args.concurrency, args.client, meter
            )
            foreign[f"latency c={args.concurrency}"] = others.cores()
            results["latency"] = {"c1": c1, "cn": cn}
            results["default_after_load_mb"] = server.rss_mb()
        finally:
            server.stop()
        # 3. replay.
        phases["replay"] = load_avg()
        others = OtherCpu()
        # The log-trained restart needs the artifact's own dataset (the default's is in the repo).
        same_data = trained_on(args.artifact, args.train_data)
        if not same_data:
            results["notes"].append(f"{args.train_data} is not the data {args.artifact} was "
                                    "trained on: log-trained restart not measured")  # fmt: skip
        results["replay"] = bench_replay(
            args.artifact, work_dir, users, items, args.replay_events, args.seed,
            args.train_data if same_data else None,
        )  # fmt: skip
        foreign["replay"] = others.cores()
        # 4. idle RSS of a kuairand artifact.
        if args.kuairand_artifact is not None:
            phases["kuairand rss"] = load_avg()
            results["rss"]["kuairand"] = bench_idle_rss(args.kuairand_artifact, work_dir,
                                                        "kuairand")  # fmt: skip
        else:
            results["notes"].append("no --kuairand-artifact given: kuairand idle RSS not measured")
    finally:
        if args.keep:
            progress(f"kept work dir {work_dir}")
        else:
            shutil.rmtree(work_dir, ignore_errors=True)
    phases["end"] = load_avg()
    results["machine"] = {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "git": git_state(("server", "kernels")),
        "state_fs": filesystem_of(work_dir.parent if not work_dir.exists() else work_dir),
        "load_start": phases["start"],
        "load_end": phases["end"],
        "load_phases": {k: v for k, v in phases.items() if k not in ("start", "end")},
        "other_cpu": foreign,
    }
    results["bars"] = bars(results)
    args.out.mkdir(parents=True, exist_ok=True)
    write_plot(args.out / "service.png", results)
    write_markdown(args.out / "service.md", results)
    (args.out / "service.json").write_text(json.dumps(strip_samples(results), indent=2) + "\n")
    progress(f"CPU of other processes (cores): {foreign}")
    for bar in results["bars"]:
        progress(f"{verdict(bar['passed'])}: {bar['bar']} ({bar['value']})")
    progress(f"wrote {args.out / 'service.md'}, service.json, service.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
