"""Dependencies and request parsing shared by the routes."""
from __future__ import annotations

import json
import secrets
import typing
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.security import APIKeyHeader
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile

from core.settings import Settings
from search_api.metrics import Metrics
from search_api.state import ServiceState


def get_state(request: Request) -> ServiceState:
    return request.app.state.service


def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


StateDep = Annotated[ServiceState, Depends(get_state)]
SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]

api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False,
                              description="needed on upload and admin routes when the service "
                                          "is configured with API_KEY")


def require_api_key(settings: SettingsDep,
                    given: Annotated[str | None, Security(api_key_header)] = None) -> None:
    """Guards upload and admin routes when API_KEY is configured (header `X-API-Key`)."""
    if not settings.api_key:
        return
    if not secrets.compare_digest((given or "").encode(), settings.api_key.encode()):
        raise HTTPException(401, "missing or wrong X-API-Key header",
                            headers={"WWW-Authenticate": "X-API-Key"})


ApiKeyDep = Depends(require_api_key)


async def close_form(request: Request):
    """Routes parse their own forms (JSON or form on one route): close uploaded files after."""
    try:
        yield
    finally:
        await request.close()

JSON_FIELDS = ("image_embeddings",)  # form clients send this as a JSON string
LIST_FIELDS = ("queries",)  # repeated form fields (queries=a&queries=b) or one JSON list


class JsonFields(dict):
    """Fields that came as a JSON body: numbers must be JSON numbers (`"top_k": "5"` or `false`
    are refused, as the schema says), while form fields, always text, are converted."""


_NUMERIC = {int, float}


def _is_numeric(annotation) -> bool:
    args = typing.get_args(annotation)
    return annotation in _NUMERIC or (bool(args) and all(
        a in _NUMERIC or a is type(None) for a in args))


def _json_type_errors(model: type[BaseModel], data: dict) -> list[dict]:
    errors = []
    for name, field in model.model_fields.items():
        keys = [name] + list(getattr(field.validation_alias, "choices", []) or [])
        for key in keys:
            value = data.get(key)
            if _is_numeric(field.annotation) and isinstance(value, (bool, str)):
                errors.append({"type": "number_type", "loc": (key,), "input": value,
                               "msg": "Input should be a number (not a string or a boolean)"})
    return errors


async def read_fields(request: Request, max_bytes: int) -> tuple[dict[str, Any], dict[str, UploadFile]]:
    """JSON body or form fields (urlencoded or multipart) -> (fields, files)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/json":
        raw = await request.body()
        if not raw.strip():
            raise HTTPException(400, "request body is empty; send a JSON object")
        try:
            body = json.loads(raw, parse_constant=_no_constants)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, int limit
            raise HTTPException(400, f"request body is not valid JSON: {_short(exc)}") from None
        if not isinstance(body, dict):
            raise HTTPException(422, "JSON body must be an object")
        return JsonFields(body), {}
    if ctype in ("application/x-www-form-urlencoded", "multipart/form-data"):
        try:
            form = await request.form(max_files=4, max_fields=100, max_part_size=max_bytes)
        except HTTPException:
            raise
        except Exception as exc:  # malformed multipart bodies
            raise HTTPException(400, f"malformed form body: {exc}") from None
        fields: dict[str, Any] = {}
        files: dict[str, UploadFile] = {}
        for k, v in form.multi_items():
            if isinstance(v, UploadFile):
                files[k] = v
            elif k in JSON_FIELDS:
                try:
                    fields[k] = json.loads(v, parse_constant=_no_constants) if v.strip() else None
                except (ValueError, RecursionError):
                    raise HTTPException(422, f"form field {k!r} must be a JSON list") from None
            elif k in LIST_FIELDS:
                fields.setdefault(k, []).append(v)
            else:
                fields[k] = v
        for k in LIST_FIELDS:
            values = fields.get(k)
            if values and len(values) == 1 and values[0].lstrip().startswith("["):
                try:  # the older clients' form: one field holding a JSON list
                    parsed = json.loads(values[0], parse_constant=_no_constants)
                except (ValueError, RecursionError):
                    continue
                if isinstance(parsed, list):
                    fields[k] = parsed
        return fields, files
    raise HTTPException(415, "send application/json or form data "
                             "(application/x-www-form-urlencoded or multipart/form-data)")


def _no_constants(name: str):
    raise ValueError(f"{name} is not allowed in JSON")


def _short(exc: Exception, n: int = 120) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= n else text[:n] + "..."


def validate(model: type[BaseModel], data: dict) -> BaseModel:
    if isinstance(data, JsonFields):
        errors = _json_type_errors(model, data)
        if errors:
            raise RequestValidationError(errors)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False, include_context=False)) from None


def body_doc(model: type[BaseModel], form_only: dict | None = None) -> dict:
    """OpenAPI requestBody for a route that takes the same fields as JSON or as a form."""
    schema = _inline_refs(model.model_json_schema(by_alias=False))
    content = {
        "application/json": {"schema": schema},
        "application/x-www-form-urlencoded": {"schema": form_schema(schema)},
    }
    if form_only:
        content["multipart/form-data"] = {"schema": form_only}
    return {"requestBody": {"required": True, "content": content}}


def form_schema(schema: dict) -> dict:
    """The same fields as a urlencoded form: JSON_FIELDS travel as JSON text, optional fields
    are left out rather than sent as null, lists are repeated fields."""
    props = {}
    for name, prop in schema.get("properties", {}).items():
        if name in JSON_FIELDS:  # still accepted as JSON text (the original clients' form)
            continue
        variants = prop.get("anyOf")
        if variants and any(v.get("type") == "null" for v in variants):
            rest = [v for v in variants if v.get("type") != "null"]
            prop = {**{k: v for k, v in prop.items() if k != "anyOf"}, **rest[0]} \
                if len(rest) == 1 else {**prop, "anyOf": rest}
            prop.pop("default", None)
        props[name] = prop
    return {**schema, "properties": props}


def _inline_refs(schema: dict) -> dict:
    defs = schema.pop("$defs", {})

    def walk(node):
        if isinstance(node, dict):
            if "$ref" in node:
                return walk(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(schema)
