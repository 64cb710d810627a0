"""Near-duplicate groups (indexer.duplicates, VectorIndex.near_pairs) on every cheap backend, the
report on disk, and `python -m indexer duplicates`."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

from indexer.duplicates import (
    DEFAULT_CANDIDATE_THRESHOLD,
    DEFAULT_PIXEL_CHECK,
    DEFAULT_THRESHOLD,
    DuplicateReport,
    find_duplicates,
    group_pairs,
    read_report,
    report_path,
    write_report,
)
from tests.indexer.helpers import PREFIX, unit_vectors


def _near(v: np.ndarray, scale: float, seed: int) -> np.ndarray:
    out = v + np.random.default_rng(seed).normal(scale=scale, size=v.shape).astype(np.float32)
    return out / np.linalg.norm(out)


def _library(dim: int = 32, correction: bool = False):
    """40 different photos; photo 0 with two near copies, photo 7 with one (a chain: 7 ~ 7b),
    photo 20 with one just below the threshold. correction: one more stored column, as a
    hubness-corrected model stores (large, so a pass that scored it would group everything)."""
    v = unit_vectors(40, dim, seed=3)
    rows = {f"{PREFIX}{i:02d}.jpg": v[i] for i in range(40)}
    rows[f"{PREFIX}00-q50.jpg"] = _near(v[0], 0.02, 1)
    rows[f"{PREFIX}00-small.jpg"] = _near(v[0], 0.03, 2)
    rows[f"{PREFIX}07-crop.jpg"] = _near(v[7], 0.04, 3)
    far = v[20] * 0.8 + v[21] * 0.6  # cosine 0.8 (+ the photos' own) with photo 20: not a copy
    rows[f"{PREFIX}20-other.jpg"] = far / np.linalg.norm(far)
    keys = sorted(rows)
    vectors = np.stack([rows[k] for k in keys]).astype(np.float32)
    if correction:
        vectors = np.concatenate([vectors, np.full((len(keys), 1), -3.0, np.float32)], axis=1)
    return keys, vectors


@pytest.mark.parametrize("correction", [False, True])
def test_near_copies_group_on_every_backend(backend, correction):
    keys, vectors = _library(correction=correction)
    backend.rebuild("m-1", keys, vectors, ["e"] * len(keys))
    columns = vectors.shape[1] - 1 if correction else None
    report = find_duplicates(backend, "m-1", 0.9, columns=columns)
    assert [g.keys for g in report.groups] == [
        [f"{PREFIX}00-q50.jpg", f"{PREFIX}00-small.jpg", f"{PREFIX}00.jpg"],
        [f"{PREFIX}07-crop.jpg", f"{PREFIX}07.jpg"]]
    assert all(0.9 < g.similarity <= 1.0001 for g in report.groups)
    assert (report.version, report.model_id, report.photos, report.threshold) == \
        (backend.published("m-1"), "m-1", len(keys), 0.9)
    assert report.backend == backend.backend


def test_the_default_pass_built_on_the_interface_matches_faiss_range_search(tmp_path):
    """FAISS's own range search and the searches every backend has find the same pairs."""
    from indexer.faiss_index import FaissIndex
    from indexer.vector_index import VectorIndex

    keys, vectors = _library()
    index = FaissIndex(tmp_path / "index")
    index.rebuild("m-1", keys, vectors, ["e"] * len(keys))
    view = index.view("m-1")

    def pairs(method):
        return sorted((a, b, round(float(s), 4)) for batch in method(index, view, 0.5, batch=7)
                      for a, b, s in zip(*batch))

    assert pairs(FaissIndex.near_pairs) == pairs(VectorIndex.near_pairs)
    assert pairs(FaissIndex.near_pairs)  # the low threshold finds more than the copies


def test_group_pairs_joins_chains_and_orders_largest_first():
    groups = group_pairs(["a", "b", "x", "c"], ["b", "c", "y", "d"], [0.95, 0.93, 0.99, 0.91])
    assert [(g.keys, g.similarity) for g in groups] == [
        (["a", "b", "c", "d"], 0.91), (["x", "y"], 0.99)]
    assert group_pairs([], [], []) == []


def test_report_round_trips_and_refuses_damage(tmp_path):
    report = DuplicateReport("v1", "m-1", "faiss", 0.9, 10, group_pairs(["a"], ["b"], [0.97]))
    path = report_path(tmp_path)
    assert read_report(path) is None
    write_report(report, path)
    assert read_report(path) == report
    assert not [p for p in tmp_path.iterdir() if p.name != path.name]  # no temp file left
    # a report written before the pixel check: read as an embedding-only one
    older = {k: v for k, v in report.to_dict().items()
             if k not in ("candidate_threshold", "pixel_check", "check")}
    path.write_text(json.dumps(older))
    assert read_report(path) == report and report.check is None
    path.write_text(json.dumps({**older, "check": {"candidates": "many", "oops": 1}}))
    with pytest.raises(ValueError):
        read_report(path)
    path.write_text("{not json")
    with pytest.raises(ValueError):
        read_report(path)
    path.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError):
        read_report(path)


@pytest.mark.parametrize("threshold", [0.0, 1.0, float("nan"), -0.5, 2])
def test_a_threshold_outside_0_1_is_refused(tmp_path, threshold):
    from indexer.faiss_index import FaissIndex

    keys, vectors = _library()
    index = FaissIndex(tmp_path / "index")
    index.rebuild("m-1", keys, vectors, ["e"] * len(keys))
    with pytest.raises(ValueError):
        find_duplicates(index, "m-1", threshold)


