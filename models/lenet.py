"""LeNet-300-100: 784 -> 300 -> ReLU -> 100 -> ReLU -> 10 (the neuron-merging paper's MLP)."""

from __future__ import annotations

import numpy as np
import onnx

from .builder import GraphBuilder


def lenet_300_100(weights: dict[str, np.ndarray], batch: int | str = "batch") -> onnx.ModelProto:
    """Keys ip1/ip2/ip3 .weight (out, in) and .bias, as in the paper's checkpoint."""
    g = GraphBuilder("lenet_300_100")
    x = g.input("input", [batch, 784])
    h = g.relu(g.gemm(x, "ip1", weights["ip1.weight"], weights["ip1.bias"]), "relu1")
    h = g.relu(g.gemm(h, "ip2", weights["ip2.weight"], weights["ip2.bias"]), "relu2")
    g.gemm(h, "ip3", weights["ip3.weight"], weights["ip3.bias"])
    g.nodes[-1].output[0] = "logits"
    g.output("logits", [batch, 10])
    return g.build()


def random_lenet_weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for name, (o, i) in {"ip1": (300, 784), "ip2": (100, 300), "ip3": (10, 100)}.items():
        out[f"{name}.weight"] = (rng.standard_normal((o, i)) / np.sqrt(i)).astype(np.float32)
        out[f"{name}.bias"] = (0.1 * rng.standard_normal(o)).astype(np.float32)
    return out
