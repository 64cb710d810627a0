"""Pretrained CLIP-family models (open_clip) as encoders, chosen by a spec instead of a checkpoint.

    MODEL_PATH=open_clip:<architecture>[:<pretrained tag or local weights file>]
    MODEL_PATH=open_clip:hf-hub:<org>/<repo>        (open_clip's Hugging Face hub form)
    MODEL_PATH=open_clip:local-dir:<folder>          (open_clip_config.json + weights, offline)

e.g. `open_clip:ViT-B-32:laion2b_s34b_b79k`, `open_clip:ViT-B-32:/models/open_clip_pytorch_model.bin`,
or `open_clip:<architecture>` (RANDOM weights, seeded: for tests and benchmarks, logged loudly).

The spec is parsed by `encoder.spec.OpenClipSpec`; `encoder.loading` calls `load_open_clip(spec)`,
which returns the same `LoadedModel` a checkpoint gives. Its model is an `OpenClipEncoder`, an
`encoder.protocol.EmbeddingModel`: open_clip's model with its matching preprocessing
(`image_spec`, open_clip's tokenizer as `tokenize`) and an empty `query_bank` (plain cosine). A
fine-tuned checkpoint loads its stored weights into `base_model(config)`.

Image preprocessing is open_clip's own (its eval transform, built from the image spec by
`encoder.preprocessing.eval_transform`), with the settings of the weights: a pretrained tag's,
an hf-hub/local-dir open_clip_config.json's, the open_clip_config.json beside a weights file, or
those all of the architecture's tags share.

The model id is `open_clip-<name>-<digest>` (name: the architecture, or the hub repo's / the
folder's name), the digest a sha256 over the architecture's config,
the preprocessing and the weights file's bytes (the seeded random state dict when there is no
file), so an index built with one set of weights can never be served with another. Reading it
(`read_open_clip_card`) hashes the file without building the model.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from encoder.backbones import BackboneUnavailable, ImageSpec
from encoder.errors import NoSpatialMap
from encoder.model import ModelConfig
from encoder.protocol import LoadedModel
from encoder.spec import HF_HUB, LOCAL_DIR, OPEN_CLIP_PREFIX, OpenClipSpec

log = logging.getLogger(__name__)

FAMILY = "open_clip"  # config.extra["family"] of a fine-tuned open_clip checkpoint
# the PreprocessCfg fields a pretrained tag or an open_clip_config.json may set
_PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode", "fill_color")
OFFLINE_HINT = ("or copy a Hugging Face cache (~/.cache/huggingface) that holds it and set "
                "HF_HUB_OFFLINE=1")


def _open_clip():
    try:
        import open_clip
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise BackboneUnavailable("open_clip models need the package open_clip_torch "
                                  "(pip install 'open_clip_torch>=3.3,<4')") from exc
    return open_clip


def _hub_fetch(repo: str, filename: str | None, what: str, instead: str) -> str:
    """A file of a Hugging Face repo (from the cache when offline), as open_clip fetches it (a
    .safetensors alternative first); BackboneUnavailable naming the URL and `instead` when it
    cannot be had."""
    from huggingface_hub import hf_hub_url
    from open_clip.constants import HF_WEIGHTS_NAME
    from open_clip.pretrained import download_pretrained_from_hf

    filename = filename or HF_WEIGHTS_NAME
    try:
        path = download_pretrained_from_hf(repo, filename=filename)
    except Exception as exc:  # hub errors of many types (offline: connection / cache misses)
        raise BackboneUnavailable(
            f"{what} could not be fetched from {hf_hub_url(repo, filename)} "
            f"({type(exc).__name__}: no network, or not in the Hugging Face cache); {instead}, "
            f"{OFFLINE_HINT}") from None
    return path


def _tag_weights(arch: str, tag: str) -> tuple[str, dict]:
    """(local file, pretrained cfg) of a pretrained tag, downloading into open_clip's cache where
    the network allows."""
    from open_clip import pretrained as ocp

    cfg = ocp.get_pretrained_cfg(arch, tag)
    if not cfg:
        tags = ocp.list_pretrained_tags_by_model(arch)
        raise ValueError(f"open_clip {arch}: unknown pretrained tag {tag!r}; known tags: "
                         f"{tags or 'none'} (or pass a local weights file path)")
    what = f"open_clip {arch}: pretrained weights {tag!r}"
    hub = cfg.get("hf_hub", "")
    if hub and ocp.has_hf_hub():  # open_clip prefers the hub, as here
        repo, filename = os.path.split(hub)
        filename = filename or None
        local = os.path.basename(filename or "open_clip_pytorch_model.bin")
        return _hub_fetch(repo, filename, what,
                          f"download that file where there is network and pass it as a local "
                          f"weights file: MODEL_PATH=open_clip:{arch}:/path/to/{local}"), cfg
    try:
        path = ocp.download_pretrained(cfg)
    except Exception as exc:  # url errors of many types (offline: connection errors)
        raise BackboneUnavailable(
            f"{what} could not be fetched from {cfg.get('url') or 'its source'} "
            f"({type(exc).__name__}: no network or not in the cache); download it where there is "
            f"network and pass it as a local weights file: "
            f"MODEL_PATH=open_clip:{arch}:/path/to/weights") from None
    if not path:
        raise BackboneUnavailable(f"{what} has no download source; pass a local weights file: "
                                  f"MODEL_PATH=open_clip:{arch}:/path/to/weights")
    return path, cfg


def _preprocess_for_file(arch: str, weights_file: str) -> dict:
    """Preprocessing for a bare weights file: the open_clip_config.json beside it (a downloaded
    hub repo has one), else what all of the architecture's pretrained tags share, else
    open_clip's defaults (warned: the weights may expect other settings)."""
    beside = Path(weights_file).with_name("open_clip_config.json")
    if beside.is_file():
        return json.loads(beside.read_text()).get("preprocess_cfg", {})
    from open_clip import pretrained as ocp

    seen = {json.dumps({k: cfg.get(k) for k in _PREPROCESS_KEYS}, default=list)
            for cfg in (ocp.get_pretrained_cfg(arch, t)
                        for t in ocp.list_pretrained_tags_by_model(arch))}
    if len(seen) == 1:
        return json.loads(seen.pop())
    if seen:
        log.warning("open_clip %s: the pretrained tags of this architecture preprocess images "
                    "differently and %s has no open_clip_config.json beside it; using open_clip's "
                    "defaults. Pass the tag (with a Hugging Face cache) or open_clip:%s<folder> "
                    "holding open_clip_config.json to use the weights' own.",
                    arch, weights_file, LOCAL_DIR)
    return {}


