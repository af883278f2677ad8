"""Capacity runner: start the server, drive Locust headless through stepped offered loads, and the
same steps against /healthz as the framework's ceiling; write benchmarks/reports/capacity.*.

    python -m loadtest.run [--artifact DIR] [--duration 60] [--rates 250,500,1000,2000,4000]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import psutil

from benchmarks.host import command_line, cpu_model, git_state, gpu_model
from server.launch import ServeProcess

REPO = Path(__file__).resolve().parent.parent
REPORTS = REPO / "benchmarks" / "reports"
LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
P99_BAR_MS = 500.0
ACHIEVED_SHARE = 0.99  # a step holds when it achieves at least this share of what was offered
START_TIMEOUT_S = 300.0  # a first start on a GPU also compiles the CUDA kernels
# A failed step whose server and Locust CPU together reach this share of every core, or whose
# Locust processes reach it of theirs, was bounded by the load generator or the shared machine,
# not necessarily by the server.
SATURATED_SHARE = 0.85


@dataclass
class Step:
    """One offered load held for a while, and what came of it."""

    target: str
    offered_rps: float
    users: int
    achieved_rps: float
    requests: int
    failures: int
    # None when no request got any response: Locust then has no latency to report.
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    server_cpu_percent: float
    server_rss_mb: float
    locust_cpu_percent: float  # the load generator shares the machine: its CPU, all processes
    cache_hit_rate: float | None  # share of ranked requests answered from the ranking memo
    errors: list[str]  # the most frequent failure messages, "count x method name: error"
    server_exit: int | None = None  # the server's exit code when it died during the step

    @property
    def holds(self) -> bool:
        """p99 under the bar, no failures, the offered load achieved, and the server still up."""
        return (
            self.server_exit is None
            and self.failures == 0
            and self.p99_ms is not None
            and self.p99_ms < P99_BAR_MS
            and self.achieved_rps >= ACHIEVED_SHARE * self.offered_rps
        )


def metrics_lines(port: int) -> list[str]:
    """The server's /metrics exposition, a line each."""
    return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text.splitlines()


def cache_counts(port: int) -> tuple[float, float]:
    """The server's ranking-memo (hits, misses) so far, read from /metrics ((0, 0) when the
    server does not answer: the step then reports no memo share, and its failures)."""
    counts = {"hit": 0.0, "miss": 0.0}
    try:
        lines = metrics_lines(port)
    except httpx.HTTPError:
        return 0.0, 0.0
    for line in lines:
        if line.startswith("signedrec_ranking_cache_total{"):
            result = line.split('result="', 1)[1].split('"', 1)[0]
            counts[result] = float(line.rsplit(" ", 1)[1])
    return counts["hit"], counts["miss"]


