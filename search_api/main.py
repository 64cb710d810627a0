"""The FastAPI application: loads the model and the CURRENT index once, then serves queries."""
from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from search_api.config import ApiSettings, get_api_settings
from search_api.routes import search, system
from search_api.state import ServiceState

log = logging.getLogger(__name__)


def build_state(settings: ApiSettings) -> ServiceState:
    from encoder import Encoder
    from indexer.index import IndexRepository
    from indexer.store import StoreError, open_store

    encoder = Encoder.from_checkpoint(settings.model_path, settings.device)
    try:
        store = open_store(settings)
    except StoreError as exc:  # search still works without the store; /health says degraded
        log.error("object store not reachable at start: %s", exc)
        store = None
    state = ServiceState(encoder, IndexRepository(settings.index_dir), store)
    state.reload()
    return state


def create_app(settings: ApiSettings | None = None, state: ServiceState | None = None) -> FastAPI:
    settings = settings or get_api_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if getattr(app.state, "service", None) is None:
            app.state.service = build_state(settings)
        app.state.service.start_watcher(settings.reload_interval_s)
        yield
        app.state.service.stop()

    app = FastAPI(title="Flickr8k text-to-image search", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.service = state

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None:
            try:
                too_big = int(length) > settings.max_upload_bytes + 64 * 1024
            except ValueError:
                return JSONResponse({"detail": "invalid Content-Length"}, status_code=400)
            if too_big:
                return JSONResponse({"detail": f"request body larger than "
                                               f"{settings.max_upload_bytes} bytes"},
                                    status_code=413)
        return await call_next(request)

    app.include_router(system.router)
    app.include_router(search.router)
    return app
