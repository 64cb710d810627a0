"""Query and image embedding at serving time, without torch: a serving bundle's ONNX graphs
(ONNX Runtime), its tokenizer (`tokenizers`), NumPy/Pillow preprocessing (encoder/pixels.py)
and NumPy scoring. `ServingEncoder` answers what the search service asks of an encoder
(`model_id`, `dim`, `scoring`, `encode_texts`, `encode_images`) with the same embeddings as
`encoder.inference.Encoder` on the ONNX runtimes.

Each tower's session is opened on first use: a process that only answers text queries never
loads the image tower (`warmup(image=True)` loads it up front).

`query_encoder(settings)` is what the service runs: this, from the bundle (written once where
torch is installed, `encoder.bundle.ensure_bundle`), on CPU with the ONNX runtimes; the eager
PyTorch `Encoder` when TEXT_RUNTIME / IMAGE_RUNTIME say "torch" or DEVICE is not the CPU.
`image_encoder(settings)` is what the indexer embeds photos with, by the same rule on the image
tower alone (IMAGE_RUNTIME and DEVICE).
"""
from __future__ import annotations

import logging
import threading
from typing import Sequence

import numpy as np

from core.memory import release_memory
from encoder.bundle import ServingBundle, ensure_bundle
from encoder.errors import NoSpatialMap
from encoder.onnx_sessions import new_session
from encoder.pixels import PixelNormalizer
from encoder.scoring import cell_map

log = logging.getLogger(__name__)


class ServingEncoder:
    def __init__(self, bundle: ServingBundle, text_int8: bool = False, image_int8: bool = False,
                 threads: int | None = None, card: dict | None = None):
        self.bundle = bundle
        # the model card as it is now (a card-only update, e.g. a new match scale, keeps the
        # bundle valid): what the service reads beyond the towers
        self.card = card or {}
        self.model_id = bundle.model_id
        self.dim = bundle.dim
        self.scoring = bundle.scoring()
        self.image_spec = bundle.image_spec
        self.tokenizer = bundle.tokenizer()
        self.normalize = PixelNormalizer(self.image_spec)
        self.threads = threads
        self.graphs = {"text": "text.int8" if text_int8 else "text",
                       "image": "image.int8" if image_int8 else "image",
                       "image.cells": "image.cells"}
        if image_int8 and bundle.graph("image.int8") is None:
            log.warning("no calibrated int8 image graph in the bundle %s; running the fp32 "
                        "graph", bundle.dir)
            self.graphs["image"] = "image"
        if bundle.graph(self.graphs["text"]) is None:
            raise FileNotFoundError(f"the serving bundle {bundle.dir} has no {self.graphs['text']}"
                                    f" graph")
        self._sessions: dict[str, object] = {}
        self._lock = threading.Lock()

    @property
    def loaded_towers(self) -> list[str]:
        return sorted(self._sessions)

    def session(self, tower: str):
        sess = self._sessions.get(tower)
        if sess is None:
            with self._lock:
                sess = self._sessions.get(tower)
                if sess is None:
                    sess = new_session(self.bundle.graph(self.graphs[tower]), self.threads)
                    # loading parses the graph and copies its weights: hand the parse's freed
                    # heap back to the OS (ViT-B-32's text tower: 440 -> 340 MB resident)
                    release_memory()
                    self._sessions[tower] = sess
        return sess

    def warmup(self, image: bool = False) -> None:
        """Open the text tower's session now (and the image tower's when `image`), so the first
        request does not pay for it."""
        self.encode_texts(["warm up"])
        if image:
            size = self.image_spec.input_size
            self.encode_pixels(np.zeros((1, 3, size, size), np.float32))

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        if not len(texts):
            return np.zeros((0, self.dim), np.float32)
        return self.session("text").run(None, self.tokenizer.tokenize(list(texts)))[0]

    def preprocess(self, image) -> np.ndarray:
        """A decoded RGB image -> [3, S, S] float32 pixels (the eval transform's)."""
        return self.normalize(image)

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        pixels = np.ascontiguousarray(pixels, dtype=np.float32)
        return self.session("image").run(None, {"pixels": pixels})[0]

    def encode_images(self, images: list) -> np.ndarray:
        if not images:
            return np.zeros((0, self.dim), np.float32)
        return self.encode_pixels(self.normalize.batch(images))

    def explain_map(self, pixels: np.ndarray, query: np.ndarray) -> np.ndarray:
        """[h, w]: the query embedding's cosine with each spatial cell of the image tower
        (pixels: one preprocessed image [3, S, S]). NoSpatialMap when the bundle has no cells
        graph (a family without a spatial map)."""
        if self.bundle.graph("image.cells") is None:
            raise NoSpatialMap()
        pixels = np.ascontiguousarray(np.asarray(pixels, np.float32)[None], dtype=np.float32)
        cells = self.session("image.cells").run(None, {"pixels": pixels})[0][0]
        return cell_map(cells, query)


def uses_bundle(settings, towers: Sequence[str] = ("text", "image")) -> bool:
    """Whether these settings run `towers` from the bundle (CPU, ONNX runtimes) or eager
    PyTorch."""
    runtimes = [getattr(settings, f"{tower}_runtime") for tower in towers]
    return settings.device == "cpu" and all(r.startswith("onnx") for r in runtimes)


def query_encoder(settings):
    """The encoder a serving process uses (see the module doc)."""
    return _encoder(settings, ("text", "image"))


def image_encoder(settings):
    """The encoder an indexing process embeds photos with: the bundle's image tower where
    IMAGE_RUNTIME is an ONNX one on the CPU (the bundle written once, in a child process, where
    torch is installed; without torch a missing bundle is an error naming `python -m encoder
    bundle`), else eager PyTorch (IMAGE_RUNTIME=torch, or DEVICE=cuda)."""
    return _encoder(settings, ("image",))


def _encoder(settings, towers: Sequence[str]):
    if not uses_bundle(settings, towers):
        from encoder.inference import Encoder

        return Encoder.from_settings(settings)
    bundle = ensure_bundle(settings.model_path, settings.onnx_cache_dir)
    return ServingEncoder(bundle, text_int8=settings.text_runtime == "onnx-int8",
                          image_int8=settings.image_runtime == "onnx-int8",
                          card=_card(settings.model_path, bundle.model_id))


def _card(model_path, model_id: str) -> dict:
    """The checkpoint's card as the file beside it holds it now (a card-only update, e.g. a new
    match scale, keeps the bundle valid), when it is this model's; {} for an open_clip spec."""
    from encoder.spec import CheckpointFile, parse_model_spec

    spec = parse_model_spec(str(model_path))
    card = spec.read_card_file() if isinstance(spec, CheckpointFile) else None
    return card if card and card.get("model_id") == model_id else {}
