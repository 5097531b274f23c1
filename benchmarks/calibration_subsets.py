"""How much calibrated LeNet-300-100 depends on which 512 images calibrate it.

    python benchmarks/calibration_subsets.py [--subsets 6]     (about 11 minutes on 2 cores)

Compresses with the default calibrated settings on disjoint 512-image slices of the FashionMNIST
*training* set (images 0-511, 512-1023, ...) and prints test accuracy per slice, the mean and the
sample standard deviation: the spread a single calibration set's figure carries.
"""

from __future__ import annotations

import argparse

import numpy as np
from tabulate import tabulate

from onnx_merge import CompressOptions, compress
from reproduce import FASHION, SHARED, acc, load_idx_dir, lenet_300_100

RATIOS = (0.5, 0.6, 0.7, 0.8)
SIZE = 512


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subsets", type=int, default=6, help="disjoint 512-image calibration sets (default 6)")
    args = parser.parse_args()
    test = load_idx_dir("/usr/share/datasets/fashion-mnist")
    train = load_idx_dir("/usr/share/datasets/fashion-mnist", "train")
    lenet = lenet_300_100(dict(np.load(SHARED / "weights" / "lenet_300_100_fashionmnist.npz")))
    rows = []
    for i in range(args.subsets):
        calib = {"input": FASHION(train["x"][i * SIZE:(i + 1) * SIZE], 2)}
        rows.append([acc(compress(lenet, CompressOptions(ratio=r, calibration=calib))[0], test["x"], test["y"], FASHION)
                     for r in RATIOS])
        print(f"images {i * SIZE}-{(i + 1) * SIZE - 1}: {rows[-1]}", flush=True)
    table = np.array(rows)
    body = [[f"{i * SIZE}-{(i + 1) * SIZE - 1}"] + row for i, row in enumerate(rows)]
    body += [["mean"] + table.mean(0).round(2).tolist(), ["std"] + table.std(0, ddof=1).round(2).tolist()]
    print(tabulate(body, headers=["calibration images"] + [f"r={r}" for r in RATIOS], tablefmt="github"))


if __name__ == "__main__":
    main()
