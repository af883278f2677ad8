"""The capacity report says what was and was not measured (no Locust run: steps are given)."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

import loadtest.run as capacity
from benchmarks.host import command_line
from loadtest.run import Step
from server.artifacts import resolve
from server.default import DEFAULT_ARTIFACTS
from server.launch import free_port


def _step(target: str, rate: float, achieved: float, p99: float = 50.0) -> Step:
    return Step(
        target=target, offered_rps=rate, users=int(rate // 5), achieved_rps=achieved,
        requests=int(achieved * 30), failures=0, p50_ms=5.0, p95_ms=20.0, p99_ms=p99,
        max_ms=100.0, server_cpu_percent=50.0, server_rss_mb=500.0, locust_cpu_percent=60.0,
        cache_hit_rate=None if target == "healthz" else 0.8, errors=[],
    )  # fmt: skip


def _render(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, steps: list[Step], duration: int
) -> tuple[str, dict[str, object]]:
    monkeypatch.setattr(capacity, "REPORTS", tmp_path)
    args = argparse.Namespace(duration=duration, report="cap", processes=1)
    md = capacity.report(steps, args, "a test machine")
    return md.read_text(), json.loads((tmp_path / "cap.json").read_text())


def test_a_failing_healthz_step_sets_the_ceiling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    steps = [_step("mixed", 1000, 1001), _step("mixed", 2000, 1500, p99=900)]
    steps += [
        _step("healthz", 1000, 1002),
        _step("healthz", 2000, 1999),
        _step("healthz", 4000, 3000),
    ]
    text, payload = _render(tmp_path, monkeypatch, steps, 60)
    assert "**PASS** (achieved 1001.0/s" in text
    assert "ceiling in the same run: 2000 req/s; ratio 0.50" in text
    assert payload["healthz_ceiling_found"] is True
    assert payload["highest_holding_rps"] == {"mixed": 1000.0, "healthz": 2000.0}
    assert (tmp_path / "cap.png").stat().st_size > 0


def test_an_unreached_ceiling_makes_the_ratio_an_upper_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    steps = [_step("mixed", 1000, 1001), _step("healthz", 1000, 1000), _step("healthz", 3000, 3000)]
    text, payload = _render(tmp_path, monkeypatch, steps, 30)
    assert "not reached (every step up to 3000 req/s held)" in text
    assert "ratio 0.33 is an upper bound" in text
    assert "**not measured**: steps held 30 s" in text  # the 1000 req/s bar needs 60 s steps
    assert payload["bar_1000rps_60s"] is False


def test_mixed_only_runs_say_the_ceiling_was_not_measured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text, _ = _render(tmp_path, monkeypatch, [_step("mixed", 3000, 2990)], 60)
    assert "not measured (this run's targets: mixed only)" in text
    assert "**not measured** (no 1000 req/s step in this run)" in text


def test_locust_gets_half_the_cores_by_default() -> None:
    assert [capacity.default_processes(c) for c in (1, 2, 3, 16, 64)] == [1, 1, 1, 8, 8]


def test_a_step_failed_on_a_saturated_machine_is_flagged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(capacity.os, "sched_getaffinity", lambda _pid: {0, 1})
    shared = _step("mixed", 4500, 3945, p99=320)
    shared.server_cpu_percent, shared.locust_cpu_percent = 95.0, 80.0  # 175% of 2 cores' 200%
    idle = _step("mixed", 5000, 4000, p99=900)  # failed with CPU to spare: the server's limit
    held = _step("mixed", 1000, 1001)
    held.server_cpu_percent, held.locust_cpu_percent = 99.0, 99.0  # saturated, but it held
    ceiling = _step("healthz", 5500, 4936, p99=240)  # the one Locust process at 99%
    ceiling.server_cpu_percent, ceiling.locust_cpu_percent = 40.0, 99.0
    text, payload = _render(tmp_path, monkeypatch, [held, shared, idle, ceiling], 60)
    assert "mixed 4500/s failed with the machine saturated: server 95% + Locust 80% of 2" in text
    assert "healthz 5500/s failed with Locust itself saturated: its 1 process(es) used 99%" in text
    assert "5000/s failed with" not in text
    assert "1000/s failed" not in text
    saturated = [(s["target"], s["offered_rps"]) for s in payload["saturated_failed_steps"]]
    assert saturated == [("mixed", 4500), ("healthz", 5500)]


def test_server_cpu_is_the_steady_share_not_diluted_by_locusts_idle_seconds() -> None:
    """Two idle seconds while Locust starts and one while it stops leave a 60 s step at 80%."""
    samples = [0.0, 0.0, *[80.0] * 57, 0.0]
    assert capacity.steady_cpu(samples) == 80.0
    assert sum(samples) / len(samples) == 76.0  # what the mean reported
    assert math.isnan(capacity.steady_cpu([]))  # no sample taken


def test_a_reports_command_carries_the_settings_the_server_ran_under(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Rerun as recorded, a granian report without SIGNEDREC_SERVER__HTTP measured uvicorn and
    overwrote it; secrets and the load generator's own variables stay out."""
    for name in [n for n in os.environ if n.startswith("SIGNEDREC_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("SIGNEDREC_SERVER__HTTP", "granian")
    monkeypatch.setenv("SIGNEDREC_ACCESS__KEYS", '{"secret": "admin"}')
    monkeypatch.setenv("SIGNEDREC_LT_RATE", "3")
    line = command_line("loadtest.run", ["--report", "capacity granian", "--rates", "1000"])
    assert line == ("SIGNEDREC_SERVER__HTTP=granian python -m loadtest.run "
                    "--report 'capacity granian' --rates 1000")  # fmt: skip


def test_a_report_name_with_a_dot_is_kept_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--report capacity.scratch` must not become (and overwrite) capacity.{md,json,png}."""
    monkeypatch.setattr(capacity, "REPORTS", tmp_path)
    args = argparse.Namespace(duration=30, report="capacity.scratch", processes=1)
    md = capacity.report([_step("mixed", 1000, 1001)], args, "a test machine")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "capacity.scratch.json", "capacity.scratch.md", "capacity.scratch.png",
    ]  # fmt: skip
    assert "](capacity.scratch.png)" in md.read_text()


def _step_against(port: int, server: subprocess.Popen[bytes], tmp_path: Path) -> Step:
    """One short real Locust step of the mixed traffic at ``port``."""
    return capacity.run_step("mixed", 20, 5.0, 3, port, resolve(DEFAULT_ARTIFACTS), 1, tmp_path,
                             server)  # fmt: skip


def test_requests_that_get_no_response_are_failures_not_lost(tmp_path: Path) -> None:
    """A refused or reset connection has no status: each is a counted failure saying why, and
    the step does not hold (they once vanished from Locust's stats, and the step held)."""
    server = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        step = _step_against(free_port(), server, tmp_path)  # nothing listens there
    finally:
        server.kill()
        server.wait()
    assert step.requests > 0
    assert step.failures == step.requests
    assert not step.holds
    assert step.errors
    assert all("no response" in e for e in step.errors)
    assert step.server_exit is None


def test_a_server_that_died_fails_the_step_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = subprocess.Popen([sys.executable, "-c", "raise SystemExit(9)"])
    server.wait()
    step = _step_against(free_port(), server, tmp_path)
    assert step.server_exit == 9
    assert not step.holds
    assert "the server exited with 9 during this step" in step.errors
    text, payload = _render(tmp_path / "report", monkeypatch, [step], 60)
    assert "the server exited with 9" in text
    assert payload["steps"][0]["holds"] is False  # type: ignore[index]
