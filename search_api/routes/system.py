"""Health, image bytes (and thumbnails), a photo's metadata, facets, metrics, and admin
routes."""
from __future__ import annotations

import mimetypes
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Response
from fastapi.concurrency import run_in_threadpool
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from core.settings import RequestLimits
from encoder.image_formats import BROWSER_TYPES, is_image_key
from encoder.preprocessing import BadImage
from objectstore import InvalidKey, validate_key
from search_api.deps import ApiKeyDep, MetricsDep, ServiceDep, SettingsDep
from search_api.errors import responses
from search_api.images import ImageTooLarge
from search_api.index_holder import NoIndex
from search_api.json_response import json_response
from search_api.schemas import FacetsOut, HealthOut, PhotoInfoOut, ReloadOut

INFO_COUNTS = ("with_date", "with_position", "with_place")

router = APIRouter()


@router.get("/health", response_model=HealthOut)
async def health(service: ServiceDep, settings: SettingsDep):
    """`ok` when an index is served and the object store answers, else `degraded` (search by
    text keeps working while the store is down; only image bytes need it). A remote index
    (Milvus) is asked now: the alias, its collection and count; not answering -> `degraded`."""
    store = await run_in_threadpool(service.images.check_store)
    holder = service.index
    await run_in_threadpool(holder.check_now)
    described = await run_in_threadpool(holder.describe)  # Milvus: alias and collection
    view = holder.current
    try:
        counts = await service.info_counts()
    except NoIndex:  # the index stopped answering just now: degraded, counted as nothing
        counts = {}
    ok = view is not None and store == "ok" and not holder.down
    return HealthOut(status="ok" if ok else "degraded", model_id=service.model_id,
                     index_version=view.version if view else None,
                     vector_count=view.count if view else 0, store=store,
                     last_reload_error=holder.last_error,
                     index_loaded_at=holder.loaded_at,
                     api_key_required=bool(settings.api_key),
                     index_backend=holder.backend,
                     index_alias=described.get("alias"),
                     index_collection=described.get("collection"),
                     **{k: int(counts.get(k, 0)) for k in INFO_COUNTS})


@router.get("/facets", response_model=FacetsOut, responses=responses(422, 503))
async def get_facets(service: ServiceDep,
                     limit: Annotated[int, Query(
                         ge=1, le=RequestLimits.MAX_FACET_VALUES,
                         description="values per field, most common first")] = 20):
    """What the served index holds, for a filter bar: the most common folders, countries,
    cities, cameras and years, each with how many photos have it."""
    return json_response(await service.facets(limit))


@router.get("/images/{key:path}/info", response_model=PhotoInfoOut,
            responses=responses(404, 503))
async def get_image_info(key: str, service: ServiceDep):
    """The metadata stored with an indexed photo: when it was taken (and from where that date
    comes), camera, GPS position, place, size, orientation, bytes, content type, folder.
    404 for a key the served index version does not hold (or holds without metadata: an
    index made before metadata existed). (Declared before /images/{key}:
    that route's path would take the "/info" too.)"""
    try:
        validate_key(key)
    except InvalidKey:  # nothing can be stored (or indexed) there: the index is not asked
        raise HTTPException(404, "no such image (invalid image key)") from None
    if not is_image_key(key):
        raise HTTPException(404, f"no indexed image {key[:200]!r} (not a photo's file name)")
    info = await service.photo_info(key)
    if info is None:
        raise HTTPException(404, f"no metadata for {key[:200]!r}: not in the served index "
                                 "version, or indexed without metadata")
    return json_response({"key": key, **info})


@router.get("/images/{key:path}", name="get_image",
            responses={200: {"content": {"image/jpeg": {}, "image/png": {}}},
                       **responses(404, 422, 503)})
async def get_image(key: str, service: ServiceDep, settings: SettingsDep,
                    size: Annotated[int | None, Query(
                        ge=32, le=RequestLimits.MAX_THUMBNAIL_SIDE,
                        description="a JPEG thumbnail at most this many pixels wide and high, "
                                    "instead of the original")] = None):
    """The stored image bytes (or a thumbnail). Keys must lie under the images prefix."""
    try:
        validate_key(key)
    except InvalidKey:  # '..', absolute paths, control characters: nothing can be stored there
        raise HTTPException(404, "no such image (invalid image key)") from None
    if not key.startswith(settings.images_prefix):
        raise HTTPException(404, f"no image {key[:200]!r} (images live under "
                                 f"{settings.images_prefix})")
    if not is_image_key(key):  # with IMAGES_PREFIX= the bucket may hold other files too
        raise HTTPException(404, f"no image {key[:200]!r} (not a photo's file name)")
    headers = {"Cache-Control": "public, max-age=3600"}
    if size is not None:
        try:  # bounded like uploads: a few decodes at once, within a memory budget
            thumb = await service.images.thumbnail(key, size)
        except (BadImage, ImageTooLarge) as exc:
            raise HTTPException(422, f"stored object {key[:200]!r} is not a usable image: "
                                     f"{str(exc)[:200]}") from None
        return Response(thumb, media_type="image/jpeg", headers=headers)
    data = await run_in_threadpool(service.images.fetch, key)
    ctype = mimetypes.guess_type(key)[0] or "application/octet-stream"
    if ctype not in BROWSER_TYPES:  # never serve e.g. SVG/HTML from our origin inline
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
async def admin_reload(service: ServiceDep):
    """Check now for a newly published index version and swap it in. A version that cannot be
    used (corrupt, or built by another model) is refused; the served one stays (`error` says
    why)."""
    return await run_in_threadpool(service.index.reload)
