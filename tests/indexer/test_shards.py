"""Sharded embedding without Airflow: key ranges, shards that write parts, and a publish that
gives the version a single-process rebuild / update gives (FAISS); stale and repeated plans;
the same plan on a real Milvus server (new collection for a rebuild, in place for an update)."""
import json

import numpy as np
import pytest

from flickr8k.sources import open_source
from indexer import pipeline, shards
from indexer.faiss_index import DRAFT_PREFIX, FaissIndex
from indexer.ingest import ingest
from indexer.repository import IndexRepository
from objectstore import LocalStore
from tests.conftest import make_image
from tests.indexer.helpers import PREFIX


def _plan(store, repo, encoder, shard_size, max_shards, **kw):
    facts = lambda: (encoder.scoring.index_dim, encoder.scoring.tuning_queries())  # noqa: E731
    return shards.plan(store, FaissIndex(repo), PREFIX, encoder.model_id, shard_size, max_shards,
                       facts, **kw)


def _embed(store, encoder, repo, shard) -> dict:
    return shards.embed_shard(store, encoder, FaissIndex(repo), shard)


def _publish(repo, plan, reports) -> dict:
    return shards.publish_plan(FaissIndex(repo), plan[0], reports)


def _run_all(store, encoder, repo, plan) -> dict:
    return _publish(repo, plan, [_embed(store, encoder, repo, s) for s in plan])


def _draft_dir(repo, shard):
    return repo.versions_dir / (DRAFT_PREFIX + shard.draft)


def _update_drafts(repo) -> list[str]:
    """The unpublished update drafts on disk (their version names)."""
    return sorted(p.name[len(DRAFT_PREFIX):] for p in repo.versions_dir.glob(DRAFT_PREFIX + "*")
                  if json.loads((p / "draft.json").read_text())["base"])


def _same_version(a, b) -> None:
    """Same keys, etags and ids in the same order, vectors within 1e-5, same index type."""
    assert a.keys == b.keys and a.etags == b.etags and np.array_equal(a.ids, b.ids)
    np.testing.assert_allclose(a.stored_vectors(a.keys), b.stored_vectors(b.keys), atol=1e-5)
    assert a.manifest["index_params"] == b.manifest["index_params"]


