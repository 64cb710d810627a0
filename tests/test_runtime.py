"""Fast runtimes (ONNX Runtime towers) and the index-type choice (flat vs IVF)."""
import numpy as np
import pytest
import torch

from encoder import Encoder, load_checkpoint, runtime_onnx
from indexer import index_policy as index_mod
from indexer.repository import IndexRepository
from indexer.index_policy import (
    build_index,
    choose_index,
    index_contents,
    index_spec_of,
    needs_restructure,
)

TEXTS = ["a red circle", "two dogs playing in the snow", "a man riding a bike down the road"]


@pytest.fixture(scope="module")
def onnx_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx")


@pytest.fixture(scope="module")
def pair(small_checkpoint, onnx_cache):
    loaded = load_checkpoint(small_checkpoint)
    ref = Encoder(loaded)
    fast = Encoder(loaded, image_runtime="onnx", text_runtime="onnx",
                   onnx_cache_dir=str(onnx_cache))
    return ref, fast


def _images(tiny_flickr, enc, n=6):
    from encoder.preprocessing import decode_image

    root, meta = tiny_flickr
    return torch.stack([enc.preprocess(decode_image((root / "Images" / name).read_bytes()))
                        for name in meta["names"][:n]])


def test_onnx_towers_match_eager_pytorch(pair, tiny_flickr):
    ref, fast = pair
    assert fast.model_id == ref.model_id  # the runtime never changes the model id
    px = _images(tiny_flickr, ref)
    a, b = ref.encode_pixels(px), fast.encode_pixels(px)
    assert b.shape == a.shape and (a * b).sum(1).min() >= 0.999
    a, b = ref.encode_texts(TEXTS), fast.encode_texts(TEXTS)
    assert (a * b).sum(1).min() >= 0.999
    assert fast.image_runtime == fast.text_runtime == "onnx"  # no silent fallback
    # batch of one and a different sequence length go through the dynamic axes
    one = fast.encode_texts(["a much longer query about a small brown dog running on grass"])
    assert one.shape == (1, ref.dim) and abs(np.linalg.norm(one) - 1) < 1e-4


def test_exported_graphs_are_cached_per_model_id(pair, onnx_cache):
    ref, fast = pair
    folder = onnx_cache / ref.model_id
    stamp = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.onnx")}
    assert {"image.onnx", "text.onnx"} <= set(stamp)
    again = Encoder(ref.loaded, image_runtime="onnx", text_runtime="onnx",
                    onnx_cache_dir=str(onnx_cache))
    again.encode_texts(["x"])
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("*.onnx")} == stamp


def test_int8_text_tower_stays_close(pair, onnx_cache):
    ref, _ = pair
    q = Encoder(ref.loaded, text_runtime="onnx-int8", onnx_cache_dir=str(onnx_cache))
    a, b = ref.encode_texts(TEXTS), q.encode_texts(TEXTS)
    assert q.text_runtime == "onnx-int8" and (a * b).sum(1).min() >= 0.95


def test_int8_image_without_calibration_runs_fp32_graph(pair, onnx_cache, tiny_flickr, caplog):
    ref, _ = pair
    q = Encoder(ref.loaded, image_runtime="onnx-int8", onnx_cache_dir=str(onnx_cache))
    px = _images(tiny_flickr, ref, 2)
    out = q.encode_pixels(px)
    assert "no calibrated int8 image graph" in caplog.text
    assert (out * ref.encode_pixels(px)).sum(1).min() >= 0.999


def test_missing_onnxruntime_falls_back_to_torch(pair, tmp_path, monkeypatch):
    ref, _ = pair

    def unavailable():
        raise runtime_onnx.OnnxUnavailable("onnxruntime is not installed")

    monkeypatch.setattr(runtime_onnx, "_ort", unavailable)
    enc = Encoder(ref.loaded, image_runtime="onnx", text_runtime="onnx",
                  onnx_cache_dir=str(tmp_path))
    out = enc.encode_texts(TEXTS[:1])
    assert enc.text_runtime == "torch"
    assert np.allclose(out, ref.encode_texts(TEXTS[:1]), atol=1e-5)


def test_unknown_runtime_is_refused(pair):
    with pytest.raises(ValueError, match="unknown runtime"):
        Encoder(pair[0].loaded, image_runtime="tensorrt")


# --- index type by collection size --------------------------------------------------------
def _clustered(n, d, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((40, d)).astype(np.float32)
    x = centers[rng.integers(0, 40, n)] + 0.5 * rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_choose_index_goes_from_flat_to_ivf_by_size():
    assert choose_index(1000, 256).kind == "flat"
    assert choose_index(40_000, 256).kind == "flat"
    assert choose_index(50_000, 256).kind == "ivf"
    big = choose_index(1_000_000, 256)
    assert big.kind == "ivf" and big.nlist == 4096
    assert choose_index(100_000, 256).nlist == 1024


def test_ivf_keeps_ids_removal_and_reaches_recall(tmp_path):
    x = _clustered(4000, 32)
    ids = np.arange(4000, dtype=np.int64) * 2 + 5
    spec = choose_index(len(x), 32, flat_max_madds=100)
    index, params = build_index(x, ids, spec)
    assert params["kind"] == "ivf" and params["tuned_recall_at_10"] >= 0.95
    index.remove_ids(np.array([5, 7], dtype=np.int64))
    index.add_with_ids(x[:1], np.array([99_999], dtype=np.int64))
    assert np.allclose(index.reconstruct(99_999), x[0])
    got_ids, got_vecs = index_contents(index)
    assert len(got_ids) == 3999 and 5 not in set(got_ids.tolist())
    # published and loaded back: same type, same nprobe, manifest records the choice
    repo = IndexRepository(tmp_path)
    keep = np.isin(ids, [5, 7], invert=True)
    all_ids = np.concatenate([ids[keep], [99_999]])
    repo.publish(index, all_ids, [f"k{i}" for i in all_ids], ["e"] * len(all_ids), "m",
                 extra={"index_params": params})
    cur = repo.load()
    assert cur.manifest["index_type"] == "IndexIVFFlat"
    assert cur.manifest["index_params"]["nprobe"] == params["nprobe"]
    assert index_spec_of(cur.index).nprobe == params["nprobe"]
    _, keys = cur.search(x[10:11], 1)
    assert keys[0] == [f"k{ids[10]}"]


def test_update_restructures_when_the_collection_outgrows_flat(monkeypatch):
    x = _clustered(3000, 16)
    flat, _ = build_index(x, np.arange(3000))
    assert index_spec_of(flat).kind == "flat" and not needs_restructure(flat, 3000)
    monkeypatch.setattr(index_mod, "FLAT_MAX_MADDS", 1000)
    assert needs_restructure(flat, 3000)
    new, params = index_mod.rebuild_structure(flat)
    assert params["kind"] == "ivf" and new.ntotal == 3000
    assert np.allclose(new.reconstruct(1234), x[1234])


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
    for infos, pixels, bad in iter_batches(store, encoder, objects, batch_size=5):
        assert pixels is None or len(pixels) == len(infos)
        seen += [i.key for i in infos]
        failed.update(bad)
    assert seen == [o.key for o in objects if o.key != "img/broken.jpg"]
    assert list(failed) == ["img/broken.jpg"]


def test_fast_preprocess_matches_the_eval_transform(encoder):
    from PIL import Image

    rng = np.random.default_rng(0)
    size = encoder.model.image_backbone.spec.input_size
    for shape in ((size, size, 3), (size + 30, size - 20, 3)):
        im = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), "RGB")
        got, want = encoder.preprocess(im), encoder.transform(im)
        assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5)
