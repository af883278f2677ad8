"""The shared launcher of the real server process: environment overlay and failure reports."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import kernels
from server.config import HTTP_FRONTS
from server.default import DEFAULT_ARTIFACTS, DEFAULT_DATA, REPO_ROOT
from server.launch import ServeProcess, child_environment


def test_overlay_sets_and_removes_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIGNEDREC_TEST_KEEP", "kept")
    monkeypatch.setenv("SIGNEDREC_TEST_DROP", "dropped")
    env = child_environment({"SIGNEDREC_TEST_NEW": "1", "SIGNEDREC_TEST_DROP": None,
                             "SIGNEDREC_TEST_ABSENT": None})  # fmt: skip
    assert env["SIGNEDREC_TEST_KEEP"] == "kept"
    assert env["SIGNEDREC_TEST_NEW"] == "1"
    assert "SIGNEDREC_TEST_DROP" not in env
    assert "SIGNEDREC_TEST_ABSENT" not in env


def test_a_server_that_cannot_start_is_reported_with_its_log(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-artifact"
    log_path = tmp_path / "server.log"
    log_path.write_text("an earlier run's line\n")
    server = ServeProcess(
        missing, tmp_path / "state", log_path, {"SIGNEDREC_KERNELS__BACKEND": "cpu"}
    )
    with pytest.raises(RuntimeError, match="server exited with 2") as caught:
        server.wait_ready(timeout_s=120.0)
    assert str(missing) in str(caught.value)  # the CLI's own message, from the log's tail
    assert "an earlier run's line" not in server.log_text()  # this process's output only
    assert "an earlier run's line" in log_path.read_text()  # appended, not truncated
    assert server.stop() == 2


@pytest.mark.parametrize("front", HTTP_FRONTS)
def test_a_taken_port_fails_before_anything_loads(tmp_path: Path, front: str) -> None:
    """Exit 3 naming the address, without loading the artifact or creating the state."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        server = ServeProcess(
            DEFAULT_ARTIFACTS, tmp_path / "state", tmp_path / "server.log",
            {"SIGNEDREC_KERNELS__BACKEND": "cpu", "SIGNEDREC_SERVER__HTTP": front}, port=port,
        )  # fmt: skip
        with pytest.raises(RuntimeError, match="server exited with 3") as caught:
            server.wait_ready(timeout_s=120.0)
    assert f"cannot listen on 127.0.0.1:{port}" in str(caught.value)
    assert "listening on" not in server.log_text()
    assert not (tmp_path / "state").exists()  # no event log was opened, nothing replayed


def test_a_cuda_backend_on_a_host_without_one_is_a_config_error(tmp_path: Path) -> None:
    """Exit 2 with the CLI's one-line error (bad configuration), not 3 (a bug)."""
    if kernels._cuda_problem() is None:  # the same device check test_kernels uses
        pytest.skip("a CUDA device is present: kernels.backend=cuda works here")
    server = ServeProcess(
        DEFAULT_ARTIFACTS, tmp_path / "state", tmp_path / "server.log",
        {"SIGNEDREC_KERNELS__BACKEND": "cuda", "NUMBA_ENABLE_CUDASIM": None},
    )  # fmt: skip
    with pytest.raises(RuntimeError, match="server exited with 2") as caught:
        server.wait_ready(timeout_s=120.0)
    assert "signedrec serve: error: kernels.backend: kernel backend 'cuda' was requested" in str(
        caught.value
    )


def test_a_state_dir_that_is_a_file_is_one_line_exit_2(tmp_path: Path) -> None:
    """Not a NotADirectoryError traceback and exit 3: the CLI's refusal, before it listens."""
    state = tmp_path / "state"
    state.write_text("a file, not a directory\n")
    server = ServeProcess(
        DEFAULT_ARTIFACTS, state, tmp_path / "server.log", {"SIGNEDREC_KERNELS__BACKEND": "cpu"}
    )
    with pytest.raises(RuntimeError, match="server exited with 2") as caught:
        server.wait_ready(timeout_s=120.0)
    assert f"signedrec serve: error: state dir {state}: exists and is not a directory" in str(
        caught.value
    )
    assert "Traceback" not in server.log_text()
    assert "listening on" not in server.log_text()


def test_a_stop_while_the_default_trains_exits_0_and_writes_nothing(tmp_path: Path) -> None:
    """`serve` with no default trains one first; a SIGTERM then (a deploy rolled back, say)
    ends it like a SIGTERM while serving: exit 0, no version and no temp dir left behind."""
    repo = tmp_path / "clone"  # a fresh clone: the code and the in-repo data, no default yet
    for package in ("server", "kernels"):
        shutil.copytree(REPO_ROOT / package, repo / package,
                        ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    shutil.copytree(DEFAULT_DATA, repo / "model_artifacts" / "default-data")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = child_environment({"PYTHONPATH": str(repo), "SIGNEDREC_KERNELS__BACKEND": "cpu"})
    with (tmp_path / "serve.log").open("w+") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve", "--port", str(port),
             "--state-dir", str(tmp_path / "state")],
            cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            # The trainer's first progress line: the data is read, the model search is next.
            while "valid rows;" not in (tmp_path / "serve.log").read_text():
                assert proc.poll() is None
                assert time.monotonic() < deadline
                time.sleep(0.1)
            time.sleep(0.5)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0
        finally:
            proc.kill()
            proc.wait()
    text = (tmp_path / "serve.log").read_text()
    assert "SIGTERM while training the default: stopped before serving" in text
    assert "Traceback" not in text
    root = repo / "model_artifacts" / "default"
    assert not root.exists() or not any(root.iterdir())


@pytest.mark.parametrize("front", HTTP_FRONTS)
def test_a_stop_signal_just_after_listening_is_honoured(tmp_path: Path, front: str) -> None:
    """Sent as "listening on" is logged, before the front's own handlers exist: uvicorn's
    placeholder swallowed it (the server kept serving), granian died by it (exit 143)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = child_environment({"SIGNEDREC_KERNELS__BACKEND": "cpu", "SIGNEDREC_SERVER__HTTP": front})
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve", "--artifact", str(DEFAULT_ARTIFACTS),
             "--port", str(port), "--state-dir", str(tmp_path / "state")],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while "listening on" not in log_path.read_text():
                assert proc.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline
                time.sleep(0.005)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0, log_path.read_text()[-3000:]
        finally:
            proc.kill()
            proc.wait()
