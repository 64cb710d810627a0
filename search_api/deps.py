"""Dependencies, and the one adapter that reads a body as JSON or as the original clients' form."""
from __future__ import annotations

import errno
import json
import secrets
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from fastapi.security import APIKeyHeader
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.settings import RequestLimits, Settings
from search_api.metrics import Metrics
from search_api.search_service import SearchService


# async: a plain `def` dependency would cost a thread-pool hop per request
async def get_service(request: Request) -> SearchService:
    return request.app.state.service


async def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


ServiceDep = Annotated[SearchService, Depends(get_service)]
SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]

api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False,
                              description="needed on upload and admin routes when the service "
                                          "is configured with API_KEY")


async def require_api_key(settings: SettingsDep,
                          given: Annotated[str | None, Security(api_key_header)] = None) -> None:
    """Guards upload and admin routes when API_KEY is configured (header `X-API-Key`)."""
    if not settings.api_key:
        return
    if not secrets.compare_digest((given or "").encode(), settings.api_key.encode()):
        raise HTTPException(401, "missing or wrong X-API-Key header",
                            headers={"WWW-Authenticate": "X-API-Key"})


ApiKeyDep = Depends(require_api_key)


# --- JSON or form bodies ----------------------------------------------------------------------
# form clients send these as JSON text: field -> what it must hold
JSON_FIELDS = {"image_embeddings": "a JSON list", "filters": "a JSON object",
               "terms": "a JSON object"}
LIST_FIELDS = ("queries", "keys", "negative_keys")  # repeated form fields (queries=a&queries=b) or one JSON list
FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")


def _no_constants(name: str):
    raise ValueError(f"{name} is not allowed in JSON")


def _short(exc: Exception, n: int = 120) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= n else text[:n] + "..."


def _loads(raw: bytes | str) -> Any:
    return json.loads(raw, parse_constant=_no_constants)  # NaN / Infinity are not JSON


# JSON larger than this is parsed and validated in the thread pool: a few MB of numbers take
# a noticeable time, which on the event loop every other client would wait for
THREAD_JSON_BYTES = 64 * 1024


def _too_large(limit: int) -> HTTPException:
    return HTTPException(413, f"JSON or urlencoded body larger than {limit} bytes "
                              "(MAX_JSON_BYTES; images go as multipart uploads)",
                         headers={"connection": "close"})


