"""Helpers shared by the search API tests: build an indexed service, serve it on loopback,
republish index versions, and make odd images."""
from __future__ import annotations

import contextlib
import io
import struct
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from indexer import pipeline
from indexer.repository import IndexRepository
from indexer.index_policy import new_flat_index
from indexer.ingest import ingest
from flickr8k.sources import open_source
from objectstore import LocalStore
from core.settings import Settings
from deploy.ports import free_port
from search_api.main import create_app
from search_api.state import ServiceState

PREFIX = "flickr8k/images/"


@dataclass
class Service:
    app: object
    state: ServiceState
    settings: Settings
    repo: IndexRepository
    store: object
    root: Path


def build_service(tmp: Path, flickr_root: Path, encoder, split: str = "dev", store=None,
                  publish: bool = True, **settings_kw) -> Service:
    """Ingest the tiny dataset into a store, build and publish an index (unless `publish` is
    False: an empty index directory), make the app. The one way tests build a service."""
    store = store or LocalStore(tmp / "store", "b")
    ingest(open_source(str(flickr_root)), store, split=split, progress=False)
    repo = IndexRepository(tmp / "index")
    if publish:
        pipeline.rebuild(store, encoder, repo, PREFIX, progress=False)
    settings = Settings(index_dir=str(tmp / "index"), **{"reload_interval_s": 0, **settings_kw})
    state = ServiceState(encoder, repo, store)
    state.reload()
    return Service(create_app(settings, state), state, settings, repo, store, tmp)


def republish(repo: IndexRepository, keep: slice | list[int] | None = None,
              model_id: str | None = None, base: str | None = None) -> tuple[str, set[str]]:
    """Publish a new version made of some rows of version `base` (default: the current one),
    without re-embedding anything. Returns (version, its keys)."""
    cur = repo.load(base)
    rows = list(range(cur.count))
    if isinstance(keep, slice):
        rows = rows[keep]
    elif keep is not None:
        rows = list(keep)
    vecs = np.stack([cur.index.reconstruct(int(cur.ids[i])) for i in rows]).astype(np.float32)
    index = new_flat_index(cur.index.d)
    ids = cur.ids[rows]
    index.add_with_ids(vecs, ids)
    keys = [cur.keys[i] for i in rows]
    version = repo.publish(index, ids, keys, [cur.etags[i] for i in rows],
                           model_id or cur.model_id)
    return version, set(keys)


@contextlib.contextmanager
def serve(app, port: int | None = None):
    """Run the app under a real uvicorn server in a thread; yields the base URL."""
    import uvicorn

    port = port or free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                            lifespan="on", timeout_keep_alive=30)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)


# --- images ---------------------------------------------------------------------------------
def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def png_with_alpha(size: int = 64) -> bytes:
    im = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    for x in range(size // 4, 3 * size // 4):
        for y in range(size // 4, 3 * size // 4):
            im.putpixel((x, y), (220, 30, 30, 255))
    return encode(im, "PNG")


def cmyk_jpeg(size: int = 64) -> bytes:
    return encode(Image.new("CMYK", (size, size), (0, 200, 200, 20)), "JPEG", quality=90)


def _blank_png(width: int, height: int, bit_depth: int, color_type: int, row_bytes: int) -> bytes:
    """A complete PNG of all-zero rows, compressed a block of rows at a time (tiny on disk)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + tag + data
                + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))

    row = b"\x00" * (1 + row_bytes)  # filter byte + pixels
    comp = zlib.compressobj(9)
    parts = [comp.compress(row * 100) for _ in range(height // 100)]
    parts += [comp.compress(row * (height % 100)), comp.flush()]
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts))
            + chunk(b"IEND", b""))


def png_bomb(width: int = 20_000, height: int = 20_000) -> bytes:
    """A real, complete 1-bit PNG of width x height (400 Mpx): ~50 kB on disk, gigabytes when
    decoded to RGB."""
    return _blank_png(width, height, 1, 0, (width + 7) // 8)


def transparent_png(w: int = 6300, h: int = 6300) -> bytes:
    """~150 kB: a fully transparent RGBA PNG of w x h (within the pixel limit)."""
    return _blank_png(w, h, 8, 6, w * 4)


def huge_canvas_gif(w: int = 6300, h: int = 6300) -> bytes:
    """43 bytes declaring a w x h canvas (a 1-pixel frame, transparent background)."""
    return (b"GIF89a" + struct.pack("<HH", w, h) + b"\x80\x00\x00" + b"\x00\x00\x00\xff\xff\xff"
            + b"\x21\xf9\x04\x01\x00\x00\x00\x00" + b"\x2c" + struct.pack("<HHHH", 0, 0, 1, 1)
            + b"\x00\x02\x02\x44\x01\x00\x3b")


def rss_mb(pid: int) -> float:
    """Resident memory of a process in MB (from /proc; NaN once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def jpeg_with_header_size(data: bytes, width: int, height: int) -> bytes:
    """Patch the frame header (SOF0/SOF2) of a JPEG to claim another size."""
    b = bytearray(data)
    i = 2
    while i < len(b):
        marker = b[i + 1]
        length = struct.unpack(">H", b[i + 2:i + 4])[0]
        if marker in (0xC0, 0xC2):
            b[i + 5:i + 9] = struct.pack(">HH", height, width)
            return bytes(b)
        i += 2 + length
    raise ValueError("no SOF marker")
