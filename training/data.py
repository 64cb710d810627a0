"""Flickr8k datasets: from a local folder in the original layout, or streamed from MinIO/S3."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import Dataset

from encoder.preprocessing import decode_image
from flickr8k.format import IMAGE_LIST_FILE, SPLIT_FILES, TOKEN_FILE, parse_captions, parse_split
from flickr8k.sources import open_source
from objectstore import ObjectStore


@dataclass
class Flickr8kSplit:
    """Names of one split's images, their five captions, and a reader for image bytes."""

    name: str
    images: list[str]
    captions: list[list[str]]  # aligned with images
    read: Callable[[str], bytes]

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, n: int) -> "Flickr8kSplit":
        return Flickr8kSplit(self.name, self.images[:n], self.captions[:n], self.read)

    def flat_captions(self) -> tuple[list[str], list[int]]:
        """All captions and, for each, the index of its image."""
        texts, owner = [], []
        for i, caps in enumerate(self.captions):
            texts += caps
            owner += [i] * len(caps)
        return texts, owner

    def fingerprint(self) -> str:
        """Identifies the split's content (names + captions) for feature caches."""
        h = hashlib.sha256(self.name.encode())
        for img, caps in zip(self.images, self.captions):
            h.update(img.encode())
            h.update("\x1f".join(caps).encode())
        return h.hexdigest()[:16]


def _build(name: str, split_names: list[str], captions: dict[str, list[str]],
           available: set[str], read) -> Flickr8kSplit:
    images = [n for n in split_names if n in available and n in captions]
    return Flickr8kSplit(name, images, [captions[n] for n in images], read)


def load_split_from_folder(root: str, split: str) -> Flickr8kSplit:
    """A folder (or zips) in the original Flickr8k layout."""
    src = open_source(root)
    return _build(split, src.split(split), src.captions(), set(src.images), src.read_image)


def load_set_from_folder(root: str) -> Flickr8kSplit:
    """Any Flickr8k-style folder (captions in a `*.token.txt`, images listed in `images.txt`,
    else every captioned image), named after the folder: an evaluation set such as
    coco-ood-dev."""
    src = open_source(root)
    listed = IMAGE_LIST_FILE in src.texts
    names = src.split("listed") if listed else sorted(src.images)
    return _build(Path(root).resolve().name, names, src.captions(), set(src.images),
                  src.read_image)


def load_split_from_store(store: ObjectStore, split: str, images_prefix: str = "flickr8k/images/",
                          text_prefix: str = "flickr8k/text/") -> Flickr8kSplit:
    """Captions and split lists from `<text_prefix>`; images fetched lazily from `<images_prefix>`."""
    captions = parse_captions(store.get(text_prefix + TOKEN_FILE).decode())
    names = parse_split(store.get(text_prefix + SPLIT_FILES[split]).decode())
    available = {o.key[len(images_prefix):] for o in store.list(images_prefix)}
    return _build(split, names, captions, available,
                  lambda n: store.get(images_prefix + n))


class ImageDataset(Dataset):
    """Preprocessed image tensors of a split (index i -> tensor)."""

    def __init__(self, split: Flickr8kSplit, transform):
        self.split, self.transform = split, transform

    def __len__(self):
        return len(self.split)

    def __getitem__(self, i):
        return self.transform(decode_image(self.split.read(self.split.images[i]))), i


class MinIOFlickr8kDataset(ImageDataset):
    """Streams Flickr8k images from MinIO/S3 (no local copy); yields (tensor, image index)."""

    def __init__(self, store: ObjectStore, split: str, transform,
                 images_prefix: str = "flickr8k/images/", text_prefix: str = "flickr8k/text/"):
        super().__init__(load_split_from_store(store, split, images_prefix, text_prefix), transform)


def collate_indexed(batch):
    return torch.stack([b[0] for b in batch]), torch.tensor([b[1] for b in batch])
