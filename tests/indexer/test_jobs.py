"""indexer.jobs (the DAG task bodies) without Airflow: retries, checks, idempotency, no partial
index versions. The session's small encoder is loaded once; Airflow itself runs in test_dags.py."""
from __future__ import annotations

import hashlib
import zipfile

import pytest

from indexer import jobs, pipeline
from indexer.repository import IndexRepository
from core.settings import Settings
from flickr8k.format import SourceError
from objectstore import LocalStore, StoreAuthError, StoreUnavailable
from tests.indexer.helpers import PREFIX


# --- retries / lock -------------------------------------------------------------------------
def test_with_retries_backs_off_then_succeeds_or_gives_up():
    calls, sleeps = [], []

    def flaky(n_fail):
        calls.append(1)
        if len(calls) <= n_fail:
            raise StoreUnavailable("S3 server not reachable")
        return "ok"

    assert jobs.with_retries(flaky, 2, attempts=4, base_delay=1.0, sleep=sleeps.append) == "ok"
    assert len(calls) == 3 and len(sleeps) == 2
    assert 0.75 <= sleeps[0] <= 1.25 and 1.5 <= sleeps[1] <= 2.5  # exponential, with jitter

    calls.clear(), sleeps.clear()
    with pytest.raises(StoreUnavailable):
        jobs.with_retries(flaky, 99, attempts=3, base_delay=10, max_delay=12, sleep=sleeps.append)
    assert len(calls) == 3 and len(sleeps) == 2 and max(sleeps) <= 12 * 1.25

    def refused():
        calls.append(1)
        raise StoreAuthError("credentials refused")

    calls.clear(), sleeps.clear()
    with pytest.raises(StoreAuthError):
        jobs.with_retries(refused, sleep=sleeps.append)
    assert len(calls) == 1 and sleeps == []  # not transient: no retry
    assert issubclass(StoreAuthError, jobs.PERMANENT_ERRORS)


def test_index_lock_excludes_a_second_writer(tmp_path):
    with jobs.index_lock(tmp_path):
        with pytest.raises(TimeoutError):
            with jobs.index_lock(tmp_path, timeout=0.1):
                pass
    with jobs.index_lock(tmp_path, timeout=0.1):  # released
        pass


# --- fetch / unpack / upload ----------------------------------------------------------------
def _zips(root, out):
    out.mkdir(parents=True, exist_ok=True)
    images, text = out / "Flickr8k_Dataset.zip", out / "Flickr8k_text.zip"
    with zipfile.ZipFile(images, "w") as z:
        for p in sorted((root / "Images").iterdir()):
            z.write(p, f"Flicker8k_Dataset/{p.name}")
    with zipfile.ZipFile(text, "w") as z:
        for p in sorted(root.glob("*.txt")):
            z.write(p, p.name)
    return images, text


def _settings(tmp_path, **kw) -> Settings:
    return Settings(_env_file=None, store_backend="local", local_store_dir=str(tmp_path / "store"),
                    index_dir=str(tmp_path / "index"), model_path=str(tmp_path / "model.pt"),
                    flickr8k_work_dir=str(tmp_path / "work"), minio_bucket="b", **kw)


def test_fetch_unpack_upload_are_checked_and_idempotent(tiny_flickr, tmp_path, monkeypatch):
    root, meta = tiny_flickr
    for k in ("FLICKR8K_TEXT_SOURCE", "FLICKR8K_IMAGES_SHA256", "FLICKR8K_TEXT_SHA256"):
        monkeypatch.delenv(k, raising=False)
    s = _settings(tmp_path)
    images, text = _zips(root, tmp_path / "zips")

    assert jobs.fetch_archives(str(root), settings=s) == {"kind": "folder", "folder": str(root)}
    with pytest.raises(SourceError, match="sha256"):
        jobs.fetch_archives(str(images), images_sha256="0" * 64, settings=s)
    sha = hashlib.sha256(images.read_bytes()).hexdigest()
    fetched = jobs.fetch_archives(str(images), images_sha256=sha, settings=s)
    assert fetched["images_sha256"] == sha and fetched["text_zip"] == str(text)

    first = jobs.unpack(fetched, settings=s)
    assert first["unpacked"] is True and first["images"] == len(meta["names"])
    again = jobs.unpack(fetched, settings=s)
    assert again["unpacked"] is False and again["folder"] == first["folder"]

    up1 = jobs.upload(first["folder"], settings=s)
    assert up1["uploaded"] == len(meta["names"]) and up1["texts_uploaded"] == 3
    up2 = jobs.upload(first["folder"], settings=s)
    assert up2["uploaded"] == 0 and up2["texts_uploaded"] == 0
    assert up2["images_in_store"] == len(meta["names"])


