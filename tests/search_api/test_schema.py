"""Schemathesis against the service's own OpenAPI schema, in process over ASGI, on the FAISS
and on the Milvus backend.

Positive and negative cases are generated from the schema for every operation; whatever is
sent, the service must answer with a documented status code, a documented content type and a
body that matches the schema, and never a 5xx. Bounded: a fixed number of examples per
operation and mode, derandomized (same cases every run).

(schemathesis' own pytest plugin, `@schema.parametrize()`, fails on pytest 9.2, which removed
`Item._nodeid`; the operations' Hypothesis strategies are driven directly instead.)
"""
import pytest
import schemathesis  # noqa: E402
from datetime import timezone

from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from schemathesis.generation.modes import GenerationMode  # noqa: E402
from schemathesis.specs.openapi.checks import positive_data_acceptance  # noqa: E402

OPERATIONS = [
    "GET /duplicates",
    "GET /explain",
    "GET /facets",
    "GET /health",
    "GET /images/{key}",
    "GET /images/{key}/info",
    "GET /metrics",
    "POST /admin/reload",
    "POST /encode_image",
    "POST /encode_text",
    "POST /search_images_by_image",
    "POST /search_images_by_key",
    "POST /search_images_by_text",
    "POST /search_images_by_texts",
]
# nothing to make schema-invalid in these (no parameters, no body; a key is any text)
NO_NEGATIVE = {"GET /health", "GET /metrics", "GET /images/{key}/info"}
# a schema cannot say "these bytes decode as an image": random bytes that fit `format: binary`
# are rightly refused with 400 there, so "schema-valid data must be accepted" does not apply
UPLOADS = {"POST /encode_image", "POST /search_images_by_image"}
EXAMPLES = 25
KEY = "schema-test-key"


SERVICE_OPTIONS = dict(max_top_k=20, api_key=KEY)


@pytest.fixture(scope="module", params=["faiss", "milvus"])
def served(request, svc, tiny_flickr, encoder, tmp_path_factory):
    """(app, indexed keys) of the tiny dev split on each index backend: FAISS, and a real
    Milvus standalone (the server's own errors must not leak as 5xx either)."""
    if request.param == "faiss":
        yield svc.app, sorted(svc.service.index.current.keys)
        return
    import uuid

    from core.settings import Settings
    from flickr8k.sources import open_source
    from indexer import pipeline
    from indexer.ingest import ingest
    from indexer.milvus_index import MilvusIndex
    from objectstore import LocalStore
    from search_api.main import build_service, create_app
    from tests.search_api.helpers import PREFIX

    server = request.getfixturevalue("milvus_server")
    tmp = tmp_path_factory.mktemp("schema-milvus")
    store = LocalStore(tmp / "store", "b")
    ingest(open_source(str(tiny_flickr[0])), store, split="dev", progress=False)
    prefix = f"t_schema_{uuid.uuid4().hex[:8]}"
    index = MilvusIndex(server.uri, prefix=prefix, timeout_s=5.0)
    pipeline.rebuild(store, encoder, index, PREFIX, progress=False)
    settings = Settings(index_backend="milvus", milvus_uri=server.uri,
                        milvus_collection_prefix=prefix, reload_interval_s=0,
                        index_dir=str(tmp / "no-index-here"), **SERVICE_OPTIONS)
    service = build_service(settings, encoder=encoder, index=index, store=store)
    keys = sorted(k for k, _ in index.keys_page(index.published(encoder.model_id),
                                                limit=1000))
    yield create_app(settings, service), keys
    for name in index.versions():
        index.client.drop_collection(name)


@pytest.fixture(scope="module")
def api_schema(served):
    return schemathesis.openapi.from_asgi("/openapi.json", served[0])


def _operations(schema) -> dict:
    return {f"{r.ok().method.upper()} {r.ok().path}": r.ok() for r in schema.get_all_operations()}


def test_schema_lists_every_route(api_schema):
    assert sorted(_operations(api_schema)) == OPERATIONS


