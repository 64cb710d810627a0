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


@pytest.fixture(scope="session")
def calibrated_encoder(small_checkpoint, tiny_flickr, tmp_path_factory):
    """The small test model with a match scale in its card (fitted on the tiny dev split), for
    the tests of `match`; a module serves it by overriding its `encoder` fixture with this."""
    import shutil

    from encoder import Encoder
    from training.calibrate import calibrate
    from training.data import load_split_from_folder

    tmp = tmp_path_factory.mktemp("calibrated")
    path = tmp / "small.pt"
    shutil.copy(small_checkpoint, path)
    calibrate(str(path), load_split_from_folder(str(tiny_flickr[0]), "dev"), str(tmp / "cache"))
    return Encoder.from_checkpoint(str(path))
