"""ResNets exported by torch.onnx.export (legacy and dynamo): only each block's inner conv shrinks."""

import numpy as np
import onnx
import pytest

from onnx_merge.cli import main
from tests.helpers import initializer_shapes

torch = pytest.importorskip("torch", reason="torch not installed (make test installs torch==2.13.0)")
nn = torch.nn


class Block(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.down = None
        if stride != 1 or c_in != c_out:
            self.down = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (x if self.down is None else self.down(x)))


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.blocks = nn.Sequential(Block(8, 8, 1), Block(8, 16, 2), Block(16, 16, 1))
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _randomize_bn(model):
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
def test_exported_resnet_compresses_inner_convs_only(tmp_path, dynamo):
    torch.manual_seed(0)
    model = TinyResNet().eval()
    _randomize_bn(model)
    x = torch.randn(2, 3, 16, 16)
    path = tmp_path / "resnet.onnx"
    if dynamo:
        pytest.importorskip("onnxscript", reason="the dynamo exporter needs onnxscript")
        program = torch.onnx.export(model, (x,), dynamo=True)
        program.save(str(path), external_data=True)
    else:
        torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}})
    before = initializer_shapes(onnx.load(path))
    out = tmp_path / "small.onnx"
    assert main(["compress", str(path), "-o", str(out), "--ratio", "0.5", "--round-to", "1"]) == 0
    source_external = any(t.data_location == onnx.TensorProto.EXTERNAL
                          for t in onnx.load(path, load_external_data=False).graph.initializer)
    assert (tmp_path / "small.onnx.data").is_file() == source_external
    small = onnx.load(out)
    after = initializer_shapes(small)
    convs = [n for n in small.graph.node if n.op_type == "Conv"]
    out_channels = {n.name: after[n.input[1]][0] for n in convs}
    # 3 inner convs halve (8->4, 16->8, 16->8); stem, conv2s and shortcut keep their widths.
    orig_convs = [n for n in onnx.load(path).graph.node if n.op_type == "Conv"]
    orig_channels = sorted(before[n.input[1]][0] for n in orig_convs)
    new_channels = sorted(out_channels.values())
    assert sum(orig_channels) - sum(new_channels) == 4 + 8 + 8
    assert sum(int(np.prod(d)) for d in after.values()) < sum(int(np.prod(d)) for d in before.values())
    feeds = {small.graph.input[0].name: np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)}
    import onnxruntime as ort

    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert got.shape == (2, 10) and np.isfinite(got).all()
    assert main(["verify", str(path), str(out), "--min-cosine", "0.5"]) == 0
    coupled = tmp_path / "coupled.onnx"
    assert main(["compress", str(path), "-o", str(coupled), "--ratio", "0.5", "--coupled", "prune", "--round-to", "1"]) == 0
    dims = initializer_shapes(onnx.load(coupled))
    widths = sorted(dims[n.input[1]][0] for n in onnx.load(coupled).graph.node if n.op_type == "Conv")
    assert widths == sorted(c // 2 for c in orig_channels)  # every conv halves: residual groups too


class PlainNet(nn.Module):
    """Conv-BN-ReLU twice, then a head read through ``x.mean((2, 3))`` or ``x.view(x.size(0), -1)``."""

    def __init__(self, head: str):
        super().__init__()
        self.head = head
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2))
        self.fc1 = nn.Linear(16 if head == "mean" else 16 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        x = self.features(x)
        x = x.mean((2, 3)) if self.head == "mean" else x.view(x.size(0), -1)
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.mark.parametrize("head", ["mean", "view"])
@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
def test_exported_heads_and_shape_annotations(tmp_path, head, dynamo):
    """Every chain of a plain net is compressed whatever the exporter wrote for the head (a spatial
    ReduceMean; a Reshape whose shape is computed from Shape(x)), and the dynamo exporter's
    value_info entries for initializers follow the new shapes."""
    torch.manual_seed(0)
    model = PlainNet(head).eval()
    _randomize_bn(model)
    x = torch.randn(2, 3, 8, 8)
    path = tmp_path / "plain.onnx"
    if dynamo:
        pytest.importorskip("onnxscript", reason="the dynamo exporter needs onnxscript")
        torch.onnx.export(model, (x,), dynamo=True).save(str(path))
    else:
        torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}})
    out, report_path = tmp_path / "small.onnx", tmp_path / "report.json"
    assert main(["compress", str(path), "-o", str(out), "--ratio", "0.5", "--round-to", "1", "--report", str(report_path)]) == 0
    import json

    layers = json.loads(report_path.read_text())["details"]["layers"]
    assert [(entry["channels"], entry["kept"]) for entry in layers] == [(8, 4), (16, 8), (32, 16)]
    small = onnx.load(out)
    onnx.checker.check_model(small, full_check=True)
    import onnxruntime as ort

    batch = 2 if dynamo else 3  # the legacy export has a dynamic batch: the Flatten keeps it
    feeds = {small.graph.input[0].name: np.random.default_rng(0).standard_normal((batch, 3, 8, 8)).astype(np.float32)}
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert got.shape == (batch, 10) and np.isfinite(got).all()
