"""The model: backbone registry, projection heads, preprocessing, checkpoints."""
from encoder.backbones import IMAGE_BACKBONES, TEXT_BACKBONES, BackboneUnavailable
from encoder.checkpoint import (LoadedModel, load_checkpoint, read_card, read_scoring,
                                save_checkpoint, update_card)
from encoder.inference import Encoder
from encoder.model import DualEncoder, ModelConfig
from encoder.scoring import Scoring
from encoder.preprocessing import BadImage, decode_image

__all__ = [
    "IMAGE_BACKBONES", "TEXT_BACKBONES", "BackboneUnavailable", "BadImage", "DualEncoder",
    "Encoder", "LoadedModel", "ModelConfig", "Scoring", "decode_image", "load_checkpoint",
    "read_card", "read_scoring",
    "save_checkpoint", "update_card",
]
