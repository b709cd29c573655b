"""Streams built the way a user builds their own: a plain ``torch`` dataset with a ``targets``
list, split by Avalanche's ``nc_benchmark`` (not the package's scenario builders, and not
tuned on: no default of the package was chosen on them).

``rgb_shapes``: six shape classes drawn procedurally in colour (filled circle, ring, square,
triangle, cross, two dots), each image with a random shape colour, a random dark background,
a random position, size and tilt, and pixel noise; the class is the shape alone (colour carries
no label). Three experiences of two classes::

    from benchmarks.user_streams import rgb_shapes
    bench = rgb_shapes(seed=0, size=24)
"""

from __future__ import annotations

import math

import torch
from avalanche.benchmarks import nc_benchmark

__all__ = ["SHAPES", "ShapeImages", "draw_shapes", "rgb_shapes"]

SHAPES = ("circle", "ring", "square", "triangle", "cross", "two_dots")


class ShapeImages(torch.utils.data.Dataset):
    """A user's own dataset: image tensors and a ``targets`` list (no Avalanche helper)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.targets = x, [int(v) for v in y]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return self.x[i], self.targets[i]


def _distance(label: int, u: torch.Tensor, v: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Signed distance (pixels, negative inside) to shape ``label`` of radius ``r`` at the
    (tilted) coordinates ``u, v`` centred on the shape."""
    rad = torch.sqrt(u * u + v * v)
    if label == 0:  # filled circle
        return rad - r
    if label == 1:  # ring
        return (rad - 0.75 * r).abs() - 0.28 * r
    if label == 2:  # square
        return torch.maximum(u.abs(), v.abs()) - 0.8 * r
    if label == 3:  # triangle, pointing up
        planes = []
        for k in range(3):
            a = math.pi / 2 + 2 * math.pi * k / 3
            planes.append(u * math.cos(a) - v * math.sin(a) - 0.5 * r)
        return torch.stack(planes).amax(0)
    if label == 4:  # cross
        w = 0.28 * r
        bar1 = torch.maximum(u.abs() - r, v.abs() - w)
        bar2 = torch.maximum(v.abs() - r, u.abs() - w)
        return torch.minimum(bar1, bar2)
    # two dots, side by side
    d1 = torch.sqrt((u - 0.55 * r) ** 2 + v * v) - 0.42 * r
    d2 = torch.sqrt((u + 0.55 * r) ** 2 + v * v) - 0.42 * r
    return torch.minimum(d1, d2)


def draw_shapes(y: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """RGB images in [0, 1] of the shapes ``y`` (indices into :data:`SHAPES`), ``size`` px."""
    n = len(y)

    def rand(*shape):
        return torch.rand(*shape, generator=generator)

    r = size * (0.24 + 0.12 * rand(n))  # shape radius
    cx = size / 2 + (rand(n) - 0.5) * size * 0.25
    cy = size / 2 + (rand(n) - 0.5) * size * 0.25
    tilt = (rand(n) - 0.5) * math.radians(40)
    fg = 0.45 + 0.55 * rand(n, 3)  # a bright shape colour
    bg = 0.35 * rand(n, 3)  # a dark background colour
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    out = torch.empty(n, 3, size, size)
    for i in range(n):
        dx, dy = xx - cx[i], yy - cy[i]
        c, s = math.cos(tilt[i]), math.sin(tilt[i])
        u, v = c * dx + s * dy, -s * dx + c * dy
        mask = (0.5 - _distance(int(y[i]), u, v, r[i])).clamp(0, 1)  # 1-px soft edge
        out[i] = bg[i].view(3, 1, 1) * (1 - mask) + fg[i].view(3, 1, 1) * mask
    out += 0.04 * torch.randn(out.shape, generator=generator)
    return out.clamp(0, 1)


def rgb_shapes(
    seed: int = 0,
    size: int = 24,
    n_train: int = 400,
    n_test: int = 100,
    n_experiences: int = 3,
):
    """Class-incremental ``rgb_shapes`` at ``size`` px: ``n_train`` / ``n_test`` images per
    class, the six classes in ``n_experiences`` experiences (order drawn from ``seed``). The
    images are the same for every ``seed`` (drawn from a fixed generator), as a user's
    dataset would be; ``seed`` orders the classes."""
    g = torch.Generator().manual_seed(1234)
    k = len(SHAPES)
    y_train = torch.arange(k).repeat(n_train)
    y_test = torch.arange(k).repeat(n_test)
    x_train = draw_shapes(y_train, size, g)
    x_test = draw_shapes(y_test, size, g)
    return nc_benchmark(
        ShapeImages(x_train, y_train),
        ShapeImages(x_test, y_test),
        n_experiences=n_experiences,
        task_labels=False,
        seed=seed,
    )
