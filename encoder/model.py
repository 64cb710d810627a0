"""The dual encoder: pretrained towers + projection heads into one L2-normalised space (an
`encoder.protocol.EmbeddingModel`)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from encoder.backbones import (
    ImageSpec,
    StagedImageBackbone,
    TextBackbone,
    create_image_backbone,
    create_text_backbone,
)


@dataclass
class ModelConfig:
    image_backbone: str = "efficientnet_lite0"
    text_backbone: str = "all-MiniLM-L6-v2"
    embed_dim: int = 256
    head: str = "linear"  # linear | mlp
    image_pool: str = "avg"  # avg | attention (learned pooling over the feature map)
    # top image stages that are fine-tuned; their weights are saved in the checkpoint
    image_tail_stages: int = 0
    # top transformer layers of the text tower that are fine-tuned (saved like the image tail)
    text_tail_layers: int = 0
    image_weights: str | None = None
    text_weights: str | None = None
    # hubness correction: a bank of training-caption embeddings (see encoder/scoring.py)
    query_bank_size: int = 0
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        d = asdict(self)
        if not d["text_tail_layers"]:  # configs written before the field keep their model ids
            del d["text_tail_layers"]
        return d


class Projection(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, kind: str):
        super().__init__()
        if kind not in ("linear", "mlp"):
            raise ValueError(f"unknown head {kind!r}")
        self.linear = nn.Linear(in_dim, out_dim)
        # mlp = linear + residual two-layer branch (starts as the linear head)
        self.mlp = None
        if kind == "mlp":
            self.mlp = nn.Sequential(
                nn.Linear(in_dim, out_dim * 2), nn.GELU(), nn.Dropout(0.1),
                nn.Linear(out_dim * 2, out_dim),
            )
            nn.init.zeros_(self.mlp[-1].weight)
            nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, x):
        y = self.linear(x)
        return y if self.mlp is None else y + self.mlp(x)


class AttentionPool(nn.Module):
    """Softmax-weighted average over positions, mixed with the plain average (starts at avg)."""

    def __init__(self, channels: int):
        super().__init__()
        self.score = nn.Conv2d(channels, 1, kernel_size=1)
        nn.init.zeros_(self.score.weight)
        nn.init.zeros_(self.score.bias)

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        weights = self.score(fmap).flatten(2).softmax(-1)  # [B, 1, h*w]
        return (fmap.flatten(2) * weights).sum(-1)


class ImageHead(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, head: str, pool: str):
        super().__init__()
        if pool not in ("avg", "attention"):
            raise ValueError(f"unknown image_pool {pool!r}")
        self.pool = AttentionPool(in_dim) if pool == "attention" else None
        self.proj = Projection(in_dim, out_dim, head)

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        if fmap.dim() == 4:
            fmap = self.pool(fmap) if self.pool is not None else fmap.mean((2, 3))
        return self.proj(fmap)


class DualEncoder(nn.Module):
    def __init__(self, config: ModelConfig, image_backbone: StagedImageBackbone | None = None,
                 text_backbone: TextBackbone | None = None, load_backbones: bool = True):
        super().__init__()
        self.config = config
        if load_backbones:
            image_backbone = image_backbone or create_image_backbone(
                config.image_backbone, config.image_weights)
            text_backbone = text_backbone or create_text_backbone(
                config.text_backbone, config.text_weights)
        self.image_backbone = image_backbone
        self.text_backbone = text_backbone
        img_dim = image_backbone.spec.out_dim if image_backbone else config.extra["image_dim"]
        txt_dim = text_backbone.out_dim if text_backbone else config.extra["text_dim"]
        config.extra.update(image_dim=img_dim, text_dim=txt_dim)
        self.image_head = ImageHead(img_dim, config.embed_dim, config.head, config.image_pool)
        self.text_head = Projection(txt_dim, config.embed_dim, config.head)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.register_buffer("query_bank", torch.zeros(config.query_bank_size, config.embed_dim))

    # --- the split between frozen and trainable image stages -----------------------------
    @property
    def image_split(self) -> int:
        """Index of the first fine-tuned image stage (== number of stages when all frozen)."""
        n = len(self.image_backbone.stages)
        return n - self.config.image_tail_stages

    @property
    def text_split(self) -> int:
        """Index of the first fine-tuned text layer (== number of layers when all frozen)."""
        if not self.config.text_tail_layers:
            return int(self.text_backbone.model.config.num_hidden_layers)
        n = len(self.text_backbone.layers)
        if not 0 < self.config.text_tail_layers <= n:
            raise ValueError(f"text_tail_layers={self.config.text_tail_layers}: the text tower "
                             f"has {n} layers")
        return n - self.config.text_tail_layers

    def trainable_state_keys(self) -> list[str]:
        """The weights a checkpoint stores: heads, scale, bank, and the fine-tuned tails."""
        keys = [k for k in self.state_dict() if not k.startswith(("image_backbone.", "text_backbone."))]
        split = self.image_split
        text_prefix = "text_backbone.model.encoder.layer."
        text_split = self.text_split if self.config.text_tail_layers else None
        for k in self.state_dict():
            if k.startswith("image_backbone.stages."):
                if int(k.split(".")[2]) >= split:
                    keys.append(k)
            elif text_split is not None and k.startswith(text_prefix):
                if int(k[len(text_prefix):].split(".")[0]) >= text_split:
                    keys.append(k)
        return keys

    # --- preprocessing: what the towers take -------------------------------------------------
    @property
    def image_spec(self) -> ImageSpec:
        return self.image_backbone.spec

    def tokenize(self, texts: Sequence[str], tensors: str = "pt") -> dict:
        return self.text_backbone.tokenize(list(texts), tensors)

    # --- encoding ---------------------------------------------------------------------------
    def embed_image_features(self, fmap: torch.Tensor, start: int | None = None) -> torch.Tensor:
        """Head (and fine-tuned tail stages, from `start`) on cached backbone output."""
        if start is not None and start < len(self.image_backbone.stages):
            fmap = self.image_backbone(fmap, start=start)
        return F.normalize(self.image_head(fmap), dim=-1)

    def embed_text_features(self, feats: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_head(feats), dim=-1)

    # --- hubness correction: the bank is stored with the model, scoring.py uses it ------------
    def set_query_bank(self, text_emb: torch.Tensor) -> None:
        """Keep these (normalised) training-caption embeddings as the query bank."""
        self.query_bank = text_emb.detach().to(self.query_bank.device, torch.float32).clone()
        self.config.query_bank_size = int(self.query_bank.shape[0])

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_head(self.image_backbone(pixels)), dim=-1)

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        return F.normalize(self.text_head(self.text_backbone(texts)), dim=-1)

    def cell_embeddings(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, h, w, dim]: each cell's part of the photo's embedding before its normalisation.
        The embedding is the (linear) head over the cells' average, head(sum_ij a_ij f_ij) =
        sum_ij a_ij head(f_ij) with a_ij = 1/(h w) (or the attention pool's weights), so the
        cells, scaled by h w, average to it exactly: a query's dot product with a cell is that
        cell's contribution to the photo's score (class activation mapping). Exact for the
        linear head; with the mlp head (`head="mlp"`) the head is not linear and the cells are
        its output per cell, an approximation. Not normalised: a cell's unit vector would say
        what it looks like, not how much it counts."""
        fmap = self.image_backbone(pixels)  # [B, C, h, w]
        b, _, h, w = fmap.shape
        cells = self.image_head.proj(fmap.permute(0, 2, 3, 1))  # [B, h, w, dim]
        if self.image_head.pool is not None:
            weights = self.image_head.pool.score(fmap).flatten(2).softmax(-1)  # [B, 1, h*w]
            cells = cells * (weights.reshape(b, h, w, 1) * (h * w))
        return cells

    def encode_text_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor
                           ) -> torch.Tensor:
        """The text tower over token ids: what `encode_texts` runs after tokenizing."""
        return F.normalize(self.text_head(self.text_backbone.forward_tokens(
            input_ids, attention_mask)), dim=-1)
