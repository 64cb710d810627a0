"""The routes' JSON answers, serialized once by orjson (~4 us for a search's answer against
~50 us for json.dumps: BENCHMARKS.md §1) rather than re-validated through a response model."""
from __future__ import annotations

import json

import orjson
from fastapi import Response


def json_response(data, status_code: int = 200) -> Response:
    """`data` (dicts, lists, str, numbers, None) as an application/json Response. A value orjson
    refuses (an int beyond 64 bits) falls back to json.dumps, which takes any int."""
    try:
        body = orjson.dumps(data, option=orjson.OPT_SERIALIZE_NUMPY)
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        body = json.dumps(data, separators=(",", ":")).encode()
    return Response(body, status_code=status_code, media_type="application/json")
