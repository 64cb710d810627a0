"""deploy/local_stack.sh for real, as the README has a user run it: `start` (SeaweedFS, `airflow
standalone`, the search API on the shipped model), the documented `airflow dags trigger
flickr8k_data_ingestion` on a few photos made here, the API serving them (a search returns them,
an image URL returns the photo's bytes), and `stop` leaving nothing running: no process of the
sessions it started, no port they listened on.

Every port is a free one (deploy.ports), Airflow's log servers' included; the stack's state lives
in a temporary STACK_DIR. The DAGs start paused (AIRFLOW_DAGS_PAUSED) and only the ingestion is
unpaused: the reindex DAG's first scheduled run would otherwise race it for the first version.
"""
from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from contextlib import closing
from pathlib import Path

import pytest

from core.settings import Settings
from deploy.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "deploy" / "local_stack.sh"
ARTIFACTS = ROOT / "test-artifacts"
VENV = Path(sys.executable).parent.parent  # the venv the tests run in (not resolved: a symlink)
DAG = "flickr8k_data_ingestion"
PORTS = ("S3_PORT", "API_PORT", "AIRFLOW_PORT", "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT",
         "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT")
# settings, stack knobs and Airflow's own variables in the developer's shell stay out of the stack
OURS = {name.upper() for name in Settings.model_fields} | {"STACK_DIR", "VENV", *PORTS}


def _script(env: dict, command: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), command], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _airflow(env: dict, *args: str) -> subprocess.CompletedProcess:
    """An `airflow` command as the README gives it: the venv first on PATH, AIRFLOW_HOME."""
    return subprocess.run(["airflow", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**env, "PATH": f"{VENV / 'bin'}:{env['PATH']}",
                                            "AIRFLOW_HOME": env["AIRFLOW_HOME"]})


def _get(url: str, timeout: float = 10) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


def _post_json(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def _db(env: dict, sql: str, *args):
    with closing(sqlite3.connect(Path(env["AIRFLOW_HOME"]) / "airflow.db", timeout=10)) as db:
        return db.execute(sql, args).fetchall()


def _session_ids(run_dir: Path) -> dict[str, int]:
    """name -> the session the script started it in (setsid: the session id is its pid)."""
    return {f.stem: int(f.read_text()) for f in run_dir.glob("*.pid")}


def _in_session(sid: int) -> set[int]:
    """The live processes of a session (a zombie has exited: only its parent's wait is due)."""
    r = subprocess.run(["ps", "-s", str(sid), "-o", "pid=,stat="], capture_output=True, text=True)
    return {int(pid) for pid, stat in map(str.split, r.stdout.splitlines()) if not stat.startswith("Z")}


def _alive(pid: int) -> bool:
    try:  # the state follows the command name, which is in parentheses and may hold spaces
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _described(pids) -> str:
    r = subprocess.run(["ps", "-o", "pid,ppid,sid,stat,etime,args", "-p", ",".join(map(str, pids))],
                       capture_output=True, text=True)
    return r.stdout


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _until(what: str, check, timeout: float, on_timeout=lambda: ""):
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout} s\n{on_timeout()}")
        time.sleep(0.5)


def _tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else f"(no {path})"


@pytest.fixture
def stack_env(tmp_path) -> dict:
    for tool in ("airflow", "weed"):
        if not (VENV / "bin" / tool).exists():
            pytest.fail(f"{tool} missing in {VENV}: `make setup` installs it")
    env = {k: v for k, v in os.environ.items() if k not in OURS and not k.startswith("AIRFLOW")}
    env.update({name: str(free_port()) for name in PORTS})
    stack_dir = tmp_path / "stack"
    env.update({"VENV": str(VENV), "STACK_DIR": str(stack_dir),
                "AIRFLOW_HOME": str(stack_dir / "airflow"), "AIRFLOW_DAGS_PAUSED": "True",
                "RELOAD_INTERVAL_S": "1", "OMP_NUM_THREADS": "1"})
    return env


