"""The helpers that start real servers, run as a new user would (`python deploy/<helper>.py`),
stop them when they themselves are stopped with SIGTERM
(as `kill`, a supervisor or a CI runner does), not only on Ctrl-C: the helper exits within a
bounded time, and the server it started is gone and its port free (Milvus ignores SIGTERM for
half a minute; the helper escalates to SIGKILL)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deploy.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
HELPER_EXIT_S = 20  # the helper's stop: SIGTERM, a few seconds, then SIGKILL


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (not reaped yet by its new parent) holds nothing
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def _start_helper(args: list[str], ready: str, timeout: float) -> tuple[subprocess.Popen, int]:
    """Start the helper; wait for its ready line; return it and the server pid it printed."""
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + timeout
    seen = []
    for line in proc.stdout:  # the ready line names the server's pid
        seen.append(line)
        if line.startswith(ready):
            return proc, int(line.split("(pid ")[1].split(")")[0])
        if time.monotonic() > deadline:
            break
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail("helper did not report ready:\n" + "".join(seen)[-3000:])


def _sigterm_stops_everything(proc: subprocess.Popen, server_pid: int, port: int) -> float:
    assert _alive(server_pid) and _listening(port)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(HELPER_EXIT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        os.kill(server_pid, signal.SIGKILL)
        pytest.fail(f"the helper did not exit within {HELPER_EXIT_S} s of SIGTERM")
    took = time.monotonic() - t0
    try:
        assert not _alive(server_pid), "the helper exited but left its server running"
        deadline = time.monotonic() + 5  # the port closes with the process
        while _listening(port) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _listening(port)
    finally:
        if _alive(server_pid):
            os.kill(server_pid, signal.SIGKILL)
    return took


@pytest.mark.s3
def test_local_s3_helper_stops_its_server_on_sigterm(tmp_path):
    port = free_port()
    proc, pid = _start_helper(["deploy/local_s3.py", "--dir", str(tmp_path / "s3"),
                               "--port", str(port)], "SeaweedFS S3 on", 60)
    _sigterm_stops_everything(proc, pid, port)


def test_local_milvus_helper_stops_its_server_on_sigterm(tmp_path):
    pytest.importorskip("milvus")
    port = free_port()
    proc, pid = _start_helper(["deploy/local_milvus.py", "--dir", str(tmp_path / "milvus"),
                               "--port", str(port)], "Milvus standalone on", 180)
    _sigterm_stops_everything(proc, pid, port)
