"""Fanned-out embedding: a plan of key-range shards, one shard's embedding, and the publish that
turns every shard's work into one new index version (any `indexer.vector_index` backend).

    plan     list the images once; split the keys that need embedding into at most
             EMBED_MAX_SHARDS contiguous key ranges of about EMBED_SHARD_SIZE keys each
    shard    list its own range, embed what needs it, write it (see below)
    publish  once every shard succeeded: the version a single-process `pipeline.rebuild` or
             `pipeline.update` would have made (same keys, same ids, same index type)

A shard is a descriptor (plan id, mode, key range, listing prefix, the version being written),
never a key list: Airflow carries it in XCom and maps at most `core.max_map_length` (1024) of
them. The ranges cover the whole key space, so a key uploaded after planning is embedded by
whichever shard's range holds it, and each shard finds the indexed keys of its range that left
the store: no step but the plan's one listing needs every key.

Where a shard's vectors go:
    rebuild  into the new, unpublished version the plan began (`VectorIndex.begin`; FAISS: one
             part file per shard, replaced whole when a shard is retried; Milvus: upserts by
             object key into the new collection); publish = `VectorIndex.publish` (FAISS merges
             the parts; Milvus switches the alias)
    update   Milvus: upserts and deletes in the published collection directly (idempotent);
             FAISS, which cannot write into a published version, stages a part file per shard
             in INDEX_DIR/staging/<plan>/ and publish applies them all at once
             (`VectorIndex.update`: one new version)

A plan belongs to the version published when it was made: once another one is published its
shards and its publish fail at once (`StalePlan`, no retries) instead of overwriting newer work,
and the next run plans again. A plan that was published is recognised, so re-running a finished
run's tasks publishes nothing.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np

from indexer.repository import IndexLoadError
from indexer.vector_index import FaissIndex, VectorIndex
from objectstore import ObjectStore

log = logging.getLogger(__name__)

STAGING = "staging"  # FAISS updates: INDEX_DIR/staging/<plan>/{plan.json, part-00000.npz, ...}
PLAN_FILE = "plan.json"
MAX_FAILED_LISTED = 100  # bad images named in a shard's report (all are logged)


class StalePlan(RuntimeError):
    """The plan can no longer be carried out (another version was published since, the model
    changed, a part is missing): a retry cannot fix it; the next run plans again."""


@dataclass(frozen=True)
class Shard:
    plan: str
    mode: str  # "rebuild" (embed every key of the range) | "update" (only new/changed keys)
    model_id: str
    base: str | None  # the version published when planned (an update applies to it)
    draft: str | None  # rebuild: the unpublished version the shards write into
    index: int
    count: int  # shards in the plan
    prefix: str  # listing prefix: the longest one every key of the range starts with
    start: str | None  # first key of the range (None: open)
    stop: str | None  # first key of the next range, excluded (None: open)
    planned: int  # keys to embed in this range when planned

    def covers(self, key: str) -> bool:
        return (self.start is None or key >= self.start) and (self.stop is None or key < self.stop)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Shard":
        return cls(**d)


def split_ranges(todo: list[str], shard_size: int,
                 max_shards: int) -> list[tuple[str | None, str | None, int]]:
    """Sorted keys -> contiguous (start, stop, n_keys) ranges of about `shard_size` keys, at
    most `max_shards`, at least one; together they cover every possible key."""
    n = max(1, min(max_shards, -(-len(todo) // shard_size)))
    cuts = [len(todo) * i // n for i in range(n + 1)]
    bounds = [None] + [todo[c] for c in cuts[1:-1]] + [None]
    return [(bounds[i], bounds[i + 1], cuts[i + 1] - cuts[i]) for i in range(n)]


def _listing_prefix(prefix: str, start: str | None, stop: str | None) -> str:
    """Every key k with start <= k < stop starts with the common prefix of start and stop.
    (Listing from `start` with S3's StartAfter would narrow it further; the ObjectStore
    interface lists by prefix.)"""
    if start is None or stop is None:
        return prefix
    return os.path.commonprefix([start, stop])


def _published(index: VectorIndex, model_id: str) -> str | None:
    try:
        return index.status(model_id)["version"]
    except IndexLoadError:
        return None


def _staging(index: VectorIndex) -> Path | None:
    return index.repo.root / STAGING if isinstance(index, FaissIndex) else None


# --- plan --------------------------------------------------------------------------------------
def plan(store: ObjectStore, index: VectorIndex, prefix: str, model_id: str, shard_size: int,
         max_shards: int, prepare: Callable[[], tuple[int, np.ndarray | None]],
         force_rebuild: bool = False) -> list[Shard]:
    """The shards of the work an update (or a rebuild) needs now; [] when nothing changed.
    `prepare()` -> (index dimension, tuning queries) of the model, called for a rebuild only (it
    loads the model; an update's shards load it anyway). The mode is decided as
    `pipeline.update` decides it: a rebuild when forced, or when there is no usable version of
    this model."""
    from indexer.pipeline import list_images

    base = None
    if not force_rebuild:
        try:
            base = index.indexed(model_id)
        except IndexLoadError as exc:
            log.info("no usable current index (%s): planning a rebuild", exc)
        if base is not None and base.model_id != model_id:
            log.info("model changed (%s -> %s): planning a rebuild", base.model_id, model_id)
            base = None
    objects = list_images(store, prefix)
    if base is None:
        todo = sorted(objects)
    else:
        todo = sorted(k for k, o in objects.items() if base.etags.get(k) != o.etag)
        if not todo and all(k in objects for k in base.etags):
            return []
    on = base.version if base else _published(index, model_id)
    plan_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ") + "-" + uuid.uuid4().hex[:6]
    mode = "rebuild" if base is None else "update"
    draft = None
    if mode == "rebuild":
        dim, tuning = prepare()
        draft = index.begin(model_id, dim, {"source": store.describe(), "prefix": prefix,
                                            "plan": plan_id}, tuning)
    elif _staging(index) is not None:
        _stage_plan(_staging(index), plan_id, on, store.describe(), prefix)
    ranges = split_ranges(todo, shard_size, max_shards)
    shards = [Shard(plan_id, mode, model_id, on, draft, i, len(ranges),
                    _listing_prefix(prefix, start, stop), start, stop, n)
              for i, (start, stop, n) in enumerate(ranges)]
    log.info("plan %s: %s of %d keys (%d to embed) in %d shards%s", plan_id, mode, len(objects),
             len(todo), len(shards), f", into {draft}" if draft else "")
    return shards


def _stage_plan(root: Path, plan_id: str, base: str | None, source: str, prefix: str) -> None:
    """FAISS update: the folder the shards' parts go to, made whole (temp + rename). Plans made
    on another version than the current one can never publish: their parts go."""
    root.mkdir(parents=True, exist_ok=True)
    for d in root.iterdir():
        try:
            stale = json.loads((d / PLAN_FILE).read_text()).get("base") != base
        except (OSError, ValueError):
            stale = True
        if stale:
            shutil.rmtree(d, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
    (tmp / PLAN_FILE).write_text(json.dumps({"plan": plan_id, "base": base, "source": source,
                                             "prefix": prefix}) + "\n")
    os.rename(tmp, root / plan_id)


def _published_by(index: VectorIndex, shard: Shard) -> str | None:
    """The published version when this plan published it (a finished run's task re-run)."""
    current = _published(index, shard.model_id)
    if current is None or shard.mode == "update" and not isinstance(index, FaissIndex):
        return None  # Milvus updates write in place: running them again changes nothing
    if current == shard.draft:  # Milvus: the collection the shards wrote is aliased
        return current
    if isinstance(index, FaissIndex):  # FAISS: a new version name; its manifest names the plan
        manifest = index.repo.read_manifest() or {}
        return current if manifest.get("plan") == shard.plan else None
    return None


def _check_base(index: VectorIndex, shard: Shard) -> None:
    current = _published(index, shard.model_id)
    if current != shard.base:
        raise StalePlan(f"plan {shard.plan} was made on index version {shard.base}, but "
                        f"{current} is published now; the next run plans again")


# --- one shard ---------------------------------------------------------------------------------
def embed_shard(store: ObjectStore, encoder, index: VectorIndex, shard: Shard,
                batch_size: int = 32) -> dict:
    """Embed what the shard's range needs and write it; a summary for the logs and XCom."""
    from indexer.pipeline import embed_objects, list_images

    t0 = time.perf_counter()
    who = {"shard": shard.index, "of": shard.count, "pid": os.getpid(),
           "host": socket.gethostname()}
    done = _published_by(index, shard)
    if done:
        log.info("shard %d/%d: plan %s already published as %s", shard.index, shard.count,
                 shard.plan, done)
        return {**who, "action": "already published", "version": done}
    _check_base(index, shard)
    if encoder.model_id != shard.model_id:
        raise StalePlan(f"plan {shard.plan} is for model {shard.model_id}, MODEL_PATH now "
                        f"loads {encoder.model_id}")
    objects = {k: o for k, o in list_images(store, shard.prefix).items() if shard.covers(k)}
    gone: list[str] = []
    if shard.mode == "update":
        indexed = {k: e for k, e in index.indexed(shard.model_id).etags.items()
                   if shard.covers(k)}
        gone = sorted(k for k, e in indexed.items() if k not in objects or objects[k].etag != e)
        todo = [o for k, o in objects.items() if indexed.get(k) != o.etag]
    else:
        todo = list(objects.values())
    res = embed_objects(store, encoder, sorted(todo, key=lambda o: o.key), batch_size,
                        progress=False)
    if shard.mode == "rebuild":
        index.write(shard.draft, res.keys, res.vectors, res.etags, part=f"{shard.index:05d}")
    elif isinstance(index, FaissIndex):
        write_part(_staging(index) / shard.plan, shard, res.keys, res.etags, res.vectors, gone,
                   encoder.scoring.tuning_queries() if shard.index == 0 else None)
    else:  # the published collection, in place (upserts by key: a retry writes the same rows)
        index.update(shard.model_id, res.keys, res.vectors, res.etags, delete=gone)
    out = {**who, "action": "embedded", "listed": len(objects), "embedded": len(res.keys),
           "gone": len(gone), "failed": dict(list(res.failed.items())[:MAX_FAILED_LISTED]),
           "seconds": round(time.perf_counter() - t0, 2)}
    log.info("shard %d/%d (pid %d on %s): %s", shard.index, shard.count, os.getpid(),
             who["host"], out)
    return out


def part_path(plan_dir: Path, shard: Shard) -> Path:
    return plan_dir / f"part-{shard.index:05d}.npz"


def write_part(plan_dir: Path, shard: Shard, keys: list[str], etags: list[str],
               vectors: np.ndarray, gone: list[str], tuning: np.ndarray | None = None) -> None:
    """A FAISS update shard's result, written whole (temp + rename); shard 0's carries the
    model's tuning queries (for an index that outgrows its type)."""
    if not (plan_dir / PLAN_FILE).is_file():
        raise StalePlan(f"plan {shard.plan} is gone (a newer version was published since it "
                        "was made); the next run plans again")
    meta = {"shard": shard.to_dict(), "keys": keys, "etags": etags, "gone": gone}
    arrays = {"vectors": np.ascontiguousarray(vectors, np.float32),
              "meta": np.array(json.dumps(meta))}
    if tuning is not None:
        arrays["tuning"] = np.ascontiguousarray(tuning, np.float32)
    fd, tmp = tempfile.mkstemp(dir=plan_dir, prefix=".tmp-", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, part_path(plan_dir, shard))
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_part(path: Path) -> tuple[dict, np.ndarray, np.ndarray | None]:
    with np.load(path, allow_pickle=False) as z:
        tuning = z["tuning"] if "tuning" in z.files else None
        return json.loads(str(z["meta"])), z["vectors"], tuning


# --- publish -----------------------------------------------------------------------------------
def publish_plan(index: VectorIndex, shard: Shard, reports: list[dict]) -> dict:
    """After every shard of the plan succeeded: publish its work (`shard`: any of the plan's
    descriptors; `reports`: what each shard's `embed_shard` returned). A report shaped like
    `pipeline.IndexReport.to_dict()`."""
    t0 = time.perf_counter()
    missing = sorted(set(range(shard.count)) - {r["shard"] for r in reports})
    if missing:
        raise StalePlan(f"plan {shard.plan}: shard(s) {missing} of {shard.count} did not report")
    embedded = [e for e in reports if e.get("action") == "embedded"]
    failed = {k: v for e in embedded for k, v in e.get("failed", {}).items()}
    report = {"failed": failed, "plan": shard.plan, "shards": shard.count,
              "embedded_by": [{k: e.get(k) for k in ("shard", "pid", "host", "embedded")}
                              for e in embedded]}
    done = _published_by(index, shard)
    if done:  # a re-run after success
        if _staging(index) is not None:
            shutil.rmtree(_staging(index) / shard.plan, ignore_errors=True)
        return {**report, "action": "unchanged", "version": done, "already_published": True,
                "count": index.status(shard.model_id)["count"], "added": 0, "removed": 0,
                "seconds": 0.0}
    _check_base(index, shard)
    if shard.mode == "rebuild":
        out = index.publish(shard.draft)
        return {**report, "action": "rebuilt", "version": out["version"], "count": out["count"],
                "added": out["count"], "removed": 0,
                "seconds": round(time.perf_counter() - t0, 2)}
    if not isinstance(index, FaissIndex):  # the shards wrote into the published collection
        st = index.status(shard.model_id)
        return {**report, "action": "updated", "version": st["version"], "count": st["count"],
                "added": sum(e["embedded"] for e in embedded),
                "removed": sum(e["gone"] for e in embedded),
                "seconds": round(time.perf_counter() - t0, 2)}
    return {**report, **_publish_staged_update(index, shard),
            "seconds": round(time.perf_counter() - t0, 2)}


def _publish_staged_update(index: FaissIndex, shard: Shard) -> dict:
    """FAISS: the base version minus every shard's gone keys plus every shard's new vectors,
    in range order (the order `pipeline.update` adds them in), as one new version."""
    plan_dir = _staging(index) / shard.plan
    if not (plan_dir / PLAN_FILE).is_file():
        raise StalePlan(f"plan {shard.plan} is gone (a newer version was published since it "
                        "was made); the next run plans again")
    info = json.loads((plan_dir / PLAN_FILE).read_text())
    keys, etags, vectors, gone, tuning = [], [], [], [], None
    for i in range(shard.count):
        path = plan_dir / f"part-{i:05d}.npz"
        if not path.is_file():
            raise StalePlan(f"plan {shard.plan}: part {i} of {shard.count} is missing")
        meta, vecs, tq = read_part(path)
        tuning = tq if tq is not None else tuning
        keys += meta["keys"]
        etags += meta["etags"]
        vectors.append(vecs)
        gone += meta["gone"]
    if not keys and not gone:  # every new image was unreadable
        shutil.rmtree(plan_dir, ignore_errors=True)
        st = index.status(shard.model_id)
        return {"action": "unchanged", "version": st["version"], "count": st["count"],
                "added": 0, "removed": 0}
    out = index.update(shard.model_id, keys, np.concatenate(vectors), etags, delete=gone,
                       extra={"source": info["source"], "prefix": info["prefix"],
                              "plan": shard.plan}, tuning_queries=tuning)
    if out is None:
        raise StalePlan(f"plan {shard.plan}: no usable version of model {shard.model_id} to "
                        "update")
    shutil.rmtree(plan_dir, ignore_errors=True)
    return {"action": "updated", "version": out["version"], "count": out["count"],
            "added": len(keys), "removed": len(gone)}
