"""The Milvus server itself SIGKILLed (not our process): while `python -m indexer rebuild` writes
its new collection and as its publish loads it; while `python -m indexer update` writes in
place. The command fails in one line naming Milvus; after Milvus is started again on the same
data the alias still serves the old, complete collection (a rebuild) or the published one
with a part of the update (an update); the rerun completes (an update's to the same rows, none
twice), the partial collection goes with the next prune, `python -m indexer verify` passes and
a search finds a photo the run added.

Each test runs a Milvus of its own (its data in the test's folder): the session's server, which
other tests share, is never killed."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.faults.conftest import IndexRun, photo_key
from tests.faults.kill_points import pause_at

PREFIX = "killed"


@pytest.fixture
def own_milvus(tmp_path):
    from deploy.local_milvus import LocalMilvus

    server = LocalMilvus(tmp_path / "milvus").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def run(tmp_path, small_checkpoint, own_milvus) -> IndexRun:
    # a short call timeout: calls to a dead server fail after it (the command's retries wait
    # out a few of them before it gives up)
    return IndexRun(tmp_path / "run", small_checkpoint, index_backend="milvus",
                    milvus_uri=own_milvus.uri, milvus_collection_prefix=PREFIX,
                    milvus_index_type="FLAT", milvus_timeout_s=3)


def _kill(server) -> None:
    """SIGKILL the Milvus process: no shutdown, no flush."""
    os.kill(server.pid, signal.SIGKILL)
    server.server.server_proc.wait(timeout=30)
    server.stop()  # closes its log files; the process is gone already


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "indexer", "--quiet", *args]


def _served(run: IndexRun, model_id: str) -> tuple[str, list[str], int]:
    """(the collection the alias points at, its keys, its row count as Milvus counts them: a
    key held twice would count twice)."""
    index = run.open_index()
    try:
        found = index.indexed(model_id)
        return found.version, sorted(found.etags), index._count(found.version)
    finally:
        index.close()


def _back(run: IndexRun, model_id: str, deadline_s: float = 180.0) -> tuple[str, list[str], int]:
    """`_served` once the restarted Milvus answers: after a SIGKILL it loads its collections
    again first, and calls time out meanwhile (as the API's 503s do); a deadline, not a sleep."""
    from indexer.vector_index import IndexUnavailable

    give_up = time.monotonic() + deadline_s
    while True:
        try:
            return _served(run, model_id)
        except IndexUnavailable:
            if time.monotonic() > give_up:
                raise
            time.sleep(1.0)


def _collections(run: IndexRun) -> list[str]:
    index = run.open_index()
    try:
        return index.versions()
    finally:
        index.close()


def _failed_clearly(rc: int, log: str) -> None:
    """Exit 1 and one error line naming Milvus, no traceback."""
    assert rc == 1, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    assert log.strip().splitlines()[-1].startswith("error: the vector index (Milvus) does not "
                                                   "answer"), log[-3000:]


def _completes(run: IndexRun, *args) -> dict:
    r = subprocess.run(_cli(*args), env=run.env, cwd=run.dir, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


@pytest.mark.parametrize("point", ["milvus_write", "milvus_publish_load"])
def test_milvus_killed_during_a_rebuild_keeps_the_old_collection_served(
        run, own_milvus, encoder, point):
    run.put(range(8))
    run.run_all()
    old = _served(run, encoder.model_id)
    run.put(range(8, 12))

    rc, log = pause_at(_cli("rebuild"), run.env, point, run.dir / "marker", run.dir,
                       lambda: _kill(own_milvus), timeout=240)
    _failed_clearly(rc, log)
    own_milvus.start()  # the same data folder

    assert _back(run, encoder.model_id) == old  # never the partial collection
    partial = set(_collections(run)) - {old[0]}
    assert len(partial) == 1  # the killed rebuild's, its draft could not be dropped

    out = _completes(run, "rebuild")
    twelve = sorted(photo_key(i) for i in range(12))
    assert (out["action"], out["count"]) == ("rebuilt", 12)
    assert _served(run, encoder.model_id) == (out["version"], twelve, 12)
    run.prune()  # the run's step after its publish: the partial collection can never publish
    assert partial.isdisjoint(_collections(run))
    assert run.verify_cli()["ok"]
    assert run.top_hit(encoder, photo_key(11)) == photo_key(11)


def test_milvus_killed_during_an_in_place_update_and_the_rerun_writes_the_same_rows(
        run, own_milvus, encoder):
    run.put(range(8))
    run.run_all()
    collection = _served(run, encoder.model_id)[0]
    run.put(range(8, 12))

    # the first two new rows written, the next write waits while Milvus is killed
    rc, log = pause_at(_cli("update"), run.env, "milvus_write", run.dir / "marker", run.dir,
                       lambda: _kill(own_milvus), timeout=240)
    _failed_clearly(rc, log)
    own_milvus.start()

    # the update applies in place: the same collection, the old rows, at most the writes
    # Milvus acknowledged before it died
    version, keys, count = _back(run, encoder.model_id)
    assert version == collection and count == len(keys)
    assert {photo_key(i) for i in range(8)} <= set(keys) < {photo_key(i) for i in range(12)}

    out = _completes(run, "update")
    twelve = sorted(photo_key(i) for i in range(12))
    assert (out["action"], out["version"], out["count"]) == ("updated", collection, 12)
    assert _served(run, encoder.model_id) == (collection, twelve, 12)  # no row twice
    assert _collections(run) == [collection]
    report = run.verify_cli()
    assert report["ok"] and report["rows"] == 12
    assert all(report[k]["count"] == 0 for k in ("missing", "extra", "duplicated", "stale"))
    assert run.top_hit(encoder, photo_key(11)) == photo_key(11)
