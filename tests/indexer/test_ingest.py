"""Ingest from a folder, from the original zips, and from URLs; idempotent by content hash."""


from indexer.ingest import ingest
from flickr8k.sources import open_source
from objectstore import LocalStore
from tests.conftest import zip_flickr8k
from tests.indexer.helpers import PREFIX


def test_folder_ingest_is_idempotent(tiny_flickr, tmp_path):
    root, meta = tiny_flickr
    store = LocalStore(tmp_path, "b")
    first = ingest(open_source(str(root)), store, progress=False)
    assert first.uploaded == len(meta["names"]) and first.unchanged == 0
    assert first.texts_uploaded == 3
    second = ingest(open_source(str(root)), store, progress=False)
    assert second.uploaded == 0 and second.unchanged == len(meta["names"])
    assert second.texts_uploaded == 0
    keys = {o.key for o in store.list(PREFIX)}
    assert keys == {f"{PREFIX}{n}" for n in meta["names"]}
    assert store.exists("flickr8k/text/Flickr8k.token.txt")


def test_split_filter_and_changed_content(tiny_flickr, tmp_path):
    root, meta = tiny_flickr
    store = LocalStore(tmp_path, "b")
    rep = ingest(open_source(str(root)), store, split="dev", progress=False)
    assert rep.uploaded == len(meta["dev"])
    # a changed object is uploaded again; an unchanged one is not
    store.put(f"{PREFIX}{meta['dev'][0]}", b"stale")
    rep = ingest(open_source(str(root)), store, split="dev", progress=False)
    assert rep.uploaded == 1 and rep.unchanged == len(meta["dev"]) - 1


def test_zip_ingest_matches_folder(tiny_flickr, tmp_path):
    root, meta = tiny_flickr
    images_zip, _ = zip_flickr8k(root, tmp_path)
    src = open_source(str(images_zip))  # text zip found beside it by name
    assert src.image_names() == sorted(meta["names"])
    assert src.split("dev") == meta["dev"]
    store = LocalStore(tmp_path / "s", "b")
    assert ingest(src, store, progress=False).uploaded == len(meta["names"])
