"""Pretrained CLIP-family models (open_clip) as encoders, chosen by a spec instead of a checkpoint.

    MODEL_PATH=open_clip:<architecture>[:<pretrained tag or local weights file>]

e.g. `open_clip:ViT-B-32:laion2b_s34b_b79k`, `open_clip:ViT-B-32:/models/open_clip_pytorch_model.bin`,
or `open_clip:<architecture>` (RANDOM weights: for tests only, logged loudly).

`load_open_clip(spec)` returns the same `LoadedModel` a checkpoint gives; its model is an
`OpenClipEncoder`, an adapter with the interface `encoder.inference.Encoder`, `Scoring` and the
ONNX export use (`encode_images`, `encode_texts`, `encode_text_tokens`, `image_backbone.spec`,
`text_backbone.tokenize`, `config.embed_dim`, `logit_scale`, an empty `query_bank`: plain cosine).

The model id is `open_clip-<architecture>-<digest>`, the digest a sha256 over the architecture's
config and every tensor of the state dict, so an index built with one set of weights can never be
served with another.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from encoder.backbones import BackboneUnavailable, ImageSpec
from encoder.model import ModelConfig

log = logging.getLogger(__name__)

PREFIX = "open_clip:"
FAMILY = "open_clip"


def is_open_clip_spec(path: str | os.PathLike) -> bool:
    return isinstance(path, str) and path.startswith(PREFIX)


@dataclass(frozen=True)
class OpenClipSpec:
    architecture: str
    weights: str | None  # a pretrained tag, a local weights file, or None (random)

    @classmethod
    def parse(cls, spec: str) -> "OpenClipSpec":
        if not is_open_clip_spec(spec):
            raise ValueError(f"not an open_clip model spec: {spec!r}")
        arch, _, weights = spec[len(PREFIX):].partition(":")  # a path may hold more colons
        if not arch:
            raise ValueError(f"{spec!r}: expected open_clip:<architecture>[:<tag or weights file>]")
        return cls(arch, weights or None)

    def __str__(self) -> str:
        return PREFIX + self.architecture + (f":{self.weights}" if self.weights else "")


def _open_clip():
    try:
        import open_clip
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise BackboneUnavailable("open_clip models need the package open_clip_torch "
                                  "(pip install 'open_clip_torch>=3.3,<4')") from exc
    return open_clip


def _is_weights_file(weights: str) -> bool:
    return os.sep in weights or "/" in weights or weights.endswith(
        (".bin", ".pt", ".pth", ".safetensors")) or os.path.exists(weights)


def _resolve_weights(oc, arch: str, weights: str | None) -> str | None:
    """A local file for `weights` (downloading a pretrained tag into open_clip's cache where the
    network allows), or None for random weights. Raises BackboneUnavailable with what to do."""
    if weights is None:
        return None
    if _is_weights_file(weights):
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"open_clip weights file not found: {weights}")
        return weights
    from open_clip import pretrained as ocp

    cfg = ocp.get_pretrained_cfg(arch, weights)
    if not cfg:
        tags = ocp.list_pretrained_tags_by_model(arch)
        raise ValueError(f"open_clip {arch}: unknown pretrained tag {weights!r}; known tags: "
                         f"{tags or 'none'} (or pass a local weights file path)")
    try:
        path = ocp.download_pretrained(cfg)
    except Exception as exc:  # hub/url errors of many types (offline: connection errors)
        raise BackboneUnavailable(
            f"open_clip {arch}: pretrained weights {weights!r} could not be fetched "
            f"({type(exc).__name__}: no network or not in the cache); pass a local weights file "
            f"instead (open_clip_pytorch_model.bin, downloaded where there is network): "
            f"MODEL_PATH=open_clip:{arch}:/path/to/open_clip_pytorch_model.bin") from None
    if not path:
        raise BackboneUnavailable(f"open_clip {arch}: pretrained weights {weights!r} could not be "
                                  f"fetched; pass a local weights file instead: "
                                  f"MODEL_PATH=open_clip:{arch}:/path/to/weights")
    return path


def weights_digest(arch_config: dict, state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(json.dumps(arch_config, sort_keys=True, default=str).encode())
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous().reshape(-1)
        h.update(k.encode())
        h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(memoryview(t.view(torch.uint8).numpy() if t.numel() else np.zeros(0, np.uint8)))
    return h.hexdigest()


class OpenClipImageSide:
    """What callers read from `model.image_backbone`: the preprocessing spec."""

    def __init__(self, spec: ImageSpec):
        self.spec = spec


class OpenClipTokenizer:
    """`model.text_backbone`: open_clip's tokenizer (fixed context length, 0 = padding)."""

    def __init__(self, tokenizer, name: str):
        self.tokenizer = tokenizer
        self.name = name

    def tokenize(self, texts: list[str], tensors: str = "pt") -> dict:
        ids = self.tokenizer(list(texts)).long()
        mask = (ids != 0).long()
        if tensors == "np":
            return {"input_ids": ids.numpy().astype(np.int64), "attention_mask": mask.numpy()}
        return {"input_ids": ids, "attention_mask": mask}


class _no_mha_fastpath:
    """nn.MultiheadAttention's inference fast path (eval + no_grad) traces to
    `aten::_native_multi_head_attention`, which the ONNX exporter cannot write; the regular path
    computes the same function. Used only while exporting."""

    def __enter__(self):
        mha = getattr(torch.backends, "mha", None)
        self.prev = mha.get_fastpath_enabled() if mha else None
        if mha:
            mha.set_fastpath_enabled(False)

    def __exit__(self, *exc):
        if self.prev is not None:
            torch.backends.mha.set_fastpath_enabled(self.prev)