@dataclass
class _Resolved:
    """What a spec stands for, known without building the model."""
    spec: OpenClipSpec
    arch_config: dict  # open_clip's model_cfg
    weights_file: str | None  # None: random weights
    preprocess: dict  # the PreprocessCfg open_clip builds the model with


def _resolve(oc, spec: OpenClipSpec) -> _Resolved:
    """Architecture config, weights file and preprocessing; raises BackboneUnavailable (with
    what to do) when the weights cannot be fetched, ValueError / FileNotFoundError for a wrong
    spec."""
    from open_clip.constants import HF_CONFIG_NAME
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    arch = spec.architecture
    if arch.startswith(HF_HUB):
        repo = arch[len(HF_HUB):]
        instead = (f"download the repository (huggingface-cli download {repo}) where there is "
                   f"network and pass the folder: MODEL_PATH=open_clip:{LOCAL_DIR}/path/to/folder")
        config = json.loads(Path(_hub_fetch(repo, HF_CONFIG_NAME, f"open_clip {arch}: "
                                            f"{HF_CONFIG_NAME}", instead)).read_text())
        weights_file = _hub_fetch(repo, None, f"open_clip {arch}: weights", instead)
    elif arch.startswith(LOCAL_DIR):
        from open_clip.factory import _find_checkpoint_in_dir  # open_clip's choice of file

        folder = Path(arch[len(LOCAL_DIR):])
        if not (folder / HF_CONFIG_NAME).is_file():
            raise FileNotFoundError(f"open_clip {arch}: {folder / HF_CONFIG_NAME} not found (the "
                                    f"folder must hold open_clip_config.json and the weights)")
        config = json.loads((folder / HF_CONFIG_NAME).read_text())
        weights_file = _find_checkpoint_in_dir(folder)
        if weights_file is None:
            raise FileNotFoundError(f"open_clip {arch}: no weights file (*.safetensors, *.bin, "
                                    f"*.pth) in {folder}")
    else:
        config = None
    if config is not None:
        if "model_cfg" not in config:
            raise ValueError(f"open_clip {arch}: {HF_CONFIG_NAME} has no model_cfg")
        arch_config, overlay = config["model_cfg"], config.get("preprocess_cfg", {})
    else:
        arch_config = oc.get_model_config(arch)
        if arch_config is None:
            raise ValueError(f"unknown open_clip architecture {arch!r} (open_clip.list_models() "
                             "lists the known ones)")
        weights_file, overlay = None, {}
        if spec.weights_is_file:
            if not os.path.isfile(spec.weights):
                raise FileNotFoundError(f"open_clip weights file not found: {spec.weights}")
            weights_file = spec.weights
            overlay = _preprocess_for_file(arch, weights_file)
        elif spec.weights is not None:
            weights_file, overlay = _tag_weights(arch, spec.weights)
    preprocess = merge_preprocess_dict(PreprocessCfg(), overlay)
    preprocess["size"] = arch_config.get("vision_cfg", {}).get("image_size", preprocess["size"])
    return _Resolved(spec, arch_config, weights_file, preprocess)


