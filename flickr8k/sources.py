"""Where Flickr8k comes from: a folder in the original layout, the original zips, or their URLs."""
from __future__ import annotations

import logging
import os
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable

from tqdm import tqdm

from core.hashing import sha256_file
from flickr8k.format import (
    IMAGE_DIRS,
    SPLIT_FILES,
    TOKEN_FILE,
    SourceError,
    parse_captions,
    parse_split,
)

log = logging.getLogger(__name__)

# The public copies of the original distribution.
DEFAULT_IMAGES_URL = "https://github.com/jbrownlee/Datasets/releases/download/Flickr8k/Flickr8k_Dataset.zip"
DEFAULT_TEXT_URL = "https://github.com/jbrownlee/Datasets/releases/download/Flickr8k/Flickr8k_text.zip"


def download(url: str, dest: Path, expected_size: int | None = None,
             sha256: str | None = None, chunk: int = 1 << 20) -> Path:
    """Resumable download to `dest` (via `dest.part`), checked by size/hash before use."""
    dest = Path(dest)
    if dest.exists() and _verified(dest, expected_size, sha256):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        resp = urllib.request.urlopen(req, timeout=60)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # already complete
            resp = None
        else:
            raise SourceError(f"download of {url} failed: HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise SourceError(f"download of {url} failed: {exc}") from None
    if resp is not None:
        with resp:
            if have and resp.status != 206:  # server ignored the range: restart cleanly
                have = 0
            total = resp.headers.get("Content-Length")
            total = int(total) + have if total else expected_size
            mode = "ab" if have else "wb"
            with open(part, mode) as f, tqdm(total=total, initial=have, unit="B", unit_scale=True,
                                            desc=f"download {dest.name}") as bar:
                while block := resp.read(chunk):
                    f.write(block)
                    bar.update(len(block))
            if total and part.stat().st_size != total:
                raise SourceError(f"download of {url} incomplete: {part.stat().st_size}/{total} "
                                  "bytes; run again to resume")
    if not _verified(part, expected_size, sha256):
        part.unlink(missing_ok=True)
        raise SourceError(f"download of {url} failed verification (size/hash); removed, retry")
    os.replace(part, dest)
    return dest


def _verified(path: Path, expected_size: int | None, sha256: str | None) -> bool:
    if expected_size is not None and path.stat().st_size != expected_size:
        return False
    if sha256 is not None and sha256_file(path) != sha256:
        return False
    if path.suffix == ".zip" or path.name.endswith(".zip.part"):
        try:
            with zipfile.ZipFile(path) as z:
                z.namelist()
        except zipfile.BadZipFile:
            return False
    return True


@dataclass
class Flickr8kSource:
    """Read-only view of a Flickr8k distribution: image names/bytes, captions, split lists."""

    images: dict[str, Callable[[], bytes]]  # image file name -> reader
    texts: dict[str, Callable[[], bytes]]  # text file name -> reader

    def image_names(self, split: str = "all") -> list[str]:
        names = sorted(self.images)
        if split == "all":
            return names
        wanted = set(self.split(split))
        return [n for n in names if n in wanted]

    def read_image(self, name: str) -> bytes:
        return self.images[name]()

    def read_text(self, name: str) -> str:
        if name not in self.texts:
            raise SourceError(f"text file {name} not found in the source")
        return self.texts[name]().decode("utf-8")

    def split(self, split: str) -> list[str]:
        if split not in SPLIT_FILES:
            raise SourceError(f"unknown split {split!r}; known: {sorted(SPLIT_FILES)} or 'all'")
        return parse_split(self.read_text(SPLIT_FILES[split]))

    def captions(self) -> dict[str, list[str]]:
        return parse_captions(self.read_text(TOKEN_FILE))


def _folder_source(root: Path) -> Flickr8kSource:
    image_dir = next((root / d for d in IMAGE_DIRS if (root / d).is_dir()), None)
    if image_dir is None:
        raise SourceError(f"{root}: no image folder ({' or '.join(IMAGE_DIRS)}) found")
    images = {p.name: p.read_bytes for p in image_dir.iterdir()
              if p.suffix.lower() in (".jpg", ".jpeg", ".png")}
    texts = {}
    for d in (root, root / "Flickr8k_text"):
        if d.is_dir():
            texts.update({p.name: p.read_bytes for p in d.glob("*.txt")})
    return Flickr8kSource(images, texts)


def _zip_members(path: Path, suffixes: tuple[str, ...]) -> dict[str, Callable[[], bytes]]:
    try:
        z = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise SourceError(f"{path} is not a valid zip archive") from None
    out = {}
    for info in z.infolist():
        name = PurePosixPath(info.filename).name
        if info.is_dir() or name.startswith(".") or "__MACOSX" in info.filename:
            continue
        if name.lower().endswith(suffixes):
            out[name] = lambda n=info.filename: z.read(n)
    return out


def open_source(source: str, text_source: str | None = None,
                cache_dir: str | os.PathLike = "data/downloads") -> Flickr8kSource:
    """A folder, a Flickr8k_Dataset.zip (path or URL, with Flickr8k_text.zip beside it), or both."""
    if "://" not in source and Path(source).is_dir():
        return _folder_source(Path(source))
    if text_source is None:
        text_source = source.replace("Flickr8k_Dataset.zip", "Flickr8k_text.zip")
        if text_source == source:
            raise SourceError(f"{source}: give the Flickr8k_text.zip location too (--text-source)")
    images_zip = _local(source, Path(cache_dir))
    text_zip = _local(text_source, Path(cache_dir))
    return Flickr8kSource(_zip_members(images_zip, (".jpg", ".jpeg", ".png")),
                          _zip_members(text_zip, (".txt",)))


def _local(location: str, cache_dir: Path) -> Path:
    if "://" in location:
        name = PurePosixPath(urllib.request.urlparse(location).path).name or "download.zip"
        return download(location, cache_dir / name)
    path = Path(location)
    if not path.is_file():
        raise SourceError(f"source not found: {location}")
    return path
