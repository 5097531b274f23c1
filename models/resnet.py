"""CIFAR ResNets from PyTorch-style state dicts, with BatchNormalization kept or folded.

- ``resnet_paper``: the neuron-merging paper's ResNet-56 (pre-activation style ReLU at the
  start of each block, 1x1-conv downsample, ReLU + 8x8 average pool + fc head).
- ``resnet_akamaster``: ResNet-20/56 with option-A shortcuts (stride-2 Slice + zero Pad of
  the channel axis) and ReLU after the residual add.
"""

from __future__ import annotations

import numpy as np
import onnx

from .builder import GraphBuilder, fold_bn

INT_MAX = np.iinfo(np.int64).max


def _conv_bn(g: GraphBuilder, x: str, w: dict, conv: str, bn: str, stride: int, fold: bool) -> str:
    weight = w[f"{conv}.weight"]
    pad = weight.shape[2] // 2
    stats = [w[f"{bn}.{k}"] for k in ("weight", "bias", "running_mean", "running_var")]
    if fold:
        fw, fb = fold_bn(weight, w.get(f"{conv}.bias"), *stats)
        return g.conv(x, conv, fw, fb, strides=[stride, stride], pads=[pad] * 4)
    y = g.conv(x, conv, weight, w.get(f"{conv}.bias"), strides=[stride, stride], pads=[pad] * 4)
    return g.bn(y, bn, *stats)


def _blocks(w: dict) -> list[str]:
    names = sorted({k.rsplit(".", 2)[0] for k in w if k.startswith("layer") and ".conv1." in k},
                   key=lambda s: (int(s[5]), int(s.split(".")[1])))
    return names


def _input(g: GraphBuilder, batch) -> str:
    return g.input("input", [batch, 3, 32, 32])


def _head(g: GraphBuilder, x: str, w: dict, fc: str, batch) -> onnx.ModelProto:
    x = g.node("Flatten", [x], name="flatten", axis=1)
    g.gemm(x, fc, w[f"{fc}.weight"], w[f"{fc}.bias"])
    g.nodes[-1].output[0] = "logits"
    g.output("logits", [batch, w[f"{fc}.weight"].shape[0]])
    return g.build()


def resnet_paper(w: dict[str, np.ndarray], fold: bool = True, batch="batch") -> onnx.ModelProto:
    g = GraphBuilder("resnet56_paper")
    x = _conv_bn(g, _input(g, batch), w, "conv1", "bn1", 1, fold)
    for block in _blocks(w):
        x = g.relu(x, f"{block}.relu0")
        stride = 2 if f"{block}.downsample.0.weight" in w else 1
        y = g.relu(_conv_bn(g, x, w, f"{block}.conv1", f"{block}.bn1", stride, fold), f"{block}.relu1")
        y = _conv_bn(g, y, w, f"{block}.conv2", f"{block}.bn2", 1, fold)
        r = x
        if stride == 2:
            r = _conv_bn(g, x, w, f"{block}.downsample.0", f"{block}.downsample.1", 2, fold)
        x = g.node("Add", [y, r], name=f"{block}.add")
    x = g.relu(x, "relu_final")
    x = g.node("AveragePool", [x], name="avgpool", kernel_shape=[8, 8])
    return _head(g, x, w, "fc", batch)


def _option_a(g: GraphBuilder, x: str, block: str, planes: int) -> str:
    starts, ends = g.const(f"{block}.sc.starts", np.array([0, 0])), g.const(f"{block}.sc.ends", np.array([INT_MAX] * 2))
    axes, steps = g.const(f"{block}.sc.axes", np.array([2, 3])), g.const(f"{block}.sc.steps", np.array([2, 2]))
    x = g.node("Slice", [x, starts, ends, axes, steps], name=f"{block}.shortcut.slice")
    p = planes // 4
    pads = g.const(f"{block}.sc.pads", np.array([0, p, 0, 0, 0, p, 0, 0]))
    return g.node("Pad", [x, pads], name=f"{block}.shortcut.pad", mode="constant")


def resnet_akamaster(w: dict[str, np.ndarray], fold: bool = True, batch="batch") -> onnx.ModelProto:
    g = GraphBuilder("resnet_akamaster")
    x = g.relu(_conv_bn(g, _input(g, batch), w, "conv1", "bn1", 1, fold), "relu0")
    for block in _blocks(w):
        planes = w[f"{block}.conv1.weight"].shape[0]
        in_planes = w[f"{block}.conv1.weight"].shape[1]
        stride = 2 if planes != in_planes else 1
        y = g.relu(_conv_bn(g, x, w, f"{block}.conv1", f"{block}.bn1", stride, fold), f"{block}.relu1")
        y = _conv_bn(g, y, w, f"{block}.conv2", f"{block}.bn2", 1, fold)
        r = _option_a(g, x, block, planes) if stride == 2 else x
        x = g.relu(g.node("Add", [y, r], name=f"{block}.add"), f"{block}.relu2")
    x = g.node("GlobalAveragePool", [x], name="avgpool")
    return _head(g, x, w, "linear", batch)
