"""The training job: InfoNCE over image/caption pairs of the Flickr8k train split.

`Trainer` is the loop every model family shares (caption sampling, the contrastive step,
evaluation, keep-best, the hubness bank, the model card); `DualEncoderTrainer` is our dual
encoder's family (cached features or pixels), `training.open_clip_train.OpenClipTrainer` a
pretrained open_clip model's.
"""
from __future__ import annotations

import json
import logging
import math
import random
import subprocess
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from encoder.checkpoint import save_checkpoint
from encoder.loading import load_checkpoint
from encoder.model import DualEncoder, ModelConfig
from encoder.preprocessing import eval_transform, train_transform
from encoder.scoring import Scoring
from training.data import Flickr8kSplit, ImageDataset, collate_indexed
from training.features import image_features, text_features
from training.query_bank import build_query_bank
from training.recall import retrieval_metrics

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    epochs: int = 20
    batch_size: int = 256
    lr: float = 1e-3
    tail_lr: float = 1e-4
    weight_decay: float = 0.05
    warmup_steps: int = 50
    seed: int = 0
    device: str = "auto"
    amp: bool = True  # bf16 autocast on CUDA only
    cache: bool = True
    cache_dir: str = ".cache/features"
    workers: int = 2
    eval_every: int = 1
    position_dropout: float = 0.0  # drop feature-map positions (cached-path augmentation)
    query_bank: int = 1000  # training captions kept for hubness correction (0: none)
    # "one-caption": one drawn caption per image and step; "multi-positive": all of an image's
    # captions in the step, each a positive of its image (image->text averages over them)
    loss: str = "one-caption"
    negatives_queue: int = 0  # recent image/text embeddings kept as extra negatives (0: none)
    keep_best: bool = False  # restore the epoch with the best selection score at the end
    # text-tower training (training/text_tower.py): the image side "locked" or its "head" trained;
    # augmented copies of each caption and copies in query styles ("keywords", ...), one of them
    # drawn instead of the caption with probability augment_p
    image_side: str = "locked"
    caption_variants: int = 0
    typed_variants: tuple[str, ...] = ()
    augment_p: float = 0.5
    log_path: str | None = None
    extra: dict = field(default_factory=dict)


def resolve_device(name: str) -> str:
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda asked for, but CUDA is not available")
    if name == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError("--device mps asked for, but MPS is not available")
    return name


def cache_stage(model: DualEncoder) -> int:
    """First stage after which the feature map reaches its final (smallest) resolution."""
    backbone = model.image_backbone
    size = backbone.spec.input_size
    x = torch.zeros(1, 3, size, size)
    sizes = []
    with torch.no_grad():
        for stage in backbone.stages:
            x = stage.eval()(x)
            sizes.append(x.shape[-1])
    first_final = sizes.index(sizes[-1])
    return min(first_final + 1, model.image_split)


@torch.no_grad()
def advance(model: DualEncoder, feats: torch.Tensor, start: int, stop: int, device: str,
            batch: int = 256) -> torch.Tensor:
    """Run frozen image stages [start, stop) over cached features, in batches (fp16 out)."""
    if start >= stop:
        return feats
    backbone = model.image_backbone.eval()
    return torch.cat([backbone(feats[i:i + batch].to(device).float(), start=start,
                               stop=stop).half().cpu() for i in range(0, len(feats), batch)])


@torch.no_grad()
def embed_split(model: DualEncoder, split: Flickr8kSplit, cache_dir: str | None, device: str,
                use_cache: bool = True, workers: int = 2, amp: bool = False):
    """Embeddings of every image and caption of a split -> (images, captions, owner)."""
    model.eval()
    texts, owner = split.flat_captions()
    if isinstance(model, DualEncoder):  # frozen text tower: its features are cached
        t = text_features(model.text_backbone, texts, cache_dir, device=device)
        txt = model.embed_text_features(t.to(device)).float().cpu()
    else:  # a model with its own end-to-end towers (open_clip): nothing to cache
        use_cache = False
        txt = torch.cat([model.encode_texts(texts[i:i + 256]).float().cpu()
                         for i in range(0, len(texts), 256)])
    if use_cache and cache_stage(model) > 0:  # a fully fine-tuned tower leaves nothing to cache
        stop, tail = cache_stage(model), model.image_split
        feats = advance(model, image_features(model.image_backbone, split, stop, cache_dir,
                                              device=device), stop, tail, device)
        img = torch.cat([model.embed_image_features(feats[i:i + 256].to(device).float(), start=tail)
                         .float().cpu() for i in range(0, len(feats), 256)])
    else:
        loader = DataLoader(ImageDataset(split, eval_transform(model.image_spec)),
                            batch_size=128, num_workers=workers, collate_fn=collate_indexed)
        chunks = []
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp and device == "cuda"):
            for pixels, _ in loader:
                chunks.append(model.encode_images(pixels.to(device)).float().cpu())
        img = torch.cat(chunks)
    return img, txt, owner


