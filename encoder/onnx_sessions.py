"""ONNX Runtime sessions, torch-free: what both the exporting side (encoder/runtime_onnx.py)
and the serving side (encoder/serving.py) open graphs with."""
from __future__ import annotations

import os
from pathlib import Path


class OnnxUnavailable(RuntimeError):
    """onnxruntime is not installed, or the model could not be exported faithfully."""


def ort():
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise OnnxUnavailable("onnxruntime is not installed (pip install onnxruntime)") from exc
    return onnxruntime


def session_options(threads: int | None = None, spinning: bool = False):
    """One intra-op pool of `threads` (default: all cores), no inter-op parallelism.

    Spinning is off: on a machine with few cores, worker threads that busy-wait between ops
    steal the cores that fetch/decode threads and other processes need (measured in bench/).
    """
    rt = ort()
    so = rt.SessionOptions()
    so.intra_op_num_threads = threads or os.cpu_count() or 1
    so.inter_op_num_threads = 1
    so.execution_mode = rt.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = rt.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    so.log_severity_level = 3
    return so


def new_session(path: str | os.PathLike, threads: int | None = None, spinning: bool = False):
    return ort().InferenceSession(str(Path(path)), session_options(threads, spinning),
                                  providers=["CPUExecutionProvider"])
