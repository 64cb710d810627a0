"""Fine-tuning a pretrained open_clip model on Flickr8k-style data (`python -m training --model
open_clip:<arch>:<weights>`): the same loop, loss, evaluation and keep-best selection as our
dual encoder, with the whole model end to end (no feature caches: both towers may train).

What trains (`--train-part`): "projections" (the two projections and the temperature),
"last-blocks" (those + the last `--last-blocks` transformer blocks of each tower and the final
norms), or "all". The checkpoint stores only what trained (fp16), plus the spec of the base
weights, which must be loadable where the checkpoint is served.
"""
from __future__ import annotations

import logging
import random
import re
import time

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from encoder.checkpoint import save_checkpoint
from encoder.preprocessing import train_transform
from training.data import Flickr8kSplit, ImageDataset, collate_indexed
from training.train import LOSSES, Trainer, TrainConfig, contrastive_loss, git_commit

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
    """Trainer over pixels and tokens of an OpenClipEncoder (training.train.Trainer's loop,
    evaluation and selection; only the data, the step and the query bank differ)."""

    def __init__(self, model, train: Flickr8kSplit, dev: Flickr8kSplit | None, cfg: TrainConfig,
                 eval_sets: list[Flickr8kSplit] = (), part: str = "projections",
                 last_blocks: int = 1):
        self.part, self.last_blocks = part, last_blocks
        cfg.cache = False  # nothing to cache: both towers run end to end
        super().__init__(model, train, dev, cfg, eval_sets)

    def _prepare(self):
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
        self.opt = torch.optim.AdamW([{"params": params, "lr": cfg.lr}],
                                     weight_decay=cfg.weight_decay)
        self.tail_params = []
        texts, owner = self.train_split.flat_captions()
        self.train_texts = texts
        self.train_owner = torch.tensor(owner)
        self.captions_of = [[] for _ in range(len(self.train_split))]
        for c, i in enumerate(owner):
            self.captions_of[i].append(c)
        ds = ImageDataset(self.train_split, train_transform(m.image_spec))
        self.loader = DataLoader(ds, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                                 num_workers=cfg.workers, collate_fn=collate_indexed,
                                 pin_memory=self.device == "cuda",
                                 persistent_workers=cfg.workers > 0)
        self.total_steps = max(1, len(self.train_split) // cfg.batch_size) * cfg.epochs
        self.step = 0
        self.queue = None

    def train_epoch(self, epoch: int) -> float:
        m = self.model
        m.clip.train()
        losses = []
        for pixels, idx in tqdm(self.loader, desc=f"epoch {epoch}", unit="batch", leave=False):
            if self.cfg.loss == "multi-positive":
                caps = [c for i in idx.tolist() for c in self.captions_of[i]]
                owner = [j for j, i in enumerate(idx.tolist()) for _ in self.captions_of[i]]
            else:
                caps = [random.choice(self.captions_of[i]) for i in idx.tolist()]
                owner = list(range(len(idx)))
            tok = m.tokenize([self.train_texts[c] for c in caps])
            for g in self.opt.param_groups:
                g["lr"] = self.cfg.lr * self._lr_factor()
            with self._autocast():
                img = m.encode_images(pixels.to(self.device, non_blocking=True))
                txt = m.encode_text_tokens(tok["input_ids"].to(self.device),
                                           tok["attention_mask"].to(self.device))
                scale = m.logit_scale.exp().clamp(max=100)
                loss = contrastive_loss(img.float(), txt.float(),
                                        torch.tensor(owner, device=self.device), scale)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.step += 1
            losses.append(loss.item())
        m.clip.eval()
        return float(np.mean(losses)) if losses else float("nan")

    @torch.no_grad()
    def set_query_bank(self) -> None:
        n = min(self.cfg.query_bank, len(self.train_texts))
        pick = torch.randperm(len(self.train_texts), generator=torch.Generator().manual_seed(
            self.cfg.seed))[:n].tolist()
        self.model.eval()
        chosen = [self.train_texts[i] for i in pick]
        self.model.set_query_bank(torch.cat([self.model.encode_texts(chosen[i:i + 256]).float()
                                             for i in range(0, n, 256)]))


def fine_tune_and_save(loaded, train: Flickr8kSplit, dev: Flickr8kSplit | None, cfg: TrainConfig,
                       out: str, data_desc: str, eval_sets: list[Flickr8kSplit] = (),
                       part: str = "projections", last_blocks: int = 1):
    if cfg.loss not in LOSSES:
        raise ValueError(f"unknown loss {cfg.loss!r}")
    t0 = time.perf_counter()
    model = loaded.model
    trainer = OpenClipTrainer(model, train, dev, cfg, eval_sets, part, last_blocks)
    trainer.fit()
    card = {"name": f"{model.config.extra.get('architecture')} fine-tuned on Flickr8k",
            "base": {"spec": model.config.extra.get("spec"), "model_id": loaded.model_id,
                     **{k: v for k, v in loaded.card.items() if k in ("pretrained",
                                                                       "weights_sha256")}},
            "fine_tuned": {"part": part, "last_blocks": last_blocks if part == "last-blocks"
                           else None, "prefixes": model.config.extra["trainable"]},
            "preprocessing": loaded.card.get("preprocessing"),
            "data": {"source": data_desc, "train_images": len(train)},
            "training": {k: v for k, v in cfg.__dict__.items() if k != "extra"}
            | {"device": trainer.device, "seconds": round(time.perf_counter() - t0, 1),
               "history": trainer.history, "selected_epoch": trainer.selected.get("epoch")},
            "commit": git_commit()}
    card.update(trainer.card_figures())
    model_id = save_checkpoint(model.cpu(), out, card)
    return model_id, trainer
