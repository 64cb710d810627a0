"""The serving bundle: everything a process needs to embed queries and images without torch.

    <bundle>/bundle.json      format, model id, the source it was made from (path, size, mtime,
                              sha256), dim, temperature, image preprocessing (`ImageSpec`),
                              tokenizer settings (`TokenizerConfig`), the graphs' file names
    <bundle>/image.onnx       the image tower (pixels -> L2-normalised embedding), fp32
    <bundle>/text.onnx        the text tower (ids + mask -> L2-normalised embedding), fp32
    <bundle>/text.int8.onnx   the text tower, dynamic int8 (TEXT_RUNTIME=onnx-int8)
    <bundle>/image.int8.onnx  the calibrated int8 image tower, when one was built
    <bundle>/image.cells.onnx pixels -> the tower's spatial cells (`cell_embeddings`),
                              when the family has a spatial map
    <bundle>/tokenizer.json   the model's tokenizer (`tokenizers` library)
    <bundle>/bank.npy         the query bank (hubness correction; absent for plain cosine):
                              the image side's b(v) needs it, the query side only [q, 1]

Where (`bundle_dirs`): beside a checkpoint file (`models/x.pt` -> `models/x.bundle/`), or, when
that folder is read-only (a container's mount), in the ONNX cache folder
(`<ONNX_CACHE_DIR>/bundles/x-<digest of the checkpoint's path>`); an open_clip spec's in the
ONNX cache folder (`<ONNX_CACHE_DIR>/bundles/<spec>`).

Written by `python -m encoder bundle [MODEL_PATH]` (`write_bundle`; needs torch: it loads the
model, exports the graphs, checks them against eager PyTorch and the tokenizer against the
model's own), and by training's `ship` step. Read by `read_bundle` without torch: the bundle is
checked against its source (a checkpoint's card model id, or the file's size, mtime and sha256),
and a missing or stale bundle is an error naming the command; `ensure_bundle` builds it once
in a child process where torch is installed, so the reading process never imports torch.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from encoder.pixels import ImageSpec
from encoder.scoring import Scoring
from encoder.spec import CheckpointFile, OpenClipSpec, parse_model_spec
from encoder.tokens import TextTokenizer, TokenizerConfig

log = logging.getLogger(__name__)

# /2: explanations' cells graph; /3: our models' cells are their contributions (not unit
# vectors). An older bundle is rewritten once where torch is installed
FORMAT = "flickr-search-serving-bundle/3"
MANIFEST = "bundle.json"
COMMAND = "python -m encoder bundle"
GRAPHS = ("image", "text", "text.int8", "image.int8", "image.cells")
# texts the written tokenizer must tokenize exactly as the model's own `tokenize`
PROBE_TEXTS = ["two dogs playing in the snow", "A man rides a bicycle down a city street.",
               "", "  lots   of\twhitespace\n", "Two “smart-quoted” dogs &amp; a cat!!",
               "Crème brûlée à la café 🐶", "ALL CAPS, digits 12345 and don't stop",
               "a very long caption " * 40]


class BundleMissing(FileNotFoundError):
    """No serving bundle where the model's is expected."""


class StaleBundle(ValueError):
    """A bundle that does not belong to the model MODEL_PATH names now (or cannot be read)."""


def _command(model_path) -> str:
    return f"`{COMMAND} {model_path}`"


def default_cache_dir() -> Path:
    from core.settings import get_settings

    return Path(get_settings().onnx_cache_dir)


def bundle_dirs(model_path, cache_dir: str | os.PathLike | None = None) -> list[Path]:
    """Where the bundle of `model_path` may live, in the order they are read (see the module
    doc): beside a checkpoint, then (a checkpoint in a read-only folder, e.g. a container's
    mount) under the ONNX cache folder; an open_clip spec's under the ONNX cache folder."""
    spec = parse_model_spec(model_path)
    cache = Path(cache_dir or default_cache_dir()) / "bundles"
    if isinstance(spec, CheckpointFile):
        where = hashlib.sha256(str(spec.path.resolve()).encode()).hexdigest()[:8]
        return [spec.path.parent / f"{spec.path.stem}.bundle",
                cache / f"{spec.path.stem}-{where}"]
    return [cache / re.sub(r"[^A-Za-z0-9._-]+", "_", str(spec))[:200]]


