"""The Airflow DAGs for real: the DagBag, then `airflow dags test` of both DAGs against a real S3
server (SeaweedFS), on a tiny Flickr8k-layout zip served over HTTP by the test, each run twice.

After every run the bucket and the index directory are checked; the second run of each DAG must
change nothing (same objects with the same last-modified times, same index version, same vector
count). A failed run must leave no index version behind. Per-task times and the before/after
counts go to test-artifacts/dag_runs.json.
"""
from __future__ import annotations

import hashlib
import http.server
import inspect
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import zip_flickr8k
from tests.dags.helpers import AIRFLOW, ARTIFACTS, DAGS, PREFIX, index_state, index_writers_pool, \
    run_dag

pytestmark = pytest.mark.s3


# --- a tiny Flickr8k distribution served over HTTP with Range support ------------------------
class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files like the real hosts do: `Range: bytes=N-` answers 206 with the rest."""

    def do_GET(self):  # noqa: N802
        path = Path(self.translate_path(self.path))
        rng = self.headers.get("Range")
        if not path.is_file():
            self.server.seen.append((self.path, rng, 404, 0))
            self.send_error(404)
            return
        data = path.read_bytes()
        start = int(rng[len("bytes="):].split("-")[0]) if rng and rng.startswith("bytes=") else 0
        if start >= len(data) and rng:
            self.server.seen.append((self.path, rng, 416, 0))
            self.send_error(416)
            return
        body = data[start:]
        self.send_response(206 if rng else 200)
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Type", "application/zip")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.server.seen.append((self.path, rng, 206 if rng else 200, len(body)))

    def log_message(self, *args):
        pass




@pytest.fixture(scope="module")
def served_flickr(tiny_flickr, tmp_path_factory):
    root, meta = tiny_flickr
    served = tmp_path_factory.mktemp("served")
    images, text = zip_flickr8k(root, served)
    handler = lambda *a, **kw: _RangeHandler(*a, directory=str(served), **kw)  # noqa: E731
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    srv.seen = []
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{srv.server_address[1]}"
    yield {"base": base, "images": images, "text": text, "meta": meta, "server": srv}
    srv.shutdown()


def test_dagbag_loads_both_dags_thin(airflow_env):
    """No import errors, the expected DAGs and tasks, and no heavy module imported at parse time."""
    code = r"""
import json, sys
sys.path.insert(0, sys.argv[1])  # as Airflow's own processes do: DAGS_FOLDER is on sys.path
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])
heavy = sorted(m for m in ("torch", "faiss", "numpy", "transformers", "minio", "indexer", "encoder")
               if m in sys.modules)
print(json.dumps({"errors": {k: str(v) for k, v in bag.import_errors.items()},
                  "dags": {d: {"tasks": sorted(t.task_id for t in dag.tasks),
                               "upstream": {t.task_id: sorted(t.upstream_task_ids) for t in dag.tasks},
                               "mapped": sorted(t.task_id for t in dag.tasks if any(
                                   c.__name__ == "MappedOperator" for c in type(t).__mro__)),
                               "schedule": str(getattr(dag, "schedule", None)),
                               "retries": {t.task_id: t.retries for t in dag.tasks},
                               "pools": {t.task_id: t.pool for t in dag.tasks},
                               "backoff": {t.task_id: t.retry_exponential_backoff for t in dag.tasks},
                               "max_active_runs": dag.max_active_runs, "catchup": dag.catchup}
                           for d, dag in bag.dags.items()},
                  "heavy": heavy}))
