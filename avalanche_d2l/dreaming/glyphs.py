"""The offline dreamer's world: glyphs rendered from the fonts that matplotlib ships.

Letters (Latin and Greek), punctuation and symbols -- never the digits 0-9, so the dreamer never
sees the evaluation stream's classes -- from DejaVu Sans/Serif/Mono (all weights), STIX and the
Computer Modern fonts. Each character is one *concept* (class id).

Base glyphs are rendered once with FreeType (``matplotlib.ft2font.FT2Font``) into a tensor bank
at ``base_size`` (32 px). Samples are drawn on the fly with batched torch ops that reproduce the
way scikit-learn's handwritten digits were made (32x32 binary bitmaps counted in 4x4 blocks,
giving 8x8 images with 17 grey levels) and how :func:`avalanche_d2l.scenarios.split_digits`
upsamples them:

1. random affine (rotation, anisotropic scale, shear, translation) + elastic displacement,
2. stroke width: binarise, then dilate/erode towards a random target pen width,
3. low resolution: ``avg_pool`` to ``lowres`` (8x8), quantised to ``base_size/lowres``^2 + 1
   levels,
4. bilinear antialiased upsampling to ``image_size``, optional Gaussian blur, random contrast.

Values are in [0, 1], white strokes on black, shape ``(N, 1, image_size, image_size)``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from ..core.config import ConfigBase

__all__ = ["DEFAULT_GLYPHS", "GREEK_GLYPHS", "GlyphBank", "GlyphConfig", "glyph_fonts"]

_LATIN = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_SYMBOLS = "?!&%@#$*+=<>/\\()[]{}~^|"
GREEK_GLYPHS = "αβγδεζηθλμξπρστφχψωΓΔΘΛΞΠΣΦΨΩ"
#: The default glyph set: Latin letters, symbols and Greek letters; no digits.
DEFAULT_GLYPHS = _LATIN + _SYMBOLS + GREEK_GLYPHS

# Computer Modern fonts in matplotlib use TeX encodings outside the letters: letters only there.
_FONTS = (
    ("DejaVuSans.ttf", None),
    ("DejaVuSans-Bold.ttf", None),
    ("DejaVuSans-Oblique.ttf", None),
    ("DejaVuSans-BoldOblique.ttf", None),
    ("DejaVuSerif.ttf", None),
    ("DejaVuSerif-Bold.ttf", None),
    ("DejaVuSerif-Italic.ttf", None),
    ("DejaVuSansMono.ttf", None),
    ("DejaVuSansMono-Bold.ttf", None),
    ("STIXGeneral.ttf", None),
    ("STIXGeneralBol.ttf", None),
    ("STIXGeneralItalic.ttf", None),
    ("cmr10.ttf", _LATIN),
    ("cmss10.ttf", _LATIN),
    ("cmtt10.ttf", _LATIN),
    ("cmb10.ttf", _LATIN),
    ("cmti10.ttf", _LATIN),
)


def glyph_fonts() -> list[tuple[str, str | None]]:
    """``(path, allowed_chars or None)`` for every usable font matplotlib ships."""
    import matplotlib

    root = os.path.join(matplotlib.get_data_path(), "fonts", "ttf")
    return [
        (os.path.join(root, f), allowed)
        for f, allowed in _FONTS
        if os.path.isfile(os.path.join(root, f))
    ]


@dataclass
class GlyphConfig(ConfigBase):
    """How glyphs are rendered and jittered.

    Attributes:
        image_size: side of the output images.
        lowres: side of the low-resolution intermediate (8: like scikit-learn's digits).
        base_size: side of the pre-rendered base glyphs (32: like the digits' source bitmaps).
        chars: the glyph set (each character one concept); digits are refused.
        render_px: FreeType pixel size used to render the base glyphs before fitting.
        fill: (min, max) fraction of ``base_size`` the glyph's longer side spans.
        rotation: max rotation in degrees.
        scale_jitter: max relative anisotropic scale change.
        shear: max shear.
        translate: max translation as a fraction of the image side.
        elastic: std of the elastic displacement in base pixels.
        stroke: (min, max) dilation radius in base pixels (negative: erosion) tried per sample.
        stroke_width: (min, max) target stroke width in base pixels; the radius whose result is
            closest to a random target in this range is kept.
        threshold: (min, max) binarisation threshold of the jittered base bitmap.
        blur: (min, max) Gaussian blur sigma at ``image_size``.
        contrast: (min, max) peak intensity.
        color: RGB glyphs: every image gets its own stroke colour (each channel uniform in
            ``foreground``) on its own darker background colour (``background``), the look of
            :func:`avalanche_d2l.scenarios.split_color_digits`; ``False`` gives grey images.
        foreground: (min, max) of each stroke-colour channel when ``color``.
        background: (min, max) of each background-colour channel when ``color``.
    """

    image_size: int = 16
    lowres: int = 8
    base_size: int = 32
    chars: str = DEFAULT_GLYPHS
    render_px: int = 64
    fill: tuple[float, float] = (0.8, 1.0)
    rotation: float = 12.0
    scale_jitter: float = 0.15
    shear: float = 0.2
    translate: float = 0.06
    elastic: float = 1.2
    stroke: tuple[int, int] = (-2, 3)
    stroke_width: tuple[float, float] = (3.0, 5.5)
    threshold: tuple[float, float] = (0.3, 0.6)
    blur: tuple[float, float] = (0.0, 0.6)
    contrast: tuple[float, float] = (0.85, 1.0)
    color: bool = False
    foreground: tuple[float, float] = (0.5, 1.0)
    background: tuple[float, float] = (0.0, 0.35)
    fonts: list[str] = field(default_factory=list)  # filled with the font files used

    def __post_init__(self) -> None:
        digits = sorted(set(self.chars) & set("0123456789"))
        if digits:
            raise ValueError(
                f"the glyph world must not contain digits (the evaluation stream's classes): "
                f"remove {digits} from chars"
            )
        if len(set(self.chars)) != len(self.chars):
            raise ValueError("chars has duplicate characters; each character is one concept")
        if self.base_size % self.lowres != 0:
            raise ValueError(
                f"base_size={self.base_size} must be a multiple of lowres={self.lowres}"
            )

    # ``fonts`` (filled at render time from the local matplotlib) is not saved: the font list
    # itself is part of the recipe (``_FONTS``); the fingerprint names the rendered glyph world
    not_saved = ("fonts",)
    checks_types = False
    fingerprint_hash = "sha256"
    fingerprint_chars = None


def _render(font, ch: str, px: int) -> np.ndarray | None:
    """Render one character with an open ``FT2Font``; cropped to its ink, or ``None``."""
    if font.get_char_index(ord(ch)) == 0:
        return None
    font.set_size(px, 72)
    font.set_text(ch, 0.0)
    font.draw_glyphs_to_bitmap(antialiased=True)
    img = np.asarray(font.get_image(), dtype=np.float32) / 255.0
    if img.size == 0 or img.max() < 0.5:
        return None
    rows, cols = np.nonzero(img > 0.2)
    return img[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]


def _fit(img: np.ndarray, size: int) -> Tensor:
    """Centre a cropped glyph in a ``size`` square, longer side = ``size`` (aspect kept)."""
    h, w = img.shape
    s = size / max(h, w)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    t = torch.from_numpy(img)[None, None]
    t = F.interpolate(t, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    out = torch.zeros(1, 1, size, size)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[..., top : top + nh, left : left + nw] = t
    return out[0].clamp(0, 1)


class GlyphBank:
    """Pre-rendered base glyphs plus a fast batched jitter sampler.

    Args:
        config: a :class:`GlyphConfig`.

    Attributes:
        base: ``(M, 1, base_size, base_size)`` base glyphs (glyph fills the square).
        labels: ``(M,)`` concept id of each base glyph.
        class_names: the characters, index = concept id.
        num_classes: number of concepts ``K``.
    """

    def __init__(self, config: GlyphConfig | None = None):
        self.config = config = config or GlyphConfig()
        fonts = glyph_fonts()
        if not fonts:
            raise RuntimeError("no matplotlib fonts found; is matplotlib installed correctly?")
        bases, labels, used = [], [], set()
        self.class_names: list[str] = []
        from matplotlib.ft2font import FT2Font

        opened = [(FT2Font(path), path, allowed) for path, allowed in fonts]
        for ch in config.chars:
            found = []
            for font, path, allowed in opened:
                if allowed is not None and ch not in allowed:
                    continue
                img = _render(font, ch, config.render_px)
                if img is not None:
                    found.append(_fit(img, config.base_size))
                    used.add(os.path.basename(path))
            if not found:
                continue  # no shipped font has it: not a concept
            cid = len(self.class_names)
            self.class_names.append(ch)
            bases.extend(found)
            labels.extend([cid] * len(found))
        self.base = torch.stack(bases)
        self.labels = torch.tensor(labels, dtype=torch.long)
        self.num_classes = len(self.class_names)
        config.fonts = sorted(used)
        # index of the base glyphs of each concept, for class-balanced sampling
        self._by_class = [
            torch.nonzero(self.labels == k).flatten() for k in range(self.num_classes)
        ]

    def __len__(self) -> int:
        return len(self.base)

    def sample(
        self,
        n: int,
        *,
        generator: torch.Generator | None = None,
        classes: Tensor | None = None,
        jitter: bool = True,
    ) -> tuple[Tensor, Tensor]:
        """Draw ``n`` jittered glyph images, class-balanced.

        Args:
            n: number of images.
            generator: CPU generator for reproducible draws.
            classes: optional ``(n,)`` concept ids to draw (else uniform over concepts).
            jitter: ``False`` gives the centred base glyphs through the low-res path only.

        Returns:
            ``(images (n, C, S, S) in [0, 1], labels (n,))``; C is 3 with ``config.color``.
        """
        g = generator
        if classes is None:
            classes = torch.randint(0, self.num_classes, (n,), generator=g)
        classes = classes.long().cpu()
        counts = torch.tensor([len(self._by_class[int(k)]) for k in classes])
        pick = (torch.rand(n, generator=g) * counts).long()
        idx = torch.stack([self._by_class[int(k)][int(p)] for k, p in zip(classes, pick)])
        x = self.base[idx]
        x = self._jitter(x, g) if jitter else self._shrink_only(x, g)
        if self.config.color:
            fg = self._uniform((n, 3, 1, 1), self.config.foreground, g)
            bg = self._uniform((n, 3, 1, 1), self.config.background, g)
            x = bg + (fg - bg) * x
        return x, classes

    @staticmethod
    def _uniform(shape, bounds: tuple[float, float], g) -> Tensor:
        lo, hi = bounds
        return lo + (hi - lo) * torch.rand(shape, generator=g)

    @property
    def channels(self) -> int:
        return 3 if self.config.color else 1

    # ---- the look: geometry, stroke, low resolution -------------------------------------------

    def _rand(self, n: int, lo: float, hi: float, g) -> Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=g)

    def _shrink_only(self, x: Tensor, g) -> Tensor:
        c = self.config
        f = sum(c.fill) / 2
        theta = torch.zeros(x.shape[0], 2, 3)
        theta[:, 0, 0] = theta[:, 1, 1] = 1.0 / f
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        x = (x > sum(c.threshold) / 2).float()
        return self._lowres(x, g, jitter=False)

    def _jitter(self, x: Tensor, g) -> Tensor:
        c = self.config
        n, _, s, _ = x.shape
        # 1. geometry: inverse affine map output -> input coordinates, plus elastic field
        fill = self._rand(n, *c.fill, g)
        ang = torch.deg2rad(self._rand(n, -c.rotation, c.rotation, g))
        sx = fill * (1 + self._rand(n, -c.scale_jitter, c.scale_jitter, g))
        sy = fill * (1 + self._rand(n, -c.scale_jitter, c.scale_jitter, g))
        sh = self._rand(n, -c.shear, c.shear, g)
        cos, sin = torch.cos(ang), torch.sin(ang)
        fwd = torch.zeros(n, 2, 2)
        fwd[:, 0, 0], fwd[:, 0, 1] = cos * sx, -sin * sy + sh * cos * sx
        fwd[:, 1, 0], fwd[:, 1, 1] = sin * sx, cos * sy + sh * sin * sx
        inv = torch.linalg.inv(fwd)
        tr = self._rand(2 * n, -2 * c.translate, 2 * c.translate, g).view(n, 2, 1)
        theta = torch.cat([inv, -inv @ tr], dim=2)
        grid = F.affine_grid(theta, [n, 1, s, s], align_corners=False)
        if c.elastic > 0:
            disp = torch.randn(n, 2, 4, 4, generator=g) * (2 * c.elastic / s)
            disp = F.interpolate(disp, size=(s, s), mode="bicubic", align_corners=False)
            grid = grid + disp.permute(0, 2, 3, 1)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        # 2. stroke width: binarise, then per sample pick the dilation/erosion radius whose
        #    estimated stroke width (2 * area / perimeter) is closest to a random target, so
        #    thin serif fonts and bold fonts all end up with pen-like strokes
        thr = self._rand(n, *c.threshold, g).view(n, 1, 1, 1)
        lo, hi = c.stroke
        target = self._rand(n, *c.stroke_width, g)
        best = torch.full((n,), float("inf"))
        out = torch.zeros_like(x)
        for r in range(lo, hi + 1):
            k = 2 * abs(r) + 1
            xr = (
                x
                if r == 0
                else (F.max_pool2d(x, k, 1, abs(r)) if r > 0 else -F.max_pool2d(-x, k, 1, abs(r)))
            )
            xr = (xr > thr).float()
            err = (_stroke_width(xr) - target).abs()
            err[xr.flatten(1).sum(1) < 4] = float("inf")  # erased: never pick
            take = err < best
            best = torch.where(take, err, best)
            out[take] = xr[take]
        x = out
        return self._lowres(x, g, jitter=True)

    def _lowres(self, x: Tensor, g, *, jitter: bool) -> Tensor:
        c = self.config
        n = x.shape[0]
        # 3. count "on" pixels in blocks, like the digits' 4x4 blocks -> 17 grey levels
        block = c.base_size // c.lowres
        x = F.avg_pool2d(x, block)
        levels = block * block
        x = torch.round(x * levels) / levels
        # 4. upsample like split_digits; blur and contrast
        if c.image_size != c.lowres:
            x = F.interpolate(
                x,
                size=(c.image_size, c.image_size),
                mode="bilinear",
                antialias=True,
                align_corners=False,
            )
        if jitter:
            sigma = self._rand(n, *c.blur, g)
            x = _gaussian_blur(x, sigma)
            x = x * self._rand(n, *c.contrast, g).view(n, 1, 1, 1)
        return x.clamp(0, 1)


def _stroke_width(x: Tensor) -> Tensor:
    """Mean stroke width of binary images, ``2 * area / perimeter`` in pixels."""
    area = x.flatten(1).sum(1)
    eroded = -F.max_pool2d(-x, 3, 1, 1)  # 8-neighbour erosion
    perim = (x - eroded).clamp_min(0).flatten(1).sum(1)
    return 2 * area / perim.clamp_min(1.0)


def _gaussian_blur(x: Tensor, sigma: Tensor) -> Tensor:
    """Per-sample separable Gaussian blur (``sigma`` in pixels; 0 = identity)."""
    n = x.shape[0]
    smax = float(sigma.max()) if n else 0.0
    if smax <= 1e-3:
        return x
    r = max(1, math.ceil(2 * smax))
    offs = torch.arange(-r, r + 1, dtype=x.dtype)
    s = sigma.clamp_min(1e-3).view(n, 1)
    k = torch.exp(-0.5 * (offs.view(1, -1) / s) ** 2)
    k = k / k.sum(1, keepdim=True)  # (n, 2r+1); sigma ~0 -> delta
    xp = F.pad(x, (r, r, r, r), mode="replicate").transpose(0, 1)  # (1, n, H+2r, W+2r)
    xp = F.conv2d(xp, k.view(n, 1, 1, -1), groups=n)
    xp = F.conv2d(xp, k.view(n, 1, -1, 1), groups=n)
    return xp.transpose(0, 1)