def bundle_dir(model_path, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where a new bundle of `model_path` is written: the first of `bundle_dirs` whose folder
    can be written (beside a checkpoint unless its folder is read-only)."""
    candidates = bundle_dirs(model_path, cache_dir)
    for folder in candidates:
        parent = next((p for p in (folder.parent, *folder.parents) if p.exists()), None)
        if parent is not None and os.access(parent, os.W_OK):
            return folder
    return candidates[0]


def _source_files(model_path) -> list[Path]:
    """The files the model is made from (their bytes decide the model id): a checkpoint, an
    open_clip weights file or local-dir folder's files; none for tags, hub repos and random
    weights (named by the spec alone)."""
    spec = parse_model_spec(model_path)
    if isinstance(spec, CheckpointFile):
        return [spec.path]
    if spec.architecture.startswith("local-dir:"):
        folder = Path(spec.architecture[len("local-dir:"):])
        return sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
    if spec.weights_is_file:
        return [Path(spec.weights)]
    return []


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fingerprint(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "sha256": _sha256(path)}


def _card_model_id(path: Path) -> str | None:
    """The model id of a checkpoint's card file, when it was written with (or after) it."""
    checkpoint = CheckpointFile(path)
    try:
        if checkpoint.card_path.stat().st_mtime_ns < path.stat().st_mtime_ns:
            return None  # older than the checkpoint: says nothing about it
    except OSError:
        return None
    return (checkpoint.read_card_file() or {}).get("model_id")


def _stale_reason(manifest: dict, model_path) -> str | None:
    """Why the bundle does not belong to `model_path`'s model now, or None."""
    if manifest.get("format") != FORMAT:
        return f"unknown format {manifest.get('format')!r} (expected {FORMAT})"
    spec = parse_model_spec(model_path)
    if isinstance(spec, OpenClipSpec) and manifest.get("spec") != str(spec):
        return f"made for {manifest.get('spec')!r}, not {str(spec)!r}"
    recorded = {Path(f["path"]).name: f for f in manifest.get("source", [])}
    files = _source_files(model_path)
    if {p.name for p in files} != set(recorded):
        return "made from other files"
    model_id = manifest["model_id"]
    for path in files:
        rec = recorded[path.name]
        if isinstance(spec, CheckpointFile):
            card_id = _card_model_id(path)
            if card_id is not None and card_id != model_id:
                return f"made for model {model_id}, the checkpoint is {card_id}"
            if card_id == model_id:
                continue  # the card says it is the same model (a card update changes the file)
        st = path.stat()
        if (st.st_size, st.st_mtime_ns) == (rec["size"], rec["mtime_ns"]):
            continue
        if _sha256(path) != rec["sha256"]:
            return f"{path} changed since the bundle was made"
    return None


@dataclass
class ServingBundle:
    dir: Path
    manifest: dict

    @property
    def model_id(self) -> str:
        return self.manifest["model_id"]

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def image_spec(self) -> ImageSpec:
        return ImageSpec.from_dict(self.manifest["image_spec"])

    def graph(self, name: str) -> Path | None:
        """The file of graph `name` (one of GRAPHS), if present."""
        file = self.manifest["graphs"].get(name)
        return self.dir / file if file else None

    def tokenizer(self) -> TextTokenizer:
        return TextTokenizer(self.dir / "tokenizer.json",
                             TokenizerConfig.from_dict(self.manifest["tokenizer"]))

    def scoring(self) -> Scoring:
        bank = self.manifest.get("bank")
        return Scoring(self.dim, np.load(self.dir / bank) if bank else None,
                       self.manifest["temperature"])


def read_bundle(model_path, cache_dir: str | os.PathLike | None = None,
                directory: str | os.PathLike | None = None) -> ServingBundle:
    """The bundle of `model_path` (torch-free). BundleMissing when there is none, StaleBundle
    when it belongs to another model or is damaged; both name the command that writes it."""
    if directory:
        return _read_folder(Path(directory), model_path)
    candidates = bundle_dirs(model_path, cache_dir)
    stale = None
    for folder in candidates:
        if (folder / MANIFEST).exists():
            try:
                return _read_folder(folder, model_path)
            except StaleBundle as exc:  # another location may hold a fresh one
                stale = stale or exc
    if stale is not None:
        raise stale
    raise BundleMissing(f"no serving bundle for MODEL_PATH={model_path} (expected at "
                        f"{candidates[0]}); write it with {_command(model_path)}")


def _read_folder(folder: Path, model_path) -> ServingBundle:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        raise BundleMissing(f"no serving bundle for MODEL_PATH={model_path} at {folder}; "
                            f"write it with {_command(model_path)}") from None
    except (OSError, ValueError) as exc:
        raise StaleBundle(f"unreadable serving bundle {folder / MANIFEST} ({exc}); rewrite it "
                          f"with {_command(model_path)}") from None
    reason = _stale_reason(manifest, model_path)
    if reason is None:
        absent = [f for f in manifest["graphs"].values() if not (folder / f).is_file()]
        absent += [] if (folder / "tokenizer.json").is_file() else ["tokenizer.json"]
        if manifest.get("bank") and not (folder / manifest["bank"]).is_file():
            absent.append(manifest["bank"])
        reason = f"files missing: {', '.join(absent)}" if absent else None
    if reason:
        raise StaleBundle(f"the serving bundle at {folder} does not match MODEL_PATH="
                          f"{model_path}: {reason}; rewrite it with {_command(model_path)}")
    return ServingBundle(folder, manifest)


def torch_installed() -> bool:
    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):  # a blocked or broken torch
        return False