def _digest(r: _Resolved, state: dict[str, torch.Tensor] | None = None) -> str:
    """sha256 over config, preprocessing and the weights file's bytes (or `state`: random)."""
    h = hashlib.sha256(json.dumps({"model_cfg": r.arch_config, "preprocess": r.preprocess},
                                  sort_keys=True, default=list).encode())
    if r.weights_file is not None:
        with open(r.weights_file, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
        return h.hexdigest()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous().reshape(-1)
        h.update(k.encode())
        h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(memoryview(t.view(torch.uint8).numpy() if t.numel() else np.zeros(0, np.uint8)))
    return h.hexdigest()


@contextmanager
def _no_mha_fastpath():
    """nn.MultiheadAttention's inference fast path (eval + no_grad) traces to
    `aten::_native_multi_head_attention`, which the ONNX exporter cannot write; the regular path
    computes the same function. Used only while exporting."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None:
        yield
        return
    prev = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(prev)


def _exporting() -> bool:
    return torch.onnx.is_in_onnx_export() or torch.jit.is_tracing()


class OpenClipEncoder(nn.Module):
    """An open_clip model with its preprocessing, as an `encoder.protocol.EmbeddingModel`."""

    def __init__(self, clip: nn.Module, tokenizer, config: ModelConfig, image_spec: ImageSpec):
        super().__init__()
        self.clip = clip
        self.config = config
        self.image_spec = image_spec
        self.tokenizer = tokenizer  # open_clip's: fixed context length, 0 = padding
        # hubness correction only once a fine-tune sets a bank (encoder/scoring.py)
        self.register_buffer("query_bank", torch.zeros(config.query_bank_size, config.embed_dim))

    # --- fine-tuning: which weights train and are saved (training/open_clip_train.py) ---------
    def trainable_state_keys(self) -> list[str]:
        """`clip.<name>` of the parameters under the fine-tuned prefixes, + the query bank."""
        prefixes = tuple(f"clip.{p}" for p in self.config.extra.get("trainable", []))
        keys = [k for k in self.state_dict() if prefixes and k.startswith(prefixes)]
        return keys + ["query_bank"]

    def set_query_bank(self, text_emb: torch.Tensor) -> None:
        self.query_bank = text_emb.detach().to(self.query_bank.device, torch.float32).clone()
        self.config.query_bank_size = int(self.query_bank.shape[0])

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale

    def tokenize(self, texts: Sequence[str], tensors: str = "pt") -> dict:
        ids = self.tokenizer(list(texts)).long()
        mask = (ids != 0).long()
        if tensors == "np":
            return {"input_ids": ids.numpy().astype(np.int64), "attention_mask": mask.numpy()}
        return {"input_ids": ids, "attention_mask": mask}

    @property
    def device(self) -> torch.device:
        return next(self.clip.parameters()).device

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        if _exporting():
            with _no_mha_fastpath():
                return F.normalize(self.clip.encode_image(pixels), dim=-1)
        return F.normalize(self.clip.encode_image(pixels), dim=-1)

    def cell_embeddings(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, g, g, dim]: a ViT's patch tokens through its final norm and projection,
        L2-normalised. NoSpatialMap for other towers (ResNets, timm models, attention
        pooling), whose output is not a per-patch projection."""
        visual = self.clip.visual
        from open_clip.transformer import VisionTransformer

        if not isinstance(visual, VisionTransformer) or visual.attn_pool is not None \
                or visual.proj is None or visual.pool_type not in ("tok", "avg"):
            raise NoSpatialMap(f"explanations need a model with a spatial feature map "
                               f"({type(visual).__name__} has none this service can read)")
        if _exporting():
            with _no_mha_fastpath():
                return self._cells(visual, pixels)
        return self._cells(visual, pixels)

    @staticmethod
    def _cells(visual, pixels: torch.Tensor) -> torch.Tensor:
        x = visual.transformer(visual._embeds(pixels))
        tokens = visual.ln_post(x[:, 1:])  # a LayerNorm is per token: before or after pooling
        gh, gw = visual.grid_size
        cells = F.normalize(tokens @ visual.proj, dim=-1)
        return cells.reshape(-1, gh, gw, cells.shape[-1])

    def encode_text_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor
                           ) -> torch.Tensor:
        # open_clip pools at the end-of-text token and ignores the mask; multiplying keeps the
        # ids unchanged (padding is 0) and the mask an input of the exported ONNX graph
        ids = input_ids * attention_mask.to(input_ids.dtype)
        if _exporting():
            with _no_mha_fastpath():
                return F.normalize(self.clip.encode_text(ids), dim=-1)
        return F.normalize(self.clip.encode_text(ids), dim=-1)

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        tok = self.tokenize(texts)
        return self.encode_text_tokens(tok["input_ids"].to(self.device),
                                       tok["attention_mask"].to(self.device))


