"""Encoder: registry, checkpoint round trip, hubness correction folded into index vectors."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from encoder import (
    DualEncoder,
    Encoder,
    ModelConfig,
    load_checkpoint,
    read_card,
    save_checkpoint,
)
from encoder.backbones import create_image_backbone, create_text_backbone


def test_registry_rejects_unknown_names():
    with pytest.raises(KeyError, match="known"):
        create_image_backbone("resnet9000")
    with pytest.raises(KeyError, match="known"):
        create_text_backbone("bert-huge")


def test_mobilenet_without_weights_warns_loudly(caplog):
    b = create_image_backbone("mobilenet_v3_small")
    assert "NO PRETRAINED WEIGHTS" in caplog.text and b.spec.out_dim == 576


def test_hubness_correction_round_trip(tmp_path):
    torch.manual_seed(0)
    model = DualEncoder(ModelConfig(embed_dim=16)).eval()
    bank = F.normalize(torch.randn(50, 16), dim=-1)
    model.set_query_bank(bank)
    path = tmp_path / "m.pt"
    mid = save_checkpoint(model, path)
    enc = Encoder(load_checkpoint(path))
    assert enc.model_id == mid == read_card(path)["model_id"]
    assert enc.corrected and enc.index_dim == 17

    img = F.normalize(torch.randn(5, 16), dim=-1).numpy()
    txt = F.normalize(torch.randn(3, 16), dim=-1).numpy()
    t = float(1 / enc.model.logit_scale.detach().exp())
    stored_bank = enc.model.query_bank.numpy()
    bias = t * np.log(np.exp(img @ stored_bank.T / t).sum(1))
    got = enc.query_index_vectors(txt) @ enc.image_index_vectors(img).T
    assert np.allclose(got, txt @ img.T - bias[None, :], atol=1e-3)


def test_a_hub_image_is_demoted():
    """An image close to every bank query loses its lead for a query it does not match best."""
    model = DualEncoder(ModelConfig(embed_dim=3)).eval()
    model.set_query_bank(F.normalize(torch.tensor([[1.0, 0.2, 0.0], [1.0, -0.2, 0.0],
                                                   [1.0, 0.0, 0.2]]), dim=-1))
    hub = F.normalize(torch.tensor([[1.0, 0.0, 0.0]]), dim=-1)
    niche = F.normalize(torch.tensor([[0.6, 0.0, 0.8]]), dim=-1)
    query = F.normalize(torch.tensor([[0.9, 0.0, 0.44]]), dim=-1)
    raw = torch.cat([query @ hub.T, query @ niche.T], 1)[0]
    bias = model.image_bias(torch.cat([hub, niche]))
    assert raw[0] > raw[1]  # cosine prefers the hub
    assert (raw - bias)[1] > (raw - bias)[0]  # corrected scoring prefers the niche image
