"""Shared fixtures of the training tests: tiny runs on the session's tiny Flickr8k (tests/conftest.py),
a tiny open_clip model with random weights, the tiny set ingested into a real S3 server."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

OPEN_CLIP_ARCH = "training-test-tiny-vit"
# a ViT small enough to fine-tune on the CPU in seconds (registered from this config, no network)
OPEN_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@pytest.fixture
def cpu_args(tmp_path) -> list[str]:
    """Options every tiny run takes: the CPU, no worker processes, a feature cache of its own."""
    return ["--device", "cpu", "--workers", "0", "--cache-dir", str(tmp_path / "cache")]


@pytest.fixture(scope="session")
def open_clip_spec(tmp_path_factory) -> str:
    """`open_clip:<arch>:<weights file>` of a tiny ViT with random (seeded) weights."""
    import open_clip
    import torch

    folder = tmp_path_factory.mktemp("open_clip")
    (folder / f"{OPEN_CLIP_ARCH}.json").write_text(json.dumps(OPEN_CLIP_CONFIG))
    open_clip.add_model_config(folder)
    torch.manual_seed(0)
    weights = folder / "open_clip_pytorch_model.bin"
    torch.save(open_clip.create_model(OPEN_CLIP_ARCH, pretrained=None).state_dict(), weights)
    return f"open_clip:{OPEN_CLIP_ARCH}:{weights}"


@pytest.fixture
def flickr_in_store(tiny_flickr, s3_store):
    """The tiny set ingested into a bucket of the test S3 server, as `make ingest` would."""
    from flickr8k.sources import open_source
    from indexer.ingest import ingest

    root, _ = tiny_flickr
    ingest(open_source(str(root)), s3_store, progress=False)
    return s3_store


@pytest.fixture
def flickr_style_set(tiny_flickr, tmp_path):
    """Makes a Flickr8k-style evaluation folder (captions.token.txt + images.txt) named `name`
    from the tiny set's images `names`."""
    root, _ = tiny_flickr

    def make(name: str, names: list[str]) -> Path:
        dest = tmp_path / name
        (dest / "Images").mkdir(parents=True)
        lines = [line for line in (root / "Flickr8k.token.txt").read_text().splitlines()
                 if line.split("#")[0] in names]
        (dest / "captions.token.txt").write_text("\n".join(lines) + "\n")
        (dest / "images.txt").write_text("\n".join(names) + "\n")
        for n in names:
            (dest / "Images" / n).write_bytes(next(root.rglob(n)).read_bytes())
        return dest

    return make
