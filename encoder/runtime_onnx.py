"""ONNX Runtime towers for CPU inference (same weights, same outputs as eager PyTorch).

Each tower (image: pixels -> L2-normalised embedding; text: token ids + mask -> L2-normalised
embedding) is exported once per model id into a cache folder and run by ONNX Runtime:

    <cache_dir>/<model_id>/image.onnx        fp32, checked against eager PyTorch on export
    <cache_dir>/<model_id>/text.onnx         fp32, checked likewise
    <cache_dir>/<model_id>/text.int8.onnx    dynamic int8 (MatMul weights), from text.onnx
    <cache_dir>/<model_id>/image.int8.onnx   static int8 (QDQ, per channel), calibrated on
                                             real images: build it with `quantize_image`
                                             or `python -m encoder.runtime_onnx int8-image`
    <cache_dir>/<model_id>/image.cells.onnx  pixels -> [B, h, w, dim] the tower's spatial
                                             cells (`cell_embeddings`: explanations;
                                             absent for a family without a spatial map)

Why: on a small CPU the fp32 ONNX graph runs the image tower several times faster than eager
PyTorch and a single text query in a few ms (BENCHMARKS.md has the figures and the commands).
The model id is unchanged: the exported graph computes the same function (cosine >= 0.9999 to
eager on export, else the export is refused and the caller falls back to PyTorch).

Runtimes (`Encoder(image_runtime=..., text_runtime=...)`): "torch" (eager), "onnx" (fp32),
"onnx-int8". An int8 image graph needs calibration images; without a built one, "onnx-int8"
for the image tower runs the fp32 graph and says so in the log.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from core.atomic import atomic_path, write_atomic
from encoder.errors import NoSpatialMap
from encoder.onnx_sessions import OnnxUnavailable, new_session, session_options  # noqa: F401
from encoder.protocol import EmbeddingModel

log = logging.getLogger(__name__)

RUNTIMES = ("torch", "onnx", "onnx-int8")
OPSET = 17
EXPORT_MIN_COSINE = 0.9999  # fp32 graphs must reproduce eager PyTorch this closely
# what the cells graph outputs (`cell_embeddings`): a cached graph of another kind is redone
CELLS = "contributions"
INT8_MIN_COSINE = 0.95      # a sanity floor only: int8 quality is judged by Recall@K (bench/)


def default_cache_dir() -> Path:
    from core.settings import get_settings

    return Path(get_settings().onnx_cache_dir)


# --- the exported functions ---------------------------------------------------------------
class _ImageGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.m = model

    def forward(self, pixels):
        return self.m.encode_images(pixels)


class _CellsGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.m = model

    def forward(self, pixels):
        return self.m.cell_embeddings(pixels)


class _TextGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.m = model

    def forward(self, input_ids, attention_mask):
        return self.m.encode_text_tokens(input_ids, attention_mask)


def _export(module: nn.Module, args: tuple, path: Path, input_names: list[str],
            dynamic_axes: dict, output: str = "embedding") -> None:
    with atomic_path(path) as tmp, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), args, str(tmp), input_names=input_names,
                          output_names=[output], dynamic_axes=dynamic_axes,
                          opset_version=OPSET, dynamo=False)


def _cosine_min(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return float((a * b).sum(1).min())


def _probe_pixels(size: int, n: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    # smooth-ish images in the model's input range, not white noise
    low = torch.rand(n, 3, size // 16, size // 16, generator=g) * 2 - 1
    return F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)


PROBE_TEXTS = ["two dogs playing in the snow", "a man rides a bicycle down a city street",
               "a child", "people sitting on a bench next to the water at sunset"]


def _sensitive_nodes(path) -> list[str]:
    """Nodes left in fp32 by the int8 image graph: the first and last convolutions and the
    projection. Quantizing them too cost 0.8 point of dev Recall@5; without them the drop
    stays within 0.3 point (bench/quality.py)."""
    import onnx

    nodes = onnx.load(str(path), load_external_data=False).graph.node
    convs = [n.name for n in nodes if n.op_type == "Conv"]
    dense = [n.name for n in nodes if n.op_type in ("Gemm", "MatMul")]
    return convs[:1] + convs[-1:] + dense


@contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """onnxruntime.quantization logs every tensor at INFO on the root logger."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        root.setLevel(level)