def test_split_ranges_cover_every_key_once_and_are_bounded():
    keys = sorted(f"{PREFIX}{i:04d}.jpg" for i in range(103))
    for size, most in ((10, 64), (10, 4), (1000, 8), (1, 1024)):
        ranges = shards.split_ranges(keys, size, most)
        assert 1 <= len(ranges) <= most and len(ranges) == min(most, -(-103 // size))
        assert ranges[0][0] is None and ranges[-1][1] is None  # open ends: new keys land too
        assert all(ranges[i][1] == ranges[i + 1][0] for i in range(len(ranges) - 1))
        counts = [n for _, _, n in ranges]
        assert sum(counts) == 103 and max(counts) - min(counts) <= 1
        descriptors = [shards.Shard("p", "rebuild", "m", None, None, i, len(ranges), PREFIX,
                                    a, b, n)
                       for i, (a, b, n) in enumerate(ranges)]
        for k in keys + [PREFIX, PREFIX + "zzz", PREFIX + "0050.jpga"]:
            assert sum(d.covers(k) for d in descriptors) == 1, k
    assert shards.split_ranges([], 10, 8) == [(None, None, 0)]


def test_listing_prefix_narrows_to_the_range():
    assert shards._listing_prefix(PREFIX, f"{PREFIX}1203.jpg", f"{PREFIX}1250.jpg") == f"{PREFIX}12"
    assert shards._listing_prefix(PREFIX, None, f"{PREFIX}1250.jpg") == PREFIX


def test_sharded_rebuild_equals_single_process_rebuild(tiny_flickr, tmp_path, encoder):
    root, meta = tiny_flickr
    store = LocalStore(tmp_path / "store", "b")
    ingest(open_source(str(root)), store, progress=False)
    repo = IndexRepository(tmp_path / "index")
    plan = _plan(store, repo, encoder, shard_size=5, max_shards=4)
    assert len(plan) == 4 and {s.mode for s in plan} == {"rebuild"} and plan[0].draft
    assert sum(s.planned for s in plan) == len(meta["names"])
    # every descriptor records the plan's one listing: when it began, how many images it found
    assert {(s.listed_at, s.listed) for s in plan} == {(plan[0].listed_at, len(meta["names"]))}
    older = {k: v for k, v in plan[0].to_dict().items() if k not in ("listed_at", "listed")}
    assert shards.Shard.from_dict(older).listed_at is None  # planned before they were recorded
    reports = [_embed(store, encoder, repo, s) for s in plan]
    with pytest.raises(shards.StalePlan, match=r"shard\(s\) \[3\] of 4 did not report"):
        _publish(repo, plan, reports[:3])
    report = _publish(repo, plan, reports)
    assert report["action"] == "rebuilt" and report["count"] == len(meta["names"])
    assert (report["plan_listed_at"], report["plan_listed"]) == (plan[0].listed_at,
                                                                 len(meta["names"]))
    assert report["shards"] == 4 and len(report["embedded_by"]) == 4
    assert not list(repo.versions_dir.glob(".draft-*"))  # the parts went into the version

    single = IndexRepository(tmp_path / "single")
    pipeline.rebuild(store, encoder, FaissIndex(single), PREFIX, progress=False)
    _same_version(repo.load(), single.load())
    assert repo.load().manifest["plan"] == plan[0].plan

    # nothing changed: no plan, no version
    assert _plan(store, repo, encoder, 5, 4) == []
    # the finished plan again (a cleared Airflow run): no new version
    assert _embed(store, encoder, repo, plan[1])["action"] == "already published"
    again = _publish(repo, plan, reports)
    assert again["action"] == "unchanged" and again["already_published"]
    assert len(repo.list_versions()) == 1


def test_sharded_update_equals_single_process_update(tiny_flickr, tmp_path, encoder):
    root, meta = tiny_flickr
    store = LocalStore(tmp_path / "store", "b")
    ingest(open_source(str(root)), store, split="dev", progress=False)
    repo = IndexRepository(tmp_path / "index")
    pipeline.rebuild(store, encoder, FaissIndex(repo), PREFIX, progress=False)
    # two new images, one removed, one changed
    ingest(open_source(str(root)), store, split="train", limit=2, progress=False)
    store.delete(f"{PREFIX}{meta['dev'][0]}")
    store.put(f"{PREFIX}{meta['dev'][1]}", make_image("red", "circle", 77))
    single = IndexRepository(tmp_path / "single")
    v = repo.load()
    single.commit_version(v.index, v.ids, v.keys, v.etags, v.model_id)

    plan = _plan(store, repo, encoder, shard_size=1, max_shards=3)
    assert len(plan) == 3 and {s.mode for s in plan} == {"update"}
    assert sum(s.planned for s in plan) == 3
    report = _run_all(store, encoder, repo, plan)
    assert (report["action"], report["added"], report["removed"]) == ("updated", 3, 2)
    assert not _draft_dir(repo, plan[0]).exists() and _update_drafts(repo) == []
    pipeline.update(store, encoder, FaissIndex(single), PREFIX, progress=False)
    _same_version(repo.load(), single.load())

    # only a removal: one shard, which finds the key gone
    store.delete(f"{PREFIX}{meta['dev'][2]}")
    plan = _plan(store, repo, encoder, shard_size=1, max_shards=3)
    assert len(plan) == 1 and plan[0].planned == 0
    report = _run_all(store, encoder, repo, plan)
    assert (report["action"], report["added"], report["removed"]) == ("updated", 0, 1)


def test_keys_uploaded_after_planning_are_embedded_by_their_range(tiny_flickr, tmp_path, encoder):
    root, meta = tiny_flickr
    store = LocalStore(tmp_path / "store", "b")
    ingest(open_source(str(root)), store, split="dev", progress=False)
    repo = IndexRepository(tmp_path / "index")
    plan = _plan(store, repo, encoder, shard_size=2, max_shards=3)
    late = [f"{PREFIX}0000_first.jpg", f"{PREFIX}9999_last.jpg"]
    for key in late:
        store.put(key, make_image("blue", "square", 5))
    report = _run_all(store, encoder, repo, plan)
    assert report["count"] == len(meta["dev"]) + 2 and set(late) <= set(repo.load().keys)


def test_a_plan_overtaken_by_another_version_fails_at_once(tiny_flickr, tmp_path, encoder):
    root, _ = tiny_flickr
    store = LocalStore(tmp_path / "store", "b")
    ingest(open_source(str(root)), store, split="dev", progress=False)
    repo = IndexRepository(tmp_path / "index")
    rebuild = _plan(store, repo, encoder, shard_size=3, max_shards=2)
    pipeline.rebuild(store, encoder, FaissIndex(repo), PREFIX, progress=False)  # someone else publishes
    with pytest.raises(shards.StalePlan, match="is published now"):
        _embed(store, encoder, repo, rebuild[0])

    store.put(f"{PREFIX}new-1.jpg", make_image("red", "square", 3))
    store.put(f"{PREFIX}new-2.jpg", make_image("red", "circle", 4))
    update = _plan(store, repo, encoder, shard_size=1, max_shards=2)
    first = _embed(store, encoder, repo, update[0])
    pipeline.update(store, encoder, FaissIndex(repo), PREFIX, progress=False)  # someone else again
    with pytest.raises(shards.StalePlan, match="is published now"):
        _embed(store, encoder, repo, update[1])
    with pytest.raises(shards.StalePlan, match="is published now"):
        _publish(repo, update, [first, {**first, "shard": 1}])
    # the next plan removes the stale one's draft
    assert _update_drafts(repo) == [update[0].draft]
    store.put(f"{PREFIX}new-3.jpg", make_image("red", "square", 5))
    fresh = _plan(store, repo, encoder, 3, 2)
    assert _update_drafts(repo) == [fresh[0].draft]


def test_a_staged_update_needs_every_part_and_a_retried_shard_replaces_its_own(
        tiny_flickr, tmp_path, encoder):
    root, _ = tiny_flickr
    store = LocalStore(tmp_path / "store", "b")
    ingest(open_source(str(root)), store, split="dev", progress=False)
    repo = IndexRepository(tmp_path / "index")
    pipeline.rebuild(store, encoder, FaissIndex(repo), PREFIX, progress=False)
    for i in range(4):
        store.put(f"{PREFIX}new-{i}.jpg", make_image("green", "circle", 10 + i))
    plan = _plan(store, repo, encoder, shard_size=2, max_shards=2)
    first = _embed(store, encoder, repo, plan[0])
    (_draft_dir(repo, plan[0]) / "part-00001.npz").unlink(missing_ok=True)
    with pytest.raises(shards.StalePlan, match="part 00001 of 2 is missing"):
        _publish(repo, plan, [first, {**first, "shard": 1}])
    assert len(repo.list_versions()) == 1
    second = _embed(store, encoder, repo, plan[1])
    again = _embed(store, encoder, repo, plan[1])  # a retry after success
    assert second["embedded"] == again["embedded"] == 2
    staged = sorted(p.name for p in _draft_dir(repo, plan[0]).iterdir())
    assert [n for n in staged if n.startswith(("part-", "."))] == \
        ["part-00000.npz", "part-00001.npz"]  # no temp files left
    report = _publish(repo, plan, [first, again])
    assert (report["action"], report["added"], report["count"]) == \
        ("updated", 4, repo.load().count)


def test_shards_on_milvus_write_into_the_new_collection_and_update_in_place(
        tiny_flickr, tmp_path, encoder, milvus_server, milvus_prefix):
    """The same plan on the Milvus backend: a rebuild's shards upsert into the plan's
    unpublished collection and publish switches the alias; an update's shards upsert and delete
    in the published collection, with nothing staged on disk."""
    from indexer.milvus_index import MilvusIndex

    root, meta = tiny_flickr
    store = LocalStore(tmp_path / "store", "b")
    ingest(open_source(str(root)), store, split="dev", progress=False)
    index = MilvusIndex(milvus_server.uri, prefix=milvus_prefix, index_type="FLAT")
    facts = lambda: (encoder.scoring.index_dim, encoder.scoring.tuning_queries())  # noqa: E731
    try:
        plan = shards.plan(store, index, PREFIX, encoder.model_id, 2, 3, facts)
        assert len(plan) == 3 and plan[0].mode == "rebuild" and plan[0].draft
        assert index.published(encoder.model_id) is None  # unpublished until the end
        reports = [shards.embed_shard(store, encoder, index, s) for s in plan]
        report = shards.publish_plan(index, plan[0], reports)
        assert report["action"] == "rebuilt" and report["version"] == plan[0].draft
        one = FaissIndex(IndexRepository(tmp_path / "one"))
        pipeline.rebuild(store, encoder, one, PREFIX, progress=False)
        ref = one.view(encoder.model_id)
        assert sorted(index.indexed(encoder.model_id).etags.items()) == \
            sorted(zip(ref.keys, ref.etags))
        got = index.view(encoder.model_id).stored_vectors(ref.keys)
        np.testing.assert_allclose(got, ref.stored_vectors(ref.keys), atol=1e-5)
        assert shards.publish_plan(index, plan[0], reports)["already_published"]

        store.delete(f"{PREFIX}{meta['dev'][0]}")
        store.put(f"{PREFIX}new.jpg", make_image("red", "square", 9))
        plan = shards.plan(store, index, PREFIX, encoder.model_id, 1, 3, facts)
        assert [s.mode for s in plan] == ["update"] and plan[0].draft == plan[0].base
        reports = [shards.embed_shard(store, encoder, index, s) for s in plan]
        report = shards.publish_plan(index, plan[0], reports)
        assert (report["action"], report["added"], report["removed"]) == ("updated", 1, 1)
        assert report["version"] == plan[0].base  # in place
        keys = set(index.indexed(encoder.model_id).etags)
        assert f"{PREFIX}new.jpg" in keys and f"{PREFIX}{meta['dev'][0]}" not in keys
        assert shards.plan(store, index, PREFIX, encoder.model_id, 1, 3, facts) == []
        assert not list(tmp_path.glob(f"**/{DRAFT_PREFIX}*"))  # nothing staged on disk
    finally:
        index.close()
