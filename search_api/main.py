"""The FastAPI application: builds the search service from Settings (the model, the index any
backend publishes, the object store), then serves queries."""
from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from importlib.metadata import version

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool

from core.settings import Settings, get_settings
from search_api import errors, text_queries
from search_api.metrics import Metrics, MetricsMiddleware
from search_api.middleware import BodyGuardMiddleware, HeadAsGetMiddleware, \
    SecurityHeadersMiddleware
from search_api.routes import duplicates, explain, search, system, web
from search_api.schemas import bodies
from search_api.search_service import SearchService

log = logging.getLogger(__name__)


def build_service(settings: Settings, encoder=None, index=None, store=None,
                  eager_image_tower: bool | None = None) -> SearchService:
    """The search service of these settings: the model (`encoder.serving.query_encoder`: the
    serving bundle's towers without torch, or eager PyTorch when the runtime settings say so;
    FileNotFoundError / ValueError when it is missing, unreadable or its bundle is stale;
    `encoder` when already loaded; the text tower is loaded now, the image tower on first use
    unless `eager_image_tower`, default IMAGE_TOWER_AT_START), the index (`open_index(settings)`
    unless given) with its published version opened if there is one, and the object store
    (`store`, else opened from the settings, retried while it is down). The store and a remote
    index may be down: the service still starts, degraded."""
    import faiss

    from encoder.serving import ServingEncoder, query_encoder
    from indexer.duplicates import report_path
    from indexer.vector_index import open_index
    from objectstore import open_store
    from search_api.encoders import QueryEncoders
    from search_api.index_holder import IndexHolder
    from search_api.search_service import StageTimes
    from search_api.stored_images import StoredImages

    if eager_image_tower is None:
        eager_image_tower = settings.image_tower_at_start
    if encoder is None:
        encoder = query_encoder(settings)
        # open the runtime sessions now, not on the first request (the bundle's image tower:
        # on first image use; eager PyTorch exports both graphs now)
        encoder.warmup(image=eager_image_tower or not isinstance(encoder, ServingEncoder))
    index = index if index is not None else open_index(settings)
    # single small queries: one thread beats two (bench/faiss_scale.py); FAISS also serves the
    # query-side work of the other backends' tests
    faiss.omp_set_num_threads(1)
    stages = StageTimes()
    images = StoredImages(settings.limits, store,
                          store_factory=None if store is not None else lambda: open_store(settings),
                          store_retry_s=settings.store_retry_s,
                          thumbnail_cache_items=settings.thumbnail_cache_items, observe=stages)
    # a remote index is asked which version it publishes often (a call, not a load)
    watch_s = settings.milvus_refresh_s if index.remote else settings.reload_interval_s
    holder = IndexHolder(index, encoder.model_id, encoder.scoring.index_dim, watch_s=watch_s,
                         observe=stages, on_swap=images.clear_thumbnails)
    service = SearchService(QueryEncoders(encoder, settings.text_batch_max, observe=stages),
                            holder, images, stages, settings.explain_cache_items,
                            duplicates_report=str(report_path(settings.index_dir)),
                            dedupe_depth=settings.max_offset + settings.max_top_k)
    if images.get_store() is None:  # search still works without the store; /health says degraded
        log.error("object store not reachable at start (retrying every %.0f s): %s",
                  settings.store_retry_s, images.store_error)
    holder.reload()
    return service


def warm_up_query_hints() -> None:
    """Load the query-hints parser's tables (a few seconds, once per process) before serving,
    so that no query waits for them."""
    try:
        text_queries.warm_up()
    except Exception:  # the first query tries again (and answers the error)
        log.exception("query hints: warm-up failed")


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


def create_app(settings: Settings | None = None,
               service: SearchService | None = None) -> FastAPI:
    """The app serving `service` (built from the settings at startup when not given)."""
    settings = settings or get_settings()
    limits = settings.limits

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if app.state.service is None:
            app.state.service = build_service(settings)
        app.state.service.stages.sink = metrics.observe_stage
        app.state.service.start()
        await run_in_threadpool(warm_up_query_hints)
        yield
        app.state.service.stop()

    app = FastAPI(
        title="Flickr8k text-to-image search", version=version("flickr-search"), lifespan=lifespan,
        description="Find stored images by describing them, or by showing a similar one. "
                    "The web page is at `/`, Prometheus metrics at `/metrics`.")
    app.state.settings = settings
    app.state.limits = limits
    app.state.service = service
    metrics = Metrics(lambda: app.state.service)
    app.state.metrics = metrics
    if service is not None:
        service.stages.sink = metrics.observe_stage

    errors.install(app)
    # outermost first at request time: metrics -> security headers -> HEAD as GET ->
    # body size and time -> routes
    app.add_middleware(BodyGuardMiddleware,
                       limit=limits.max_upload_bytes + limits.UPLOAD_BODY_SLACK,
                       timeout=limits.client_timeout_s)
    app.add_middleware(HeadAsGetMiddleware)
    app.add_middleware(SecurityHeadersMiddleware)
    app.add_middleware(MetricsMiddleware, metrics=metrics)

    # known when the service is built before the app
    dim = service.encoders.dim if service is not None else None
    has_scale = service.match_scale is not None if service is not None else None
    # the search routes first: a request is matched against the routes in order (no two
    # routes share a path), and searches are most of the traffic
    app.include_router(search.build_router(settings, bodies(limits, dim, has_scale)))
    app.include_router(web.router)
    app.include_router(system.router)
    app.include_router(duplicates.router)
    app.include_router(explain.build_router(settings))
    web.mount_static(app)
    _openapi_security(app, settings)
    return app
