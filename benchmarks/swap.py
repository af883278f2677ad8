"""How long a model swap blocks the event loop, against how long the whole rebuild takes.

Run from the repository root: ``python -m benchmarks.swap``. Writes
``benchmarks/reports/swap.{md,json,png}``.

A reload rebuilds every user's vector under the new model. Since the rebuild moved to a worker
thread, the event loop only copies the online graphs (``begin_swap``) and, at the end, refolds
the users whose events arrived meanwhile and swaps the arrays in (``finish_swap``). This measures
both parts against the whole rebuild, on the embedded default artifact with a growing number of
online users, each with ``--events`` feedback events, and ``--touched`` of them posting again
while the swap is built.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.host import command_line
from benchmarks.quality import REPORTS, git_state, load_avg, machine, report_header
from server.artifacts import load_artifact, resolve
from server.config import load_config
from server.events import EventRecord
from server.service import tune_gc
from server.state import ItemSide, LiveState

DEFAULT_ROOT = Path(__file__).resolve().parent.parent / "model_artifacts" / "default"
REPEATS = 5


def progress(message: str) -> None:
    """One progress line on stderr."""
    print(f"[swap] {message}", file=sys.stderr, flush=True)


def online_events(
    state: LiveState, first_user: int, n_users: int, per_user: int, seq: int, seed: int
) -> list[EventRecord]:
    """``per_user`` likes/dislikes on distinct random items for users online-<first_user>..."""
    rng = np.random.default_rng(seed)
    items = state.item_side.items.external(np.arange(state.item_side.n_items))
    records = []
    for u in range(first_user, first_user + n_users):
        for item in rng.choice(len(items), per_user, replace=False).tolist():
            seq += 1
            kind = "dislike" if item % 3 == 0 else "like"
            records.append(EventRecord(seq, f"e{seq}", f"online-{u}", items[item], kind, None, 0.0))
    return records


def timed_ms(call: Callable[[], object]) -> float:
    """Wall milliseconds of one call."""
    start = time.perf_counter()
    call()
    return (time.perf_counter() - start) * 1e3


def measure(root: Path, n_online: int, per_user: int, touched: int, seed: int) -> dict[str, Any]:
    """Loop-blocking and whole-rebuild times of one swap, median of REPEATS."""
    artifact = resolve(root)
    state = LiveState(artifact, Path(tempfile.mkdtemp()) / "state", load_config(env={}))
    records = online_events(state, 0, n_online, per_user, 0, seed)
    for start in range(0, len(records), 65536):
        state.apply(records[start : start + 65536])
    side = ItemSide(load_artifact(artifact), state.config)
    tune_gc(state.config.server)  # as the server does once it has loaded
    begin, build, finish, whole = [], [], [], []
    seq = len(records)
    for repeat in range(REPEATS):
        started = time.perf_counter()
        plan = state.begin_swap(side)
        begin.append((time.perf_counter() - started) * 1e3)
        started = time.perf_counter()
        vectors = state.build_swap(plan)
        build.append((time.perf_counter() - started) * 1e3)
        # Users posting while the worker thread builds: refolded at the finish.
        again = online_events(state, 0, min(touched, n_online), 1, seq, seed + repeat + 1)
        seq += len(again)
        state.apply(again)
        finish.append(timed_ms(lambda p=plan, v=vectors: state.finish_swap(p, v)))
        whole.append(timed_ms(lambda: state.swap(side)))
    row = {
        "online_users": n_online,
        "events_per_user": per_user,
        "users": len(state.users),
        "touched_during_swap": min(touched, n_online),
        "begin_ms": float(np.median(begin)),
        "finish_ms": float(np.median(finish)),
        "on_loop_ms": float(np.median(np.add(begin, finish))),
        "worker_build_ms": float(np.median(build)),
        "whole_rebuild_ms": float(np.median(whole)),
    }
    progress(
        f"{n_online} online users: on the loop {row['on_loop_ms']:.1f} ms "
        f"(begin {row['begin_ms']:.1f}, finish {row['finish_ms']:.1f}); "
        f"whole rebuild {row['whole_rebuild_ms']:.1f} ms"
    )
    return row


def write_report(result: dict[str, Any], out: Path) -> None:
    """Markdown, JSON and a PNG of on-loop against whole-rebuild time."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "swap.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = result["rows"]
    lines = [
        *report_header(
            "Model swap: time the event loop is blocked",
            result["command"],
            result["machine"],
            result["load_start"],
            result["code"],
        ),
        "A reload rebuilds every user's vector under the new model in a worker thread. The event "
        "loop only copies the online graphs (begin) and, at the end, refolds the users who posted "
        "during the build and swaps the arrays in (finish). Whole rebuild: the same work done on "
        f"one thread, which is what the loop was blocked for before. Median of {REPEATS} swaps; "
        "trained users' vectors are refolded from the artifact's graph every time; garbage "
        "collector tuned as the server tunes it after loading.",
        "",
        "| online users | events each | users in total | posted during the swap | begin ms "
        "| finish ms | on the loop ms | worker build ms | whole rebuild ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['online_users']:,} | {r['events_per_user']} | {r['users']:,} "
            f"| {r['touched_during_swap']} | {r['begin_ms']:.1f} | {r['finish_ms']:.1f} "
            f"| {r['on_loop_ms']:.1f} | {r['worker_build_ms']:.1f} | {r['whole_rebuild_ms']:.1f} |"
        )
    (out / "swap.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    x = [r["online_users"] for r in rows]
    ax.plot(x, [r["whole_rebuild_ms"] for r in rows], "o--",
            label="whole rebuild on one thread (for comparison)")  # fmt: skip
    ax.plot(x, [r["worker_build_ms"] for r in rows], "^-", label="build (worker thread)")
    ax.plot(x, [r["on_loop_ms"] for r in rows], "s-", label="event loop blocked")
    ax.set_xscale("log")
    ax.set_xlabel("online users")
    ax.set_ylabel("ms per swap (median)")
    ax.set_title("Model swap: loop-blocking time")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "swap.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Measure swaps at each online-user count and write the report."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.swap", description=__doc__)
    p.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="artifact root")
    p.add_argument("--online", type=int, nargs="+", default=[1_000, 10_000, 50_000])
    p.add_argument("--events", type=int, default=20, help="events per online user")
    p.add_argument("--touched", type=int, default=100, help="users posting during each swap")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=REPORTS)
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    result: dict[str, Any] = {
        "command": command_line("benchmarks.swap", argv),
        "machine": machine(),
        "load_start": load_avg(),
        "code": git_state(),
        "rows": [measure(args.root, n, args.events, args.touched, args.seed) for n in args.online],
    }
    write_report(result, args.out)
    progress(f"wrote {args.out / 'swap.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
