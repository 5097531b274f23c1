from pathlib import Path

import numpy as np
import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
FASHION = Path("/usr/share/datasets/fashion-mnist")


def shared_file(*parts: str) -> Path:
    """A file of ../shared (weights, data), or a skip that says it is missing."""
    path = SHARED.joinpath(*parts)
    if not path.is_file():
        pytest.skip(f"{path} not found: the shared folder must sit beside the checkout")
    return path


@pytest.fixture(autouse=True)
def avx512_channel_block(monkeypatch):
    """--round-to auto aligns conv counts to the CPU kernels' block, which the machine decides (16
    with AVX-512, 8 with AVX2). The tests' expected counts were written for 16: pinned, they do
    not depend on the machine that runs them (CLI subprocesses read the same variable)."""
    from onnx_merge.runtime import CPU_BLOCK_VARIABLE

    monkeypatch.setenv(CPU_BLOCK_VARIABLE, "16")


@pytest.fixture(scope="session")
def lenet_weights():
    return dict(np.load(shared_file("weights", "lenet_300_100_fashionmnist.npz")))


@pytest.fixture(scope="session")
def paper_weights():
    return dict(np.load(shared_file("weights", "resnet56_cifar10.npz")))


@pytest.fixture(scope="session")
def resnet20_weights():
    return dict(np.load(shared_file("weights", "resnet20_cifar10_akamaster.npz")))


@pytest.fixture(scope="session")
def fashion_test():
    if not (FASHION / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("FashionMNIST not installed: apt-get install dataset-fashion-mnist (make test does this)")
    from onnx_merge.data import load_idx_dir

    return load_idx_dir(FASHION)


@pytest.fixture(scope="session")
def cifar():
    return dict(np.load(shared_file("data", "cifar10_test.npz")))
