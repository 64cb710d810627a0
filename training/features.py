"""Frozen-backbone feature caches: run the expensive towers once, train heads in seconds.

Image features are cached at the output of the last frozen stage (the full feature map when the
whole tower is frozen), keyed by backbone, stage, preprocessing and the split's content, so a
re-run with the same inputs reuses the file and anything else gets its own. Text features are
keyed by the text tower's weights too; for text-tower training, the hidden states below the tuned
layers (`text_states`) and a locked image tower's pooled output (`pooled_image_features`) are
cached under a digest of the weights that made them.
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
    # the weights' digest: a tower with fine-tuned layers never reads the pretrained one's file
    key = _key("txt", backbone.name, backbone.max_length, _tensor_digest(backbone.parameters()),
               *texts)
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


class TokenStates:
    """Hidden states of many captions at one layer of the text tower, stored flat (fp16, no
    padding): `batch(rows)` pads the chosen captions' states for the layers above."""

    def __init__(self, flat: torch.Tensor, lengths: torch.Tensor):
        self.flat, self.lengths = flat, lengths
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.long().cumsum(0)])

    def __len__(self) -> int:
        return len(self.lengths)

    def batch(self, rows, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden [B, T, D] float32, attention mask [B, T]) of captions `rows`."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        lengths = self.lengths[rows].long()
        width = int(lengths.max()) if len(rows) else 0
        hidden = torch.zeros(len(rows), width, self.flat.shape[1])
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for j, (r, n) in enumerate(zip(rows.tolist(), lengths.tolist())):
            start = int(self.offsets[r])
            hidden[j, :n] = self.flat[start:start + n].float()
            mask[j, :n] = 1
        return hidden.to(device), mask.to(device)


def _tensor_digest(tensors) -> str:
    """A digest of the values: `+ 0.0` makes -0.0 +0.0, which dequantising weights gives either
    of, so that equal weights share their caches."""
    h = hashlib.sha256()
    for t in tensors:
        h.update((t.detach().cpu().contiguous().float() + 0.0).numpy().tobytes())
    return h.hexdigest()[:16]


@torch.inference_mode()
def text_states(backbone: TextBackbone, texts: list[str], layer: int,
                cache_dir: str | Path | None, batch_size: int = 256, device: str = "cpu",
                progress: bool = True) -> TokenStates:
    """The hidden states entering text layer `layer` for every text, cached on disk; the key
    holds the weights below that layer, so a tower whose lower layers were tuned gets its own."""
    below = [p for n, p in backbone.named_parameters()
             if n.startswith("model.embeddings.") or any(
                 n.startswith(f"model.encoder.layer.{i}.") for i in range(layer))]
    key = _key("tok", backbone.name, backbone.max_length, layer, _tensor_digest(below), *texts)
    path = Path(cache_dir) / f"tok-{backbone.name}-l{layer}-{len(texts)}-{key}.npz" \
        if cache_dir else None
    if path is not None and path.exists():
        stored = np.load(path)
        return TokenStates(torch.from_numpy(stored["flat"]), torch.from_numpy(stored["lengths"]))
    was_training = backbone.training
    backbone = backbone.to(device).eval()
    flat, lengths = [], []
    for i in tqdm(range(0, len(texts), batch_size), desc=f"text states @{layer}", unit="batch",
                  disable=not progress):
        tok = backbone.tokenize(texts[i:i + batch_size])
        mask = tok["attention_mask"]
        hidden = backbone.hidden_below(tok["input_ids"].to(device), mask.to(device), layer)
        for h, m in zip(hidden.half().cpu(), mask):
            n = int(m.sum())
            flat.append(h[:n])
            lengths.append(n)
    backbone.train(was_training)
    states = TokenStates(torch.cat(flat) if flat else torch.zeros(0, backbone.out_dim).half(),
                         torch.tensor(lengths, dtype=torch.int32))
    if path is not None:
        with atomic_file(path) as f:
            np.savez(f, flat=states.flat.numpy(), lengths=states.lengths.numpy())
    return states


@torch.inference_mode()
def pooled_image_features(backbone: StagedImageBackbone, split: Flickr8kSplit,
                          cache_dir: str | Path | None, batch_size: int = 64, workers: int = 1,
                          device: str = "cpu", progress: bool = True) -> torch.Tensor:
    """The whole image tower, average-pooled, for every image of the split (fp16 [N, C]), cached
    under a digest of the tower's weights: the input of a locked image tower's head."""
    transform = eval_transform(backbone.spec)
    key = _key("pooled", backbone.spec, transform, split.fingerprint(),
               _tensor_digest(backbone.state_dict().values()))
    path = Path(cache_dir) / f"pooled-{backbone.spec.name}-{split.name}-{len(split)}-{key}.npy" \
        if cache_dir else None
    if path is not None and path.exists():
        log.info("pooled image features from cache %s", path)
        return torch.from_numpy(np.load(path))
    was_training = backbone.training
    backbone = backbone.to(device).eval()
    loader = DataLoader(ImageDataset(split, transform), batch_size=batch_size, num_workers=workers,
                        collate_fn=collate_indexed)
    out = torch.empty((len(split), backbone.spec.out_dim), dtype=torch.float16)
    for pixels, idx in tqdm(loader, desc=f"pooled {backbone.spec.name}", unit="batch",
                            disable=not progress):
        out[idx] = backbone(pixels.to(device)).mean((2, 3)).half().cpu()
    backbone.train(was_training)
    if path is not None:
        with atomic_file(path) as f:
            np.save(f, out.numpy())
    return out
