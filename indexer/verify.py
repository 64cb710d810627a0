"""The index invariant, checked: the published version holds exactly one vector for every image
in the store under the indexed prefix, each with the object's current etag and built by the
current model, and nothing else (`python -m indexer verify`, the DAGs' `verify_index` task).

Both sides are read in key order, a page at a time, and merge-joined: the store's listing
(`ObjectStore.list`, in key order on every backend) and the published version's (key, etag)
rows (`VectorIndex.keys_page`). Memory stays at a page of each, whatever the size (the FAISS
backend reads its version's key table whole, once: it is one file).

What it reports (counts, and the first few keys of each kind):

    missing      an image in the store the version does not hold
    stale        held with another etag than the object's current one (changed since)
    extra        held, but no such image in the store (deleted since, or another prefix)
    duplicated   held more than once (a FAISS key table could; Milvus cannot: an upsert
                 replaces the row of its key, a query returns one row per key)
    wrong_model  the published version was built by another model than the current one
                 (where versions are per model, Milvus, nothing is published for the current
                 one: every image is missing)
    changed_during_run   (a run's check only) uploaded, changed or deleted after the run's
                 plan listed the store: reported, not failed (below)

Alone (`since` None: `python -m indexer verify`) it checks the store as it is now: an upload
the published version does not hold yet is missing, whenever it came.

A run's check (`since`: when its plan began listing the store, `listed`: how many images that
listing found; the DAGs' `verify_index`) holds the run to what it could have seen. An upload or
a change dated after `since` (`ObjectInfo.last_modified`, less CLOCK_SLACK_S) that the version
does not hold is not missing or stale but `changed_during_run` (uploaded / changed), and does
not fail the check: the next run's plan lists it. One dated before is a key the run missed.

Files the decoders refused (`indexer.listing.RefusalTable`: a key and the etag that was
refused) are not missing: they are counted apart as `refused` and do not fail the check; the
same key with another etag (the file was replaced since) is missing again.

A deletion leaves nothing to date, so extra keys are judged by count. An image the plan listed
that the store no longer has was deleted during the run, and there are at most
`listed - (images in the store now dated before since)` of those: an image dated before the
plan was there when it listed. When the extra keys are no more than that, they are reported as
deleted during the run (`changed_during_run`: deleted); when more, every one is extra and the
check fails. A run during which nobody deleted or changed an image (uploads do not count)
leaves no room: an extra key is then a bug (a removal not applied, a key from elsewhere). What
a busy run lets pass (an extra key in the room its deletions and changes opened) is held to the
rule by the next quiet run: its plan lists the store again. Without `listed` (`--since` on the
command line) extra keys always fail. Duplicated keys and a wrong model always fail.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

from indexer.vector_index import VectorIndex
from objectstore import ObjectStore

PAGE = 10_000  # index rows per keys_page call
SHOWN = 10  # keys listed per kind of problem
KINDS = ("missing", "stale", "extra", "duplicated")
# what changed in the store after the run's plan listed it (reported, not failed)
DURING_RUN = ("uploaded", "changed", "deleted")
# An object dated up to this long before `since` counts as written after it: S3 servers date
# objects to the whole second (SeaweedFS), a file system to its clock tick, and the store's
# clock is not the planning worker's (kept in step by NTP, not exactly).
CLOCK_SLACK_S = 1.0


class IndexMismatch(RuntimeError):
    """The published version does not hold exactly the store's images (the message says how)."""


@dataclass
class Found:
    """How many keys of one kind, and the first few."""
    count: int = 0
    first: list[str] = field(default_factory=list)

    def add(self, key: str, shown: int) -> None:
        self.count += 1
        if len(self.first) < shown:
            self.first.append(key)


@dataclass
class Verification:
    backend: str
    store: str
    prefix: str
    model_id: str | None  # the current model
    version: str | None  # the published version checked (None: nothing published)
    version_model_id: str | None  # the model that built it
    objects: int = 0  # images in the store
    rows: int = 0  # rows the version holds
    found: dict[str, Found] = field(default_factory=lambda: {k: Found() for k in KINDS})
    since: float | None = None  # when the run's plan began listing the store (None: now)
    refused: Found = field(default_factory=Found)  # not indexed: the decoders refused them
    during_run: dict[str, Found] = field(
        default_factory=lambda: {k: Found() for k in DURING_RUN})

    @property
    def wrong_model(self) -> bool:
        return self.version is not None and self.version_model_id != self.model_id

    @property
    def ok(self) -> bool:
        return not self.wrong_model and not any(f.count for f in self.found.values())

    def to_dict(self) -> dict:
        return {"ok": self.ok, "backend": self.backend, "store": self.store,
                "prefix": self.prefix, "model_id": self.model_id, "version": self.version,
                "version_model_id": self.version_model_id, "wrong_model": self.wrong_model,
                "objects": self.objects, "rows": self.rows,
                **{k: {"count": f.count, "first": f.first} for k, f in self.found.items()},
                "since": self.since,
                "refused": {"count": self.refused.count, "first": self.refused.first},
                "changed_during_run": {
                    "count": sum(f.count for f in self.during_run.values()),
                    **{k: {"count": f.count, "first": f.first}
                       for k, f in self.during_run.items()}}}

    def changes_during_run(self) -> str | None:
        """One line on what changed in the store while the run ran, None when nothing did."""
        counts = {k: f.count for k, f in self.during_run.items() if f.count}
        if not counts:
            return None
        keys = [key for f in self.during_run.values() for key in f.first]
        more = ", ..." if sum(counts.values()) > len(keys) else ""
        what = ", ".join(f"{n} {kind}" for kind, n in counts.items())
        return (f"changed during this run (after its plan listed the store): {what} "
                f"({', '.join(keys)}{more}); the next run indexes them")

    def summary(self) -> str:
        """A few lines for people (and for the failed task's message)."""
        head = (f"{'OK' if self.ok else 'MISMATCH'}: {self.backend} version {self.version} "
                f"({self.rows} rows) against {self.objects} images under {self.prefix!r} in "
                f"{self.store}")
        lines = [head]
        if self.wrong_model:
            lines.append(f"  wrong model: the version was built by {self.version_model_id}, "
                         f"the current model is {self.model_id}")
        for kind, f in self.found.items():
            if f.count:
                more = ", ..." if f.count > len(f.first) else ""
                lines.append(f"  {kind}: {f.count} ({', '.join(f.first)}{more})")
        if (changes := self.changes_during_run()) is not None:
            lines.append(f"  {changes}")
        if self.refused.count:
            lines.append(f"  refused by the decoders (not indexed, `python -m indexer status` "
                         f"says why): {self.refused.count}")
        return "\n".join(lines)


