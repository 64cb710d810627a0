"""Task bodies for the Airflow DAGs: each one an idempotent transaction with JSON-able results.

The DAG files in `dags/` stay thin and call these; these call the rest of `indexer`. Every step
can be rerun after success without changing anything, and a failed step leaves nothing half-made:

    fetch_archives   folder -> as is; zip path / URL -> resumable download, size/hash checked
    unpack           zips -> <work>/flickr8k-<hashes>/ (CRC-checked, temp dir + rename)
    upload           folder -> object store (content hash decides; nothing re-uploaded)
    plan_shards      what changed (new/changed/removed objects, another model) as key-range
                     shards; [] when nothing did (no model load, no version)
    embed_shard      one shard's range embedded and written (a rerun writes the same again)
    publish_index    once every shard succeeded: the plan's version published
    verify_index     the published version holds exactly the store's images (indexer.verify);
                     IndexMismatch fails the run when not; what changed in the store after
                     the plan listed it is logged, not failed (the next run indexes it)
    prune_versions   old versions beyond INDEX_KEEP_VERSIONS

Two runs never plan against each other (`plan_shards`' `other_runs`): a scheduled re-index
skips while any other index run is active (that run indexes what there is), and an ingestion
waits for an active re-index to finish before it plans (its upload is then indexed on top of
what that run published; the waiting task holds one of the executor's task slots). Otherwise
the second to publish would find its plan stale.

The fan-out's functions are named after the DAG tasks that run them. Object-store and vector-index errors
that look transient (server unreachable) are retried here with exponential back-off (tenacity);
Airflow's task retries (also with back-off) sit on top of that. Index writers on one machine
take `index_lock` (a file lock in INDEX_DIR); across machines the DAGs' publish pool serializes
them (deploy/SCALING.md).
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from pathlib import Path
from typing import Callable, TypeVar

import tenacity
from filelock import FileLock

from core.atomic import atomic_dir
from core.settings import Settings, get_settings
from flickr8k import sources
from flickr8k.format import SourceNotFound
from indexer.ingest import ingest
from indexer.listing import RefusalTable, list_images
from indexer.vector_index import IndexUnavailable, open_index
from indexer.shards import StalePlan
from indexer.verify import IndexMismatch
from objectstore import InvalidKey, StoreAuthError, StoreUnavailable, open_store

log = logging.getLogger(__name__)
T = TypeVar("T")

# Errors a retry cannot fix (bad credentials, a missing model file or source, a shard plan
# overtaken by a newer version, an index that does not match the store): fail at once.
PERMANENT_ERRORS: tuple[type[BaseException], ...] = (StoreAuthError, InvalidKey, FileNotFoundError,
                                                     SourceNotFound, StalePlan, IndexMismatch)
OTHER_RUNS_POLL_S = 30.0  # how often a waiting ingestion asks whether the re-index finished
OTHER_RUNS_WAIT_S = 7 * 3600.0  # longer than a re-index run may last (its dagrun_timeout)

UNPACK_MARKER = ".complete.json"
# what a task retries with back-off: the object store or the vector index (Milvus) not answering
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (StoreUnavailable, IndexUnavailable)


# --- retries ---------------------------------------------------------------------------------
def with_retries(fn: Callable[..., T], *args, attempts: int = 4, base_delay: float = 1.0,
                 max_delay: float = 30.0, retry_on: tuple[type[BaseException], ...] = (StoreUnavailable,),
                 sleep: Callable[[float], None] = time.sleep, **kwargs) -> T:
    """Call fn; on a transient store error wait base*2^n (+-25 % jitter, capped) and call again."""
    name = getattr(fn, "__name__", fn)

    def wait(state: tenacity.RetryCallState) -> float:
        # tenacity's own jitter is additive; this one is +-25 % of the delay
        delay = min(max_delay, base_delay * 2 ** (state.attempt_number - 1))
        return delay * random.uniform(0.75, 1.25)

    def before_sleep(state: tenacity.RetryCallState) -> None:
        log.warning("%s failed (%s); retry %d/%d in %.1f s", name, state.outcome.exception(),
                    state.attempt_number, attempts - 1, state.upcoming_sleep)

    retrying = tenacity.Retrying(stop=tenacity.stop_after_attempt(attempts), wait=wait,
                                 retry=tenacity.retry_if_exception_type(retry_on), sleep=sleep,
                                 before_sleep=before_sleep, reraise=True)
    return retrying(fn, *args, **kwargs)


def index_lock(index_dir: str | os.PathLike, timeout: float = 3600.0) -> FileLock:
    """One index writer at a time on this machine (ingestion and re-indexing DAGs may
    overlap); TimeoutError after `timeout` seconds."""
    root = Path(index_dir)
    root.mkdir(parents=True, exist_ok=True)
    return FileLock(root / ".lock", timeout=timeout)


def _settings(settings: Settings | None) -> Settings:
    return settings or get_settings()


# --- ingestion -----------------------------------------------------------------------------
def fetch_archives(source: str | None = None, text_source: str | None = None,
                   images_sha256: str | None = None, text_sha256: str | None = None,
                   images_size: int | None = None, text_size: int | None = None,
                   settings: Settings | None = None) -> dict:
    """The source made local and checked by `flickr8k.sources.resolve` (a folder as is; zips
    downloaded, resumably, into FLICKR8K_WORK_DIR and verified). Unset arguments take their
    setting: FLICKR8K_SOURCE, FLICKR8K_TEXT_SOURCE, FLICKR8K_IMAGES_SHA256, FLICKR8K_TEXT_SHA256."""
    s = _settings(settings)
    return sources.resolve(source or s.flickr8k_source, text_source or s.flickr8k_text_source,
                           cache_dir=s.flickr8k_work_dir,
                           images_sha256=images_sha256 or s.flickr8k_images_sha256,
                           text_sha256=text_sha256 or s.flickr8k_text_sha256,
                           images_size=images_size, text_size=text_size)


def unpack(fetched: dict, settings: Settings | None = None) -> dict:
    """Unpack checked zips into `<work>/unpacked/flickr8k-<hashes>/` in the folder layout
    (Images/*.jpg + *.txt). Every member's CRC is checked on read; the folder appears only when
    complete (temp dir + rename), so a rerun with the same archives finds it and does nothing."""
    if fetched["kind"] == "folder":
        return {"folder": fetched["folder"], "unpacked": False}
    root = Path(_settings(settings).flickr8k_work_dir) / "unpacked"
    root.mkdir(parents=True, exist_ok=True)
    name = f"flickr8k-{fetched['images_sha256'][:16]}-{fetched['text_sha256'][:16]}"
    dest = root / name
    for stale in root.glob(".tmp-*"):  # a killed earlier run
        shutil.rmtree(stale, ignore_errors=True)
    if (dest / UNPACK_MARKER).is_file():
        info = json.loads((dest / UNPACK_MARKER).read_text())
        return {"folder": str(dest), "unpacked": False, **info}
    src = sources.open_resolved(fetched)
    # replace=True: an existing `dest` is an incomplete folder without the marker
    with atomic_dir(dest, replace=True) as tmp:
        (tmp / "Images").mkdir()
        for img in src.image_names():
            (tmp / "Images" / img).write_bytes(src.read_image(img))  # zipfile checks the CRC
        for txt, reader in src.texts.items():
            (tmp / txt).write_bytes(reader())
        info = {"images": len(src.images), "texts": len(src.texts)}
        (tmp / UNPACK_MARKER).write_text(json.dumps(info))
    for old in root.glob("flickr8k-*"):  # unpacked copies of older archives
        if old != dest:
            shutil.rmtree(old, ignore_errors=True)
    return {"folder": str(dest), "unpacked": True, **info}


def upload(folder: str, split: str = "all", limit: int | None = None,
           settings: Settings | None = None) -> dict:
    """Images -> <prefix>images/, captions and splits -> <prefix>text/; only changed content."""
    s = _settings(settings)
    store = with_retries(open_store, s)
    src = sources.open_source(folder)
    t0 = time.perf_counter()
    report = with_retries(ingest, src, store, s.images_prefix, s.text_prefix, split=split,
                          limit=limit, progress=False)
    objects = with_retries(lambda: len(list_images(store, s.images_prefix)))
    return {**report.__dict__, "images_in_store": objects, "seconds": round(time.perf_counter() - t0, 2)}


# --- indexing ------------------------------------------------------------------------------
# The model is imported only by the tasks that need it: the embedding tasks run the serving
# bundle's image tower without torch (`encoder.serving.image_encoder`); reading a model card
# imports torch (seconds per task process).
def _model_id(model_path: str) -> str:
    from encoder import read_card

    return read_card(model_path)["model_id"]


def prune_versions(keep: int | None = None, settings: Settings | None = None) -> dict:
    """Delete index versions beyond the newest `keep` (default INDEX_KEEP_VERSIONS)."""
    s = _settings(settings)
    keep = keep if keep is not None else s.index_keep_versions
    with index_lock(s.index_dir):
        return with_retries(open_index(s).prune, keep, retry_on=TRANSIENT_ERRORS)


def find_duplicates(threshold: float | None = None, settings: Settings | None = None,
                    pixel_check: bool = True) -> dict:
    """After a publish: the groups of near duplicates in the published version of MODEL_PATH's
    model, candidates confirmed on the photos' pixels read from the object store (unless
    `pixel_check` is False), written beside the index for the API (`python -m indexer
    duplicates`). Returns the report's summary."""
    from encoder import read_scoring
    from indexer.duplicate_check import photo_reader
    from indexer.duplicates import DEFAULT_THRESHOLD, report_path, verdicts_path, write_report
    from indexer.duplicates import find_duplicates as find

    s = _settings(settings)
    read_photo = photo_reader(open_store(s), s.limits.max_image_pixels) if pixel_check else None
    report = with_retries(find, open_index(s), _model_id(s.model_path),
                          DEFAULT_THRESHOLD if threshold is None else threshold,
                          columns=read_scoring(s.model_path).dim, read_photo=read_photo,
                          verdicts_path=verdicts_path(s.index_dir), retry_on=TRANSIENT_ERRORS)
    write_report(report, report_path(s.index_dir))
    out = {"version": report.version, "groups": len(report.groups),
           "photos": report.duplicated_photos, "threshold": report.threshold,
           "seconds": report.seconds}
    if report.check is not None:
        out |= {"candidate_threshold": report.candidate_threshold,
                "checked": report.check.checked, "reused": report.check.reused,
                "confirmed": report.check.confirmed,
                "without_pixels": report.check.without_pixels,
                "unreadable": report.check.unreadable}
    return out


# --- fanned-out embedding: plan_shards -> embed_shard (mapped, one per shard) -> publish_index
# (indexer.shards; the DAGs map `embed_shard` over the plan with Airflow dynamic task mapping)
def plan_shards(force_rebuild: bool = False, settings: Settings | None = None,
                other_runs: Callable[[], int] | None = None, wait_for_others: bool = False,
                poll_s: float = OTHER_RUNS_POLL_S, wait_s: float = OTHER_RUNS_WAIT_S,
                sleep: Callable[[float], None] = time.sleep) -> list[dict]:
    """Shard descriptors for what changed ([] when nothing did: no model load, no version).
    EMBED_SHARD_SIZE keys per shard, at most EMBED_MAX_SHARDS shards.

    `other_runs()`: how many other index runs are active now (the DAGs ask Airflow). While
    any is: `wait_for_others` (an ingestion) waits for them, polling every `poll_s`, up to
    `wait_s` (then TimeoutError); otherwise (a scheduled re-index) the run plans nothing, [],
    and leaves the work to them."""
    from indexer import shards

    if other_runs is not None and other_runs():
        if not wait_for_others:
            log.info("another index run is active: it indexes what there is; nothing planned")
            return []
        deadline = time.monotonic() + wait_s
        while other_runs():
            if time.monotonic() > deadline:
                raise TimeoutError(f"another index run was still active after {wait_s:.0f} s")
            log.info("another index run is active: planning once it has finished")
            sleep(poll_s)
    s = _settings(settings)
    store = with_retries(open_store, s)
    model_id = _model_id(s.model_path)
    plan = with_retries(shards.plan, store, open_index(s), s.images_prefix, model_id,
                        s.embed_shard_size, s.embed_max_shards,
                        lambda: _prepare_model(s, model_id), force_rebuild=force_rebuild,
                        refusals=RefusalTable.in_dir(s.index_dir), retry_on=TRANSIENT_ERRORS)
    return [shard.to_dict() for shard in plan]


def _prepare_model(s: Settings, model_id: str) -> tuple[int, object]:
    """(index dimension, tuning queries) of MODEL_PATH's model, for the draft a plan begins.
    What the shards embed with is made ready here, once, rather than by every shard at the same
    time: the serving bundle (written in a child process where it is missing), or, with
    IMAGE_RUNTIME=torch or a GPU, the checkpoint's scoring read without building the towers."""
    from encoder.serving import uses_bundle

    if uses_bundle(s, ("image",)):
        from encoder.bundle import ensure_bundle

        scoring = ensure_bundle(s.model_path, s.onnx_cache_dir).scoring()
    else:
        from encoder import read_scoring

        scoring = read_scoring(s.model_path)
    return scoring.index_dim, scoring.tuning_queries()


def embed_shard(shard: dict, settings: Settings | None = None) -> dict:
    """Embed one shard's key range and write it (a rerun writes the same again). The serving
    bundle's image tower embeds, without torch (IMAGE_RUNTIME=torch or a GPU: eager PyTorch)."""
    from encoder.serving import image_encoder
    from indexer import shards

    s = _settings(settings)
    store = with_retries(open_store, s)
    encoder = image_encoder(s)
    return with_retries(shards.embed_shard, store, encoder, open_index(s),
                        shards.Shard.from_dict(shard), batch_size=s.embed_batch_size,
                        refusals=RefusalTable.in_dir(s.index_dir), retry_on=TRANSIENT_ERRORS)


def publish_index(plan: list[dict], embedded: list[dict],
                  settings: Settings | None = None) -> dict:
    """Once every shard of the plan succeeded: one new version (none when the plan was already
    published). Holds the index lock. `embedded`: every shard's report (which process embedded
    what, the unreadable images), summed up in this one."""
    from indexer import shards

    s = _settings(settings)
    with index_lock(s.index_dir):
        return with_retries(shards.publish_plan, open_index(s), shards.Shard.from_dict(plan[0]),
                            list(embedded), retry_on=TRANSIENT_ERRORS)


def verify_index(published: dict | None = None, settings: Settings | None = None) -> dict:
    """After a publish: the published version of MODEL_PATH's model holds exactly the store's
    images, with their current etags (`indexer.verify`); IndexMismatch (a permanent error: the
    run fails) when not, naming the first keys of each kind. `published`: publish_index's
    report, which carries when the run's plan listed the store and how many images it found:
    what changed in the store after that (uploads, changes, deletions made while the run ran)
    is logged and reported as `changed_during_run`, not failed (the next run indexes it).
    Without them (None) the store is checked as it is now."""
    from indexer.verify import verify_or_raise

    s = _settings(settings)
    published = published or {}
    since, listed = published.get("plan_listed_at"), published.get("plan_listed")
    store = with_retries(open_store, s)
    report = with_retries(verify_or_raise, store, open_index(s), s.images_prefix,
                          _model_id(s.model_path), since=since, listed=listed,
                          refused=RefusalTable.in_dir(s.index_dir).etags(),
                          retry_on=TRANSIENT_ERRORS)
    during = report["changed_during_run"]
    if during["count"]:
        what = ", ".join(f"{during[kind]['count']} {words}" for kind, words in
                         (("uploaded", "uploads arrived"), ("changed", "images changed"),
                          ("deleted", "images were deleted")) if during[kind]["count"])
        keys = [k for kind in ("uploaded", "changed", "deleted") for k in during[kind]["first"]]
        log.info("%s during this run, after its plan listed the store (%s%s); the next run "
                 "indexes them", what, ", ".join(keys[:10]), ", ..." if len(keys) > 10 or
                 during["count"] > len(keys) else "")
    return report
