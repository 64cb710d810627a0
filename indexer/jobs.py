"""Task bodies for the Airflow DAGs: each one an idempotent transaction with JSON-able results.

The DAG files in `dags/` stay thin and call these; these call the rest of `indexer`. Every step
can be rerun after success without changing anything, and a failed step leaves nothing half-made:

    fetch_archives   folder -> as is; zip path / URL -> resumable download, size/hash checked
    unpack           zips -> <work>/flickr8k-<hashes>/ (CRC-checked, temp dir + rename)
    upload           folder -> object store (content hash decides; nothing re-uploaded)
    find_changes     objects the current index lacks / that were removed / model changed
    publish_index    embed only what changed, publish a new version (none when nothing changed)

Object-store errors that look transient (server unreachable) are retried here with exponential
back-off; Airflow's task retries (also with back-off) sit on top of that.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import random
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, TypeVar

from core.settings import Settings, get_settings
from objectstore import InvalidKey, StoreAuthError, StoreUnavailable
from core.hashing import sha256_file

log = logging.getLogger(__name__)
T = TypeVar("T")

# Errors a retry cannot fix (bad credentials, a missing model file): fail the task at once.
PERMANENT_ERRORS: tuple[type[BaseException], ...] = (StoreAuthError, InvalidKey, FileNotFoundError)

UNPACK_MARKER = ".complete.json"


# --- retries -------------------------------------------------------------------------------
def with_retries(fn: Callable[..., T], *args, attempts: int = 4, base_delay: float = 1.0,
                 max_delay: float = 30.0, retry_on: tuple[type[BaseException], ...] = (StoreUnavailable,),
                 sleep: Callable[[float], None] = time.sleep, **kwargs) -> T:
    """Call fn; on a transient store error wait base*2^n (+-25 % jitter, capped) and call again."""
    for attempt in range(1, attempts + 1):
        try:
            return fn(*args, **kwargs)
        except retry_on as exc:
            if attempt == attempts:
                raise
            delay = min(max_delay, base_delay * 2 ** (attempt - 1)) * random.uniform(0.75, 1.25)
            log.warning("%s failed (%s); retry %d/%d in %.1f s", getattr(fn, "__name__", fn), exc,
                        attempt, attempts - 1, delay)
            sleep(delay)
    raise AssertionError("unreachable")


@contextmanager
def index_lock(index_dir: str | os.PathLike, timeout: float = 3600.0) -> Iterator[None]:
    """One index writer at a time (ingestion and re-indexing DAGs may overlap)."""
    root = Path(index_dir)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as f:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"another index writer holds {root / '.lock'}") from None
                time.sleep(1.0)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _settings(settings: Settings | None) -> Settings:
    return settings or get_settings()


def work_dir(settings: Settings | None = None) -> Path:
    """Downloads and unpacked archives: FLICKR8K_WORK_DIR, else `downloads/` beside INDEX_DIR."""
    s = _settings(settings)
    return Path(os.environ.get("FLICKR8K_WORK_DIR") or Path(s.index_dir).resolve().parent / "downloads")


# --- ingestion -----------------------------------------------------------------------------
def fetch_archives(source: str | None = None, text_source: str | None = None,
                   images_sha256: str | None = None, text_sha256: str | None = None,
                   images_size: int | None = None, text_size: int | None = None,
                   settings: Settings | None = None) -> dict:
    """Resolve the source. A folder is used as is; zips (paths or URLs) are downloaded (resuming a
    partial `.part`) and checked: size and sha256 when given, and always every member's CRC. A
    downloaded archive that fails a check is deleted, so that a retry downloads it afresh.

    Defaults: FLICKR8K_SOURCE / FLICKR8K_TEXT_SOURCE / FLICKR8K_IMAGES_SHA256 / FLICKR8K_TEXT_SHA256;
    with no FLICKR8K_SOURCE configured, the public Flickr8k_Dataset.zip and Flickr8k_text.zip."""
    from flickr8k.sources import DEFAULT_IMAGES_URL, download
    from flickr8k.format import SourceError

    s = _settings(settings)
    env = os.environ.get
    # FLICKR8K_SOURCE when configured (environment or .env) and not empty, else the public archives
    configured = s.flickr8k_source if "flickr8k_source" in s.model_fields_set else ""
    source = source or configured.strip() or DEFAULT_IMAGES_URL
    text_source = text_source or env("FLICKR8K_TEXT_SOURCE")
    images_sha256 = (images_sha256 or env("FLICKR8K_IMAGES_SHA256") or "").strip().lower() or None
    text_sha256 = (text_sha256 or env("FLICKR8K_TEXT_SHA256") or "").strip().lower() or None
    if "://" not in source and Path(source).is_dir():
        return {"kind": "folder", "folder": str(Path(source).resolve())}
    if not text_source:
        text_source = source.replace("Flickr8k_Dataset.zip", "Flickr8k_text.zip")
        if text_source == source:
            raise SourceError(f"{source}: give the Flickr8k_text.zip location too")
    cache = work_dir(s)
    out: dict = {"kind": "zip"}
    names = {role: Path(loc.split("?", 1)[0]).name or f"{role}.zip"
             for role, loc in (("images", source), ("text", text_source))}
    if names["images"] == names["text"]:  # e.g. two ".../download" links: keep both files
        names = {role: f"{role}-{name}" for role, name in names.items()}
    for role, loc, sha, size in (("images", source, images_sha256, images_size),
                                 ("text", text_source, text_sha256, text_size)):
        if "://" in loc:
            name = names[role]
            t0 = time.perf_counter()
            path = download(loc, cache / name, expected_size=size, sha256=sha)
            log.info("%s archive %s ready in %.1f s", role, path, time.perf_counter() - t0)
        else:
            path = Path(loc)
            if not path.is_file():
                raise SourceError(f"source not found: {loc}")
        digest = sha256_file(path)
        if sha and digest != sha:
            problem = f"sha256 {digest} does not match the expected {sha}"
        elif size is not None and path.stat().st_size != size:
            problem = f"{path.stat().st_size} bytes, expected {size}"
        else:
            problem = _zip_problem(path)
        if problem:
            if "://" in loc:  # our download: remove it so that the task's retry fetches it again
                path.unlink(missing_ok=True)
            raise SourceError(f"{loc}: {problem}")
        out[f"{role}_zip"] = str(path.resolve())
        out[f"{role}_sha256"] = digest
        out[f"{role}_bytes"] = path.stat().st_size
    return out


def _zip_problem(path: Path) -> str | None:
    """None when every member's CRC checks out, else what is wrong."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        return f"not a readable zip archive ({exc})"
    return f"member {bad} is corrupt (CRC mismatch)" if bad else None


