"""Flickr8k data for training and evaluation: a split from a local folder (or the original zips),
or from the object store the images were ingested into (`--from-store`), plus the command-line
options every training command shares to choose between them."""
from __future__ import annotations

import argparse
import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import Dataset

from core.settings import get_settings
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


class StoreImageReader:
    """Image bytes from `<prefix><name>` in an object store, safe in DataLoader workers: a
    process other than the one that opened the store opens its own, because a forked copy of a
    connection pool shares the parent's sockets, and two workers on one socket read each other's
    responses (another image's bytes under this image's name)."""

    def __init__(self, open_store: Callable[[], ObjectStore], prefix: str):
        self.open_store, self.prefix = open_store, prefix
        self._store, self._pid = open_store(), os.getpid()

    @property
    def store(self) -> ObjectStore:
        """This process's connection to the store."""
        if self._pid != os.getpid():
            self._store, self._pid = self.open_store(), os.getpid()
        return self._store

    def __call__(self, name: str) -> bytes:
        return self.store.get(self.prefix + name)

    def __getstate__(self) -> dict:  # a worker started by spawn opens its own store too
        return {"open_store": self.open_store, "prefix": self.prefix, "_store": None,
                "_pid": None}


def load_split_from_store(open_store: Callable[[], ObjectStore], split: str,
                          images_prefix: str = "flickr8k/images/",
                          text_prefix: str = "flickr8k/text/") -> Flickr8kSplit:
    """Captions and split lists from `<text_prefix>` (as ingest wrote them); images fetched on
    demand from `<images_prefix>`. `open_store()` connects to the store: called here, and again
    in each DataLoader worker that reads images."""
    read = StoreImageReader(open_store, images_prefix)
    store = read.store
    captions = parse_captions(store.get(text_prefix + TOKEN_FILE).decode())
    names = parse_split(store.get(text_prefix + SPLIT_FILES[split]).decode())
    available = {o.key[len(images_prefix):] for o in store.list(images_prefix)}
    return _build(split, names, captions, available, read)


def add_data_args(p: argparse.ArgumentParser) -> None:
    """Where the Flickr8k splits come from (the options of every training command)."""
    p.add_argument("--data", help="Flickr8k folder (or Flickr8k_Dataset.zip); default FLICKR8K_SOURCE")
    p.add_argument("--from-store", action="store_true",
                   help="read captions, split lists and images from the configured object store "
                        "(STORE_BACKEND, MINIO_*, IMAGES_PREFIX, TEXT_PREFIX), where ingest put "
                        "them")


def load_splits(names: list[str], folder: str | None = None,
                from_store: bool = False) -> tuple[list[Flickr8kSplit], str]:
    """The named splits and a description of where they came from (for the model card): the
    object store when `from_store`, else `folder` (default FLICKR8K_SOURCE)."""
    s = get_settings()
    if from_store:
        from objectstore import open_store

        connect = functools.partial(open_store, s)
        return [load_split_from_store(connect, n, s.images_prefix, s.text_prefix)
                for n in names], connect().describe()
    root = folder or s.flickr8k_source
    return [load_split_from_folder(root, n) for n in names], str(root)


class ImageDataset(Dataset):
    """Preprocessed image tensors of a split (index i -> tensor)."""

    def __init__(self, split: Flickr8kSplit, transform):
        self.split, self.transform = split, transform

    def __len__(self):
        return len(self.split)

    def __getitem__(self, i):
        return self.transform(decode_image(self.split.read(self.split.images[i]))), i


def collate_indexed(batch):
    return torch.stack([b[0] for b in batch]), torch.tensor([b[1] for b in batch])
