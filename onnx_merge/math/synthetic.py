"""Inputs made up when there is no data: what a data-free refit and the data-free cost curves
run the model on. No ONNX here.

A network trained on photographs responds to the statistics of photographs: flat regions, sharp
occluding edges, colours whose channels move together, a 1/f amplitude spectrum. The dead-leaves
model (Lee, Mumford and Huang 2001; as pre-training data, Baradad et al., NeurIPS 2021) has all
four: discs of power-law radii and random colours painted over each other. Gaussian 1/f noise has
only the spectrum, and deep layers of a CIFAR ResNet fed it see activations unlike those of
images: at half its MACs (--target-macs 0.5), a BN-folded akamaster ResNet-56 refitted on 256
dead-leaves images keeps 79 % top-1 (BENCHMARKS.md); on 256 such noise inputs it kept 61 % in the
run that chose dead leaves over noise (not repeated since).
"""

from __future__ import annotations

import numpy as np

# fewest leaves drawn, as a multiple of the discs' expected total area over the canvas, so that
# the background shows through at about e^-COVER of the pixels
COVER = 6.0
COLOUR_SPREAD = 0.15  # how far a leaf's channels stray from its grey level (photographs' channels correlate)


def image_like(shape: tuple[int, ...]) -> bool:
    """Whether ``shape`` (samples first) is a batch of images: (N, C, H, W), both H and W >= 8."""
    return len(shape) == 4 and min(shape[-2:]) >= 8


def synthetic_inputs(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Dead-leaves images where ``shape`` is image-like, natural-image noise otherwise; zero mean and
    unit variance per channel (axis 1), as a model trained on normalised inputs takes them."""
    return dead_leaves(shape, rng) if image_like(shape) else natural_noise(shape, rng)


def dead_leaves(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """(N, C, H, W) dead-leaves images: discs with radii of density r^-3 (scale invariant, as in
    photographs) from about one pixel to half the image, each a grey level drawn uniformly with
    every channel jittered by COLOUR_SPREAD, painted back to front until the canvas is covered
    about COVER times; then standardised per channel."""
    n, c, h, w = shape
    r_max = max(h, w) / 2.0
    # the smallest leaves grow with the image so that an ImageNet-size canvas needs as many as a CIFAR one
    r_min = max(1.0, min(h, w) / 64.0)
    mean_area = np.pi * 2.0 * np.log(r_max / r_min) / (r_min ** -2 - r_max ** -2)  # E[pi r^2] under r^-3
    leaves = int(np.ceil(COVER * h * w / mean_area))
    images = np.empty(shape, np.float32)
    for i in range(n):
        u = rng.uniform(size=leaves)
        radii = 1.0 / np.sqrt(u / r_max ** 2 + (1.0 - u) / r_min ** 2)  # inverse CDF of r^-3 on [r_min, r_max]
        cy, cx = rng.uniform(-radii, h + radii), rng.uniform(-radii, w + radii)
        colours = np.clip(rng.uniform(size=(leaves, 1)) + COLOUR_SPREAD * rng.standard_normal((leaves, c)), 0, 1)
        image = np.broadcast_to(rng.uniform(size=(c, 1, 1)), (c, h, w)).copy()
        for r, y, x, colour in zip(radii, cy, cx, colours):
            y0, y1 = max(0, int(y - r)), min(h, int(y + r) + 1)
            x0, x1 = max(0, int(x - r)), min(w, int(x + r) + 1)
            if y0 >= y1 or x0 >= x1:
                continue
            yy, xx = np.ogrid[y0:y1, x0:x1]
            disc = (yy - y) ** 2 + (xx - x) ** 2 <= r * r
            image[:, y0:y1, x0:x1][:, disc] = colour[:, None]
        images[i] = image
    return _standardise(images)


def natural_noise(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Standard normal samples (samples first) whose last two axes, where both are at least 8
    long, have the 1/f amplitude spectrum of natural images instead of a flat one; each
    channel (axis 1) scaled to unit variance. For inputs that are not images (features, a
    flattened image whose layout is unknown), where no better model of the data exists."""
    x = rng.standard_normal(shape)
    if len(shape) >= 3 and min(shape[-2:]) >= 8:
        fy, fx = np.fft.fftfreq(shape[-2])[:, None], np.fft.fftfreq(shape[-1])[None, :]
        f = np.sqrt(fy ** 2 + fx ** 2)
        f[0, 0] = 1.0 / max(shape[-2:])
        x = np.real(np.fft.ifft2(np.fft.fft2(x) / f))
    return _standardise(x)


def _standardise(x: np.ndarray) -> np.ndarray:
    if x.ndim >= 2:
        axes = tuple(a for a in range(x.ndim) if a != 1)
        x = (x - x.mean(axis=axes, keepdims=True)) / np.maximum(x.std(axis=axes, keepdims=True), 1e-12)
    return x.astype(np.float32)