def unpack(fetched: dict, settings: Settings | None = None) -> dict:
    """Unpack checked zips into `<work>/unpacked/flickr8k-<hashes>/` in the folder layout
    (Images/*.jpg + *.txt). Every member's CRC is checked on read; the folder appears only when
    complete (temp dir + rename), so a rerun with the same archives finds it and does nothing."""
    if fetched["kind"] == "folder":
        return {"folder": fetched["folder"], "unpacked": False}
    from flickr8k.sources import open_source

    root = work_dir(settings) / "unpacked"
    root.mkdir(parents=True, exist_ok=True)
    name = f"flickr8k-{fetched['images_sha256'][:16]}-{fetched['text_sha256'][:16]}"
    dest = root / name
    for stale in root.glob(".tmp-*"):  # a killed earlier run
        shutil.rmtree(stale, ignore_errors=True)
    if (dest / UNPACK_MARKER).is_file():
        info = json.loads((dest / UNPACK_MARKER).read_text())
        return {"folder": str(dest), "unpacked": False, **info}
    src = open_source(fetched["images_zip"], fetched["text_zip"], cache_dir=root)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
    try:
        (tmp / "Images").mkdir()
        for img in src.image_names():
            (tmp / "Images" / img).write_bytes(src.read_image(img))  # zipfile checks the CRC
        for txt, reader in src.texts.items():
            (tmp / txt).write_bytes(reader())
        info = {"images": len(src.images), "texts": len(src.texts)}
        (tmp / UNPACK_MARKER).write_text(json.dumps(info))
        if dest.exists():  # an incomplete folder without the marker
            shutil.rmtree(dest)
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in root.glob("flickr8k-*"):  # unpacked copies of older archives
        if old != dest:
            shutil.rmtree(old, ignore_errors=True)
    return {"folder": str(dest), "unpacked": True, **info}


