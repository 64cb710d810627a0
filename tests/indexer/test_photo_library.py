"""A person's own photo library: `python -m indexer add PATH` + update index every decodable
photo (nested folders, any case, HEIC/AVIF/TIFF/RAW), list the broken one with its reason, and
never try it again until it changes; an empty IMAGES_PREFIX is the whole bucket; a prefix
without photos says so; the DAGs' shards list and remember the same."""
from __future__ import annotations

import json

import pytest

from core.settings import Settings, get_settings
from indexer import cli, pipeline, shards
from indexer.faiss_index import FaissIndex
from indexer.ingest import add_folder, find_photos, folder_prefix
from indexer.listing import RefusalTable, list_images, nothing_found
from objectstore import LocalStore
from tests.photo_samples import BROKEN, image_bytes, write_library

LIBRARY_PHOTOS = 10  # write_library's decodable photos


@pytest.fixture
def library(tmp_path):
    root = tmp_path / "Photos"
    return root, write_library(root)


@pytest.fixture
def run_cli(tmp_path, small_checkpoint, monkeypatch, capsys):
    """`python -m indexer ...` in this process, on a local store and FAISS index in tmp_path;
    extra settings as environment variables."""
    def run(*argv, **env) -> dict:
        base = {"STORE_BACKEND": "local", "LOCAL_STORE_DIR": str(tmp_path / "store"),
                "MINIO_BUCKET": "b", "INDEX_DIR": str(tmp_path / "index"),
                "MODEL_PATH": str(small_checkpoint), "INDEX_BACKEND": "faiss"}
        for k, v in {**base, **env}.items():
            monkeypatch.setenv(k, v)
        get_settings.cache_clear()
        try:
            assert cli.main(["--quiet", *argv]) == 0, capsys.readouterr().err
        finally:
            get_settings.cache_clear()
        return json.loads(capsys.readouterr().out)

    monkeypatch.chdir(tmp_path)  # no .env of the checkout
    return run


def test_add_a_library_then_update_status_and_no_retry(library, run_cli, tmp_path):
    root, files = library
    out = run_cli("add", str(root), IMAGES_PREFIX="")
    added, index = out["added"], out["index"]
    assert added["uploaded"] == len(files) and added["prefix"] == "" and not added["skipped"]
    store = LocalStore(tmp_path / "store", "b")
    assert sorted(o.key for o in store.list("")) == sorted(files)  # keys = relative paths
    assert index["action"] == "rebuilt" and index["count"] == LIBRARY_PHOTOS
    assert list(index["failed"]) == [BROKEN] and "image" in index["failed"][BROKEN]
    indexed = FaissIndex(tmp_path / "index").indexed(None).etags
    assert sorted(indexed) == sorted(k for k in files if k != BROKEN)

    st = run_cli("status", IMAGES_PREFIX="")
    assert st["objects"] == len(files) and st["count"] == LIBRARY_PHOTOS
    assert st["not_indexed"] == 0 and st["refused"] == 1
    assert st["refused_files"][0]["key"] == BROKEN and st["refused_files"][0]["reason"]
    assert "warnings" not in st
    # the invariant holds: the refused file is accounted for, hidden files are no photos
    ver = run_cli("verify", "--json", IMAGES_PREFIX="")
    assert ver["ok"] and ver["objects"] == LIBRARY_PHOTOS + 1 and ver["missing"]["count"] == 0
    assert ver["refused"] == {"count": 1, "first": [BROKEN]}

    # again: nothing uploaded, nothing embedded, the broken file not tried again
    again = run_cli("add", str(root), IMAGES_PREFIX="")
    assert again["added"]["unchanged"] == len(files) and again["added"]["uploaded"] == 0
    assert again["index"]["action"] == "unchanged" and again["index"]["failed"] == {}
    assert again["index"]["refused_before"] == 1

    # the broken file replaced by a photo: tried (and indexed) on the next update
    (root / BROKEN).write_bytes(image_bytes("JPEG"))
    fixed = run_cli("add", str(root), IMAGES_PREFIX="")
    assert fixed["added"]["uploaded"] == 1
    assert fixed["index"]["action"] == "updated" and fixed["index"]["added"] == 1
    assert run_cli("status", IMAGES_PREFIX="")["refused"] == 0


def test_add_under_images_prefix_and_a_sub_prefix(library, run_cli, tmp_path):
    root, files = library
    out = run_cli("add", str(root / "2024"), "--prefix", "mine", "--no-update",
                  IMAGES_PREFIX="photos/")
    assert out["added"]["prefix"] == "photos/mine/" and "index" not in out
    keys = {o.key for o in LocalStore(tmp_path / "store", "b").list("")}
    assert keys == {"photos/mine/" + k[len("2024/"):] for k in files if k.startswith("2024/")}
    # a folder is a key prefix: the index holds what IMAGES_PREFIX lists
    built = run_cli("update", IMAGES_PREFIX="photos/mine/Snow/raw/")
    assert built["count"] == 2 and built["warnings"] == []
    with pytest.raises(ValueError):
        folder_prefix("photos/", "../x")


