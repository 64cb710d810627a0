"""Where Flickr8k comes from: a folder in the original layout, the original zips, or their URLs."""
from __future__ import annotations

import logging
import os
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable

from tqdm import tqdm

from core.hashing import sha256_file
from core.settings import get_settings
from encoder.image_formats import IMAGE_SUFFIXES, is_image_key
from flickr8k.format import (
    IMAGE_DIRS,
    IMAGE_LIST_FILE,
    SPLIT_FILES,
    TOKEN_FILE,
    TOKEN_SUFFIX,
    SourceError,
    SourceNotFound,
    parse_captions,
    parse_split,
)

log = logging.getLogger(__name__)

# A public copy of the original distribution (Flickr8k_text.zip lies beside it): one value a
# user can give FLICKR8K_SOURCE.
PUBLIC_IMAGES_URL = "https://github.com/jbrownlee/Datasets/releases/download/Flickr8k/Flickr8k_Dataset.zip"


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
            error = SourceNotFound if exc.code in (404, 410) else SourceError
            raise error(f"download of {url} failed: HTTP {exc.code}") from None
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
    # not core.atomic: the `.part` file outlives a failed run on purpose, so the next one resumes
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
        """A Flickr8k split's image names, or "listed": the names in `images.txt`."""
        if split == "listed":
            return parse_split(self.read_text(IMAGE_LIST_FILE))
        if split not in SPLIT_FILES:
            raise SourceError(f"unknown split {split!r}; known: {sorted(SPLIT_FILES)} or 'all'")
        return parse_split(self.read_text(SPLIT_FILES[split]))

    def token_file(self) -> str:
        """Flickr8k's caption file, else the folder's one `<name>.token.txt`."""
        if TOKEN_FILE in self.texts:
            return TOKEN_FILE
        found = sorted(n for n in self.texts if n.endswith(TOKEN_SUFFIX))
        if len(found) != 1:
            raise SourceError(f"expected {TOKEN_FILE} or one *{TOKEN_SUFFIX} caption file, "
                              f"found {found or 'none'}")
        return found[0]

    def captions(self) -> dict[str, list[str]]:
        return parse_captions(self.read_text(self.token_file()))


def _folder_source(root: Path) -> Flickr8kSource:
    image_dir = next((root / d for d in IMAGE_DIRS if (root / d).is_dir()), None)
    if image_dir is None:
        raise SourceError(f"{root}: no image folder ({' or '.join(IMAGE_DIRS)}) found")
    images = {p.name: p.read_bytes for p in image_dir.iterdir() if is_image_key(p.name)}
    texts = {}
    for d in (root, root / "Flickr8k_text"):
        if d.is_dir():
            texts.update({p.name: p.read_bytes for p in d.glob("*.txt")})
    return Flickr8kSource(images, texts)


class _ZipReader:
    """Reads members of one zip file through a handle of this process's own: a ZipFile shares
    its file offset, so DataLoader workers forked from one process would read each other's
    bytes (BadZipFile, bad CRC) through the parent's handle."""

    def __init__(self, path: Path):
        self.path = path
        self._pid, self._zip = os.getpid(), zipfile.ZipFile(path)

    def read(self, member: str) -> bytes:
        if self._pid != os.getpid():
            self._pid, self._zip = os.getpid(), zipfile.ZipFile(self.path)
        return self._zip.read(member)


def _zip_members(path: Path, suffixes: tuple[str, ...]) -> dict[str, Callable[[], bytes]]:
    try:
        z = _ZipReader(path)
    except zipfile.BadZipFile:
        raise SourceError(f"{path} is not a valid zip archive") from None
    out = {}
    for info in z._zip.infolist():
        name = PurePosixPath(info.filename).name
        if info.is_dir() or name.startswith(".") or "__MACOSX" in info.filename:
            continue
        if name.lower().endswith(suffixes):
            out[name] = lambda n=info.filename: z.read(n)
    return out


