"""Fixtures shared by the encoder tests: a tiny open_clip architecture (registered from a JSON
config, no network) and a weights file for it."""
import json

import pytest

ARCH = "test-tiny-vit"
TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="session")
def tiny_arch(tmp_path_factory):
    import open_clip

    d = tmp_path_factory.mktemp("oc_cfg")
    (d / f"{ARCH}.json").write_text(json.dumps(TINY))
    open_clip.add_model_config(d)
    assert ARCH in open_clip.list_models()
    return ARCH


@pytest.fixture(scope="session")
def weights_file(tiny_arch, tmp_path_factory):
    """The architecture's seeded random weights, saved as a pretrained weights file."""
    import open_clip
    import torch

    torch.manual_seed(0)
    clip = open_clip.create_model(tiny_arch, pretrained=None)
    path = tmp_path_factory.mktemp("oc_w") / "open_clip_pytorch_model.bin"
    torch.save(clip.state_dict(), path)
    return path
