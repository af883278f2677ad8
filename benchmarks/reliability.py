"""Reliability benchmark: SIGKILL crash recovery, model reload under load, memory soak.

Run from the repository root::

    python -m benchmarks.reliability [--cycles 20] [--soak-seconds 600]

Three parts, each against the real ``signedrec serve`` process over HTTP:

- **crash**: a few concurrent senders stream feedback (unique event ids) while the server is
  killed with SIGKILL at random moments and restarted on the same state dir, ``--cycles`` times.
  Senders record every acknowledged (2xx) event id; events whose answer was lost are re-sent
  with the same id after the restart (at-least-once, as a real webhook client would). At the end
  every user's history is fetched and every acknowledged event must be there exactly once.
- **reload**: ~``--reload-rate`` req/s of mixed GETs for ``--reload-seconds`` while the model is
  reloaded to another version and rolled back several times; every failed request is counted.
- **soak**: ``--soak-seconds`` of steady mixed load (``--soak-rate`` req/s) with the server's RSS
  sampled every 5 s; growth after the warm-up is reported.
- **retrain**: the same feedback stream while ``--retrains`` versions are trained on the live log
  (``signedrec train --events``), each reloaded mid-stream and followed by a SIGKILL and restart;
  at the end the served state is audited against the log: every logged event in its user's
  history exactly once as logged, and each pair's latest trained event in the served graph.

Writes ``benchmarks/reports/reliability.{md,json,png}``; progress lines go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import platform
import random
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.host import command_line
from benchmarks.quality import git_state
from server.artifacts import Artifact, list_versions, load_artifact, save_artifact
from server.config import EventWeights
from server.default import DEFAULT_DATA, DEFAULT_THRESHOLD
from server.events import read_records
from server.feedback import rating_strength, strengths_by_kind
from server.launch import ServeProcess

REPO = Path(__file__).resolve().parent.parent
REPORTS = Path(__file__).resolve().parent / "reports"
DEFAULT_ROOT = REPO / "model_artifacts" / "default"
REQUEST_TIMEOUT = 10.0
SERVER_ENV = {"SIGNEDREC_KERNELS__BACKEND": "cpu"}
# Older than the default version, so a plain start serves the default and reload picks this.
ROTATED = "20000101T000000000Z"
RELOAD_EVERY = 3  # crash cycles: every third (1, 4, 7, ...) reloads the other version mid-stream
SOAK_WARMUP_S = 60.0
SOAK_SAMPLE_S = 5.0
BAR_SOAK_GROWTH_PCT = 5.0
HISTORY_LIMIT = 5000
SENDERS = 4  # concurrent feedback senders in the crash and retrain parts


def progress(message: str) -> None:
    """One progress line on stderr."""
    print(f"[reliability {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- the server process ----------------------------------------------------------------------
class Server(ServeProcess):
    """The real server with this benchmark's environment; its log appended to ``log_path``."""

    def __init__(self, artifact: Path, state_dir: Path, log_path: Path, env: dict[str, str]):
        super().__init__(artifact, state_dir, log_path, {**SERVER_ENV, **env})

    async def until_ready(self) -> float:
        """Seconds from spawn until /readyz answers 200, polled without blocking the loop."""
        return await asyncio.to_thread(self.wait_ready)


# -- a tiny keep-alive HTTP/1.1 client (cheap enough to drive hundreds of req/s on 2 cores) -----
class Conn:
    """One keep-alive connection; any error closes it and the next request reconnects."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    def close(self) -> None:
        """Drop the connection."""
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def request(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> tuple[int, bytes]:
        """Send one request and read the whole response: (status, body)."""
        try:
            return await asyncio.wait_for(self._request(method, path, body, headers),
                                          REQUEST_TIMEOUT)  # fmt: skip
        except BaseException:
            self.close()
            raise

    async def _request(
        self, method: str, path: str, body: bytes, headers: dict[str, str] | None
    ) -> tuple[int, bytes]:
        if self.reader is None or self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        reader, writer = self.reader, self.writer
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        if body:
            extra += "content-type: application/json\r\n"
        head = (f"{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: {len(body)}\r\n"
                f"{extra}\r\n")  # fmt: skip
        writer.write(head.encode() + body)
        status_line = await reader.readline()
        if not status_line:
            raise ConnectionResetError("connection closed before a response")
        status = int(status_line.split()[1])
        length = 0
        close = False
        while True:
            line = await reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.decode("latin-1").partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "connection" and value.strip().lower() == "close":
                close = True
            elif name == "transfer-encoding":
                raise ValueError("chunked responses are not supported by this client")
        data = await reader.readexactly(length) if length else b""
        if close:
            self.close()
        return status, data


# -- shared helpers --------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    """The machine the numbers come from."""
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
    }


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile of values (nan when empty)."""
    return float(np.percentile(values, q)) if values else float("nan")


def make_root(tmp: Path) -> tuple[Path, str]:
    """An artifact root with the default version plus a rotated, perturbed same-catalogue one."""
    root = tmp / "artifacts"
    source = list_versions(DEFAULT_ROOT)[-1]
    shutil.copytree(DEFAULT_ROOT / source, root / source)
    base = load_artifact(root / source)
    rng = np.random.default_rng(0)
    dim = base.arrays["item_table"].shape[1]
    rotation, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    arrays = dict(base.arrays)
    for name in ("item_table", "item_vectors"):
        rotated = arrays[name] @ rotation
        noise = rng.standard_normal(rotated.shape) * 0.05 * float(np.std(rotated))
        arrays[name] = (rotated + noise).astype(np.float32)
    keep = {k: v for k, v in base.manifest.items()
            if k not in ("files", "version", "created_at", "schema_version")}  # fmt: skip
    save_artifact(root, arrays, {**keep, "name": "rotated"}, version=ROTATED)
    return root, source


def catalogue() -> tuple[list[str], list[str]]:
    """Item ids and trained user ids of the default artifact."""
    base = load_artifact(DEFAULT_ROOT, verify=False)
    return base.arrays["item_ids"].tolist(), base.arrays["user_ids"].tolist()


def event(event_id: str, user: str, item: str, rng: random.Random) -> dict[str, Any]:
    """One random feedback event."""
    kind = rng.choice(["like", "like", "dislike", "skip", "rating"])
    body: dict[str, Any] = {"event_id": event_id, "user_id": user, "item_id": item, "kind": kind}
    if kind == "rating":
        body["value"] = float(rng.randint(1, 5))
    return body


# -- (a) crash recovery ----------------------------------------------------------------------
@dataclass
class CrashLedger:
    """What the senders know: every event sent, acknowledged, or whose answer was lost."""

    sent: dict[str, dict[str, Any]] = field(default_factory=dict)
    acked: set[str] = field(default_factory=set)
    in_doubt: collections.deque[list[dict[str, Any]]] = field(default_factory=collections.deque)
    resent_batches: int = 0
    resent_events: int = 0
    resent_found_durable: int = 0
    requests_ok: int = 0
    requests_failed: int = 0


