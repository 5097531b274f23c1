"""Write the reference models as .onnx files (paper weights from ../shared where present).

    python benchmarks/export_models.py OUTDIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx

from onnx_merge.models.lenet import lenet_300_100, random_lenet_weights
from onnx_merge.models.resnet import resnet_akamaster, resnet_paper
from onnx_merge.models.vgg import vgg16_cifar

WEIGHTS = Path(__file__).resolve().parents[2] / "shared" / "weights"


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    lenet = WEIGHTS / "lenet_300_100_fashionmnist.npz"
    weights = dict(np.load(lenet)) if lenet.is_file() else random_lenet_weights()
    onnx.save(lenet_300_100(weights), out / "lenet_300_100.onnx")
    print(f"wrote {out / 'lenet_300_100.onnx'} ({'paper checkpoint' if lenet.is_file() else 'random weights'})")
    sources = {"resnet56_paper": (resnet_paper, "resnet56_cifar10.npz"),
               "resnet20_akamaster": (resnet_akamaster, "resnet20_cifar10_akamaster.npz"),
               "resnet56_akamaster": (resnet_akamaster, "resnet56_cifar10_akamaster.npz")}
    for name, (builder, file) in sources.items():
        if (WEIGHTS / file).is_file():
            w = dict(np.load(WEIGHTS / file))
            for fold, suffix in ((True, "folded"), (False, "bn")):
                onnx.save(builder(w, fold=fold), out / f"{name}_{suffix}.onnx")
            print(f"wrote {name}_folded.onnx and {name}_bn.onnx")
    onnx.save(vgg16_cifar(fold=False), out / "vgg16_cifar_bn.onnx")
    print("wrote vgg16_cifar_bn.onnx (random weights)")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "out"))
