"""Fixtures of the search API tests: one indexed FAISS service per module (`svc`) and a client of
it (`client`), or a fresh service per test (`fresh_svc`) for tests that republish, damage or
reload the index. A module changes what it gets with two module attributes:
SERVICE_OPTIONS (keywords of helpers.build_service: split, api_key, limits...) and
CLIENT_OPTIONS (keywords of TestClient)."""
from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from tests.search_api.helpers import build_service


def _options(request) -> dict:
    return getattr(request.module, "SERVICE_OPTIONS", {})


@pytest.fixture(scope="module")
def svc(request, tiny_flickr, tmp_path_factory, encoder):
    name = request.module.__name__.rsplit(".", 1)[-1]
    return build_service(tmp_path_factory.mktemp(name), tiny_flickr[0], encoder,
                         **_options(request))


@pytest.fixture
def fresh_svc(request, tiny_flickr, tmp_path, encoder):
    return build_service(tmp_path, tiny_flickr[0], encoder, **_options(request))


@pytest.fixture(scope="module")
def client(request, svc):
    with TestClient(svc.app, **getattr(request.module, "CLIENT_OPTIONS", {})) as c:
        yield c
