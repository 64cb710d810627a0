"""Fixtures of the indexer tests: every vector-index backend the contract suite runs against
(one list, `CONTRACT_BACKENDS`), each opened through the registry as INDEX_BACKEND would."""
from __future__ import annotations

import pytest

from core.settings import Settings
from indexer.vector_index import BACKENDS, open_index

# the test-only exact-search backend: one registry line is all a new backend needs
BACKENDS["numpy"] = "tests.indexer.numpy_index:NumpyIndex"

# INDEX_BACKEND values and their settings; "milvus" is a real standalone server,
# "milvus-lite" Milvus's API in-process on a local file
CONTRACT_BACKENDS = ["faiss", "milvus", "milvus-lite", "numpy"]


def backend_settings(kind: str, request, tmp_path) -> Settings:
    s = {"index_dir": str(tmp_path / "index")}
    if kind == "milvus":
        s |= {"milvus_uri": request.getfixturevalue("milvus_server").uri,
              "milvus_collection_prefix": request.getfixturevalue("milvus_prefix")}
    elif kind == "milvus-lite":
        kind, s = "milvus", s | {"milvus_uri": str(tmp_path / "lite.db"),
                                 "milvus_collection_prefix": "t_lite"}
    return Settings(_env_file=None, index_backend=kind, **s)


@pytest.fixture(params=CONTRACT_BACKENDS)
def backend(request, tmp_path):
    """A fresh, empty vector index of each backend."""
    index = open_index(backend_settings(request.param, request, tmp_path))
    yield index
    if request.param == "milvus":  # leave the shared server clean
        for name in index.versions():
            index.client.drop_collection(name)
    index.close()


@pytest.fixture
def faiss_index(tmp_path):
    from indexer.faiss_index import FaissIndex

    return FaissIndex(tmp_path / "index")
