"""Fast runtimes (ONNX Runtime towers) and the index-type choice (flat vs IVF)."""
import numpy as np
import pytest
import torch

from encoder import Encoder, load_checkpoint, onnx_sessions, runtime_onnx


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

    monkeypatch.setattr(onnx_sessions, "ort", unavailable)
    enc = Encoder(ref.loaded, image_runtime="onnx", text_runtime="onnx",
                  onnx_cache_dir=str(tmp_path))
    out = enc.encode_texts(TEXTS[:1])
    assert enc.text_runtime == "torch"
    assert np.allclose(out, ref.encode_texts(TEXTS[:1]), atol=1e-5)


def test_unknown_runtime_is_refused(pair):
    with pytest.raises(ValueError, match="unknown runtime"):
        Encoder(pair[0].loaded, image_runtime="tensorrt")


def test_fast_preprocess_matches_the_eval_transform(encoder):
    from PIL import Image

    rng = np.random.default_rng(0)
    size = encoder.model.image_spec.input_size
    for shape in ((size, size, 3), (size + 30, size - 20, 3)):
        im = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), "RGB")
        got, want = encoder.preprocess(im), encoder.transform(im)
        assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5)
