"""HF BERT, ViT, GPT-2 and timm's ViT exported by both torch exporters (random weights): heads go
with --heads, and the result equals the original with those heads' V columns zeroed."""

import copy

import numpy as np
import onnx
import pytest

from onnx_merge import compress
from onnx_merge.api import canonicalize
from onnx_merge.attention import find_attention
from onnx_merge.graph import GraphIndex
from onnx_merge.manager import Context
from onnx_merge.runtime import make_session

torch = pytest.importorskip("torch", reason="torch not installed (make test installs torch==2.13.0)")
# transformers imports torchvision, whose compiled ops this CPU wheel lacks: declare them first
try:
    _lib = torch.library.Library("torchvision", "DEF")
    _lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
except RuntimeError:  # another test module declared them already
    pass
transformers = pytest.importorskip("transformers", reason="transformers not installed")


class Wrapped(torch.nn.Module):
    """The first output of a model called with keyword inputs."""

    def __init__(self, model, names):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *args):
        out = self.model(**dict(zip(self.names, args)))
        return out if isinstance(out, torch.Tensor) else out[0]


def build(name: str):
    torch.manual_seed(0)
    if name == "bert":
        cfg = transformers.BertConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=512, vocab_size=1000)
        model, names = transformers.BertModel(cfg), ["input_ids", "attention_mask"]
        args = (torch.randint(0, 1000, (2, 8)), torch.ones(2, 8, dtype=torch.long))
    elif name == "vit":
        cfg = transformers.ViTConfig(hidden_size=192, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=768, image_size=32, patch_size=8)
        model, names, args = transformers.ViTModel(cfg), ["pixel_values"], (torch.randn(2, 3, 32, 32),)
    elif name == "gpt2":  # transformers 5 exports GPT-2 with TorchScript only when a mask is passed
        cfg = transformers.GPT2Config(n_embd=128, n_layer=2, n_head=4, vocab_size=1000, n_positions=64,
                                      use_cache=False)
        model, names = transformers.GPT2Model(cfg), ["input_ids", "attention_mask"]
        args = (torch.randint(0, 1000, (2, 8)), torch.ones(2, 8, dtype=torch.long))
    else:
        timm = pytest.importorskip("timm")
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2)
        names, args = ["x"], (torch.randn(2, 3, 32, 32),)
    # random biases, so that the value bias folded into the output projection is exercised
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.normal_(0, 0.1)
    return Wrapped(model.eval(), names).eval(), args, names


def export(name: str, dynamo: bool, path) -> onnx.ModelProto:
    model, args, names = build(name)
    if dynamo:
        pytest.importorskip("onnxscript", reason="the dynamo exporter needs onnxscript")
        torch.onnx.export(model, args, dynamo=True, input_names=names).save(str(path))
    else:
        torch.onnx.export(model, args, str(path), dynamo=False, input_names=names, output_names=["out"],
                          dynamic_axes={n: {0: "batch"} for n in names})
    return onnx.load(path)


def zeroed_values(model: onnx.ModelProto, rows: list[dict]) -> onnx.ModelProto:
    """``model`` (canonicalized) with the removed heads' V weight columns zeroed."""
    model = copy.deepcopy(model)
    canonicalize().run(model, Context(options=None))
    index = GraphIndex(model)
    found = {a.name: a for a in find_attention(index)[0]}
    for row in rows:
        att = found[row["layer"]]
        w = index.array(att.v.weight).copy()
        for h in row["removed"]:
            np.moveaxis(w, att.v.out_axis, 0)[att.heads[h].v] = 0
        index.set_array(att.v.weight, w)
    return model


def feeds_for(names, batch=3):
    rng = np.random.default_rng(1)
    if names == ["pixel_values"] or names == ["x"]:
        return {names[0]: rng.standard_normal((batch, 3, 32, 32)).astype(np.float32)}
    return {"input_ids": rng.integers(0, 1000, (batch, 8)), "attention_mask": np.ones((batch, 8), np.int64)}


def check_heads(name, dynamo, tmp_path):
    model = export(name, dynamo, tmp_path / f"{name}.onnx")
    small, rep = compress(model, ratio=0.0, heads=0.25)
    assert len(rep["heads"]) == 2 and all(r["kept"] == 3 * r["heads"] // 4 for r in rep["heads"])
    oracle = zeroed_values(model, rep["heads"])
    names = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    feeds = feeds_for(names, batch=2 if dynamo else 3)
    got = make_session(small.SerializeToString()).run(None, feeds)[0]
    want = make_session(oracle.SerializeToString()).run(None, feeds)[0]
    before = make_session(model.SerializeToString()).run(None, feeds)[0]
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)
    assert np.abs(got - before).max() > 1e-3
    assert rep["params_after"] < rep["params_before"]


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
@pytest.mark.parametrize("name", ["bert", "vit"])
def test_a_quarter_of_the_heads_go(name, dynamo, tmp_path):
    check_heads(name, dynamo, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
@pytest.mark.parametrize("name", ["gpt2", "timm"])
def test_a_quarter_of_the_heads_go_in_fused_qkv(name, dynamo, tmp_path):
    check_heads(name, dynamo, tmp_path)
