"""Running the DAGs for real (`airflow dags test`, with or without an executor) and reading what
a run left: task states and XComs from Airflow's metadata DB, the index directory."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
from contextlib import closing
from pathlib import Path

import pytest

from deploy.local_airflow import AIRFLOW, DAGS, ROOT, index_writers_pool, migrated_home, \
    require_airflow  # noqa: F401  (the DAG tests' shared names)
from tests.indexer.helpers import PREFIX  # noqa: F401  (the DAG tests' image prefix)

ARTIFACTS = ROOT / "test-artifacts"
RUN_TIMEOUT_S = 300
END_GRACE_S = 60  # how long `dags test` may take to exit once its run has finished

require_airflow()


def _task_name(task_id: str, map_index: int) -> str:
    """A mapped task instance is `task[i]`; its unexpanded (e.g. skipped) row stays `task`."""
    return task_id if map_index < 0 else f"{task_id}[{map_index}]"


def latest_run(home: str, dag_id: str) -> tuple[str, str, dict, dict]:
    with closing(sqlite3.connect(Path(home) / "airflow.db")) as db:
        run_id, state = db.execute("SELECT run_id, state FROM dag_run WHERE dag_id=? ORDER BY id DESC "
                                   "LIMIT 1", (dag_id,)).fetchone()
        tasks = {_task_name(t, m): {"state": s, "seconds": round(d, 2) if d is not None else None,
                                    "try_number": n, "pid": pid, "start": start, "end": end}
                 for t, m, s, d, n, pid, start, end in db.execute(
                     "SELECT task_id, map_index, state, duration, try_number, pid, start_date, "
                     "end_date FROM task_instance WHERE dag_id=? AND run_id=?", (dag_id, run_id))}
        xcoms = {}
        for t, m, v in db.execute("SELECT task_id, map_index, value FROM xcom WHERE dag_id=? AND "
                                  "run_id=? AND key='return_value'", (dag_id, run_id)):
            try:
                xcoms[_task_name(t, m)] = json.loads(v)
            except (TypeError, ValueError):
                xcoms[_task_name(t, m)] = v if isinstance(v, str) else repr(v)
    return run_id, state, tasks, xcoms


def run_dag(env: dict, dag_id: str, log_dir: Path, conf: dict | None = None,
            expect_ok: bool = True, use_executor: bool = False) -> dict:
    """`airflow dags test DAG_ID` (with `--use-executor`: the configured executor runs the
    tasks, each in its own process); the run's states, XComs and wall time."""
    cmd = [str(AIRFLOW), "dags", "test", dag_id] + (["--use-executor"] if use_executor else [])
    if conf:
        cmd += ["--conf", json.dumps(conf)]
    log_dir.mkdir(parents=True, exist_ok=True)
    n = len(list(log_dir.glob(f"{dag_id}-*.log"))) + 1
    log = log_dir / f"{dag_id}-{n}.log"
    t0 = time.perf_counter()
    end_hung = False
    with open(log, "w") as out:  # streamed, so that a hung run still leaves its log
        proc = subprocess.Popen(cmd, env=env, cwd=env["AIRFLOW_HOME"], stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            finished_at = None
            while proc.poll() is None:
                now = time.perf_counter()
                if now - t0 > RUN_TIMEOUT_S:
                    pytest.fail(f"`airflow dags test {dag_id}` ran over {RUN_TIMEOUT_S} s; "
                                f"log: {log}\n" + log.read_text()[-4000:])
                # LocalExecutor.end() can wait forever on a worker that never takes its
                # shutdown message (apache/airflow#45329): once the run is over, that wait
                # is Airflow's teardown, not the DAG's behaviour; the run's outcome is read
                # from the metadata DB below.
                if finished_at is None and use_executor and "DagRun Finished" in log.read_text():
                    finished_at = now
                if finished_at is not None and now - finished_at > END_GRACE_S:
                    end_hung = True
                    break
                time.sleep(0.5)
        finally:
            try:  # the process and any worker it left behind
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
    wall = time.perf_counter() - t0
    r = subprocess.CompletedProcess(cmd, proc.returncode, log.read_text(), "")
    run_id, state, tasks, xcoms = latest_run(env["AIRFLOW_HOME"], dag_id)
    tail = (r.stdout + r.stderr)[-4000:]
    if expect_ok:
        assert r.returncode == 0 or end_hung, \
            f"`airflow dags test {dag_id}` failed (rc {r.returncode}):\n{tail}"
        assert state == "success", f"{dag_id} run {run_id} ended {state}:\n{tail}"
    else:
        assert (r.returncode != 0 or end_hung) and state == "failed", \
            f"{dag_id} should have failed:\n{tail}"
    return {"dag_id": dag_id, "run_id": run_id, "rc": r.returncode, "state": state,
            "executor_end_hung": end_hung,
            "wall_s": round(wall, 1), "tasks": tasks, "xcom": xcoms}


def index_state(index_dir: Path) -> dict:
    from indexer.repository import IndexRepository

    repo = IndexRepository(index_dir)
    out = {"current": repo.current_version(), "versions": repo.list_versions(), "count": 0,
           "keys": [], "stale_tmp": sorted(p.name for p in (index_dir / "versions").glob(".tmp-*"))
           if (index_dir / "versions").is_dir() else []}
    if out["current"]:
        v = repo.load()
        out.update(count=v.count, keys=sorted(v.keys), model_id=v.model_id)
    return out
