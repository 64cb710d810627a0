"""Ingest: copy Flickr8k images and text files into the object store, idempotently.

The content hash decides: an object whose md5 already matches is not uploaded again.
"""
from __future__ import annotations

import logging
import mimetypes
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from tqdm import tqdm

from flickr8k.sources import Flickr8kSource
from objectstore import ObjectStore
from core.hashing import md5_hex as md5_of

log = logging.getLogger(__name__)


@dataclass
class IngestReport:
    uploaded: int = 0
    unchanged: int = 0
    texts_uploaded: int = 0
    texts_unchanged: int = 0

    @property
    def total(self) -> int:
        return self.uploaded + self.unchanged


def ingest(source: Flickr8kSource, store: ObjectStore, images_prefix: str = "flickr8k/images/",
           text_prefix: str = "flickr8k/text/", split: str = "all", limit: int | None = None,
           workers: int = 8, progress: bool = True) -> IngestReport:
    report = IngestReport()
    existing = {o.key: o.etag for o in store.list(images_prefix)}
    existing.update({o.key: o.etag for o in store.list(text_prefix)})

    for name in sorted(source.texts):
        data = source.texts[name]()
        key = text_prefix + name
        if existing.get(key) == md5_of(data):
            report.texts_unchanged += 1
        else:
            store.put(key, data, content_type="text/plain")
            report.texts_uploaded += 1

    names = source.image_names(split)[:limit]

    def one(name: str) -> bool:
        data = source.read_image(name)
        key = images_prefix + name
        if existing.get(key) == md5_of(data):
            return False
        store.put(key, data, content_type=mimetypes.guess_type(name)[0] or "application/octet-stream")
        return True

    with ThreadPoolExecutor(workers) as pool, tqdm(total=len(names), desc="ingest", unit="img",
                                                   disable=not progress) as bar:
        for uploaded in pool.map(one, names):
            if uploaded:
                report.uploaded += 1
            else:
                report.unchanged += 1
            bar.update()
    log.info("ingest: %s", report)
    return report
