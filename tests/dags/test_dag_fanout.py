"""The fanned-out embedding for real: `airflow dags test --use-executor` with the LocalExecutor
(every task instance in its own process, shards side by side) and a running `airflow api-server`
(the execution API those processes report to), against a real S3 server.

The ingestion DAG over 24 images split into 4 shards, one of which fails its first try (a
`sitecustomize` on the task processes' path wraps `indexer.jobs.embed_shard`: the production
code has no failure switch). Checked: each shard ran in its own process (the pid a shard reports
in XCom is the pid Airflow recorded for its task instance, all different, two shards running at
the same time, one log per attempt), the failed shard alone was retried, the published index
equals what `python -m indexer rebuild` makes in one process (same keys, vectors within 1e-5),
and a second run publishes nothing. The evidence goes to test-artifacts/dag_fanout.json.
"""
from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from deploy.ports import free_port
from tests.dags.helpers import AIRFLOW, ARTIFACTS, PREFIX, index_state, run_dag

pytestmark = pytest.mark.s3

SHARDS, FAILING_SHARD = 4, 2

# Loaded by every Python process of the run (PYTHONPATH): shard FAIL_ONCE_SHARD raises on its
# first try, recording that try's pid in FAIL_ONCE_MARKER. A shard of 6 images takes well under
# a second, so on a loaded machine the executor may finish one before starting the next: each
# attempt signs in under SHARD_STARTED_DIR and waits (up to 120 s) until a second attempt has
# signed in. With two worker slots that returns at once; run one after another, the shards do not
# overlap and the test fails as it should.
_FAIL_ONCE = '''
import importlib.abc, importlib.util, os, sys, time


def _wait_for_a_second_shard(position):
    """Sign in (the wall time this attempt began) and wait up to 120 s until a second attempt
    has: the first two attempts then run at the same time whenever the executor runs two at
    once. Returns this attempt's file, whose `.end` twin the attempt writes when it ends."""
    started = os.environ["SHARD_STARTED_DIR"]
    path = os.path.join(started, f"{position}-{os.getpid()}")
    with open(path, "w") as f:
        f.write(repr(time.time()))
    deadline = time.monotonic() + 120
    while len([n for n in os.listdir(started) if not n.endswith(".end")]) < 2 \
            and time.monotonic() < deadline:
        time.sleep(0.1)
    return path


class _FailOnce(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "indexer.jobs":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            real = module.embed_shard

            def embed_shard(shard, *args, **kwargs):
                signed_in = _wait_for_a_second_shard(shard["position"])
                try:
                    marker = os.environ["FAIL_ONCE_MARKER"]
                    if shard["position"] == int(os.environ["FAIL_ONCE_SHARD"]) and not os.path.exists(marker):
                        with open(marker, "w") as f:
                            f.write(str(os.getpid()))
                        raise RuntimeError(f"injected: shard {shard['position']} fails its first try")
                    return real(shard, *args, **kwargs)
                finally:
                    with open(signed_in + ".end", "w") as f:
                        f.write(repr(time.time()))

            module.embed_shard = embed_shard

        spec.loader.exec_module = exec_module
        return spec


if os.environ.get("FAIL_ONCE_SHARD"):
    sys.meta_path.insert(0, _FailOnce())
'''