async def _crash_sender(
    port: int, ledger: CrashLedger, stop: asyncio.Event, rng: random.Random, name: str,
    users: list[str], items: list[str], counter: collections.Counter[str],
) -> None:  # fmt: skip
    """Post small batches as fast as acknowledged; lost answers go back to ``in_doubt``."""
    conn = Conn(port)
    while not stop.is_set():
        if ledger.in_doubt:
            batch = ledger.in_doubt.popleft()
            resend = True
        else:
            batch = []
            for _ in range(rng.randint(1, 8)):
                counter[name] += 1
                ev = event(f"{name}-{counter[name]}", rng.choice(users), rng.choice(items), rng)
                ledger.sent[ev["event_id"]] = ev
                batch.append(ev)
            resend = False
        try:
            status, body = await conn.request("POST", "/v1/feedback", json.dumps(batch).encode())
        except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError):
            ledger.in_doubt.append(batch)
            ledger.requests_failed += 1
            await asyncio.sleep(0.05)
            continue
        if status != 200:
            raise RuntimeError(f"feedback answered {status}: {body[:500]!r}")
        answer = json.loads(body)
        if answer["accepted"] + answer["duplicates"] != len(batch):
            raise RuntimeError(f"feedback answer {answer} for {len(batch)} events")
        ledger.acked.update(ev["event_id"] for ev in batch)
        ledger.requests_ok += 1
        if resend:
            ledger.resent_batches += 1
            ledger.resent_events += len(batch)
            ledger.resent_found_durable += answer["duplicates"]
    conn.close()


def _start_senders(
    port: int, ledger: CrashLedger, rng: random.Random, prefix: str, users: list[str],
    items: list[str], counter: collections.Counter[str],
) -> tuple[asyncio.Event, list[asyncio.Task[None]]]:  # fmt: skip
    """SENDERS concurrent crash senders (ids ``{prefix}s{n}-k``) and the event that stops them."""
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(_crash_sender(port, ledger, stop, random.Random(rng.random()),
                                          f"{prefix}s{n}", users, items, counter))
        for n in range(SENDERS)
    ]  # fmt: skip
    return stop, tasks