def _impossible_range(case) -> bool:
    """The one rule of a filter JSON Schema cannot state: taken_after before taken_before
    (a body that breaks it is rightly refused, schema-valid or not)."""
    from datetime import datetime

    from pydantic import TypeAdapter, ValidationError

    filters = case.body.get("filters") if isinstance(case.body, dict) else None
    if not isinstance(filters, dict):
        return False
    try:
        after, before = (TypeAdapter(datetime).validate_python(filters.get(name))
                         for name in ("taken_after", "taken_before"))
    except ValidationError:
        return False
    aware = [d if d.tzinfo else d.replace(tzinfo=timezone.utc) for d in (after, before)]
    return aware[0] >= aware[1]


def _indexed_terms(case, indexed: list[str]) -> bool:
    """What a schema cannot say of a query of several terms: which keys are indexed, and
    which terms cancel out. Keys are replaced by indexed ones (a different one each); False when
    the terms would still be refused (cancelling texts, a typed text the parser refuses)."""
    from search_api.query_terms import TermError, parse_typed

    from core.settings import RequestLimits

    if case.operation.path == "/explain":
        return _explained_photo(case, indexed)
    body = case.body if isinstance(case.body, dict) else {}
    names = iter(indexed * 4)
    if isinstance(body.get("keys"), list):
        negative = body.get("negative_keys") if isinstance(body.get("negative_keys"), list) \
            else []
        if len(body["keys"]) + len(negative) > RequestLimits.MAX_QUERY_TERMS:
            return False  # each list is within the limit, both together are not
        body["keys"] = [next(names) for _ in body["keys"]]
        body["negative_keys"] = [next(names) for _ in negative]
    terms = body.get("terms")
    if isinstance(terms, dict):
        both = (terms.get("positive") or []) + (terms.get("negative") or [])
        if len(both) > RequestLimits.MAX_QUERY_TERMS:
            return False
        for item in (terms.get("positive") or []) + (terms.get("negative") or []):
            if isinstance(item, dict) and isinstance(item.get("key"), str):
                item["key"] = next(names)
        texts = [{(i.get("text") or "").strip() for i in terms.get(side) or []
                  if isinstance(i, dict)} for side in ("positive", "negative")]
        if texts[0] & texts[1]:
            return False
    texts = [body.get("text", body.get("query"))]
    if isinstance(body.get("queries"), list):
        texts += body["queries"]
    for text in texts:
        if isinstance(text, str) and body.get("parse_terms", True) is not False:
            try:
                read = parse_typed(text)
            except TermError:
                return False
            if read is not None and (read.keys or any(t.negative for t in read.terms)):
                return False
    return True


def _explained_photo(case, indexed: list[str]) -> bool:
    """GET /explain on an indexed photo (a random key is rightly a 404, which says little);
    False when the query would still be refused (what the text search refuses too)."""
    from search_api.query_terms import TermError, parse_typed

    query = case.query if isinstance(case.query, dict) else {}
    if "key" in query:
        query["key"] = indexed[0]
    text = query.get("q")
    if isinstance(text, str):
        try:
            read = parse_typed(text)
        except TermError:
            return False
        if read is not None and (read.keys or any(t.negative for t in read.terms)):
            return False
    return True


CASES = [(label, mode) for label in OPERATIONS
         for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
         if not (mode is GenerationMode.NEGATIVE and label in NO_NEGATIVE)]


@pytest.mark.parametrize("label,mode", CASES)
def test_openapi_contract(api_schema, served, label, mode):
    operation = _operations(api_schema)[label]
    indexed = served[1]
    excluded = [positive_data_acceptance] if label in UPLOADS else []

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def check(case):
        if mode is GenerationMode.POSITIVE:
            assume(not _impossible_range(case))
            assume(_indexed_terms(case, indexed))
        # every built-in check: not_a_server_error, status code / content type / response
        # schema conformance, schema-violating input refused (negative mode), and that the
        # guarded routes refuse requests without the key or with a wrong one
        case.call_and_validate(headers={"X-API-Key": KEY}, excluded_checks=excluded)

    check()
