"""VGG-16 graphs with random weights (no checkpoint is shipped): CIFAR and ImageNet sizes."""

from __future__ import annotations

import numpy as np
import onnx

from .builder import GraphBuilder, fold_bn

CIFAR_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
IMAGENET_CFG = CIFAR_CFG + ["M"]


def _random_bn(rng, c: int):
    return (rng.uniform(0.5, 1.5, c), rng.normal(0, 0.1, c), rng.normal(0, 0.1, c), rng.uniform(0.5, 1.5, c))


def _he(rng, shape) -> np.ndarray:
    fan_in = int(np.prod(shape[1:]))
    return (rng.standard_normal(shape, dtype=np.float32) * np.float32(np.sqrt(2.0 / fan_in)))


def vgg16_cifar(seed: int = 0, fold: bool = True, batch="batch", classes: int = 10) -> onnx.ModelProto:
    """VGG-16 for 32x32 inputs: conv-BN-ReLU features, then Linear-BN-ReLU-Linear (as the paper's code)."""
    rng = np.random.default_rng(seed)
    g = GraphBuilder("vgg16_cifar")
    x, c = g.input("input", [batch, 3, 32, 32]), 3
    for i, v in enumerate(CIFAR_CFG):
        if v == "M":
            x = g.node("MaxPool", [x], name=f"pool{i}", kernel_shape=[2, 2], strides=[2, 2])
            continue
        w, stats = _he(rng, (v, c, 3, 3)), _random_bn(rng, v)
        if fold:
            x = g.conv(x, f"features.{i}", *fold_bn(w, None, *stats))
        else:
            x = g.bn(g.conv(x, f"features.{i}", w), f"features.{i}.bn", *stats)
        x, c = g.relu(x, f"features.{i}.relu"), v
    x = g.node("MaxPool", [x], name="pool_final", kernel_shape=[2, 2], strides=[2, 2])
    x = g.node("Flatten", [x], name="flatten", axis=1)
    w1, b1, stats = _he(rng, (512, 512)), np.zeros(512, np.float32), _random_bn(rng, 512)
    if fold:
        x = g.gemm(x, "classifier.0", *fold_bn(w1, b1, *stats))
    else:
        x = g.bn(g.gemm(x, "classifier.0", w1, b1), "classifier.1", *stats)
    x = g.relu(x, "classifier.relu")
    g.gemm(x, "classifier.3", _he(rng, (classes, 512)), np.zeros(classes, np.float32))
    g.nodes[-1].output[0] = "logits"
    g.output("logits", [batch, classes])
    return g.build()


def vgg16_imagenet(seed: int = 0, batch="batch") -> onnx.ModelProto:
    """torchvision-style VGG-16 (138 M parameters) with random weights, for speed benchmarks."""
    rng = np.random.default_rng(seed)
    g = GraphBuilder("vgg16_imagenet")
    x, c = g.input("input", [batch, 3, 224, 224]), 3
    for i, v in enumerate(IMAGENET_CFG):
        if v == "M":
            x = g.node("MaxPool", [x], name=f"pool{i}", kernel_shape=[2, 2], strides=[2, 2])
            continue
        x = g.relu(g.conv(x, f"features.{i}", _he(rng, (v, c, 3, 3)), np.zeros(v, np.float32)), f"features.{i}.relu")
        c = v
    x = g.node("Flatten", [x], name="flatten", axis=1)
    for j, (o, i) in enumerate(((4096, 25088), (4096, 4096))):
        x = g.gemm(x, f"classifier.{3 * j}", _he(rng, (o, i)), np.zeros(o, np.float32))
        x = g.node("Dropout", [g.relu(x, f"classifier.{3 * j + 1}")], name=f"classifier.{3 * j + 2}")
    g.gemm(x, "classifier.6", _he(rng, (1000, 4096)), np.zeros(1000, np.float32))
    g.nodes[-1].output[0] = "logits"
    g.output("logits", [batch, 1000])
    return g.build()
