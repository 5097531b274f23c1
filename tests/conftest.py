from pathlib import Path

import numpy as np
import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="session")
def lenet_weights():
    path = SHARED / "weights" / "lenet_300_100_fashionmnist.npz"
    if not path.is_file():
        pytest.skip(f"{path} not found: the shared weights folder must sit beside the checkout")
    return dict(np.load(path))


@pytest.fixture(scope="session")
def fashion_test():
    if not (FASHION / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("FashionMNIST not installed: apt-get install dataset-fashion-mnist (make test does this)")
    from onnx_merge.data import load_idx_dir

    return load_idx_dir(FASHION)


@pytest.fixture(scope="session")
def cifar():
    path = SHARED / "data" / "cifar10_test.npz"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return dict(np.load(path))
