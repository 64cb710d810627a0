"""Fanned-out embedding: a plan of key-range shards, one shard's embedding, and the publish that
turns every shard's work into one new index version (any `indexer.vector_index` backend).

    plan     list the images once; split the keys that need embedding into at most
             EMBED_MAX_SHARDS contiguous key ranges of about EMBED_SHARD_SIZE keys each, and
             begin the version they write into (`VectorIndex.begin`: a rebuild's new draft, or
             an update of the published version); each descriptor records when the listing
             began and how many images it found (`listed_at`, `listed`: the run's check,
             `indexer.verify`, excuses what changed in the store after)
    shard    list its own range, embed what needs it, write it into that version as its part
             (`write`; `remove` for its range's keys that left the store)
    publish  once every shard succeeded: `VectorIndex.publish` of that version, which gives
             what a single-process `pipeline.rebuild` or `pipeline.update` would have made
             (same keys, same ids, same index type)

A shard is a descriptor (plan id, mode, key range, listing prefix, the version being written),
never a key list: Airflow carries it in XCom and maps at most `core.max_map_length` (1024) of
them. The ranges cover the whole key space, so a key uploaded after planning is embedded by
whichever shard's range holds it, and each shard finds the indexed keys of its range that left
the store: no step but the plan's one listing needs every key. A shard retried rewrites its own
part; where the backend updates the published version in place (Milvus), an update's shards
write straight into it (written by key: a retry writes the same rows).

Files the decoders refused are remembered by key and etag (`indexer.listing.RefusalTable`,
when one is given): the plan and each shard skip those unchanged since, a shard records what it
refused (and logs each one), and the publish report lists them; they never fail a run.

A plan belongs to the version published when it was made: once another one is published its
shards and its publish fail at once (`StalePlan`, no retries) instead of overwriting newer work,
and the next run plans again (the DAGs keep their runs from planning against each other:
`jobs.plan_shards`). A plan that was published is recognised, so re-running a finished run's
tasks publishes nothing.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

from indexer.listing import RefusalTable, list_images, warn_if_empty
from indexer.vector_index import DraftGone, IndexLoadError, VectorIndex, new_version_name
from objectstore import ObjectStore

log = logging.getLogger(__name__)

MAX_FAILED_LISTED = 100  # bad images named in a shard's report (all are logged)
# descriptors planned before the fields were renamed (a cleared task of an older run)
_OLD_FIELDS = {"index": "position", "count": "of"}


class StalePlan(RuntimeError):
    """The plan can no longer be carried out (another version was published since, the model
    changed, a part is missing): a retry cannot fix it; the next run plans again."""


@dataclass(frozen=True)
class Shard:
    plan: str
    mode: str  # "rebuild" (embed every key of the range) | "update" (only new/changed keys)
    model_id: str
    base: str | None  # the version published when planned (an update applies to it)
    draft: str  # the version the shards write into (an in-place update: `base` itself)
    position: int  # this shard's number in the plan, from 0
    of: int  # shards in the plan
    prefix: str  # listing prefix: the longest one every key of the range starts with
    start: str | None  # first key of the range (None: open)
    stop: str | None  # first key of the next range, excluded (None: open)
    planned: int  # keys to embed in this range when planned
    # when the plan began listing the store (epoch seconds) and the images it listed: what
    # `verify_index` holds the run to (None in descriptors planned before they were recorded)
    listed_at: float | None = None
    listed: int | None = None

    @property
    def part(self) -> str:
        """The name of this shard's part of the draft."""
        return f"{self.position:05d}"

    def covers(self, key: str) -> bool:
        return (self.start is None or key >= self.start) and (self.stop is None or key < self.stop)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Shard":
        return cls(**{_OLD_FIELDS.get(k, k): v for k, v in d.items()})


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
        return index.published(model_id)
    except IndexLoadError:
        return None


