"""Train the two small FashionMNIST reference models and export them to ONNX.

    python benchmarks/fashion_models.py OUTDIR [--epochs-cnn 8] [--epochs-vit 12] [--train-limit N]

- ``mobilenet_fashion.onnx``: a MobileNet-style CNN: a stride-2 stem conv, inverted residual blocks
  (1x1 expand -> BN -> act -> 3x3 depthwise -> BN -> act -> squeeze-excitation with a
  HardSigmoid gate -> 1x1 project -> BN, a residual add where shapes allow), HardSwish in the
  first blocks and SiLU in the later ones (as MobileNetV3 / EfficientNet do), a 1x1 head conv,
  global average pool and a Linear classifier. BN is folded into the convs at export.
- ``vit_fashion.onnx``: a ViT: 7x7 patch embedding (a strided conv), a class token, learned
  position embeddings, pre-norm encoder layers (LayerNorm -> multi-head attention -> residual,
  LayerNorm -> Linear -> GELU -> Linear -> residual), a final LayerNorm and a Linear head.

Both take ``x`` of shape (N, 1, 28, 28), float32, preprocessed as x / 255, then (x - 0.5) / 0.5,
and give logits (N, 10). Training is seeded and uses the training split only; the test accuracy
printed at the end is on the 10,000 test images. Exports use the TorchScript exporter, opset 17
(GELU is written as its erf form, SiLU as x * Sigmoid(x), HardSwish and HardSigmoid as ops).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from onnx_merge.data import read_idx

FASHION = Path("/usr/share/datasets/fashion-mnist")


def load_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    x = read_idx(FASHION / f"{split}-images-idx3-ubyte.gz").astype(np.float32)
    y = read_idx(FASHION / f"{split}-labels-idx1-ubyte.gz").astype(np.int64)
    return ((x / 255.0 - 0.5) / 0.5)[:, None], y


def build_mobilenet(width: float = 1.0):
    import torch.nn as nn

    class SqueezeExcite(nn.Module):
        def __init__(self, channels: int, hidden: int):
            super().__init__()
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.reduce = nn.Conv2d(channels, hidden, 1)
            self.act = nn.ReLU()
            self.expand = nn.Conv2d(hidden, channels, 1)
            self.gate = nn.Hardsigmoid()

        def forward(self, x):
            return x * self.gate(self.expand(self.act(self.reduce(self.pool(x)))))

    class InvertedResidual(nn.Module):
        def __init__(self, cin: int, cout: int, expand: int, stride: int, act, se: bool):
            super().__init__()
            hidden = cin * expand
            layers = [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), act(),
                      nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), act()]
            if se:
                layers.append(SqueezeExcite(hidden, max(8, hidden // 4)))
            layers += [nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
            self.body = nn.Sequential(*layers)
            self.residual = stride == 1 and cin == cout

        def forward(self, x):
            y = self.body(x)
            return x + y if self.residual else y

    hs, silu = nn.Hardswish, nn.SiLU
    a, b, c = (int(round(k * width / 4)) * 4 for k in (16, 24, 40))
    return nn.Sequential(
        nn.Conv2d(1, a, 3, 2, 1, bias=False), nn.BatchNorm2d(a), hs(),  # 14 x 14
        InvertedResidual(a, a, 3, 1, hs, se=False),
        InvertedResidual(a, b, 4, 2, hs, se=True),   # 7 x 7
        InvertedResidual(b, b, 3, 1, hs, se=True),
        InvertedResidual(b, c, 4, 1, silu, se=True),
        InvertedResidual(c, c, 3, 1, silu, se=True),
        nn.Conv2d(c, 128, 1, bias=False), nn.BatchNorm2d(128), silu(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.1), nn.Linear(128, 10))


def build_vit(dim: int = 64, depth: int = 3, heads: int = 4, mlp: int = 128, patch: int = 7):
    import torch
    import torch.nn as nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm1 = nn.LayerNorm(dim)
            self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
            self.norm2 = nn.LayerNorm(dim)
            self.fc1 = nn.Linear(dim, mlp)
            self.act = nn.GELU()
            self.fc2 = nn.Linear(mlp, dim)

        def forward(self, x):
            h = self.norm1(x)
            x = x + self.attn(h, h, h, need_weights=False)[0]
            return x + self.fc2(self.act(self.fc1(self.norm2(x))))

    class ViT(nn.Module):
        def __init__(self):
            super().__init__()
            tokens = (28 // patch) ** 2
            self.embed = nn.Conv2d(1, dim, patch, patch)
            self.cls = nn.Parameter(torch.zeros(1, 1, dim))
            self.pos = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
            self.blocks = nn.Sequential(*[Block() for _ in range(depth)])
            self.norm = nn.LayerNorm(dim)
            self.head = nn.Linear(dim, 10)

        def forward(self, x):
            x = self.embed(x).flatten(2).transpose(1, 2)
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
            x = self.norm(self.blocks(x))
            return self.head(x[:, 0])

    return ViT()


def train(model, x, y, epochs: int, lr: float, seed: int, batch: int = 256):
    import torch

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * (len(x) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.05)
    for epoch in range(epochs):
        model.train()
        order = rng.permutation(len(x))
        start, total = time.time(), 0.0
        for i in range(len(x) // batch):
            idx = order[i * batch:(i + 1) * batch]
            xb, yb = torch.from_numpy(x[idx]), torch.from_numpy(y[idx])
            if epoch < epochs - 1:  # a random shift of up to 2 pixels (padding 2, crop 28)
                dx, dy = rng.integers(-2, 3, size=2)
                xb = torch.roll(xb, shifts=(int(dy), int(dx)), dims=(2, 3))
            loss = loss_fn(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss)
        print(f"  epoch {epoch + 1}/{epochs}: loss {total / (len(x) // batch):.4f} ({time.time() - start:.0f} s)",
              flush=True)
    return model.eval()


def accuracy(model, x, y) -> float:
    import torch

    with torch.no_grad():
        pred = np.concatenate([model(torch.from_numpy(x[i:i + 1000])).argmax(1).numpy() for i in range(0, len(x), 1000)])
    return float((pred == y).mean() * 100)


def export(model, path: Path) -> None:
    import torch

    torch.onnx.export(model, torch.zeros(1, 1, 28, 28), str(path), input_names=["x"], output_names=["logits"],
                      dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False)


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--epochs-cnn", type=int, default=8)
    parser.add_argument("--epochs-vit", type=int, default=12)
    parser.add_argument("--only", choices=("mobilenet", "vit"))
    parser.add_argument("--train-limit", type=int, default=60000, help="train on the first N training images")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--seed", type=int, default=0, help="initialisation and batch order")
    parser.add_argument("--width", type=float, default=1.0, help="MobileNet channel multiplier (held-out variants)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    x, y = load_split("train")
    x, y = x[:args.train_limit], y[:args.train_limit]
    xt, yt = load_split("t10k")
    summary = {}
    for name, build, epochs, lr in (("mobilenet", lambda: build_mobilenet(args.width), args.epochs_cnn, 4e-3),
                                    ("vit", build_vit, args.epochs_vit, 2e-3)):
        if args.only and name != args.only:
            continue
        torch.manual_seed(args.seed)
        print(f"training {name} for {epochs} epochs", flush=True)
        model = train(build(), x, y, epochs, lr, seed=args.seed)
        acc = accuracy(model, xt, yt)
        path = args.out / f"{name}_fashion.onnx"
        export(model, path)
        summary[name] = {"file": path.name, "test_accuracy": acc, "epochs": epochs, "train_images": len(x),
                         "parameters": int(sum(p.numel() for p in model.parameters()))}
        print(f"{name}: test accuracy {acc:.2f} %, wrote {path}", flush=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
