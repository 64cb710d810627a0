"""The service serves from the model's serving bundle with torch made unimportable: every route
answers as the torch-loaded service does (same keys, scores within tolerance), and a missing
bundle is a clear error naming the command that writes it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from deploy.ports import free_port
from tests.conftest import make_image, save_banked_checkpoint, torch_blocked
from tests.search_api.helpers import build_service

BLOCKER = torch_blocked("search_api")
SCORE_TOL = 2e-3  # eager PyTorch vs ONNX Runtime embeddings (cosine >= 0.9999)


@pytest.fixture(scope="module")
def banked_checkpoint(tmp_path_factory) -> Path:
    """A dual encoder with a query bank: the service reads cosines back (hubness correction)."""
    path = save_banked_checkpoint(tmp_path_factory.mktemp("banked") / "banked.pt", 64, 40, 1)
    # a match scale in its card: the service without torch reads it from the card file
    from encoder import MatchScale, update_card

    scale = MatchScale.fit(np.linspace(-0.4, 0.3, 50), np.linspace(-0.1, 0.6, 50), "test")
    update_card(path, match_scale=scale.to_card())
    return path


@pytest.fixture(scope="module")
def reference(banked_checkpoint, tiny_flickr, tmp_path_factory):
    """The torch-loaded service (eager PyTorch towers) over an index it built, and the bundle."""
    from encoder import Encoder
    from encoder.bundle import write_bundle

    tmp = tmp_path_factory.mktemp("torch_free")
    enc = Encoder.from_checkpoint(str(banked_checkpoint))
    svc = build_service(tmp, tiny_flickr[0], enc)
    write_bundle(banked_checkpoint, cache_dir=tmp / "onnx", loaded=enc.loaded)
    return svc


def _env(svc, model_path, attempts: Path, **extra) -> dict:
    env = {**os.environ, "MODEL_PATH": str(model_path), "INDEX_DIR": svc.settings.index_dir,
           "ONNX_CACHE_DIR": str(svc.root / "onnx"), "STORE_BACKEND": "local",
           "LOCAL_STORE_DIR": str(svc.root / "store"), "MINIO_BUCKET": "b",
           "RELOAD_INTERVAL_S": "0", "TORCH_ATTEMPTS": str(attempts), **extra}
    env.pop("API_KEY", None)
    return env


@pytest.fixture(scope="module")
def torch_free_url(reference, banked_checkpoint, tmp_path_factory):
    attempts = tmp_path_factory.mktemp("attempts") / "torch_imports.txt"
    attempts.write_text("")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", BLOCKER, "--port", str(port)],
                            env=_env(reference, banked_checkpoint, attempts),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        if proc.poll() is not None:
            pytest.fail(f"the torch-free service exited: {proc.stdout.read()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the torch-free service did not start")
        time.sleep(0.2)
    yield url, attempts
    proc.terminate()
    proc.wait(timeout=30)
    assert attempts.read_text() == "", "the service tried to import torch"


def _same_ranking(got: list[dict], want: list[dict]) -> None:
    """Same hits in the same order (a swap only between scores within the tolerance), same
    scores and similarities within it."""
    assert len(got) == len(want)
    want_by_key = {h["key"]: h for h in want}
    for g, w in zip(got, want):
        if g["key"] != w["key"]:
            assert abs(g["score"] - w["score"]) < SCORE_TOL, (g, w)
        assert g["key"] in want_by_key
        ref = want_by_key[g["key"]]
        assert g["score"] == pytest.approx(ref["score"], abs=SCORE_TOL)
        assert g["match"] is not None
        assert g["match"] == pytest.approx(ref["match"], abs=0.5)  # 0-100, 1 decimal
        assert g["similarity"] == pytest.approx(ref["similarity"], abs=SCORE_TOL)
        assert g["url"] == ref["url"] and g["filename"] == ref["filename"]
    assert any(h["score"] != h["similarity"] for h in want)  # the corrected scoring was used


def test_every_route_answers_as_the_torch_loaded_service(reference, torch_free_url):
    url, attempts = torch_free_url
    jpeg = make_image("green", "square", 7)
    with TestClient(reference.app) as ref, httpx.Client(base_url=url, timeout=30) as lean:
        calls = lambda path, **kw: (ref.post(path, **kw), lean.post(path, **kw))  # noqa: E731

        a, b = ref.get("/health").json(), lean.get("/health").json()
        assert b["status"] == "ok"
        for field in ("model_id", "vector_count", "index_version"):
            assert b[field] == a[field]

        for body in ({"json": {"text": "a red circle"}}, {"data": {"text": "a red circle"}}):
            r, l = calls("/encode_text", **body)
            assert l.status_code == r.status_code == 200
            assert l.json()["dim"] == r.json()["dim"] == 64
            assert np.allclose(l.json()["embedding"], r.json()["embedding"], atol=1e-3)

        r, l = calls("/encode_image", files={"image": ("g.jpg", jpeg, "image/jpeg")})
        assert l.status_code == r.status_code == 200
        assert np.dot(l.json()["embedding"], r.json()["embedding"]) > 0.9999
        image_embedding = r.json()["embedding"]

        for query in ("a blue square", "the yellow circle in the middle", "black"):
            r, l = calls("/search_images_by_text", json={"query": query, "top_k": 10})
            assert l.status_code == r.status_code == 200
            assert l.json()["index_version"] == r.json()["index_version"]
            _same_ranking(l.json()["results"], r.json()["results"])
        key = r.json()["results"][0]["key"]

        r, l = calls("/search_images_by_text", json={"query": "a red square", "top_k": 3,
                                                     "offset": 2})
        _same_ranking(l.json()["results"], r.json()["results"])

        r, l = calls("/search_images_by_texts", json={"queries": ["a red circle", "white"],
                                                      "top_k": 5})
        assert l.status_code == r.status_code == 200
        for lr, rr in zip(l.json(), r.json()):
            _same_ranking(lr["results"], rr["results"])

        r, l = calls("/search_images_by_image", files={"image": ("g.jpg", jpeg, "image/jpeg")},
                     data={"top_k": "5"})
        assert l.status_code == r.status_code == 200, l.text
        _same_ranking(l.json()["results"], r.json()["results"])

        # the original clients' mode: ranking the embeddings they send
        embs = [{"filename": "g.jpg", "embedding": image_embedding}]
        form = {"text": "a green square", "top_k": "1", "image_embeddings": json.dumps(embs)}
        r, l = calls("/search_images_by_text", data=form)
        assert l.status_code == r.status_code == 200
        assert l.json()["results"][0]["filename"] == "g.jpg"
        assert l.json()["results"][0]["score"] == pytest.approx(
            r.json()["results"][0]["score"], abs=SCORE_TOL)

        for path in (f"/images/{key}", f"/images/{key}?size=64"):
            a, b = ref.get(path), lean.get(path)
            assert b.status_code == a.status_code == 200 and b.content == a.content

        # why it matched: the bundle's cells graph gives eager PyTorch's map
        explain = {"key": key, "q": "black + 2:a red square", "format": "json"}
        a, b = ref.get("/explain", params=explain), lean.get("/explain", params=explain)
        assert b.status_code == a.status_code == 200, b.text
        assert np.allclose(b.json()["map"], a.json()["map"], atol=SCORE_TOL)
        assert [t["contribution"] for t in b.json()["terms"]] == pytest.approx(
            [t["contribution"] for t in a.json()["terms"]], abs=SCORE_TOL)
        png = lean.get("/explain", params={"key": key, "q": "black", "size": 64})
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"

        assert lean.post("/admin/reload").status_code == 200
        assert lean.get("/").status_code == 200 and "<html" in lean.get("/").text.lower()
        metrics = lean.get("/metrics")
        assert metrics.status_code == 200 and "text_encode" in metrics.text
        # bad input is still refused the same way
        r, l = calls("/search_images_by_image", files={"image": ("x.jpg", b"junk", "image/jpeg")})
        assert l.status_code == r.status_code == 400
    assert attempts.read_text() == ""


def test_a_missing_bundle_without_torch_names_the_command(reference, tmp_path):
    import shutil

    model = tmp_path / "copy.pt"  # a checkpoint without a bundle beside it
    shutil.copy(reference.service.encoders.encoder.loaded.path, model)
    attempts = tmp_path / "attempts.txt"
    done = subprocess.run([sys.executable, "-c", BLOCKER, "--port", str(free_port())],
                          env=_env(reference, model, attempts), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "python -m encoder bundle" in done.stderr and "no serving bundle" in done.stderr


def test_the_card_counts_by_model_id_not_by_file_times(banked_checkpoint, tmp_path):
    """A fresh clone writes the card before the checkpoint (alphabetical): the serving encoder
    reads it by model id (the match scale), and ignores another model's card."""
    import os
    import shutil

    from encoder.serving import _card

    ckpt = shutil.copy(banked_checkpoint, tmp_path / "m.pt")
    card = shutil.copy(banked_checkpoint.with_suffix(".card.json"), tmp_path / "m.card.json")
    later = os.stat(ckpt).st_mtime_ns + 10**9
    os.utime(ckpt, ns=(later, later))  # the checkpoint written after its card
    model_id = json.loads(Path(card).read_text())["model_id"]
    assert _card(ckpt, model_id)["match_scale"]["knots"]
    assert _card(ckpt, "another-model") == {}
    assert _card("open_clip:ViT-B-32", model_id) == {}
