"""The routes' JSON answers (search_api.json_response)."""
import json
import math

import numpy as np

from search_api.json_response import json_response


def test_an_answer_is_compact_json_of_what_the_route_built():
    data = {"query": "ünïcode \u2603", "total": 3, "score": 0.125, "hits": [{"k": None}],
            "n": np.float32(0.5), "flag": True}
    r = json_response(data, status_code=201)
    assert r.status_code == 201 and r.media_type == "application/json"
    assert json.loads(r.body) == {**data, "n": 0.5}
    assert b" " not in r.body.replace("ünïcode \u2603".encode(), b"")


def test_what_orjson_refuses_falls_back_and_non_finite_numbers_are_null():
    big = 2 ** 70  # beyond orjson's 64-bit ints: json.dumps takes it
    assert json.loads(json_response({"n": big}).body) == {"n": big}
    body = json.loads(json_response({"a": math.nan, "b": math.inf}).body)
    assert body == {"a": None, "b": None}  # valid JSON, not NaN / Infinity
