"""The model factory: a `MODEL_PATH` value -> a loaded model, its card, its scoring.

The one module that knows every model family: `encoder.spec` says what the value names, and
this module hands it to the family that builds it (open_clip specs: `encoder.open_clip_model`;
checkpoint files: `encoder.checkpoint`'s weights loaded into the model their config describes,
our `DualEncoder` or a fine-tuned open_clip model).
"""
from __future__ import annotations

import os

from encoder import checkpoint, open_clip_model
from encoder.model import DualEncoder, ModelConfig
from encoder.protocol import EmbeddingModel, LoadedModel
from encoder.scoring import Scoring
from encoder.spec import OpenClipSpec, parse_model_spec


def _base_model(config: ModelConfig) -> EmbeddingModel:
    """The model a checkpoint's weights load into, by the family its config names."""
    if config.extra.get("family") == open_clip_model.FAMILY:  # pretrained base + trained parts
        return open_clip_model.base_model(config)
    return DualEncoder(config)


def load_checkpoint(model_path: str | os.PathLike) -> LoadedModel:
    """A checkpoint file, or a pretrained model spec `open_clip:<arch>[:<tag or weights file>]`
    (encoder/spec.py), ready for inference (eval mode)."""
    spec = parse_model_spec(model_path)
    if isinstance(spec, OpenClipSpec):
        return open_clip_model.load_open_clip(spec)
    payload = checkpoint.read_payload(spec)
    model = _base_model(checkpoint.model_config(payload))
    checkpoint.load_weights(model, payload)
    model.eval()
    return LoadedModel(model, payload.get("card", {}), payload["model_id"], str(spec.path))


def read_scoring(model_path: str | os.PathLike) -> Scoring:
    """A model's scoring (index dimension, query bank) without building its towers where the
    checkpoint holds it: what a planner needs to begin a new index version. Open_clip models are
    built (their temperature is a weight of the base model)."""
    spec = parse_model_spec(model_path)
    if isinstance(spec, OpenClipSpec):
        return Scoring.of(open_clip_model.load_open_clip(spec).model)
    scoring = checkpoint.stored_scoring(checkpoint.read_payload(spec))
    return scoring or Scoring.of(load_checkpoint(model_path).model)


def read_card(model_path: str | os.PathLike) -> dict:
    """Model id, config and the card's fields (an open_clip spec's from the spec and a digest of
    its weights file, without building the model)."""
    spec = parse_model_spec(model_path)
    if isinstance(spec, OpenClipSpec):
        return open_clip_model.read_open_clip_card(spec)
    return checkpoint.card_of(checkpoint.read_payload(spec))


def update_card(model_path: str | os.PathLike, **fields) -> None:
    """Merge fields into a checkpoint's model card; the model id stays the same."""
    spec = parse_model_spec(model_path)
    if isinstance(spec, OpenClipSpec):
        raise ValueError(f"{model_path}: an open_clip model spec has no model card file to update")
    checkpoint.merge_card(spec, **fields)