async def _fetch_histories(port: int, users: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Every user's events with an id (dataset rows left out), newest first."""
    out: dict[str, list[dict[str, Any]]] = {}
    conns = [Conn(port) for _ in range(4)]

    async def one(conn: Conn, user: str) -> None:
        status, body = await conn.request("GET", f"/v1/users/{user}/history?limit={HISTORY_LIMIT}")
        if status == 404:
            out[user] = []
            return
        if status != 200:
            raise RuntimeError(f"history of {user} answered {status}: {body[:300]!r}")
        events = json.loads(body)["events"]
        if len(events) >= HISTORY_LIMIT:
            raise RuntimeError(f"history of {user} reached the limit; use more users")
        out[user] = [e for e in events if e["event_id"] is not None]

    for start in range(0, len(users), len(conns)):
        await asyncio.gather(*(one(c, u) for c, u in zip(conns, users[start:], strict=False)))
    for conn in conns:
        conn.close()
    return out


async def crash_benchmark(tmp: Path, cycles: int, seed: int) -> dict[str, Any]:
    """SIGKILL the server at random moments under a feedback stream; audit the log at the end."""
    rng = random.Random(seed)
    items, trained = catalogue()
    users = [f"crash-{i}" for i in range(250)] + trained[:50]
    state_dir = tmp / "crash-state"
    log_path = tmp / "crash-server.log"
    env = {"SIGNEDREC_LOG__SNAPSHOT_EVERY_EVENTS": "2000"}
    # Two versions of one catalogue: some cycles reload the other mid-stream, so the next start
    # (pinned to it) finds a snapshot of the previous version, restored and refolded.
    (tmp / "crash-root").mkdir()
    root, first = make_root(tmp / "crash-root")
    other = {first: ROTATED, ROTATED: first}
    serving = first
    ledger = CrashLedger()
    counter: collections.Counter[str] = collections.Counter()
    rows: list[dict[str, Any]] = []
    last_ready = 1.5
    for cycle in range(cycles):
        server = Server(root, state_dir, log_path, env)
        # Every fifth cycle kills during start-up (artifact load, snapshot restore, replay).
        during_start = cycle % 5 == 4
        row: dict[str, Any] = {"cycle": cycle, "killed_during_startup": during_start}
        if during_start:
            await asyncio.sleep(rng.uniform(0.1, 0.9) * last_ready)
            server.kill()
            # The server logs "ready: model ..." once loaded; a late kill is recorded as such.
            row.update(ready_s=None, acked=0, stream_s=None,
                       ready_at_kill="ready: model" in server.log_text())  # fmt: skip
            rows.append(row)
            progress(f"crash cycle {cycle + 1}/{cycles}: killed during start-up "
                     f"(ready already: {row['ready_at_kill']})")  # fmt: skip
            continue
        row["ready_s"] = round(await server.until_ready(), 3)
        last_ready = row["ready_s"]
        row["in_doubt_before"] = sum(len(b) for b in ledger.in_doubt)
        acked_before = len(ledger.acked)
        stop, senders = _start_senders(server.port, ledger, rng, f"c{cycle}", users, items,
                                       counter)  # fmt: skip
        stream_s = rng.uniform(0.3, 3.0)
        await asyncio.sleep(stream_s)
        if cycle % RELOAD_EVERY == 1:
            # A reload, then the kill at once or a little later: snapshots come every 2,000
            # events (a fraction of a second here), so only a prompt kill leaves the previous
            # version's snapshot on disk for the next start.
            admin = Conn(server.port)
            body = json.dumps({"version": other[serving]}).encode()
            status, _ = await admin.request("POST", "/v1/admin/model/reload", body)
            admin.close()
            row["reloaded_to"] = other[serving] if status == 200 else f"failed {status}"
            serving = other[serving] if status == 200 else serving
            await asyncio.sleep(rng.choice([0.0, rng.uniform(0.05, 0.5)]))
        server.kill()
        stop.set()
        await asyncio.gather(*senders)
        # The start-up report, read once the process is gone and its log complete.
        text = server.log_text()
        replay = re.search(r"replayed (\d+) events in ([\d.]+)s", text)
        row["replayed"] = int(replay.group(1)) if replay else None
        row["replay_s"] = float(replay.group(2)) if replay else None
        row["snapshot_restored"] = "restored snapshot" in text
        row["snapshot_refolded"] = "users refolded under" in text
        row.update(stream_s=round(stream_s, 3), acked=len(ledger.acked) - acked_before)
        row["in_doubt_after"] = sum(len(b) for b in ledger.in_doubt)
        rows.append(row)
        progress(f"crash cycle {cycle + 1}/{cycles}: ready {row['ready_s']}s, replayed "
                 f"{row['replayed']}, +{row['acked']} acked, {row['in_doubt_after']} in doubt "
                 "at the kill")  # fmt: skip
    # Audit on a final start; the last kill's unanswered events are left in doubt (not re-sent).
    server = Server(root, state_dir, log_path, env)
    final_ready = await server.until_ready()
    histories = await _fetch_histories(server.port, users)
    server.stop()
    seen: collections.Counter[str] = collections.Counter(
        e["event_id"] for events in histories.values() for e in events
    )
    lost = sorted(ledger.acked - set(seen))
    doubled = sorted(i for i, n in seen.items() if n > 1)
    unknown = sorted(set(seen) - set(ledger.sent))
    mismatched = sorted(
        e["event_id"]
        for user, events in histories.items()
        for e in events
        if e["event_id"] in ledger.sent
        and (ledger.sent[e["event_id"]]["user_id"], ledger.sent[e["event_id"]]["item_id"],
             ledger.sent[e["event_id"]]["kind"]) != (user, e["item_id"], e["kind"])
    )  # fmt: skip
    last_doubt = [ev["event_id"] for batch in ledger.in_doubt for ev in batch]
    result = {
        "cycles": cycles,
        "kills": cycles,
        "kills_during_startup": sum(r["killed_during_startup"] for r in rows),
        "startup_kills_after_ready": sum(bool(r.get("ready_at_kill")) for r in rows),
        "users": len(users),
        "events_sent": len(ledger.sent),
        "events_acked": len(ledger.acked),
        "events_in_log": sum(seen.values()),
        "lost": len(lost),
        "doubled": len(doubled),
        "unknown_in_log": len(unknown),
        "mismatched": len(mismatched),
        "lost_ids": lost[:20],
        "doubled_ids": doubled[:20],
        "resent_batches": ledger.resent_batches,
        "resent_events": ledger.resent_events,
        "resent_already_durable": ledger.resent_found_durable,
        "final_in_doubt": len(last_doubt),
        "final_in_doubt_durable": sum(1 for i in last_doubt if i in seen),
        "requests_ok": ledger.requests_ok,
        "requests_failed_by_kill": ledger.requests_failed,
        "final_ready_s": round(final_ready, 3),
        "reloads": sum("reloaded_to" in r for r in rows),
        "reloads_failed": sum(str(r.get("reloaded_to", "")).startswith("failed") for r in rows),
        "restores_refolded": sum(bool(r.get("snapshot_refolded")) for r in rows),
        "cycles_detail": rows,
        "server_env": {**SERVER_ENV, **env},
    }
    result["pass"] = not (lost or doubled or unknown or mismatched or result["reloads_failed"])
    return result


# -- (d) retrain from the live log -------------------------------------------------------------
async def _train_on_log(root: Path, state_dir: Path, served: Path) -> tuple[Path, float]:
    """``signedrec train --events`` on the embedded default's data while the server writes."""
    command = [sys.executable, "-m", "server.cli", "train", "--data", str(DEFAULT_DATA),
               "--threshold", f"{DEFAULT_THRESHOLD:g}", "--out", str(root), "--events",
               str(state_dir), "--hyper-from", str(served)]  # fmt: skip
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {proc.returncode}: {err[-2000:]!r}")
    return Path(out.decode().strip().splitlines()[-1]), time.monotonic() - started


async def _full_histories(port: int, users: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Every user's whole history (events with ids, then dataset rows), newest first."""
    out: dict[str, list[dict[str, Any]]] = {}
    conn = Conn(port)
    for user in users:
        status, body = await conn.request("GET", f"/v1/users/{user}/history?limit={HISTORY_LIMIT}")
        if status not in (200, 404):
            raise RuntimeError(f"history of {user} answered {status}: {body[:300]!r}")
        out[user] = json.loads(body)["events"] if status == 200 else []
        if len(out[user]) >= HISTORY_LIMIT:
            raise RuntimeError(f"history of {user} reached the limit; use more users")
    conn.close()
    return out


def audit_against_log(
    state_dir: Path, served: Artifact, acked: set[str], histories: dict[str, list[dict[str, Any]]]
) -> dict[str, Any]:
    """Check the served state against the log itself: every acknowledged event is logged once
    and in its user's history exactly once, as logged (events up to the served version's
    watermark through the version's own logged events, later ones replayed online); and for
    each (user, item) whose latest logged event is at or before the watermark, the version's
    trained graph holds that pair with that event's sign."""
    report, batches = read_records(state_dir / "events")
    records = [r for batch in batches for r in batch]
    logged = collections.Counter(r.event_id for r in records)
    watermark = served.watermark
    weights, threshold = EventWeights(), DEFAULT_THRESHOLD
    by_kind = strengths_by_kind(weights)
    latest: dict[tuple[str, str], Any] = {}
    for r in records:  # seq order: the last one per pair wins, as the server folds them
        latest[(r.user_id, r.item_id)] = r
    shown = collections.Counter(e["event_id"] for events in histories.values()
                                for e in events if e["event_id"] is not None)  # fmt: skip
    as_logged = {r.event_id: (r.user_id, r.item_id, r.kind, r.value, r.ts) for r in records}
    mismatched = sum(
        as_logged.get(e["event_id"]) != (user, e["item_id"], e["kind"], e["value"], e["ts"])
        for user, events in histories.items() for e in events if e["event_id"] is not None
    )  # fmt: skip
    graph = served.trained_graph()
    user_index = {u: n for n, u in enumerate(served.arrays["user_ids"].tolist())}
    item_index = {i: n for n, i in enumerate(served.arrays["item_ids"].tolist())}
    sign_wrong = 0
    for (user, item), r in latest.items():
        if r.seq > watermark:
            continue
        strength = (rating_strength(r.value, threshold, weights) if r.kind == "rating"
                    else by_kind[r.kind])  # fmt: skip
        u, i = user_index.get(user), item_index[item]
        indptr, items = ((graph.pos_indptr, graph.pos_items) if strength > 0
                         else (graph.neg_indptr, graph.neg_items))  # fmt: skip
        sign_wrong += u is None or i not in items[indptr[u] : indptr[u + 1]]
    return {
        "log_records": len(records),
        "log_unread_tail": report.unread_tail,
        "watermark": watermark,
        "trained_pairs_checked": sum(r.seq <= watermark for r in latest.values()),
        "lost_from_log": len(acked - set(logged)),
        "doubled_in_log": sum(n > 1 for n in logged.values()),
        "history_missing": len(set(logged) - set(shown)),
        "history_doubled": sum(n > 1 for n in shown.values()),
        "history_not_as_logged": mismatched,
        "trained_with_ids": sum(1 for r in records if r.seq <= watermark and r.event_id in shown),
        "trained_sign_wrong": sign_wrong,
    }


async def retrain_benchmark(tmp: Path, retrains: int, seed: int) -> dict[str, Any]:
    """Versions trained on the live log under a feedback stream, reloaded, then SIGKILL."""
    rng = random.Random(seed + 1)
    items, trained_users = catalogue()
    users = [f"retrain-{i}" for i in range(250)] + trained_users[:50]
    root = tmp / "retrain-root"
    source = list_versions(DEFAULT_ROOT)[-1]
    shutil.copytree(DEFAULT_ROOT / source, root / source)
    state_dir = tmp / "retrain-state"
    log_path = tmp / "retrain-server.log"
    env = {"SIGNEDREC_LOG__SNAPSHOT_EVERY_EVENTS": "2000"}
    ledger = CrashLedger()
    counter: collections.Counter[str] = collections.Counter()
    rows: list[dict[str, Any]] = []
    for cycle in range(retrains):
        server = Server(root, state_dir, log_path, env)
        row: dict[str, Any] = {"cycle": cycle, "ready_s": round(await server.until_ready(), 3)}
        acked_before = len(ledger.acked)
        stop, senders = _start_senders(server.port, ledger, rng, f"r{cycle}", users, items,
                                       counter)  # fmt: skip
        await asyncio.sleep(rng.uniform(0.5, 2.0))
        served = root / list_versions(root)[-1]
        version, row["train_s"] = await _train_on_log(root, state_dir, served)
        row["trained"] = version.name
        row["watermark"] = load_artifact(version, verify=False).watermark
        admin = Conn(server.port)
        status, _ = await admin.request(
            "POST", "/v1/admin/model/reload", json.dumps({"version": version.name}).encode()
        )
        admin.close()
        row["reload_status"] = status
        await asyncio.sleep(rng.uniform(0.1, 1.0))
        server.kill()
        stop.set()
        await asyncio.gather(*senders)
        text = server.log_text()
        replay = re.findall(r"replayed (\d+) events", text)
        row["replayed_at_start"] = int(replay[-1]) if replay else None
        row["acked"] = len(ledger.acked) - acked_before
        rows.append(row)
        progress(f"retrain {cycle + 1}/{retrains}: trained {version.name} (watermark "
                 f"{row['watermark']}) in {row['train_s']:.1f} s under the stream, reload "
                 f"{status}, +{row['acked']} acked, killed")  # fmt: skip
    # A final start: it serves the last version (pinned by its reload) and replays the rest.
    server = Server(root, state_dir, log_path, env)
    final_ready = await server.until_ready()
    # Events whose answer a kill swallowed are sent again, as an at-least-once client would.
    resend = [ev for batch in ledger.in_doubt for ev in batch]
    conn = Conn(server.port)
    if resend:
        status, body = await conn.request("POST", "/v1/feedback", json.dumps(resend).encode())
        if status != 200:
            raise RuntimeError(f"re-sending {len(resend)} events answered {status}: {body!r}")
        ledger.acked.update(ev["event_id"] for ev in resend)
    status, body = await conn.request("GET", "/healthz")
    conn.close()
    served_version = json.loads(body)["model_version"]
    histories = await _full_histories(server.port, users)
    server.stop()
    served = root / (served_version or list_versions(root)[-1])
    audit = audit_against_log(state_dir, load_artifact(served, verify=False), ledger.acked,
                              histories)  # fmt: skip
    result = {
        "retrains": retrains,
        "users": len(users),
        "events_sent": len(ledger.sent),
        "events_acked": len(ledger.acked),
        "resent_after_last_kill": len(resend),
        "served_at_end": served.name,
        "final_ready_s": round(final_ready, 3),
        "reloads_failed": sum(r["reload_status"] != 200 for r in rows),
        "cycles_detail": rows,
        **audit,
    }
    result["pass"] = not any(result[k] for k in (
        "reloads_failed", "lost_from_log", "doubled_in_log", "history_missing", "history_doubled",
        "history_not_as_logged", "trained_sign_wrong"))  # fmt: skip
    return result


# -- load generation -------------------------------------------------------------------------
@dataclass
class LoadStats:
    """Outcomes of an open-loop load run."""

    ok: int = 0
    failed: collections.Counter[str] = field(default_factory=collections.Counter)
    fallback: int = 0
    versions: collections.Counter[str] = field(default_factory=collections.Counter)
    latencies: list[tuple[float, float]] = field(default_factory=list)  # (t since start, ms)
    # From the time the schedule gave the request, not the send: a request that waited for a
    # worker stuck behind a slow answer counts that wait (no coordinated omission).
    from_schedule: list[float] = field(default_factory=list)
    by_kind: dict[str, list[float]] = field(default_factory=lambda: collections.defaultdict(list))
    late: int = 0
    failures: list[str] = field(default_factory=list)
    elapsed: float = 0.0


Request = tuple[str, str, bytes, str]  # method, path, body, kind


async def open_loop(
    port: int, rate: float, seconds: float, make: Callable[[int], Request], connections: int,
    stats: LoadStats, started: float,
) -> None:  # fmt: skip
    """Requests at ``rate``/s for ``seconds`` (schedule-driven), spread over keep-alive workers."""
    total = int(rate * seconds)
    counter = iter(range(total))

    async def worker() -> None:
        conn = Conn(port)
        for i in counter:
            due = started + i / rate
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -0.1:
                stats.late += 1
            method, path, body, kind = make(i)
            sent = time.monotonic()
            try:
                status, data = await conn.request(method, path, body)
            except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as exc:
                stats.failed[f"{kind}:{type(exc).__name__}"] += 1
                if len(stats.failures) < 20:
                    stats.failures.append(f"{method} {path}: {exc!r}")
                continue
            done = time.monotonic()
            took = (done - sent) * 1000.0
            stats.latencies.append((sent - started, took))
            stats.from_schedule.append((done - due) * 1000.0)
            stats.by_kind[kind].append(took)
            if not 200 <= status < 300:
                stats.failed[f"{kind}:{status}"] += 1
                if len(stats.failures) < 20:
                    stats.failures.append(f"{method} {path}: {status} {data[:200]!r}")
                continue
            stats.ok += 1
            if kind.startswith("recs"):
                answer = json.loads(data)
                stats.versions[answer["model_version"]] += 1
                # Unknown users get the popularity list by design; known users only when shed.
                stats.fallback += kind == "recs" and bool(answer["fallback"])
        conn.close()

    await asyncio.gather(*(worker() for _ in range(connections)))
    stats.elapsed = time.monotonic() - started


def mixed_reads(
    rng: random.Random, trained: list[str], online: list[str], items: list[str]
) -> Callable[[int], Request]:
    """GETs: 80% recommendations (trained, online and unknown users), 10% similar, 10% history."""

    def make(_: int) -> Request:
        roll = rng.random()
        if roll < 0.8:
            pick = rng.random()
            k = rng.choice([10, 20, 20, 50])
            liked = "&include_liked=true" if rng.random() < 0.1 else ""
            if pick < 0.6:
                user, kind = rng.choice(trained), "recs"
            elif pick < 0.9:
                user, kind = rng.choice(online), "recs"
            else:
                user, kind = f"new-{rng.randrange(10**9)}", "recs-unknown-user"
            return "GET", f"/v1/recommendations/{user}?k={k}{liked}", b"", kind
        if roll < 0.9:
            return "GET", f"/v1/items/{rng.choice(items)}/similar?k=20", b"", "similar"
        return "GET", f"/v1/users/{rng.choice(trained)}/history?limit=50", b"", "history"

    return make


async def seed_online_users(
    port: int, users: list[str], items: list[str], rng: random.Random
) -> None:
    """Give users online feedback so a reload has graphs to rebuild."""
    conn = Conn(port)
    for n, user in enumerate(users):
        batch = [event(f"seed-{n}-{j}", user, rng.choice(items), rng) for j in range(5)]
        status, body = await conn.request("POST", "/v1/feedback", json.dumps(batch).encode())
        if status != 200:
            raise RuntimeError(f"seeding answered {status}: {body[:300]!r}")
    conn.close()


def latency_summary(stats: LoadStats, cpu_s: float) -> dict[str, Any]:
    """Throughput and latency percentiles of a load run, and the server's CPU share."""
    ms = [m for _, m in stats.latencies]
    return {
        "wall_s": round(stats.elapsed, 2),
        "server_cpu_pct": round(100.0 * cpu_s / stats.elapsed, 1),
        "requests_ok": stats.ok,
        "requests_failed": sum(stats.failed.values()),
        "failed_by_kind": dict(stats.failed),
        "failure_examples": stats.failures,
        "achieved_rps": round((stats.ok + sum(stats.failed.values())) / stats.elapsed, 1),
        "late_starts": stats.late,
        "p50_ms": round(percentile(ms, 50), 2),
        "p99_ms": round(percentile(ms, 99), 2),
        "max_ms": round(max(ms), 2) if ms else None,
        "p99_ms_from_schedule": round(percentile(stats.from_schedule, 99), 2),
        "max_ms_from_schedule": round(max(stats.from_schedule), 2) if stats.from_schedule else None,
        # Per request kind, so an outlier can be traced: reads never wait on the disk, while a
        # feedback answer waits for its fsync by design.
        "by_kind": {
            kind: {
                "n": len(v),
                "p50_ms": round(percentile(v, 50), 2),
                "p99_ms": round(percentile(v, 99), 2),
                "max_ms": round(max(v), 2),
            }
            for kind, v in sorted(stats.by_kind.items())
        },
        "fallback_for_known_users": stats.fallback,
    }


async def server_histograms(port: int) -> dict[str, Any]:
    """The server's own fsync and per-route handler latency histograms, from /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    conn = Conn(port)
    status, body = await conn.request("GET", "/metrics")
    conn.close()
    if status != 200:
        raise RuntimeError(f"/metrics answered {status}")
    out: dict[str, Any] = {}
    for family in text_string_to_metric_families(body.decode()):
        if family.name not in ("signedrec_fsync_seconds", "signedrec_request_seconds"):
            continue
        for sample in family.samples:
            if not sample.name.endswith("_bucket"):
                continue
            key = family.name + (f":{sample.labels['route']}" if "route" in sample.labels else "")
            out.setdefault(key, {})[sample.labels["le"]] = int(sample.value)
    return out


def slowest_bucket(buckets: dict[str, int]) -> dict[str, Any]:
    """From cumulative histogram buckets: total count and how many took longer than each bound."""
    total = buckets.get("+Inf", 0)
    bounds = sorted((float(le), n) for le, n in buckets.items() if le != "+Inf")
    return {"count": total, "over_s": {f"{b:g}": total - n for b, n in bounds if b >= 0.05}}


# -- (b) reload under load -------------------------------------------------------------------
async def reload_benchmark(tmp: Path, rate: float, seconds: float, swaps: int, seed: int
                           ) -> dict[str, Any]:  # fmt: skip
    """Mixed GETs at ``rate`` while the model is reloaded and rolled back ``swaps`` times."""
    rng = random.Random(seed)
    items, trained = catalogue()
    root, first = make_root(tmp)
    server = Server(root, tmp / "reload-state", tmp / "reload-server.log", {})
    await server.until_ready()
    online = [f"online-{i}" for i in range(100)] + trained[100:200]
    await seed_online_users(server.port, online, items, rng)
    stats = LoadStats()
    swaps_done: list[dict[str, Any]] = []
    started = time.monotonic() + 0.5

    async def swapper() -> None:
        admin = Conn(server.port)
        for n in range(swaps):
            due = started + (n + 1) * seconds / (swaps + 1)
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            action, body = (("reload", json.dumps({"version": ROTATED}).encode()) if n % 2 == 0
                            else ("rollback", b""))  # fmt: skip
            t0 = time.monotonic()
            status, data = await admin.request("POST", f"/v1/admin/model/{action}", body)
            answer = json.loads(data)
            swaps_done.append({
                "action": action, "at_s": round(t0 - started, 3), "status": status,
                "took_ms": round((time.monotonic() - t0) * 1000.0, 1),
                "active": answer.get("active"),
            })  # fmt: skip
        admin.close()

    make = mixed_reads(rng, trained, online, items)
    cpu0, load0 = server.cpu_s(), os.getloadavg()[0]
    await asyncio.gather(open_loop(server.port, rate, seconds, make, 64, stats, started), swapper())
    cpu_s, load1 = server.cpu_s() - cpu0, os.getloadavg()[0]
    probe = Conn(server.port)
    final = json.loads((await probe.request("GET", "/v1/model"))[1])
    probe.close()
    rss = server.rss_bytes()
    server.stop()
    summary = latency_summary(stats, cpu_s)
    summary["load_avg_1m_before_after"] = [round(load0, 2), round(load1, 2)]
    # Latency right around each swap (the second after it starts) against the rest.
    windows = [(s["at_s"], s["at_s"] + max(1.0, s["took_ms"] / 1000.0 + 0.5)) for s in swaps_done]
    near = [m for t, m in stats.latencies if any(a <= t <= b for a, b in windows)]
    far = [m for t, m in stats.latencies if not any(a <= t <= b for a, b in windows)]
    expected = [first if n % 2 else ROTATED for n in range(swaps)]
    result = {
        "target_rps": rate,
        "seconds": seconds,
        **summary,
        "swaps": swaps_done,
        "swaps_ok": sum(s["status"] == 200 for s in swaps_done),
        "swap_sequence_correct": [s["active"] for s in swaps_done] == expected,
        "versions_served": dict(stats.versions),
        "final_active": final["active"],
        "p99_ms_near_swaps": round(percentile(near, 99), 2),
        "p99_ms_elsewhere": round(percentile(far, 99), 2),
        "server_rss_mb": round(rss / 2**20, 1),
        "online_users": len(online),
        "latency_series": _per_second(stats.latencies, seconds),
    }
    result["pass"] = (result["requests_failed"] == 0 and result["swaps_ok"] == swaps
                      and result["swap_sequence_correct"])  # fmt: skip
    return result


def _per_second(latencies: list[tuple[float, float]], seconds: float) -> list[dict[str, float]]:
    """Per-second request count and p99 latency."""
    buckets: dict[int, list[float]] = collections.defaultdict(list)
    for t, ms in latencies:
        buckets[int(t)].append(ms)
    return [
        {"t": s, "n": len(buckets[s]), "p99_ms": round(percentile(buckets[s], 99), 2)}
        for s in range(int(seconds) + 1)
        if buckets.get(s)
    ]


# -- (c) soak --------------------------------------------------------------------------------
async def soak_benchmark(tmp: Path, rate: float, seconds: float, seed: int) -> dict[str, Any]:
    """Steady mixed load with RSS sampled every few seconds; growth after the warm-up."""
    rng = random.Random(seed)
    items, trained = catalogue()
    server = Server(DEFAULT_ROOT, tmp / "soak-state", tmp / "soak-server.log", {})
    await server.until_ready()
    online = [f"soak-{i}" for i in range(500)]
    await seed_online_users(server.port, online[:100], items, rng)
    reads = mixed_reads(rng, trained, online[:100], items)
    writes = 0

    def make(i: int) -> Request:
        nonlocal writes
        if rng.random() < 0.05:
            writes += 1
            user = rng.choice(online + trained[:500])
            body = json.dumps([event(f"soak-{i}", user, rng.choice(items), rng)]).encode()
            return "POST", "/v1/feedback", body, "feedback"
        return reads(i)

    samples: list[tuple[float, float]] = []
    started = time.monotonic() + 0.5
    done = asyncio.Event()

    async def sampler() -> None:
        while not done.is_set():
            samples.append((round(time.monotonic() - started, 2), server.rss_bytes() / 2**20))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), SOAK_SAMPLE_S)
        samples.append((round(time.monotonic() - started, 2), server.rss_bytes() / 2**20))

    stats = LoadStats()
    sampling = asyncio.create_task(sampler())
    cpu0, load0 = server.cpu_s(), os.getloadavg()[0]
    await open_loop(server.port, rate, seconds, make, 32, stats, started)
    cpu_s, load1 = server.cpu_s() - cpu0, os.getloadavg()[0]
    done.set()
    await sampling
    histograms = await server_histograms(server.port)
    server.stop()
    summary = latency_summary(stats, cpu_s)
    summary["load_avg_1m_before_after"] = [round(load0, 2), round(load1, 2)]
    summary["server_histograms"] = {k: slowest_bucket(v) for k, v in histograms.items()}
    after = [(t, mb) for t, mb in samples if t >= SOAK_WARMUP_S]
    result: dict[str, Any] = {
        "target_rps": rate,
        "seconds": seconds,
        **summary,
        "feedback_events_posted": writes,
        "warmup_s": SOAK_WARMUP_S,
        "sample_every_s": SOAK_SAMPLE_S,
        "rss_samples": [(t, round(mb, 2)) for t, mb in samples],
        "rss_start_mb": round(samples[0][1], 1),
        "rss_peak_mb": round(max(mb for _, mb in samples), 1),
    }
    if len(after) >= 4:
        head = [mb for t, mb in after if t < SOAK_WARMUP_S + 30.0] or [after[0][1]]
        tail_from = after[-1][0] - 30.0
        tail = [mb for t, mb in after if t >= tail_from]
        base, end = float(np.mean(head)), float(np.mean(tail))
        slope = float(np.polyfit([t for t, _ in after], [mb for _, mb in after], 1)[0])
        result.update(
            rss_after_warmup_mb=round(base, 1),
            rss_end_mb=round(end, 1),
            rss_growth_pct=round((end - base) / base * 100.0, 2),
            rss_slope_mb_per_hour=round(slope * 3600.0, 1),
        )
        result["pass"] = (result["rss_growth_pct"] < BAR_SOAK_GROWTH_PCT
                          and summary["requests_failed"] == 0)  # fmt: skip
    else:
        result["rss_growth_pct"] = None
        result["pass"] = None
    return result


# -- reports ---------------------------------------------------------------------------------
def verdict(ok: bool | None) -> str:
    """PASS / FAIL / n/a."""
    return "n/a" if ok is None else ("PASS" if ok else "FAIL")


def write_png(result: dict[str, Any], path: Path) -> None:
    """RSS over the soak, latency through the reloads, and the crash cycles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(10, 11))
    soak = result["soak"]
    ax = axes[0]
    if soak.get("rss_samples"):
        t, mb = zip(*soak["rss_samples"], strict=True)
        ax.plot(t, mb, marker=".", label="server RSS")
        ax.axvspan(0, soak["warmup_s"], color="grey", alpha=0.15, label="warm-up")
        if soak.get("rss_after_warmup_mb"):
            base = soak["rss_after_warmup_mb"]
            ax.axhline(base, color="green", ls="--", lw=1, label="after warm-up")
            ax.axhline(base * (1 + BAR_SOAK_GROWTH_PCT / 100), color="red", ls=":", lw=1,
                       label=f"bar (+{BAR_SOAK_GROWTH_PCT:g}%)")  # fmt: skip
    ax.set_xlabel("s")
    ax.set_ylabel("RSS (MiB)")
    ax.set_title(f"soak: {soak['target_rps']:g} req/s mixed for {soak['seconds']:g} s, growth "
                 f"{soak.get('rss_growth_pct')}% [{verdict(soak.get('pass'))}]")  # fmt: skip
    ax.legend(loc="lower right", fontsize=8)
    reload = result["reload"]
    ax = axes[1]
    series = reload["latency_series"]
    ax.plot([p["t"] for p in series], [p["p99_ms"] for p in series], label="p99 latency per s")
    for s in reload["swaps"]:
        ax.axvline(s["at_s"], color="orange" if s["action"] == "reload" else "purple", lw=1,
                   alpha=0.7)  # fmt: skip
    ax2 = ax.twinx()
    ax2.plot([p["t"] for p in series], [p["n"] for p in series], color="grey", alpha=0.5,
             label="requests per s")  # fmt: skip
    ax2.set_ylabel("req/s")
    ax2.set_ylim(0, max([p["n"] for p in series], default=1) * 1.3)
    ax.set_xlabel("s (orange: reload, purple: rollback)")
    ax.set_ylabel("p99 ms")
    ax.set_title(f"reload under load: {reload['achieved_rps']} req/s, "
                 f"{reload['requests_failed']} failed [{verdict(reload['pass'])}]")  # fmt: skip
    crash = result["crash"]
    ax = axes[2]
    cyc = crash["cycles_detail"]
    ax.bar([r["cycle"] for r in cyc], [r["acked"] for r in cyc], color="steelblue",
           label="events acknowledged in the cycle")  # fmt: skip
    ax.set_xlabel("cycle (each ends with SIGKILL)")
    ax.set_ylabel("events acked")
    ax3 = ax.twinx()
    ready = [(r["cycle"], r["ready_s"]) for r in cyc if r["ready_s"] is not None]
    if ready:
        ax3.plot(*zip(*ready, strict=True), color="red", marker="o", label="restart to ready (s)")
    ax3.set_ylabel("ready after restart (s)")
    early = [r["cycle"] for r in cyc if r["killed_during_startup"]]
    if early:
        ax.scatter(early, [0] * len(early), marker="x", color="black", zorder=3,
                   label="killed during start-up")  # fmt: skip
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(
        f"crash: {crash['kills']} SIGKILLs, {crash['events_acked']:,} acked, "
        f"{crash['lost']} lost, {crash['doubled']} doubled [{verdict(crash['pass'])}]"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_md(result: dict[str, Any], path: Path) -> None:
    """The human-readable report."""
    crash, reload, soak = result["crash"], result["reload"], result["soak"]
    retrain = result["retrain"]
    history_ok = not (retrain["history_missing"] or retrain["history_doubled"]
                      or retrain["history_not_as_logged"])  # fmt: skip
    m = result["machine"]
    lines = [
        "# Reliability benchmark",
        "",
        f"Generated {result['generated']} by `{result['command']}` in "
        f"{result['wall_s']:.0f} s. Machine: {m['cpus']} CPUs (shared with other work), "
        f"{m['platform']}, Python {m['python']}; load average {m['load_avg']} at the start, "
        f"{result['load_avg_end']} at the end. Code: {result.get('git', 'not recorded')}. "
        "No GPU: server env `SIGNEDREC_KERNELS__BACKEND="
        "cpu`. The load generator (a minimal asyncio HTTP/1.1 keep-alive client) runs on the "
        "same 2 cores as the server.",
        "",
        "| bar | measured | verdict |",
        "|---|---|---|",
        f"| crash: acknowledged events lost = 0 | {crash['lost']} | "
        f"{verdict(crash['lost'] == 0)} |",
        f"| crash: acknowledged events doubled = 0 | {crash['doubled']} | "
        f"{verdict(crash['doubled'] == 0)} |",
        f"| crash: log holds only sent events, as sent | {crash['unknown_in_log']} unknown, "
        f"{crash['mismatched']} mismatched | "
        f"{verdict(crash['unknown_in_log'] == 0 and crash['mismatched'] == 0)} |",
        f"| crash: every mid-stream reload answered 200 | "
        f"{crash['reloads'] - crash['reloads_failed']}/{crash['reloads']} | "
        f"{verdict(crash['reloads_failed'] == 0)} |",
        f"| reload under load: failed requests = 0 | {reload['requests_failed']} of "
        f"{reload['requests_ok'] + reload['requests_failed']:,} | "
        f"{verdict(reload['requests_failed'] == 0)} |",
        f"| reload under load: every reload/rollback 200, in order | {reload['swaps_ok']}/"
        f"{len(reload['swaps'])}, order {'ok' if reload['swap_sequence_correct'] else 'wrong'} | "
        f"{verdict(reload['swaps_ok'] == len(reload['swaps']) and reload['swap_sequence_correct'])}"
        " |",
        f"| soak: RSS growth after {soak['warmup_s']:g} s warm-up < {BAR_SOAK_GROWTH_PCT:g}% | "
        f"{soak.get('rss_growth_pct')}% | "
        f"{verdict(None if soak.get('rss_growth_pct') is None else soak['rss_growth_pct'] < 5)} |",
        f"| soak: failed requests = 0 | {soak['requests_failed']} | "
        f"{verdict(soak['requests_failed'] == 0)} |",
        f"| retrain: acknowledged events lost from the log / doubled in it = 0 | "
        f"{retrain['lost_from_log']} / {retrain['doubled_in_log']} | "
        f"{verdict(retrain['lost_from_log'] == 0 and retrain['doubled_in_log'] == 0)} |",
        f"| retrain: every logged event in its user's history exactly once, as logged (trained "
        f"ones too) | {retrain['history_missing']} missing, {retrain['history_doubled']} "
        f"doubled, {retrain['history_not_as_logged']} not as logged | {verdict(history_ok)} |",
        f"| retrain: each pair's latest trained event is in the version's graph with its sign | "
        f"{retrain['trained_sign_wrong']} wrong of {retrain['trained_pairs_checked']:,} | "
        f"{verdict(retrain['trained_sign_wrong'] == 0)} |",
        f"| retrain: every reload of a freshly trained version answered 200 | "
        f"{retrain['retrains'] - retrain['reloads_failed']}/{retrain['retrains']} | "
        f"{verdict(retrain['reloads_failed'] == 0)} |",
        "",
        f"## (a) Crash recovery: {crash['cycles']} SIGKILLs",
        "",
        "Four concurrent senders post batches of 1–8 events (unique ids, random kinds over "
        f"{crash['users']} users: 250 new and 50 trained) as fast as they are acknowledged. "
        "Each cycle starts the server on the same state dir, streams for a random 0.3–3 s and "
        "sends SIGKILL; every fifth cycle instead kills the server part-way into its start-up "
        "(10–90% of the previous start-up time: artifact load, snapshot restore, log replay). "
        "Events whose answer was lost to the kill are "
        "re-sent after the restart with the same ids, as an at-least-once webhook client "
        "would. Snapshots every 2,000 events (`SIGNEDREC_LOG__SNAPSHOT_EVERY_EVENTS=2000`), so "
        "restarts go through snapshot restore plus tail replay and some kills land during a "
        "snapshot write. The root holds two versions of one catalogue (as in (b)); cycles 1, "
        f"{1 + RELOAD_EVERY}, {1 + 2 * RELOAD_EVERY}, ... (those not killed in start-up) reload "
        "the other one at the end of their stream and are killed at once or up to 0.5 s later, so "
        "the next "
        "start serves it (pinned) and finds a snapshot of the previous version when none was "
        "taken since: restored with every vector refolded under the served version. "
        "At the end a final start fetches every user's history "
        f"(`limit={HISTORY_LIMIT}`) and checks every acknowledged id is there exactly once.",
        "",
        "| quantity | value |",
        "|---|---|",
        f"| SIGKILLs (during start-up; of those, after ready) | {crash['kills']} "
        f"({crash['kills_during_startup']}; {crash['startup_kills_after_ready']}) |",
        f"| events sent / acknowledged | {crash['events_sent']:,} / {crash['events_acked']:,} |",
        f"| logged events found in histories | {crash['events_in_log']:,} |",
        f"| lost / doubled / unknown / mismatched | {crash['lost']} / {crash['doubled']} / "
        f"{crash['unknown_in_log']} / {crash['mismatched']} |",
        f"| requests cut by a kill | {crash['requests_failed_by_kill']} |",
        f"| re-sent events after restarts (already durable: acknowledged as duplicates) | "
        f"{crash['resent_events']:,} ({crash['resent_already_durable']:,}) |",
        f"| unanswered at the last kill (found durable in the log) | {crash['final_in_doubt']} "
        f"({crash['final_in_doubt_durable']}) |",
        f"| final start to ready | {crash['final_ready_s']} s |",
        f"| reloads mid-stream (failed) / restores refolded from another version's snapshot | "
        f"{crash['reloads']} ({crash['reloads_failed']}) / {crash['restores_refolded']} |",
        "",
        "| cycle | killed in start-up | ready s | replayed events | snapshot restored | "
        "stream s | acked | reloaded to |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in crash["cycles_detail"]:
        cells = [
            r["cycle"], "yes" if r["killed_during_startup"] else "", r.get("ready_s"),
            r.get("replayed"),
            ("yes, refolded" if r.get("snapshot_refolded") else "yes")
            if r.get("snapshot_restored") else "",
            r.get("stream_s"), f"{r['acked']:,}", r.get("reloaded_to", ""),
        ]  # fmt: skip
        lines.append("| " + " | ".join("" if c is None else str(c) for c in cells) + " |")
    lines += [
        "",
        f"## (b) Reload under load: {reload['target_rps']:g} req/s for {reload['seconds']:g} s",
        "",
        "The server starts on a root with two versions of the same catalogue: the default and "
        "a genuine second one (item table and vectors under a random orthogonal rotation plus "
        f"5% noise). {reload['online_users']} users get 5 online events each first. Then an "
        "open-loop schedule sends mixed GETs over 64 keep-alive connections: 80% "
        "recommendations (60% trained users, 30% online users, 10% unknown users; k in "
        "{10, 20, 50}; 10% with include_liked), 10% similar items, 10% history, while an admin "
        f"client alternates reload (to `{ROTATED}`) and rollback {len(reload['swaps'])} times, "
        "evenly spread. A request fails on any non-2xx answer, transport error or a "
        f"{REQUEST_TIMEOUT:g} s timeout. Latency is timed from the send; *from the schedule* "
        "it is timed from when the schedule called for the request, so the wait for a free "
        "connection behind a slow answer counts too (no coordinated omission).",
        "",
        "| quantity | value |",
        "|---|---|",
        f"| requests ok / failed | {reload['requests_ok']:,} / {reload['requests_failed']} |",
        f"| achieved rate | {reload['achieved_rps']} req/s over {reload['wall_s']} s (target "
        f"{reload['target_rps']:g}; {reload['late_starts']} starts >100 ms behind schedule) |",
        f"| latency p50 / p99 / max | {reload['p50_ms']} / {reload['p99_ms']} / "
        f"{reload['max_ms']} ms |",
        f"| latency from the schedule, p99 / max | {reload['p99_ms_from_schedule']} / "
        f"{reload['max_ms_from_schedule']} ms |",
        f"| server CPU / machine load (1 min, before → after) | {reload['server_cpu_pct']}% of "
        f"one core / {reload['load_avg_1m_before_after'][0]} → "
        f"{reload['load_avg_1m_before_after'][1]} |",
        f"| p99 within a second of a swap / elsewhere | {reload['p99_ms_near_swaps']} / "
        f"{reload['p99_ms_elsewhere']} ms |",
        f"| recommendations by model version | {reload['versions_served']} |",
        f"| popularity fallback for known users (in-flight bound) | "
        f"{reload['fallback_for_known_users']} |",
        f"| active at the end | {reload['final_active']} |",
        f"| server RSS at the end | {reload['server_rss_mb']} MiB |",
        "",
        "| # | action | at s | status | took ms | active after |",
        "|---|---|---|---|---|---|",
    ]
    for n, s in enumerate(reload["swaps"]):
        lines.append(f"| {n + 1} | {s['action']} | {s['at_s']} | {s['status']} | "
                     f"{s['took_ms']} | {s['active']} |")  # fmt: skip
    if reload["failure_examples"]:
        lines += ["", "Failures: " + "; ".join(reload["failure_examples"][:5])]
    lines += [
        "",
        f"## (c) Soak: {soak['target_rps']:g} req/s for {soak['seconds']:g} s",
        "",
        "One server, mixed load over 32 keep-alive connections: 95% the GET mix above and 5% "
        "feedback posts (one new event each, over 500 new and 500 trained users). The "
        f"server's RSS is sampled every {soak['sample_every_s']:g} s. Growth compares the "
        f"mean RSS of the 30 s after the {soak['warmup_s']:g} s warm-up with the mean of the "
        "last 30 s. Feedback legitimately grows the state (each event adds its id to the "
        "idempotency set and a history row), so a small positive slope is expected. Latency "
        "is also given per request kind, with the server's own fsync and handler histograms "
        "(`/metrics`, scraped at the end): a feedback post is answered only after its fsync, "
        "so a slow disk shows up there and nowhere else.",
        "",
        "| quantity | value |",
        "|---|---|",
        f"| requests ok / failed | {soak['requests_ok']:,} / {soak['requests_failed']} |",
        f"| achieved rate | {soak['achieved_rps']} req/s ({soak['late_starts']} late starts) |",
        f"| latency p50 / p99 / max | {soak['p50_ms']} / {soak['p99_ms']} / {soak['max_ms']} ms |",
        f"| latency from the schedule, p99 / max | {soak['p99_ms_from_schedule']} / "
        f"{soak['max_ms_from_schedule']} ms |",
        *(
            f"| — {kind} ({v['n']:,}): p50 / p99 / max | {v['p50_ms']} / {v['p99_ms']} / "
            f"{v['max_ms']} ms |"
            for kind, v in soak.get("by_kind", {}).items()
        ),
        *(
            f"| server `{name}` ({h['count']:,}) slower than "
            + " / ".join(f"{b}" for b in h["over_s"])
            + " s | "
            + " / ".join(str(n) for n in h["over_s"].values())
            + " |"
            for name, h in soak.get("server_histograms", {}).items()
        ),
        f"| server CPU / machine load (1 min, before → after) | {soak['server_cpu_pct']}% of "
        f"one core / {soak['load_avg_1m_before_after'][0]} → "
        f"{soak['load_avg_1m_before_after'][1]} |",
        f"| feedback events posted | {soak['feedback_events_posted']:,} |",
        f"| RSS at start / after warm-up / end / peak | {soak['rss_start_mb']} / "
        f"{soak.get('rss_after_warmup_mb')} / {soak.get('rss_end_mb')} / "
        f"{soak['rss_peak_mb']} MiB |",
        f"| RSS growth after warm-up | {soak.get('rss_growth_pct')}% (slope "
        f"{soak.get('rss_slope_mb_per_hour')} MiB/h) |",
        "",
        f"## (d) Retrain on the live log: {retrain['retrains']} versions",
        "",
        "The same four senders as (a), over 250 new and 50 trained users. In each cycle the "
        "server starts on the root it was left with; after 0.5–2 s of stream "
        "`signedrec train --data model_artifacts/default-data --threshold 4 --out ROOT --events "
        "STATE_DIR --hyper-from NEWEST` runs as its own process, reading the log while the "
        "server appends to it; the new version is reloaded mid-stream and the server is "
        "SIGKILLed 0.1–1 s later. A final start serves the last version (pinned by its "
        "reload) and replays the events after its watermark; the batches a kill left "
        "unanswered are re-sent once. The audit reads the log itself (`read_records`) and "
        "every user's whole history: every logged event must be in it exactly once, with the "
        "id, item, kind, value and time it was logged with (those up to the served version's "
        "watermark come from the version's own logged events, later ones from the replay, so "
        "a trained event replayed as well shows twice); and for each (user, item) whose latest "
        "logged event is at or before the watermark the version's trained graph must hold the "
        "pair with that event's sign.",
        "",
        "| quantity | value |",
        "|---|---|",
        f"| events sent / acknowledged (re-sent after the last kill) | "
        f"{retrain['events_sent']:,} / {retrain['events_acked']:,} "
        f"({retrain['resent_after_last_kill']}) |",
        f"| log records / served version / its watermark | {retrain['log_records']:,} / "
        f"{retrain['served_at_end']} / {retrain['watermark']:,} |",
        f"| trained pairs checked / trained events shown with their ids | "
        f"{retrain['trained_pairs_checked']:,} / {retrain['trained_with_ids']:,} |",
        f"| final start to ready | {retrain['final_ready_s']} s |",
        "",
        "| cycle | ready s | trained version | watermark | train s (under the stream) | "
        "reload | acked | replayed at start |",
        "|---|---|---|---|---|---|---|---|",
        *(
            f"| {r['cycle']} | {r['ready_s']} | {r['trained']} | {r['watermark']:,} | "
            f"{r['train_s']:.1f} | {r['reload_status']} | {r['acked']:,} | "
            f"{r['replayed_at_start']} |"
            for r in retrain["cycles_detail"]
        ),
        "",
        "![reliability](reliability.png)",
        "",
    ]
    path.write_text("\n".join(lines))


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """All four parts in order."""
    started = time.time()
    load_start = machine()
    with tempfile.TemporaryDirectory(prefix="signedrec-reliability-") as tmp_name:
        tmp = Path(tmp_name)
        try:
            progress(f"crash: {args.cycles} cycles")
            crash = await crash_benchmark(tmp, args.cycles, args.seed)
            progress(f"crash: lost {crash['lost']}, doubled {crash['doubled']} of "
                     f"{crash['events_acked']} acked [{verdict(crash['pass'])}]")  # fmt: skip
            progress(f"reload: {args.reload_rate} req/s for {args.reload_seconds} s")
            reload = await reload_benchmark(tmp, args.reload_rate, args.reload_seconds,
                                            args.swaps, args.seed)  # fmt: skip
            progress(f"reload: {reload['requests_failed']} failed of "
                     f"{reload['requests_ok'] + reload['requests_failed']} at "
                     f"{reload['achieved_rps']} req/s [{verdict(reload['pass'])}]")  # fmt: skip
            progress(f"soak: {args.soak_rate} req/s for {args.soak_seconds} s")
            soak = await soak_benchmark(tmp, args.soak_rate, args.soak_seconds, args.seed)
            progress(f"soak: RSS growth {soak.get('rss_growth_pct')}% [{verdict(soak['pass'])}]")
            progress(f"retrain: {args.retrains} versions trained on the live log")
            retrain = await retrain_benchmark(tmp, args.retrains, args.seed)
            progress(f"retrain: lost {retrain['lost_from_log']}, history missing "
                     f"{retrain['history_missing']} / doubled {retrain['history_doubled']} / "
                     f"not as logged {retrain['history_not_as_logged']}, trained sign wrong "
                     f"{retrain['trained_sign_wrong']} [{verdict(retrain['pass'])}]")  # fmt: skip
        finally:
            if args.keep_tmp:
                kept = Path(tempfile.mkdtemp(prefix="signedrec-reliability-kept-"))
                shutil.copytree(tmp, kept, dirs_exist_ok=True)
                progress(f"kept state dirs and server logs in {kept}")
    return {
        "generated": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "command": command_line("benchmarks.reliability", sys.argv[1:]),
        "git": git_state(),
        "wall_s": round(time.time() - started, 1),
        "machine": load_start,
        "load_avg_end": [round(x, 2) for x in os.getloadavg()],
        "crash": crash,
        "reload": reload,
        "soak": soak,
        "retrain": retrain,
        "pass": bool(crash["pass"] and reload["pass"] and soak["pass"] and retrain["pass"]),
    }


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cycles", type=int, default=20, help="SIGKILL/restart cycles")
    parser.add_argument(
        "--retrains",
        type=int,
        default=3,
        help="versions trained on the live log, each reloaded then SIGKILLed",
    )
    parser.add_argument("--soak-seconds", type=float, default=600.0)
    parser.add_argument("--soak-rate", type=float, default=200.0, help="req/s during the soak")
    parser.add_argument("--reload-seconds", type=float, default=30.0)
    parser.add_argument("--reload-rate", type=float, default=500.0, help="req/s during reloads")
    parser.add_argument("--swaps", type=int, default=8, help="reloads + rollbacks, alternating")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPORTS, help="report directory")
    parser.add_argument("--keep-tmp", action="store_true", help="keep state dirs and server logs")
    parser.add_argument("--from-json", type=Path, default=None,
                        help="only rewrite the .md and .png from this earlier .json")  # fmt: skip
    args = parser.parse_args(argv)
    if args.from_json is not None:
        result = json.loads(args.from_json.read_text())
        write_md(result, args.out / "reliability.md")
        write_png(result, args.out / "reliability.png")
        return 0 if result["pass"] else 1
    import uvloop

    result = uvloop.run(run(args))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "reliability.json").write_text(json.dumps(result, indent=2) + "\n")
    write_md(result, args.out / "reliability.md")
    write_png(result, args.out / "reliability.png")
    progress(f"wrote {args.out}/reliability.{{md,json,png}}: overall {verdict(result['pass'])}")
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
