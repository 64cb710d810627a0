"""What every model family gives its callers, and what loading one returns.

A family (our `DualEncoder`, the open_clip adapter `OpenClipEncoder`) is an `nn.Module` that
carries its matching preprocessing, as open_clip's `create_model_and_transforms` returns a model
with its transform: `image_spec` says how images become pixels, `tokenize` how texts become
token ids. The inference facade, `Scoring`, the ONNX export and checkpoint files use this and
nothing family-specific (training also reaches into its own family's parts).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, Sequence, runtime_checkable

if TYPE_CHECKING:  # type names only: importing this module does not import torch
    import torch

    from encoder.pixels import ImageSpec
    from encoder.model import ModelConfig


@runtime_checkable
class EmbeddingModel(Protocol):
    """Images and texts into one L2-normalised space (an `nn.Module`: `to`, `eval`,
    `state_dict`, `load_state_dict` as usual)."""

    config: ModelConfig  # embed_dim, the family's settings (saved in checkpoints)
    query_bank: torch.Tensor  # training-caption embeddings for hubness correction; empty: cosine

    @property
    def image_spec(self) -> ImageSpec:
        """The image preprocessing the weights expect (input size, mean/std, resize)."""

    @property
    def logit_scale(self) -> torch.Tensor: ...

    def tokenize(self, texts: Sequence[str], tensors: str = "pt") -> dict[str, Any]:
        """input_ids and attention_mask ("pt": torch tensors, "np": int64 numpy arrays)."""

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor: ...

    def encode_texts(self, texts: list[str]) -> torch.Tensor: ...

    def cell_embeddings(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, h, w, dim]: the image tower's spatial cells in the embedding space (what explains
        a match: `encoder.scoring.cell_map`): each cell's contribution to the photo's
        embedding where the family's embedding is an average over its cells, else unit
        vectors; encoder.errors.NoSpatialMap when the tower has none."""

    def encode_text_tokens(self, input_ids: torch.Tensor,
                           attention_mask: torch.Tensor) -> torch.Tensor:
        """What `encode_texts` runs after `tokenize` (the exported ONNX text graph)."""

    def trainable_state_keys(self) -> list[str]:
        """The state_dict keys a checkpoint stores (the rest comes from pretrained weights)."""

    def set_query_bank(self, text_emb: torch.Tensor) -> None: ...


@dataclass
class LoadedModel:
    model: EmbeddingModel
    card: dict
    model_id: str
    path: str  # the MODEL_PATH value it was loaded from