def ensure_bundle(model_path, cache_dir: str | os.PathLike | None = None) -> ServingBundle:
    """`read_bundle`, building a missing or stale bundle once where torch is installed (in a
    child process: this one stays torch-free). Without torch the error names the command."""
    try:
        return read_bundle(model_path, cache_dir)
    except (BundleMissing, StaleBundle) as exc:
        if not torch_installed():
            raise
        log.warning("%s; writing it now (once)", exc)
    from filelock import FileLock

    folder = bundle_dir(model_path, cache_dir)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):  # replicas starting together write it once
        try:
            return read_bundle(model_path, cache_dir)
        except (BundleMissing, StaleBundle):
            pass
        cmd = [sys.executable, "-m", "encoder", "bundle", str(model_path), "--out", str(folder)]
        if cache_dir:
            cmd += ["--cache-dir", str(cache_dir)]
        done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise StaleBundle(f"could not write the serving bundle for MODEL_PATH={model_path}: "
                          f"{tail[0]} (run {_command(model_path)} to see why)")
    return read_bundle(model_path, cache_dir)


# --- writing (imports torch) -------------------------------------------------------------
def _tokenizer_files(model, folder: Path) -> TokenizerConfig:
    """Write tokenizer.json for the model's tokenizer; the settings its `tokenize` applies."""
    backbone = getattr(model, "text_backbone", None)
    if backbone is not None:  # our models: a Hugging Face fast tokenizer
        hf = backbone.tokenizer
        if getattr(hf, "padding_side", "right") != "right":
            raise StaleBundle(f"{type(hf).__name__}: left padding is not supported")
        hf.backend_tokenizer.save(str(folder / "tokenizer.json"))
        return TokenizerConfig(max_length=backbone.max_length, pad_to=None,
                               pad_id=int(hf.pad_token_id), pad_token=str(hf.pad_token))
    tok = model.tokenizer  # open_clip's
    cleaners = {"_clean_lower": "lower", "_clean_whitespace": "whitespace"}
    clean_fn = getattr(getattr(tok, "clean_fn", None), "__name__", None)
    if clean_fn not in cleaners:
        raise StaleBundle(f"open_clip tokenizer {type(tok).__name__}: text cleaning "
                          f"{clean_fn!r} has no torch-free twin (known: {sorted(cleaners)})")
    n = int(tok.context_length)
    if hasattr(tok, "bpe_ranks"):  # open_clip's SimpleTokenizer (CLIP's byte-level BPE)
        if getattr(tok, "reduction_fn", None) is not None:
            raise StaleBundle("open_clip tokenizer with a reduction mask is not supported")
        _clip_bpe(tok).save(str(folder / "tokenizer.json"))
        return TokenizerConfig(max_length=n, pad_to=n, pad_id=0, pad_token="!",
                               mask="nonzero", clean=cleaners[clean_fn])
    hf = getattr(tok, "tokenizer", None)  # open_clip's HFTokenizer
    if hf is None or not hasattr(hf, "backend_tokenizer") or getattr(tok, "strip_sep_token", 0):
        raise StaleBundle(f"open_clip tokenizer {type(tok).__name__} is not supported")
    hf.backend_tokenizer.save(str(folder / "tokenizer.json"))
    return TokenizerConfig(max_length=n, pad_to=n, pad_id=int(hf.pad_token_id),
                           pad_token=str(hf.pad_token), mask="nonzero", clean=cleaners[clean_fn])