class OnnxTowers:
    """Lazily exports and loads the ONNX graphs of one model; each tower on first use."""

    def __init__(self, model: EmbeddingModel, model_id: str,
                 cache_dir: str | os.PathLike | None = None, threads: int | None = None,
                 spinning: bool = False):
        self.model = model
        self.model_id = model_id
        self.dir = Path(cache_dir or default_cache_dir()) / model_id
        self.threads = threads
        self.spinning = spinning
        self._sessions: dict[str, object] = {}
        self._lock = threading.RLock()
        self.variants: dict[str, str] = {}  # tower -> variant actually running

    # --- paths and building ---------------------------------------------------------------
    def path(self, tower: str, int8: bool = False) -> Path:
        return self.dir / f"{tower}{'.int8' if int8 else ''}.onnx"

    def _record(self, name: str, info: dict) -> None:
        meta_path = self.dir / "export.json"
        try:
            meta = json.loads(meta_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            meta = {}
        meta[name] = info
        write_atomic(meta_path, json.dumps(meta, indent=2) + "\n")

    def _cells_current(self) -> bool:
        """Whether a cached cells graph computes today's cells (`CELLS`): graphs exported
        before the cells became contributions are exported again."""
        try:
            meta = json.loads((self.dir / "export.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return False
        return meta.get("image.cells", {}).get("cells") == CELLS

    def _verify(self, path: Path, tower: str, floor: float) -> float:
        sess = self._new_session(path)
        if tower == "image":
            x = _probe_pixels(self.model.image_spec.input_size)
            with torch.inference_mode():
                ref = self.model.encode_images(x).float().numpy()
            out = sess.run(None, {"pixels": x.numpy()})[0]
        else:
            with torch.inference_mode():
                ref = self.model.encode_texts(PROBE_TEXTS).float().numpy()
            out = sess.run(None, self._text_feed(PROBE_TEXTS))[0]
        cos = _cosine_min(ref, out)
        if cos < floor:
            path.unlink(missing_ok=True)
            raise OnnxUnavailable(f"{path.name}: exported graph differs from eager PyTorch "
                                  f"(min cosine {cos:.5f} < {floor})")
        return cos

    def export_image(self) -> Path:
        path = self.path("image")
        size = self.model.image_spec.input_size
        x = _probe_pixels(size, 2)
        _export(_ImageGraph(self.model), (x,), path, ["pixels"],
                {"pixels": {0: "batch"}, "embedding": {0: "batch"}})
        cos = self._verify(path, "image", EXPORT_MIN_COSINE)
        self._record("image", {"min_cosine_vs_torch": cos, "torch": torch.__version__})
        return path

    def export_cells(self) -> Path:
        """The cells graph (see the module doc); NoSpatialMap when the family has none."""
        path = self.path("image.cells")
        size = self.model.image_spec.input_size
        x = _probe_pixels(size, 2)
        with torch.inference_mode():
            ref = self.model.cell_embeddings(x).float().numpy()  # NoSpatialMap: nothing written
        _export(_CellsGraph(self.model), (x,), path, ["pixels"],
                {"pixels": {0: "batch"}, "cells": {0: "batch"}}, output="cells")
        out = self._new_session(path).run(None, {"pixels": x.numpy()})[0]
        same_shape = out.shape == ref.shape
        cos = _cosine_min(ref.reshape(-1, ref.shape[-1]), out.reshape(-1, out.shape[-1])) \
            if same_shape else -1.0
        # the cells are not unit vectors: their lengths must match too
        scale = float(np.abs(np.linalg.norm(out, axis=-1) / np.maximum(
            np.linalg.norm(ref, axis=-1), 1e-12) - 1).max()) if same_shape else 1.0
        if cos < EXPORT_MIN_COSINE or scale > 1 - EXPORT_MIN_COSINE:
            path.unlink(missing_ok=True)
            raise OnnxUnavailable(f"{path.name}: exported graph differs from eager PyTorch "
                                  f"(min cosine {cos:.5f}, lengths off by up to {scale:.5f})")
        self._record("image.cells", {"cells": CELLS, "min_cosine_vs_torch": cos,
                                     "torch": torch.__version__,
                                     "grid": list(ref.shape[1:3])})
        return path

    def export_text(self) -> Path:
        path = self.path("text")
        tok = self.model.tokenize(PROBE_TEXTS[:2])
        _export(_TextGraph(self.model), (tok["input_ids"], tok["attention_mask"]), path,
                ["input_ids", "attention_mask"],
                {"input_ids": {0: "batch", 1: "tokens"},
                 "attention_mask": {0: "batch", 1: "tokens"}, "embedding": {0: "batch"}})
        cos = self._verify(path, "text", EXPORT_MIN_COSINE)
        self._record("text", {"min_cosine_vs_torch": cos, "torch": torch.__version__})
        return path

    def quantize_text(self) -> Path:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        src = self.path("text") if self.path("text").is_file() else self.export_text()
        dst = self.path("text", int8=True)
        # MatMul weights per channel int8, activations quantized per call (dynamic)
        with atomic_path(dst) as tmp, _quiet_root_logger():
            quantize_dynamic(str(src), str(tmp), weight_type=QuantType.QInt8,
                             per_channel=True, op_types_to_quantize=["MatMul"])
        cos = self._verify(dst, "text", INT8_MIN_COSINE)
        self._record("text.int8", {"min_cosine_vs_torch": cos, "method": "dynamic, MatMul"})
        return dst

    def quantize_image(self, calibration: np.ndarray, batch: int = 16) -> Path:
        """Static QDQ int8 (per-channel weights, uint8 activations) calibrated on `calibration`
        pixels [N, 3, H, W] (preprocessed real images; a few dozen suffice)."""
        from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                              quantize_static)
        from onnxruntime.quantization.shape_inference import quant_pre_process

        src = self.path("image") if self.path("image").is_file() else self.export_image()
        calibration = np.ascontiguousarray(calibration, dtype=np.float32)

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.it = iter([{"pixels": calibration[i:i + batch]}
                                for i in range(0, len(calibration), batch)])

            def get_next(self):
                return next(self.it, None)

        dst = self.path("image", int8=True)
        with atomic_path(dst) as tmp, tempfile.TemporaryDirectory(dir=dst.parent) as scratch, \
                warnings.catch_warnings(), _quiet_root_logger():
            warnings.simplefilter("ignore")
            pre = Path(scratch) / "pre.onnx"  # the graph prepared for quantization
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
            keep_fp32 = _sensitive_nodes(pre)
            # 7-bit weights (reduce_range): x86 CPUs without VNNI saturate u8*s8 products
            # (min cosine 0.92 to eager on an AVX2 EPYC, 0.987 with it); the cached graph
            # must be right on whatever CPU later runs it
            quantize_static(str(pre), str(tmp), Reader(), quant_format=QuantFormat.QDQ,
                            per_channel=True, reduce_range=True,
                            activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, nodes_to_exclude=keep_fp32)
        cos = self._verify(dst, "image", INT8_MIN_COSINE)
        self._record("image.int8", {"min_cosine_vs_torch": cos,
                                    "method": "static QDQ, MinMax, 7-bit weights",
                                    "kept_fp32": "stem conv, head conv, projection",
                                    "calibration_images": int(len(calibration))})
        return dst

    # --- sessions ---------------------------------------------------------------------------
    def _new_session(self, path: Path):
        return new_session(path, self.threads, self.spinning)

    def session(self, tower: str, int8: bool = False):
        name = f"{tower}{'.int8' if int8 else ''}"
        sess = self._sessions.get(name)
        if sess is not None:
            return sess
        with self._lock:
            if name in self._sessions:
                return self._sessions[name]
            path = self.path(tower, int8)
            if int8 and tower == "image" and not path.is_file():
                log.warning("no calibrated int8 image graph at %s (build it with `python -m "
                            "encoder.runtime_onnx int8-image`); running the fp32 graph", path)
                sess = self.session("image", False)
                self._sessions[name] = sess  # warn once, then keep running the fp32 graph
                return sess
            try:
                if tower == "image.cells" and not self._cells_current():
                    path.unlink(missing_ok=True)
                if not path.is_file():
                    if tower == "image":
                        self.export_image()
                    elif tower == "image.cells":
                        self.export_cells()
                    elif int8:
                        self.quantize_text()
                    else:
                        self.export_text()
                sess = self._new_session(path)
            except (OnnxUnavailable, NoSpatialMap):
                raise
            except Exception as exc:  # exporter / quantizer / loader errors of many types
                raise OnnxUnavailable(f"cannot build {path.name}: {type(exc).__name__}: "
                                      f"{exc}") from exc
            self._sessions[name] = sess
            self.variants[tower] = name
            return sess

    # --- running ----------------------------------------------------------------------------
    def _text_feed(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        tok = self.model.tokenize(texts, tensors="np")
        return {k: v.astype(np.int64, copy=False) for k, v in tok.items()}

    def encode_texts(self, texts: Sequence[str], int8: bool = False) -> np.ndarray:
        return self.session("text", int8).run(None, self._text_feed(texts))[0]

    def encode_pixels(self, pixels: np.ndarray, int8: bool = False) -> np.ndarray:
        pixels = np.ascontiguousarray(pixels, dtype=np.float32)
        return self.session("image", int8).run(None, {"pixels": pixels})[0]

    def cell_embeddings(self, pixels: np.ndarray) -> np.ndarray:
        pixels = np.ascontiguousarray(pixels, dtype=np.float32)
        return self.session("image.cells").run(None, {"pixels": pixels})[0]


def _main(argv: list[str] | None = None) -> int:
    """`python -m encoder.runtime_onnx {export,int8-image} --checkpoint P [--images DIR]`."""
    import argparse

    from encoder.loading import load_checkpoint
    from encoder.preprocessing import decode_image, eval_transform

    p = argparse.ArgumentParser(prog="python -m encoder.runtime_onnx", description=_main.__doc__)
    p.add_argument("cmd", choices=["export", "int8-image"])
    p.add_argument("--checkpoint", default="models/flickr8k-dual-encoder.pt")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--images", help="folder of calibration images (int8-image)")
    p.add_argument("--limit", type=int, default=64, help="calibration images (sorted by name)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    loaded = load_checkpoint(args.checkpoint)
    towers = OnnxTowers(loaded.model, loaded.model_id, args.cache_dir)
    if args.cmd == "export":
        print(towers.export_image())
        print(towers.export_text())
        print(towers.quantize_text())
    else:
        if not args.images:
            p.error("int8-image needs --images DIR")
        tf = eval_transform(loaded.model.image_spec)
        files = sorted(f for f in Path(args.images).iterdir()
                       if f.suffix.lower() in (".jpg", ".jpeg", ".png"))[: args.limit]
        calib = torch.stack([tf(decode_image(f.read_bytes())) for f in files]).numpy()
        print(towers.quantize_image(calib))
    print(json.dumps(json.loads((towers.dir / "export.json").read_text()), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
