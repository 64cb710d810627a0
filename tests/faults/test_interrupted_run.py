"""A test run stopped part-way (SIGTERM, as a CI runner cancelling a job or `kill` does; SIGHUP,
a closed terminal; Ctrl-C) still tears its fixtures down: the S3 server the session's fixture
started (in a session of its own, so no signal to pytest reaches it) is stopped and its port
free, and pytest exits within a bounded time."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.faults.test_server_helpers_stop import _alive, _listening

ROOT = Path(__file__).resolve().parents[2]
EXIT_S = 30  # pytest's teardown: the server's stop (SIGTERM, at most 10 s, then SIGKILL)

INNER = '''
import json, os, time

def test_waits_to_be_stopped(s3_server):
    with open(os.environ["RUNNING_MARKER"] + ".tmp", "w") as f:
        json.dump(s3_server, f)
    os.rename(os.environ["RUNNING_MARKER"] + ".tmp", os.environ["RUNNING_MARKER"])
    time.sleep(300)
'''


# as a terminal starts it: a run launched in the background (`cmd &` from a script) inherits
# SIGINT ignored, and Python then never raises KeyboardInterrupt. Set by a small launcher that
# execs pytest, not by a preexec_fn: that runs Python in the fork child of this worker, which
# may hold gRPC's threads (the Milvus client of tests run before in it), and a child once
# died there of SIGABRT ("epoll_wait error: Bad file descriptor") before it could exec.
SIGINT_AS_A_TERMINAL = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL);"
                        " os.execv(sys.executable, [sys.executable, *sys.argv[1:]])")


@pytest.mark.s3
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT],
                         ids=["SIGTERM", "SIGHUP", "SIGINT"])
def test_a_test_run_stopped_by_a_signal_stops_the_servers_its_fixtures_started(tmp_path, signum):
    (tmp_path / "test_inner.py").write_text(INNER)
    marker = tmp_path / "running.json"
    # the repository's fixtures as a plugin, on a test file of this test's own
    proc = subprocess.Popen(
        [sys.executable, "-c", SIGINT_AS_A_TERMINAL, "-m", "pytest", "-q", "-p", "tests.conftest",
         "-p", "no:cacheprovider", "--rootdir", str(tmp_path), str(tmp_path / "test_inner.py")],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT), "RUNNING_MARKER": str(marker)},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    server = None
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "the inner test did not start"
            time.sleep(0.1)
        server = json.loads(marker.read_text())
        port = int(server["endpoint"].rsplit(":", 1)[1])
        assert _alive(server["pid"]) and _listening(port)

        proc.send_signal(signum)
        try:
            out = proc.communicate(timeout=EXIT_S)[0]
        except subprocess.TimeoutExpired:
            proc.kill()  # what it had printed by then says where it hung
            pytest.fail(f"pytest did not exit within {EXIT_S} s of {signum.name}, load "
                        f"{os.getloadavg()[0]:.1f}:\n{proc.communicate()[0][-3000:]}")
        assert proc.returncode != 0, out[-3000:]
        assert not _alive(server["pid"]), f"the S3 server outlived the test run:\n{out[-3000:]}"
        assert not _listening(port)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if server is not None and _alive(server["pid"]):
            os.killpg(server["pid"], signal.SIGKILL)