def _in_order(rows: Iterator[tuple], what: str) -> Iterator[tuple]:
    """The rows ((key, ...) tuples) as they come, refusing a key below the one before: a
    merge-join of unsorted input would report nonsense."""
    last = None
    for row in rows:
        key = row[0]
        if last is not None and key < last:
            raise RuntimeError(f"{what} is not in key order ({key[:200]!r} after "
                               f"{last[:200]!r}); cannot verify")
        last = key
        yield row


def _images(store: ObjectStore, prefix: str) -> Iterator[tuple[str, str, float | None]]:
    from encoder.image_formats import is_image_key  # the one owner of what counts as a photo

    return ((o.key, o.etag, o.last_modified) for o in store.list(prefix) if is_image_key(o.key))


def _rows(index: VectorIndex, version: str | None, page: int) -> Iterator[tuple[str, str]]:
    after = None
    while version is not None:
        rows = index.keys_page(version, after, page)
        if not rows:
            return
        yield from rows
        after = rows[-1][0]


def verify(store: ObjectStore, index: VectorIndex, prefix: str, model_id: str | None,
           page: int = PAGE, shown: int = SHOWN, since: float | None = None,
           listed: int | None = None, refused: dict[str, str] | None = None) -> Verification:
    """Merge-join the store's images under `prefix` with the rows of the version published for
    `model_id`; every difference is counted (see the module doc). `since` (epoch seconds): when
    the run's plan began listing the store, `listed`: the images it listed; what changed after
    is reported apart (`changed_during_run`) and does not fail the check. `refused`: key -> etag
    of the files the decoders refused."""
    refused = refused or {}
    info = index.status(model_id)
    version = info.get("version")
    out = Verification(index.backend, store.describe(), prefix, model_id, version,
                       info.get("model_id") if version is not None else None, since=since)
    found, during = out.found, out.during_run
    after = None if since is None else since - CLOCK_SLACK_S

    def during_run(when: float | None) -> bool:
        return after is not None and when is not None and when > after

    older = 0  # images dated before `since` (less the slack): there when the plan listed
    objects = _in_order(_images(store, prefix), f"the listing of {store.describe()}")
    rows = _in_order(_rows(index, version, page), f"index version {version}")
    obj, row = next(objects, None), next(rows, None)
    last_row = None
    while obj is not None or row is not None:
        if row is not None and row[0] == last_row:  # the key again
            found["duplicated"].add(row[0], shown)
            out.rows += 1
            row = next(rows, None)
            continue
        if row is None or (obj is not None and obj[0] < row[0]):
            kind = out.refused if refused.get(obj[0]) == obj[1] else \
                during["uploaded"] if during_run(obj[2]) else found["missing"]
            kind.add(obj[0], shown)
        elif obj is None or row[0] < obj[0]:
            found["extra"].add(row[0], shown)
            out.rows += 1
            last_row, row = row[0], next(rows, None)
            continue
        else:
            if obj[1] != row[1]:
                (during["changed"] if during_run(obj[2]) else found["stale"]).add(obj[0], shown)
            out.rows += 1
            last_row, row = row[0], next(rows, None)
        out.objects += 1
        older += not during_run(obj[2])
        obj = next(objects, None)
    if since is not None and listed is not None and found["extra"].count and \
            found["extra"].count <= listed - older:
        during["deleted"], found["extra"] = found["extra"], Found()
    return out


def verify_or_raise(store: ObjectStore, index: VectorIndex, prefix: str,
                    model_id: str | None, since: float | None = None,
                    listed: int | None = None, refused: dict[str, str] | None = None) -> dict:
    """`verify`, as a task: its report when the invariant holds, IndexMismatch otherwise."""
    result = verify(store, index, prefix, model_id, since=since, listed=listed, refused=refused)
    if not result.ok:
        raise IndexMismatch(result.summary())
    return result.to_dict()
