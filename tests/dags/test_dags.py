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
import importlib.util
import inspect
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import closing
from pathlib import Path

import pytest

from tests.conftest import zip_flickr8k

ROOT = Path(__file__).resolve().parents[2]
DAGS = ROOT / "dags"
AIRFLOW = Path(sys.executable).parent / "airflow"
ARTIFACTS = ROOT / "test-artifacts"
PREFIX = "flickr8k/images/"
RUN_TIMEOUT_S = 300

if importlib.util.find_spec("airflow") is None or not AIRFLOW.exists():
    raise RuntimeError("apache-airflow is missing: `make setup` (pip install -e '.[airflow,test]')")

pytestmark = pytest.mark.s3

# variables of ours (and Airflow's) that must not leak from the developer's shell into the runs
_OURS = ("MODEL_PATH", "STORE_BACKEND", "LOCAL_STORE_DIR", "MINIO_", "INDEX_DIR", "FLICKR8K_",
         "AIRFLOW", "REINDEX_SCHEDULE", "INDEX_KEEP_VERSIONS", "EMBEDDING_DIM", "DEVICE")


def _clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith(_OURS)}


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


# --- Airflow --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def airflow_env(tmp_path_factory) -> dict:
    home = tmp_path_factory.mktemp("airflow_home")
    env = {**_clean_env(), "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
           "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           # a tiny slice on a shared 2-core machine: one math thread avoids oversubscription
           "OMP_NUM_THREADS": "1"}
    r = subprocess.run([str(AIRFLOW), "db", "migrate"], env=env, cwd=home, capture_output=True,
                       text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return env


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
                               "schedule": str(getattr(dag, "schedule", None)),
                               "retries": {t.task_id: t.retries for t in dag.tasks},
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
    assert ing["tasks"] == sorted(["fetch_archives", "verify_and_unpack", "upload_to_store",
                                   "embed_and_publish", "prune_versions"])
    assert ing["upstream"] == {"fetch_archives": [], "verify_and_unpack": ["fetch_archives"],
                               "upload_to_store": ["verify_and_unpack"],
                               "embed_and_publish": ["upload_to_store"],
                               "prune_versions": ["embed_and_publish"]}
    assert rei["tasks"] == sorted(["find_changes", "update_index", "prune_versions"])
    assert rei["upstream"]["update_index"] == ["find_changes"]
    assert rei["upstream"]["prune_versions"] == ["update_index"]
    assert ing["schedule"] == "None" and rei["schedule"] not in ("None", "")
    for d in (ing, rei):
        assert set(d["retries"].values()) == {3} and set(d["backoff"].values()) == {2.0}
        assert d["max_active_runs"] == 1 and d["catchup"] is False
    assert out["heavy"] == [], f"DAG files import heavy modules at parse time: {out['heavy']}"


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


def _latest_run(home: str, dag_id: str) -> tuple[str, str, dict, dict]:
    with closing(sqlite3.connect(Path(home) / "airflow.db")) as db:
        run_id, state = db.execute("SELECT run_id, state FROM dag_run WHERE dag_id=? ORDER BY id DESC "
                                   "LIMIT 1", (dag_id,)).fetchone()
        tasks = {t: {"state": s, "seconds": round(d, 2) if d is not None else None}
                 for t, s, d in db.execute("SELECT task_id, state, duration FROM task_instance "
                                           "WHERE dag_id=? AND run_id=?", (dag_id, run_id))}
        xcoms = {}
        for t, v in db.execute("SELECT task_id, value FROM xcom WHERE dag_id=? AND run_id=? AND "
                               "key='return_value'", (dag_id, run_id)):
            try:
                xcoms[t] = json.loads(v)
            except (TypeError, ValueError):
                xcoms[t] = v if isinstance(v, str) else repr(v)
    return run_id, state, tasks, xcoms


def _run_dag(env: dict, dag_id: str, log_dir: Path, conf: dict | None = None,
             expect_ok: bool = True) -> dict:
    cmd = [str(AIRFLOW), "dags", "test", dag_id]
    if conf:
        cmd += ["--conf", json.dumps(conf)]
    log_dir.mkdir(parents=True, exist_ok=True)
    n = len(list(log_dir.glob(f"{dag_id}-*.log"))) + 1
    log = log_dir / f"{dag_id}-{n}.log"
    t0 = time.perf_counter()
    with open(log, "w") as out:  # streamed, so that a hung run still leaves its log
        try:
            proc = subprocess.run(cmd, env=env, cwd=env["AIRFLOW_HOME"], stdout=out,
                                  stderr=subprocess.STDOUT, text=True, timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"`airflow dags test {dag_id}` ran over {RUN_TIMEOUT_S} s; log: {log}\n"
                        + log.read_text()[-4000:])
    wall = time.perf_counter() - t0
    r = subprocess.CompletedProcess(cmd, proc.returncode, log.read_text(), "")
    run_id, state, tasks, xcoms = _latest_run(env["AIRFLOW_HOME"], dag_id)
    tail = (r.stdout + r.stderr)[-4000:]
    if expect_ok:
        assert r.returncode == 0, f"`airflow dags test {dag_id}` failed (rc {r.returncode}):\n{tail}"
        assert state == "success", f"{dag_id} run {run_id} ended {state}:\n{tail}"
    else:
        assert r.returncode != 0 and state == "failed", f"{dag_id} should have failed:\n{tail}"
    return {"dag_id": dag_id, "rc": r.returncode, "state": state, "wall_s": round(wall, 1),
            "tasks": tasks, "xcom": xcoms}


# --- bucket / index state -------------------------------------------------------------------
def _bucket(store) -> dict[str, tuple[str, str]]:
    return {o.object_name: (o.etag, o.last_modified.isoformat())
            for o in store.client.list_objects(store.bucket, recursive=True)}


def _index(index_dir: Path) -> dict:
    from indexer.repository import IndexRepository

    repo = IndexRepository(index_dir)
    out = {"current": repo.current_version(), "versions": repo.list_versions(), "count": 0,
           "keys": [], "stale_tmp": sorted(p.name for p in (index_dir / "versions").glob(".tmp-*"))
           if (index_dir / "versions").is_dir() else []}
    if out["current"]:
        v = repo.load()
        out.update(count=v.count, keys=sorted(v.keys), model_id=v.model_id)
    return out


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
        b, i = _bucket(store), _index(index_dir)
        entry = {"label": label, "objects": len(b), "images": len(_images(b)),
                 "index_version": i["current"], "versions": len(i["versions"]),
                 "vectors": i["count"]}
        if run:
            entry.update(run)
        record["runs"].append(entry)
        return b, i

    # 0. a broken model makes embed_and_publish fail (no retries here): the DAG run fails, the
    #    images are uploaded (idempotent anyway) but no index version, not even a partial one
    #    exists. A half-finished earlier download is lying in the work dir: it must be resumed.
    work.mkdir()
    full = images_zip.read_bytes()
    (work / "Flickr8k_Dataset.zip.part").write_bytes(full[: len(full) // 2])
    bad_model = tmp_path / "broken.pt"
    bad_model.write_bytes(b"not a checkpoint")
    failed = _run_dag({**env, "MODEL_PATH": str(bad_model), "FLICKR8K_TASK_RETRIES": "0"},
                      "flickr8k_data_ingestion", logs, expect_ok=False)
    assert failed["tasks"]["embed_and_publish"]["state"] == "failed"
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
    run1 = _run_dag(env, "flickr8k_data_ingestion", logs)
    b1, i1 = snap("ingestion run 1", run1)
    assert all(t["state"] == "success" for t in run1["tasks"].values()), run1["tasks"]
    assert _images(b1) == sorted(PREFIX + x for x in meta["names"])
    assert {"flickr8k/text/Flickr8k.token.txt", "flickr8k/text/Flickr_8k.devImages.txt",
            "flickr8k/text/Flickr_8k.trainImages.txt"} <= set(b1)
    assert b1 == b0  # nothing re-uploaded after the failed run either
    assert len(i1["versions"]) == 1 and i1["count"] == n and i1["keys"] == _images(b1)
    assert run1["xcom"]["embed_and_publish"]["action"] == "rebuilt"
    assert run1["xcom"]["upload_to_store"]["uploaded"] == 0  # the failed run had uploaded them
    assert len(seen) == 2  # no second download: the archives were already complete and checked

    # 2. ingestion again: nothing changes anywhere
    run2 = _run_dag(env, "flickr8k_data_ingestion", logs)
    b2, i2 = snap("ingestion run 2 (idempotency)", run2)
    assert b2 == b1, "the second ingestion run changed the bucket"
    assert i2 == i1, "the second ingestion run changed the index"
    assert run2["xcom"]["upload_to_store"]["uploaded"] == 0
    assert run2["xcom"]["upload_to_store"]["texts_uploaded"] == 0
    assert run2["xcom"]["verify_and_unpack"]["unpacked"] is False
    assert run2["xcom"]["embed_and_publish"]["action"] == "unchanged"
    assert len(seen) == 2

    # 3. the bucket changes behind the index's back: one image removed, one added
    removed, added = _images(b2)[0], PREFIX + "9999_new_upload.jpg"
    store.delete(removed)
    store.put(added, make_image("red", "circle", 999), content_type="image/jpeg")
    run3 = _run_dag(env, "flickr8k_reindex", logs)
    b3, i3 = snap("reindex run 1 (1 added, 1 removed)", run3)
    assert run3["tasks"]["find_changes"]["state"] == "success"
    assert run3["tasks"]["update_index"]["state"] == "success"
    rep = run3["xcom"]["update_index"]
    assert rep["action"] == "updated" and rep["added"] == 1 and rep["removed"] == 1
    assert i3["count"] == n and i3["keys"] == _images(b3)
    assert added in i3["keys"] and removed not in i3["keys"]
    assert len(i3["versions"]) == 2 and i3["current"] != i2["current"]

    # 4. reindex again: short-circuits, no new version
    run4 = _run_dag(env, "flickr8k_reindex", logs)
    b4, i4 = snap("reindex run 2 (idempotency)", run4)
    assert run4["tasks"]["find_changes"]["state"] == "success"
    assert run4["tasks"]["update_index"]["state"] == "skipped"
    assert run4["tasks"]["prune_versions"]["state"] == "skipped"
    assert b4 == b3 and i4 == i3

    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "dag_runs.json").write_text(json.dumps(record, indent=2) + "\n")
    print("\n" + json.dumps(record, indent=1))
