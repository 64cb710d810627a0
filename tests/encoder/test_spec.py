"""MODEL_PATH values -> specs (encoder/spec.py): parsed in one torch-free module."""
import io
import lzma
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from encoder.spec import CheckpointFile, OpenClipSpec, parse_model_spec

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "models" / "flickr8k-dual-encoder.pt"


def test_importing_the_spec_module_and_the_preflight_does_not_import_torch():
    code = ("import sys\n"
            "from encoder.spec import parse_model_spec\n"
            "from search_api.__main__ import preflight\n"
            f"assert parse_model_spec({str(SHIPPED)!r}).detect_format() == 'lzma'\n"
            f"assert preflight({str(SHIPPED)!r}) is None\n"
            "assert preflight('open_clip:ViT-B-32:laion2b_s34b_b79k') is None\n"
            "print('torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("value, arch, weights", [
    ("open_clip:ViT-B-32", "ViT-B-32", None),
    ("open_clip:ViT-B-32:laion2b_s34b_b79k", "ViT-B-32", "laion2b_s34b_b79k"),
    ("open_clip:ViT-B-32:C:/models/w.bin", "ViT-B-32", "C:/models/w.bin"),  # colons in a path
    ("open_clip:hf-hub:org/repo", "hf-hub:org/repo", None),
    ("open_clip:local-dir:/models/tiny-clip", "local-dir:/models/tiny-clip", None),
])
def test_open_clip_specs(value, arch, weights):
    spec = parse_model_spec(value)
    assert spec == OpenClipSpec(arch, weights) and str(spec) == value


def test_open_clip_spec_names_and_weights_files():
    assert parse_model_spec("open_clip:hf-hub:org/tiny-clip/").name == "tiny-clip"
    assert parse_model_spec("open_clip:local-dir:/x/tiny-clip").name == "tiny-clip"
    assert parse_model_spec("open_clip:ViT-B-32:/w/open_clip_pytorch_model.bin").weights_is_file
    assert parse_model_spec("open_clip:ViT-B-32:w.safetensors").weights_is_file
    assert not parse_model_spec("open_clip:ViT-B-32:laion2b_s34b_b79k").weights_is_file
    assert not parse_model_spec("open_clip:ViT-B-32").weights_is_file


@pytest.mark.parametrize("value", ["open_clip:", "open_clip::tag", "open_clip:hf-hub:",
                                   "open_clip:local-dir:"])
def test_malformed_open_clip_specs_are_value_errors(value):
    with pytest.raises(ValueError, match="expected"):
        parse_model_spec(value)


def test_anything_else_is_a_checkpoint_file(tmp_path):
    assert parse_model_spec("models/m.pt") == CheckpointFile(Path("models/m.pt"))
    # a path object is a file even when its name looks like a spec
    assert isinstance(parse_model_spec(Path("open_clip:x")), CheckpointFile)


def test_checkpoint_formats(tmp_path):
    import torch

    assert CheckpointFile(SHIPPED).detect_format() == "lzma"
    old = tmp_path / "old.pt"
    torch.save({"format": "x"}, old)  # torch.save's zip archive: files written before lzma
    assert CheckpointFile(old).detect_format() == "zip"
    packed = tmp_path / "packed.pt"
    buf = io.BytesIO()
    torch.save({"format": "x"}, buf)
    packed.write_bytes(lzma.compress(buf.getvalue()))
    assert CheckpointFile(packed).detect_format() == "lzma"
    with pytest.raises(FileNotFoundError, match="model checkpoint not found"):
        CheckpointFile(tmp_path / "missing.pt").detect_format()
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a torch checkpoint" * 10)
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        CheckpointFile(garbage).detect_format()
    not_ours = tmp_path / "hello.zip"  # a zip, but no checkpoint: the loader says so
    with zipfile.ZipFile(not_ours, "w") as z:
        z.writestr("hello.txt", "not a model")
    assert CheckpointFile(not_ours).detect_format() == "zip"


def test_preflight_reports_what_the_spec_module_finds(tmp_path):
    from search_api.__main__ import preflight

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"PK not really")
    assert "not a readable checkpoint" in preflight(str(garbage))
    assert "not found" in preflight(str(tmp_path / "missing.pt"))
    assert "expected" in preflight("open_clip:")
    assert preflight(str(SHIPPED)) is None


def test_spec_parsing_lives_in_one_module():
    """No other package module asks "open_clip spec or checkpoint, which format" itself."""
    needles = ('startswith("open_clip', "startswith('open_clip", "startswith(OPEN_CLIP_PREFIX",
               "\\xfd7zXZ", "LZMA_MAGIC")
    offenders = []
    for pkg in ("core", "encoder", "indexer", "search_api", "training", "dags", "bench",
                "flickr8k", "objectstore"):
        for f in (ROOT / pkg).rglob("*.py"):
            if f == ROOT / "encoder" / "spec.py":
                continue
            text = f.read_text()
            offenders += [f"{f.relative_to(ROOT)}: {n}" for n in needles if n in text]
    assert not offenders


def test_the_card_beside_a_checkpoint(tmp_path):
    """The card file is read without torch; a missing or damaged one is None."""
    import json

    from encoder.spec import CheckpointFile

    ckpt = CheckpointFile(tmp_path / "m.pt")
    ckpt.path.write_bytes(b"weights")
    assert ckpt.read_card_file() is None  # no card
    ckpt.card_path.write_text(json.dumps({"model_id": "m-1"}))
    assert ckpt.card_path == tmp_path / "m.card.json"
    assert ckpt.read_card_file() == {"model_id": "m-1"}
    ckpt.card_path.write_text("not json")
    assert ckpt.read_card_file() is None