def _zip_problem(path: Path) -> str | None:
    """None when every member's CRC checks out, else what is wrong."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        return f"not a readable zip archive ({exc})"
    return f"member {bad} is corrupt (CRC mismatch)" if bad else None


def _not_found(location: str, variable: str) -> SourceNotFound:
    return SourceNotFound(
        f"Flickr8k source not found: {location}. Set {variable} (or pass the location) to a "
        f"Flickr8k folder, a Flickr8k_Dataset.zip path or its URL, e.g. {PUBLIC_IMAGES_URL}")


def resolve(source: str, text_source: str | None = None, *,
            cache_dir: str | os.PathLike | None = None,
            images_sha256: str | None = None, text_sha256: str | None = None,
            images_size: int | None = None, text_size: int | None = None) -> dict:
    """A source location made local and checked; every entry point goes through here.

    A folder -> {"kind": "folder", "folder"}. A Flickr8k_Dataset.zip path or URL (with
    Flickr8k_text.zip beside it unless `text_source` says where) -> {"kind": "zip",
    "<role>_zip", "<role>_sha256", "<role>_bytes"} for images and text: URLs are downloaded into
    `cache_dir` (default FLICKR8K_WORK_DIR; a partial `.part` is resumed), and both archives are
    checked: size and sha256 when given, every member's CRC always. A download that fails a check
    is deleted so that a retry fetches it afresh; a local archive of the user's is only reported.
    A location that does not exist raises SourceNotFound, which no retry can fix."""
    if "://" not in source:
        if Path(source).is_dir():
            return {"kind": "folder", "folder": str(Path(source).resolve())}
        if not Path(source).is_file():
            raise _not_found(source, "FLICKR8K_SOURCE")
    if not text_source:
        text_source = source.replace("Flickr8k_Dataset.zip", "Flickr8k_text.zip")
        if text_source == source:
            raise SourceNotFound(f"{source}: set FLICKR8K_TEXT_SOURCE (or pass --text-source) "
                                 "to the Flickr8k_text.zip location")
    cache = Path(cache_dir if cache_dir is not None else get_settings().flickr8k_work_dir)
    names = {role: PurePosixPath(urllib.request.urlparse(loc).path).name or f"{role}.zip"
             for role, loc in (("images", source), ("text", text_source))}
    if names["images"] == names["text"]:  # e.g. two ".../download" links: keep both files
        names = {role: f"{role}-{name}" for role, name in names.items()}
    out: dict = {"kind": "zip"}
    for role, loc, sha, size, variable in (
            ("images", source, images_sha256, images_size, "FLICKR8K_SOURCE"),
            ("text", text_source, text_sha256, text_size, "FLICKR8K_TEXT_SOURCE")):
        sha = (sha or "").strip().lower() or None
        downloaded = "://" in loc
        if downloaded:
            t0 = time.perf_counter()
            try:
                path = download(loc, cache / names[role], expected_size=size, sha256=sha)
            except SourceNotFound as exc:
                raise SourceNotFound(f"{exc}: check {variable}") from None
            log.info("%s archive %s ready in %.1f s", role, path, time.perf_counter() - t0)
        else:
            path = Path(loc)
            if not path.is_file():
                raise _not_found(loc, variable)
        digest = sha256_file(path)
        if sha and digest != sha:
            problem = f"sha256 {digest} does not match the expected {sha}"
        elif size is not None and path.stat().st_size != size:
            problem = f"{path.stat().st_size} bytes, expected {size}"
        else:
            problem = _zip_problem(path)
        if problem:
            if downloaded:  # ours: remove it so that a retry fetches it again
                path.unlink(missing_ok=True)
            raise SourceError(f"{loc}: {problem}")
        out[f"{role}_zip"] = str(path.resolve())
        out[f"{role}_sha256"] = digest
        out[f"{role}_bytes"] = path.stat().st_size
    return out


def open_resolved(local: dict) -> Flickr8kSource:
    """Read what `resolve` returned (zip members are CRC-checked again on every read)."""
    if local["kind"] == "folder":
        return _folder_source(Path(local["folder"]))
    return Flickr8kSource(_zip_members(Path(local["images_zip"]), IMAGE_SUFFIXES),
                          _zip_members(Path(local["text_zip"]), (".txt",)))


def open_source(source: str, text_source: str | None = None,
                cache_dir: str | os.PathLike | None = None, **checks) -> Flickr8kSource:
    """A folder, a Flickr8k_Dataset.zip (path or URL, with Flickr8k_text.zip beside it), or both."""
    return open_resolved(resolve(source, text_source, cache_dir=cache_dir, **checks))
