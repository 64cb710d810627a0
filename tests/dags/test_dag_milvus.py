"""The re-index DAG on the Milvus backend for real (`airflow dags test`, INDEX_BACKEND=milvus,
a real Milvus standalone, a local-directory store): the shards write into a new collection and
publish_index switches the model's alias to it; the result equals a single-process rebuild; an
update writes into the published collection in place (writes and deletes, no new collection);
runs with nothing to do publish nothing. Nothing on local disk holds vectors."""
from __future__ import annotations

import shutil

import numpy as np

from tests.dags.helpers import ARTIFACTS, PREFIX, run_dag


def _content(index, model_id: str) -> tuple[str, dict, np.ndarray]:
    """(published collection, key -> etag, vectors in key order)."""
    indexed = index.indexed(model_id)
    keys = sorted(indexed.etags)
    return indexed.version, indexed.etags, index.view(model_id).stored_vectors(keys)


def test_reindex_dag_on_milvus(airflow_env, milvus_server, milvus_prefix, tiny_flickr,
                               small_checkpoint, encoder, tmp_path):
    from indexer import pipeline
    from indexer.milvus_index import MilvusIndex
    from objectstore import LocalStore
    from tests.conftest import make_image

    root, meta = tiny_flickr
    store = LocalStore(tmp_path / "store", "b")
    names = sorted(meta["names"])
    for name in names:
        store.put(PREFIX + name, (root / "Images" / name).read_bytes())
    env = {**airflow_env, "STORE_BACKEND": "local", "LOCAL_STORE_DIR": str(tmp_path / "store"),
           "MINIO_BUCKET": "b", "MODEL_PATH": str(small_checkpoint),
           "INDEX_DIR": str(tmp_path / "index"), "INDEX_BACKEND": "milvus",
           "MILVUS_URI": milvus_server.uri, "MILVUS_COLLECTION_PREFIX": milvus_prefix,
           "EMBED_SHARD_SIZE": str(-(-len(names) // 3)), "FLICKR8K_TASK_RETRIES": "0"}
    logs = ARTIFACTS / "dag_milvus_logs"
    shutil.rmtree(logs, ignore_errors=True)
    index = MilvusIndex(milvus_server.uri, prefix=milvus_prefix)
    model = encoder.model_id

    # 1. nothing published yet: a rebuild in 3 shards into a new collection, then the alias
    run1 = run_dag(env, "flickr8k_reindex", logs)
    shards = sorted(t for t in run1["tasks"] if t.startswith("embed_shard["))
    assert len(shards) == 3 and all(run1["tasks"][t]["state"] == "success" for t in shards)
    rep = run1["xcom"]["publish_index"]
    assert rep["action"] == "rebuilt" and rep["count"] == len(names)
    assert run1["xcom"]["verify_index"]["ok"]  # the alias's collection equals the store
    v1, etags1, vectors1 = _content(index, model)
    assert v1 == rep["version"] == index.published(model)
    assert sorted(etags1) == [PREFIX + n for n in names]

    # ... the same rows a single-process rebuild writes (into a collection of its own prefix)
    single = MilvusIndex(milvus_server.uri, prefix=milvus_prefix + "_single")
    pipeline.rebuild(store, encoder, single, PREFIX, progress=False)
    _, etags_one, vectors_one = _content(single, model)
    assert etags_one == etags1
    np.testing.assert_allclose(vectors1, vectors_one, atol=1e-5)
    assert not (tmp_path / "index" / "versions").exists()  # nothing local on this backend

    # 2. again: nothing to do, nothing published
    run2 = run_dag(env, "flickr8k_reindex", logs)
    assert "plan_shards" not in run2["xcom"] and run2["tasks"]["publish_index"]["state"] == \
        "skipped"
    assert _content(index, model)[:2] == (v1, etags1)

    # 3. one image removed, one added: an update in place (same collection)
    removed, added = PREFIX + names[0], PREFIX + "9999_new_upload.jpg"
    store.delete(removed)
    store.put(added, make_image("red", "circle", 999))
    run3 = run_dag(env, "flickr8k_reindex", logs)
    rep3 = run3["xcom"]["publish_index"]
    assert rep3["action"] == "updated" and rep3["added"] == 1 and rep3["removed"] == 1
    assert run3["xcom"]["verify_index"]["rows"] == len(names)
    v3, etags3, _ = _content(index, model)
    assert v3 == v1 and added in etags3 and removed not in etags3
    assert len(etags3) == len(names) and index.versions() == [v1]

    # 4. and again: nothing
    run4 = run_dag(env, "flickr8k_reindex", logs)
    assert run4["tasks"]["publish_index"]["state"] == "skipped"
    assert _content(index, model)[:2] == (v3, etags3)
    for name in index.versions() + single.versions():
        index.client.drop_collection(name)
