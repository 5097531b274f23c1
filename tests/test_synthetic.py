"""The made-up inputs a data-free refit and data-free cost curves run on (math.synthetic)."""

import numpy as np

from onnx_merge.math.synthetic import dead_leaves, image_like, natural_noise, synthetic_inputs


def _power(x: np.ndarray) -> np.ndarray:
    return np.abs(np.fft.fft2(x.astype(np.float64))).mean(axis=(0, 1)) ** 2


def test_dead_leaves_are_flat_patches_of_correlated_colour_with_unit_variance():
    x = dead_leaves((32, 3, 32, 32), np.random.default_rng(0))
    assert x.shape == (32, 3, 32, 32) and x.dtype == np.float32
    np.testing.assert_allclose(x.mean(axis=(0, 2, 3)), 0.0, atol=1e-5)
    np.testing.assert_allclose(x.std(axis=(0, 2, 3)), 1.0, rtol=1e-4)
    # occluding discs: most neighbouring pixels lie on the same leaf (noise has none equal)
    assert np.mean(x[:, :, 1:, :] == x[:, :, :-1, :]) > 0.4
    assert np.mean(natural_noise(x.shape, np.random.default_rng(0))[:, :, 1:] == 0) == 0
    # a leaf's channels share its grey level, as a photograph's colour channels move together
    assert np.corrcoef(x[:, 0].ravel(), x[:, 1].ravel())[0, 1] > 0.7
    power = _power(x)
    assert power[1, 1] > 20 * power[16, 16]  # scale-invariant sizes: most power at low frequencies


def test_dead_leaves_are_reproducible_and_differ_between_images():
    a, b = (dead_leaves((4, 1, 16, 24), np.random.default_rng(7)) for _ in range(2))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a[0], a[1])
    big = dead_leaves((2, 3, 224, 224), np.random.default_rng(0))  # leaves grow with the canvas
    assert np.mean(big[:, :, 1:] == big[:, :, :-1]) > 0.8


def test_synthetic_inputs_are_images_only_where_the_shape_is_an_image_batch():
    rng = np.random.default_rng(0)
    assert image_like((8, 3, 32, 32)) and not image_like((8, 784)) and not image_like((8, 3, 4, 32))
    assert np.mean(np.diff(synthetic_inputs((8, 3, 16, 16), rng), axis=-1) == 0) > 0.4
    flat = synthetic_inputs((64, 10), rng)  # not an image: white noise of unit variance
    np.testing.assert_allclose(flat.std(axis=0), 1.0, rtol=1e-4)
    assert abs(np.corrcoef(flat[:, 0], flat[:, 1])[0, 1]) < 0.5


def test_natural_noise_has_more_power_at_low_frequencies_and_unit_variance():
    x = natural_noise((16, 3, 32, 32), np.random.default_rng(0))
    assert x.dtype == np.float32
    np.testing.assert_allclose(x.std(axis=(0, 2, 3)), 1.0, rtol=1e-4)
    power = _power(x)
    assert power[1, 1] > 20 * power[16, 16]
