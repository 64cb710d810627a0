"""Encoder: registry, checkpoint round trip, hubness correction folded into index vectors."""
import numpy as np
import torch
import torch.nn.functional as F

from encoder import (
    DualEncoder,
    Encoder,
    ModelConfig,
    Scoring,
    load_checkpoint,
    read_card,
    read_scoring,
    save_checkpoint,
)


def test_hubness_correction_round_trip(tmp_path):
    torch.manual_seed(0)
    model = DualEncoder(ModelConfig(embed_dim=16)).eval()
    bank = F.normalize(torch.randn(50, 16), dim=-1)
    model.set_query_bank(bank)
    path = tmp_path / "m.pt"
    mid = save_checkpoint(model, path)
    enc = Encoder(load_checkpoint(path))
    assert enc.model_id == mid == read_card(path)["model_id"]
    scoring = enc.scoring
    assert scoring.corrected and scoring.index_dim == 17

    img = F.normalize(torch.randn(5, 16), dim=-1).numpy()
    txt = F.normalize(torch.randn(3, 16), dim=-1).numpy()
    t = float(1 / enc.model.logit_scale.detach().exp())
    stored_bank = enc.model.query_bank.numpy()
    bias = t * np.log(np.exp(img @ stored_bank.T / t).sum(1))
    got = scoring.query_vectors(txt) @ scoring.image_vectors(img).T
    assert np.allclose(got, txt @ img.T - bias[None, :], atol=1e-3)
    assert np.allclose(scoring.scores(txt, img), got, atol=1e-6)
    # the cosine comes back from the stored vectors and the scores, for any image
    stored = scoring.image_vectors(img)
    assert np.allclose(scoring.cosine(stored, got[0]), txt[0] @ img.T, atol=1e-5)
    # ... or from the one component a search hands back with each hit
    assert scoring.readback_column == 16
    values = stored[:, scoring.readback_column]
    assert np.allclose(scoring.cosine_from_readback(values, got[0]), txt[0] @ img.T, atol=1e-5)
    assert np.allclose(scoring.embeddings(stored), img)
    # the same convention on torch tensors (training and evaluation use those)
    got_t = scoring.scores(torch.from_numpy(txt), torch.from_numpy(img)).numpy()
    assert np.allclose(got_t, got, atol=1e-5)
    # read from the file without building the towers: the same scoring
    light = read_scoring(path)
    assert light.index_dim == 17 and float(light.temperature) == float(scoring.temperature)
    np.testing.assert_array_equal(light.tuning_queries(), scoring.tuning_queries())
    np.testing.assert_array_equal(light.image_vectors(img), stored)


def test_plain_scoring_is_the_cosine():
    model = DualEncoder(ModelConfig(embed_dim=8)).eval()
    scoring = Scoring.of(model)
    assert not scoring.corrected and scoring.index_dim == 8 and scoring.tuning_queries() is None
    v = F.normalize(torch.randn(4, 8), dim=-1).numpy()
    assert scoring.image_vectors(v) is v and scoring.query_vectors(v) is v
    assert np.allclose(scoring.cosine(v, v[0] @ v.T), v[0] @ v.T)
    assert scoring.readback_column is None  # the score is the cosine: nothing to read back
    assert np.allclose(scoring.cosine_from_readback(None, v[0] @ v.T), v[0] @ v.T)


def test_a_hub_image_is_demoted():
    """An image close to every bank query loses its lead for a query it does not match best."""
    model = DualEncoder(ModelConfig(embed_dim=3)).eval()
    model.set_query_bank(F.normalize(torch.tensor([[1.0, 0.2, 0.0], [1.0, -0.2, 0.0],
                                                   [1.0, 0.0, 0.2]]), dim=-1))
    hub = F.normalize(torch.tensor([[1.0, 0.0, 0.0]]), dim=-1)
    niche = F.normalize(torch.tensor([[0.6, 0.0, 0.8]]), dim=-1)
    query = F.normalize(torch.tensor([[0.9, 0.0, 0.44]]), dim=-1)
    raw = torch.cat([query @ hub.T, query @ niche.T], 1)[0]
    bias = Scoring.of(model).image_bias(torch.cat([hub, niche]))
    assert raw[0] > raw[1]  # cosine prefers the hub
    assert (raw - bias)[1] > (raw - bias)[0]  # corrected scoring prefers the niche image