"""
    r = subprocess.run([sys.executable, "-c", code, str(DAGS)], env=airflow_env,
                       cwd=airflow_env["AIRFLOW_HOME"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["errors"] == {}
    assert set(out["dags"]) == {"flickr8k_data_ingestion", "flickr8k_reindex"}
    ing, rei = out["dags"]["flickr8k_data_ingestion"], out["dags"]["flickr8k_reindex"]
    fan_out = {"plan_shards": [], "embed_shard": ["plan_shards"],
               "publish_index": ["embed_shard", "plan_shards"],
               "verify_index": ["publish_index"], "prune_versions": ["verify_index"],
               "find_duplicates": ["verify_index"]}
    assert ing["upstream"] == {"fetch_archives": [], "verify_and_unpack": ["fetch_archives"],
                               "upload_to_store": ["verify_and_unpack"],
                               **fan_out, "plan_shards": ["upload_to_store"]}
    assert rei["upstream"] == fan_out
    assert ing["mapped"] == rei["mapped"] == ["embed_shard"]
    assert ing["schedule"] == "None" and rei["schedule"] not in ("None", "")
    for d in (ing, rei):
        assert set(d["retries"].values()) == {3} and set(d["backoff"].values()) == {2.0}
        assert d["max_active_runs"] == 1 and d["catchup"] is False
    assert out["heavy"] == [], f"DAG files import heavy modules at parse time: {out['heavy']}"

    # the index writers of both DAGs share one pool of one slot: one publish or prune at a time,
    # whichever worker runs it (INDEX_DIR's file lock only reaches one machine)
    pool, slots = index_writers_pool()
    for d in (ing, rei):
        assert {t: p for t, p in d["pools"].items() if p != "default_pool"} == \
            {"publish_index": pool, "prune_versions": pool}
    r = subprocess.run([str(AIRFLOW), "pools", "get", pool, "--output", "json"], env=airflow_env,
                       cwd=airflow_env["AIRFLOW_HOME"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [int(p["slots"]) for p in json.loads(r.stdout)] == [slots] == [1]


def test_permanent_errors_fail_the_task_at_once(monkeypatch):
    """`fail_fast` turns indexer.jobs.PERMANENT_ERRORS into AirflowFailException (no retries)
    and lets every other error through to Airflow's retries."""
    from airflow.sdk.exceptions import AirflowFailException

    from flickr8k.format import SourceError, SourceNotFound

    monkeypatch.syspath_prepend(str(DAGS))
    from flickr8k_common import fail_fast

    @fail_fast
    def task_body(error: Exception, params=None) -> dict:
        raise error

    with pytest.raises(AirflowFailException, match="SourceNotFound: set FLICKR8K_SOURCE"):
        task_body(SourceNotFound("set FLICKR8K_SOURCE"))
    with pytest.raises(SourceError):  # e.g. a download cut off: retried
        task_body(SourceError("connection reset"))
    # what Airflow's @task reads: the name, the context arguments, the return annotation
    assert task_body.__name__ == "task_body" and task_body.__annotations__["return"] == "dict"
    assert "params" in inspect.signature(task_body).parameters


def test_other_index_runs_counts_both_dags_but_not_the_own_run(monkeypatch):
    """What `plan_shards` asks Airflow (the runtime task instance's `get_dr_count`): running
    runs of either index DAG, the asking run itself not counted."""
    monkeypatch.syspath_prepend(str(DAGS))
    from flickr8k_common import INDEX_DAGS, other_index_runs

    class TI:
        def __init__(self, running):
            self.running, self.asked = running, []

        def get_dr_count(self, dag_id, states=None):
            self.asked.append((dag_id, tuple(states)))
            return self.running.get(dag_id, 0)

    class Run:
        dag_id = "flickr8k_reindex"

    def count(running):
        ti = TI(running)
        n = other_index_runs({"ti": ti, "dag_run": Run()})
        assert ti.asked == [(d, ("running",)) for d in INDEX_DAGS]
        return n

    assert count({"flickr8k_reindex": 1}) == 0  # this run alone
    assert count({"flickr8k_reindex": 1, "flickr8k_data_ingestion": 1}) == 1
    assert count({}) == 0  # the own run not (yet) counted as running: never negative


