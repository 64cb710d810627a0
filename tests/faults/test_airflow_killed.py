"""Airflow's own processes killed mid-run, under a real scheduler: `airflow scheduler` with the
LocalExecutor (tasks in processes of their own) and `airflow api-server` (the execution API the
task processes report to), the reindex DAG over a local store of generated photos.

While the run's shards wait inside `indexer.jobs.embed_shard` (the `embed_shard` pause point of
tests.faults.kill_points), one of them is SIGKILLed: the api-server (then started again on its
port), or the scheduler with everything it started (its session: the executor's workers and the task
processes, as when its machine or container dies; then a new scheduler starts).
Checked: the run still ends `success` (a killed task instance found without heartbeat and
retried), the published version holds exactly the bucket's photos once each (`python -m indexer
verify`), a photo is found by its own image, no draft is left, and a new run completes (nothing
to do: no new version). The evidence goes to test-artifacts/airflow_killed.json.
"""
from __future__ import annotations

import json
import os
import secrets
import signal
import sqlite3
import subprocess
import time
import urllib.request
from contextlib import closing
from pathlib import Path

import pytest

from deploy.ports import free_port
from tests.dags.helpers import AIRFLOW, ARTIFACTS, migrated_home
from tests.faults.conftest import IndexRun, photo_key

DAG = "flickr8k_reindex"
PHOTOS = 12  # 3 shards of 4
RUN_TIMEOUT_S = 300


