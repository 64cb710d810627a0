"""The object-store interface on both backends: the local directory and a real S3 server."""
import pytest

from objectstore import (
    InvalidKey,
    LocalStore,
    ObjectNotFound,
    S3Store,
    StoreAuthError,
    StoreUnavailable,
)
from core.hashing import md5_hex


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalStore(tmp_path, "bucket")
    return request.getfixturevalue("s3_store")


def test_put_get_stat_exists_delete(store):
    info = store.put("flickr8k/images/a.jpg", b"abc")
    assert info.etag == md5_hex(b"abc") and info.size == 3
    assert store.get("flickr8k/images/a.jpg") == b"abc"
    assert store.stat("flickr8k/images/a.jpg").etag == md5_hex(b"abc")
    assert store.exists("flickr8k/images/a.jpg")
    store.delete("flickr8k/images/a.jpg")
    assert not store.exists("flickr8k/images/a.jpg")


def test_list_with_prefix(store):
    for k in ["flickr8k/images/1.jpg", "flickr8k/images/2.jpg", "flickr8k/text/t.txt", "other/x"]:
        store.put(k, k.encode())
    keys = sorted(o.key for o in store.list("flickr8k/images/"))
    assert keys == ["flickr8k/images/1.jpg", "flickr8k/images/2.jpg"]
    assert {o.etag for o in store.list("flickr8k/text/")} == {md5_hex(b"flickr8k/text/t.txt")}
    assert len(list(store.list(""))) == 4


def test_list_is_in_key_order(store, monkeypatch):
    """As S3 lists (by key, not folder by folder): what `indexer verify` merge-joins on."""
    keys = ["p/a/b.jpg", "p/a.jpg", "p/a-b.jpg", "p/z.jpg", "p/a/c/d.jpg", "p/ab.jpg", "p/B.jpg",
            "p/a0.jpg", "q.jpg"]
    for k in keys:
        store.put(k, b"x")
    for buffered in (10_000, 2):  # S3: a folder level held whole, or listed twice
        monkeypatch.setattr("objectstore.s3.LIST_BUFFER", buffered)
        assert [o.key for o in store.list("p/")] == sorted(k for k in keys if k.startswith("p/"))
        assert [o.key for o in store.list("p/a")] == sorted(k for k in keys if k.startswith("p/a"))
        assert [o.key for o in store.list("")] == sorted(keys)


def test_overwrite_changes_etag(store):
    store.put("k/x", b"one")
    store.put("k/x", b"two")
    assert store.get("k/x") == b"two" and store.stat("k/x").etag == md5_hex(b"two")


def test_missing_key_is_a_clear_error(store):
    with pytest.raises(ObjectNotFound, match="no object 'nope/x.jpg'"):
        store.get("nope/x.jpg")
    with pytest.raises(ObjectNotFound):
        store.stat("nope/x.jpg")
    with pytest.raises(ObjectNotFound):
        store.delete("nope/x.jpg")


@pytest.mark.parametrize("key", ["../etc/passwd", "a/../../b", "/abs", "", "a//b", "a/./b",
                                 "dir/", "a\\b", "bad\x00key"])
def test_invalid_keys_are_refused(store, key):
    with pytest.raises(InvalidKey):
        store.put(key, b"x")
    with pytest.raises(InvalidKey):
        store.get(key)


def test_local_store_cannot_escape_root(tmp_path):
    store = LocalStore(tmp_path / "root", "b")
    (tmp_path / "secret").write_text("s")
    with pytest.raises(InvalidKey):
        store.get("../../secret")
    assert not (tmp_path / "root" / "evil").exists()


def test_local_store_writes_atomically_up_to_the_longest_name(tmp_path):
    """A put is whole or absent: a half-written temp file beside the objects is never listed,
    and a key part as long as the file system allows (255 bytes) still writes."""
    store = LocalStore(tmp_path, "b")
    longest = "d/" + "x" * 251 + ".jpg"
    assert store.put(longest, b"long").size == 4 and store.get(longest) == b"long"
    store.put("d/a.jpg", b"a")
    assert {p.name for p in (tmp_path / "b" / "d").iterdir()} == {"a.jpg", "x" * 251 + ".jpg"}
    (tmp_path / "b" / "d" / ".a.jpg.k2j4h1.tmp").write_bytes(b"half")  # a put killed midway
    (tmp_path / "b" / "d" / ".tmp-k2j4h1").write_bytes(b"half")  # older writers' temp name
    assert [o.key for o in store.list("d/")] == ["d/a.jpg", longest]


def test_s3_wrong_credentials(s3_server):
    with pytest.raises(StoreAuthError, match="credentials refused"):
        S3Store(s3_server["endpoint"], s3_server["access_key"], "wrong-secret", "any-bucket")


def test_s3_server_not_reachable():
    from deploy.ports import free_port

    with pytest.raises(StoreUnavailable, match="not reachable"):
        S3Store(f"127.0.0.1:{free_port()}", "a", "b", "some-bucket", timeout=1, retries=0)


def test_s3_server_answering_5xx_is_told_apart_from_one_not_reachable():
    """A server that answers every request with a 500 (as SeaweedFS does when it has no free
    volume left) is named as failing, not as unreachable: the fix is in its log, not the URL."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Failing(BaseHTTPRequestHandler):
        def _fail(self):
            self.send_response(500)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_HEAD = do_PUT = _fail

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Failing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(StoreUnavailable, match="answers with server errors") as info:
            S3Store(f"127.0.0.1:{server.server_port}", "a", "b", "some-bucket", timeout=2,
                    retries=1)
        assert "not reachable" not in str(info.value)
    finally:
        server.shutdown()
        server.server_close()


def test_objects_are_dated_when_last_written(store, tmp_path):
    """`last_modified` (epoch seconds, the store's clock: whole seconds on SeaweedFS) in the
    listing and from stat; what `indexer verify` tells an upload made during a run by."""
    import os
    import time

    from objectstore import ObjectInfo

    assert ObjectInfo("k", 1, "e").last_modified is None  # not every answer is dated
    before = time.time()
    store.put("d/a.jpg", b"one")
    listed, = store.list("d/")
    first = store.stat("d/a.jpg").last_modified
    assert isinstance(listed.last_modified, float) and isinstance(first, float)
    for when in (listed.last_modified, first):
        assert before - 2 <= when <= time.time() + 1  # one clock on this machine; whole seconds
    time.sleep(1.1)
    store.put("d/a.jpg", b"two")
    listed, = store.list("d/")
    assert listed.last_modified > first and store.stat("d/a.jpg").last_modified > first
    if isinstance(store, LocalStore):  # the file's mtime, as another writer may set it
        os.utime(store.root / "d" / "a.jpg", (1e9, 1e9))
        assert [o.last_modified for o in store.list("d/")] == [1e9]
        assert store.stat("d/a.jpg").last_modified == 1e9
