"""`python -m training.calibrate` on the tiny dataset: the match scale lands in the card (file
and checkpoint), the model id stays the same, and the scale is the true pairs' CDF."""
from __future__ import annotations

import json
import shutil

import numpy as np

from encoder import load_checkpoint, read_card
from encoder.match_scale import CARD_FIELD, MatchScale
from encoder.scoring import Scoring
from training.calibrate import fit_match_scale, main


def test_calibrate_writes_the_card_and_keeps_the_model_id(small_checkpoint, tiny_flickr,
                                                          tmp_path, capsys):
    path = tmp_path / "model.pt"
    shutil.copy(small_checkpoint, path)
    before = read_card(path)
    assert CARD_FIELD not in before

    assert main(["--checkpoint", str(path), "--data", str(tiny_flickr[0]), "--split", "dev",
                 "--limit", "4", "--device", "cpu", "--cache-dir", str(tmp_path / "c")]) == 0
    printed = json.loads(capsys.readouterr().out)
    card = read_card(path)
    assert card["model_id"] == before["model_id"] == load_checkpoint(path).model_id
    on_disk = json.loads(path.with_suffix(".card.json").read_text())
    assert on_disk["model_id"] == before["model_id"]
    written = card[CARD_FIELD]
    assert on_disk[CARD_FIELD] == written
    assert written["n_pairs"] == 4 * 5 == printed["n_pairs"]  # 4 images, 5 captions each
    assert "dev" in written["fitted_on"] and before["model_id"] in written["fitted_on"]
    scale = MatchScale.from_card(card)
    assert len(scale.knots) == 33 and list(scale.knots) == sorted(scale.knots)
    # the other card fields are kept
    assert {k: v for k, v in card.items() if k != CARD_FIELD} == before


def test_fit_uses_the_ranking_score_of_each_true_pair():
    rng = np.random.default_rng(1)
    img = rng.normal(size=(6, 8)).astype(np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt = rng.normal(size=(12, 8)).astype(np.float32)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    owner = [i // 2 for i in range(12)]
    import torch

    scoring = Scoring(8, torch.from_numpy(rng.normal(size=(20, 8)).astype(np.float32)), 0.07)
    scale = fit_match_scale(scoring, img, txt, owner, "t", n_knots=12)  # 12 pairs: every one a knot
    full = scoring.scores(txt, img)
    want = np.sort(full[np.arange(12), owner])
    np.testing.assert_allclose(scale.knots, want, atol=1e-5)
    np.testing.assert_allclose(scale.cosine_knots, np.sort((txt * img[owner]).sum(1)), atol=1e-5)
