"""`signedrec serve` as a child process on a free loopback port: for tests, benchmarks, load tests.

Everything that must talk HTTP to the real server (the service tests, the benchmarks, the Locust
driver) starts it the same way: a fresh port, output appended to a log file, readiness polled on
``/readyz``, SIGTERM to stop (SIGKILL after a grace period), the log's tail in every error.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 180.0  # a cold numba cache compiles every kernel at first start
STOP_TIMEOUT_S = 60.0
LOG_TAIL_CHARS = 3000


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def child_environment(overlay: Mapping[str, str | None]) -> dict[str, str]:
    """This process's environment with ``overlay`` laid over it; ``None`` removes a variable."""
    env = dict(os.environ)
    for name, value in overlay.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


class ServeProcess:
    """One ``python -m server.cli serve`` child; ``env`` is laid over this process's environment.

    A ``None`` value in ``env`` removes that variable for the child.
    """

    def __init__(
        self,
        artifact: Path,
        state_dir: Path,
        log_path: Path,
        env: Mapping[str, str | None] | None = None,
        port: int | None = None,
    ) -> None:
        self.port = free_port() if port is None else port
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = log_path.open("ab")  # appended, so restarts on one log keep the history
        self._log_offset = self._log.tell()
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve", "--artifact", str(artifact),
             "--port", str(self.port), "--state-dir", str(state_dir)],
            cwd=REPO, env=child_environment(env or {}), stdout=self._log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.pid = self.proc.pid

    def log_text(self) -> str:
        """What this process has written to the log so far."""
        with self.log_path.open("rb") as handle:
            handle.seek(self._log_offset)
            return handle.read().decode(errors="replace")

    def ready(self) -> bool:
        """Whether ``/readyz`` answers 200 now; an exited process is an error naming its log."""
        if self.proc.poll() is not None:
            raise RuntimeError(
                f"server exited with {self.proc.returncode}:\n{self.log_text()[-LOG_TAIL_CHARS:]}"
            )
        try:
            with urllib.request.urlopen(f"{self.url}/readyz", timeout=5.0) as answer:
                return bool(answer.status == 200)
        except urllib.error.HTTPError as answer:  # 503 while loading
            answer.close()
            return False
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False  # not listening yet

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S, poll_s: float = 0.05) -> float:
        """Block until ready; seconds from spawn to the first 200. On failure it is reaped."""
        deadline = self.started + timeout_s
        try:
            while time.monotonic() < deadline:
                if self.ready():
                    return time.monotonic() - self.started
                time.sleep(poll_s)
            raise RuntimeError(
                f"server not ready in {timeout_s:g} s:\n{self.log_text()[-LOG_TAIL_CHARS:]}"
            )
        except RuntimeError:
            self.kill()
            raise

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """Send ``sig`` (graceful by default) and reap, killing after ``timeout_s``; exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return int(self.proc.returncode)

    def kill(self) -> None:
        """SIGKILL now (a crash, as far as the server can tell) and reap."""
        self.stop(signal.SIGKILL)

    def cpu_s(self) -> float:
        """User + system CPU seconds the server process has used."""
        times = psutil.Process(self.pid).cpu_times()
        return float(times.user + times.system)

    def rss_bytes(self) -> int:
        """Resident set size of the server process."""
        return int(psutil.Process(self.pid).memory_info().rss)