# --- images the test makes ----------------------------------------------------------------------
def _scene(seed: int) -> Image.Image:
    """A picture of its own: a gradient and shapes in several colours."""
    rng = np.random.default_rng(seed)
    h, w = 180, 240
    top, bottom = rng.integers(0, 255, 3), rng.integers(0, 255, 3)
    t = np.linspace(0, 1, h)[:, None, None]
    img = Image.fromarray(np.broadcast_to(top * (1 - t) + bottom * t, (h, w, 3))
                          .astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x, y = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
        box = (x, y, x + int(rng.integers(20, 90)), y + int(rng.integers(20, 90)))
        fill = tuple(int(c) for c in rng.integers(0, 255, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    return img


def _reencoded(img: Image.Image, quality: int, scale: float = 1.0) -> Image.Image:
    if scale != 1.0:
        img = img.resize((int(img.width * scale), int(img.height * scale)))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _pixel_embedding(img: Image.Image) -> np.ndarray:
    """A stand-in for the model (whose untrained test heads cannot tell made-up pictures
    apart): the picture at 12 x 9, centred and normalised; what the pass does with
    embeddings does not depend on where they come from."""
    v = np.asarray(img.convert("RGB").resize((12, 9), Image.BILINEAR), np.float32).ravel()
    v = v - v.mean()
    return v / np.linalg.norm(v)


def test_reencodes_and_resizes_of_a_photo_group_and_different_photos_do_not(backend):
    names, images = [], []
    for n in range(8):
        scene = _reencoded(_scene(n), 95)  # photos are JPEGs already
        names.append(f"{PREFIX}scene{n}.jpg")
        images.append(scene)
        if n < 2:  # two photos with copies: re-encoded, resized, both
            for tag, copy in (("q40", _reencoded(scene, 40)), ("half", _reencoded(scene, 90, .5)),
                              ("q30-small", _reencoded(scene, 30, 0.7))):
                names.append(f"{PREFIX}scene{n}-{tag}.jpg")
                images.append(copy)
    vectors = np.stack([_pixel_embedding(im) for im in images])
    backend.rebuild("m-1", names, vectors, ["e"] * len(names))
    report = find_duplicates(backend, "m-1", 0.95)
    assert [g.keys for g in report.groups] == [
        sorted(k for k in names if k.startswith(f"{PREFIX}scene{n}")) for n in (0, 1)]


def test_the_command_writes_the_report_beside_the_index(tmp_path, monkeypatch, small_checkpoint,
                                                        capsys):
    from core.settings import get_settings
    from encoder.loading import read_card
    from indexer.cli import main
    from indexer.faiss_index import FaissIndex

    model_id = read_card(small_checkpoint)["model_id"]
    keys, vectors = _library(dim=64)
    index = FaissIndex(tmp_path / "index")
    version = index.rebuild(model_id, keys, vectors, ["e"] * len(keys))["version"]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MODEL_PATH", str(small_checkpoint))
    monkeypatch.setenv("INDEX_DIR", str(tmp_path / "index"))
    monkeypatch.setenv("INDEX_BACKEND", "faiss")
    # an empty store: no photo can be read, every candidate pair goes by the embedding alone
    monkeypatch.setenv("STORE_BACKEND", "local")
    monkeypatch.setenv("LOCAL_STORE_DIR", str(tmp_path / "store"))
    get_settings.cache_clear()
    try:
        assert main(["--quiet", "duplicates", "--threshold", "0.9"]) == 0
        out = capsys.readouterr().out
        checked = read_report(report_path(tmp_path / "index"))
        assert main(["--quiet", "duplicates", "--threshold", "0.9", "--no-pixel-check"]) == 0
    finally:
        get_settings.cache_clear()
    assert f"version {version}: 2 groups" in out and "confirmed on pixels: 0 of 0" in out
    assert checked.candidate_threshold == DEFAULT_CANDIDATE_THRESHOLD
    assert checked.pixel_check == DEFAULT_PIXEL_CHECK.params()
    assert checked.check.unreadable == checked.check.photos_read > 0
    assert checked.check.without_pixels == checked.check.candidates > 0
    assert f"version {version}: 2 groups" in capsys.readouterr().out
    report = read_report(report_path(tmp_path / "index"))
    assert report.version == version and report.threshold == 0.9
    assert [g.keys for g in report.groups] == [g.keys for g in checked.groups]
    assert report.check is None and report.candidate_threshold is None
    assert 0 < DEFAULT_CANDIDATE_THRESHOLD < DEFAULT_THRESHOLD < 1


def test_the_job_after_a_publish_writes_the_report(tmp_path, small_checkpoint):
    from core.settings import Settings
    from encoder.loading import read_card
    from indexer import jobs
    from indexer.faiss_index import FaissIndex

    model_id = read_card(small_checkpoint)["model_id"]
    keys, vectors = _library(dim=64)
    version = FaissIndex(tmp_path / "index").rebuild(model_id, keys, vectors,
                                                      ["e"] * len(keys))["version"]
    s = Settings(_env_file=None, index_dir=str(tmp_path / "index"),
                 model_path=str(small_checkpoint), store_backend="local",
                 local_store_dir=str(tmp_path / "store"))
    out = jobs.find_duplicates(0.9, settings=s)
    assert (out["version"], out["groups"], out["photos"]) == (version, 2, 5)
    # the store holds none of the photos: every candidate went by the embedding alone
    assert out["checked"] == 0 and out["without_pixels"] > 0 and out["unreadable"] > 0
    assert read_report(report_path(tmp_path / "index")).version == version
    out = jobs.find_duplicates(0.9, settings=s, pixel_check=False)
    assert (out["groups"], out["photos"]) == (2, 5) and "checked" not in out
