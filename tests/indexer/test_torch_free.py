"""The indexer embeds from the model's serving bundle with torch made unimportable: `python -m
indexer rebuild` and the DAGs' embedding task publish the keys the torch-loaded pipeline
publishes, in the same order, with vectors within the service's tolerance (JPEG, HEIC and camera
RAW photos, a refused file); without a bundle the error names the command that writes it."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flickr8k.sources import open_source
from indexer import pipeline
from indexer.faiss_index import FaissIndex
from indexer.ingest import ingest
from indexer.repository import IndexRepository
from objectstore import LocalStore
from tests.conftest import save_banked_checkpoint, torch_blocked
from tests.indexer.helpers import PREFIX
from tests.photo_samples import dng_bytes, photo_bytes

ROOT = Path(__file__).resolve().parents[2]
BLOCKER = torch_blocked("indexer")
VECTOR_TOL = 2e-3  # eager PyTorch vs ONNX Runtime (the service's SCORE_TOL)
BROKEN = f"{PREFIX}broken.jpg"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A dual encoder with a query bank (index vectors carry the hubness bias column), its eager
    PyTorch encoder, and its serving bundle written beside it."""
    from encoder import Encoder
    from encoder.bundle import write_bundle

    tmp = tmp_path_factory.mktemp("lean_indexer")
    path = save_banked_checkpoint(tmp / "banked.pt", 64, 40, 1)
    eager = Encoder.from_checkpoint(str(path))
    write_bundle(path, cache_dir=tmp / "onnx", loaded=eager.loaded)
    return path, eager


@pytest.fixture(scope="module")
def store(tiny_flickr, tmp_path_factory) -> LocalStore:
    """The tiny Flickr8k's dev photos, a HEIC and a DNG of the user's, and a file no decoder
    reads."""
    store = LocalStore(tmp_path_factory.mktemp("lean_store"), "b")
    ingest(open_source(str(tiny_flickr[0])), store, split="dev", progress=False)
    store.put(f"{PREFIX}phone/IMG_0001.heic", photo_bytes("HEIF", None, size=(80, 60)))
    store.put(f"{PREFIX}camera/DSC_0001.dng", dng_bytes(64, 48, rgb=(0.2, 0.5, 0.7)))
    store.put(BROKEN, b"\xff\xd8\xff\xe0 truncated")
    return store


@pytest.fixture(scope="module")
def reference(model, store, tmp_path_factory) -> IndexRepository:
    """What the torch-loaded pipeline publishes (eager PyTorch towers)."""
    folder = tmp_path_factory.mktemp("reference") / "index"
    report = pipeline.rebuild(store, model[1], FaissIndex(folder), PREFIX, batch_size=4,
                              progress=False)
    assert list(report.failed) == [BROKEN]
    return IndexRepository(folder)


def _env(model_path, store: LocalStore, index_dir: Path, attempts: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MODEL_PATH": str(model_path),
           "STORE_BACKEND": "local", "LOCAL_STORE_DIR": str(store.root.parent),
           "MINIO_BUCKET": store.bucket, "INDEX_BACKEND": "faiss", "INDEX_DIR": str(index_dir),
           "ONNX_CACHE_DIR": str(index_dir.parent / "onnx"), "EMBED_BATCH_SIZE": "4",
           "TORCH_ATTEMPTS": str(attempts)}
    for name in ("IMAGE_RUNTIME", "TEXT_RUNTIME", "DEVICE", "IMAGES_PREFIX"):
        env.pop(name, None)  # the defaults: the bundle's image tower on the CPU
    return env


def _run_blocked(args: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    Path(env["TORCH_ATTEMPTS"]).write_text("")
    return subprocess.run([sys.executable, "-c", BLOCKER, *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def _assert_same_index(got: IndexRepository, want: IndexRepository) -> None:
    a, b = got.load(), want.load()
    assert a.keys == b.keys  # same keys, same order
    assert a.model_id == b.model_id
    va = a.vectors_of_ids(a.ids)
    vb = b.vectors_of_ids(b.ids)
    assert va.shape == vb.shape and va.shape[1] == 65  # 64-d embedding + the bias column
    assert np.abs(va - vb).max() < VECTOR_TOL
    cosine = (va[:, :64] * vb[:, :64]).sum(1)
    assert cosine.min() > 0.9999


def test_rebuild_embeds_from_the_bundle_without_torch(model, store, reference, tmp_path):
    index_dir = tmp_path / "index"
    attempts = tmp_path / "torch_imports.txt"
    done = _run_blocked(["--quiet", "rebuild"], _env(model[0], store, index_dir, attempts),
                        tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert attempts.read_text() == "", "the indexer tried to import torch"
    report = json.loads(done.stdout)
    assert report["action"] == "rebuilt" and list(report["failed"]) == [BROKEN]
    assert report["count"] == len(reference.load().keys)
    assert any(k.endswith(".heic") for k in reference.load().keys)
    assert any(k.endswith(".dng") for k in reference.load().keys)
    assert "first batch embedded (4 photos)" in done.stderr  # the start-up cost is reported
    _assert_same_index(IndexRepository(index_dir), reference)


def test_the_embedding_task_runs_from_the_bundle_without_torch(model, store, reference,
                                                               tmp_path, monkeypatch):
    """The DAGs' tail: plan_shards (which finds the bundle) -> embed_shard per shard in a
    process without torch -> publish_index."""
    from core.settings import Settings
    from indexer import jobs

    env = _env(model[0], store, tmp_path / "index", tmp_path / "torch_imports.txt")
    s = Settings(_env_file=None, store_backend="local", local_store_dir=env["LOCAL_STORE_DIR"],
                 minio_bucket=store.bucket, index_dir=env["INDEX_DIR"], model_path=str(model[0]),
                 onnx_cache_dir=env["ONNX_CACHE_DIR"], embed_shard_size=4, images_prefix=PREFIX)
    plan = jobs.plan_shards(settings=s)
    assert len(plan) > 1
    embedded = []
    for shard in plan:
        code = ("import json, sys; from indexer import jobs; "
                f"print(json.dumps(jobs.embed_shard(json.loads({json.dumps(shard)!r}))))")
        done = _run_blocked(["--code", code], env, tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        assert Path(env["TORCH_ATTEMPTS"]).read_text() == "", "embed_shard imported torch"
        embedded.append(json.loads(done.stdout.strip().splitlines()[-1]))
    published = jobs.publish_index(plan, embedded, settings=s)
    assert published["action"] == "rebuilt"
    _assert_same_index(IndexRepository(s.index_dir), reference)


def test_without_a_bundle_or_torch_the_error_names_the_command(model, store, tmp_path):
    copy = shutil.copy(model[0], tmp_path / "copy.pt")  # a checkpoint without a bundle
    shutil.copy(model[0].with_suffix(".card.json"), tmp_path / "copy.card.json")
    attempts = tmp_path / "torch_imports.txt"
    done = _run_blocked(["--quiet", "rebuild"],
                        _env(copy, store, tmp_path / "index", attempts), tmp_path)
    assert done.returncode == 1
    assert "no serving bundle" in done.stderr and "python -m encoder bundle" in done.stderr
    assert IndexRepository(tmp_path / "index").current_version() is None
