"""Every error is JSON `{"detail": ...}`: 4xx for bad input, a bare 500 JSON for our own bugs.

FastAPI's default validation handler echoes the offending input back, which breaks on NaN /
Infinity (not valid JSON: the handler itself would fail with a 500) and would mirror a 10 MB
body; here inputs are kept only when short and JSON-safe.
"""
from __future__ import annotations

import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.requests import ClientDisconnect

from encoder.preprocessing import BadImage
from indexer.vector_index import FilterTooBroad
from search_api.images import ImageTooLarge
from search_api.index_holder import NoIndex
from search_api.query_terms import TermError
from search_api.search_service import BadEmbeddings, NoMatchScale
from search_api.stored_images import ImageNotFound, StoreUnavailable

log = logging.getLogger(__name__)

MAX_ECHO = 80
MAX_ERRORS = 10


class ErrorOut(BaseModel):
    detail: str | list[dict]


def _text(value: str) -> str:
    """Text that can be encoded as UTF-8: lone surrogates (valid in JSON escapes, not in UTF-8)
    are written as `\\udXXX` escapes instead of making the error response itself fail."""
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError:
        return value.encode("utf-8", "backslashreplace").decode("utf-8")


def _safe_input(value):
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if abs(value) < 10**15 else f"{str(value)[:20]}... ({len(str(value))} digits)"
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, str):
        short = value if len(value) <= MAX_ECHO else value[:MAX_ECHO] + f"... ({len(value)} chars)"
        return _text(short)
    return f"<{type(value).__name__}>"


def clean_errors(errors) -> list[dict]:
    errors = list(errors)
    out = []
    for e in errors[:MAX_ERRORS]:
        item = {"type": e.get("type"), "loc": [_text(str(p)) for p in e.get("loc", ())],
                "msg": _text(str(e.get("msg", "")))}
        if "input" in e:
            item["input"] = _safe_input(e["input"])
        out.append(item)
    if len(errors) > MAX_ERRORS:
        out.append({"type": "too_many_errors", "loc": [],
                    "msg": f"... and {len(errors) - MAX_ERRORS} more errors"})
    return out


# domain errors raised below the routes, and the one status each maps to
DOMAIN_ERRORS: list[tuple[type[Exception], int, str]] = [
    (BadImage, 400, "not a usable image: "),
    (ImageTooLarge, 413, ""),
    (NoIndex, 503, ""),
    (FilterTooBroad, 422, ""),
    (BadEmbeddings, 422, ""),
    (NoMatchScale, 422, ""),
    (ImageNotFound, 404, ""),
    (StoreUnavailable, 503, ""),
]


def retry_after(exc: Exception) -> dict[str, str] | None:
    """The `Retry-After` header of an error that says when to retry (whole seconds, RFC 9110:
    the 503s of a missing index or store, when the service looks again); None otherwise."""
    seconds = getattr(exc, "retry_after_s", None)
    return {"Retry-After": str(max(1, math.ceil(seconds)))} if seconds else None


def install(app: FastAPI) -> None:
    for exc_type, status, prefix in DOMAIN_ERRORS:
        async def handler(request: Request, exc: Exception, status=status, prefix=prefix):
            return JSONResponse({"detail": _text(prefix + str(exc))}, status_code=status,
                                headers=retry_after(exc))
        app.add_exception_handler(exc_type, handler)

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, exc: ClientDisconnect):
        # the client closed the connection mid-body: nobody reads this answer; no 500, no trace
        return JSONResponse({"detail": "client disconnected"}, status_code=400)

    @app.exception_handler(TermError)
    async def term_error(request: Request, exc: TermError):
        # shaped as a body validation error: `loc` says where the term is, `input` how it was written
        return JSONResponse({"detail": clean_errors([{
            "type": "query_term", "loc": exc.loc, "msg": exc.message,
            "input": exc.term}])}, status_code=422)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return JSONResponse({"detail": clean_errors(exc.errors())}, status_code=422)

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception):  # pragma: no cover - our bugs
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": "internal server error"}, status_code=500)


ERROR_RESPONSES = {
    400: "malformed body, or an image that cannot be decoded",
    401: "missing or wrong X-API-Key (only when the service is configured with API_KEY)",
    404: "no such object",
    408: "the client stopped sending the request body",
    413: "body or image too large",
    415: "unsupported content type",
    422: "a field is missing or out of range",
    503: "no index loaded yet, the object store is down, or too many connections",
    507: "no space left to spool an upload",
}


def responses(*codes: int) -> dict:
    """OpenAPI `responses` entries for the error codes a route can answer."""
    return {c: {"model": ErrorOut, "description": ERROR_RESPONSES[c]} for c in codes}
