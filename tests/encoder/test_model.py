"""Encoder: registry, checkpoint round trip, hubness correction folded into index vectors."""
import pytest

from encoder.backbones import create_image_backbone, create_text_backbone


def test_registry_rejects_unknown_names():
    with pytest.raises(KeyError, match="known"):
        create_image_backbone("resnet9000")
    with pytest.raises(KeyError, match="known"):
        create_text_backbone("bert-huge")


def test_mobilenet_without_weights_warns_loudly(caplog):
    b = create_image_backbone("mobilenet_v3_small")
    assert "NO PRETRAINED WEIGHTS" in caplog.text and b.spec.out_dim == 576


def test_int8_tower_is_stored_as_deltas_and_loads_exactly(tmp_path):
    """int8 image-tower weights go to disk as differences from the pretrained weights
    (compressed); loading gives back exactly the int8 weights, with the same model id."""
    import torch

    from encoder import DualEncoder, ModelConfig, load_checkpoint, save_checkpoint
    from encoder.checkpoint import DELTA, INT8, SCALE, _dequantize, _int8, read_payload
    from encoder.spec import CheckpointFile

    torch.manual_seed(0)
    model = DualEncoder(ModelConfig(embed_dim=16, image_tail_stages=2)).eval()
    tuned = [k for k in model.trainable_state_keys() if k.startswith("image_backbone.")
             and model.state_dict()[k].dim() >= 2]
    with torch.no_grad():  # "fine-tuning": small changes to the tail stages
        for k in tuned:
            t = model.state_dict()[k]
            t.add_(0.01 * t.std() * torch.randn_like(t))
    path = tmp_path / "m.pt"
    mid = save_checkpoint(model, path, int8_backbone=True)
    stored = read_payload(CheckpointFile(path))["state_dict"]
    assert {k + DELTA for k in tuned} <= set(stored) and not any(k.endswith(INT8) for k in stored)
    loaded = load_checkpoint(path)
    assert loaded.model_id == mid
    for k in tuned:
        q, s = _int8(model.state_dict()[k])
        want = _dequantize({k + INT8: q, k + SCALE: s.half()})[k]
        assert torch.equal(loaded.model.state_dict()[k], want)