# --- bucket / index state -------------------------------------------------------------------
def _ingestion_running(env: dict, running: bool) -> None:
    """Trigger an ingestion run and mark it running (no scheduler here to start it), or mark
    that run failed again."""
    import sqlite3
    from contextlib import closing

    if running:
        r = subprocess.run([str(AIRFLOW), "dags", "trigger", "flickr8k_data_ingestion"], env=env,
                           cwd=env["AIRFLOW_HOME"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    with closing(sqlite3.connect(Path(env["AIRFLOW_HOME"]) / "airflow.db")) as db, db:
        db.execute("UPDATE dag_run SET state=? WHERE dag_id='flickr8k_data_ingestion' AND "
                   "run_type='manual' AND state=?",
                   ("running", "queued") if running else ("failed", "running"))

def _bucket(store) -> dict[str, tuple[str, str]]:
    return {o.object_name: (o.etag, o.last_modified.isoformat())
            for o in store.client.list_objects(store.bucket, recursive=True)}


def _images(bucket: dict) -> list[str]:
    return sorted(k for k in bucket if k.startswith(PREFIX))


def test_both_dags_for_real_twice(airflow_env, served_flickr, s3_server, small_checkpoint,
                                  tmp_path):
    from tests.conftest import make_image

    from objectstore import S3Store

    meta = served_flickr["meta"]
    n = len(meta["names"])
    bucket_name = f"dags-{os.getpid()}-{int(time.time())}"
    index_dir, work = tmp_path / "index", tmp_path / "work"
    images_zip, text_zip = served_flickr["images"], served_flickr["text"]
    env = {**airflow_env, "STORE_BACKEND": "s3", "MINIO_ENDPOINT": s3_server["endpoint"],
           "MINIO_ACCESS_KEY": s3_server["access_key"], "MINIO_SECRET_KEY": s3_server["secret_key"],
           "MINIO_BUCKET": bucket_name, "INDEX_DIR": str(index_dir), "FLICKR8K_WORK_DIR": str(work),
           "MODEL_PATH": str(small_checkpoint), "INDEX_KEEP_VERSIONS": "5",
           "FLICKR8K_SOURCE": f"{served_flickr['base']}/Flickr8k_Dataset.zip",
           "FLICKR8K_IMAGES_SHA256": hashlib.sha256(images_zip.read_bytes()).hexdigest(),
           "FLICKR8K_TEXT_SHA256": hashlib.sha256(text_zip.read_bytes()).hexdigest()}
    logs = ARTIFACTS / "dag_logs"
    shutil.rmtree(logs, ignore_errors=True)
    store = S3Store(s3_server["endpoint"], s3_server["access_key"], s3_server["secret_key"],
                    bucket_name)
    record: dict = {"slice": {"images": n, "images_zip_bytes": images_zip.stat().st_size}, "runs": []}

    def snap(label: str, run: dict | None = None) -> tuple[dict, dict]:
        b, i = _bucket(store), index_state(index_dir)
        entry = {"label": label, "objects": len(b), "images": len(_images(b)),
                 "index_version": i["current"], "versions": len(i["versions"]),
                 "vectors": i["count"]}
        if run:
            entry.update(run)
        record["runs"].append(entry)
        return b, i

    # 0. a broken model makes plan_shards fail (no retries here): the DAG run fails, the
    #    images are uploaded (idempotent anyway) but no index version, not even a partial one
    #    exists. A half-finished earlier download is lying in the work dir: it must be resumed.
    work.mkdir()
    full = images_zip.read_bytes()
    (work / "Flickr8k_Dataset.zip.part").write_bytes(full[: len(full) // 2])
    bad_model = tmp_path / "broken.pt"
    bad_model.write_bytes(b"not a checkpoint")
    failed = run_dag({**env, "MODEL_PATH": str(bad_model), "FLICKR8K_TASK_RETRIES": "0"},
                     "flickr8k_data_ingestion", logs, expect_ok=False)
    assert failed["tasks"]["plan_shards"]["state"] == "failed"
    assert failed["tasks"]["upload_to_store"]["state"] == "success"
    b0, i0 = snap("ingestion, failing model (expected failure)", failed)
    assert i0["current"] is None and i0["versions"] == [] and i0["stale_tmp"] == []
    assert len(_images(b0)) == n
    seen = served_flickr["server"].seen
    resumed = [s for s in seen if s[0] == "/Flickr8k_Dataset.zip"]
    assert resumed == [("/Flickr8k_Dataset.zip", f"bytes={len(full) // 2}-", 206,
                        len(full) - len(full) // 2)], seen
    assert (work / "Flickr8k_Dataset.zip").read_bytes() == full

    # 1. ingestion for real: embeds everything and publishes version 1
    run1 = run_dag(env, "flickr8k_data_ingestion", logs)
    b1, i1 = snap("ingestion run 1", run1)
    assert all(t["state"] == "success" for t in run1["tasks"].values()), run1["tasks"]
    assert _images(b1) == sorted(PREFIX + x for x in meta["names"])
    assert {"flickr8k/text/Flickr8k.token.txt", "flickr8k/text/Flickr_8k.devImages.txt",
            "flickr8k/text/Flickr_8k.trainImages.txt"} <= set(b1)
    assert b1 == b0  # nothing re-uploaded after the failed run either
    assert len(i1["versions"]) == 1 and i1["count"] == n and i1["keys"] == _images(b1)
    assert run1["xcom"]["publish_index"]["action"] == "rebuilt"
    verified = run1["xcom"]["verify_index"]  # the published version equals the bucket
    assert verified["ok"] and verified["objects"] == verified["rows"] == n
    assert [t for t in run1["tasks"] if t.startswith("embed_shard")] == ["embed_shard[0]"]
    assert run1["xcom"]["upload_to_store"]["uploaded"] == 0  # the failed run had uploaded them
    assert len(seen) == 2  # no second download: the archives were already complete and checked

    # 2. ingestion again: nothing changes anywhere
    run2 = run_dag(env, "flickr8k_data_ingestion", logs)
    b2, i2 = snap("ingestion run 2 (idempotency)", run2)
    assert b2 == b1, "the second ingestion run changed the bucket"
    assert i2 == i1, "the second ingestion run changed the index"
    assert run2["xcom"]["upload_to_store"]["uploaded"] == 0
    assert run2["xcom"]["upload_to_store"]["texts_uploaded"] == 0
    assert run2["xcom"]["verify_and_unpack"]["unpacked"] is False
    assert run2["tasks"]["plan_shards"]["state"] == "success"
    assert "plan_shards" not in run2["xcom"]  # no shards: the rest is skipped
    assert {run2["tasks"][t]["state"] for t in ("embed_shard", "publish_index", "verify_index",
                                                "prune_versions")} == {"skipped"}
    assert len(seen) == 2

    # 3. the bucket changes behind the index's back: one image removed, one added
    removed, added = _images(b2)[0], PREFIX + "9999_new_upload.jpg"
    store.delete(removed)
    store.put(added, make_image("red", "circle", 999), content_type="image/jpeg")

    # 3a. ... while an ingestion run is active (one triggered, marked running as the scheduler
    #     would): the re-index plans nothing and leaves the work to it, nothing fails
    _ingestion_running(env, True)
    skipped = run_dag(env, "flickr8k_reindex", logs)
    _ingestion_running(env, False)
    snap("reindex while an ingestion runs (skipped)", skipped)
    assert skipped["tasks"]["plan_shards"]["state"] == "success"
    assert {skipped["tasks"][t]["state"] for t in ("embed_shard", "publish_index",
                                                   "verify_index")} == {"skipped"}
    assert index_state(index_dir) == i2

    run3 = run_dag(env, "flickr8k_reindex", logs)
    b3, i3 = snap("reindex run 1 (1 added, 1 removed)", run3)
    assert run3["tasks"]["plan_shards"]["state"] == "success"
    assert run3["tasks"]["publish_index"]["state"] == "success"
    rep = run3["xcom"]["publish_index"]
    assert rep["action"] == "updated" and rep["added"] == 1 and rep["removed"] == 1
    assert i3["count"] == n and i3["keys"] == _images(b3)
    assert added in i3["keys"] and removed not in i3["keys"]
    assert len(i3["versions"]) == 2 and i3["current"] != i2["current"]
    assert run3["xcom"]["verify_index"]["ok"]

    # 4. reindex again: short-circuits, no new version
    run4 = run_dag(env, "flickr8k_reindex", logs)
    b4, i4 = snap("reindex run 2 (idempotency)", run4)
    assert run4["tasks"]["plan_shards"]["state"] == "success"
    assert run4["tasks"]["publish_index"]["state"] == "skipped"
    assert run4["tasks"]["prune_versions"]["state"] == "skipped"
    assert b4 == b3 and i4 == i3

    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "dag_runs.json").write_text(json.dumps(record, indent=2) + "\n")
    print("\n" + json.dumps(record, indent=1))
