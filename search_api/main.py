"""The FastAPI application: loads the model and the CURRENT index once, then serves queries."""
from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from importlib.metadata import version

from fastapi import FastAPI

from search_api import errors
from core.settings import Settings, get_settings
from search_api.metrics import Metrics, MetricsMiddleware
from search_api.middleware import BodyGuardMiddleware, HeadAsGetMiddleware, \
    SecurityHeadersMiddleware
from search_api.routes import search, system, web
from search_api.schemas import bodies
from search_api.state import ServiceState

log = logging.getLogger(__name__)

# multipart framing around an upload of max_upload_bytes
BODY_SLACK = 64 * 1024


def build_state(settings: Settings) -> ServiceState:
    """Load the model (FileNotFoundError / ValueError when it is missing or unreadable) and the
    CURRENT index if there is one (Milvus: resolve the model's alias). The object store and
    Milvus may be down: the service still starts, degraded."""
    from encoder import Encoder
    from indexer.vector_index import open_index
    from objectstore import open_store

    encoder = Encoder.from_settings(settings)
    encoder.warmup()  # export/load the runtime sessions now, not on the first request
    index = open_index(settings)  # FAISS: versions loaded here; Milvus: nothing held locally
    state = ServiceState(encoder, None if index.remote else index.repo, None,
                         store_factory=lambda: open_store(settings),
                         store_retry_s=settings.store_retry_s,
                         thumbnail_cache_items=settings.thumbnail_cache_items,
                         text_batch_max=settings.text_batch_max,
                         remote_index=index if index.remote else None,
                         refresh_s=settings.milvus_refresh_s)
    if state.get_store() is None:  # search still works without the store; /health says degraded
        log.error("object store not reachable at start (retrying every %.0f s): %s",
                  settings.store_retry_s, state.store_error)
    state.reload()
    return state


def _openapi_security(app: FastAPI, settings: Settings) -> None:
    """Without API_KEY nothing is guarded: do not advertise a key in the schema."""
    if settings.api_key:
        return
    original = app.openapi

    def openapi():
        if app.openapi_schema:
            return app.openapi_schema
        schema = original()
        schema.get("components", {}).pop("securitySchemes", None)
        for item in schema.get("paths", {}).values():
            for op in item.values():
                if isinstance(op, dict):
                    op.pop("security", None)
                    op.get("responses", {}).pop("401", None)
        return schema

    app.openapi = openapi


def create_app(settings: Settings | None = None, state: ServiceState | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if app.state.service is None:
            app.state.service = build_state(settings)
        app.state.service.observe_stage = \
            lambda stage, s: app.state.metrics.stage_seconds.labels(stage).observe(s)
        app.state.service.start_watcher(settings.reload_interval_s)
        yield
        app.state.service.stop()

    app = FastAPI(
        title="Flickr8k text-to-image search", version=version("flickr-search"), lifespan=lifespan,
        description="Find stored images by describing them, or by showing a similar one. "
                    "The web page is at `/`, Prometheus metrics at `/metrics`.")
    app.state.settings = settings
    app.state.service = state
    metrics = Metrics(lambda: app.state.service)
    app.state.metrics = metrics
    if state is not None:
        state.observe_stage = lambda stage, s: metrics.stage_seconds.labels(stage).observe(s)

    errors.install(app)
    # outermost first at request time: metrics -> security headers -> HEAD as GET ->
    # body size and time -> routes
    app.add_middleware(BodyGuardMiddleware, limit=settings.max_upload_bytes + BODY_SLACK,
                       timeout=settings.client_timeout_s)
    app.add_middleware(HeadAsGetMiddleware)
    app.add_middleware(SecurityHeadersMiddleware)
    app.add_middleware(MetricsMiddleware, metrics=metrics)

    app.include_router(web.router)
    app.include_router(system.router)
    dim = state.encoder.dim if state is not None else None  # known when the caller loaded it
    app.include_router(search.build_router(settings, bodies(settings, dim)))
    web.mount_static(app)
    _openapi_security(app, settings)
    return app