def test_unpack_rejects_a_corrupt_member_and_leaves_nothing(tiny_flickr, tmp_path):
    root, _ = tiny_flickr
    s = _settings(tmp_path)
    images, _ = _zips(root, tmp_path / "zips")
    raw = bytearray(images.read_bytes())
    first = next(iter(zipfile.ZipFile(images).infolist()))
    pos = first.header_offset + 30 + len(first.filename) + first.compress_size // 2
    raw[pos] ^= 0xFF  # flip one byte inside the first stored image: its CRC no longer matches
    images.write_bytes(bytes(raw))
    with pytest.raises(SourceError, match="CRC"):  # the zip directory is still readable
        jobs.fetch_archives(str(images), settings=s)
    assert images.exists()  # a local archive of the user's is reported, never deleted
    fetched = {"kind": "zip", "images_zip": str(images), "images_sha256": "a" * 64,
               "text_zip": str(tmp_path / "zips" / "Flickr8k_text.zip"), "text_sha256": "b" * 64}
    with pytest.raises(zipfile.BadZipFile):  # unpack checks every CRC on read too
        jobs.unpack(fetched, settings=s)
    assert [p.name for p in (tmp_path / "work" / "unpacked").iterdir()] == []


# --- publish: transactions ------------------------------------------------------------------
@pytest.fixture
def fake_model(monkeypatch, encoder):
    """The session's small real encoder, loaded once; `id` pretends a different checkpoint.
    (The plan's model preparation and the embedding tasks' serving bundle are checked on a real
    one in tests/indexer/test_torch_free.py.)"""
    import copy

    import encoder as encoder_pkg
    from encoder import serving

    current = {"id": encoder.model_id, "loads": 0}

    def load(settings):
        current["loads"] += 1
        enc = copy.copy(encoder)
        enc.model_id = current["id"]
        return enc

    monkeypatch.setattr(jobs, "_model_id", lambda path: current["id"])
    monkeypatch.setattr(serving, "image_encoder", load)
    monkeypatch.setattr(jobs, "_prepare_model", lambda s, model_id: (
        encoder.scoring.index_dim, encoder.scoring.tuning_queries()))
    monkeypatch.setattr(encoder_pkg, "read_scoring", lambda path: encoder.scoring)
    return current


def _run_plan(s: Settings, force_rebuild: bool = False) -> dict | None:
    """The DAGs' tail in one process: plan_shards -> embed_shard per shard -> publish_index
    (None: the plan was empty, nothing changed)."""
    plan = jobs.plan_shards(force_rebuild, settings=s)
    if not plan:
        return None
    return jobs.publish_index(plan, [jobs.embed_shard(sh, settings=s) for sh in plan],
                               settings=s)


