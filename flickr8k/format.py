"""The Flickr8k distribution's format: file names, caption lines, split lists.

Any Flickr8k-style folder (a token file of `IMAGE#N<TAB>caption` lines and image lists) reads
the same way, so ingest and training share these parsers.
"""
from __future__ import annotations

from collections import defaultdict

TOKEN_FILE = "Flickr8k.token.txt"
# any other Flickr8k-style folder: one `<name>.token.txt` and the list of its images
TOKEN_SUFFIX = ".token.txt"
IMAGE_LIST_FILE = "images.txt"
SPLIT_FILES = {"train": "Flickr_8k.trainImages.txt", "dev": "Flickr_8k.devImages.txt",
               "test": "Flickr_8k.testImages.txt"}
IMAGE_DIRS = ("Images", "Flicker8k_Dataset", "Flickr8k_Dataset")


class SourceError(RuntimeError):
    pass


class SourceNotFound(SourceError):
    """The configured location does not exist: a retry cannot help."""


def parse_captions(text: str) -> dict[str, list[str]]:
    """`IMAGE.jpg#N<TAB>caption` lines -> {image: [captions in N order]}."""
    caps: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            ref, caption = line.split("\t", 1)
            name, n = ref.rsplit("#", 1)
            caps[name].append((int(n), caption.strip()))
        except ValueError:
            raise SourceError(f"{TOKEN_FILE} line {lineno} is malformed: {line[:80]!r}") from None
    return {k: [c for _, c in sorted(v)] for k, v in caps.items()}


def parse_split(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]
