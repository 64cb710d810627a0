"""The model: what a MODEL_PATH names, the model families, checkpoints, inference and scoring.

    spec.py             a MODEL_PATH value -> an open_clip spec or a checkpoint file (and its
                        format); torch-free, so the service checks it before importing torch
    protocol.py         `EmbeddingModel`, what every model family gives (encoders + matching
                        preprocessing), and `LoadedModel`
    loading.py          the factory: `load_checkpoint`, `read_card`, `read_scoring`, `update_card`
    model.py            our dual encoder: pretrained towers (backbones.py: registry) + projection
                        heads; preprocessing.py: image decoding and transforms
    open_clip_model.py  pretrained CLIP-family models (open_clip) by spec, and their fine-tunes
    checkpoint.py       the checkpoint file: trainable weights + model card, the model id
    inference.py        `Encoder`: numpy in, L2-normalised numpy out, on eager PyTorch or
                        runtime_onnx.py's ONNX Runtime towers (fp32 / int8)
    scoring.py          how an embedding becomes the vector an index stores or searches (NumPy
                        for arrays; torch only for tensors)
    match_scale.py      what a score means to a person: the 0-100 match, calibrated on dev
                        captions and kept in the model card
    image_formats.py    which files are photos (the one list) and the decoders beyond Pillow's
                        (HEIC via pillow-heif, camera RAW via rawpy); torch-free

Serving without torch (the search service): bundle.py writes and checks a model's serving bundle
(ONNX towers, tokenizer file, preprocessing constants, scoring data; `python -m encoder bundle`),
serving.py runs it (`ServingEncoder`: ONNX Runtime, `tokenizers` via tokens.py, NumPy/Pillow
preprocessing via pixels.py, which also holds `ImageSpec`); onnx_sessions.py opens ONNX Runtime
sessions, errors.py holds `BackboneUnavailable`. None of these import torch.

The names below are imported on first use, so `import encoder.spec` does not import torch.
"""
from importlib import import_module

_EXPORTS = {
    "IMAGE_BACKBONES": "encoder.backbones", "TEXT_BACKBONES": "encoder.backbones",
    "BackboneUnavailable": "encoder.errors",
    "BadImage": "encoder.preprocessing", "decode_image": "encoder.preprocessing",
    "DualEncoder": "encoder.model", "ModelConfig": "encoder.model",
    "EmbeddingModel": "encoder.protocol", "LoadedModel": "encoder.protocol",
    "Encoder": "encoder.inference",
    "Scoring": "encoder.scoring", "MatchScale": "encoder.match_scale",
    "load_checkpoint": "encoder.loading", "read_card": "encoder.loading",
    "read_scoring": "encoder.loading", "update_card": "encoder.loading",
    "save_checkpoint": "encoder.checkpoint",
    "CheckpointFile": "encoder.spec", "OpenClipSpec": "encoder.spec",
    "parse_model_spec": "encoder.spec",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'encoder' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
