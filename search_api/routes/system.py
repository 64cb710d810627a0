"""Health, image bytes (and thumbnails), metrics, and admin routes."""
from __future__ import annotations

import mimetypes
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Response
from fastapi.concurrency import run_in_threadpool
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from encoder.preprocessing import BadImage
from objectstore import InvalidKey, ObjectNotFound, StoreError, validate_key
from search_api.deps import ApiKeyDep, MetricsDep, SettingsDep, StateDep
from search_api.errors import responses
from search_api.images import SAFE_IMAGE_TYPES, ImageTooLarge, decode_gated, make_thumbnail
from search_api.schemas import HealthOut, ReloadOut

router = APIRouter()


@router.get("/health", response_model=HealthOut)
async def health(state: StateDep, settings: SettingsDep):
    """`ok` when an index is served and the object store answers, else `degraded` (search by
    text keeps working while the store is down; only image bytes need it). On Milvus: the
    alias, its collection and count, asked now; Milvus not answering -> `degraded`."""
    store_obj = await run_in_threadpool(state.get_store)
    if store_obj is None:
        store = f"error: {state.store_error}" if state.store_error else "not configured"
    else:
        try:
            await run_in_threadpool(store_obj.check)
            state.mark_store(True)
            store = "ok"
        except StoreError as exc:
            state.mark_store(False, str(exc))  # logged in full; kept without server paths
            store = f"error: {state.store_error}"
    if state.remote:  # Milvus: ask it now (alias -> collection, count)
        await run_in_threadpool(state.reload)
    index = state.index
    ok = index is not None and store == "ok" and not state.index_down
    return HealthOut(status="ok" if ok else "degraded", model_id=state.encoder.model_id,
                     index_version=index.version if index else None,
                     vector_count=index.count if index else 0, store=store,
                     last_reload_error=state.last_reload_error,
                     index_loaded_at=state.loaded_at,
                     api_key_required=bool(settings.api_key),
                     index_backend=state.backend,
                     index_alias=state.remote_index.alias(state.encoder.model_id)
                     if state.remote else None,
                     index_collection=index.version if state.remote and index else None)


def _fetch(state, metrics, key: str) -> bytes:
    store = state.get_store()
    if store is None:
        raise HTTPException(503, "object store unavailable: "
                                 f"{state.store_error or 'not configured'}")
    try:
        with metrics.stage("image_fetch"):
            data = store.get(key)
    except ObjectNotFound:
        state.mark_store(True)
        raise HTTPException(404, f"no image {key[:200]!r}") from None
    except InvalidKey:
        raise HTTPException(404, "no such image (invalid image key)") from None
    except StoreError as exc:
        state.mark_store(False, str(exc))
        raise HTTPException(503, f"object store unavailable: {state.store_error}") from None
    state.mark_store(True)
    return data


@router.get("/images/{key:path}", name="get_image",
            responses={200: {"content": {"image/jpeg": {}, "image/png": {}}},
                       **responses(404, 422, 503)})
async def get_image(key: str, state: StateDep, settings: SettingsDep, metrics: MetricsDep,
                    size: Annotated[int | None, Query(
                        ge=32, le=1024, description="a JPEG thumbnail at most this many pixels "
                                                    "wide and high, instead of the original")] = None):
    """The stored image bytes (or a thumbnail). Keys must lie under the images prefix."""
    try:
        validate_key(key)
    except InvalidKey:  # '..', absolute paths, control characters: nothing can be stored there
        raise HTTPException(404, "no such image (invalid image key)") from None
    if not key.startswith(settings.images_prefix):
        raise HTTPException(404, f"no image {key[:200]!r} (images live under "
                                 f"{settings.images_prefix})")
    headers = {"Cache-Control": "public, max-age=3600"}
    if size is not None:
        cache = state.thumbnails
        cached = cache.get((key, size))
        if cached is None:
            data = await run_in_threadpool(_fetch, state, metrics, key)
            gate = state.decode_gate(settings.max_concurrent_decodes, settings.decode_memory_mb)
            try:  # bounded like uploads: a few decodes at once, within a memory budget
                cached = await decode_gated(
                    gate, data, settings.max_image_pixels,
                    lambda: metrics.timed("thumbnail", make_thumbnail, data, size,
                                          settings.max_image_pixels), min_side=size)
            except (BadImage, ImageTooLarge) as exc:
                raise HTTPException(422, f"stored object {key[:200]!r} is not a usable image: "
                                         f"{str(exc)[:200]}") from None
            cache.put((key, size), cached)
        return Response(cached, media_type="image/jpeg", headers=headers)
    data = await run_in_threadpool(_fetch, state, metrics, key)
    ctype = mimetypes.guess_type(key)[0] or "application/octet-stream"
    if ctype not in SAFE_IMAGE_TYPES:  # never serve e.g. SVG/HTML from our origin inline
        ctype = "application/octet-stream"
        headers["Content-Disposition"] = "attachment"
    return Response(data, media_type=ctype, headers=headers)


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {}},
                             "description": "Prometheus text exposition format"}})
async def metrics_route(metrics: MetricsDep):
    """Prometheus metrics: request latency per route, time per stage, served index."""
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.post("/admin/reload", dependencies=[ApiKeyDep], response_model=ReloadOut,
             responses=responses(401))
async def admin_reload(state: StateDep):
    """Check now for a newly published index version and swap it in. A version that cannot be
    used (corrupt, or built by another model) is refused; the served one stays (`error` says
    why)."""
    return await run_in_threadpool(state.reload)
