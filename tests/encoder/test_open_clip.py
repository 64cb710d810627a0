"""open_clip models as encoders: `MODEL_PATH=open_clip:<arch>[:<tag or weights file>]`.

A tiny ViT architecture (tests/encoder/conftest.py) with random weights (no network).
"""
import dataclasses
import json
import logging

import numpy as np
import open_clip
import pytest
import torch

from encoder import BackboneUnavailable, Encoder, load_checkpoint, read_card
from encoder.scoring import Scoring
from tests.encoder.conftest import ARCH, TINY

PREFIX = "flickr8k/images/"


@pytest.fixture(scope="module")
def loaded(weights_file):
    return load_checkpoint(f"open_clip:{ARCH}:{weights_file}")


def _pixels(n=3, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def test_adapter_encodes_normalised_vectors(loaded):
    m = loaded.model
    assert m.config.embed_dim == 32
    spec = m.image_spec
    assert spec.input_size == 64 and len(spec.mean) == 3 and len(spec.std) == 3
    img = m.encode_images(_pixels())
    txt = m.encode_texts(["a red circle", "a blue square"])
    assert img.shape == (3, 32) and txt.shape == (2, 32)
    assert torch.allclose(img.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(txt.norm(dim=-1), torch.ones(2), atol=1e-5)
    tok = m.tokenize(["a red circle"], tensors="np")
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
    # the URL it tried and the setting that passes a local file instead
    assert ("https://huggingface.co/laion/CLIP-ViT-B-32-laion2B-s34B-b79K/resolve/main/"
            "open_clip_pytorch_model.bin") in msg
    assert "MODEL_PATH=open_clip:ViT-B-32:/path/to/open_clip_pytorch_model.bin" in msg
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
    from indexer.faiss_index import FaissIndex
    from indexer.repository import IndexRepository
    from objectstore import LocalStore

    root, meta = tiny_flickr
    enc = Encoder(loaded)
    store = LocalStore(tmp_path / "store", "b")
    repo = IndexRepository(tmp_path / "index")
    ingest(open_source(str(root)), store, split="dev", progress=False)
    r = pipeline.rebuild(store, enc, FaissIndex(repo), PREFIX, progress=False)
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

    from indexer.vector_index import open_index
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
    svc.service.index.vector_index = open_index(other.settings)
    refused = svc.service.index.reload()
    assert refused["changed"] is False and "model" in refused["error"]
    assert svc.service.index.current.model_id == loaded.model_id
    # `python -m search_api` leaves a spec to the loader, which names a missing weights file
    assert preflight(f"open_clip:{ARCH}") is None
    assert preflight("open_clip:ViT-B-32:laion2b_s34b_b79k") is None
    with pytest.raises(FileNotFoundError, match="not found"):
        load_checkpoint(f"open_clip:{ARCH}:{tmp_path}/missing.bin")
    assert "not found" in preflight(str(tmp_path / "missing.pt"))



# --- preprocessing: open_clip's own, on every path -------------------------------------------
# A preprocessing that differs from open_clip's defaults (as MobileCLIP's tags do), given the way
# a downloaded hub repository gives it: open_clip_config.json beside the weights.
MOBILECLIP_LIKE = {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0], "interpolation": "bilinear",
                   "resize_mode": "shortest"}


def _photo(w, h, seed=0, fmt="JPEG"):
    """Smooth colour gradients with noise (photo-like), encoded as `fmt`."""
    import io

    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([128 + 100 * np.sin(x / 37), 128 + 100 * np.cos(y / 53),
                    128 + 60 * np.sin((x + y) / 71)], -1) + rng.normal(0, 12, (h, w, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(buf, fmt, quality=90)
    return buf.getvalue()


def _open(data):
    import io

    from PIL import Image

    return Image.open(io.BytesIO(data)).convert("RGB")


@pytest.fixture(scope="module")
def repo_folder(tiny_arch, weights_file, tmp_path_factory):
    """A hub repository as downloaded: open_clip_config.json + open_clip_pytorch_model.bin."""
    import shutil

    d = tmp_path_factory.mktemp("oc_repo") / "tiny-clip"  # downloaded under the repo's name
    d.mkdir()
    (d / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": TINY, "preprocess_cfg": MOBILECLIP_LIKE}))
    shutil.copy(weights_file, d / "open_clip_pytorch_model.bin")
    return d


# images wider, taller, smaller and exactly the input size (the encoder's numpy fast path)
SHAPES_PX = [(300, 200), (90, 140), (40, 30), (64, 64)]


@pytest.mark.parametrize("form", ["file", "local-dir"])
def test_preprocessing_equals_open_clips_transform(form, weights_file, repo_folder):
    """Encoder.preprocess == the `preprocess` open_clip returns for the same model (resize the
    shortest side, center crop, its interpolation, mean/std, size), to 1e-5."""
    name, pretrained, spec = ((ARCH, str(weights_file), f"open_clip:{ARCH}:{weights_file}")
                              if form == "file" else
                              (f"local-dir:{repo_folder}", None, f"open_clip:local-dir:{repo_folder}"))
    _, _, reference = open_clip.create_model_and_transforms(name, pretrained=pretrained)
    enc = Encoder(load_checkpoint(spec))
    spec_ = enc.model.image_spec
    if form == "local-dir":
        assert (spec_.mean, spec_.std, spec_.interpolation) == ((0.0,) * 3, (1.0,) * 3, "bilinear")
    for i, (w, h) in enumerate(SHAPES_PX):
        img = _open(_photo(w, h, seed=i, fmt="PNG"))
        ref = reference(img)
        assert ref.shape == (3, 64, 64)
        torch.testing.assert_close(enc.preprocess(img), ref, atol=1e-5, rtol=0)


def test_decode_path_stays_close_to_open_clips_full_decode(loaded):
    """The indexer/API decode large JPEGs at reduced size (DCT scaling, both sides >= 448 px);
    after open_clip's resize + crop the pixels stay within 0.1 (max) and 0.01 (mean) of open_clip
    decoding the full image, in normalised units (about 7/255 and 0.7/255 of the pixel range)."""
    from encoder.preprocessing import decode_image

    enc = Encoder(loaded)
    for i, (w, h) in enumerate([(1600, 1200), (900, 1400)]):
        data = _photo(w, h, seed=i)
        assert max(decode_image(data).size) < max(w, h)  # the reduced decode was taken
        d = (enc.preprocess(decode_image(data)) - enc.transform(_open(data))).abs()
        assert d.max() < 0.1 and d.mean() < 0.01, (w, h, float(d.max()), float(d.mean()))


def test_onnx_path_embeds_open_clips_preprocessing(repo_folder, tmp_path):
    """Images -> embeddings through ONNX Runtime == open_clip's preprocess + its own model."""
    pytest.importorskip("onnxruntime")
    loaded_ = load_checkpoint(f"open_clip:local-dir:{repo_folder}")
    _, _, reference = open_clip.create_model_and_transforms(f"local-dir:{repo_folder}")
    onnx = Encoder(loaded_, image_runtime="onnx", onnx_cache_dir=tmp_path)
    images = [_open(_photo(w, h, seed=i)) for i, (w, h) in enumerate(SHAPES_PX)]
    with torch.no_grad():
        ref = loaded_.model.clip.encode_image(torch.stack([reference(im) for im in images]),
                                              normalize=True).numpy()
    got = onnx.encode_images(images)
    assert onnx.image_runtime == "onnx"
    np.testing.assert_allclose(got, ref, atol=1e-4)


def test_weights_file_takes_the_preprocessing_of_its_tags(tmp_path):
    """A bare weights file of an architecture whose tags all preprocess alike (MobileCLIP-S1:
    mean 0, std 1, bilinear, 256 px) gets those settings, not open_clip's defaults (resolved
    without building the model)."""
    from encoder.open_clip_model import _resolve
    from encoder.spec import OpenClipSpec

    f = tmp_path / "open_clip_pytorch_model.bin"
    f.write_bytes(b"not read here")
    r = _resolve(open_clip, OpenClipSpec.parse(f"open_clip:MobileCLIP-S1:{f}"))
    assert r.weights_file == str(f)
    assert (tuple(r.preprocess["mean"]), tuple(r.preprocess["std"])) == ((0.0,) * 3, (1.0,) * 3)
    assert (r.preprocess["interpolation"], r.preprocess["size"]) == ("bilinear", 256)


# --- hf-hub / local-dir specs, reading the card without building the model --------------------
def _hf_cache(root, repo, files: dict):
    """A Hugging Face hub cache holding `repo` at main, as huggingface_hub lays it out."""
    commit = "0" * 40
    d = root / f"models--{repo.replace('/', '--')}"
    (d / "refs").mkdir(parents=True)
    (d / "refs" / "main").write_text(commit)
    snap = d / "snapshots" / commit
    snap.mkdir(parents=True)
    for name, src in files.items():
        (snap / name).write_bytes(src.read_bytes())
    return root


@pytest.fixture
def hf_offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return monkeypatch


def test_hf_hub_spec_loads_offline_from_the_cache(hf_offline, repo_folder, tmp_path):
    import huggingface_hub.constants

    files = {n: repo_folder / n for n in ("open_clip_config.json", "open_clip_pytorch_model.bin")}
    hf_offline.setattr(huggingface_hub.constants, "HF_HUB_CACHE",
                       str(_hf_cache(tmp_path / "hub", "test-org/tiny-clip", files)))
    m = load_checkpoint("open_clip:hf-hub:test-org/tiny-clip")
    local = load_checkpoint(f"open_clip:local-dir:{repo_folder}")
    # the same config, preprocessing and weights bytes: the same model id, the same vectors
    assert m.model_id == local.model_id and m.model_id.startswith("open_clip-tiny-clip-")
    a, b = m.model.image_spec, local.model.image_spec
    assert dataclasses.replace(a, name="") == dataclasses.replace(b, name="")
    torch.testing.assert_close(m.model.encode_images(_pixels()), local.model.encode_images(_pixels()))
    assert read_card("open_clip:hf-hub:test-org/tiny-clip")["model_id"] == m.model_id


def test_hf_hub_spec_offline_is_a_clear_error(hf_offline, tmp_path):
    import huggingface_hub.constants

    hf_offline.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(BackboneUnavailable) as exc:
        load_checkpoint("open_clip:hf-hub:test-org/not-cached")
    msg = str(exc.value)
    assert "https://huggingface.co/test-org/not-cached/resolve/main/open_clip_config.json" in msg
    assert "open_clip:local-dir:" in msg and "HF_HUB_OFFLINE=1" in msg
    assert exc.value.__cause__ is None and exc.value.__suppress_context__
    with pytest.raises(ValueError, match="expected"):
        load_checkpoint("open_clip:hf-hub:")


def test_read_card_hashes_the_file_without_building_the_model(loaded, weights_file, monkeypatch):
    spec = f"open_clip:{ARCH}:{weights_file}"
    expected = {"model_id": loaded.model_id, "config": loaded.model.config.to_dict(),
                **loaded.card}

    def no_build(*a, **k):
        raise AssertionError("read_card built the model")

    monkeypatch.setattr(open_clip, "create_model", no_build)
    monkeypatch.setattr(open_clip, "create_model_and_transforms", no_build)
    assert read_card(spec) == expected


def test_random_weights_are_seeded_so_the_card_matches_the_model(tiny_arch):
    a, b = load_checkpoint(f"open_clip:{ARCH}"), load_checkpoint(f"open_clip:{ARCH}")
    assert a.model_id == b.model_id == read_card(f"open_clip:{ARCH}")["model_id"]
