"""open_clip models as encoders: `MODEL_PATH=open_clip:<arch>[:<tag or weights file>]`.

A tiny ViT architecture is registered from a JSON config here, with random weights (no network).
"""
import json
import logging

import numpy as np
import open_clip
import pytest
import torch

from encoder import BackboneUnavailable, Encoder, load_checkpoint, read_card
from encoder.scoring import Scoring

ARCH = "test-tiny-vit"
TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
PREFIX = "flickr8k/images/"


@pytest.fixture(scope="module")
def tiny_arch(tmp_path_factory):
    d = tmp_path_factory.mktemp("oc_cfg")
    (d / f"{ARCH}.json").write_text(json.dumps(TINY))
    open_clip.add_model_config(d)
    assert ARCH in open_clip.list_models()
    return ARCH


@pytest.fixture(scope="module")
def weights_file(tiny_arch, tmp_path_factory):
    torch.manual_seed(0)
    clip = open_clip.create_model(tiny_arch, pretrained=None)
    path = tmp_path_factory.mktemp("oc_w") / "open_clip_pytorch_model.bin"
    torch.save(clip.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def loaded(weights_file):
    return load_checkpoint(f"open_clip:{ARCH}:{weights_file}")


def _pixels(n=3, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def test_adapter_encodes_normalised_vectors(loaded):
    m = loaded.model
    assert m.config.embed_dim == 32
    spec = m.image_backbone.spec
    assert spec.input_size == 64 and len(spec.mean) == 3 and len(spec.std) == 3
    img = m.encode_images(_pixels())
    txt = m.encode_texts(["a red circle", "a blue square"])
    assert img.shape == (3, 32) and txt.shape == (2, 32)
    assert torch.allclose(img.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(txt.norm(dim=-1), torch.ones(2), atol=1e-5)
    tok = m.text_backbone.tokenize(["a red circle"], tensors="np")
    assert tok["input_ids"].dtype == np.int64 and tok["attention_mask"].sum() < 77
    same = m.encode_text_tokens(torch.from_numpy(tok["input_ids"]),
                                torch.from_numpy(tok["attention_mask"]))
    assert torch.allclose(same, txt[:1], atol=1e-6)
    # open_clip's own normalised embeddings
    ref = m.clip.encode_image(_pixels(), normalize=True)
    assert torch.allclose(img, ref, atol=1e-6)
    # plain cosine scoring: an empty query bank
    sc = Scoring.of(m)
    assert not sc.corrected and sc.index_dim == 32


def test_model_id_stable_and_tracks_weights(tiny_arch, weights_file, loaded, tmp_path):
    again = load_checkpoint(f"open_clip:{ARCH}:{weights_file}")
    assert again.model_id == loaded.model_id and loaded.model_id.startswith(f"open_clip-{ARCH}-")
    assert read_card(f"open_clip:{ARCH}:{weights_file}")["model_id"] == loaded.model_id
    state = torch.load(weights_file, weights_only=True)
    state["logit_scale"] = state["logit_scale"] + 0.01
    other = tmp_path / "changed.bin"
    torch.save(state, other)
    assert load_checkpoint(f"open_clip:{ARCH}:{other}").model_id != loaded.model_id


def test_random_weights_warn(tiny_arch, caplog):
    with caplog.at_level(logging.WARNING):
        m = load_checkpoint(f"open_clip:{ARCH}")
    assert "RANDOM" in caplog.text and m.card["pretrained"] is None


def test_pretrained_tag_offline_is_a_clear_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackboneUnavailable) as exc:
        load_checkpoint("open_clip:ViT-B-32:laion2b_s34b_b79k")
    msg = str(exc.value)
    assert "laion2b_s34b_b79k" in msg and "weights file" in msg
    assert exc.value.__cause__ is None and exc.value.__suppress_context__


def test_bad_specs_are_value_errors(tiny_arch, tmp_path):
    with pytest.raises(ValueError, match="unknown open_clip architecture"):
        load_checkpoint("open_clip:no-such-arch")
    with pytest.raises(ValueError, match="unknown pretrained tag"):
        load_checkpoint("open_clip:ViT-B-32:no_such_tag")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(f"open_clip:{ARCH}:{tmp_path}/missing.bin")
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"not weights")
    with pytest.raises(ValueError):
        load_checkpoint(f"open_clip:{ARCH}:{bad}")


def test_encoder_torch_and_onnx_agree(loaded, tmp_path):
    pytest.importorskip("onnxruntime")
    eager = Encoder(loaded, image_runtime="torch", text_runtime="torch")
    onnx = Encoder(loaded, image_runtime="onnx", text_runtime="onnx", onnx_cache_dir=tmp_path)
    texts = ["a red circle", "two dogs playing in the snow"]
    pixels = _pixels(4)
    a, b = eager.encode_pixels(pixels), onnx.encode_pixels(pixels)
    ta, tb = eager.encode_texts(texts), onnx.encode_texts(texts)
    # the exported graphs run (no fallback to torch)
    assert onnx.image_runtime == "onnx" and onnx.text_runtime == "onnx"
    assert (tmp_path / loaded.model_id / "image.onnx").is_file()
    assert (tmp_path / loaded.model_id / "text.onnx").is_file()
    assert a.shape == (4, 32) and ta.shape == (2, 32)
    np.testing.assert_allclose(a, b, atol=1e-4)
    np.testing.assert_allclose(ta, tb, atol=1e-4)


def test_index_with_open_clip_finds_image_by_itself(tiny_flickr, tmp_path, loaded):
    from encoder.preprocessing import decode_image
    from flickr8k.sources import open_source
    from indexer import pipeline
    from indexer.ingest import ingest
    from indexer.repository import IndexRepository
    from objectstore import LocalStore

    root, meta = tiny_flickr
    enc = Encoder(loaded)
    store = LocalStore(tmp_path / "store", "b")
    repo = IndexRepository(tmp_path / "index")
    ingest(open_source(str(root)), store, split="dev", progress=False)
    r = pipeline.rebuild(store, enc, repo, PREFIX, progress=False)
    assert r.count == len(meta["dev"])
    idx = repo.load(expect_model_id=loaded.model_id)
    assert idx.model_id == loaded.model_id
    for name in meta["dev"][:3]:
        key = f"{PREFIX}{name}"
        q = enc.encode_images([decode_image(store.get(key))])
        scores, keys = idx.search(enc.scoring.query_vectors(q), 3)
        assert keys[0][0] == key and scores[0][0] > 0.999


def test_api_serves_an_open_clip_model_and_refuses_another_models_index(tiny_flickr, tmp_path,
                                                                         loaded, encoder):
    from fastapi.testclient import TestClient

    from search_api.__main__ import preflight
    from tests.search_api.helpers import build_service

    root, _ = tiny_flickr
    svc = build_service(tmp_path / "oc", root, Encoder(loaded))
    with TestClient(svc.app) as c:
        h = c.get("/health").json()
        assert h["model_id"] == loaded.model_id and h["vector_count"] > 0
        r = c.post("/search_images_by_text", json={"query": "a red circle", "top_k": 3})
        assert r.status_code == 200 and len(r.json()["results"]) == 3
    # an index built by the shipped-style model is refused by a service on the open_clip model
    other = build_service(tmp_path / "ours", root, encoder)
    svc.state.repo = other.repo
    refused = svc.state.reload()
    assert refused["changed"] is False and "model" in refused["error"]
    assert svc.state.index.model_id == loaded.model_id
    # `python -m search_api` leaves a spec to the loader, which names a missing weights file
    assert preflight(f"open_clip:{ARCH}") is None
    assert preflight("open_clip:ViT-B-32:laion2b_s34b_b79k") is None
    with pytest.raises(FileNotFoundError, match="not found"):
        load_checkpoint(f"open_clip:{ARCH}:{tmp_path}/missing.bin")
    assert "not found" in preflight(str(tmp_path / "missing.pt"))