def upload(folder: str, split: str = "all", limit: int | None = None,
           settings: Settings | None = None) -> dict:
    """Images -> <prefix>images/, captions and splits -> <prefix>text/; only changed content."""
    from indexer.ingest import ingest
    from flickr8k.sources import open_source
    from objectstore import open_store

    s = _settings(settings)
    store = with_retries(open_store, s)
    src = open_source(folder)
    t0 = time.perf_counter()
    report = with_retries(ingest, src, store, s.images_prefix, s.text_prefix, split=split,
                          limit=limit, progress=False)
    objects = with_retries(lambda: sum(1 for _ in store.list(s.images_prefix)))
    return {**report.__dict__, "images_in_store": objects, "seconds": round(time.perf_counter() - t0, 2)}


# --- indexing ------------------------------------------------------------------------------
def _model_id(model_path: str) -> str:
    from encoder import read_card

    return read_card(model_path)["model_id"]


def find_changes(settings: Settings | None = None) -> dict:
    """What an update would do, without loading the model: new/changed objects, removed ones,
    whether the model differs from the index's. `changed` is true when there is any work."""
    from indexer.repository import IndexRepository
    from indexer.pipeline import status
    from objectstore import open_store

    s = _settings(settings)
    store = with_retries(open_store, s)
    repo = IndexRepository(s.index_dir)
    st = with_retries(status, store, repo, s.images_prefix, _model_id(s.model_path))
    no_index = st["version"] is None or "error" in st
    model_changed = not no_index and not st.get("model_matches", True)
    st["model_changed"] = model_changed
    st["changed"] = bool(no_index or model_changed or st["not_indexed"] or st["removed_from_store"])
    return st


def publish_index(settings: Settings | None = None, force_rebuild: bool = False) -> dict:
    """Embed what the current index lacks and publish a new version (a rebuild when the model
    changed or there is no usable index). Nothing changed -> no model load, no new version.
    Holds the index lock; removes temp folders a killed earlier publish left behind."""
    from indexer import pipeline
    from indexer.repository import IndexRepository
    from objectstore import open_store

    s = _settings(settings)
    with index_lock(s.index_dir):
        repo = IndexRepository(s.index_dir)
        if repo.versions_dir.is_dir():
            for stale in repo.versions_dir.glob(".tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
        if not force_rebuild:
            changes = find_changes(s)
            if not changes["changed"]:
                return {"action": "unchanged", "version": changes["version"],
                        "count": changes["count"], "added": 0, "removed": 0, "failed": {},
                        "seconds": 0.0, "versions": len(repo.list_versions())}
        from encoder import Encoder

        encoder = Encoder.from_settings(s)
        store = with_retries(open_store, s)
        fn = pipeline.rebuild if force_rebuild else pipeline.update
        report = with_retries(fn, store, encoder, repo, s.images_prefix,
                              batch_size=s.embed_batch_size, progress=False)
        return {**report.to_dict(), "versions": len(repo.list_versions())}


def prune_versions(keep: int | None = None, settings: Settings | None = None) -> dict:
    """Delete index versions beyond the newest `keep` (INDEX_KEEP_VERSIONS, default 5)."""
    from indexer.repository import IndexRepository

    s = _settings(settings)
    keep = keep if keep is not None else int(os.environ.get("INDEX_KEEP_VERSIONS") or 5)
    with index_lock(s.index_dir):
        repo = IndexRepository(s.index_dir)
        removed = repo.prune(keep)
        return {"removed": removed, "versions": len(repo.list_versions()),
                "current": repo.current_version()}
