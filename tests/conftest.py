"""Shared fixtures: a tiny Flickr8k-layout dataset made here, a real S3 server, a small model."""
from __future__ import annotations

import io
import random
import signal
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from deploy.foreground import STOP_SIGNALS
from deploy.ports import free_port

COLORS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220),
          "yellow": (240, 220, 30), "black": (10, 10, 10), "white": (245, 245, 245)}
SHAPES = ["circle", "square"]


def _interrupt(signum, frame):
    for stop_signal in STOP_SIGNALS:  # a second one must not cut the teardown short
        signal.signal(stop_signal, signal.SIG_IGN)
    raise KeyboardInterrupt(f"stopped by {signal.Signals(signum).name}")


def pytest_sessionstart(session):
    # SIGTERM (a CI runner cancelling, `kill`) and SIGHUP end Python at once, skipping fixture
    # teardown, and the servers fixtures started in sessions of their own would keep running:
    # as Ctrl-C instead, pytest stops the run and tears its fixtures down
    for stop_signal in STOP_SIGNALS:
        signal.signal(stop_signal, _interrupt)


def make_image(color: str, shape: str, seed: int, size: int = 96) -> bytes:
    rnd = random.Random(seed)
    bg = tuple(rnd.randint(90, 160) for _ in range(3))
    im = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(im)
    m = rnd.randint(8, 20)
    box = (m, m, size - m, size - m)
    (d.ellipse if shape == "circle" else d.rectangle)(box, fill=COLORS[color])
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_tiny_flickr8k(root: Path, per_combo: int = 2) -> dict:
    """Flickr8k layout: Images/*.jpg, Flickr8k.token.txt, train/dev split files."""
    (root / "Images").mkdir(parents=True, exist_ok=True)
    lines, names = [], []
    n = 0
    for color in COLORS:
        for shape in SHAPES:
            for k in range(per_combo):
                name = f"{1000 + n}_{color}_{shape}.jpg"
                (root / "Images" / name).write_bytes(make_image(color, shape, n))
                caps = [f"a {color} {shape}", f"a {shape} that is {color}",
                        f"the {color} {shape} in the middle", f"{color} colored {shape}",
                        f"a picture of a {color} {shape}"]
                lines += [f"{name}#{i}\t{c}" for i, c in enumerate(caps)]
                names.append(name)
                n += 1
    (root / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")
    dev = names[::4]
    train = [x for x in names if x not in dev]
    (root / "Flickr_8k.trainImages.txt").write_text("\n".join(train) + "\n")
    (root / "Flickr_8k.devImages.txt").write_text("\n".join(dev) + "\n")
    return {"names": names, "train": train, "dev": dev}


def zip_flickr8k(root: Path, out_dir: Path) -> tuple[Path, Path]:
    """The original distribution: Flickr8k_Dataset.zip (Flicker8k_Dataset/*.jpg) + Flickr8k_text.zip."""
    import zipfile

    out_dir.mkdir(parents=True, exist_ok=True)
    images = out_dir / "Flickr8k_Dataset.zip"
    with zipfile.ZipFile(images, "w") as z:
        for p in sorted((root / "Images").iterdir()):
            z.write(p, f"Flicker8k_Dataset/{p.name}")
        z.writestr("__MACOSX/Flicker8k_Dataset/._junk", b"junk")
    text = out_dir / "Flickr8k_text.zip"
    with zipfile.ZipFile(text, "w") as z:
        for p in sorted(root.glob("*.txt")):
            z.write(p, p.name)
    return images, text


@pytest.fixture(scope="session")
def tiny_flickr(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("flickr8k")
    return root, write_tiny_flickr8k(root)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    from deploy import local_s3

    port = free_port()
    creds = {"endpoint": f"127.0.0.1:{port}", "access_key": "test-access", "secret_key": "test-secret-123"}
    proc = local_s3.start(tmp_path_factory.mktemp("s3"), port, creds["access_key"], creds["secret_key"])
    yield {**creds, "pid": proc.pid}
    local_s3.stop(proc)


@pytest.fixture
def s3_store(s3_server, request):
    import re
    import uuid

    from objectstore import S3Store

    name = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower())[:30].strip("-")
    bucket = f"t-{name}-{uuid.uuid4().hex[:8]}"
    return S3Store(s3_server["endpoint"], s3_server["access_key"], s3_server["secret_key"], bucket)


def torch_blocked(module: str) -> str:
    """Code for `python -c CODE ARGS`: a finder installed before anything is imported makes torch
    and torchvision unimportable and writes each attempt to $TORCH_ATTEMPTS; then `python -m
    MODULE ARGS` runs (or, for ARGS `--code SRC`, the code SRC)."""
    return f"""
import os, sys
class TorchBlocker:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("torch", "torchvision"):
            with open(os.environ["TORCH_ATTEMPTS"], "a") as f:
                f.write(name + "\\n")
            raise ImportError(f"{{name}} is blocked in this process")
sys.meta_path.insert(0, TorchBlocker())
if sys.argv[1:2] == ["--code"]:
    exec(sys.argv[2])
else:
    sys.argv = [{module!r}, *sys.argv[1:]]
    import runpy
    runpy.run_module({module!r}, run_name="__main__", alter_sys=True)
"""


def save_banked_checkpoint(path: Path, embed_dim: int, bank_size: int, seed: int) -> Path:
    """A dual encoder with a query bank (hubness-corrected scores), heads untrained."""
    import torch
    import torch.nn.functional as F

    from encoder import DualEncoder, ModelConfig, save_checkpoint

    torch.manual_seed(seed)
    model = DualEncoder(ModelConfig(embed_dim=embed_dim)).eval()
    model.set_query_bank(F.normalize(torch.randn(bank_size, embed_dim), dim=-1))
    save_checkpoint(model, path)
    return path


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory) -> Path:
    """Real pretrained towers with freshly initialised heads (no training): fast to make."""
    import torch

    from encoder import DualEncoder, ModelConfig, save_checkpoint

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "small.pt"
    save_checkpoint(DualEncoder(ModelConfig(embed_dim=64)), path, {"name": "untrained test model"})
    return path


@pytest.fixture(scope="session")
def encoder(small_checkpoint):
    from encoder import Encoder

    return Encoder.from_checkpoint(str(small_checkpoint))


@pytest.fixture(scope="session")
def milvus_server(tmp_path_factory):
    """A real Milvus standalone (PyPI `milvus` wheel) on loopback ports, one per test session
    (~10 s to start); tests isolate themselves by collection prefix. Tests that stop it start it
    again before they end."""
    from deploy.local_milvus import LocalMilvus

    server = LocalMilvus(tmp_path_factory.mktemp("milvus")).start()
    yield server
    server.stop()


@pytest.fixture
def milvus_prefix(request) -> str:
    """A collection prefix of this test's own (Milvus names: letters, digits, underscores)."""
    import re
    import uuid

    name = re.sub(r"[^a-z0-9]+", "_", request.node.name.lower())[:24].strip("_")
    return f"t_{name}_{uuid.uuid4().hex[:6]}"