def default_processes(cores: int | None = None) -> int:
    """Locust processes to use: half the cores, so the server keeps the rest (1 on 2 cores, as
    the CPU report was taken; 8 on a 16-core GPU machine, as the H100 report was)."""
    return max(1, min(8, (cores or os.cpu_count() or 2) // 2))


def served_backend(port: int) -> str:
    """Where the server says its hot path runs (kernel backend, FAISS device, HTTP front), from
    /metrics."""
    for line in metrics_lines(port):
        if line.startswith("signedrec_backend_info{"):
            inner = line.split("{", 1)[1].split("}", 1)[0]
            labels = {k: v.strip('"') for k, v in (p.split("=", 1) for p in inner.split(","))}
            front = f", HTTP by {labels['http']}" if "http" in labels else ""
            return f"kernels on {labels['kernels']}, FAISS on {labels['index']}{front}"
    return "backend not reported"


class Sampler(threading.Thread):
    """Samples a process's CPU% and RSS while a step runs."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.cpu: list[float] = []
        self.rss: list[float] = []
        self.stop_flag = threading.Event()

    def run(self) -> None:
        try:
            proc = psutil.Process(self.pid)
            proc.cpu_percent(None)
            while not self.stop_flag.wait(1.0):
                self.cpu.append(proc.cpu_percent(None))
                self.rss.append(proc.memory_info().rss / 2**20)
        except psutil.Error:  # the server died: the step reports it, the samples so far stand
            return

    def result(self) -> tuple[float, float]:
        """The step's steady CPU% (see ``steady_cpu``) and its peak RSS in MiB."""
        self.stop_flag.set()
        self.join()
        return steady_cpu(self.cpu), max(self.rss, default=math.nan)


def steady_cpu(samples: list[float]) -> float:
    """The median of a step's 1 s CPU samples: the seconds while Locust starts and stops send
    nothing, and a mean over them understated the server's share under load."""
    return statistics.median(samples) if samples else math.nan


def run_step(
    target: str, rate: float, per_user: float, duration: int, port: int, artifact: Path,
    processes: int, workdir: Path, server: subprocess.Popen[bytes],
) -> Step:  # fmt: skip
    """Hold one offered load with Locust headless and read its aggregated stats."""
    users = max(1, math.ceil(rate / per_user))
    prefix = workdir / f"{target}-{int(rate)}"
    env = {
        **os.environ,
        "SIGNEDREC_LT_ARTIFACT": str(artifact),
        "SIGNEDREC_LT_RATE": str(rate / users),
        "SIGNEDREC_LT_TARGET": target,
    }
    cmd = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary",
        "-u", str(users), "-r", str(users), "--run-time", f"{duration}s",
        "--host", f"http://127.0.0.1:{port}", "--csv", str(prefix), "--reset-stats",
        "--loglevel", "WARNING", "--stop-timeout", "5",
    ]  # fmt: skip
    if processes > 1:
        cmd += ["--processes", str(processes)]
    sampler = Sampler(server.pid)
    sampler.start()
    memo_before = cache_counts(port)
    before, started = resource.getrusage(resource.RUSAGE_CHILDREN), time.monotonic()
    subprocess.run(cmd, cwd=REPO, env=env, check=False, capture_output=True)
    after, wall = resource.getrusage(resource.RUSAGE_CHILDREN), time.monotonic() - started
    # Only waited-for children count here: Locust and its workers, never the running server.
    locust_cpu = 100.0 * ((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime))
    cpu, rss = sampler.result()
    exit_code = server.poll()
    hits = misses = 0.0
    if exit_code is None:
        memo_after = cache_counts(port)
        hits, misses = memo_after[0] - memo_before[0], memo_after[1] - memo_before[1]
    with open(f"{prefix}_stats.csv") as handle:
        row = next(r for r in csv.DictReader(handle) if r["Name"] == "Aggregated")
    with open(f"{prefix}_failures.csv") as handle:
        failed = sorted(csv.DictReader(handle), key=lambda r: -int(r["Occurrences"]))
    # A request the locustfile raised on is in neither file above: never a silent loss.
    with open(f"{prefix}_exceptions.csv") as handle:
        raised = list(csv.DictReader(handle))
    errors = [f"{r['Occurrences']} x {r['Method']} {r['Name']}: {r['Error'][:160]}"
              for r in failed[:3]]  # fmt: skip
    errors += [f"{r['Count']} x locustfile raised {r['Message'][:160]}" for r in raised[:3]]
    if exit_code is not None:
        errors.append(f"the server exited with {exit_code} during this step")
    return Step(
        target=target, offered_rps=rate, users=users,
        achieved_rps=float(row["Requests/s"]), requests=int(row["Request Count"]),
        failures=int(row["Failure Count"]) + sum(int(r["Count"]) for r in raised),
        p50_ms=_latency(row["50%"]), p95_ms=_latency(row["95%"]), p99_ms=_latency(row["99%"]),
        max_ms=_latency(row["Max Response Time"]),
        server_cpu_percent=round(cpu, 1), server_rss_mb=round(rss, 1),
        locust_cpu_percent=round(locust_cpu / wall, 1),
        cache_hit_rate=round(hits / (hits + misses), 3) if hits + misses else None,
        errors=errors, server_exit=exit_code,
    )  # fmt: skip


def _latency(field: str) -> float | None:
    """A latency column of Locust's CSV: "N/A" when no request got a response."""
    return None if field == "N/A" else float(field)


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.0f}"


