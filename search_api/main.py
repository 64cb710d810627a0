"""The FastAPI application: loads the model and the CURRENT index once, then serves queries."""
from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI

from search_api import errors
from core.settings import Settings, get_settings
from search_api.metrics import Metrics, MetricsMiddleware
from search_api.middleware import BodyLimitMiddleware, SecurityHeadersMiddleware
from search_api.routes import search, system, web
from search_api.state import ServiceState

log = logging.getLogger(__name__)

# multipart framing around an upload of max_upload_bytes
BODY_SLACK = 64 * 1024


def build_state(settings: Settings) -> ServiceState:
    """Load the model (FileNotFoundError / ValueError when it is missing or unreadable) and the
    CURRENT index if there is one. The object store may be down: the service still starts."""
    from encoder import Encoder
    from indexer.repository import IndexRepository
    from objectstore import open_store

    encoder = Encoder.from_settings(settings)
    encoder.warmup()  # export/load the runtime sessions now, not on the first request
    state = ServiceState(encoder, IndexRepository(settings.index_dir), None,
                         store_factory=lambda: open_store(settings),
                         store_retry_s=settings.store_retry_s,
                         thumbnail_cache_items=settings.thumbnail_cache_items,
                         text_batch_max=settings.text_batch_max)
    if state.get_store() is None:  # search still works without the store; /health says degraded
        log.error("object store not reachable at start (retrying every %.0f s): %s",
                  settings.store_retry_s, state.store_error)
    state.reload()
    return state


def _document_limits(app: FastAPI, settings: Settings) -> None:
    """Write the configured limits into the OpenAPI schema (they are settings, not constants)."""
    original = app.openapi
    done = False

    def openapi():
        nonlocal done
        if done and app.openapi_schema:
            return app.openapi_schema
        app.openapi_schema = None
        schema = original()  # a fresh copy (FastAPI caches it in app.openapi_schema)
        service = getattr(app.state, "service", None)
        dim = service.encoder.dim if service is not None else None

        def walk(node):
            if isinstance(node, dict):
                props = node.get("properties")
                if isinstance(props, dict):
                    if isinstance(props.get("top_k"), dict):
                        props["top_k"]["maximum"] = settings.max_top_k
                    if isinstance(props.get("text"), dict):
                        props["text"]["maxLength"] = settings.max_query_chars
                    emb = props.get("embedding")
                    if dim and isinstance(emb, dict) and emb.get("type") == "array":
                        emb["minItems"] = emb["maxItems"] = dim
                        emb["description"] = f"the model's dimension: {dim} numbers"
                    q = props.get("queries")
                    if isinstance(q, dict) and q.get("type") == "array":
                        q["maxItems"] = settings.max_batch_queries
                        q["items"] = {"type": "string", "minLength": 1, "pattern": r"\S",
                                      "maxLength": settings.max_query_chars}
                for v in node.values():
                    walk(v)
            elif isinstance(node, list):
                for v in node:
                    walk(v)

        walk(schema.get("paths", {}))
        if not settings.api_key:  # nothing is guarded: do not advertise a key
            schema.get("components", {}).pop("securitySchemes", None)
            for item in schema.get("paths", {}).values():
                for op in item.values():
                    if isinstance(op, dict):
                        op.pop("security", None)
                        op.get("responses", {}).pop("401", None)
        app.openapi_schema = schema
        done = service is not None  # the model's dimension is known once it is loaded
        return schema

    app.openapi = openapi


def create_app(settings: Settings | None = None, state: ServiceState | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if getattr(app.state, "service", None) is None:
            app.state.service = build_state(settings)
        app.state.service.observe_stage = \
            lambda stage, s: app.state.metrics.stage_seconds.labels(stage).observe(s)
        app.state.service.start_watcher(settings.reload_interval_s)
        yield
        app.state.service.stop()

    app = FastAPI(
        title="Flickr8k text-to-image search", version="0.2.0", lifespan=lifespan,
        description="Find stored images by describing them, or by showing a similar one. "
                    "The web page is at `/`, Prometheus metrics at `/metrics`.")
    app.state.settings = settings
    app.state.service = state
    metrics = Metrics(lambda: app.state.service)
    app.state.metrics = metrics
    if state is not None:
        state.observe_stage = lambda stage, s: metrics.stage_seconds.labels(stage).observe(s)

    errors.install(app)
    # outermost first at request time: metrics -> security headers -> body limit -> routes
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_upload_bytes + BODY_SLACK)
    app.add_middleware(SecurityHeadersMiddleware)
    app.add_middleware(MetricsMiddleware, metrics=metrics)

    app.include_router(web.router)
    app.include_router(system.router)
    app.include_router(search.router)
    web.mount_static(app)
    _document_limits(app, settings)
    return app