def test_find_photos_skips_hidden_and_non_photos(library):
    root, files = library
    found = [p.relative_to(root).as_posix() for p in find_photos(root)]
    assert found == sorted(files)  # no notes.txt, no ._b.heic


def test_empty_images_prefix_is_the_whole_bucket(monkeypatch, tmp_path):
    monkeypatch.delenv("IMAGES_PREFIX", raising=False)
    (tmp_path / ".env").write_text("IMAGES_PREFIX=\nTEXT_PREFIX=\n")
    from_file = Settings(_env_file=tmp_path / ".env")
    assert from_file.images_prefix == "" and from_file.text_prefix == "flickr8k/text/"
    monkeypatch.setenv("IMAGES_PREFIX", "2024/")  # the environment before .env, as ever
    assert Settings(_env_file=tmp_path / ".env").images_prefix == "2024/"
    monkeypatch.setenv("IMAGES_PREFIX", "")
    assert Settings(_env_file=None).images_prefix == ""
    monkeypatch.setenv("TEXT_PREFIX", "")  # other settings: empty is still unset
    assert Settings(_env_file=None).text_prefix == "flickr8k/text/"
    monkeypatch.delenv("IMAGES_PREFIX")
    assert Settings(_env_file=None).images_prefix == "flickr8k/images/"


def test_a_prefix_without_photos_says_so(tmp_path, encoder):
    store = LocalStore(tmp_path / "store", "b")
    store.put("2024/Snow/b.heic", image_bytes("HEIF"))
    store.put("flickr8k/images/readme.txt", b"hello")
    prefix = Settings.model_fields["images_prefix"].default
    assert "none with a photo extension" in nothing_found(store, prefix)
    store.delete("flickr8k/images/readme.txt")
    hint = nothing_found(store, prefix)
    assert "'2024/Snow/b.heic'" in hint and "IMAGES_PREFIX=" in hint
    r = pipeline.update(store, encoder, FaissIndex(tmp_path / "i"), prefix, progress=False)
    assert r.count == 0 and r.warnings == [hint]
    st = pipeline.status(store, FaissIndex(tmp_path / "i"), prefix)
    assert st["warnings"] == [hint]
    assert list(list_images(store, "")) == ["2024/Snow/b.heic"]


def test_shards_skip_and_record_refusals(library, tmp_path, encoder):
    root, files = library
    store = LocalStore(tmp_path / "store", "b")
    add_folder(root, store, "", progress=False)
    index = FaissIndex(tmp_path / "index")
    refusals = RefusalTable.in_dir(tmp_path / "index")

    def run(**kw):
        plan = shards.plan(store, index, "", encoder.model_id, 4, 8,
                           lambda: (encoder.scoring.index_dim, None), refusals=refusals, **kw)
        reports = [shards.embed_shard(store, encoder, index, s, refusals=refusals)
                   for s in plan]
        return plan, (shards.publish_plan(index, plan[0], reports) if plan else None)

    plan, out = run()
    assert len(plan) == 3 and out["count"] == LIBRARY_PHOTOS and list(out["failed"]) == [BROKEN]
    assert list(refusals.refused(list_images(store, ""))) == [BROKEN]
    assert run() == ([], None)  # nothing changed: the refused file is no work
    plan, out = run(force_rebuild=True)
    assert out["count"] == LIBRARY_PHOTOS and out["failed"] == {} and out["refused_before"] == 1
    store.delete(BROKEN)  # gone from the store: forgotten
    pipeline.update(store, encoder, index, "", progress=False, refusals=refusals)
    assert refusals.all() == {}


def test_dag_tasks_index_the_whole_bucket_and_remember_refusals(library, tmp_path,
                                                                small_checkpoint):
    """The DAGs' task bodies with IMAGES_PREFIX empty: the same photos as the command line,
    the refused file named in the publish report and not planned again."""
    from indexer import jobs

    root, files = library
    s = Settings(_env_file=None, store_backend="local", local_store_dir=str(tmp_path / "store"),
                 index_dir=str(tmp_path / "index"), model_path=str(small_checkpoint),
                 minio_bucket="b", images_prefix="", embed_shard_size=4)
    add_folder(root, LocalStore(tmp_path / "store", "b"), "", progress=False)
    plan = jobs.plan_shards(settings=s)
    out = jobs.publish_index(plan, [jobs.embed_shard(sh, settings=s) for sh in plan], settings=s)
    assert out["count"] == LIBRARY_PHOTOS and list(out["failed"]) == [BROKEN]
    assert (tmp_path / "index" / "refused.json").is_file()
    assert jobs.plan_shards(settings=s) == []  # the refused file is no work
