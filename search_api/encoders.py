"""The model's two towers behind micro-batchers: concurrent queries share one forward pass
(search_api.batching), and the model is never called from several threads at once.

The encoder is the serving bundle's torch-free `encoder.serving.ServingEncoder` (what the
service builds by default) or the eager `encoder.inference.Encoder`: both give `model_id`, `dim`,
`scoring`, `encode_texts`, `encode_images` and `explain_map` (one worker thread too)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from encoder.match_scale import MatchScale
from search_api.batching import Batcher

if TYPE_CHECKING:
    from encoder.inference import Encoder
    from encoder.serving import ServingEncoder

IMAGE_BATCH_MAX = 16
# queued texts from which a batch takes half (search_api.batching): 16 clients over HTTP, 2
# cores, 738-769 -> ~870-1000 req/s (BENCHMARKS §1)
TEXT_SPLIT_FROM = 8


class QueryEncoders:
    def __init__(self, encoder: ServingEncoder | Encoder, text_batch_max: int = 64,
                 observe: Callable[[str, float], None] | None = None):
        observe = observe or (lambda stage, seconds: None)
        self.encoder = encoder
        self.model_id = encoder.model_id
        self.dim = encoder.dim
        self.scoring = encoder.scoring
        # what a score means to a person (None: the card holds no calibration)
        self.match_scale = MatchScale.from_card(encoder.card)
        self.texts = Batcher(encoder.encode_texts, "text", max_batch=text_batch_max,
                             observe=lambda s, n: observe("text_encode", s),
                             split_from=TEXT_SPLIT_FROM)
        self.images = Batcher(encoder.encode_images, "image", max_batch=IMAGE_BATCH_MAX,
                              observe=lambda s, n: observe("image_encode", s))
        self.image_spec = encoder.image_spec
        self.maps = Batcher(lambda jobs: [encoder.explain_map(p, q) for p, q in jobs],
                            "explain", max_batch=1, observe=lambda s, n: observe("explain_map", s))

    async def encode_texts(self, texts: list[str]):
        """[N, dim] float32 embeddings."""
        return await self.texts(texts)

    async def encode_images(self, images: list):
        return await self.images(images)

    async def explain_map(self, pixels, query):
        """[h, w]: the query embedding's cosine with each spatial cell of the photo (pixels:
        one preprocessed image); encoder.errors.NoSpatialMap for a model without cells."""
        return (await self.maps([(pixels, query)]))[0]

    def close(self) -> None:
        """Stop the worker threads (they restart on the next use)."""
        self.texts.close()
        self.images.close()
        self.maps.close()