@torch.no_grad()
def corrected_metrics(model: DualEncoder, img: torch.Tensor, txt: torch.Tensor,
                      owner: list[int]) -> dict:
    """Metrics under the scoring the service uses: cosine minus the image's hubness bias
    when the model has a query bank (image->text is unchanged by a per-image bias)."""
    raw = retrieval_metrics(img, txt, owner)
    scoring = Scoring.of(model)
    if not scoring.corrected:
        return {**raw, "scoring": scoring.describe()}
    out = retrieval_metrics(scoring.image_vectors(img), scoring.query_vectors(txt), owner)
    out["scoring"] = scoring.describe()
    out["raw_cosine"] = raw
    return out


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


class Trainer:
    """The training loop every model family shares: caption sampling, the contrastive step with
    its learning-rate schedule and negatives queue, evaluation on dev and the eval sets,
    keep-best selection, the hubness bank and the model card. A family subclasses it and
    provides the hooks below (`setup`, `batches`, `embed_batch`, `embed_captions`,
    `train_mode`, `describe`); it never needs to copy the loop."""

    def __init__(self, model, train: Flickr8kSplit, dev: Flickr8kSplit | None,
                 cfg: TrainConfig, eval_sets: list[Flickr8kSplit] = ()):
        if cfg.loss not in LOSSES:
            raise ValueError(f"unknown loss {cfg.loss!r}; known: {LOSSES}")
        self.started = time.perf_counter()
        self.model, self.train_split, self.dev_split, self.cfg = model, train, dev, cfg
        self.eval_sets = list(eval_sets)  # evaluated beside dev; all count for keep_best
        self.best: dict | None = None
        self.device = resolve_device(cfg.device)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.history: list[dict] = []
        self.train_texts, owner = train.flat_captions()
        self.train_owner = torch.tensor(owner)
        # caption ids of each image (all five are used: one drawn per image per epoch)
        self.captions_of = [[] for _ in range(len(train))]
        for c, i in enumerate(owner):
            self.captions_of[i].append(c)
        groups = self.setup()
        self.base_lrs = [g["lr"] for g in groups]
        self.opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
        self.total_steps = ((len(train) // cfg.batch_size) or 1) * cfg.epochs
        self.step = 0
        self.queue = NegativesQueue(cfg.negatives_queue, model.config.embed_dim, self.device)

    # --- hooks a model family provides ------------------------------------------------------
    def setup(self) -> list[dict]:
        """Move the model to the device, choose what trains, prepare the training data; return
        the optimizer's parameter groups, each with its base learning rate ("lr")."""
        raise NotImplementedError

    def batches(self):
        """One epoch of training batches: (inputs for `embed_batch`, image indices)."""
        raise NotImplementedError

    def embed_batch(self, inputs, caption_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised embeddings, with gradients, of a batch's images and of these training
        captions (run under autocast)."""
        raise NotImplementedError

    def embed_captions(self, caption_ids: list[int]) -> torch.Tensor:
        """Normalised embeddings of training captions by id (the hubness bank calls it without
        gradients)."""
        raise NotImplementedError

    def train_mode(self) -> None:
        """Put the parts that train into training mode (at the start of each epoch)."""
        raise NotImplementedError

    def describe(self) -> dict:
        """The model card's description of the model (name, towers, preprocessing, ...)."""
        raise NotImplementedError

    # --- the loop ---------------------------------------------------------------------------
    def _lr_factor(self) -> float:
        w = self.cfg.warmup_steps
        if self.step < w:
            return (self.step + 1) / w
        progress = (self.step - w) / max(1, self.total_steps - w)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    def _autocast(self):
        enabled = self.cfg.amp and self.device == "cuda"
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=enabled)

    def sample_captions(self, idx: torch.Tensor) -> tuple[list[int], list[int]]:
        """The step's captions of images `idx` and, for each, its image's row in the batch: one
        drawn at random per image ("one-caption") or all of them ("multi-positive")."""
        if self.cfg.loss == "multi-positive":
            caps = [c for i in idx.tolist() for c in self.captions_of[i]]
            owner = [j for j, i in enumerate(idx.tolist()) for _ in self.captions_of[i]]
        else:
            caps = [random.choice(self.captions_of[i]) for i in idx.tolist()]
            owner = list(range(len(idx)))
        return caps, owner

    def train_epoch(self, epoch: int) -> float:
        m = self.model
        self.train_mode()
        losses = []
        bar = tqdm(self.batches(), desc=f"epoch {epoch}", unit="batch", leave=False,
                   total=max(1, len(self.train_split) // self.cfg.batch_size))
        for inputs, idx in bar:
            caps, owner = self.sample_captions(idx)
            owner = torch.tensor(owner, device=self.device)
            for g, base in zip(self.opt.param_groups, self.base_lrs):
                g["lr"] = base * self._lr_factor()
            with self._autocast():
                img, txt = self.embed_batch(inputs, caps)
                scale = m.logit_scale.exp().clamp(max=100)
                loss = contrastive_loss(img.float(), txt.float(), owner, scale,
                                        self.queue, idx.to(self.device))
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.queue.push(img.detach().float(), txt.detach().float(), idx.to(self.device),
                            idx.to(self.device)[owner])
            self.step += 1
            losses.append(loss.item())
            bar.set_postfix(loss=f"{loss.item():.3f}")
        m.eval()
        return float(np.mean(losses)) if losses else float("nan")

    def evaluate(self, split: Flickr8kSplit) -> dict:
        img, txt, owner = embed_split(self.model, split, self.cfg.cache_dir, self.device,
                                      self.cfg.cache, self.cfg.workers, self.cfg.amp)
        return corrected_metrics(self.model, img, txt, owner)

    def _remember_if_best(self, epoch: int, row: dict) -> None:
        """Selection score: text->image (R@1+R@5+R@10)/3, averaged over dev and the eval sets."""
        evaluated = [row["dev"], *row.get("sets", {}).values()] if "dev" in row else []
        if not evaluated:
            return
        score = float(np.mean([np.mean([r["text_to_image"][k] for k in ("R@1", "R@5", "R@10")])
                               for r in evaluated]))
        row["selection_score"] = round(score, 3)
        if self.best is None or score > self.best["score"]:
            keys = set(self.model.trainable_state_keys())
            self.best = {"epoch": epoch, "score": score, "state": {
                k: v.detach().cpu().clone() for k, v in self.model.state_dict().items() if k in keys}}

    def set_query_bank(self) -> None:
        """Keep the embeddings of `query_bank` random training captions in the model."""
        build_query_bank(self.model, len(self.train_texts), self.cfg.query_bank, self.cfg.seed,
                         self.embed_captions)

    def fit(self) -> list[dict]:
        for epoch in range(1, self.cfg.epochs + 1):
            t0 = time.perf_counter()
            loss = self.train_epoch(epoch)
            if self.cfg.query_bank:
                self.set_query_bank()
            row = {"epoch": epoch, "loss": round(loss, 4), "seconds": round(time.perf_counter() - t0, 1),
                   "temperature": round(1 / self.model.logit_scale.exp().item(), 4)}
            if self.dev_split is not None and (epoch % self.cfg.eval_every == 0
                                               or epoch == self.cfg.epochs):
                row["dev"] = self.evaluate(self.dev_split)
                if self.eval_sets:
                    row["sets"] = {s.name: self.evaluate(s) for s in self.eval_sets}
                if self.cfg.keep_best:
                    self._remember_if_best(epoch, row)
            self.history.append(row)
            dev = row.get("dev", {}).get("text_to_image", {})
            log.info("epoch %d loss %.4f %s (%.1fs)", epoch, loss,
                     " ".join(f"{k}={v}" for k, v in dev.items() if k.startswith("R@")),
                     row["seconds"])
            if self.cfg.log_path:
                with open(self.cfg.log_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
        if self.best is not None and self.best["epoch"] != self.cfg.epochs:
            log.info("restoring epoch %d (best selection score %.2f)", self.best["epoch"],
                     self.best["score"])
            self.model.load_state_dict(self.best["state"], strict=False)
        return self.history

    # --- the result -------------------------------------------------------------------------
    def card_figures(self) -> dict:
        """The model card's figures of the weights the model ends with: `metrics` (dev) and
        `evaluations` (dev and every eval set)."""
        selected = self.selected
        if "dev" not in selected:
            return {}
        dev = {"split": "dev", "images": len(self.dev_split), **selected["dev"]}
        return {"metrics": dev, "evaluations": {"dev": dev} | {
            s.name: {"split": s.name, "images": len(s), **selected["sets"][s.name]}
            for s in self.eval_sets}}

    @property
    def selected(self) -> dict:
        """The history row of the weights the model ends with."""
        epoch = self.best["epoch"] if self.best is not None else self.cfg.epochs
        return next((r for r in self.history if r["epoch"] == epoch), self.history[-1]) \
            if self.history else {}

    def model_card(self, data_desc: str) -> dict:
        """The card saved with the checkpoint: the family's description, the data, the training
        settings and history, and the selected weights' figures."""
        return {
            **self.describe(),
            "data": {"source": data_desc, "train_split": "Flickr8k official train",
                     "train_images": len(self.train_split),
                     "train_captions": int(self.train_owner.numel())},
            "training": {k: v for k, v in self.cfg.__dict__.items() if k not in ("extra",)}
            | {"device": self.device, "seconds": round(time.perf_counter() - self.started, 1),
               "history": self.history, "selected_epoch": self.selected.get("epoch")},
            "commit": git_commit(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **self.card_figures(),
        }

    def fit_and_save(self, out: str | Path, data_desc: str) -> str:
        """Train, then write the checkpoint and its card to `out`; returns the model id."""
        self.fit()
        return save_checkpoint(self.model.cpu(), out, self.model_card(data_desc))


class DualEncoderTrainer(Trainer):
    """Our dual encoder: frozen towers with trained heads (and optionally the top image stages).

    Cached path (default): the frozen image stages run once into a feature cache; each step runs
    only the fine-tuned tail stages (if any) and the heads; text features are cached too.
    Pixel path (`cfg.cache=False`, for a GPU): images decoded and augmented every epoch; stages
    below the tail run without gradients; BatchNorm statistics stay frozen (training mode
    lowered dev recall)."""

    def setup(self) -> list[dict]:
        m, cfg = self.model, self.cfg
        self.split = m.image_split
        self.stop = cache_stage(m) if cfg.cache else 0
        m.to(self.device)
        for p in m.parameters():
            p.requires_grad_(False)
        for name, p in m.named_parameters():
            if name in set(m.trainable_state_keys()):
                p.requires_grad_(True)
        tail = [p for n, p in m.named_parameters()
                if p.requires_grad and n.startswith("image_backbone.")]
        heads = [p for n, p in m.named_parameters()
                 if p.requires_grad and not n.startswith("image_backbone.")]
        groups = [{"params": heads, "lr": cfg.lr}]
        if tail:
            groups.append({"params": tail, "lr": cfg.tail_lr})
        self.train_text = text_features(m.text_backbone, self.train_texts, cfg.cache_dir,
                                        device=self.device)
        if cfg.cache:
            self.train_img = advance(m, image_features(
                m.image_backbone, self.train_split, self.stop, cfg.cache_dir, device=self.device),
                self.stop, self.split, self.device)
        else:
            ds = ImageDataset(self.train_split, train_transform(m.image_backbone.spec))
            self.loader = DataLoader(ds, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                                     num_workers=cfg.workers, collate_fn=collate_indexed,
                                     pin_memory=self.device == "cuda",
                                     persistent_workers=cfg.workers > 0)
        return groups

    def train_mode(self) -> None:
        self.model.image_head.train()
        self.model.text_head.train()

    def batches(self):
        if self.cfg.cache:
            order = torch.randperm(len(self.train_split))
            bs = self.cfg.batch_size
            for s in range(0, len(order) - bs + 1 if len(order) >= bs else 1, bs):
                idx = order[s:s + bs]
                yield (self.train_img[idx].to(self.device).float(), self.split), idx
        else:
            for pixels, idx in self.loader:
                yield (pixels.to(self.device, non_blocking=True), 0), idx

    def embed_batch(self, inputs, caption_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        x, from_stage = inputs
        return self._image_embed(x, from_stage, train=True), self.embed_captions(caption_ids)

    def embed_captions(self, caption_ids: list[int]) -> torch.Tensor:
        return self.model.embed_text_features(
            self.train_text[torch.tensor(caption_ids)].to(self.device))

    def _image_embed(self, x: torch.Tensor, from_stage: int, train: bool) -> torch.Tensor:
        """x = output of stages[:from_stage] -> normalised embedding (tail+head with grad)."""
        backbone = self.model.image_backbone
        backbone.eval()  # BatchNorm statistics stay frozen; dropout/drop-connect off
        with torch.no_grad():
            x = backbone(x, start=from_stage, stop=self.split)
        if train and self.cfg.position_dropout > 0:
            keep = (torch.rand(x.shape[0], 1, *x.shape[2:], device=x.device)
                    >= self.cfg.position_dropout).to(x.dtype)
            x = x * keep / keep.mean((2, 3), keepdim=True).clamp(min=1e-3)
        return self.model.embed_image_features(x, start=self.split)

    def describe(self) -> dict:
        return {"name": "flickr8k dual encoder", **describe_model(self.model)}


LOSSES = ("one-caption", "multi-positive")


class NegativesQueue:
    """The last `size` image and text embeddings (detached) with their image ids: extra
    negatives for both directions, a larger effective batch at the cost of slightly stale
    vectors."""

    def __init__(self, size: int, dim: int, device: str):
        self.size = size
        self.img = torch.zeros(0, dim, device=device)
        self.img_ids = torch.zeros(0, dtype=torch.long, device=device)
        self.txt = torch.zeros(0, dim, device=device)
        self.txt_ids = torch.zeros(0, dtype=torch.long, device=device)

    def push(self, img, txt, img_ids, txt_ids) -> None:
        if self.size:
            self.img = torch.cat([img, self.img])[:self.size]
            self.img_ids = torch.cat([img_ids, self.img_ids])[:self.size]
            self.txt = torch.cat([txt, self.txt])[:self.size]
            self.txt_ids = torch.cat([txt_ids, self.txt_ids])[:self.size]


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, owner: torch.Tensor,
                     scale: torch.Tensor, queue: NegativesQueue | None = None,
                     image_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE with any number of captions per image: `owner[t]` is the batch row of
    caption t's image. Text->image: cross-entropy over the batch images (+ queued images).
    Image->text: mean over the image's captions of log p(caption) against every caption in the
    batch (+ queued captions); with one caption per image both are the usual CLIP loss."""
    logits = scale * img @ txt.T  # [images, captions]
    rows = torch.arange(len(img), device=img.device)
    positive = owner[None, :] == rows[:, None]
    t2i_logits, i2t_logits = logits.T, logits
    if queue is not None and len(queue.img):
        # entries of the batch's own images are left out: the batch holds their fresh vectors
        stale_img = torch.isin(queue.img_ids, image_ids)
        t2i_logits = torch.cat([t2i_logits, scale * txt @ queue.img[~stale_img].T], 1)
        stale_txt = torch.isin(queue.txt_ids, image_ids)
        i2t_logits = torch.cat([i2t_logits, scale * img @ queue.txt[~stale_txt].T], 1)
        positive = torch.cat([positive, positive.new_zeros(len(img), int((~stale_txt).sum()))], 1)
    t2i = F.cross_entropy(t2i_logits, owner)
    log_p = i2t_logits.log_softmax(1).masked_fill(~positive, 0)
    i2t = -(log_p.sum(1) / positive.sum(1)).mean()
    return (t2i + i2t) / 2


def build_model(config: ModelConfig, resume: str | None = None) -> DualEncoder:
    if resume:
        loaded = load_checkpoint(resume)
        return loaded.model
    return DualEncoder(config)


def describe_model(model: DualEncoder) -> dict:
    spec = model.image_backbone.spec
    return {
        "backbones": {"image": model.config.image_backbone, "text": model.config.text_backbone},
        "embedding_dim": model.config.embed_dim,
        "fine_tuned_image_stages": model.config.image_tail_stages,
        "fine_tuned_text_layers": model.config.text_tail_layers,
        "preprocessing": {"image_size": spec.input_size, "resize": "squash to square",
                          "mean": spec.mean, "std": spec.std, "text_max_tokens":
                          model.text_backbone.max_length, "text_pooling": "mean over mask"},
    }