def test_plan_embed_publish_is_a_transaction(tiny_flickr, tmp_path, fake_model, monkeypatch):
    root, meta = tiny_flickr
    s = _settings(tmp_path, embed_shard_size=5)
    store = LocalStore(s.local_store_dir, s.minio_bucket)
    jobs.upload(str(root), settings=s)
    repo = IndexRepository(s.index_dir)

    r1 = _run_plan(s)
    assert r1["action"] == "rebuilt" and r1["count"] == len(meta["names"]) and r1["shards"] > 1
    v1 = repo.current_version()

    # nothing changed: an empty plan, no model load, no new version
    loads = fake_model["loads"]
    assert _run_plan(s) is None
    assert fake_model["loads"] == loads and repo.list_versions() == [v1]

    # a new image, and embedding fails half-way: no new version, CURRENT kept
    store.put(f"{PREFIX}new.jpg", (root / "Images" / meta["names"][0]).read_bytes())
    real_embed = pipeline.embed_objects

    def broken(*a, **kw):
        raise RuntimeError("worker died while embedding")

    monkeypatch.setattr(pipeline, "embed_objects", broken)
    with pytest.raises(RuntimeError):
        _run_plan(s)
    assert repo.current_version() == v1 and repo.list_versions() == [v1]

    # a publish killed mid-write left a temp folder: the next run publishes, prune removes it
    (repo.versions_dir / ".tmp-killed").mkdir()
    (repo.versions_dir / ".tmp-killed" / "index.faiss").write_bytes(b"partial")
    monkeypatch.setattr(pipeline, "embed_objects", real_embed)
    r3 = _run_plan(s)
    assert r3["action"] == "updated" and r3["added"] == 1 and repo.current_version() != v1
    jobs.prune_versions(settings=s)
    assert list(repo.versions_dir.glob(".tmp-*")) == []

    # the model changed: the plan rebuilds everything
    fake_model["id"] = "another-model"
    r4 = _run_plan(s)
    assert r4["action"] == "rebuilt" and r4["count"] == len(meta["names"]) + 1
    assert repo.load().model_id == "another-model"

    pr = jobs.prune_versions(keep=2, settings=s)
    assert len(pr["removed"]) == 1 and pr["versions"] == 2 and pr["current"] == r4["version"]
    assert jobs.prune_versions(keep=2, settings=s)["removed"] == []


def test_one_source_setting_and_a_missing_source_fails_at_once(tiny_flickr, tmp_path, monkeypatch):
    """FLICKR8K_SOURCE is the default of every entry point (an empty value, as docker-compose
    passes, counts as unset); a source that does not exist is a permanent error naming the
    variable, with no download attempted."""
    import flickr8k.sources as sources
    from indexer import cli

    root, meta = tiny_flickr

    def no_download(*a, **kw):
        raise AssertionError("no download for a local source")

    monkeypatch.setattr(sources, "download", no_download)
    monkeypatch.setenv("FLICKR8K_SOURCE", "")
    assert Settings(_env_file=None).flickr8k_source == Settings.model_fields["flickr8k_source"].default
    missing = str(tmp_path / "nowhere")
    s = _settings(tmp_path, flickr8k_source=missing)
    with pytest.raises(jobs.PERMANENT_ERRORS, match="FLICKR8K_SOURCE") as err:
        jobs.fetch_archives(settings=s)
    assert isinstance(err.value, SourceError) and sources.PUBLIC_IMAGES_URL in str(err.value)
    assert not (tmp_path / "work").exists()

    # the CLI's ingest takes the same setting, and fails the same way
    monkeypatch.setattr(cli, "get_settings", lambda: s)
    assert cli.main(["--quiet", "ingest"]) == 1
    monkeypatch.setattr(cli, "get_settings",
                        lambda: _settings(tmp_path, flickr8k_source=str(root)))
    assert cli.main(["--quiet", "ingest", "--split", "dev"]) == 0
    assert jobs.fetch_archives(settings=_settings(tmp_path, flickr8k_source=str(root))) == \
        {"kind": "folder", "folder": str(root)}