@pytest.fixture(scope="module")
def executor_env(airflow_env, tmp_path_factory):
    """LocalExecutor (2 worker slots, one per core here) and a running api-server on a free
    port (the execution API the task processes talk to, signed with a shared JWT secret)."""
    port = free_port()
    env = {**airflow_env, "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
           "AIRFLOW__CORE__PARALLELISM": "2",
           "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
           "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(32)}
    log = open(tmp_path_factory.mktemp("api_server") / "api-server.log", "w")
    proc = subprocess.Popen([str(AIRFLOW), "api-server", "--host", "127.0.0.1", "--port", str(port),
                             "--apps", "execution", "--workers", "1"], env=env,
                            cwd=env["AIRFLOW_HOME"], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/execution/health", timeout=2):
                    break
            except OSError:
                assert proc.poll() is None, Path(log.name).read_text()[-3000:]
                assert time.monotonic() < deadline, "api-server did not start in 120 s"
                time.sleep(0.5)
        yield env
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def _attempt_logs(home: str, run: dict) -> dict[int, dict[int, str]]:
    """{map_index: {attempt: log text}} of the run's embed_shard task instances."""
    task_dir = (Path(home) / "logs" / f"dag_id={run['dag_id']}" / f"run_id={run['run_id']}"
                / "task_id=embed_shard")
    out: dict[int, dict[int, str]] = {}
    for path in task_dir.glob("map_index=*/attempt=*.log"):
        out.setdefault(int(path.parent.name.split("=")[1]), {})[
            int(path.stem.split("=")[1])] = path.read_text()
    return out


def _attempt_times(started: Path) -> dict[str, tuple[float, float]]:
    """{"position-pid": (began, ended)} of every embed_shard attempt, as the attempts wrote them
    (the failed try included: Airflow's rows keep only a task's last try)."""
    return {p.name: (float(p.read_text()), float(p.with_name(p.name + ".end").read_text()))
            for p in started.iterdir() if not p.name.endswith(".end")}


def _overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return max(a[0], b[0]) < min(a[1], b[1])


def test_mapped_shards_in_separate_processes_retry_alone_and_match_one_process(
        executor_env, s3_server, small_checkpoint, tiny_flickr, tmp_path):
    root, meta = tiny_flickr
    assert len(meta["names"]) == 24
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(_FAIL_ONCE)
    marker = tmp_path / "failed-once.pid"
    started = tmp_path / "shards-started"
    started.mkdir()
    index_dir = tmp_path / "index"
    store_env = {"STORE_BACKEND": "s3", "MINIO_ENDPOINT": s3_server["endpoint"],
                 "MINIO_ACCESS_KEY": s3_server["access_key"],
                 "MINIO_SECRET_KEY": s3_server["secret_key"],
                 "MINIO_BUCKET": f"fanout-{os.getpid()}-{int(time.time())}",
                 "MODEL_PATH": str(small_checkpoint)}
    env = {**executor_env, **store_env, "INDEX_DIR": str(index_dir),
           "FLICKR8K_SOURCE": str(root), "FLICKR8K_WORK_DIR": str(tmp_path / "work"),
           "EMBED_SHARD_SIZE": str(24 // SHARDS), "EMBED_MAX_SHARDS": "8",
           "FLICKR8K_TASK_RETRIES": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(hooks), os.environ.get("PYTHONPATH")])),
           "FAIL_ONCE_SHARD": str(FAILING_SHARD), "FAIL_ONCE_MARKER": str(marker),
           "SHARD_STARTED_DIR": str(started)}
    logs = ARTIFACTS / "dag_logs_fanout"
    home = env["AIRFLOW_HOME"]

    # 1. ingestion: 4 shards in parallel processes, shard 2 fails once and is retried alone
    run1 = run_dag(env, "flickr8k_data_ingestion", logs, use_executor=True)
    tasks, xcom = run1["tasks"], run1["xcom"]
    shard_tis = {i: tasks[f"embed_shard[{i}]"] for i in range(SHARDS)}
    assert f"embed_shard[{SHARDS}]" not in tasks
    assert all(ti["state"] == "success" for ti in tasks.values()), tasks
    assert len(xcom["plan_shards"]) == SHARDS
    assert {i: ti["try_number"] for i, ti in shard_tis.items()} == \
        {i: 2 if i == FAILING_SHARD else 1 for i in range(SHARDS)}
    pids = {i: xcom[f"embed_shard[{i}]"]["pid"] for i in range(SHARDS)}
    assert pids == {i: ti["pid"] for i, ti in shard_tis.items()}  # what Airflow recorded
    others = {tasks[t]["pid"] for t in ("plan_shards", "publish_index", "upload_to_store")}
    failed_pid = int(marker.read_text())
    assert len(set(pids.values()) | others | {failed_pid}) == SHARDS + len(others) + 1
    # each shard takes well under a second now: two run at once only where one waits for the
    # other (the barrier); Airflow's rows keep only the last try, so the attempts' own times
    times = _attempt_times(started)
    assert len(times) == SHARDS + 1 and {int(k.split("-")[1]) for k in times} == \
        set(pids.values()) | {failed_pid}
    assert any(_overlap(a, b) for n, a in enumerate(times.values())
               for b in list(times.values())[n + 1:]), f"no two shards ran at the same time: {times}"
    attempts = _attempt_logs(home, run1)
    assert {i: sorted(a) for i, a in attempts.items()} == \
        {i: [1, 2] if i == FAILING_SHARD else [1] for i in range(SHARDS)}
    assert "injected: shard 2 fails its first try" in attempts[FAILING_SHARD][1]
    for i in range(SHARDS):
        assert f"(pid {pids[i]} on " in attempts[i][max(attempts[i])]
    assert sum(xcom[f"embed_shard[{i}]"]["embedded"] for i in range(SHARDS)) == 24

    published = xcom["publish_index"]
    assert (published["action"], published["count"], published["shards"]) == ("rebuilt", 24, SHARDS)
    assert sorted(e["pid"] for e in published["embedded_by"]) == sorted(pids.values())
    state1 = index_state(index_dir)
    assert len(state1["versions"]) == 1 and state1["keys"] == sorted(PREFIX + n for n in meta["names"])

    # 2. the same images embedded by one process: the same index
    single = tmp_path / "single"
    r = subprocess.run([sys.executable, "-m", "indexer", "--quiet", "rebuild"],
                       env={**env, "INDEX_DIR": str(single), "FAIL_ONCE_SHARD": ""},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    from indexer.repository import IndexRepository

    sharded, one = IndexRepository(index_dir).load(), IndexRepository(single).load()
    assert sharded.keys == one.keys and sharded.etags == one.etags
    assert np.array_equal(sharded.ids, one.ids)
    diff = np.abs(sharded.stored_vectors(one.keys) - one.stored_vectors(one.keys)).max()
    assert diff <= 1e-5, diff
    assert sharded.manifest["index_params"] == one.manifest["index_params"]

    # 3. again: nothing to embed, nothing published
    run2 = run_dag(env, "flickr8k_data_ingestion", logs, use_executor=True)
    assert run2["tasks"]["plan_shards"]["state"] == "success" and "plan_shards" not in run2["xcom"]
    assert {run2["tasks"][t]["state"] for t in ("embed_shard", "publish_index",
                                                "prune_versions")} == {"skipped"}
    assert index_state(index_dir) == state1

    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "dag_fanout.json").write_text(json.dumps({
        "shards": {i: {"pid": pids[i], "tries": shard_tis[i]["try_number"],
                       "start": shard_tis[i]["start"], "end": shard_tis[i]["end"],
                       "embedded": xcom[f"embed_shard[{i}]"]["embedded"]} for i in range(SHARDS)},
        "failed_first_try_pid": failed_pid, "plan_pid": tasks["plan_shards"]["pid"],
        "publish_pid": tasks["publish_index"]["pid"], "max_vector_diff_vs_one_process": float(diff),
        "run1_wall_s": run1["wall_s"], "run2_wall_s": run2["wall_s"]}, indent=2) + "\n")
