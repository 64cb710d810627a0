"""Health, image bytes, and admin routes."""
from __future__ import annotations

import mimetypes

from fastapi import APIRouter, HTTPException, Response
from fastapi.concurrency import run_in_threadpool

from indexer.store import InvalidKey, ObjectNotFound, StoreError, validate_key
from search_api.deps import ApiKeyDep, SettingsDep, StateDep
from search_api.schemas import HealthOut

router = APIRouter()


@router.get("/health", response_model=HealthOut)
async def health(state: StateDep):
    store = "ok"
    if state.store is None:
        store = "not configured"
    else:
        try:
            await run_in_threadpool(state.store.check)
        except StoreError as exc:
            store = f"error: {exc}"
    index = state.index
    ok = index is not None and store == "ok"
    return HealthOut(status="ok" if ok else "degraded", model_id=state.encoder.model_id,
                     index_version=index.version if index else None,
                     vector_count=index.count if index else 0, store=store,
                     last_reload_error=state.last_reload_error)


@router.get("/images/{key:path}", name="get_image",
            responses={200: {"content": {"image/jpeg": {}}}})
async def get_image(key: str, state: StateDep, settings: SettingsDep):
    try:
        validate_key(key)
    except InvalidKey:
        raise HTTPException(400, "invalid image key") from None
    if not key.startswith(settings.images_prefix):
        raise HTTPException(404, f"no image {key!r} (images live under {settings.images_prefix})")
    if state.store is None:
        raise HTTPException(503, "object store not configured")
    try:
        data = await run_in_threadpool(state.store.get, key)
    except ObjectNotFound:
        raise HTTPException(404, f"no image {key!r}") from None
    except InvalidKey:
        raise HTTPException(400, "invalid image key") from None
    except StoreError as exc:
        raise HTTPException(503, f"object store unavailable: {exc}") from None
    ctype = mimetypes.guess_type(key)[0] or "application/octet-stream"
    return Response(data, media_type=ctype, headers={"Cache-Control": "public, max-age=3600"})


@router.post("/admin/reload", dependencies=[ApiKeyDep])
async def admin_reload(state: StateDep):
    """Check now for a newly published index version and swap it in."""
    return await run_in_threadpool(state.reload)
