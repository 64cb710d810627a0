"""Frozen-backbone feature caches: run the expensive towers once, train heads in seconds.

Image features are cached at the output of the last frozen stage (the full feature map when the
whole tower is frozen), keyed by backbone, stage, preprocessing and the split's content, so a
re-run with the same inputs reuses the file and anything else gets its own.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from core.atomic import atomic_file
from encoder.backbones import StagedImageBackbone, TextBackbone
from encoder.preprocessing import eval_transform
from training.data import Flickr8kSplit, ImageDataset, collate_indexed

log = logging.getLogger(__name__)


def _key(*parts) -> str:
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:20]


@torch.inference_mode()
def image_features(backbone: StagedImageBackbone, split: Flickr8kSplit, stop: int,
                   cache_dir: str | Path | None, batch_size: int = 64, workers: int = 1,
                   device: str = "cpu", progress: bool = True) -> torch.Tensor:
    """Output of stages[:stop] for every image of the split, fp16, cached on disk."""
    transform = eval_transform(backbone.spec)
    key = _key("img", backbone.spec, stop, transform, split.fingerprint())
    path = Path(cache_dir) / f"img-{backbone.spec.name}-s{stop}-{split.name}-{len(split)}-{key}.npy" \
        if cache_dir else None
    if path is not None and path.exists():
        log.info("image features from cache %s", path)
        return torch.from_numpy(np.load(path))
    backbone = backbone.to(device).eval()
    loader = DataLoader(ImageDataset(split, transform), batch_size=batch_size, num_workers=workers,
                        collate_fn=collate_indexed)
    out = None
    for pixels, idx in tqdm(loader, desc=f"features {backbone.spec.name}", unit="batch",
                            disable=not progress):
        feats = backbone(pixels.to(device), stop=stop).half().cpu()
        if out is None:
            out = torch.empty((len(split), *feats.shape[1:]), dtype=torch.float16)
        out[idx] = feats
    if path is not None:
        with atomic_file(path) as f:
            np.save(f, out.numpy())
    return out


@torch.inference_mode()
def text_features(backbone: TextBackbone, texts: list[str], cache_dir: str | Path | None,
                  batch_size: int = 256, device: str = "cpu", progress: bool = True) -> torch.Tensor:
    key = _key("txt", backbone.name, backbone.max_length, *texts)
    path = Path(cache_dir) / f"txt-{backbone.name}-{len(texts)}-{key}.npy" if cache_dir else None
    if path is not None and path.exists():
        return torch.from_numpy(np.load(path)).float()
    backbone = backbone.to(device).eval()
    chunks = []
    for i in tqdm(range(0, len(texts), batch_size), desc=f"features {backbone.name}",
                  unit="batch", disable=not progress):
        chunks.append(backbone(texts[i:i + batch_size]).float().cpu())
    out = torch.cat(chunks) if chunks else torch.zeros((0, backbone.out_dim))
    if path is not None:
        with atomic_file(path) as f:
            np.save(f, out.numpy())
    return out
