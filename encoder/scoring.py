"""The scoring convention: how embeddings become the vectors an index stores and searches, what
a search score is, and how the cosine is read back from a stored vector and its score.

Every other package goes through `Scoring` and knows nothing of index columns.

- Plain cosine (a model without a query bank): an image is stored as its L2-normalised
  embedding v, a query is searched as its embedding q; the score is cos(q, v).
- Hubness correction (a model with a query bank of training-caption embeddings): an image that
  attracts almost any query is demoted by its bias b(v) = T * logsumexp_j(<bank_j, v> / T)
  (inverted softmax, T = the model's learned temperature). The index stores [v, -b(v)] and a
  query is [q, 1], so exact inner-product search ranks by cos(q, v) - b(v); the score is that
  difference and the cosine is the score plus b(v), read from the stored vector's last column.
"""
from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

Array = TypeVar("Array", np.ndarray, torch.Tensor)


def _torch(x) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)) \
        if isinstance(x, np.ndarray) else x


def _like(result: torch.Tensor, template) -> np.ndarray | torch.Tensor:
    return result.float().cpu().numpy() if isinstance(template, np.ndarray) else result


class Scoring:
    def __init__(self, dim: int, bank: torch.Tensor | None = None,
                 temperature: torch.Tensor | float = 0.07):
        self.dim = int(dim)
        self.bank = bank.detach().float().cpu() if bank is not None and len(bank) else None
        self.temperature = torch.as_tensor(temperature, dtype=torch.float32).detach().cpu()
        self.corrected = self.bank is not None
        # the vectors an index holds: the embedding, plus the bias column when corrected
        self.index_dim = self.dim + 1 if self.corrected else self.dim

    @classmethod
    def of(cls, model) -> "Scoring":
        """The scoring a DualEncoder's checkpoint defines (its query bank and temperature)."""
        return cls.from_weights(model.config.embed_dim, model.logit_scale, model.query_bank)

    @classmethod
    def from_weights(cls, dim: int, logit_scale, bank: torch.Tensor | None) -> "Scoring":
        """From the learned log logit scale (temperature = 1 / its exp, capped as in training)."""
        with torch.no_grad():
            t = 1.0 / torch.as_tensor(logit_scale).detach().float().cpu().exp().clamp(max=100)
        return cls(dim, bank, t)

    def describe(self) -> str:
        if not self.corrected:
            return "cosine"
        return (f"cosine minus hubness bias (inverted softmax over {len(self.bank)} training "
                "captions)")

    @torch.inference_mode()
    def image_bias(self, image_emb: Array) -> Array:
        """b(v) per image (zeros without a bank)."""
        v = _torch(image_emb)
        if not self.corrected:
            return _like(torch.zeros(v.shape[0]), image_emb)
        t = self.temperature
        bank = self.bank.to(v.device, v.dtype)
        return _like(t * torch.logsumexp(v @ bank.T / t, dim=1), image_emb)

    # --- what an index stores and searches ----------------------------------------------------
    def image_vectors(self, image_emb: Array) -> Array:
        """Image embeddings [N, dim] -> the vectors an index stores [N, index_dim]."""
        if not self.corrected:
            return image_emb
        bias = self.image_bias(image_emb)
        if isinstance(image_emb, np.ndarray):
            return np.concatenate([image_emb, -bias[:, None]], axis=1).astype(np.float32)
        return torch.cat([image_emb, -bias[:, None].to(image_emb.dtype)], 1)

    def query_vectors(self, query_emb: Array) -> Array:
        """Text (or image) query embeddings [Q, dim] -> the vectors searched [Q, index_dim]."""
        if not self.corrected:
            return query_emb
        if isinstance(query_emb, np.ndarray):
            return np.concatenate([query_emb, np.ones((len(query_emb), 1), np.float32)], axis=1)
        return torch.cat([query_emb, torch.ones(len(query_emb), 1, dtype=query_emb.dtype,
                                                device=query_emb.device)], 1)

    def scores(self, query_emb: Array, image_emb: Array) -> Array:
        """Score matrix [Q, N] as a search ranks it (for evaluation and plots)."""
        return self.query_vectors(query_emb) @ self.image_vectors(image_emb).T

    # --- reading results back -----------------------------------------------------------------
    def cosine(self, stored: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """Cosine similarity of query and image from the image's stored vectors and the scores."""
        if not self.corrected:
            return np.asarray(scores, np.float32)
        return self.cosine_from_tail(np.asarray(stored, np.float32)[:, -1], scores)

    def cosine_from_tail(self, tail: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """The same from the last component of each hit's stored vector (its "tail": -b(v) when
        corrected, ignored otherwise): all a search needs to return besides the score, so an
        index never ships whole vectors to read the cosine back."""
        scores = np.asarray(scores, np.float32)
        if not self.corrected:
            return scores
        return scores - np.asarray(tail, np.float32)

    @property
    def readback_column(self) -> int | None:
        """The stored vector component the cosine is read back from (None: the score is it)."""
        return self.index_dim - 1 if self.corrected else None

    def cosine_from_readback(self, values: np.ndarray, scores: np.ndarray) -> np.ndarray:
        return self.cosine_from_tail(values, scores)

    def embeddings(self, stored: np.ndarray) -> np.ndarray:
        """The image embeddings inside stored index vectors."""
        return np.asarray(stored)[:, : self.dim]

    def tuning_queries(self, n: int = 300) -> np.ndarray | None:
        """Realistic query vectors to tune an approximate index on: the query bank's training
        captions, when the model has one (else None: the index builder makes stand-ins)."""
        if not self.corrected:
            return None
        return self.query_vectors(self.bank[:n].numpy())
