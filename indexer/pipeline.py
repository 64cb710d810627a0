"""The index life cycle: embed objects from the store, rebuild, update incrementally, status.

Photos are listed by `indexer.listing` (what a photo is: `encoder.image_formats`). A file the
decoders refuse is reported (`failed`, the log) and, given a `RefusalTable`, remembered by key
and etag, so later runs skip it until it changes; it never stops a run.

Each photo's metadata (`indexer.photo_info`: date, camera, position and place, size, folder) is
read from the same fetched bytes while it is embedded, places looked up once per batch, and
stored beside its vector.

The encoder is `encoder.serving.image_encoder`'s: the serving bundle's image tower (ONNX Runtime,
NumPy/Pillow preprocessing; this module and that path never import torch) or the eager PyTorch
`Encoder`; both take a photo to [3, S, S] pixels (`preprocess`) and a batch of them to embeddings
(`encode_pixels`).
"""
from __future__ import annotations

import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Iterator, Union

import numpy as np
from tqdm import tqdm

from core.logs import process_age_s
from encoder.image_formats import is_raw_key
from encoder.preprocessing import BadImage, decode_image
from indexer.listing import RefusalTable, list_images, warn_if_empty
from indexer.photo_info import add_places, extract_photo_info
from indexer.vector_index import IndexLoadError, VectorIndex
from objectstore import ObjectInfo, ObjectStore

if TYPE_CHECKING:
    from encoder.inference import Encoder
    from encoder.serving import ServingEncoder

    ImageEncoder = Union[Encoder, ServingEncoder]

log = logging.getLogger(__name__)

MAX_REFUSED_LISTED = 100  # refused files named in a status (all are in the table)


@dataclass
class EmbedResult:
    keys: list[str] = field(default_factory=list)
    etags: list[str] = field(default_factory=list)
    vectors: np.ndarray | None = None
    failed: dict[str, str] = field(default_factory=dict)  # key -> why
    infos: list[dict] = field(default_factory=list)  # each key's photo metadata, same order


def _load(store: ObjectStore, encoder: ImageEncoder, info: ObjectInfo):
    """(listing, pixels, photo metadata without its place, None) or (listing, None, None, why)."""
    try:
        data = store.get(info.key)
        image = decode_image(data, raw=is_raw_key(info.key))
        pixels = encoder.preprocess(image)
    except BadImage as exc:
        return info, None, None, str(exc)
    return info, pixels, extract_photo_info(data, info, places=False), None


def _remember(refusals: RefusalTable | None, objects: dict[str, ObjectInfo],
              failed: dict[str, str]) -> None:
    """Record this run's refusals; forget those of files that left the listing or changed."""
    if refusals is not None:
        refusals.update({k: (objects[k].etag, why) for k, why in failed.items() if k in objects},
                        objects)


def iter_batches(store: ObjectStore, encoder: ImageEncoder, objects: list[ObjectInfo],
                 batch_size: int, workers: int = 4, prefetch: int = 2
                 ) -> Iterator[tuple[list, np.ndarray | None, dict, list[dict]]]:
    """Fetch+decode (and read each photo's metadata) in threads, `prefetch` batches ahead of
    the forward pass (so fetching and decoding overlap the model's compute); yields (listings,
    pixels, failures, photo metadata) in order, the places of a batch looked up at once."""
    chunks = [objects[s:s + batch_size] for s in range(0, len(objects), batch_size)]
    with ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()

        def submit(chunk):
            return [pool.submit(_load, store, encoder, o) for o in chunk]

        for chunk in chunks[:prefetch + 1]:
            pending.append(submit(chunk))
        queued = len(pending)
        while pending:
            futures = pending.popleft()
            if queued < len(chunks):
                pending.append(submit(chunks[queued]))
                queued += 1
            loaded = [f.result() for f in futures]
            ok = [(i, t, meta) for i, t, meta, err in loaded if err is None]
            failed = {i.key: err for i, _, _, err in loaded if err is not None}
            pixels = np.stack([t for _, t, _ in ok]) if ok else None
            photo_infos = [meta for _, _, meta in ok]
            add_places(photo_infos)
            yield [i for i, _, _ in ok], pixels, failed, photo_infos


def embed_objects(store: ObjectStore, encoder: ImageEncoder, objects: list[ObjectInfo],
                  batch_size: int = 32, progress: bool = True) -> EmbedResult:
    out = EmbedResult()
    chunks = []
    with tqdm(total=len(objects), desc="embed", unit="img", disable=not progress) as bar:
        for listed, pixels, failed, photo_infos in iter_batches(store, encoder, objects,
                                                                batch_size):
            out.failed.update(failed)
            for key, why in failed.items():
                log.warning("skipping %s: %s", key, why)
            if pixels is not None:
                chunks.append(encoder.scoring.image_vectors(encoder.encode_pixels(pixels)))
                if len(chunks) == 1:
                    _log_first_batch(len(listed))
                out.keys += [i.key for i in listed]
                out.etags += [i.etag for i in listed]
                out.infos += photo_infos
            bar.update(len(listed) + len(failed))
    out.vectors = np.concatenate(chunks) if chunks else np.zeros((0, encoder.scoring.index_dim), np.float32)
    return out


def _log_first_batch(photos: int) -> None:
    """The fixed start-up cost of an indexing process: imports, model, first batch."""
    age = process_age_s()
    log.info("first batch embedded (%d photos)%s", photos,
             f", {age:.2f} s after the process started" if age is not None else "")


