"""The serving bundle and the torch-free serving path: the same tokens, pixels, embeddings,
scoring and ranks as the torch path, for our dual encoder and an open_clip model; a bundle that
does not match its checkpoint is refused, naming the command that rewrites it."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from encoder import DualEncoder, Encoder, ModelConfig, load_checkpoint, read_card, \
    save_checkpoint, update_card
from encoder.bundle import FORMAT, BundleMissing, StaleBundle, check_tokenizer, ensure_bundle, \
    read_bundle, write_bundle
from encoder.pixels import ImageSpec, PixelNormalizer
from encoder.preprocessing import decode_image, eval_transform
from encoder.serving import ServingEncoder
from encoder.tokens import ONE_BY_ONE_MAX
from tests.conftest import save_banked_checkpoint
from tests.encoder.test_preprocessing import _photo

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "models" / "flickr8k-dual-encoder.pt"
FLICKR8K = ROOT.parent / "shared" / "datasets" / "flickr8k"
OPENAI = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
TEXTS = ["two dogs playing in the snow", "a child", "Crème brûlée & “quotes”", ""]


def _photos(n: int = 12) -> list:
    """Real photos of several sizes (Flickr8k when it is here), else photo-like synthetic ones."""
    files = sorted((FLICKR8K / "Images").glob("*.jpg"))[:n] if FLICKR8K.is_dir() else []
    if files:
        return [decode_image(f.read_bytes()) for f in files]
    return [_photo(w, h, seed=i) for i, (w, h) in
            enumerate([(500, 375), (333, 500), (640, 427), (260, 260), (1024, 768)] * 2)]


SPECS = [
    ImageSpec("efficientnet_lite2", 260, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 1280),
    ImageSpec("mobilenet_v3_small", 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 576),
    ImageSpec("open_clip", 224, *OPENAI, 512, resize_mode="shortest", interpolation="bicubic"),
    ImageSpec("open_clip", 224, *OPENAI, 512, resize_mode="squash", interpolation="bilinear"),
    ImageSpec("open_clip", 64, *OPENAI, 512, resize_mode="longest", interpolation="bicubic"),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.name}-{s.resize_mode}")
def test_numpy_pixels_equal_the_eval_transform(spec):
    """Within one 8-bit level anywhere, and a hundredth of a level on average."""
    tf, numpy_tf = eval_transform(spec), PixelNormalizer(spec)
    std = np.asarray(spec.std)[:, None, None]
    for img in _photos():
        want, got = tf(img).numpy(), numpy_tf(img)
        assert got.shape == want.shape == (3, spec.input_size, spec.input_size)
        levels = np.abs(got - want) * std * 255
        assert levels.max() <= 1.0 + 1e-3 and levels.mean() < 0.02


@pytest.fixture(scope="module")
def banked(tmp_path_factory) -> Path:
    return save_banked_checkpoint(tmp_path_factory.mktemp("bundle") / "banked.pt", 32, 30, 2)


def _assert_serves_like(encoder: Encoder, serving: ServingEncoder) -> None:
    assert serving.model_id == encoder.model_id and serving.dim == encoder.dim
    check_tokenizer(encoder.model, serving.tokenizer)
    # more texts than are tokenized one at a time: the batched call, padded the same
    many = [" ".join(["a dog"] * (i % 9 + 1)) + "." for i in range(ONE_BY_ONE_MAX + 6)]
    check_tokenizer(encoder.model, serving.tokenizer, many)
    cos = (serving.encode_texts(TEXTS) * encoder.encode_texts(TEXTS)).sum(1)
    assert cos.min() > 0.9999
    images = _photos(4)
    cos = (serving.encode_images(images) * encoder.encode_images(images)).sum(1)
    assert cos.min() > 0.9999
    mine, theirs = serving.scoring, encoder.scoring
    assert (mine.index_dim, mine.readback_column, mine.temperature) == \
        (theirs.index_dim, theirs.readback_column, theirs.temperature)
    emb = encoder.encode_images(images)
    np.testing.assert_array_equal(mine.image_vectors(emb), theirs.image_vectors(emb))
    # the explanation map: the bundle's cells graph, as eager PyTorch computes it
    q = encoder.encode_texts(TEXTS[:1])[0]
    want = encoder.explain_map(encoder.preprocess(images[0]), q)
    assert np.allclose(serving.explain_map(serving.preprocess(images[0]), q), want, atol=2e-3)


def test_dual_encoder_bundle_serves_like_the_checkpoint(banked, tmp_path):
    folder = write_bundle(banked, cache_dir=tmp_path / "onnx")
    assert folder == banked.parent / "banked.bundle"
    assert {p.name for p in folder.iterdir()} >= {"bundle.json", "image.onnx", "text.onnx",
                                                  "text.int8.onnx", "tokenizer.json", "bank.npy",
                                                  "image.cells.onnx"}
    serving = ServingEncoder(read_bundle(banked))
    assert serving.scoring.corrected
    assert serving.loaded_towers == []  # each tower on first use
    serving.warmup()
    assert serving.loaded_towers == ["text"]
    _assert_serves_like(Encoder.from_checkpoint(str(banked)), serving)
    assert serving.loaded_towers == ["image", "image.cells", "text"]


def test_a_family_without_a_spatial_map_bundles_without_the_cells_graph(weights_file, tmp_path,
                                                                      monkeypatch):
    from encoder.errors import NoSpatialMap
    from encoder.open_clip_model import OpenClipEncoder

    def no_map(self, pixels):
        raise NoSpatialMap()

    monkeypatch.setattr(OpenClipEncoder, "cell_embeddings", no_map)
    spec = f"open_clip:test-tiny-vit:{weights_file}"
    write_bundle(spec, cache_dir=tmp_path)
    bundle = read_bundle(spec, cache_dir=tmp_path)
    assert bundle.graph("image.cells") is None and bundle.graph("image") is not None
    with pytest.raises(NoSpatialMap, match="spatial feature map"):
        ServingEncoder(bundle).explain_map(np.zeros((3, 64, 64), np.float32), np.ones(32))


def test_open_clip_bundle_serves_like_the_spec(weights_file, tmp_path):
    spec = f"open_clip:test-tiny-vit:{weights_file}"
    encoder = Encoder(load_checkpoint(spec))
    folder = write_bundle(spec, cache_dir=tmp_path, loaded=encoder.loaded)
    assert folder.parent == tmp_path / "bundles"
    bundle = read_bundle(spec, cache_dir=tmp_path)
    assert bundle.image_spec == encoder.model.image_spec
    assert bundle.manifest["tokenizer"]["mask"] == "nonzero"
    _assert_serves_like(encoder, ServingEncoder(bundle))
    long_texts = ["a photo of " * 60, "ok!", "NEW\nLINES\tand    spaces", "&lt;b&gt;bold"]
    check_tokenizer(encoder.model, bundle.tokenizer(), long_texts)


def test_a_stale_or_missing_bundle_names_the_command(banked, tmp_path):
    path = tmp_path / "m.pt"
    shutil.copy(banked, path)
    shutil.copy(banked.with_suffix(".card.json"), path.with_suffix(".card.json"))
    with pytest.raises(BundleMissing, match=r"python -m encoder bundle .*m\.pt"):
        read_bundle(path)
    write_bundle(path, cache_dir=tmp_path / "onnx")
    update_card(path, note="evaluated")  # the file changes, the model does not
    assert read_bundle(path).model_id == load_checkpoint(path).model_id
    torch.manual_seed(3)  # another model saved under the same name
    save_checkpoint(DualEncoder(ModelConfig(embed_dim=32)), path)
    with pytest.raises(StaleBundle, match=r"made for model .*python -m encoder bundle"):
        read_bundle(path)
    path.with_suffix(".card.json").unlink()  # without its card: the file's bytes decide
    with pytest.raises(StaleBundle, match="changed since the bundle was made"):
        read_bundle(path)


def test_ensure_bundle_writes_a_missing_one_once_with_the_command(banked, tmp_path):
    path = tmp_path / "m.pt"
    shutil.copy(banked, path)
    shutil.copy(banked.with_suffix(".card.json"), path.with_suffix(".card.json"))
    write_bundle(banked, cache_dir=tmp_path / "onnx")  # the child reuses these exported graphs
    bundle = ensure_bundle(path, cache_dir=tmp_path / "onnx")  # `python -m encoder bundle`
    assert bundle.dir == tmp_path / "m.bundle"
    assert bundle.model_id == read_card(path)["model_id"]
    assert ensure_bundle(path, cache_dir=tmp_path / "onnx").manifest == bundle.manifest
    # a bundle written before the cells graph (format /1) is rewritten once, with it
    manifest = json.loads((bundle.dir / "bundle.json").read_text())
    old = {**manifest, "format": "flickr-search-serving-bundle/1",
           "graphs": {k: v for k, v in manifest["graphs"].items() if k != "image.cells"}}
    (bundle.dir / "bundle.json").write_text(json.dumps(old))
    with pytest.raises(StaleBundle, match="unknown format"):
        read_bundle(path)
    assert ensure_bundle(path, cache_dir=tmp_path / "onnx").graph("image.cells").is_file()


def test_bundle_if_needed_keeps_a_fresh_bundle_rewrites_a_stale_one(banked, tmp_path, capsys):
    """`python -m encoder bundle --if-needed`: what a deployment runs at every start."""
    from encoder.__main__ import main

    path = tmp_path / "m.pt"
    shutil.copy(banked, path)
    shutil.copy(banked.with_suffix(".card.json"), path.with_suffix(".card.json"))
    args = ["bundle", str(path), "--cache-dir", str(tmp_path / "onnx"), "--if-needed"]
    assert main(args) == 0  # none yet: written
    manifest = tmp_path / "m.bundle" / "bundle.json"
    written = manifest.stat().st_mtime_ns
    assert main(args) == 0 and manifest.stat().st_mtime_ns == written  # fresh: kept
    assert capsys.readouterr().out.split() == [str(tmp_path / "m.bundle")] * 2
    manifest.write_text(manifest.read_text().replace(FORMAT, "flickr-search-serving-bundle/1"))
    assert main(args) == 0 and read_bundle(path).manifest["format"] == FORMAT  # stale: rewritten


def test_a_read_only_checkpoint_folder_keeps_its_bundle_in_the_cache(banked, tmp_path,
                                                                    monkeypatch):
    import encoder.bundle as bundle_module

    path = tmp_path / "ro" / "m.pt"
    path.parent.mkdir()
    shutil.copy(banked, path)
    real_access = os.access
    monkeypatch.setattr(bundle_module.os, "access",  # as a read-only mount answers
                        lambda p, mode: Path(p) != path.parent and real_access(p, mode))
    folder = write_bundle(path, cache_dir=tmp_path / "onnx")
    assert folder.parent == tmp_path / "onnx" / "bundles" and not (path.parent / "m.bundle").exists()
    assert read_bundle(path, cache_dir=tmp_path / "onnx").dir == folder


def test_reading_and_serving_import_no_torch(banked, tmp_path):
    write_bundle(banked, cache_dir=tmp_path / "onnx")
    code = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("torch", "torchvision"):
            raise ImportError("blocked " + name)
sys.meta_path.insert(0, Block())
from PIL import Image
from encoder.bundle import read_bundle
from encoder.serving import ServingEncoder
enc = ServingEncoder(read_bundle({str(banked)!r}))
q = enc.scoring.query_vectors(enc.encode_texts(["a dog"]))
v = enc.scoring.image_vectors(enc.encode_images([Image.new("RGB", (300, 200), "red")]))
print(q.shape, v.shape)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["(1,", "33)", "(1,", "33)"]


@pytest.mark.skipif(not (FLICKR8K / "Images").is_dir(), reason="needs the Flickr8k dataset")
def test_recall_through_the_serving_path_equals_the_evaluation(tmp_path):
    """The shipped model on a slice of dev: the ranks the evaluation command reports, from the
    serving path (bundle towers, NumPy pixels, NumPy scoring, exact inner-product search)."""
    from training.data import load_splits
    from training.evaluate import evaluate_checkpoint
    from training.recall import summarize, _ranks_t2i

    split = load_splits(["dev"], str(FLICKR8K))[0][0].subset(60)
    want = evaluate_checkpoint(str(SHIPPED), split, cache_dir=None, use_cache=False)
    write_bundle(SHIPPED, out=tmp_path / "bundle", cache_dir=tmp_path / "onnx")
    serving = ServingEncoder(read_bundle(SHIPPED, directory=tmp_path / "bundle"))
    images = [decode_image(split.read(name)) for name in split.images]
    texts, owner = split.flat_captions()
    stored = serving.scoring.image_vectors(
        np.concatenate([serving.encode_images(images[i:i + 16]) for i in range(0, 60, 16)]))
    queries = serving.scoring.query_vectors(serving.encode_texts(texts))
    ranks = _ranks_t2i(torch.from_numpy(queries @ stored.T), torch.as_tensor(owner))
    got, expected = summarize(ranks, (1, 5, 10)), dict(want["text_to_image"])
    # recalls and median exactly; the mean rank may move by a near-tie that ONNX's float
    # order and eager PyTorch's break apart (one of 300 queries by one place: 0.0033)
    assert abs(got.pop("mean_rank") - expected.pop("mean_rank")) <= 0.02
    assert got == expected


def test_the_service_opens_the_image_tower_at_start_only_when_asked(banked, tmp_path):
    """IMAGE_TOWER_AT_START: the bundle's image tower opened by build_service, or on the first
    image request (the default: a text-only deployment never pays for it)."""
    from core.settings import Settings
    from objectstore import LocalStore
    from search_api.main import build_service

    write_bundle(banked, cache_dir=tmp_path / "onnx")
    base = dict(_env_file=None, model_path=str(banked), index_dir=str(tmp_path / "index"),
                onnx_cache_dir=str(tmp_path / "onnx"), reload_interval_s=0)
    store = LocalStore(tmp_path / "store", "b")
    lazy = build_service(Settings(**base), store=store)
    eager = build_service(Settings(**base, image_tower_at_start=True), store=store)
    try:
        assert lazy.encoders.encoder.loaded_towers == ["text"]
        assert eager.encoders.encoder.loaded_towers == ["image", "text"]
    finally:
        for service in (lazy, eager):
            service.stop()