def _square(arch: str, size) -> int:
    if isinstance(size, (tuple, list)):
        if len(set(size)) != 1:
            raise ValueError(f"open_clip {arch}: non-square input {size} is not supported")
        size = size[0]
    return int(size)


def _image_spec(r: _Resolved, out_dim: int) -> ImageSpec:
    pp = r.preprocess
    return ImageSpec(f"{OPEN_CLIP_PREFIX}{r.spec.architecture}",
                     _square(r.spec.architecture, pp["size"]),
                     tuple(float(x) for x in pp["mean"]), tuple(float(x) for x in pp["std"]),
                     out_dim, resize_mode=pp["resize_mode"], interpolation=pp["interpolation"])


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def _describe(r: _Resolved, digest: str, embed_dim: int) -> tuple[ModelConfig, dict, str]:
    """(config, card, model id): one owner, so reading the card and loading the model agree."""
    arch, weights = r.spec.architecture, r.spec.weights
    spec = _image_spec(r, embed_dim)
    config = ModelConfig(image_backbone=f"{OPEN_CLIP_PREFIX}{arch}",
                         text_backbone=f"{OPEN_CLIP_PREFIX}{arch}",
                         embed_dim=embed_dim, image_weights=weights, text_weights=weights,
                         extra={"family": FAMILY, "spec": str(r.spec), "architecture": arch,
                                "image_size": spec.input_size, "image_mean": list(spec.mean),
                                "image_std": list(spec.std), "resize_mode": spec.resize_mode,
                                "interpolation": spec.interpolation})
    crop = {"shortest": " + center crop", "longest": " + pad"}.get(spec.resize_mode, "")
    card = {"family": FAMILY, "architecture": arch, "pretrained": weights,
            "weights_sha256": digest, "scoring": "cosine",
            "preprocessing": f"open_clip's: {spec.resize_mode} resize{crop} to "
                             f"{spec.input_size} px, {spec.interpolation}, mean {list(spec.mean)} "
                             f"std {list(spec.std)}"}
    return config, card, f"{FAMILY}-{_safe(r.spec.name)}-{digest[:12]}"


