"""Index steps SIGKILLed at chosen points on the FAISS backend (each step a process of its own,
as an Airflow task instance is; `tests.faults.kill_points` stops it there, deterministically):
a reader only ever sees a whole published version, the old or the new one; a version is never
published with a shard missing; the step run again (the task's retry) or the next run completes,
and leaves no draft or temp folder behind. After each: `python -m indexer verify` passes and a
search for a known photo finds it."""
from __future__ import annotations

import numpy as np
import pytest

from indexer.repository import IndexRepository
from indexer.shards import StalePlan
from tests.faults.conftest import photo_key


def _served(index_run) -> tuple[str, list[str]]:
    """What a reader loads now: the API's index holder (a fresh one, as a replica starting now)
    and the repository itself agree on a version and its keys, loaded without an error."""
    from indexer.faiss_index import FaissIndex
    from search_api.index_holder import IndexHolder

    version = IndexRepository(index_run.index_dir).load()
    scores, keys = version.search(np.ones((1, version.dim), np.float32), 3)
    assert len(keys[0]) == min(3, version.count)
    holder = IndexHolder(FaissIndex(index_run.index_dir), version.model_id, version.dim)
    report = holder.reload()
    assert holder.last_error is None and holder.reload_counts["error"] == 0, report
    assert holder.require().version == version.version
    return version.version, sorted(version.keys)


def test_a_shard_killed_mid_part_is_retried_to_the_same_result_and_never_published_missing(
        index_run, encoder, tmp_path):
    index_run.put(range(12))
    plan = index_run.plan()
    assert len(plan) == 3
    reports = {i: index_run.shard(plan, i) for i in (0, 2)}
    draft = index_run.index_dir / "versions" / f".draft-{plan[1]['draft']}"

    index_run.kill_shard(plan, 1, "part_write")
    assert not (draft / "part-00001.npz").exists()
    assert [p.name for p in draft.glob(".part-00001.npz.*")], "the half-written part is a temp"

    # a publish now refuses: the shard did not report, and its part is not there
    with pytest.raises(StalePlan, match=r"shard\(s\) \[1\]"):
        index_run.publish(plan, list(reports.values()))
    with pytest.raises(StalePlan, match="part 00001 of 3 is missing"):
        index_run.publish(plan, [*reports.values(), {**reports[0], "shard": 1}])
    assert IndexRepository(index_run.index_dir).current_version() is None

    # the shard's retry, a process of its own, then the publish
    reports[1] = index_run.shard_process(plan, 1)
    assert reports[1]["embedded"] == 4
    out = index_run.publish(plan, [reports[i] for i in range(3)])
    assert (out["action"], out["count"]) == ("rebuilt", 12)
    index_run.prune()
    assert index_run.leftovers() == []

    # the same as a run that nothing interrupted
    from tests.faults.conftest import IndexRun

    clean = IndexRun(tmp_path / "clean", index_run.settings.model_path,
                     store_dir=index_run.settings.local_store_dir)
    clean.run_all()
    a, b = IndexRepository(index_run.index_dir).load(), IndexRepository(clean.index_dir).load()
    assert a.keys == b.keys and a.etags == b.etags and np.array_equal(a.ids, b.ids)
    np.testing.assert_allclose(a.stored_vectors(a.keys), b.stored_vectors(b.keys), atol=1e-5)

    assert index_run.verify_cli()["ok"]
    assert index_run.top_hit(encoder, photo_key(5)) == photo_key(5)


PUBLISH_POINTS = {  # where the publish is killed -> which version readers see after
    "merge": "old", "version_write": "old", "before_current": "old", "after_current": "new"}


@pytest.mark.parametrize("point", list(PUBLISH_POINTS))
def test_a_publish_killed_at_each_stage_serves_old_or_new_and_its_retry_completes(
        index_run, encoder, point):
    index_run.put(range(8))
    first = index_run.run_all()
    old = _served(index_run)
    assert old[0] == first["version"] and len(old[1]) == 8

    index_run.put(range(8, 16))  # an update: 8 new photos (2 shards), one deleted
    index_run.store.delete(photo_key(0))
    plan = index_run.plan()
    reports = [index_run.shard(plan, i) for i in range(len(plan))]
    new_version = plan[0]["draft"]
    assert len(plan) == 2
    new_keys = sorted(photo_key(i) for i in range(1, 16))

    seen = []
    index_run.kill_publish(plan, reports, point,
                           while_stopped=lambda: seen.append(_served(index_run)))
    seen.append(_served(index_run))
    expected = old if PUBLISH_POINTS[point] == "old" else (new_version, new_keys)
    assert seen == [expected, expected]

    out = index_run.publish(plan, reports)  # the publish task's retry
    assert out["version"] == new_version and out["count"] == 15
    assert out.get("already_published", False) == (point == "after_current")
    assert _served(index_run) == (new_version, new_keys)
    index_run.prune()
    assert index_run.leftovers() == []

    assert index_run.verify_cli()["ok"]
    assert index_run.top_hit(encoder, photo_key(10)) == photo_key(10)


def test_a_publish_killed_before_current_then_a_new_run_instead_of_the_retry(index_run, encoder):
    index_run.put(range(8))
    index_run.run_all()
    index_run.put(range(8, 10))
    plan = index_run.plan()
    reports = [index_run.shard(plan, i) for i in range(len(plan))]
    index_run.kill_publish(plan, reports, "before_current")

    index_run.put(range(10, 12))  # the next scheduled run plans again
    out = index_run.run_all()
    assert out["count"] == 12 and out["version"] != plan[0]["draft"]
    index_run.prune()
    assert index_run.leftovers() == []  # the killed run's draft can never publish: gone
    assert index_run.verify_cli()["ok"]
    assert index_run.top_hit(encoder, photo_key(11)) == photo_key(11)
