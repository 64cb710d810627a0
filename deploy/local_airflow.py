"""A local Airflow deployment of the DAGs, for the tests and the soak bench: an Airflow home with
a migrated SQLite DB and the index writers' pool, and its own `airflow scheduler` (LocalExecutor),
`dag-processor` and `api-server` (the execution API the task processes report to), started and
SIGKILLed here, and read back from its metadata DB.

docker-compose runs the real deployment (Postgres, the official image); this one needs only the
`airflow` extra installed in this interpreter's environment.
"""
from __future__ import annotations

import importlib.util
import json
import os
import secrets
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from contextlib import closing
from pathlib import Path

from deploy.ports import free_port

ROOT = Path(__file__).resolve().parents[1]
DAGS = ROOT / "dags"
AIRFLOW = Path(sys.executable).parent / "airflow"
REINDEX_DAG = "flickr8k_reindex"
RUN_TIMEOUT_S = 300

# variables of ours (and Airflow's) that must not leak from the developer's shell into the runs
_OURS = ("MODEL_PATH", "STORE_BACKEND", "LOCAL_STORE_DIR", "MINIO_", "INDEX_DIR", "FLICKR8K_",
         "AIRFLOW", "REINDEX_SCHEDULE", "INDEX_KEEP_VERSIONS", "EMBEDDING_DIM", "DEVICE", "EMBED_",
         "INDEX_BACKEND", "MILVUS_")


def require_airflow() -> None:
    if importlib.util.find_spec("airflow") is None or not AIRFLOW.exists():
        raise RuntimeError(
            "apache-airflow is missing: `make setup` (pip install -e '.[airflow,test]')")


def clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith(_OURS)}


def index_writers_pool() -> tuple[str, int]:
    """(name, slots) of the pool the DAGs' index writers run in (dags/flickr8k_common.py)."""
    spec = importlib.util.spec_from_file_location("flickr8k_common", DAGS / "flickr8k_common.py")
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    return common.INDEX_WRITERS_POOL, common.INDEX_WRITERS_POOL_SLOTS


def _airflow(env: dict, cwd, *args: str) -> str:
    r = subprocess.run([str(AIRFLOW), *args], env=env, cwd=cwd, capture_output=True, text=True,
                       timeout=180)
    if r.returncode != 0:
        raise RuntimeError(f"`airflow {' '.join(args)}` failed (rc {r.returncode}):\n"
                           + r.stdout[-3000:] + r.stderr[-3000:])
    return r.stdout


def migrated_home(home: Path) -> dict:
    """An Airflow home with a migrated SQLite DB and the index writers' pool, as a deployment's
    Airflow setup makes them; the environment to run Airflow in it."""
    require_airflow()
    env = {**clean_env(), "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
           "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           # a tiny slice on a shared 2-core machine: one math thread avoids oversubscription
           "OMP_NUM_THREADS": "1"}
    _airflow(env, home, "db", "migrate")
    pool, slots = index_writers_pool()
    if subprocess.run([str(AIRFLOW), "pools", "get", pool], env=env, cwd=home,
                      capture_output=True, timeout=120).returncode != 0:  # created if missing
        _airflow(env, home, "pools", "set", pool, str(slots),
                 "index writers: publish and prune, one at a time")
    return env


class LocalAirflow:
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

    def cli(self, *args: str) -> str:
        return _airflow(self.env, self.home, *args)

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
                    self.check_running()
                    if time.monotonic() > deadline:
                        raise RuntimeError("the api-server did not start in 120 s:\n"
                                           + self.log(name))
                    time.sleep(0.5)

    def check_running(self) -> None:
        """Raise if a process started here has ended (with the end of its log)."""
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} ended (rc {proc.returncode}):\n{self.log(name)}")

    def kill(self, name: str) -> list[int]:
        """SIGKILL `name` and every process of its session (what it started, whatever their
        process groups), as when its machine dies; the pids that were in it."""
        proc = self.procs.pop(name)
        session = session_pids(proc.pid)
        for pid in session:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
        deadline = time.monotonic() + 10
        while session_pids(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        self.events.append({"event": f"SIGKILL {name}", "session": session, "t": time.time()})
        return session

    def stop_all(self) -> None:
        """SIGTERM each process's group, then SIGKILL whatever of its session is left (task
        processes in groups of their own included): nothing outlives it."""
        for name in list(self.procs):
            proc = self.procs.pop(name)
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
            for pid in session_pids(proc.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.wait()

    def log(self, name: str) -> str:
        logs = sorted(self.dir.glob(f"{name}-*.log"))
        return logs[-1].read_text()[-4000:] if logs else ""

    # --- the metadata DB ------------------------------------------------------------------------
    def runs(self, dag: str = REINDEX_DAG) -> list[tuple[str, str]]:
        with closing(sqlite3.connect(Path(self.home) / "airflow.db")) as db:
            return db.execute("SELECT run_id, state FROM dag_run WHERE dag_id=? ORDER BY id",
                              (dag,)).fetchall()

    def tasks(self, run_id: str, dag: str = REINDEX_DAG) -> dict[str, dict]:
        with closing(sqlite3.connect(Path(self.home) / "airflow.db")) as db:
            return {(t if m < 0 else f"{t}[{m}]"): {"state": s, "try_number": n, "pid": pid}
                    for t, m, s, n, pid in db.execute(
                        "SELECT task_id, map_index, state, try_number, pid FROM task_instance "
                        "WHERE dag_id=? AND run_id=?", (dag, run_id))}

    def xcom(self, run_id: str, task_id: str, dag: str = REINDEX_DAG):
        with closing(sqlite3.connect(Path(self.home) / "airflow.db")) as db:
            row = db.execute("SELECT value FROM xcom WHERE dag_id=? AND run_id=? AND task_id=? "
                             "AND key='return_value'", (dag, run_id, task_id)).fetchone()
        return None if row is None else json.loads(row[0])

    def wait_for_run(self, n: int, dag: str = REINDEX_DAG) -> tuple[str, str]:
        """The n-th run of the DAG (1-based) once it has ended: (run_id, state)."""
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while True:
            runs = self.runs(dag)
            if len(runs) >= n and runs[n - 1][1] in ("success", "failed"):
                return runs[n - 1]
            self.check_running()
            if time.monotonic() > deadline:
                raise TimeoutError(f"run {n} not ended in {RUN_TIMEOUT_S} s: {runs}\n"
                                   + self.log("scheduler"))
            time.sleep(1)


def session_pids(sid: int) -> list[int]:
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


def alive(pid: int) -> bool:
    """Whether `pid` is a live process (not a zombie)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z"
