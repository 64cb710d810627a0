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

Files the decoders refused (`indexer.listing.RefusalTable`: a key and the etag that was
refused) are not missing: they are counted apart as `refused` and do not fail the check; the
same key with another etag (the file was replaced since) is missing again.

A store written to while it runs (an upload after the version was planned) shows as missing or
stale: the invariant is that of a quiet store, as after a run with no uploads meanwhile.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

from indexer.vector_index import VectorIndex
from objectstore import ObjectStore

PAGE = 10_000  # index rows per keys_page call
SHOWN = 10  # keys listed per kind of problem
KINDS = ("missing", "stale", "extra", "duplicated")


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
    refused: Found = field(default_factory=Found)  # not indexed: the decoders refused them

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
                "refused": {"count": self.refused.count, "first": self.refused.first}}

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
        if self.refused.count:
            lines.append(f"  refused by the decoders (not indexed, `python -m indexer status` "
                         f"says why): {self.refused.count}")
        return "\n".join(lines)


def _in_order(pairs: Iterator[tuple[str, str]], what: str) -> Iterator[tuple[str, str]]:
    """The pairs as they come, refusing a key below the one before: a merge-join of unsorted
    input would report nonsense."""
    last = None
    for key, etag in pairs:
        if last is not None and key < last:
            raise RuntimeError(f"{what} is not in key order ({key[:200]!r} after "
                               f"{last[:200]!r}); cannot verify")
        last = key
        yield key, etag


def _images(store: ObjectStore, prefix: str) -> Iterator[tuple[str, str]]:
    from encoder.image_formats import is_image_key  # the one owner of what counts as a photo

    return ((o.key, o.etag) for o in store.list(prefix) if is_image_key(o.key))


def _rows(index: VectorIndex, version: str | None, page: int) -> Iterator[tuple[str, str]]:
    after = None
    while version is not None:
        rows = index.keys_page(version, after, page)
        if not rows:
            return
        yield from rows
        after = rows[-1][0]


def verify(store: ObjectStore, index: VectorIndex, prefix: str, model_id: str | None,
           page: int = PAGE, shown: int = SHOWN,
           refused: dict[str, str] | None = None) -> Verification:
    """Merge-join the store's images under `prefix` with the rows of the version published for
    `model_id`; every difference is counted (see the module doc). `refused`: key -> etag of the
    files the decoders refused."""
    refused = refused or {}
    info = index.status(model_id)
    version = info.get("version")
    out = Verification(index.backend, store.describe(), prefix, model_id, version,
                       info.get("model_id") if version is not None else None)
    found = out.found
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
            (out.refused if refused.get(obj[0]) == obj[1] else found["missing"]).add(obj[0], shown)
            out.objects += 1
            obj = next(objects, None)
        elif obj is None or row[0] < obj[0]:
            found["extra"].add(row[0], shown)
            out.rows += 1
            last_row, row = row[0], next(rows, None)
        else:
            if obj[1] != row[1]:
                found["stale"].add(obj[0], shown)
            out.objects += 1
            out.rows += 1
            last_row = row[0]
            obj, row = next(objects, None), next(rows, None)
    return out


def verify_or_raise(store: ObjectStore, index: VectorIndex, prefix: str,
                    model_id: str | None, refused: dict[str, str] | None = None) -> dict:
    """`verify`, as a task: its report when the invariant holds, IndexMismatch otherwise."""
    result = verify(store, index, prefix, model_id, refused=refused)
    if not result.ok:
        raise IndexMismatch(result.summary())
    return result.to_dict()
