"""The Milvus publish SIGKILLed after the new collection is loaded (the alias not yet switched)
and after the alias switch, on a real Milvus server: readers (the index, the API's index
holder) see the old collection or the new one, whole; the publish task's retry completes; an
update's shard killed half-way through its row writes is retried to the same rows. After each:
`python -m indexer verify` passes and a search for a known photo finds it."""
from __future__ import annotations

import pytest

from tests.faults.conftest import IndexRun, photo_key


@pytest.fixture
def milvus_run(tmp_path, small_checkpoint, milvus_server, milvus_prefix):
    run = IndexRun(tmp_path, small_checkpoint, index_backend="milvus",
                   milvus_uri=milvus_server.uri, milvus_collection_prefix=milvus_prefix,
                   milvus_index_type="FLAT")
    yield run
    index = run.open_index()
    try:
        for name in index.versions():
            index.client.drop_collection(name)
    finally:
        index.close()


def _served(run) -> tuple[str, list[str]]:
    """The collection the alias serves and its keys; a fresh API index holder agrees."""
    from search_api.index_holder import IndexHolder

    index = run.open_index()
    try:
        model_id = run.encoder_model_id
        found = index.indexed(model_id)
        view = index.view(model_id)
        holder = IndexHolder(index, model_id, view.dim)
        holder.reload()
        assert holder.last_error is None and holder.require().version == found.version
        return found.version, sorted(found.etags)
    finally:
        index.close()


POINTS = {"milvus_loaded": "old", "after_alias": "new"}


@pytest.mark.parametrize("point", list(POINTS))
def test_a_milvus_publish_killed_serves_old_or_new_and_its_retry_completes(
        milvus_run, encoder, point):
    milvus_run.encoder_model_id = encoder.model_id
    milvus_run.put(range(8))
    milvus_run.run_all()
    old = _served(milvus_run)
    milvus_run.put(range(8, 12))
    plan = milvus_run.plan(force_rebuild=True)  # a new collection behind the alias
    reports = [milvus_run.shard(plan, i) for i in range(len(plan))]
    new = (plan[0]["draft"], sorted(photo_key(i) for i in range(12)))

    seen = []
    milvus_run.kill_publish(plan, reports, point,
                            while_stopped=lambda: seen.append(_served(milvus_run)))
    seen.append(_served(milvus_run))
    expected = old if POINTS[point] == "old" else new
    assert seen == [expected, expected]

    out = milvus_run.publish(plan, reports)  # the task's retry
    assert (out["version"], out["count"]) == (new[0], 12)
    assert _served(milvus_run) == new
    milvus_run.prune()
    assert milvus_run.verify_cli()["ok"]
    assert milvus_run.top_hit(encoder, photo_key(11)) == photo_key(11)


def test_an_update_shard_killed_mid_write_is_retried_to_the_same_rows(milvus_run, encoder):
    milvus_run.encoder_model_id = encoder.model_id
    milvus_run.put(range(8))
    milvus_run.run_all()
    milvus_run.put(range(8, 12))
    plan = milvus_run.plan()
    assert [s["mode"] for s in plan] == ["update"]
    milvus_run.kill_shard(plan, 0, "milvus_written")
    report = milvus_run.shard_process(plan, 0)
    out = milvus_run.publish(plan, [report])
    assert (out["action"], out["count"]) == ("updated", 12)
    assert _served(milvus_run)[1] == sorted(photo_key(i) for i in range(12))
    assert milvus_run.verify_cli()["ok"]
    assert milvus_run.top_hit(encoder, photo_key(9)) == photo_key(9)
