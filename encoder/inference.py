"""Inference facade used by the indexer and the API: numpy in, L2-normalised numpy out.

Each tower runs on a runtime: "torch" (eager PyTorch, the reference), "onnx" (ONNX Runtime fp32,
same function, several times faster on CPU) or "onnx-int8" (see encoder/runtime_onnx.py). A
runtime that cannot start (onnxruntime missing, export refused) falls back to eager PyTorch with
a warning; the model id never depends on the runtime.
"""
from __future__ import annotations

import logging

import numpy as np
import torch
from PIL import Image

from encoder.loading import load_checkpoint
from encoder.pixels import PixelNormalizer
from encoder.protocol import LoadedModel
from encoder.preprocessing import eval_transform
from encoder.runtime_onnx import RUNTIMES, OnnxTowers, OnnxUnavailable
from encoder.scoring import Scoring

log = logging.getLogger(__name__)


class Encoder:
    def __init__(self, loaded: LoadedModel, device: str = "cpu", image_runtime: str = "torch",
                 text_runtime: str = "torch", onnx_cache_dir: str | None = None,
                 threads: int | None = None):
        for r in (image_runtime, text_runtime):
            if r not in RUNTIMES:
                raise ValueError(f"unknown runtime {r!r}; known: {RUNTIMES}")
        self.loaded = loaded
        self.card = loaded.card
        self.device = torch.device(device)
        self.model = loaded.model.to(self.device).eval()
        self.model_id = loaded.model_id
        self.dim = loaded.model.config.embed_dim
        # how embeddings become index and query vectors (the one owner of that convention)
        self.scoring = Scoring.of(loaded.model)
        self.image_spec = self.model.image_spec
        self.transform = eval_transform(self.model.image_spec)
        self.normalize = PixelNormalizer(self.model.image_spec)  # the torch-free twin
        onnx_ok = self.device.type == "cpu"
        if not onnx_ok and "torch" not in (image_runtime, text_runtime):
            log.info("ONNX runtimes are for CPU; running eager PyTorch on %s", self.device)
        self.image_runtime = image_runtime if onnx_ok else "torch"
        self.text_runtime = text_runtime if onnx_ok else "torch"
        self.onnx = OnnxTowers(self.model, self.model_id, onnx_cache_dir, threads) \
            if "onnx" in self.image_runtime + self.text_runtime else None
        self._cells_eager = False  # the cells graph could not be built: explain eagerly

    @classmethod
    def from_checkpoint(cls, path: str, device: str = "cpu", image_runtime: str = "torch",
                        text_runtime: str = "torch", **kw) -> "Encoder":
        return cls(load_checkpoint(path), device, image_runtime, text_runtime, **kw)

    @classmethod
    def from_settings(cls, settings) -> "Encoder":
        """The encoder every process uses: MODEL_PATH, DEVICE, IMAGE_RUNTIME, TEXT_RUNTIME."""
        return cls.from_checkpoint(settings.model_path, settings.device,
                                   image_runtime=settings.image_runtime,
                                   text_runtime=settings.text_runtime,
                                   onnx_cache_dir=settings.onnx_cache_dir)

    def _fallback(self, tower: str, exc: Exception) -> None:
        log.warning("%s tower: %s; falling back to eager PyTorch", tower, exc)
        setattr(self, f"{tower}_runtime", "torch")

    def warmup(self, image: bool = True) -> None:
        """Build/load the runtime sessions now (export once per model id) instead of on the
        first request (the image tower's too unless `image` is False)."""
        self.encode_texts(["warm up"])
        if not image:
            return
        size = self.model.image_spec.input_size
        self.encode_pixels(torch.zeros(1, 3, size, size))

    @torch.inference_mode()
    def encode_texts(self, texts: list[str]) -> np.ndarray:
        if self.text_runtime != "torch":
            try:
                return self.onnx.encode_texts(list(texts), int8=self.text_runtime == "onnx-int8")
            except (OnnxUnavailable, ImportError) as exc:
                self._fallback("text", exc)
        return self.model.encode_texts(list(texts)).float().cpu().numpy()

    @torch.inference_mode()
    def encode_pixels(self, pixels: torch.Tensor | np.ndarray) -> np.ndarray:
        pixels = torch.as_tensor(pixels)  # the indexing pipeline batches NumPy arrays
        if self.image_runtime != "torch":
            try:
                return self.onnx.encode_pixels(pixels.numpy(),
                                               int8=self.image_runtime == "onnx-int8")
            except (OnnxUnavailable, ImportError) as exc:
                self._fallback("image", exc)
        return self.model.encode_images(pixels.to(self.device)).float().cpu().numpy()

    @torch.inference_mode()
    def explain_map(self, pixels, query: np.ndarray) -> np.ndarray:
        """[h, w]: the query embedding's cosine with each spatial cell of the image tower
        (pixels: one preprocessed image [3, S, S]); encoder.errors.NoSpatialMap when the model
        has no spatial map."""
        from encoder.scoring import cell_map

        x = torch.as_tensor(np.asarray(pixels, np.float32))[None]
        if self.image_runtime != "torch" and not self._cells_eager:
            try:
                return cell_map(self.onnx.cell_embeddings(x.numpy())[0], query)
            except (OnnxUnavailable, ImportError) as exc:
                log.warning("cells graph: %s; explaining with eager PyTorch", exc)
                self._cells_eager = True
        cells = self.model.cell_embeddings(x.to(self.device)).float().cpu().numpy()[0]
        return cell_map(cells, query)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """The eval transform. An RGB image already at the input size (Flickr8k copies are)
        needs no resize: it is normalised in numpy, the same values (to 1e-6) at a quarter of
        the cost of torchvision's chain, and without torch ops in the loader threads."""
        spec = self.model.image_spec
        if image.mode == "RGB" and image.size == (spec.input_size, spec.input_size):
            return torch.from_numpy(self.normalize(image))  # not resized: x * scale + offset
        return self.transform(image)

    def encode_images(self, images: list[Image.Image]) -> np.ndarray:
        if not images:
            return np.zeros((0, self.dim), np.float32)
        return self.encode_pixels(torch.stack([self.preprocess(im) for im in images]))
