"""Tiny models from onnx.parser text, and running them."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper


def build(text: str, weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """Parse ``text``; graph inputs named in ``weights`` become initializers with those values."""
    model = onnx.parser.parse_model(text)
    keep = [i for i in model.graph.input if i.name not in weights]
    del model.graph.input[:]
    model.graph.input.extend(keep)
    for name, value in weights.items():
        model.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    onnx.checker.check_model(model, full_check=True)
    return model


def header(opset: int = 17) -> str:
    return f'<ir_version: 8, opset_import: ["" : {opset}]>'


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def initializer_shapes(model: onnx.ModelProto) -> dict[str, tuple]:
    return {t.name: tuple(t.dims) for t in model.graph.initializer}


def rng_weights(rng: np.random.Generator, **shapes) -> dict[str, np.ndarray]:
    return {k: (rng.standard_normal(s) / np.sqrt(max(1, np.prod(s[1:]) if len(s) > 1 else 1))).astype(np.float32)
            for k, s in shapes.items()}
