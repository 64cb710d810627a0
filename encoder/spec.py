"""What a `MODEL_PATH` value names, decided without torch (the service checks it before paying
for the torch import). The one place that answers "an open_clip spec or a checkpoint file, and
which file format":

    open_clip:<architecture>[:<pretrained tag or local weights file>]   -> OpenClipSpec
    open_clip:hf-hub:<org>/<repo>     (open_clip's Hugging Face hub form) -> OpenClipSpec
    open_clip:local-dir:<folder>      (open_clip_config.json + weights)  -> OpenClipSpec
    anything else: a checkpoint file (encoder/checkpoint.py)             -> CheckpointFile

`encoder.loading` builds the model a spec names; this module never imports torch.
"""
from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

OPEN_CLIP_PREFIX = "open_clip:"
HF_HUB = "hf-hub:"
LOCAL_DIR = "local-dir:"
# file formats of checkpoint files: lzma-compressed torch.save bytes (written since int8 deltas),
# and torch.save's zip archive (older files)
LZMA_MAGIC = b"\xfd7zXZ\x00"
WEIGHTS_SUFFIXES = (".bin", ".pt", ".pth", ".safetensors")


@dataclass(frozen=True)
class OpenClipSpec:
    architecture: str  # a built-in name, or open_clip's "hf-hub:org/repo" / "local-dir:folder"
    weights: str | None  # a pretrained tag, a local weights file, or None (random / from the repo)

    @classmethod
    def parse(cls, spec: str) -> "OpenClipSpec":
        if not (isinstance(spec, str) and spec.startswith(OPEN_CLIP_PREFIX)):
            raise ValueError(f"not an open_clip model spec: {spec!r}")
        rest = spec[len(OPEN_CLIP_PREFIX):]
        if rest.startswith((HF_HUB, LOCAL_DIR)):  # the repo or folder holds config and weights
            if not rest.partition(":")[2]:
                raise ValueError(f"{spec!r}: expected open_clip:{HF_HUB}<org>/<repo> or "
                                 f"open_clip:{LOCAL_DIR}<folder>")
            return cls(rest, None)
        arch, _, weights = rest.partition(":")  # a path may hold more colons
        if not arch:
            raise ValueError(f"{spec!r}: expected open_clip:<architecture>[:<tag or weights file>]")
        return cls(arch, weights or None)

    @property
    def name(self) -> str:
        """What the model id shows: the architecture, or the hub repo's / folder's name (a repo
        downloaded into a folder of the same name keeps its model id offline)."""
        if self.architecture.startswith(LOCAL_DIR):
            return Path(self.architecture[len(LOCAL_DIR):]).resolve().name
        return self.architecture.removeprefix(HF_HUB).rstrip("/").rsplit("/", 1)[-1]

    @property
    def weights_is_file(self) -> bool:
        """`weights` names a local file (else a pretrained tag, or nothing)."""
        w = self.weights
        return w is not None and (os.sep in w or "/" in w or w.endswith(WEIGHTS_SUFFIXES)
                                  or os.path.exists(w))

    def __str__(self) -> str:
        return OPEN_CLIP_PREFIX + self.architecture + (f":{self.weights}" if self.weights else "")


@dataclass(frozen=True)
class CheckpointFile:
    path: Path

    def detect_format(self) -> str:
        """"lzma" or "zip", from the file's first bytes (a zip: its directory); FileNotFoundError
        when there is no file, ValueError when it is neither."""
        if not self.path.is_file():
            raise FileNotFoundError(f"model checkpoint not found: {self.path}")
        with open(self.path, "rb") as f:
            if f.read(len(LZMA_MAGIC)) == LZMA_MAGIC:
                return "lzma"
        if zipfile.is_zipfile(self.path):
            return "zip"
        raise ValueError(f"{self.path} is not a readable checkpoint (neither lzma-compressed nor "
                         f"a torch.save archive)")

    @property
    def card_path(self) -> Path:
        """The model card written beside the checkpoint (`<name>.card.json`)."""
        return self.path.with_suffix(".card.json")

    def read_card_file(self) -> dict | None:
        """The card beside the checkpoint (torch-free), or None when there is none or it is
        unreadable. Whether it describes this file is for the caller to check (its model id;
        file times do not tell: a git checkout writes both in any order)."""
        try:
            card = json.loads(self.card_path.read_text())
        except (OSError, ValueError):
            return None
        return card if isinstance(card, dict) else None

    def __str__(self) -> str:
        return str(self.path)


ModelSpec = OpenClipSpec | CheckpointFile


def parse_model_spec(value: str | os.PathLike) -> ModelSpec:
    """A `MODEL_PATH` value as the spec it names (see the module doc). A malformed open_clip
    spec is a ValueError; a checkpoint file is not opened here (`detect_format` reads it)."""
    if isinstance(value, str) and value.startswith(OPEN_CLIP_PREFIX):
        return OpenClipSpec.parse(value)
    return CheckpointFile(Path(value))
