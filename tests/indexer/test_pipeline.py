"""The embedding pipeline: rebuild / update / status, bad images, a model change, prefetching."""
import json

import numpy as np

from indexer import pipeline
from indexer.faiss_index import FaissIndex
from indexer.repository import IndexRepository
from indexer.ingest import ingest
from flickr8k.sources import open_source
from objectstore import LocalStore
from tests.indexer.helpers import PREFIX, publish_random


def test_rebuild_update_status_cycle(tiny_flickr, tmp_path, encoder):
    root, meta = tiny_flickr
    store = LocalStore(tmp_path / "store", "b")
    repo = IndexRepository(tmp_path / "index")
    ingest(open_source(str(root)), store, split="dev", progress=False)
    n_dev = len(meta["dev"])

    st = pipeline.status(store, FaissIndex(repo), PREFIX)
    assert st["version"] is None and st["not_indexed"] == n_dev

    # no index yet -> rebuild
    r = pipeline.update(store, encoder, FaissIndex(repo), PREFIX, progress=False)
    assert r.action == "rebuilt" and r.count == n_dev
    v1 = r.version

    r = pipeline.update(store, encoder, FaissIndex(repo), PREFIX, progress=False)
    assert r.action == "unchanged" and r.version == v1 and repo.list_versions() == [v1]

    # two new images, one removed, one changed
    ingest(open_source(str(root)), store, split="train", limit=2, progress=False)
    removed = f"{PREFIX}{meta['dev'][0]}"
    store.delete(removed)
    changed = f"{PREFIX}{meta['dev'][1]}"
    store.put(changed, (root / "Images" / meta["train"][-1]).read_bytes())
    assert pipeline.status(store, FaissIndex(repo), PREFIX)["not_indexed"] == 3

    r = pipeline.update(store, encoder, FaissIndex(repo), PREFIX, progress=False)
    assert r.action == "updated" and r.added == 3 and r.removed == 2
    cur = repo.load()
    assert cur.count == n_dev + 1 and removed not in cur.keys and changed in cur.keys
    assert len(set(cur.ids.tolist())) == cur.count  # stable, unique ids
    st = pipeline.status(store, FaissIndex(repo), PREFIX, encoder.model_id)
    assert st["not_indexed"] == 0 and st["removed_from_store"] == 0 and st["model_matches"]

    # the changed object's vector is the new content's vector (same as a fresh rebuild gives)
    fresh = pipeline.rebuild(store, encoder, FaissIndex(tmp_path / "fresh"), PREFIX,
                             progress=False)
    ref = IndexRepository(tmp_path / "fresh").load()
    a = cur.stored_vectors([changed])[0]
    b = ref.stored_vectors([changed])[0]
    assert fresh.count == cur.count and np.allclose(a, b, atol=1e-5)


def test_bad_image_is_skipped_not_fatal(tiny_flickr, tmp_path, encoder):
    root, _ = tiny_flickr
    store = LocalStore(tmp_path / "store", "b")
    ingest(open_source(str(root)), store, split="dev", limit=2, progress=False)
    store.put(f"{PREFIX}broken.jpg", b"\xff\xd8\xff\xe0 truncated")
    r = pipeline.rebuild(store, encoder, FaissIndex(tmp_path / "i"), PREFIX,
                         progress=False)
    assert r.count == 2 and list(r.failed) == [f"{PREFIX}broken.jpg"]


def test_model_change_triggers_rebuild(tiny_flickr, tmp_path, encoder):
    root, _ = tiny_flickr
    store = LocalStore(tmp_path / "store", "b")
    ingest(open_source(str(root)), store, split="dev", limit=3, progress=False)
    repo = IndexRepository(tmp_path / "i")
    publish_random(repo, model_id="some-older-model")
    manifest_before = json.loads(json.dumps(repo.read_manifest()))
    r = pipeline.update(store, encoder, FaissIndex(repo), PREFIX, progress=False)
    assert r.action == "rebuilt" and repo.read_manifest()["model_id"] == encoder.model_id
    assert manifest_before["model_id"] == "some-older-model"


def test_prefetching_batches_keep_order(encoder, tiny_flickr, tmp_path):
    from indexer.pipeline import iter_batches
    from objectstore import LocalStore

    root, meta = tiny_flickr
    store = LocalStore(tmp_path, "b")
    for name in meta["names"]:
        store.put("img/" + name, (root / "Images" / name).read_bytes())
    store.put("img/broken.jpg", b"not an image")
    objects = sorted(store.list("img/"), key=lambda o: o.key)
    seen, failed = [], {}
    for listed, pixels, bad, photo_infos in iter_batches(store, encoder, objects, batch_size=5):
        assert pixels is None or len(pixels) == len(listed)
        assert [i["folder"] for i in photo_infos] == ["img"] * len(listed)
        seen += [i.key for i in listed]
        failed.update(bad)
    assert seen == [o.key for o in objects if o.key != "img/broken.jpg"]
    assert list(failed) == ["img/broken.jpg"]
