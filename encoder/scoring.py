"""The scoring convention: how embeddings become the vectors an index stores and searches, what
a search score is, and how the cosine is read back from a stored vector and its score.

Every other package goes through `Scoring` and knows nothing of index columns.

- Plain cosine (a model without a query bank): an image is stored as its L2-normalised
  embedding v, a query is searched as its embedding q; the score is cos(q, v).
- Hubness correction (a model with a query bank of training-caption embeddings): an image that
  attracts almost any query is demoted by its bias b(v) = T * logsumexp_j(<bank_j, v> / T)
  (inverted softmax, T = the model's learned temperature). The index stores [v, -b(v)] and a
  query is [q, 1], so exact inner-product search ranks by cos(q, v) - b(v); the score is that
  difference and the cosine is the score plus b(v), read back from the stored vector's
  component `readback_column` (an index hands that component back with each hit when asked).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

import numpy as np

if TYPE_CHECKING:  # torch is imported only for torch inputs: serving needs NumPy alone
    import torch

Array = TypeVar("Array", np.ndarray, "torch.Tensor")


def _numpy(x) -> np.ndarray | None:
    """`x` as a float32 NumPy array (a tensor or array-like), None for None."""
    if x is None:
        return None
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().float().cpu().numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


def _logsumexp(x: np.ndarray) -> np.ndarray:
    """log(sum(exp(x))) over axis 1, stable (as torch.logsumexp, in float32)."""
    top = x.max(axis=1, keepdims=True)
    return (top + np.log(np.exp(x - top).sum(axis=1, keepdims=True)))[:, 0]


class Scoring:
    def __init__(self, dim: int, bank=None, temperature=0.07):
        """bank: [B, dim] query bank (a NumPy array or a tensor; empty or None: plain cosine);
        temperature: a float (or a 0-d tensor)."""
        self.dim = int(dim)
        bank = _numpy(bank)
        self.bank: np.ndarray | None = bank if bank is not None and len(bank) else None
        self.temperature = float(_numpy(temperature).reshape(-1)[0])
        self.corrected = self.bank is not None
        # the vectors an index holds: the embedding, plus the bias column when corrected
        self.index_dim = self.dim + 1 if self.corrected else self.dim
        # the stored component a search must hand back to read the cosine (None: not needed)
        self.readback_column = self.index_dim - 1 if self.corrected else None

    @classmethod
    def of(cls, model) -> "Scoring":
        """The scoring a DualEncoder's checkpoint defines (its query bank and temperature)."""
        return cls.from_weights(model.config.embed_dim, model.logit_scale, model.query_bank)

    @classmethod
    def from_weights(cls, dim: int, logit_scale, bank=None) -> "Scoring":
        """From the learned log logit scale (temperature = 1 / its exp, capped as in training)."""
        scale = np.exp(_numpy(logit_scale).reshape(-1)[0])
        return cls(dim, bank, np.float32(1.0) / np.minimum(scale, np.float32(100)))

    def describe(self) -> str:
        if not self.corrected:
            return "cosine"
        return (f"cosine minus hubness bias (inverted softmax over {len(self.bank)} training "
                "captions)")

    def image_bias(self, image_emb: Array) -> Array:
        """b(v) per image (zeros without a bank): NumPy for arrays, torch for tensors."""
        if not isinstance(image_emb, np.ndarray):
            return self._image_bias_torch(image_emb)
        v = np.asarray(image_emb, np.float32)
        if not self.corrected:
            return np.zeros(v.shape[0], np.float32)
        t = np.float32(self.temperature)
        return (t * _logsumexp(v @ self.bank.T / t)).astype(np.float32)

    def _image_bias_torch(self, v: "torch.Tensor") -> "torch.Tensor":
        import torch

        with torch.inference_mode():
            if not self.corrected:
                return torch.zeros(v.shape[0])
            t = self.temperature
            bank = torch.from_numpy(self.bank).to(v.device, v.dtype)
            return t * torch.logsumexp(v @ bank.T / t, dim=1)

    # --- what an index stores and searches ----------------------------------------------------
    def image_vectors(self, image_emb: Array) -> Array:
        """Image embeddings [N, dim] -> the vectors an index stores [N, index_dim]."""
        if not self.corrected:
            return image_emb
        bias = self.image_bias(image_emb)
        if isinstance(image_emb, np.ndarray):
            return np.concatenate([image_emb, -bias[:, None]], axis=1).astype(np.float32)
        import torch

        return torch.cat([image_emb, -bias[:, None].to(image_emb.dtype)], 1)

    def query_vectors(self, query_emb: Array) -> Array:
        """Text (or image) query embeddings [Q, dim] -> the vectors searched [Q, index_dim]."""
        if not self.corrected:
            return query_emb
        if isinstance(query_emb, np.ndarray):
            return np.concatenate([query_emb, np.ones((len(query_emb), 1), np.float32)], axis=1)
        import torch

        return torch.cat([query_emb, torch.ones(len(query_emb), 1, dtype=query_emb.dtype,
                                                device=query_emb.device)], 1)

    def combine(self, embeddings: np.ndarray, weights) -> np.ndarray:
        """One query embedding [dim] from several terms' embeddings [T, dim] (texts', or stored
        images' as `embeddings` gives them) and signed weights (negative: away from it): each
        made unit length, weighted sum, made unit length again; query_vectors then shapes it as
        any query, so the score keeps its meaning (the cosine with this direction, less the
        image's hubness bias). ValueError when the weights are not finite or the terms cancel
        out (nothing left to search for)."""
        emb = np.asarray(embeddings, np.float64)
        w = np.asarray(weights, np.float64).reshape(-1)
        if not len(w) or len(w) != len(emb) or not np.isfinite(w).all() or \
                not np.isfinite(emb).all():
            raise ValueError("the terms' weights must be finite numbers, one per term")
        emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        w = w / np.abs(w).max()  # scaled first: large weights cannot overflow
        combined = w @ emb
        norm = np.linalg.norm(combined)
        if norm <= 1e-4 * np.abs(w).sum():
            raise ValueError("the terms cancel out: nothing is left to search for")
        return (combined / norm).astype(np.float32)

    def scores(self, query_emb: Array, image_emb: Array) -> Array:
        """Score matrix [Q, N] as a search ranks it (for evaluation and plots)."""
        return self.query_vectors(query_emb) @ self.image_vectors(image_emb).T

    # --- reading results back -----------------------------------------------------------------
    def cosine(self, stored: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """Cosine similarity of query and image from the image's stored vectors and the scores."""
        if not self.corrected:
            return np.asarray(scores, np.float32)
        return self.cosine_from_readback(
            np.asarray(stored, np.float32)[:, self.readback_column], scores)

    def cosine_from_readback(self, values: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """The same from each hit's stored component `readback_column` (-b(v) when corrected;
        ignored otherwise): all a search needs to return besides the score, so an index never
        ships whole vectors to read the cosine back."""
        scores = np.asarray(scores, np.float32)
        if not self.corrected:
            return scores
        return scores - np.asarray(values, np.float32)

    def embeddings(self, stored: np.ndarray) -> np.ndarray:
        """The image embeddings inside stored index vectors."""
        return np.asarray(stored)[:, : self.dim]

    def tuning_queries(self, n: int = 300) -> np.ndarray | None:
        """Realistic query vectors to tune an approximate index on: the query bank's training
        captions, when the model has one (else None: the index builder makes stand-ins)."""
        if not self.corrected:
            return None
        return self.query_vectors(self.bank[:n])


def cell_map(cells: np.ndarray, query: np.ndarray) -> np.ndarray:
    """[h, w]: where a query's match with a photo comes from, from the model family's cells
    [h, w, dim] (`cell_embeddings`: each cell's contribution to the photo's embedding, or a
    ViT's unit patch tokens) and the query embedding [dim]: the dot product with the unit query,
    cells that count against the match at 0 (all of them as they are when none counts for
    it)."""
    q = np.asarray(query, np.float32).reshape(-1)
    q = q / max(float(np.linalg.norm(q)), 1e-12)
    m = (np.asarray(cells, np.float32) @ q).astype(np.float32)
    return np.maximum(m, 0) if m.size and float(m.max()) > 0 else m
