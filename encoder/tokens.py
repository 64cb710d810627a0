"""Text -> token ids without torch or transformers: a model's tokenizer as a `tokenizers` file
(tokenizer.json) plus the few settings the model's own `tokenize` applies around it.

    TokenizerConfig.max_length   truncate to this many ids (special tokens included)
    TokenizerConfig.pad_to       pad every text to this length (open_clip: its context length);
                                 None: pad to the longest text of the batch (our models)
    TokenizerConfig.pad_id       the padding id
    TokenizerConfig.mask         "tokenizer": the tokenizer's attention mask (our models);
                                 "nonzero": ids != 0, as the open_clip adapter masks
    TokenizerConfig.clean        open_clip's text cleaning before tokenizing ("lower",
                                 "whitespace"), None for none

`encoder.bundle` writes both and checks, when it writes them, that they give exactly the ids and
masks of the model's `tokenize` on a set of probe texts.
"""
from __future__ import annotations

import html
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

CLEANERS = ("lower", "whitespace")
ONE_BY_ONE_MAX = 64  # texts up to this many are tokenized one at a time (TextTokenizer.tokenize)


def _basic_clean(text: str) -> str:
    import ftfy

    return html.unescape(html.unescape(ftfy.fix_text(text))).strip()


def clean_text(text: str, how: str | None) -> str:
    """open_clip's text cleaning (its tokenizer's `clean`), the same steps in the same order."""
    if how is None:
        return text
    if how not in CLEANERS:
        raise ValueError(f"unknown text cleaning {how!r}; known: {CLEANERS}")
    text = " ".join(_basic_clean(text).split()).strip()
    return text.lower() if how == "lower" else text


@dataclass(frozen=True)
class TokenizerConfig:
    max_length: int
    pad_to: int | None
    pad_id: int
    pad_token: str
    mask: str = "tokenizer"  # or "nonzero"
    clean: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TokenizerConfig":
        return cls(**d)


class TextTokenizer:
    """`tokenize(texts)` -> {"input_ids", "attention_mask"} int64 arrays, as the model's own."""

    def __init__(self, tokenizer_file: str | Path, config: TokenizerConfig):
        from tokenizers import Tokenizer

        self.config = config
        tok = Tokenizer.from_file(str(tokenizer_file))
        tok.no_truncation()
        tok.no_padding()
        tok.enable_truncation(max_length=config.max_length)
        tok.enable_padding(pad_id=config.pad_id, pad_token=config.pad_token,
                           length=config.pad_to)
        self.tokenizer = tok

    def tokenize(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        clean = self.config.clean
        texts = [clean_text(t, clean) for t in texts]
        if len(texts) <= ONE_BY_ONE_MAX:
            # holding the GIL: encode_batch lets it go and then waits to take it back, up to
            # the interpreter's switch interval (5 ms) while another thread runs Python (the
            # service's event loop), for ~10 us of work a text
            encoded = [self.tokenizer.encode(t) for t in texts]
        else:
            encoded = self.tokenizer.encode_batch(texts)
        # padded to the longest, as encode_batch pads (one at a time, each is its own length)
        width = max((len(e.ids) for e in encoded), default=0)
        ids = np.full((len(encoded), width), self.config.pad_id, np.int64)
        mask = np.zeros((len(encoded), width), np.int64)
        for row, e in enumerate(encoded):
            ids[row, :len(e.ids)] = e.ids
            mask[row, :len(e.ids)] = e.attention_mask
        if self.config.mask == "nonzero":
            mask = (ids != 0).astype(np.int64)
        return {"input_ids": ids, "attention_mask": mask}
