"""Helpers of the search API tests: build an indexed service, serve it on loopback, republish
index versions. Hostile images live in search_api.testing (the benchmarks use them too)."""
from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.settings import Settings
from flickr8k.sources import open_source
from indexer import pipeline
from indexer.faiss_index import FaissIndex
from indexer.index_policy import new_flat_index
from indexer.ingest import ingest
from indexer.repository import IndexRepository
from indexer.vector_index import open_index
from objectstore import LocalStore
from deploy.ports import free_port
from search_api.main import build_service as build_search_service
from search_api.main import create_app
from search_api.search_service import SearchService

PREFIX = Settings.model_fields["images_prefix"].default


@dataclass
class Service:
    app: object
    service: SearchService
    settings: Settings
    repo: IndexRepository
    store: object
    root: Path


def build_service(tmp: Path, flickr_root: Path, encoder, split: str = "dev", store=None,
                  publish: bool = True, **settings_kw) -> Service:
    """Ingest the tiny dataset into a store, build and publish a FAISS index (unless `publish`
    is False: an empty index directory), make the app. The one way tests build a service."""
    store = store or LocalStore(tmp / "store", "b")
    ingest(open_source(str(flickr_root)), store, split=split, progress=False)
    repo = IndexRepository(tmp / "index")
    if publish:
        pipeline.rebuild(store, encoder, FaissIndex(repo), PREFIX, progress=False)
    settings = Settings(index_dir=str(tmp / "index"), **{"reload_interval_s": 0, **settings_kw})
    service = build_search_service(settings, encoder=encoder, index=open_index(settings),
                                   store=store)
    return Service(create_app(settings, service), service, settings, repo, store, tmp)


def republish(repo: IndexRepository, keep: slice | list[int] | None = None,
              model_id: str | None = None, base: str | None = None) -> tuple[str, set[str]]:
    """Publish a new version made of some rows of version `base` (default: the current one),
    without re-embedding anything. Returns (version, its keys)."""
    cur = repo.load(base)
    rows = list(range(cur.count))
    if isinstance(keep, slice):
        rows = rows[keep]
    elif keep is not None:
        rows = list(keep)
    vecs = cur.vectors_of_ids(cur.ids[np.asarray(rows, np.int64)])
    index = new_flat_index(cur.index.d)
    ids = cur.ids[rows]
    index.add_with_ids(vecs, ids)
    keys = [cur.keys[i] for i in rows]
    version = repo.commit_version(index, ids, keys, [cur.etags[i] for i in rows],
                           model_id or cur.model_id)
    return version, set(keys)


@contextlib.contextmanager
def serve(app, port: int | None = None):
    """Run the app under a real uvicorn server in a thread; yields the base URL."""
    import uvicorn

    port = port or free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                            lifespan="on", timeout_keep_alive=30)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