class Deployment:
    """An Airflow home with a scheduler, a dag-processor and an api-server of its own, started
    and killed here."""

    def __init__(self, base: Path, env: dict, **settings: str):
        """`env`: the index's settings (store, model, index); `settings`: more variables for
        every Airflow process (REINDEX_SCHEDULE, ...)."""
        self.dir = base / "airflow"
        self.dir.mkdir()
        self.port = free_port()
        (self.dir / "home").mkdir()
        self.env = {**env, **migrated_home(self.dir / "home"),
                    "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
                    "AIRFLOW__CORE__PARALLELISM": "2",
                    "AIRFLOW__CORE__EXECUTION_API_SERVER_URL":
                        f"http://127.0.0.1:{self.port}/execution/",
                    "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(32),
                    # a task instance whose process died is found within seconds, not minutes,
                    # and so is a dead scheduler's work
                    "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "15",
                    "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "2",
                    "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_THRESHOLD": "10",
                    "AIRFLOW__SCHEDULER__ORPHANED_TASKS_CHECK_INTERVAL": "5",
                    **settings}
        self.home = self.env["AIRFLOW_HOME"]
        self.procs: dict[str, subprocess.Popen] = {}
        self.events: list[dict] = []
        self.cli("dags", "reserialize")

    def cli(self, *args) -> str:
        r = subprocess.run([str(AIRFLOW), *args], env=self.env, cwd=self.home,
                           capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, (args, r.stdout[-3000:], r.stderr[-3000:])
        return r.stdout

    def start(self, name: str) -> None:
        cmd = {"api-server": ["api-server", "--host", "127.0.0.1", "--port", str(self.port),
                              "--apps", "execution", "--workers", "1"],
               "scheduler": ["scheduler"], "dag-processor": ["dag-processor"]}[name]
        n = sum(e["event"] == f"start {name}" for e in self.events) + 1
        log = open(self.dir / f"{name}-{n}.log", "w")
        self.procs[name] = subprocess.Popen([str(AIRFLOW), *cmd], env=self.env, cwd=self.home,
                                            stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        log.close()
        self.events.append({"event": f"start {name}", "pid": self.procs[name].pid,
                            "t": time.time()})
        if name == "api-server":
            deadline = time.monotonic() + 120
            while True:
                try:
                    with urllib.request.urlopen(
                            f"http://127.0.0.1:{self.port}/execution/health", timeout=2):
                        self.events.append({"event": "api-server ready", "t": time.time()})
                        return
                except OSError:
                    assert self.procs[name].poll() is None, self.log(name)
                    assert time.monotonic() < deadline, "api-server did not start in 120 s"
                    time.sleep(0.5)

    def kill(self, name: str) -> list[int]:
        """SIGKILL `name` and every process of its session (what it started, whatever their
        process groups), as when its machine dies; the pids that were in it."""
        proc = self.procs.pop(name)
        session = _session(proc.pid)
        for pid in session:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
        deadline = time.monotonic() + 10
        while _session(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        self.events.append({"event": f"SIGKILL {name}", "session": session, "t": time.time()})
        return session

    def stop_all(self) -> None:
        """SIGTERM each process's group, then SIGKILL whatever of its session is left (task
        processes in groups of their own included): nothing outlives the test."""
        for name in list(self.procs):
            proc = self.procs.pop(name)
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
            for pid in _session(proc.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.wait()

    def log(self, name: str) -> str:
        logs = sorted(self.dir.glob(f"{name}-*.log"))
        return logs[-1].read_text()[-4000:] if logs else ""

    # --- the metadata DB ------------------------------------------------------------------------
    def runs(self) -> list[tuple[str, str]]:
        with closing(sqlite3.connect(Path(self.home) / "airflow.db")) as db:
            return db.execute("SELECT run_id, state FROM dag_run WHERE dag_id=? ORDER BY id",
                              (DAG,)).fetchall()

    def tasks(self, run_id: str) -> dict[str, dict]:
        with closing(sqlite3.connect(Path(self.home) / "airflow.db")) as db:
            return {(t if m < 0 else f"{t}[{m}]"): {"state": s, "try_number": n, "pid": pid}
                    for t, m, s, n, pid in db.execute(
                        "SELECT task_id, map_index, state, try_number, pid FROM task_instance "
                        "WHERE dag_id=? AND run_id=?", (DAG, run_id))}

    def xcom(self, run_id: str, task_id: str):
        with closing(sqlite3.connect(Path(self.home) / "airflow.db")) as db:
            row = db.execute("SELECT value FROM xcom WHERE dag_id=? AND run_id=? AND task_id=? "
                             "AND key='return_value'", (DAG, run_id, task_id)).fetchone()
        return None if row is None else json.loads(row[0])

    def wait_for_run(self, n: int) -> tuple[str, str]:
        """The n-th run of the DAG (1-based) once it has ended: (run_id, state)."""
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while True:
            runs = self.runs()
            if len(runs) >= n and runs[n - 1][1] in ("success", "failed"):
                return runs[n - 1]
            for name, proc in self.procs.items():
                assert proc.poll() is None, f"{name} ended:\n{self.log(name)}"
            assert time.monotonic() < deadline, \
                f"run {n} not ended in {RUN_TIMEOUT_S} s: {runs}\n{self.log('scheduler')}"
            time.sleep(1)

    @property
    def release(self) -> Path:
        return Path(self.env["FAULT_RELEASE"])

    def wait_for_paused_shard(self) -> int:
        """The pid of a task process waiting inside embed_shard (FAULT_POINT=embed_shard)."""
        marker = Path(self.env["FAULT_MARKER"])
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not marker.exists():
            for name, proc in self.procs.items():
                assert proc.poll() is None, f"{name} ended:\n{self.log(name)}"
            assert time.monotonic() < deadline, \
                f"no shard started in {RUN_TIMEOUT_S} s: {self.runs()}\n{self.log('scheduler')}"
            time.sleep(0.2)
        time.sleep(0.5)  # the other slot's shard too, when it starts at the same time
        return int(marker.read_text())


def _session(sid: int) -> list[int]:
    """The live (not zombie) processes of session `sid`."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return sorted(out)


def _alive(pid: int) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z"


@pytest.fixture
def deployment(tmp_path, small_checkpoint):
    run = IndexRun(tmp_path / "index-run", small_checkpoint)
    run.put(range(PHOTOS))
    dep = Deployment(tmp_path, run.env, REINDEX_SCHEDULE="@once", FLICKR8K_TASK_RETRIES="2",
                     FAULT_POINT="embed_shard", FAULT_MARKER=str(tmp_path / "shard-paused"),
                     FAULT_RELEASE=str(tmp_path / "shard-release"))
    dep.run = run
    try:
        yield dep
    finally:
        dep.release.touch()
        dep.stop_all()


@pytest.mark.parametrize("killed", ["scheduler", "api-server"])
def test_airflow_killed_mid_run_the_run_completes_and_the_index_equals_the_bucket(
        deployment, encoder, killed):
    dep, run = deployment, deployment.run
    dep.start("api-server")
    dep.start("dag-processor")
    dep.start("scheduler")
    dep.cli("dags", "unpause", DAG)  # @once: the scheduler starts the run now
    paused_pid = dep.wait_for_paused_shard()
    [(run_id, state)] = dep.runs()
    assert state == "running"

    killed_pids = dep.kill(killed)
    if killed == "scheduler":  # its machine gone: the task processes with it
        assert paused_pid in killed_pids and not _alive(paused_pid), (paused_pid, killed_pids)
    else:
        time.sleep(2)  # the tasks' heartbeats meet a closed port for a while
    dep.release.touch()  # from now on the shards go through
    dep.start(killed)

    run_id, state = dep.wait_for_run(1)
    tasks = dep.tasks(run_id)
    assert state == "success", (tasks, dep.log("scheduler"))
    assert all(t["state"] in ("success", "skipped") for t in tasks.values()), tasks
    shards = {k: t for k, t in tasks.items() if k.startswith("embed_shard[")}
    assert len(shards) == PHOTOS // 4
    if killed == "scheduler":  # the killed shards ran again
        assert any(t["try_number"] > 1 for t in shards.values()), shards
    published = dep.xcom(run_id, "publish_index")
    assert published["count"] == PHOTOS, published

    report = run.verify_cli()  # one vector per photo, current etags and model, nothing else
    assert report["ok"] and report["rows"] == PHOTOS, report
    assert run.top_hit(encoder, photo_key(5)) == photo_key(5)
    assert run.leftovers() == []

    # a new run after it: nothing changed, nothing published
    versions = sorted(p.name for p in (run.index_dir / "versions").iterdir())
    dep.cli("dags", "trigger", DAG)
    run2_id, state2 = dep.wait_for_run(2)
    tasks2 = dep.tasks(run2_id)
    assert state2 == "success", tasks2
    assert tasks2["publish_index"]["state"] == "skipped", tasks2
    assert sorted(p.name for p in (run.index_dir / "versions").iterdir()) == versions
    assert run.verify_cli()["ok"]

    ARTIFACTS.mkdir(exist_ok=True)
    out = ARTIFACTS / "airflow_killed.json"
    evidence = json.loads(out.read_text()) if out.exists() else {}
    evidence[killed] = {"events": dep.events, "paused_task_pid": paused_pid,
                        "run": {"state": state, "tasks": tasks}, "verify": report,
                        "second_run": {"state": state2, "tasks": tasks2}}
    out.write_text(json.dumps(evidence, indent=2) + "\n")
