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
import time
from pathlib import Path

import pytest

from deploy.local_airflow import REINDEX_DAG as DAG, RUN_TIMEOUT_S, LocalAirflow, alive
from tests.dags.helpers import ARTIFACTS
from tests.faults.conftest import IndexRun, photo_key

PHOTOS = 12  # 3 shards of 4


class PausingDeployment(LocalAirflow):
    """A local Airflow whose shards wait inside embed_shard (FAULT_POINT) until released."""

    @property
    def release(self) -> Path:
        return Path(self.env["FAULT_RELEASE"])

    def wait_for_paused_shard(self) -> int:
        """The pid of a task process waiting inside embed_shard (FAULT_POINT=embed_shard)."""
        marker = Path(self.env["FAULT_MARKER"])
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not marker.exists():
            self.check_running()
            assert time.monotonic() < deadline, \
                f"no shard started in {RUN_TIMEOUT_S} s: {self.runs()}\n{self.log('scheduler')}"
            time.sleep(0.2)
        time.sleep(0.5)  # the other slot's shard too, when it starts at the same time
        return int(marker.read_text())


@pytest.fixture
def deployment(tmp_path, small_checkpoint):
    run = IndexRun(tmp_path / "index-run", small_checkpoint)
    run.put(range(PHOTOS))
    dep = PausingDeployment(tmp_path, run.env, REINDEX_SCHEDULE="@once", FLICKR8K_TASK_RETRIES="2",
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
        assert paused_pid in killed_pids and not alive(paused_pid), (paused_pid, killed_pids)
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