def _exporting() -> bool:
    return torch.onnx.is_in_onnx_export() or torch.jit.is_tracing()


class OpenClipEncoder(nn.Module):
    """An open_clip model behind the DualEncoder inference interface."""

    def __init__(self, clip: nn.Module, tokenizer, config: ModelConfig, image_spec: ImageSpec):
        super().__init__()
        self.clip = clip
        self.config = config
        self.image_backbone = OpenClipImageSide(image_spec)
        self.text_backbone = OpenClipTokenizer(tokenizer, config.text_backbone)
        # no hubness correction: plain cosine scoring (encoder/scoring.py)
        self.register_buffer("query_bank", torch.zeros(0, config.embed_dim))

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale

    @property
    def device(self) -> torch.device:
        return next(self.clip.parameters()).device

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        if _exporting():
            with _no_mha_fastpath():
                return F.normalize(self.clip.encode_image(pixels), dim=-1)
        return F.normalize(self.clip.encode_image(pixels), dim=-1)

    def encode_text_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor
                           ) -> torch.Tensor:
        # open_clip pools at the end-of-text token and ignores the mask; multiplying keeps the
        # ids unchanged (padding is 0) and the mask an input of the exported ONNX graph
        ids = input_ids * attention_mask.to(input_ids.dtype)
        if _exporting():
            with _no_mha_fastpath():
                return F.normalize(self.clip.encode_text(ids), dim=-1)
        return F.normalize(self.clip.encode_text(ids), dim=-1)

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        tok = self.text_backbone.tokenize(texts)
        return self.encode_text_tokens(tok["input_ids"].to(self.device),
                                       tok["attention_mask"].to(self.device))


def _image_spec(arch: str, clip: nn.Module, preprocess_cfg: dict, out_dim: int) -> ImageSpec:
    size = preprocess_cfg.get("size") or getattr(clip.visual, "image_size", 224)
    if isinstance(size, (tuple, list)):
        if len(set(size)) != 1:
            raise ValueError(f"open_clip {arch}: non-square input {size} is not supported")
        size = size[0]
    mean = tuple(float(x) for x in preprocess_cfg["mean"])
    std = tuple(float(x) for x in preprocess_cfg["std"])
    return ImageSpec(f"{PREFIX}{arch}", int(size), mean, std, out_dim)


def _embed_dim(oc, arch: str, clip: nn.Module) -> int:
    cfg = oc.get_model_config(arch) or {}
    if "embed_dim" in cfg:
        return int(cfg["embed_dim"])
    with torch.no_grad():  # fall back to the output width of the text tower
        return int(clip.encode_text(torch.zeros(1, 77, dtype=torch.long)).shape[-1])


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def load_open_clip(spec: str):
    """`open_clip:<arch>[:<tag or file>]` -> LoadedModel (see module doc)."""
    from encoder.checkpoint import LoadedModel

    parsed = OpenClipSpec.parse(spec)
    oc = _open_clip()
    arch = parsed.architecture
    arch_config = oc.get_model_config(arch)
    if arch_config is None:
        raise ValueError(f"unknown open_clip architecture {arch!r} (open_clip.list_models() "
                         "lists the known ones)")
    weights_file = _resolve_weights(oc, arch, parsed.weights)
    if weights_file is None:
        log.warning("open_clip %s: NO PRETRAINED WEIGHTS given; using a RANDOM initialisation "
                    "(for tests only). Use open_clip:%s:<pretrained tag or weights file>.",
                    arch, arch)
    try:
        clip, _, _ = oc.create_model_and_transforms(arch, pretrained=weights_file)
    except Exception as exc:  # unreadable file, wrong architecture: errors of many types
        if weights_file is None:
            raise
        raise ValueError(f"open_clip {arch}: cannot load weights {weights_file}: "
                         f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from None
    clip.eval()
    preprocess_cfg = dict(getattr(clip.visual, "preprocess_cfg", None) or {})
    preprocess_cfg.setdefault("mean", getattr(clip.visual, "image_mean", None)
                              or oc.OPENAI_DATASET_MEAN)
    preprocess_cfg.setdefault("std", getattr(clip.visual, "image_std", None)
                              or oc.OPENAI_DATASET_STD)
    embed_dim = _embed_dim(oc, arch, clip)
    image_spec = _image_spec(arch, clip, preprocess_cfg, embed_dim)
    digest = weights_digest(arch_config, clip.state_dict())
    config = ModelConfig(image_backbone=f"{PREFIX}{arch}", text_backbone=f"{PREFIX}{arch}",
                         embed_dim=embed_dim, image_weights=parsed.weights,
                         text_weights=parsed.weights,
                         extra={"family": FAMILY, "architecture": arch,
                                "image_size": image_spec.input_size,
                                "image_mean": list(image_spec.mean),
                                "image_std": list(image_spec.std)})
    model = OpenClipEncoder(clip, oc.get_tokenizer(arch), config, image_spec).eval()
    card = {"family": FAMILY, "architecture": arch, "pretrained": parsed.weights,
            "weights_sha256": digest, "scoring": "cosine",
            "preprocessing": "squash-resize to the input size, open_clip mean/std "
                             f"(open_clip's own: {preprocess_cfg.get('resize_mode', 'shortest')} "
                             f"resize, {preprocess_cfg.get('interpolation', 'bicubic')})"}
    model_id = f"{FAMILY}-{_safe(arch)}-{digest[:12]}"
    return LoadedModel(model, card, model_id, str(parsed))
