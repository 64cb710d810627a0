"""Retrieval metrics, standard Flickr8k protocol.

Text->image: each caption queries all images; a hit when its own image is in the top K.
Image->text: each image queries all captions; a hit when any of its captions is in the top K.
Ranks are 1-based; ties are broken against the correct item (pessimistic).
"""
from __future__ import annotations

import numpy as np
import torch


def _ranks_t2i(sim: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
    """sim [captions, images]; owner[c] = image of caption c -> rank of that image per caption."""
    correct = sim.gather(1, owner[:, None])
    return (sim >= correct).sum(1)  # includes itself -> 1-based, ties counted against


def _ranks_i2t(sim: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
    """sim [images, captions] -> best rank among each image's captions.

    Only other images' captions can outrank (or tie) the best own caption.
    """
    own = owner[None, :] == torch.arange(sim.shape[0])[:, None]
    best = sim.masked_fill(~own, float("-inf")).max(1).values
    return ((sim >= best[:, None]) & ~own).sum(1) + 1


def summarize(ranks: torch.Tensor, ks=(1, 5, 10)) -> dict[str, float]:
    r = ranks.double()
    out = {f"R@{k}": round(100.0 * (r <= k).double().mean().item(), 2) for k in ks}
    out["median_rank"] = float(np.median(r.numpy()))
    out["mean_rank"] = round(r.mean().item(), 2)
    return out


def retrieval_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor,
                      owner: list[int] | torch.Tensor, ks=(1, 5, 10)) -> dict[str, dict]:
    """Embeddings L2-normalised; owner[c] = index of caption c's image."""
    owner = torch.as_tensor(owner, dtype=torch.long)
    sim = text_emb.float() @ image_emb.float().T
    return {"text_to_image": summarize(_ranks_t2i(sim, owner), ks),
            "image_to_text": summarize(_ranks_i2t(sim.T.contiguous(), owner), ks)}
