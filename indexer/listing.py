"""What the index should hold: the store's photos under a prefix, less the files the decoders
refused (torch-free: the DAGs' planning and `status` use it without loading a model).

    list_images      key -> ObjectInfo of every photo under the prefix (`encoder.image_formats`
                     decides what a photo is); an empty prefix is the whole bucket
    nothing_found    what to tell a person whose prefix holds no photo (never silence)
    RefusalTable     files the decoders refused, per key and etag, with the reason: not tried
                     again until the file changes (another etag) or the decoders do (another
                     Pillow / pillow-heif / rawpy); kept in INDEX_DIR/refused.json, so every
                     backend and every process that shares INDEX_DIR shares it
"""
from __future__ import annotations

import itertools
import json
import logging
import time
from pathlib import Path
from typing import Callable

from filelock import FileLock

from core.atomic import write_atomic
from encoder.image_formats import decoder_versions, is_image_key
from objectstore import ObjectInfo, ObjectStore

log = logging.getLogger(__name__)

REFUSED_FILE = "refused.json"
# objects looked at to explain an empty prefix (a huge bucket is not listed whole for a hint)
HINT_LISTING = 10_000


def list_images(store: ObjectStore, prefix: str) -> dict[str, ObjectInfo]:
    """Every photo under `prefix` ("" : the whole bucket), keys as stored (relative paths, so a
    folder is a key prefix)."""
    return {o.key: o for o in store.list(prefix) if is_image_key(o.key)}


def nothing_found(store: ObjectStore, prefix: str) -> str:
    """The warning for a prefix without photos: what is there instead, and what to set."""
    where = f"IMAGES_PREFIX={prefix!r}" if prefix else "the whole bucket (IMAGES_PREFIX= empty)"
    msg = f"no photos under {where} in {store.describe()}"
    others = [o.key for o in itertools.islice(store.list(prefix), HINT_LISTING)]
    if others:
        return f"{msg}: {len(others)} object(s) there, none with a photo extension " \
               f"(e.g. {others[0]!r})"
    if prefix:
        elsewhere = next((o.key for o in itertools.islice(store.list(""), HINT_LISTING)
                          if is_image_key(o.key)), None)
        if elsewhere:
            return f"{msg}; the store has photos elsewhere (e.g. {elsewhere!r}): set " \
                   "IMAGES_PREFIX to their folder, or IMAGES_PREFIX= (empty) for the whole bucket"
    return f"{msg}: the store is empty there (python -m indexer add PATH puts a folder in)"


def warn_if_empty(store: ObjectStore, prefix: str, objects: dict) -> list[str]:
    """[] when there are photos; else the warning, logged, as a list for a report."""
    if objects:
        return []
    warning = nothing_found(store, prefix)
    log.warning("%s", warning)
    return [warning]


class RefusalTable:
    """Files the decoders refused (see the module doc). Writers take a file lock beside it;
    every write replaces it atomically."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._decoders: str | None = None

    @classmethod
    def in_dir(cls, index_dir: str | Path) -> "RefusalTable":
        return cls(Path(index_dir) / REFUSED_FILE)

    @property
    def decoders(self) -> str:
        if self._decoders is None:
            self._decoders = decoder_versions()
        return self._decoders

    def _read(self) -> dict[str, dict]:
        """key -> {"etag", "reason", "at"}; refusals by other decoders count as none."""
        try:
            doc = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:  # damaged: start again (files are tried once more)
            log.warning("ignoring unreadable %s: %s", self.path.name, exc)
            return {}
        if not isinstance(doc, dict) or doc.get("decoders") != self.decoders:
            return {}
        files = doc.get("files")
        return files if isinstance(files, dict) else {}

    def refused(self, objects: dict[str, ObjectInfo]) -> dict[str, str]:
        """key -> reason for the objects refused before with the same content."""
        files = self._read()
        return {k: e["reason"] for k, e in files.items()
                if k in objects and e.get("etag") == objects[k].etag}

    def all(self) -> dict[str, dict]:
        return self._read()

    def etags(self) -> dict[str, str]:
        """key -> the etag that was refused (what `indexer.verify` accounts for)."""
        return {k: e.get("etag") for k, e in self._read().items()}

    def update(self, refused: dict[str, tuple[str, str]], objects: dict[str, ObjectInfo],
               covers: Callable[[str], bool] = lambda key: True) -> None:
        """Record `refused` (key -> (etag, reason)); forget the refusals of keys `covers`
        says this listing (`objects`) speaks for that left the store or changed."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.path) + ".lock", timeout=600):
            files = self._read()
            kept = {k: e for k, e in files.items()
                    if not covers(k) or (k in objects and objects[k].etag == e.get("etag"))}
            now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            for key, (etag, reason) in refused.items():
                kept[key] = {"etag": etag, "reason": str(reason)[:500], "at": now}
            if kept == files and self.path.is_file():
                return
            write_atomic(self.path, json.dumps({"decoders": self.decoders, "files": kept},
                                               indent=1, sort_keys=True))

    def clear(self) -> None:
        """Try every refused file again on the next run."""
        self.path.unlink(missing_ok=True)
