"""The hubness bank (encoder/scoring.py): which training captions it holds, in which order, and
how they become the model's bank. Training (both model families) and export build it here."""
from __future__ import annotations

from typing import Callable

import torch


def bank_caption_ids(n_captions: int, size: int, seed: int) -> list[int]:
    """`size` of the `n_captions` training captions, drawn at random with `seed`, in draw order
    (all of them, shuffled, when there are fewer)."""
    return torch.randperm(n_captions, generator=torch.Generator().manual_seed(seed))[:size].tolist()


@torch.no_grad()
def build_query_bank(model, n_captions: int, size: int, seed: int,
                     embed_captions: Callable[[list[int]], torch.Tensor]) -> list[int]:
    """Store in `model` the embeddings of the bank's captions, in draw order; returns their ids.
    `embed_captions(ids)` embeds training captions by id with the model as it is now (a trainer
    reuses its cached text features; export computes them)."""
    ids = bank_caption_ids(n_captions, size, seed)
    model.eval()
    model.set_query_bank(embed_captions(ids).float())
    return ids
