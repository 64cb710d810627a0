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
