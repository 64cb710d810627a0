"""Fine-tuning a pretrained open_clip model on Flickr8k-style data (`python -m training --model
open_clip:<arch>:<weights>`): `OpenClipTrainer` provides training.train.Trainer's hooks, so
the loop, loss, evaluation, keep-best selection, hubness bank and card are our dual encoder's;
the whole model runs end to end (no feature caches: both towers may train).

What trains (`--train-part`): "projections" (the two projections and the temperature),
"last-blocks" (those + the last `--last-blocks` transformer blocks of each tower and the final
norms), or "all". The checkpoint stores only what trained (fp16), plus the spec of the base
weights, which must be loadable where the checkpoint is served.
"""
from __future__ import annotations

import logging
import re

import torch
from torch.utils.data import DataLoader

from encoder import LoadedModel
from encoder.preprocessing import train_transform
from training.data import Flickr8kSplit, ImageDataset, collate_indexed
from training.train import Trainer, TrainConfig

log = logging.getLogger(__name__)

TRAIN_PARTS = ("projections", "last-blocks", "all")
# parameter names (under the open_clip model) that project into the joint space, per family
_PROJECTIONS = re.compile(r"^(logit_scale|text_projection|visual\.proj|visual\.head\..*"
                          r"|visual\.trunk\.head\..*|visual\.attn_pool.*)$")
_FINAL_NORMS = re.compile(r"^(ln_final|visual\.ln_post|visual\.trunk\.norm|visual\.trunk\.fc_norm)"
                          r"(\.|$)")
_BLOCK = re.compile(r"^(.*\.(?:resblocks|blocks))\.(\d+)\.")


def trainable_prefixes(clip: torch.nn.Module, part: str, last_blocks: int = 1) -> list[str]:
    """Parameter-name prefixes of `clip` that train for `part` (see the module doc)."""
    if part not in TRAIN_PARTS:
        raise ValueError(f"unknown train part {part!r}; known: {TRAIN_PARTS}")
    names = [n for n, _ in clip.named_parameters()]
    if part == "all":
        return [""]
    chosen = [n for n in names if _PROJECTIONS.match(n)]
    if part == "last-blocks":
        chosen += [n for n in names if _FINAL_NORMS.match(n)]
        blocks: dict[str, set[int]] = {}
        for n in names:
            if m := _BLOCK.match(n):
                blocks.setdefault(m[1], set()).add(int(m[2]))
        for stack, ids in blocks.items():
            chosen += [f"{stack}.{i}." for i in sorted(ids)[-last_blocks:]]
    if not chosen:
        raise ValueError(f"no parameters found for --train-part {part} in this architecture")
    return sorted(set(chosen))


class OpenClipTrainer(Trainer):
    """A pretrained open_clip model (an OpenClipEncoder), end to end over pixels and tokens:
    the hooks of training.train.Trainer, whose loop, evaluation and selection it shares."""

    def __init__(self, base: LoadedModel, train: Flickr8kSplit, dev: Flickr8kSplit | None,
                 cfg: TrainConfig, eval_sets: list[Flickr8kSplit] = (),
                 part: str = "projections", last_blocks: int = 1):
        self.base, self.part, self.last_blocks = base, part, last_blocks
        cfg.cache = False  # nothing to cache: both towers run end to end
        super().__init__(base.model, train, dev, cfg, eval_sets)

    def setup(self) -> list[dict]:
        m, cfg = self.model, self.cfg
        prefixes = trainable_prefixes(m.clip, self.part, self.last_blocks)
        m.config.extra["trainable"] = prefixes
        m.to(self.device)
        params = []
        for name, p in m.clip.named_parameters():
            p.requires_grad_(name.startswith(tuple(prefixes)))
            if p.requires_grad:
                params.append(p)
        log.info("fine-tuning %d tensors (%.1f M parameters) of %s", len(params),
                 sum(p.numel() for p in params) / 1e6, m.config.extra.get("architecture"))
        ds = ImageDataset(self.train_split, train_transform(m.image_spec))
        self.loader = DataLoader(ds, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                                 num_workers=cfg.workers, collate_fn=collate_indexed,
                                 pin_memory=self.device == "cuda",
                                 persistent_workers=cfg.workers > 0)
        return [{"params": params, "lr": cfg.lr}]

    def train_mode(self) -> None:
        self.model.clip.train()

    def batches(self):
        for pixels, idx in self.loader:
            yield pixels.to(self.device, non_blocking=True), idx

    def embed_batch(self, pixels, caption_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.model
        tok = m.tokenize([self.train_texts[c] for c in caption_ids])
        img = m.encode_images(pixels)
        txt = m.encode_text_tokens(tok["input_ids"].to(self.device),
                                   tok["attention_mask"].to(self.device))
        return img, txt

    def embed_captions(self, caption_ids: list[int]) -> torch.Tensor:
        texts = [self.train_texts[i] for i in caption_ids]
        return torch.cat([self.model.encode_texts(texts[i:i + 256]).float()
                          for i in range(0, len(texts), 256)])

    def describe(self) -> dict:
        m, base = self.model, self.base
        return {"name": f"{m.config.extra.get('architecture')} fine-tuned on Flickr8k",
                "base": {"spec": m.config.extra.get("spec"), "model_id": base.model_id,
                         **{k: v for k, v in base.card.items()
                            if k in ("pretrained", "weights_sha256")}},
                "fine_tuned": {"part": self.part, "last_blocks": self.last_blocks
                               if self.part == "last-blocks" else None,
                               "prefixes": m.config.extra["trainable"]},
                "preprocessing": base.card.get("preprocessing")}