async def _read_capped(request: Request, limit: int) -> bytes:
    """The body, refused with a 413 as soon as it passes `limit` (from Content-Length at once,
    while streaming otherwise); kept on the request, so `request.form()` parses it from memory."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    raw = b"".join(chunks)
    request._body = raw  # noqa: SLF001 - Starlette's cache of the read body
    return raw


def _json_field(k: str, v: str) -> Any:
    try:
        return _loads(v) if v.strip() else None
    except (ValueError, RecursionError):
        raise HTTPException(422, f"form field {k!r} must be {JSON_FIELDS[k]}") from None


async def parsed_form(request: Request, limits: RequestLimits):
    """The request's form, parsed once (Starlette keeps it on the request) within the form
    limits; a temporary disk too full to spool an upload to is a 507, another failure to
    store it a 503, a malformed body a 400."""
    try:
        return await request.form(max_files=limits.MAX_FORM_FILES,
                                  max_fields=limits.MAX_FORM_FIELDS,
                                  max_part_size=limits.max_upload_bytes)
    except StarletteHTTPException:  # 413 from the body limit, 408 from the body timeout, 400
        raise
    except OSError as exc:  # spooling an uploaded file to the temp dir
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise HTTPException(507, "no space left to receive the upload; try again later") \
                from None
        raise HTTPException(503, f"cannot receive the upload: {_short(exc)}") from None
    except Exception as exc:  # malformed multipart bodies
        raise HTTPException(400, f"malformed form body: {_short(exc)}") from None


async def _form_fields(request: Request, limits: RequestLimits) -> dict[str, Any]:
    """The original clients' form: JSON_FIELDS as JSON text, LIST_FIELDS as repeated fields or
    one field holding a JSON list; everything else text, converted by the model (lax)."""
    max_json = limits.max_json_bytes
    form = await parsed_form(request, limits)
    fields: dict[str, Any] = {}
    for k, v in form.multi_items():
        if isinstance(v, UploadFile):
            continue
        if k in JSON_FIELDS:
            if len(v) > max_json:
                raise _too_large(max_json)
            if len(v) > THREAD_JSON_BYTES:
                fields[k] = await run_in_threadpool(_json_field, k, v)
            else:
                fields[k] = _json_field(k, v)
        elif k in LIST_FIELDS:
            fields.setdefault(k, []).append(v)
        else:
            fields[k] = v
    for k in LIST_FIELDS:
        values = fields.get(k)
        if values and len(values) == 1 and values[0].lstrip().startswith("["):
            try:
                parsed = _loads(values[0])
            except (ValueError, RecursionError):
                continue
            if isinstance(parsed, list):
                fields[k] = parsed
    return fields


async def json_or_form(request: Request, model: type[BaseModel]) -> BaseModel:
    """A JSON object (numbers must be JSON numbers: schemas.Int), or the same fields as a form,
    whose values are text and so are converted."""
    limits: RequestLimits = request.app.state.limits
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/json":
        raw = await _read_capped(request, limits.max_json_bytes)
        if len(raw) > THREAD_JSON_BYTES:  # parse and validate off the event loop
            return await run_in_threadpool(_from_json, raw, model)
        return _from_json(raw, model)
    if ctype == FORM_TYPES[0]:  # urlencoded: all in memory, so bounded like JSON
        await _read_capped(request, limits.max_json_bytes)
        data = await _form_fields(request, limits)
    elif ctype in FORM_TYPES:
        data = await _form_fields(request, limits)
    else:
        raise HTTPException(415, "send application/json or form data "
                                 "(application/x-www-form-urlencoded or multipart/form-data)")
    if any(isinstance(data.get(k), list) and len(data[k]) > 100 for k in JSON_FIELDS):
        return await run_in_threadpool(_validate, model, data, None)
    return _validate(model, data, None)


def _from_json(raw: bytes, model: type[BaseModel]) -> BaseModel:
    if not raw.strip():
        raise HTTPException(400, "request body is empty; send a JSON object")
    try:
        data = _loads(raw)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, int limit
        raise HTTPException(400, f"request body is not valid JSON: {_short(exc)}") from None
    if not isinstance(data, dict):
        raise HTTPException(422, "JSON body must be an object")
    return _validate(model, data, {"json": True})


def _validate(model: type[BaseModel], data: dict, context: dict | None) -> BaseModel:
    try:
        return model.model_validate(data, context=context)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False, include_context=False)) from None


class BodyRoute(APIRoute):
    """A route `async def endpoint(request, body: Model) -> Response`: FastAPI documents `body`
    from the signature as usual, but the request is served without dependency solving or
    response re-validation: the body comes from `json_or_form`, the endpoint returns a
    ready Response. Takes no dependencies."""

    def get_route_handler(self):
        assert self.body_field is not None and not self.dependant.dependencies
        endpoint, model = self.endpoint, self.body_field.field_info.annotation

        async def handler(request: Request):
            try:
                body = await json_or_form(request, model)
                return await endpoint(request, body)
            finally:
                await request.close()  # uploaded files of a multipart form, if any

        return handler


class UploadRoute(APIRoute):
    """A route taking file uploads, served by FastAPI as usual once `parsed_form` has parsed
    its multipart body (FastAPI then reads the form kept on the request): the form limits
    apply, and an upload that cannot be stored is a 507 / 503, not FastAPI's 400."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def parse_first(request: Request):
            ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype == "multipart/form-data":
                await parsed_form(request, request.app.state.limits)
            return await handler(request)

        return parse_first