# --- two index runs at once: a re-index and an ingestion -------------------------------------
def test_runs_never_plan_against_each_other_and_verify_index_checks_the_result(
        tiny_flickr, tmp_path, fake_model, monkeypatch):
    """The re-index DAG's scheduled run while an ingestion embeds, and the other way round,
    through the task bodies (the Airflow side, `other_index_runs`, is in tests/dags). Without
    the check the second run's plan goes stale when the first publishes; with it the re-index
    plans nothing while an ingestion is active, and an ingestion waits for an active re-index:
    no failed task, every upload indexed, nothing embedded twice."""
    import time

    from indexer.faiss_index import FaissIndex
    from indexer.shards import StalePlan
    from indexer.verify import CLOCK_SLACK_S, IndexMismatch

    root, meta = tiny_flickr
    s = _settings(tmp_path, embed_shard_size=5)
    store = LocalStore(s.local_store_dir, s.minio_bucket)
    jobs.upload(str(root), settings=s)
    image = (root / "Images" / meta["names"][0]).read_bytes()
    _run_plan(s)
    assert jobs.verify_index(settings=s)["ok"]

    def embed_and_publish(plan):
        return jobs.publish_index(plan, [jobs.embed_shard(sh, settings=s) for sh in plan],
                                  settings=s)

    # the fault: two plans on one version; the first to publish makes the other's stale
    store.put(f"{PREFIX}race-0.jpg", image)
    ingestion = jobs.plan_shards(settings=s)
    reindex = jobs.plan_shards(settings=s)
    embed_and_publish(reindex)
    with pytest.raises(StalePlan):
        jobs.embed_shard(ingestion[0], settings=s)

    # a re-index fires while an ingestion is active: it plans nothing
    store.put(f"{PREFIX}race-1.jpg", image)
    ingestion = jobs.plan_shards(settings=s, other_runs=lambda: 0, wait_for_others=True)
    assert jobs.plan_shards(settings=s, other_runs=lambda: 1) == []
    assert embed_and_publish(ingestion)["added"] == 1

    # an ingestion reaches its plan while a re-index embeds: it waits, then plans on top
    store.put(f"{PREFIX}race-2.jpg", image)
    reindex = jobs.plan_shards(settings=s, other_runs=lambda: 0)
    store.put(f"{PREFIX}race-3.jpg", image)  # the ingestion's upload
    active, polls = {"reindex": True}, []

    def reindex_finishes(seconds):  # while the ingestion waits, the re-index run completes
        polls.append(seconds)
        embedded = [jobs.embed_shard(sh, settings=s) for sh in reindex]  # takes race-3 too
        store.put(f"{PREFIX}race-4.jpg", image)  # uploaded after the re-index listed
        jobs.publish_index(reindex, embedded, settings=s)
        active["reindex"] = False

    ingestion = jobs.plan_shards(settings=s, other_runs=lambda: int(active["reindex"]),
                                 wait_for_others=True, poll_s=5, sleep=reindex_finishes)
    assert polls == [5] and sum(sh["planned"] for sh in ingestion) == 1  # race-4 only
    out = embed_and_publish(ingestion)  # no StalePlan
    assert out["action"] == "updated" and out["added"] == 1
    report = jobs.verify_index(out, settings=s)
    assert report["ok"] and report["objects"] == len(meta["names"]) + 5

    # an ingestion waits at most wait_s
    with pytest.raises(TimeoutError):
        jobs.plan_shards(settings=s, other_runs=lambda: 1, wait_for_others=True, poll_s=0,
                         wait_s=0, sleep=lambda _: None)

    # the invariant broken (an image deleted before the plan, its removal lost to a bug): the
    # task fails, permanently
    store.delete(f"{PREFIX}race-4.jpg")
    monkeypatch.setattr(FaissIndex, "remove", lambda self, version, keys, part="0": 0)
    # images written in the last CLOCK_SLACK_S before a plan may have come after its listing
    # (a store's clock, whole seconds): they would leave room for a deletion during the run
    time.sleep(CLOCK_SLACK_S)
    out = _run_plan(s)
    assert out["removed"] == 1  # as the shard reported it
    with pytest.raises(IndexMismatch, match=f"extra: 1 \\({PREFIX}race-4.jpg\\)"):
        jobs.verify_index(out, settings=s)
    assert IndexMismatch in jobs.PERMANENT_ERRORS


