"""Dependencies, and the one adapter that reads a body as JSON or as the original clients' form."""
from __future__ import annotations

import json
import secrets
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from fastapi.security import APIKeyHeader
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile

from core.settings import Settings
from search_api.metrics import Metrics
from search_api.state import ServiceState


# async: a plain `def` dependency would cost a thread-pool hop per request
async def get_state(request: Request) -> ServiceState:
    return request.app.state.service


async def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


StateDep = Annotated[ServiceState, Depends(get_state)]
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
JSON_FIELDS = ("image_embeddings",)  # form clients send this as a JSON string
LIST_FIELDS = ("queries",)  # repeated form fields (queries=a&queries=b) or one JSON list
FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")


def _no_constants(name: str):
    raise ValueError(f"{name} is not allowed in JSON")


def _short(exc: Exception, n: int = 120) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= n else text[:n] + "..."


def _loads(raw: bytes | str) -> Any:
    return json.loads(raw, parse_constant=_no_constants)  # NaN / Infinity are not JSON


async def _form_fields(request: Request, max_bytes: int) -> dict[str, Any]:
    """The original clients' form: JSON_FIELDS as JSON text, LIST_FIELDS as repeated fields or
    one field holding a JSON list; everything else text, converted by the model (lax)."""
    try:
        form = await request.form(max_files=4, max_fields=100, max_part_size=max_bytes)
    except HTTPException:
        raise
    except Exception as exc:  # malformed multipart bodies
        raise HTTPException(400, f"malformed form body: {exc}") from None
    fields: dict[str, Any] = {}
    for k, v in form.multi_items():
        if isinstance(v, UploadFile):
            continue
        if k in JSON_FIELDS:
            try:
                fields[k] = _loads(v) if v.strip() else None
            except (ValueError, RecursionError):
                raise HTTPException(422, f"form field {k!r} must be a JSON list") from None
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
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/json":
        raw = await request.body()
        if not raw.strip():
            raise HTTPException(400, "request body is empty; send a JSON object")
        try:
            data = _loads(raw)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, int limit
            raise HTTPException(400, f"request body is not valid JSON: {_short(exc)}") from None
        if not isinstance(data, dict):
            raise HTTPException(422, "JSON body must be an object")
        context = {"json": True}
    elif ctype in FORM_TYPES:
        data = await _form_fields(request, request.app.state.settings.max_upload_bytes)
        context = None
    else:
        raise HTTPException(415, "send application/json or form data "
                                 "(application/x-www-form-urlencoded or multipart/form-data)")
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
