"""`GET /duplicates`: the groups of near-duplicate photos `python -m indexer duplicates` found in
the served index version (indexer.duplicates' report, beside the index), largest first, paged,
each photo with its size and date so a person can decide what to keep. Nothing here deletes."""
from __future__ import annotations

from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from core.settings import RequestLimits
from indexer.duplicates import report_path
from search_api.dedupe import load_report
from search_api.deps import ServiceDep, SettingsDep
from search_api.errors import ErrorOut, responses
from search_api.json_response import json_response
from search_api.search_service import iso_time

RUN_IT = "run `python -m indexer duplicates`"

router = APIRouter()


class DuplicatePhotoOut(BaseModel):
    key: str
    url: str
    width: int | None = None
    height: int | None = None
    taken_at: str | None = Field(None, description="ISO 8601, UTC")


class DuplicateGroupOut(BaseModel):
    size: int = Field(description="photos in the group (at most MAX_DUPLICATE_GROUP_PHOTOS "
                                  "of them listed)")
    similarity: float = Field(description="the lowest cosine among the pairs that joined it")
    photos: list[DuplicatePhotoOut]


class DuplicatesOut(BaseModel):
    index_version: str
    model_id: str
    threshold: float = Field(description="photos whose embeddings' cosine is above it are "
                                         "duplicates by the embedding alone (no pixel check, "
                                         "or a photo that could not be read)")
    candidate_threshold: float | None = Field(
        None, description="pairs whose cosine is above it were confirmed on the photos' pixels; "
                          "null: the embedding alone decided")
    pixel_check: dict | None = Field(None, description="the pixel check's parameters")
    created: str
    photos: int = Field(description="photos compared (the version's count)")
    total_groups: int
    total_photos: int = Field(description="photos in some group")
    offset: int
    groups: list[DuplicateGroupOut]


def _image_base(settings, request: Request) -> str:
    """As the search routes' result URLs: PUBLIC_BASE_URL when set, else relative to the host."""
    if settings.public_base_url:
        return settings.public_base_url.rstrip("/") + "/images/"
    return request.scope.get("root_path", "").rstrip("/") + "/images/"


def _int_or_none(value):
    return value if isinstance(value, int) and not isinstance(value, bool) else None


OTHER_VERSION = {409: {"model": ErrorOut,
                       "description": "the report describes another index version than the one "
                                      "served"}}


@router.get("/duplicates", response_model=DuplicatesOut,
            responses={**responses(404, 422, 503), **OTHER_VERSION})
async def get_duplicates(
        request: Request, service: ServiceDep, settings: SettingsDep,
        offset: Annotated[int, Query(ge=0, description="groups skipped")] = 0,
        limit: Annotated[int, Query(ge=1, le=RequestLimits.MAX_DUPLICATE_GROUPS,
                                    description="groups returned")] = 20):
    """Groups of near-duplicate photos in the served index version (re-encodes, resizes,
    crops, edits of one shot), largest first; each photo with its key, URL, width x height and
    date taken. 404 when no report was written, 409 when it describes another version (both:
    run `python -m indexer duplicates`)."""
    view = service.ready()
    try:
        report = await run_in_threadpool(load_report, report_path(settings.index_dir))
    except (OSError, ValueError):
        raise HTTPException(404, f"the duplicates report cannot be read; {RUN_IT}") from None
    if report is None:
        raise HTTPException(404, f"no duplicates report yet; {RUN_IT}")
    if report.version != view.version or report.model_id != service.model_id:
        raise HTTPException(409, f"the duplicates report describes index version "
                                 f"{report.version[:128]}, the served version is "
                                 f"{str(view.version)[:128]}; {RUN_IT}")
    shown = report.groups[offset:offset + limit]
    most = RequestLimits.MAX_DUPLICATE_GROUP_PHOTOS
    keys = [k for g in shown for k in g.keys[:most]]
    infos = dict(zip(keys, await service.index.call(view, "info", keys))) if keys else {}
    base = _image_base(settings, request)
    groups = []
    for group in shown:
        photos = []
        for key in group.keys[:most]:
            info = infos.get(key) or {}
            photos.append({"key": key, "url": base + quote(key, safe="/"),
                           "width": _int_or_none(info.get("width")),
                           "height": _int_or_none(info.get("height")),
                           "taken_at": iso_time(info.get("taken_at"))})
        groups.append({"size": len(group.keys), "similarity": group.similarity,
                       "photos": photos})
    body = {"index_version": report.version, "model_id": report.model_id,
            "threshold": report.threshold, "candidate_threshold": report.candidate_threshold,
            "pixel_check": report.pixel_check, "created": report.created, "photos": report.photos,
            "total_groups": len(report.groups), "total_photos": report.duplicated_photos,
            "offset": offset, "groups": groups}
    return json_response(body)