def _clip_bpe(tok):
    """open_clip's SimpleTokenizer as a `tokenizers` BPE: the same vocabulary, merges, split
    pattern and end-of-word marker (its text cleaning runs before, `encoder.tokens`)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors

    merges = sorted(tok.bpe_ranks, key=tok.bpe_ranks.get)
    bpe = models.BPE(vocab=dict(tok.encoder), merges=merges, end_of_word_suffix="</w>",
                     fuse_unk=False)
    out = Tokenizer(bpe)
    out.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
                             behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    sot, eot = (tok.decoder[i] for i in (tok.sot_token_id, tok.eot_token_id))
    out.add_special_tokens([sot, eot])
    out.post_processor = processors.TemplateProcessing(
        single=f"{sot} $A {eot}", special_tokens=[(sot, tok.sot_token_id),
                                                  (eot, tok.eot_token_id)])
    return out


def check_tokenizer(model, tokenizer: TextTokenizer, texts=PROBE_TEXTS) -> None:
    """StaleBundle unless `tokenizer` gives exactly the model's ids and masks for `texts`."""
    want = model.tokenize(list(texts), tensors="np")
    got = tokenizer.tokenize(list(texts))
    for key in ("input_ids", "attention_mask"):
        a, b = np.asarray(want[key], np.int64), got[key]
        if a.shape != b.shape or not np.array_equal(a, b):
            raise StaleBundle(f"the torch-free tokenizer differs from the model's on the probe "
                              f"texts ({key}: {a.shape} vs {b.shape})")


def write_bundle(model_path, out: str | os.PathLike | None = None,
                 cache_dir: str | os.PathLike | None = None, loaded=None) -> Path:
    """Write the serving bundle of `model_path` (see the module doc) and return its folder.
    `loaded`: the model when the caller has it loaded already. Graphs exported before into the
    ONNX cache (`<cache_dir>/<model_id>/`) are reused; new ones are exported and checked there."""
    import torch

    from core.atomic import atomic_dir
    from encoder.errors import NoSpatialMap
    from encoder.loading import load_checkpoint
    from encoder.runtime_onnx import OnnxTowers

    loaded = loaded or load_checkpoint(model_path)
    model = loaded.model.eval()
    folder = Path(out) if out else bundle_dir(model_path, cache_dir)
    towers = OnnxTowers(model, loaded.model_id, cache_dir or default_cache_dir())
    built = {"image": towers.export_image, "text": towers.export_text,
             "text.int8": towers.quantize_text, "image.cells": towers.export_cells}
    graphs = {}
    for name in GRAPHS:
        path = towers.dir / f"{name}.onnx"
        if not path.is_file() and name in built:
            try:
                path = built[name]()
            except NoSpatialMap as exc:  # the bundle serves without explanations
                log.info("%s: no %s graph (%s)", loaded.model_id, name, exc)
                continue
        if path.is_file():
            graphs[name] = path
    scoring = Scoring.of(model)
    try:
        export = json.loads((towers.dir / "export.json").read_text())
    except (OSError, ValueError):
        export = {}
    spec = parse_model_spec(model_path)
    manifest = {
        "format": FORMAT, "model_id": loaded.model_id,
        "spec": str(spec) if isinstance(spec, OpenClipSpec) else None,
        "source": [_fingerprint(p) for p in _source_files(model_path)],
        "dim": int(model.config.embed_dim), "temperature": float(scoring.temperature),
        "bank": "bank.npy" if scoring.corrected else None,
        "image_spec": model.image_spec.to_dict(),
        "graphs": {name: f"{name}.onnx" for name in graphs},
        "export": export, "torch": torch.__version__,
    }
    with atomic_dir(folder, replace=True) as tmp:
        for name, path in graphs.items():
            shutil.copyfile(path, tmp / f"{name}.onnx")
        manifest["tokenizer"] = _tokenizer_files(model, tmp).to_dict()
        check_tokenizer(model, TextTokenizer(tmp / "tokenizer.json", TokenizerConfig.from_dict(
            manifest["tokenizer"])))
        if scoring.corrected:
            np.save(tmp / "bank.npy", scoring.bank)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        tmp.chmod(0o755)  # a temporary folder is private; other users serve from it
    log.info("serving bundle of %s written to %s", loaded.model_id, folder)
    return folder