@dataclass
class IndexReport:
    action: str  # rebuilt | updated | unchanged
    version: str | None
    count: int
    added: int = 0
    removed: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # refused by the decoders this run
    refused_before: int = 0  # skipped: refused before, unchanged since
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def rebuild(store: ObjectStore, encoder: ImageEncoder, index: VectorIndex, prefix: str,
            batch_size: int = 32, progress: bool = True,
            refusals: RefusalTable | None = None) -> IndexReport:
    """Embed every image (but those refused before, unchanged since) and publish a new
    version."""
    t0 = time.perf_counter()
    listed = list_images(store, prefix)
    warnings = warn_if_empty(store, prefix, listed)
    skip = refusals.refused(listed) if refusals is not None else {}
    objects = sorted((o for k, o in listed.items() if k not in skip), key=lambda o: o.key)
    res = embed_objects(store, encoder, objects, batch_size, progress)
    _remember(refusals, listed, res.failed)
    out = index.rebuild(encoder.model_id, res.keys, res.vectors, res.etags,
                        extra={"source": store.describe(), "prefix": prefix},
                        tuning_queries=encoder.scoring.tuning_queries(), info=res.infos)
    return IndexReport("rebuilt", out["version"], out["count"], added=len(res.keys),
                       failed=res.failed, refused_before=len(skip), warnings=warnings,
                       seconds=time.perf_counter() - t0)


def update(store: ObjectStore, encoder: ImageEncoder, index: VectorIndex, prefix: str,
           batch_size: int = 32, progress: bool = True,
           refusals: RefusalTable | None = None) -> IndexReport:
    """Embed only objects the published version lacks (or whose content changed); drop removed
    ones. Nothing changed: nothing written. No usable version of this model: a rebuild.
    (FAISS writes a new version; Milvus upserts and deletes in the published collection.)"""
    t0 = time.perf_counter()
    try:
        current = index.indexed(encoder.model_id)
    except IndexLoadError as exc:
        log.info("no usable current index (%s): rebuilding", exc)
        return rebuild(store, encoder, index, prefix, batch_size, progress, refusals)
    if current is None:
        log.info("no published index for model %s: rebuilding", encoder.model_id)
        return rebuild(store, encoder, index, prefix, batch_size, progress, refusals)
    if current.model_id != encoder.model_id:
        log.info("model changed (%s -> %s): rebuilding", current.model_id, encoder.model_id)
        return rebuild(store, encoder, index, prefix, batch_size, progress, refusals)

    objects = list_images(store, prefix)
    warnings = warn_if_empty(store, prefix, objects)
    skip = refusals.refused(objects) if refusals is not None else {}
    indexed = current.etags
    gone = [k for k in indexed if k not in objects or objects[k].etag != indexed[k]]
    new = sorted((o for k, o in objects.items() if indexed.get(k) != o.etag and k not in skip),
                 key=lambda o: o.key)
    if not gone and not new:
        _remember(refusals, objects, {})  # forget refusals of files that left the store
        return IndexReport("unchanged", current.version, current.count,
                           refused_before=len(skip), warnings=warnings,
                           seconds=time.perf_counter() - t0)

    res = embed_objects(store, encoder, new, batch_size, progress)
    _remember(refusals, objects, res.failed)
    if not res.keys and not gone:
        return IndexReport("unchanged", current.version, current.count, failed=res.failed,
                           refused_before=len(skip), warnings=warnings,
                           seconds=time.perf_counter() - t0)
    out = index.update(encoder.model_id, res.keys, res.vectors, res.etags, delete=gone,
                       extra={"source": store.describe(), "prefix": prefix},
                       tuning_queries=encoder.scoring.tuning_queries(), info=res.infos)
    return IndexReport("updated", out["version"], out["count"], added=len(res.keys),
                       removed=len(gone), failed=res.failed, refused_before=len(skip),
                       warnings=warnings, seconds=time.perf_counter() - t0)


def status(store: ObjectStore, index: VectorIndex, prefix: str, model_id: str | None = None,
           refusals: RefusalTable | None = None) -> dict:
    """What is published for `model_id` (a backend with one published version for all models,
    FAISS, reports it whichever model built it: `model_matches` tells), what an update would do,
    and the files the decoders refused (`refused`, `refused_files`: key and reason; they do not
    count as not indexed), and how many indexed photos have a date read from the photo, a
    position, a place (`with_date`, `with_position`, `with_place`: view.info_counts)."""
    info = index.status(model_id)
    objects = list_images(store, prefix)
    refused = refusals.refused(objects) if refusals is not None else {}
    out = {"store": store.describe(), "prefix": prefix, "objects": len(objects), **info,
           "count": 0, "not_indexed": len(objects) - len(refused), "removed_from_store": 0,
           "refused": len(refused),
           "refused_files": [{"key": k, "reason": refused[k]}
                             for k in sorted(refused)[:MAX_REFUSED_LISTED]],
           "with_date": 0, "with_position": 0, "with_place": 0}
    warnings = warn_if_empty(store, prefix, objects)
    if warnings:
        out["warnings"] = warnings
    if info.get("version") is None:
        return out
    out["count"] = info.get("count", 0)
    try:
        current = index.indexed(model_id)
    except IndexLoadError as exc:
        out["error"] = str(exc)
        return out
    if current is None:
        return out
    indexed = current.etags
    out["not_indexed"] = sum(1 for k, o in objects.items()
                             if indexed.get(k) != o.etag and k not in refused)
    out["removed_from_store"] = sum(1 for k in indexed if k not in objects)
    if model_id is not None:
        out["model_matches"] = model_id == current.model_id
    try:
        out.update(index.view(current.model_id, current.version).info_counts())
    except IndexLoadError as exc:
        out["error"] = str(exc)
    return out
