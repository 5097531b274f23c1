"""Transformers at --ratio 0.3 with the defaults: parameters and MACs removed against issue #18's
targets, --ratio 0 equal outputs, and --heads 0.25 on the attention layers.

    python benchmarks/transformers.py [--only NAME ...] [--cache DIR]

Random weights (nothing is downloaded). Exports are cached under ~/.cache/onnx-merge/transformers
(outside git); delete it to re-export. Models: a Linear(256,512)-GELU-Linear(512,512)-GELU-
Linear(512,10) MLP, timm vit_tiny_patch16_224, HF ViT (hidden 192, 2 layers), HF BERT (hidden
128, 2 layers, both exporters), HF GPT-2 (n_embd 128, 2 layers), HF ALBERT (3 layers sharing one's weights) and T5's
encoder (hidden 128, 2 layers), torchvision Swin-T and ConvNeXt-T. MACs are onnx-merge's count for batch 1 (Conv, Gemm, MatMul, the MatMuls between
activations included).
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

# run as a script, this file's folder comes first on sys.path and its name would hide the
# transformers package
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np
import onnx
from tabulate import tabulate

from onnx_merge import compress
from onnx_merge.runtime import make_session, random_inputs

# (params %, MACs %) removed at --ratio 0.3 that issue #18 asks for; None: no target
TARGETS = {"gelu-mlp": (35, 35), "vit_tiny": (14, 14), "hf-vit": (10, 12), "bert-legacy": (None, 14),
           "bert-dynamo": (None, 14), "gpt2": (None, 12), "swin_t": (14, 12), "convnext_t": (20, 20),
           "albert": (None, None), "t5-encoder": (None, None)}


@functools.cache
def _torch():
    import torch

    lib = torch.library.Library("torchvision", "DEF")  # the CPU wheel lacks torchvision's compiled ops
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _torch.keep = lib
    return torch


class First:
    """A module's first output, called with keyword inputs."""

    def __new__(cls, model, names):
        torch = _torch()

        class Wrapped(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model = model

            def forward(self, *args):
                out = self.model(**dict(zip(names, args)))
                return out if isinstance(out, torch.Tensor) else out[0]

        return Wrapped().eval()


def build(name: str):
    """(module, example args, input names, dynamo)."""
    torch = _torch()
    torch.manual_seed(0)
    nn = torch.nn
    image = (torch.randn(1, 3, 224, 224),)
    if name == "gelu-mlp":
        m = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 512), nn.GELU(), nn.Linear(512, 10))
        return m.eval(), (torch.randn(2, 256),), ["x"], False
    if name == "vit_tiny":
        import timm

        return timm.create_model("vit_tiny_patch16_224", pretrained=False).eval(), image, ["x"], False
    if name in ("swin_t", "convnext_t"):
        import torchvision

        ctor = {"swin_t": torchvision.models.swin_t, "convnext_t": torchvision.models.convnext_tiny}[name]
        return ctor(weights=None).eval(), image, ["x"], False
    import transformers

    if name == "hf-vit":
        cfg = transformers.ViTConfig(hidden_size=192, num_hidden_layers=2, num_attention_heads=3, intermediate_size=768)
        return First(transformers.ViTModel(cfg), ["pixel_values"]), image, ["pixel_values"], False
    ids = (torch.randint(0, 1000, (2, 16)), torch.ones(2, 16, dtype=torch.long))
    names = ["input_ids", "attention_mask"]
    if name.startswith("bert"):
        cfg = transformers.BertConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=512, vocab_size=1000)
        return First(transformers.BertModel(cfg), names), ids, names, name.endswith("dynamo")
    if name == "albert":  # one encoder layer's weights read by every layer
        cfg = transformers.AlbertConfig(hidden_size=128, num_hidden_layers=3, num_attention_heads=2,
                                        intermediate_size=512, embedding_size=64, vocab_size=1000)
        return First(transformers.AlbertModel(cfg), names), ids, names, False
    if name == "t5-encoder":  # relative position bias shared by every layer's attention
        cfg = transformers.T5Config(d_model=128, d_kv=64, d_ff=512, num_layers=2, num_heads=2, vocab_size=1000)
        return First(transformers.T5EncoderModel(cfg), names), ids, names, False
    cfg = transformers.GPT2Config(n_embd=128, n_layer=2, n_head=2, vocab_size=1000, n_positions=64, use_cache=False)
    return First(transformers.GPT2Model(cfg), names), ids, names, False  # TorchScript needs the mask passed


def exported(name: str, cache: Path) -> Path:
    path = cache / f"{name}.onnx"
    if path.is_file():
        return path
    torch = _torch()
    model, args, names, dynamo = build(name)
    cache.mkdir(parents=True, exist_ok=True)
    if dynamo:
        torch.onnx.export(model, args, dynamo=True, input_names=names).save(str(path))
    else:
        torch.onnx.export(model, args, str(path), dynamo=False, input_names=names, output_names=["out"],
                          dynamic_axes={n: {0: "batch"} for n in names})
    return path


def max_difference(a: onnx.ModelProto, b: onnx.ModelProto) -> float:
    sa, sb = make_session(a.SerializeToString()), make_session(b.SerializeToString())
    feeds = random_inputs(sa, batch=2)
    for key in feeds:  # token ids inside the vocabulary, masks all ones
        if key == "attention_mask":
            feeds[key] = np.ones_like(feeds[key])
    return max(float(np.abs(x - y).max()) for x, y in zip(sa.run(None, feeds), sb.run(None, feeds)))


def removed(rep: dict, key: str) -> float:
    before, after = rep[f"{key}_before"], rep[f"{key}_after"]
    return 100.0 * (before - after) / before if before and after is not None else float("nan")


def measure(name: str, cache: Path) -> list:
    model = onnx.load(exported(name, cache))
    start = time.perf_counter()
    _, rep = compress(model, ratio=0.3)
    seconds = time.perf_counter() - start
    same, _ = compress(model, ratio=0.0)
    _, heads = compress(model, ratio=0.0, heads=0.25)
    want_p, want_m = TARGETS[name]
    p, m = removed(rep, "params"), removed(rep, "macs")
    ok = (want_p is None or p >= want_p) and (want_m is None or m >= want_m)
    head_counts = sorted({f"{h['heads']}->{h['kept']}" for h in heads.get("heads", [])})
    return [name, f"{p:.1f}", want_p if want_p is not None else "-", f"{m:.1f}", want_m, "yes" if ok else "NO",
            f"{max_difference(model, same):.2g}", f"{len(heads.get('heads', []))} ({', '.join(head_counts) or '-'})",
            f"{removed(heads, 'params'):.1f}", f"{seconds:.1f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=list(TARGETS), help="measure these models only")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "onnx-merge" / "transformers")
    args = parser.parse_args()
    rows = []
    for name in args.only or TARGETS:
        try:
            rows.append(measure(name, args.cache))
        except Exception as exc:  # an export this torch cannot do is a row, not the end of the table
            rows.append([name] + ["-"] * 8 + [f"failed: {type(exc).__name__}: {str(exc)[:80]}"])
        print(tabulate(rows[-1:], tablefmt="plain"), flush=True)
    print()
    print(tabulate(rows, headers=["model", "params -%", "target", "MACs -%", "target", "meets", "r=0 max diff",
                                  "heads 0.25: layers", "params -%", "compress s"]))


if __name__ == "__main__":
    main()
