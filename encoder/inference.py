"""Inference facade used by the indexer and the API: numpy in, L2-normalised numpy out."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from encoder.checkpoint import LoadedModel, load_checkpoint
from encoder.preprocessing import eval_transform


class Encoder:
    def __init__(self, loaded: LoadedModel, device: str = "cpu"):
        self.loaded = loaded
        self.device = torch.device(device)
        self.model = loaded.model.to(self.device).eval()
        self.model_id = loaded.model_id
        self.dim = loaded.model.config.embed_dim
        self.transform = eval_transform(self.model.image_backbone.spec)

    @classmethod
    def from_checkpoint(cls, path: str, device: str = "cpu") -> "Encoder":
        return cls(load_checkpoint(path), device)

    @torch.inference_mode()
    def encode_texts(self, texts: list[str]) -> np.ndarray:
        return self.model.encode_texts(list(texts)).float().cpu().numpy()

    @torch.inference_mode()
    def encode_pixels(self, pixels: torch.Tensor) -> np.ndarray:
        return self.model.encode_images(pixels.to(self.device)).float().cpu().numpy()

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self.transform(image)

    def encode_images(self, images: list[Image.Image]) -> np.ndarray:
        if not images:
            return np.zeros((0, self.dim), np.float32)
        return self.encode_pixels(torch.stack([self.preprocess(im) for im in images]))
