"""Ingest: copy images (and Flickr8k's text files) into the object store, idempotently.

The content hash decides: an object whose md5 already matches is not uploaded again. Two
sources, one upload path (`upload_files`):

    ingest      a Flickr8k source (folder or zips): images under IMAGES_PREFIX, captions and
                split lists under TEXT_PREFIX
    add_folder  a person's own folder of photos (`python -m indexer add PATH`): every photo
                under PATH (`encoder.image_formats.is_image_key`, any depth), keyed by its path
                relative to PATH under IMAGES_PREFIX (+ an optional sub-prefix), so a folder
                is a key prefix
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from core.hashing import md5_hex as md5_of
from encoder.image_formats import content_type, is_image_key
from flickr8k.sources import Flickr8kSource
from objectstore import InvalidKey, ObjectStore, validate_key

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


def upload_files(store: ObjectStore, files: dict[str, Callable[[], bytes]],
                 existing: dict[str, str], workers: int = 8, progress: bool = True,
                 desc: str = "ingest",
                 unreadable: Callable[[str, OSError], None] | None = None) -> tuple[int, int]:
    """Put each key's bytes (read when needed) unless the stored object has the same md5 ->
    (uploaded, unchanged). Content types follow the key's extension. With `unreadable`, a file
    that cannot be read is handed to it and left out instead of stopping the upload."""
    def one(key: str) -> bool | None:
        try:
            data = files[key]()
        except OSError as exc:
            if unreadable is None:
                raise
            unreadable(key, exc)
            return None
        if existing.get(key) == md5_of(data):
            return False
        store.put(key, data, content_type=content_type(key))
        return True

    uploaded = unchanged = 0
    with ThreadPoolExecutor(workers) as pool, tqdm(total=len(files), desc=desc, unit="img",
                                                   disable=not progress) as bar:
        for done in pool.map(one, files):
            if done:
                uploaded += 1
            elif done is not None:
                unchanged += 1
            bar.update()
    return uploaded, unchanged


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
    files = {images_prefix + name: (lambda n=name: source.read_image(n)) for name in names}
    report.uploaded, report.unchanged = upload_files(store, files, existing, workers, progress)
    log.info("ingest: %s", report)
    return report


@dataclass
class AddReport:
    folder: str
    prefix: str  # where its photos are in the store
    uploaded: int = 0
    unchanged: int = 0
    skipped: dict[str, str] = field(default_factory=dict)  # relative path -> why not added

    @property
    def total(self) -> int:
        return self.uploaded + self.unchanged


def folder_prefix(images_prefix: str, sub: str | None) -> str:
    """IMAGES_PREFIX plus an optional sub-prefix (a folder: ends with '/'); ValueError for one
    that is not a valid key path."""
    sub = (sub or "").strip("/")
    if not sub:
        return images_prefix
    try:
        validate_key(sub)
    except InvalidKey:
        raise ValueError(f"--prefix {sub!r} is not a valid key prefix (a relative path without "
                         "'..' or empty parts)") from None
    return images_prefix + sub + "/"


def find_photos(folder: Path) -> list[Path]:
    """Every photo under `folder` at any depth, sorted; hidden files and folders (`.git`,
    `.thumbnails`, macOS `._` files) are left out, symlinked folders are not followed."""
    found = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(root) / n for n in names if is_image_key(n)]
    return sorted(found)


def add_folder(folder: str | os.PathLike, store: ObjectStore,
               images_prefix: str = "flickr8k/images/", sub_prefix: str | None = None,
               workers: int = 8, progress: bool = True) -> AddReport:
    """Every photo under `folder` into the store at <images_prefix><sub_prefix/><relative
    path> (see the module doc); files whose path cannot be a key are skipped and named."""
    root = Path(folder).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"{folder}: not a folder")
    prefix = folder_prefix(images_prefix, sub_prefix)
    report = AddReport(str(root), prefix)
    files: dict[str, Callable[[], bytes]] = {}
    for path in find_photos(root):
        rel = path.relative_to(root).as_posix()
        try:
            files[validate_key(prefix + rel)] = path.read_bytes
        except InvalidKey:
            report.skipped[rel] = "its path cannot be an object key"
    if not files:
        log.warning("no photos under %s", root)
    existing = {o.key: o.etag for o in store.list(prefix)}
    def unreadable(key: str, exc: OSError) -> None:
        report.skipped[key[len(prefix):]] = f"cannot be read: {exc.strerror or exc}"

    report.uploaded, report.unchanged = upload_files(store, files, existing, workers, progress,
                                                     desc="add", unreadable=unreadable)
    log.info("add: %d uploaded, %d unchanged, %d skipped, under %r", report.uploaded,
             report.unchanged, len(report.skipped), prefix)
    return report
