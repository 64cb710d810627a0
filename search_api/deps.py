"""Dependencies and request parsing shared by the routes."""
from __future__ import annotations

import json
import secrets
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile

from search_api.config import ApiSettings
from search_api.state import ServiceState


def get_state(request: Request) -> ServiceState:
    return request.app.state.service


def get_settings_dep(request: Request) -> ApiSettings:
    return request.app.state.settings


StateDep = Annotated[ServiceState, Depends(get_state)]
SettingsDep = Annotated[ApiSettings, Depends(get_settings_dep)]


def require_api_key(request: Request, settings: SettingsDep) -> None:
    """Guards upload and admin routes when API_KEY is configured (header `X-API-Key`)."""
    if not settings.api_key:
        return
    given = request.headers.get("x-api-key", "")
    if not secrets.compare_digest(given.encode(), settings.api_key.encode()):
        raise HTTPException(401, "missing or wrong X-API-Key header")


ApiKeyDep = Depends(require_api_key)

JSON_FIELDS = ("image_embeddings", "queries")  # form clients send these as JSON strings


async def read_fields(request: Request, max_bytes: int) -> tuple[dict[str, Any], dict[str, UploadFile]]:
    """JSON body or form fields (urlencoded or multipart) -> (fields, files)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/json":
        raw = await request.body()
        try:
            body = json.loads(raw) if raw else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise HTTPException(400, "request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise HTTPException(422, "JSON body must be an object")
        return body, {}
    if ctype in ("application/x-www-form-urlencoded", "multipart/form-data"):
        try:
            form = await request.form(max_files=4, max_fields=32, max_part_size=max_bytes)
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
                    fields[k] = json.loads(v) if v.strip() else None
                except json.JSONDecodeError:
                    raise HTTPException(422, f"form field {k!r} must be a JSON list") from None
            else:
                fields[k] = v
        return fields, files
    raise HTTPException(415, "send application/json or form data "
                             "(application/x-www-form-urlencoded or multipart/form-data)")


def validate(model: type[BaseModel], data: dict) -> BaseModel:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False, include_context=False)) from None


def body_doc(model: type[BaseModel], form_only: dict | None = None) -> dict:
    """OpenAPI requestBody for a route that takes the same fields as JSON or as a form."""
    schema = _inline_refs(model.model_json_schema(by_alias=False))
    content = {
        "application/json": {"schema": schema},
        "application/x-www-form-urlencoded": {"schema": schema},
    }
    if form_only:
        content["multipart/form-data"] = {"schema": form_only}
    return {"requestBody": {"required": True, "content": content}}


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