def test_verify_index_reports_what_changed_in_the_store_during_the_run(
        tiny_flickr, tmp_path, fake_model, monkeypatch, caplog, capsys):
    """A person uploads, changes and deletes photos while a run embeds: the run's verify_index
    passes and reports them as changed during the run (dated after its plan listed the store);
    the same changes dated before the plan are keys the run missed and fail it; the command
    line, without --since, reports them as missing, stale and extra; the next run indexes
    them."""
    import json
    import logging
    import os
    import time

    import encoder as encoder_pkg
    from indexer import cli
    from indexer.verify import CLOCK_SLACK_S, IndexMismatch

    root, meta = tiny_flickr
    s = _settings(tmp_path, embed_shard_size=5)
    store = LocalStore(s.local_store_dir, s.minio_bucket)
    jobs.upload(str(root), settings=s)
    names = [o.key for o in store.list(PREFIX)]
    image = (root / "Images" / meta["names"][0]).read_bytes()
    assert jobs.verify_index(_run_plan(s), settings=s)["changed_during_run"]["count"] == 0

    store.put(f"{PREFIX}before.jpg", image)  # the run's work, uploaded before its plan
    time.sleep(CLOCK_SLACK_S)  # (what came in the second before a plan may count as after it)
    t0 = time.time()
    plan = jobs.plan_shards(settings=s)
    assert t0 <= plan[0]["listed_at"] <= time.time() and plan[0]["listed"] == len(names) + 1
    embedded = [jobs.embed_shard(sh, settings=s) for sh in plan]
    # after the shards listed their ranges: an upload, a change and a deletion
    during = f"{PREFIX}during.jpg"
    store.put(during, image)
    old_etag = store.stat(names[0]).etag
    assert store.put(names[0], store.get(names[2])).etag != old_etag
    store.delete(names[1])
    out = jobs.publish_index(plan, embedded, settings=s)
    assert (out["plan_listed_at"], out["plan_listed"]) == (plan[0]["listed_at"], len(names) + 1)
    with caplog.at_level(logging.INFO, logger="indexer.jobs"):
        report = jobs.verify_index(out, settings=s)
    changed = report["changed_during_run"]
    assert report["ok"] and [changed[k]["first"] for k in ("uploaded", "changed", "deleted")] \
        == [[during], [names[0]], [names[1]]], report
    assert all(report[k]["count"] == 0 for k in ("missing", "stale", "extra", "duplicated"))
    assert "1 uploads arrived, 1 images changed, 1 images were deleted during this run" in \
        caplog.text and "the next run indexes them" in caplog.text

    # a person's check of the store now (no --since) still sees them; --since alone cannot
    # date a deletion
    monkeypatch.setattr(cli, "get_settings", lambda: s)
    monkeypatch.setattr(encoder_pkg, "read_card", lambda path: {"model_id": fake_model["id"]})
    capsys.readouterr()
    assert cli.main(["--quiet", "verify", "--json"]) == 1
    now = json.loads(capsys.readouterr().out)
    assert [now[k]["first"] for k in ("missing", "stale", "extra")] == [[during], [names[0]],
                                                                       [names[1]]]
    assert cli.main(["--quiet", "verify", "--json", "--since", str(out["plan_listed_at"])]) == 1
    since = json.loads(capsys.readouterr().out)
    assert [since["changed_during_run"][k]["count"] for k in ("uploaded", "changed")] == [1, 1]
    assert (since["missing"]["count"], since["stale"]["count"], since["extra"]["first"]) == \
        (0, 0, [names[1]])

    # the same upload and change made before the plan listed the store: missed by the run
    before = out["plan_listed_at"] - 60
    for key in (during, names[0]):
        os.utime(store.root / key, (before, before))
    with pytest.raises(IndexMismatch) as failed:
        jobs.verify_index(out, settings=s)
    for line in (f"missing: 1 ({during})", f"stale: 1 ({names[0]})", f"extra: 1 ({names[1]})"):
        assert line in str(failed.value)

    # the next run indexes them
    assert _run_plan(s)["action"] == "updated"
    assert cli.main(["--quiet", "verify"]) == 0
