"""The model: backbone registry, projection heads, preprocessing, checkpoints, the scoring
convention (`Scoring`) and what a score means to a person (`MatchScale`, from the model card)."""
from encoder.backbones import IMAGE_BACKBONES, TEXT_BACKBONES, BackboneUnavailable
from encoder.checkpoint import (LoadedModel, load_checkpoint, read_card, read_scoring,
                                save_checkpoint, update_card)
from encoder.inference import Encoder
from encoder.match_scale import MatchScale
from encoder.model import DualEncoder, ModelConfig
from encoder.scoring import Scoring
from encoder.preprocessing import BadImage, decode_image

__all__ = [
    "IMAGE_BACKBONES", "TEXT_BACKBONES", "BackboneUnavailable", "BadImage", "DualEncoder",
    "Encoder", "LoadedModel", "MatchScale", "ModelConfig", "Scoring", "decode_image",
    "load_checkpoint", "read_card", "read_scoring",
    "save_checkpoint", "update_card",
]