# --- plan --------------------------------------------------------------------------------------
def plan(store: ObjectStore, index: VectorIndex, prefix: str, model_id: str, shard_size: int,
         max_shards: int, prepare: Callable[[], tuple[int, np.ndarray | None]],
         force_rebuild: bool = False, refusals: RefusalTable | None = None) -> list[Shard]:
    """The shards of the work an update (or a rebuild) needs now; [] when nothing changed.
    `prepare()` -> (index dimension, tuning queries) of the model, called when there is work
    (it reads the model's card). The mode is decided as `pipeline.update` decides it: a rebuild
    when forced, or when there is no usable version of this model. Files refused before and
    unchanged since are no work."""
    base = None
    if not force_rebuild:
        try:
            base = index.indexed(model_id)
        except IndexLoadError as exc:
            log.info("no usable current index (%s): planning a rebuild", exc)
        if base is not None and base.model_id != model_id:
            log.info("model changed (%s -> %s): planning a rebuild", base.model_id, model_id)
            base = None
    listed_at = time.time()
    objects = list_images(store, prefix)
    warn_if_empty(store, prefix, objects)
    skip = refusals.refused(objects) if refusals is not None else {}
    if skip:
        log.info("plan: %d file(s) refused before and unchanged since are skipped", len(skip))
    if base is None:
        todo = sorted(k for k in objects if k not in skip)
    else:
        todo = sorted(k for k, o in objects.items()
                      if base.etags.get(k) != o.etag and k not in skip)
        if not todo and all(k in objects for k in base.etags):
            return []
    on = base.version if base else _published(index, model_id)
    plan_id = new_version_name()
    mode = "rebuild" if base is None else "update"
    dim, tuning = prepare()
    draft = index.begin(model_id, dim, {"source": store.describe(), "prefix": prefix,
                                        "plan": plan_id}, tuning,
                        base=on if mode == "update" else None)
    ranges = split_ranges(todo, shard_size, max_shards)
    shards = [Shard(plan_id, mode, model_id, on, draft, i, len(ranges),
                    _listing_prefix(prefix, start, stop), start, stop, n,
                    listed_at=listed_at, listed=len(objects))
              for i, (start, stop, n) in enumerate(ranges)]
    log.info("plan %s: %s of %d keys (%d to embed) in %d shards, into %s", plan_id, mode,
             len(objects), len(todo), len(shards), draft)
    return shards


def _in_place(shard: Shard) -> bool:
    """The shards write into the published version itself (a backend that updates in place)."""
    return shard.draft == shard.base


def _published_by(index: VectorIndex, shard: Shard) -> str | None:
    """The published version when this plan published it (a finished run's task re-run)."""
    if _in_place(shard):
        return None  # running an in-place update again writes the same rows: nothing to skip
    current = _published(index, shard.model_id)
    return current if current is not None and current == shard.draft else None


def _check_base(index: VectorIndex, shard: Shard) -> None:
    current = _published(index, shard.model_id)
    if current != shard.base:
        raise StalePlan(f"plan {shard.plan} was made on index version {shard.base}, but "
                        f"{current} is published now; the next run plans again")