def _build(oc, r: _Resolved) -> nn.Module:
    arch = r.spec.architecture
    schema = arch.startswith((HF_HUB, LOCAL_DIR))  # open_clip finds the repo's weights itself
    force = {k: v for k, v in r.preprocess.items() if k != "size"}
    if r.weights_file is None:
        log.warning("open_clip %s: NO PRETRAINED WEIGHTS given; using a RANDOM initialisation "
                    "(seeded; for tests and benchmarks only). Use "
                    "open_clip:%s:<pretrained tag or weights file>.", arch, arch)
        with torch.random.fork_rng(devices=[]):  # same random model (and id) on every load
            torch.manual_seed(0)
            return oc.create_model(arch, pretrained=None, force_preprocess_cfg=force).eval()
    try:
        clip = oc.create_model(arch, pretrained=None if schema else r.weights_file,
                               force_preprocess_cfg=force)
    except Exception as exc:  # unreadable file, wrong architecture: errors of many types
        raise ValueError(f"open_clip {arch}: cannot load weights {r.weights_file}: "
                         f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from None
    return clip.eval()


def load_open_clip(spec: OpenClipSpec) -> LoadedModel:
    """`open_clip:<arch>[:<tag or file>]` (or hf-hub: / local-dir:) -> LoadedModel (see module
    doc)."""
    oc = _open_clip()
    r = _resolve(oc, spec)
    clip = _build(oc, r)
    built = _square(r.spec.architecture, clip.visual.preprocess_cfg["size"])
    if built != _square(r.spec.architecture, r.preprocess["size"]):
        raise ValueError(f"open_clip {r.spec.architecture}: the model takes {built} px images, "
                         f"its config says {r.preprocess['size']}")
    embed_dim = r.arch_config.get("embed_dim")
    if embed_dim is None:
        with torch.no_grad():  # fall back to the output width of the text tower
            embed_dim = clip.encode_text(torch.zeros(1, 77, dtype=torch.long)).shape[-1]
    digest = _digest(r, None if r.weights_file else clip.state_dict())
    config, card, model_id = _describe(r, digest, int(embed_dim))
    image_spec = _image_spec(r, int(embed_dim))
    model = OpenClipEncoder(clip, oc.get_tokenizer(r.spec.architecture), config, image_spec)
    return LoadedModel(model.eval(), card, model_id, str(r.spec))


def base_model(config: ModelConfig) -> OpenClipEncoder:
    """The model a fine-tuned open_clip checkpoint's weights load into: its base spec's, with
    the checkpoint's trained parts and query bank size."""
    model = load_open_clip(OpenClipSpec.parse(config.extra["spec"])).model
    model.config.extra["trainable"] = config.extra.get("trainable", [])
    model.config.query_bank_size = config.query_bank_size
    model.query_bank = torch.zeros(config.query_bank_size, config.embed_dim)
    return model


def read_open_clip_card(spec: OpenClipSpec) -> dict:
    """What `read_card` gives for a checkpoint (model id, config, card), from the spec: the
    weights file is hashed, the model is not built (only random weights need building)."""
    oc = _open_clip()
    r = _resolve(oc, spec)
    if r.weights_file is None or "embed_dim" not in r.arch_config:
        loaded = load_open_clip(spec)
        config, card, model_id = loaded.model.config, loaded.card, loaded.model_id
    else:
        config, card, model_id = _describe(r, _digest(r), int(r.arch_config["embed_dim"]))
    return {"model_id": model_id, "config": config.to_dict(), **card}
