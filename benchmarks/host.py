"""Where and how a benchmark ran, for its report: the CPU and GPU models (wall times mean little
without them) and the command that regenerates it."""

from __future__ import annotations

import os
import platform
import shlex
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo, else the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def gpu_model() -> str:
    """The NVIDIA GPUs' names from nvidia-smi ('' without one); no CUDA context is created."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return ""
    try:
        out = subprocess.run(
            [smi, "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return ""
    return ", ".join(line.strip() for line in out.splitlines() if line.strip())


def git_state(paths: Sequence[str] = ()) -> str:
    """HEAD commit and what differs from it (only under ``paths`` when given), for a report's
    "Code:" line; "unknown" outside a git checkout (e.g. a copy of the tree on another host)."""
    try:
        run = {"cwd": REPO, "check": True, "capture_output": True, "text": True}
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], **run).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", *paths], **run).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    changed = [line[3:] for line in dirty.splitlines() if line.strip()]
    if not changed:
        return head
    return f"{head} with uncommitted changes in " + (", ".join(changed) if paths else "the tree")


# Settings a report's command line leaves out: secrets, and the load generator's own plumbing.
UNRECORDED_ENV = ("SIGNEDREC_ACCESS__", "SIGNEDREC_LT_")


def command_line(module: str, argv: Sequence[str]) -> str:
    """The command that regenerates a report: the ``SIGNEDREC_*`` settings it ran under (they
    reach the server: another HTTP front or backend is another report), then its arguments."""
    env = [f"{key}={shlex.quote(value)}" for key, value in sorted(os.environ.items())
           if key.startswith("SIGNEDREC_") and not key.startswith(UNRECORDED_ENV)]  # fmt: skip
    return " ".join([*env, "python", "-m", module, *map(shlex.quote, argv)])