@pytest.mark.s3
def test_start_ingest_serve_stop(stack_env, tiny_flickr):
    root, meta = tiny_flickr
    env = {**stack_env, "FLICKR8K_SOURCE": str(root)}
    stack_dir = Path(env["STACK_DIR"])
    logs, run_dir = stack_dir / "logs", stack_dir / "run"
    api = f"http://127.0.0.1:{env['API_PORT']}"
    sessions: dict[str, int] = {}
    seen: set[int] = set()  # every process of those sessions met while the stack ran
    t0 = time.monotonic()
    seconds = {}  # phase -> wall seconds, for test-artifacts/local_stack.json

    def lap(phase: str) -> None:
        seconds[phase] = round(time.monotonic() - t0 - sum(seconds.values()), 1)

    try:
        r = _script(env, "start", timeout=300)
        lap("start")
        assert r.returncode == 0, r.stdout + r.stderr + _tail(logs / "airflow.log")
        sessions = _session_ids(run_dir)
        assert set(sessions) == {"s3", "api", "airflow"}, sessions
        seen = set().union(*map(_in_session, sessions.values()))
        assert all(sid in seen for sid in sessions.values())
        assert json.loads(_get(f"{api}/health"))["vector_count"] == 0

        # the README's trigger command; the run waits in the queue while the DAG is paused
        _until(f"{DAG} parsed", lambda: _db(env, "SELECT 1 FROM dag WHERE dag_id=?", DAG), 120,
               lambda: _tail(logs / "airflow.log"))
        r = _airflow(env, "dags", "trigger", DAG)
        assert r.returncode == 0, r.stdout + r.stderr
        r = _airflow(env, "dags", "unpause", DAG)
        assert r.returncode == 0, r.stdout + r.stderr
        lap("trigger")

        def finished():
            rows = _db(env, "SELECT state FROM dag_run WHERE dag_id=?", DAG)
            return rows and rows[0][0] in ("success", "failed") and rows[0][0]

        def task_states():
            return "\n".join(map(str, _db(env, "SELECT task_id, map_index, state, try_number "
                                               "FROM task_instance ORDER BY start_date")))

        assert _until(f"{DAG} run", finished, 240, task_states) == "success", task_states()
        assert _db(env, "SELECT COUNT(*) FROM dag_run")[0][0] == 1  # the reindex DAG stayed paused
        lap("dag_run")

        # the API picks up the published version by itself and serves the photos
        health = _until("the API serving the new index",
                        lambda: (h := json.loads(_get(f"{api}/health")))["vector_count"] and h, 30)
        assert health["status"] == "ok" and health["vector_count"] == len(meta["names"]), health
        found = _post_json(f"{api}/search_images_by_text", {"query": "a red circle", "top_k": 3})
        assert found["index_version"] == health["index_version"] and found["total"] == len(meta["names"])
        hit = found["results"][0]
        assert hit["filename"] in meta["names"]
        assert _get(api + hit["url"]) == (root / "Images" / hit["filename"]).read_bytes()
        seen |= set().union(*map(_in_session, sessions.values()))
        lap("serve")
    finally:
        r = _script(env, "stop", timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    lap("stop")
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "local_stack.json").write_text(json.dumps(
        {"seconds": seconds, "processes_seen": len(seen), "stop_output": r.stdout + r.stderr},
        indent=2) + "\n")
    # nothing left: no process of the three sessions, none met before, no port listening
    stop_said = f"stop said:\n{r.stdout + r.stderr}"
    left = {n: pids for n, sid in sessions.items() if (pids := _in_session(sid))}
    assert not left, f"{left}\n{_described(set().union(*left.values()))}{stop_said}"
    left = [p for p in seen if _alive(p)]
    assert not left, f"{_described(left)}{stop_said}"
    assert not list(run_dir.glob("*.pid"))
    assert not [n for n in PORTS if _listening(int(env[n]))]
    r = _script(env, "status", timeout=60)
    assert r.stdout.split("\n")[:3] == ["s3: stopped", "api: stopped", "airflow: stopped"]


@pytest.mark.s3
def test_a_start_that_fails_names_the_cause_and_stops_what_it_started(stack_env, tmp_path):
    env = {**stack_env, "MODEL_PATH": str(tmp_path / "no-such-model.pt")}
    run_dir = Path(env["STACK_DIR"]) / "run"
    r = _script(env, "start", timeout=180)
    assert r.returncode != 0
    assert f"model checkpoint not found: {tmp_path / 'no-such-model.pt'}" in r.stderr, r.stderr
    assert "start failed: stopping the stack" in r.stderr
    assert not list(run_dir.glob("*.pid"))
    assert not [n for n in PORTS if _listening(int(env[n]))]


def test_the_stack_environment_comes_from_the_settings(tmp_path, monkeypatch):
    """`python -m deploy.local_stack_env`: the environment, then .env, then core.settings'
    defaults; the stack pins the S3 backend on loopback and its folders under STACK_DIR."""
    from deploy.local_stack_env import stack_env

    for name in OURS | {"AIRFLOW_ADMIN_USER"}:
        monkeypatch.delenv(name, raising=False)
    defaults = stack_env(tmp_path)  # no .env there
    settings = Settings(_env_file=None)
    assert defaults["MODEL_PATH"] == settings.model_path  # the shipped model
    assert defaults["FLICKR8K_SOURCE"] == settings.flickr8k_source
    assert (defaults["MINIO_ACCESS_KEY"], defaults["MINIO_BUCKET"]) == \
        (settings.minio_access_key, settings.minio_bucket)
    assert defaults["S3_PORT"] == "9000" and defaults["MINIO_ENDPOINT"] == "127.0.0.1:9000"
    assert defaults["STACK_DIR"] == str(tmp_path / "data" / "stack")
    assert defaults["INDEX_DIR"] == str(tmp_path / "data" / "stack" / "index")

    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "m.pt").write_bytes(b"x")
    (tmp_path / ".env").write_text("MINIO_BUCKET=from-dotenv\nMINIO_ENDPOINT=minio:9100\n"
                                   "MODEL_PATH=models/m.pt\nAIRFLOW_ADMIN_USER=alice\n"
                                   "API_PORT=8100\n")
    monkeypatch.setenv("MINIO_BUCKET", "from-env")
    monkeypatch.setenv("STACK_DIR", str(tmp_path / "elsewhere"))
    env = stack_env(tmp_path)
    assert env["MINIO_BUCKET"] == "from-env"  # the environment wins over .env
    assert env["MODEL_PATH"] == str(tmp_path / "models" / "m.pt")  # made absolute
    assert env["AIRFLOW_ADMIN_USER"] == "alice" and env["API_PORT"] == "8100"
    assert env["S3_PORT"] == "9100" and env["MINIO_ENDPOINT"] == "127.0.0.1:9100"
    assert env["STORE_BACKEND"] == "s3"
    assert env["FLICKR8K_WORK_DIR"] == str(tmp_path / "elsewhere" / "downloads")