# --- one shard ---------------------------------------------------------------------------------
def embed_shard(store: ObjectStore, encoder, index: VectorIndex, shard: Shard,
                batch_size: int = 32, refusals: RefusalTable | None = None) -> dict:
    """Embed what the shard's range needs and write it; a summary for the logs and XCom."""
    from indexer.pipeline import embed_objects

    t0 = time.perf_counter()
    who = {"shard": shard.position, "of": shard.of, "pid": os.getpid(),
           "host": socket.gethostname()}
    done = _published_by(index, shard)
    if done:
        log.info("shard %d/%d: plan %s already published as %s", shard.position, shard.of,
                 shard.plan, done)
        return {**who, "action": "already published", "version": done}
    _check_base(index, shard)
    if encoder.model_id != shard.model_id:
        raise StalePlan(f"plan {shard.plan} is for model {shard.model_id}, MODEL_PATH now "
                        f"loads {encoder.model_id}")
    objects = {k: o for k, o in list_images(store, shard.prefix).items() if shard.covers(k)}
    skip = refusals.refused(objects) if refusals is not None else {}
    gone: list[str] = []
    if shard.mode == "update":
        indexed = {k: e for k, e in index.indexed(shard.model_id).etags.items()
                   if shard.covers(k)}
        gone = sorted(k for k, e in indexed.items() if k not in objects or objects[k].etag != e)
        todo = [o for k, o in objects.items() if indexed.get(k) != o.etag and k not in skip]
    else:
        todo = [o for k, o in objects.items() if k not in skip]
    res = embed_objects(store, encoder, sorted(todo, key=lambda o: o.key), batch_size,
                        progress=False)
    if refusals is not None:
        refusals.update({k: (objects[k].etag, why) for k, why in res.failed.items()}, objects,
                        lambda k: k.startswith(shard.prefix) and shard.covers(k))
    try:
        index.write(shard.draft, res.keys, res.vectors, res.etags, part=shard.part,
                    info=res.infos)
        if shard.mode == "update":  # a changed key embedded again is upserted, not removed
            embedded = set(res.keys)
            index.remove(shard.draft, [k for k in gone if k not in embedded], part=shard.part)
    except DraftGone as exc:
        raise StalePlan(f"plan {shard.plan}: {exc}; the next run plans again") from None
    out = {**who, "action": "embedded", "listed": len(objects), "embedded": len(res.keys),
           "gone": len(gone), "failed": dict(list(res.failed.items())[:MAX_FAILED_LISTED]),
           "refused_before": len(skip),
           "seconds": round(time.perf_counter() - t0, 2)}
    log.info("shard %d/%d (pid %d on %s): %s", shard.position, shard.of, os.getpid(),
             who["host"], out)
    return out


# --- publish -----------------------------------------------------------------------------------
def publish_plan(index: VectorIndex, shard: Shard, reports: list[dict]) -> dict:
    """After every shard of the plan succeeded: publish the version its shards wrote
    (`shard`: any of the plan's descriptors; `reports`: what each shard's `embed_shard`
    returned). A report shaped like `pipeline.IndexReport.to_dict()`."""
    t0 = time.perf_counter()
    missing = sorted(set(range(shard.of)) - {r["shard"] for r in reports})
    if missing:
        raise StalePlan(f"plan {shard.plan}: shard(s) {missing} of {shard.of} did not report")
    embedded = [e for e in reports if e.get("action") == "embedded"]
    failed = {k: v for e in embedded for k, v in e.get("failed", {}).items()}
    for key, why in sorted(failed.items()):  # the run's log names every refused file
        log.warning("refused %s: %s", key, why)
    report = {"failed": failed, "plan": shard.plan, "shards": shard.of,
              "refused_before": sum(e.get("refused_before", 0) for e in embedded),
              "plan_listed_at": shard.listed_at, "plan_listed": shard.listed,
              "embedded_by": [{k: e.get(k) for k in ("shard", "pid", "host", "embedded")}
                              for e in embedded]}
    done = _published_by(index, shard)
    if done:  # a re-run after success
        return {**report, "action": "unchanged", "version": done, "already_published": True,
                "count": index.status(shard.model_id)["count"], "added": 0, "removed": 0,
                "seconds": 0.0}
    _check_base(index, shard)
    parts = [f"{i:05d}" for i in range(shard.of)]
    try:
        out = index.publish(shard.draft, parts=parts)
    except DraftGone as exc:
        raise StalePlan(f"plan {shard.plan}: {exc}; the next run plans again") from None
    if shard.mode == "rebuild":
        action, added, removed = "rebuilt", out["count"], 0
    else:
        added = sum(e["embedded"] for e in embedded)
        removed = sum(e["gone"] for e in embedded)
        action = "updated" if added or removed else "unchanged"
    return {**report, "action": action, "version": out["version"], "count": out["count"],
            "added": added, "removed": removed, "seconds": round(time.perf_counter() - t0, 2)}