def _plot(steps: list[Step], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for target, style in (("mixed", "o-"), ("healthz", "s--")):
        rows = [s for s in steps if s.target == target]
        if rows:
            label = "signedrec 90/10 mix" if target == "mixed" else "/healthz (ceiling)"
            answered = [s for s in rows if s.p99_ms is not None]
            ax.plot([s.achieved_rps for s in answered], [s.p99_ms for s in answered], style,
                    label=label)  # fmt: skip
    ax.axhline(P99_BAR_MS, color="red", lw=0.8, label="p99 bar 500 ms")
    ax.set_xlabel("achieved requests/s")
    ax.set_ylabel("p99 latency (ms)")
    ax.set_yscale("log")
    ax.set_title("Latency against throughput (Locust, same machine)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def saturated_steps(steps: list[Step], cores: int, processes: int) -> list[tuple[Step, str]]:
    """Failed steps that may have measured the load generator: each with why, for the report."""
    out = []
    for s in steps:
        server, locust = s.server_cpu_percent, s.locust_cpu_percent
        if s.holds:
            continue
        if locust >= SATURATED_SHARE * 100.0 * processes:
            why = (f"Locust itself saturated: its {processes} process(es) used {locust:.0f}% of a "
                   "core, so this step measured the load generator, not the server")  # fmt: skip
        elif server + locust >= SATURATED_SHARE * 100.0 * cores:
            why = (f"the machine saturated: server {server:.0f}% + Locust {locust:.0f}% of "
                   f"{cores} cores' 100% each, so the load generator sharing them may be what "
                   "gave out, not the server")  # fmt: skip
        else:
            continue
        out.append((s, why))
    return out


def _bar_1000_text(step: Step | None, duration: int, passed: bool) -> str:
    """The 1000 req/s bar's verdict: measured only by a 1000 req/s step held 60 s or more."""
    if step is None:
        return "**not measured** (no 1000 req/s step in this run)"
    verdict = (
        f"**not measured**: steps held {duration} s"
        if duration < 60
        else f"**{'PASS' if passed else 'FAIL'}**"
    )
    return (
        f"{verdict} (achieved {step.achieved_rps:.1f}/s, p99 {_ms(step.p99_ms)} ms, "
        f"{step.failures} failures)"
    )


def _ceiling_text(ceiling: float, ratio: float, measured: bool, found: bool) -> str:
    """The /healthz ceiling and the ratio to it, saying when no step failed to bound it."""
    if not measured:
        return "not measured (this run's targets: mixed only)."
    if found:
        return f"{ceiling:.0f} req/s; ratio {ratio:.2f} (aim >= 0.7)."
    return (
        f"not reached (every step up to {ceiling:.0f} req/s held), so the ratio {ratio:.2f} "
        "is an upper bound (aim >= 0.7)."
    )


def report(steps: list[Step], args: argparse.Namespace, device: str) -> Path:
    """Write <report>.md, .json and .png (capacity.* by default); return the markdown's path."""
    # The name as given, dots and all (with_suffix would cut "capacity.scratch" to "capacity").
    json_path, md_path, png_path = (REPORTS / f"{args.report}.{x}" for x in ("json", "md", "png"))
    REPORTS.mkdir(parents=True, exist_ok=True)
    best = {
        t: max((s.offered_rps for s in steps if s.target == t and s.holds), default=0.0)
        for t in ("mixed", "healthz")
    }
    ratio = best["mixed"] / best["healthz"] if best["healthz"] else math.nan
    # A ceiling is found only when some /healthz step failed; else it is at least the top step.
    healthz = [s for s in steps if s.target == "healthz"]
    ceiling_found = any(not s.holds for s in healthz)
    cores = len(os.sched_getaffinity(0))
    at_1000 = next((s for s in steps if s.target == "mixed" and s.offered_rps == 1000), None)
    bar_1000 = bool(at_1000 and at_1000.achieved_rps >= 990 and at_1000.holds
                    and args.duration >= 60)  # fmt: skip
    payload = {
        "command": command_line("loadtest.run", sys.argv[1:]),
        "git": git_state(),
        "device": device,
        "duration_s": args.duration,
        "steps": [asdict(s) | {"holds": s.holds} for s in steps],
        "highest_holding_rps": best,
        "ratio_to_healthz": ratio,
        "healthz_ceiling_found": ceiling_found,
        "bar_1000rps_60s": bar_1000,
        "saturated_failed_steps": [
            {"target": s.target, "offered_rps": s.offered_rps, "why": why}
            for s, why in saturated_steps(steps, cores, args.processes)
        ],
    }
    json_path.write_text(json.dumps(payload, indent=2))
    lines = [
        "# Capacity (Locust)",
        "",
        f"Command: `{payload['command']}`  ",
        f"Machine: {device}. Locust runs on the same machine as the server. "
        f"Code: {payload['git']}.  ",
        f"Each step held {args.duration} s; a step *holds* when p99 < {P99_BAR_MS:.0f} ms, "
        f"0 failures and achieved >= {ACHIEVED_SHARE:.0%} of offered. Server and Locust CPU are "
        "each in % of one core (server: the median of 1 s samples over the step; the machine has "
        f"{cores} cores for both). *memo hits*: share of ranked "
        "recommendation requests answered from the per-user ranking memo, which is exact (a "
        "user's entry is dropped on that user's next event and on every model swap; "
        "`ranking.cache_users = 0` turns it off).",
        "",
        "| target | offered/s | users | achieved/s | requests | failures | p50 ms | p95 ms | "
        "p99 ms | max ms | server CPU % | server RSS MB | Locust CPU % | memo hits | holds |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in steps:
        lines.append(
            f"| {s.target} | {s.offered_rps:.0f} | {s.users} | {s.achieved_rps:.1f} | "
            f"{s.requests} | {s.failures} | {_ms(s.p50_ms)} | {_ms(s.p95_ms)} | {_ms(s.p99_ms)} | "
            f"{_ms(s.max_ms)} | {s.server_cpu_percent:.0f} | {s.server_rss_mb:.0f} | "
            f"{s.locust_cpu_percent:.0f} | "
            f"{'—' if s.cache_hit_rate is None else f'{s.cache_hit_rate:.0%}'} | "
            f"{'yes' if s.holds else 'no'} |"
        )
    failing = [s for s in steps if s.errors]
    if failing:
        lines += ["", "Failures by message (most frequent first):"]
        lines += [f"- {s.target} {s.offered_rps:.0f}/s: {e}" for s in failing for e in s.errors]
    lines += [
        "",
        "## Bars",
        "- 1000 req/s offered for 60 s: achieved >= 990/s, p99 < 500 ms, 0 failures: "
        + _bar_1000_text(at_1000, args.duration, bar_1000),
        f"- Highest holding step: {best['mixed']:.0f} req/s; /healthz ceiling in the same run: "
        + _ceiling_text(best["healthz"], ratio, bool(healthz), ceiling_found),
        *(
            f"- {s.target} {s.offered_rps:.0f}/s failed with {why}; Locust on another machine "
            "(or more Locust processes) would tell."
            for s, why in saturated_steps(steps, cores, args.processes)
        ),
        "",
        f"![latency against throughput]({png_path.name})",
    ]
    md_path.write_text("\n".join(lines) + "\n")
    _plot(steps, png_path)
    return md_path


def main(argv: list[str] | None = None) -> int:
    """Run the stepped load for the mixed traffic and for /healthz, then write the report."""
    from server.default import DEFAULT_ARTIFACTS

    parser = argparse.ArgumentParser(prog="python -m loadtest.run", description=__doc__)
    parser.add_argument("--artifact", type=Path, default=DEFAULT_ARTIFACTS)
    parser.add_argument("--duration", type=int, default=60, help="seconds per step")
    parser.add_argument("--rates", default="250,500,1000,2000,4000")
    parser.add_argument("--per-user-rps", type=float, default=5.0)
    parser.add_argument(
        "--processes", type=int, default=default_processes(),
        help="Locust worker processes (default: half the cores, 1 to 8)",
    )  # fmt: skip
    parser.add_argument("--targets", default="mixed,healthz")
    parser.add_argument("--keep-going", action="store_true", help="run steps past a failing one")
    parser.add_argument(
        "--report", default="capacity", help="report file stem under benchmarks/reports"
    )
    args = parser.parse_args(argv)
    from server.artifacts import resolve

    artifact = resolve(args.artifact)
    rates = [float(r) for r in args.rates.split(",")]
    from server.index import gpu_count

    gpus, _ = gpu_count()  # the server's index.device "auto" makes the same check
    gpu = gpu_model()
    device = f"{cpu_model()}, {os.cpu_count()} cores, " + (
        f"GPU {gpu} ({gpus} visible to FAISS)" if gpu else "no GPU"
    )
    served: set[str] = set()
    steps: list[Step] = []
    with tempfile.TemporaryDirectory(prefix="signedrec-capacity-") as tmp:
        work = Path(tmp)
        for target in args.targets.split(","):
            state = work / f"state-{target}"
            env = {"SIGNEDREC_SERVER__LOG_LEVEL": "warning"}
            server = ServeProcess(artifact, state / "s", state / "server.log", env)
            server.wait_ready(START_TIMEOUT_S)
            port = server.port
            served.add(served_backend(port))
            try:
                for rate in rates:
                    print(f"[capacity] {target}: offering {rate:.0f} req/s for {args.duration}s",
                          file=sys.stderr, flush=True)  # fmt: skip
                    step = run_step(target, rate, args.per_user_rps, args.duration, port,
                                    artifact, args.processes, work, server.proc)  # fmt: skip
                    steps.append(step)
                    print(
                        f"[capacity] {target} {rate:.0f}/s -> achieved {step.achieved_rps:.0f}/s "
                        f"p99 {_ms(step.p99_ms)} ms failures {step.failures} "
                        f"server CPU {step.server_cpu_percent:.0f}% Locust CPU "
                        f"{step.locust_cpu_percent:.0f}%",
                        file=sys.stderr, flush=True,
                    )  # fmt: skip
                    if step.server_exit is not None:  # the report says so; no later step can run
                        print(f"[capacity] {target}: the server exited with {step.server_exit}",
                              file=sys.stderr, flush=True)  # fmt: skip
                        break
                    if not args.keep_going and not step.holds:
                        break
            finally:
                server.stop()
    device += "; server: " + " / ".join(sorted(served))
    print(f"wrote {report(steps, args, device)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
