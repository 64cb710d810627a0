"""`GET /explain`: why a stored photo matched a query (search_api.explain), as a heat overlay
(PNG) or as numbers (JSON)."""
# no `from __future__ import annotations`: FastAPI reads the parameters' types at run time
from datetime import datetime, timezone
from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Query, Request, Response
from fastapi.concurrency import run_in_threadpool

from core.settings import RequestLimits, Settings
from encoder.errors import NoSpatialMap
from encoder.image_formats import is_image_key
from encoder.preprocessing import BadImage
from objectstore import InvalidKey, validate_key
from search_api.deps import ServiceDep
from search_api.errors import responses
from search_api.explain import NotIndexed
from search_api.images import ImageTooLarge
from search_api.json_response import json_response
from search_api.query_terms import parse_typed, plain
from search_api.text_queries import read_term_texts, run_parser

DEFAULT_SIZE = 512


def build_router(settings: Settings) -> APIRouter:
    router = APIRouter()
    limits = settings.limits
    max_query_chars = limits.max_query_chars

    @router.get("/explain", name="explain",
                responses={200: {"content": {"image/png": {}, "application/json": {}},
                                 "description": "the photo with the heat map over it (PNG), "
                                                "or the map and each term's share (JSON)"},
                           **responses(404, 422, 503)})
    async def explain(
            request: Request, service: ServiceDep,
            key: Annotated[str, Query(min_length=1, max_length=1024,
                                      description="an indexed photo's key")],
            q: Annotated[str, Query(min_length=1, max_length=max_query_chars, pattern=r"\S",
                                    description="the query, as the text search reads it "
                                                "(`dog + beach - people`, `key:...` terms, "
                                                "dates and places as hints)")],
            format: Annotated[Literal["png", "json"], Query(
                description="`png`: the photo with the map over it; `json`: the numbers")
            ] = "png",
            size: Annotated[int, Query(ge=32, le=RequestLimits.MAX_THUMBNAIL_SIDE,
                                       description="the PNG's longer side at most")
                            ] = DEFAULT_SIZE,
            parse_hints: Annotated[bool, Query(description="read dates and places in `q` as "
                                                           "the search does")] = True):
        """Where in the photo `key` the query `q` matches: the query embedding's cosine with
        each spatial cell of the model's image tower (a grid over the photo, `map` in the
        JSON; `box` is the part of the photo it covers), drawn over the photo as a heat map.
        A query of several terms is explained by its combined embedding, and the JSON gives
        each term's `cosine` with the photo, its `contribution` to the photo's cosine with the
        query (they add up to `similarity`) and its `share` of it (the shares add up to 1).
        404: the served index does not hold the photo; 422: a query the search refuses, or a
        model without a spatial map."""
        try:
            validate_key(key)
        except InvalidKey:
            raise HTTPException(404, "no such image (invalid image key)") from None
        if not key.startswith(settings.images_prefix) or not is_image_key(key):
            raise HTTPException(404, f"no indexed photo {key[:200]!r}")
        query = parse_typed(q, ("query", "q")) or plain(q)
        service.ready()
        if parse_hints:
            query, _ = await run_parser(read_term_texts, query.chars(), query, None, True,
                                        datetime.now(timezone.utc),
                                        request.app.state.settings.query_time_zone)
        try:
            explanation, cached = await service.explainer.explain(key, query, size)
        except NotIndexed as exc:
            raise HTTPException(404, str(exc)) from None
        except NoSpatialMap as exc:
            raise HTTPException(422, str(exc)) from None
        except (BadImage, ImageTooLarge) as exc:
            raise HTTPException(422, f"stored object {key[:200]!r} is not a usable image: "
                                     f"{str(exc)[:200]}") from None
        headers = {"Cache-Control": "private, max-age=600",
                   "X-Explain-Cache": "hit" if cached else "miss"}
        if format == "json":
            out = json_response(explanation.to_json())
            out.headers.update(headers)
            return out
        png = await run_in_threadpool(explanation.png)
        return Response(png, media_type="image/png", headers=headers)

    return router
