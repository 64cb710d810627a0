"""Fine-tuning the text tower's top layers on the CPU: what every query goes through.

The layers below the fine-tuned ones never change, so their output is computed once per caption
(`training.features.text_states`, cached on disk) and each step runs only the top layers, the
pooling and the heads. The image tower is locked at its weights and run once per image
(`pooled_image_features`); its head is either locked too ("locked": the image embeddings, and
so an index, stay as they were up to the model id) or trained beside the text side ("head").
Augmented captions (`training.caption_augment`) and the captions in query styles as people type
them (`training.query_styles`) are cached beside the originals as variants.
"""
from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from training.data import Flickr8kSplit
from training.features import TokenStates, pooled_image_features, text_states
from training.query_styles import styled_queries
from training.train import DualEncoderTrainer, corrected_metrics

IMAGE_SIDES = ("locked", "head")


class TextTowerTrainer(DualEncoderTrainer):
    """Our dual encoder with `config.text_tail_layers` top text layers trained (cfg.image_side:
    "locked" or "head"; cfg.caption_variants augmented copies of each caption and one copy per
    style of cfg.typed_variants, one of them drawn with probability cfg.augment_p per caption and
    step)."""

    def setup(self) -> list[dict]:
        m, cfg = self.model, self.cfg
        side = cfg.image_side
        if side not in IMAGE_SIDES:
            raise ValueError(f"unknown image side {side!r}; known: {IMAGE_SIDES}")
        if m.config.image_pool != "avg":
            raise ValueError("text-tower training caches average-pooled image features: it "
                             f"needs image_pool='avg', not {m.config.image_pool!r}")
        self.image_side = side
        self.text_split = m.text_split
        m.to(self.device)
        for p in m.parameters():
            p.requires_grad_(False)
        layers = list(m.text_backbone.layers[self.text_split:].parameters())
        heads = [*m.text_head.parameters(), m.logit_scale]
        if side == "head":
            heads += list(m.image_head.parameters())
        for p in layers + heads:
            p.requires_grad_(True)

        self.augment_p = cfg.augment_p
        texts = list(self.train_texts)
        if cfg.caption_variants:
            from training.caption_augment import augmented_variants

            for variant in augmented_variants(self.train_texts, cfg.caption_variants, cfg.seed):
                texts += variant
        for style in cfg.typed_variants:
            texts += styled_queries(self.train_texts, style, cfg.seed)
        self.variants = cfg.caption_variants + len(cfg.typed_variants)
        self.train_states = text_states(m.text_backbone, texts, self.text_split, cfg.cache_dir,
                                        device=self.device)
        self.train_pooled = self.pooled(self.train_split)
        self._eval_states: dict[str, TokenStates] = {}
        return [{"params": heads, "lr": cfg.lr}, {"params": layers, "lr": cfg.tail_lr}]

    def pooled(self, split: Flickr8kSplit) -> torch.Tensor:
        return pooled_image_features(self.model.image_backbone, split, self.cfg.cache_dir,
                                     workers=self.cfg.workers, device=self.device)

    def train_mode(self) -> None:
        m = self.model
        m.text_head.train()
        m.text_backbone.layers[self.text_split:].train()
        if self.image_side == "head":
            m.image_head.train()

    def batches(self):
        order = torch.randperm(len(self.train_split))
        bs = self.cfg.batch_size
        for s in range(0, len(order) - bs + 1 if len(order) >= bs else 1, bs):
            idx = order[s:s + bs]
            yield self.train_pooled[idx].to(self.device).float(), idx

    def embed_batch(self, inputs, caption_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self.train_texts)
        rows = [c + n * random.randint(1, self.variants)
                if self.variants and random.random() < self.augment_p else c
                for c in caption_ids]
        return self.embed_pooled(inputs), self.embed_states(self.train_states, rows)

    def embed_captions(self, caption_ids: list[int]) -> torch.Tensor:
        return torch.cat([self.embed_states(self.train_states, caption_ids[i:i + 512])
                          for i in range(0, len(caption_ids), 512)])

    def embed_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.image_head(pooled), dim=-1)

    def embed_states(self, states: TokenStates, rows: list[int]) -> torch.Tensor:
        hidden, mask = states.batch(rows, self.device)
        pooled = self.model.text_backbone.forward_from(hidden, mask, self.text_split)
        return self.model.embed_text_features(pooled)

    @torch.no_grad()
    def evaluate(self, split: Flickr8kSplit) -> dict:
        """The same figures as `embed_split` + `corrected_metrics` give for the saved model,
        from the caches (lower text layers per caption, pooled image features)."""
        m = self.model
        m.eval()
        texts, owner = split.flat_captions()
        key = f"{split.name}-{split.fingerprint()}"
        if key not in self._eval_states:
            self._eval_states[key] = text_states(m.text_backbone, texts, self.text_split,
                                                 self.cfg.cache_dir, device=self.device,
                                                 progress=False)
        states = self._eval_states[key]
        txt = torch.cat([self.embed_states(states, list(range(i, min(i + 512, len(texts)))))
                         .float().cpu() for i in range(0, len(texts), 512)])
        img = self.embed_pooled(self.pooled(split).to(self.device).float()).float().cpu()
        return corrected_metrics(m, img, txt, owner)

    def describe(self) -> dict:
        return {**super().describe(), "image_side": self.image_side,
                "caption_variants": self.cfg.caption_variants,
                "typed_variants": list(self.cfg.typed_variants)}
