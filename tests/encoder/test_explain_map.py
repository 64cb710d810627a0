"""The explanation map each model family gives (our dual encoder: each cell of the last feature
map's contribution to the photo's score, exact; open_clip ViTs: the query's cosine with the
patch tokens through the final norm and projection; cells against the match at 0), the same
from eager PyTorch and the exported cells graph, and peaking where the query's object is."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from encoder import Encoder, load_checkpoint
from encoder.errors import NoSpatialMap
from encoder.scoring import cell_map
from tests.encoder.conftest import ARCH


@pytest.fixture(scope="module")
def onnx_encoder(small_checkpoint, tmp_path_factory):
    return Encoder.from_checkpoint(str(small_checkpoint), image_runtime="onnx",
                                   onnx_cache_dir=tmp_path_factory.mktemp("onnx"))


def _pixels(seed: int = 0, size: int = 224) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 3, size // 16, size // 16, generator=g) * 2 - 1
    return F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)[0]


def test_dual_encoder_map_is_each_cells_contribution_to_the_score(encoder, onnx_encoder):
    model = encoder.model
    x = _pixels()
    q = F.normalize(torch.randn(64, generator=torch.Generator().manual_seed(1)), dim=0).numpy()
    with torch.inference_mode():
        fmap = model.image_backbone(x[None])  # [1, C, h, w]
        direct = model.image_head.proj(fmap.permute(0, 2, 3, 1))[0]  # not normalised
        cells = model.cell_embeddings(x[None])[0]
        # the embedding before its normalisation is the cells' average (a linear head), so
        # the photo's score with q is the cells' contributions' average, divided by its norm
        unnormalised = model.image_head(fmap)[0]
        pooled = model.encode_images(x[None])[0]
    assert torch.allclose(cells, direct, atol=1e-5)
    assert torch.allclose(cells.mean((0, 1)), unnormalised, atol=1e-5)
    score = float(pooled.numpy() @ q)
    assert float((cells.numpy() @ q).mean() / unnormalised.norm()) == pytest.approx(score,
                                                                                    abs=1e-5)
    contributions = direct.numpy() @ q
    assert contributions.min() < 0 < contributions.max()  # some cells count against it
    want = np.maximum(contributions, 0)
    assert want.shape == (7, 7)  # EfficientNet-Lite0 at 224 px: a 7 x 7 last feature map
    got = encoder.explain_map(x, q)
    assert got.shape == (7, 7) and np.allclose(got, want, atol=1e-5)
    assert np.allclose(onnx_encoder.explain_map(x, q), want, atol=2e-4)  # the cells graph
    assert (onnx_encoder.onnx.dir / "image.cells.onnx").is_file()


def test_a_cached_cells_graph_of_unit_cells_is_exported_again(small_checkpoint, tmp_path):
    """Cells graphs exported before the cells became contributions (unit vectors) are not
    reused from the cache folder: same model id, another function."""
    import json

    from encoder.runtime_onnx import CELLS

    enc = Encoder.from_checkpoint(str(small_checkpoint), image_runtime="onnx",
                                  onnx_cache_dir=tmp_path)
    x, q = _pixels(), np.ones(64, np.float32)
    want = enc.explain_map(x, q)
    meta_path = enc.onnx.dir / "export.json"
    meta = json.loads(meta_path.read_text())
    assert meta["image.cells"]["cells"] == CELLS
    del meta["image.cells"]["cells"]  # as an older export recorded it
    meta_path.write_text(json.dumps(meta))
    again = Encoder.from_checkpoint(str(small_checkpoint), image_runtime="onnx",
                                    onnx_cache_dir=tmp_path)
    assert np.allclose(again.explain_map(x, q), want, atol=2e-4)
    assert json.loads(meta_path.read_text())["image.cells"]["cells"] == CELLS


def _object(size: int) -> Image.Image:
    im = Image.new("RGB", (size, size), (40, 90, 200))
    ImageDraw.Draw(im).ellipse((10, 10, size - 10, size - 10), fill=(220, 30, 30))
    return im


@pytest.mark.parametrize("corner", [(0, 0), (112, 0), (0, 112), (112, 112)])
def test_the_map_peaks_where_the_query_object_is(encoder, corner):
    """The query is the embedding of a photo of a red disc; the image holds one red disc in a
    quadrant and green squares in the others: the map is highest over the disc."""
    [q] = encoder.encode_images([_object(224)])
    canvas = Image.new("RGB", (224, 224), (40, 90, 200))
    draw = ImageDraw.Draw(canvas)
    for x, y in [(0, 0), (112, 0), (0, 112), (112, 112)]:
        draw.rectangle((x + 20, y + 20, x + 92, y + 92), fill=(30, 180, 40))
    canvas.paste(_object(112), corner)
    m = encoder.explain_map(encoder.preprocess(canvas), q)
    iy, ix = np.unravel_index(np.argmax(m), m.shape)
    assert (ix * 32 // 112, iy * 32 // 112) == (corner[0] // 112, corner[1] // 112)
    inside = m[corner[1] // 32: corner[1] // 32 + 3, corner[0] // 32: corner[0] // 32 + 3]
    assert inside.mean() > m.mean() + 0.1


def test_cell_map_normalises_the_query_and_zeroes_cells_against_the_match():
    cells = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(3)).numpy()
    q = np.arange(8, dtype=np.float32)
    raw = cells @ (q / np.linalg.norm(q))
    assert raw.min() < 0 < raw.max()
    assert np.allclose(cell_map(cells, 5 * q), np.maximum(raw, 0), atol=1e-6)
    # no cell for the match: the map as it is (the overlay still shows where it is least bad)
    assert np.allclose(cell_map(-np.abs(cells), np.abs(q)), -np.abs(cells) @ (
        np.abs(q) / np.linalg.norm(q)), atol=1e-6)


# --- open_clip -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clip_loaded(tiny_arch, weights_file):
    return load_checkpoint(f"open_clip:{ARCH}:{weights_file}")


def test_open_clip_vit_map_is_its_patch_tokens_through_norm_and_projection(clip_loaded,
                                                                           tmp_path):
    model = clip_loaded.model
    visual = model.clip.visual
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.inference_mode():
        cells = model.cell_embeddings(x)
        visual.output_tokens = True  # open_clip's own tokens: after the final norm
        try:
            pooled, tokens = visual(x)
        finally:
            visual.output_tokens = False
        want = F.normalize(tokens @ visual.proj, dim=-1).reshape(1, 4, 4, -1)
    assert cells.shape == (1, 4, 4, 32)  # 64 px in 16 px patches
    assert torch.allclose(cells, want, atol=1e-5)
    enc = Encoder(clip_loaded, image_runtime="onnx", onnx_cache_dir=tmp_path)
    q = enc.encode_texts(["a red circle"])[0]
    assert np.allclose(enc.explain_map(x[0], q), cell_map(cells[0].numpy(), q), atol=2e-4)


def test_a_tower_without_patch_tokens_has_no_map(clip_loaded, monkeypatch):
    model = clip_loaded.model
    monkeypatch.setattr(model.clip.visual, "attn_pool", torch.nn.Identity())
    with pytest.raises(NoSpatialMap, match="spatial feature map"):
        model.cell_embeddings(torch.zeros(1, 3, 64, 64))
