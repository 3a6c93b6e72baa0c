"""The toy world: small seeded images of one shape with known ground truth, and their captions.

Every image is ``IMAGE_SIZE`` x ``IMAGE_SIZE`` RGB: one object (a shape from ``SHAPES``
in a colour from ``COLORS``, small or large, anywhere a margin allows) on a plain or
two-tone background whose colours are never the object's. Shapes are drawn with 4x4
supersampled coverage, so edges are anti-aliased the way a smooth generator's would be.
Each row's attributes are labels; its caption comes from a small grammar that always
names the colour and the shape and sometimes the size, position and background.

A row depends only on ``(seed, index)``: the first N rows are the same whatever the
total, on every machine. ``HELD_OUT_SHAPE`` is drawn and detected like any other shape,
but the toy Stable Diffusion never sees it in training (fine-tuning methods teach it).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

IMAGE_SIZE = 32
SUPERSAMPLE = 4
MARGIN = 2

Color = tuple[int, int, int]

COLORS: dict[str, Color] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 220, 30),
    "purple": (150, 40, 190),
    "orange": (250, 140, 0),
}
"""Object colours (also background colours); pairwise RGB distance >= 118."""

NEUTRALS: dict[str, Color] = {"white": (245, 245, 245), "black": (20, 20, 20), "gray": (128, 128, 128)}
"""Background-only colours."""

BACKGROUND_COLORS: dict[str, Color] = {**NEUTRALS, **COLORS}
SHAPES = ("circle", "square", "triangle", "star", "heart")
HELD_OUT_SHAPE = "heart"
"""Drawn and detected, never shown to the toy Stable Diffusion in training."""
TRAIN_SHAPES = tuple(s for s in SHAPES if s != HELD_OUT_SHAPE)
SIZES: dict[str, tuple[int, int]] = {"small": (10, 14), "large": (18, 24)}
"""Size label -> inclusive range of the object's bounding-box side, in pixels."""
POSITIONS = (
    ("top left", "top", "top right"),
    ("left", "center", "right"),
    ("bottom left", "bottom", "bottom right"),
)
POSITION_PHRASES = {
    "top left": "in the top left corner", "top": "at the top", "top right": "in the top right corner",
    "left": "on the left", "center": "in the center", "right": "on the right",
    "bottom left": "in the bottom left corner", "bottom": "at the bottom",
    "bottom right": "in the bottom right corner",
}
TWO_TONE_PROBABILITY = 0.3
COLOR_JITTER = 10
"""Per-image uniform jitter of every colour channel (object and background), +-."""

CAPTION_TEMPLATES = (
    "a {color} {shape}",
    "a {size} {color} {shape}",
    "a {color} {shape} on a {background} background",
    "a {size} {color} {shape} on a {background} background",
    "a {color} {shape} {position}",
    "a {size} {color} {shape} {position} on a {background} background",
    "a picture of a {color} {shape}",
    "a {color} {shape} {position} on a {background} background",
)


@dataclass(frozen=True)
class ToyObject:
    """Ground truth of one toy image.

    Args:
        shape: a name from ``SHAPES``.
        color: a name from ``COLORS``.
        size: ``small`` or ``large``.
        extent: side of the object's bounding box in pixels.
        cx, cy: centre of the bounding box in pixels (continuous coordinates).
        position: a name from ``POSITIONS`` (3x3 grid cell of the centre).
        background: the (first) background colour name; top or left half when two-tone.
        background2: the second background colour (bottom or right half), or None.
        split: ``horizontal`` (top/bottom halves), ``vertical`` (left/right) or None.
    """

    shape: str
    color: str
    size: str
    extent: int
    cx: float
    cy: float
    position: str
    background: str
    background2: str | None = None
    split: str | None = None

    @property
    def background_phrase(self) -> str:
        """``blue``, or ``white and blue`` for a two-tone background."""
        return self.background if self.background2 is None else f"{self.background} and {self.background2}"

    @property
    def box(self) -> tuple[float, float, float, float]:
        """``(x0, y0, x1, y1)``: the square the shape fills, in continuous pixel coordinates."""
        half = self.extent / 2
        return (self.cx - half, self.cy - half, self.cx + half, self.cy + half)

    def labels(self) -> dict[str, object]:
        """The attribute columns of a dataset row."""
        return asdict(self)


def position_name(cx: float, cy: float, size: int = IMAGE_SIZE) -> str:
    """The 3x3 grid cell (``top left`` … ``bottom right``) holding the point ``(cx, cy)``."""
    col = min(2, max(0, int(cx * 3 / size)))
    row = min(2, max(0, int(cy * 3 / size)))
    return POSITIONS[row][col]


def _star_polygon() -> np.ndarray:
    angles = -np.pi / 2 + np.arange(10) * np.pi / 5
    radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.4)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


_POLYGONS = {
    "triangle": np.array([[0.0, -1.0], [1.0, 1.0], [-1.0, 1.0]]),
    "star": _star_polygon(),
}


def _normalise(points: np.ndarray) -> np.ndarray:
    """Stretch a polygon so its bounding box is exactly [-1, 1] x [-1, 1]."""
    lo, hi = points.min(axis=0), points.max(axis=0)
    return (points - lo) / (hi - lo) * 2 - 1


def _inside_polygon(x: np.ndarray, y: np.ndarray, poly: np.ndarray) -> np.ndarray:
    inside = np.zeros(x.shape, dtype=bool)
    n = len(poly)
    for i in range(n):
        (x1, y1), (x2, y2) = poly[i], poly[(i + 1) % n]
        crosses = (y1 > y) != (y2 > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = x1 + (y - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses & (x < x_at)
    return inside


@lru_cache(maxsize=1)
def _heart_extent() -> tuple[float, float, float, float]:
    u = np.linspace(-1.5, 1.5, 3001)
    x, y = np.meshgrid(u, u)
    inside = (x**2 + y**2 - 1) ** 3 - x**2 * y**3 <= 0
    ys, xs = np.nonzero(inside)
    return float(u[xs.min()]), float(u[xs.max()]), float(u[ys.min()]), float(u[ys.max()])


def inside_shape(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Whether points ``(u, v)`` of the unit box [-1, 1]^2 (v downwards) lie in ``shape``.

    Every shape fills the unit box: its bounding box is exactly [-1, 1]^2.
    """
    if shape == "circle":
        return u**2 + v**2 <= 1
    if shape == "square":
        return (np.abs(u) <= 1) & (np.abs(v) <= 1)
    if shape in _POLYGONS:
        return _inside_polygon(u, v, _normalise(_POLYGONS[shape]))
    if shape == "heart":
        x0, x1, y0, y1 = _heart_extent()
        x = x0 + (u + 1) / 2 * (x1 - x0)
        y = y1 - (v + 1) / 2 * (y1 - y0)
        return (x**2 + y**2 - 1) ** 3 - x**2 * y**3 <= 0
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def shape_coverage(
    shape: str, box: Sequence[float], height: int = IMAGE_SIZE, width: int = IMAGE_SIZE, ss: int = SUPERSAMPLE
) -> np.ndarray:
    """Per-pixel coverage in [0, 1] (``height`` x ``width``) of ``shape`` filling ``box``.

    Args:
        shape: a name from ``SHAPES``.
        box: ``(x0, y0, x1, y1)`` in continuous pixel coordinates (pixel i spans [i, i+1]).
        height, width: image size.
        ss: supersampling factor per axis.
    """
    x0, y0, x1, y1 = box
    out = np.zeros((height, width), dtype=np.float32)
    c0, c1 = max(0, int(np.floor(x0))), min(width, int(np.ceil(x1)))
    r0, r1 = max(0, int(np.floor(y0))), min(height, int(np.ceil(y1)))
    if c1 <= c0 or r1 <= r0 or x1 <= x0 or y1 <= y0:  # a box of no area (a detector's one-pixel blob) covers nothing
        return out
    offsets = (np.arange(ss) + 0.5) / ss
    xs = (np.arange(c0, c1)[:, None] + offsets[None, :]).reshape(-1)
    ys = (np.arange(r0, r1)[:, None] + offsets[None, :]).reshape(-1)
    u = (xs - x0) / (x1 - x0) * 2 - 1
    v = (ys - y0) / (y1 - y0) * 2 - 1
    uu, vv = np.meshgrid(u, v)
    inside = inside_shape(shape, uu, vv).astype(np.float32)
    out[r0:r1, c0:c1] = inside.reshape(r1 - r0, ss, c1 - c0, ss).mean(axis=(1, 3))
    return out


def _jittered(rng: np.random.Generator, color: Color) -> np.ndarray:
    jitter = rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, size=3)
    return np.clip(np.asarray(color) + jitter, 0, 255).astype(np.float32)


def sample_object(rng: np.random.Generator, shapes: Sequence[str] = SHAPES) -> ToyObject:
    """Draw one object's ground truth from ``rng`` (the shape from ``shapes``)."""
    shape = str(shapes[rng.integers(len(shapes))])
    color = str(list(COLORS)[rng.integers(len(COLORS))])
    size = str(list(SIZES)[rng.integers(len(SIZES))])
    lo, hi = SIZES[size]
    extent = int(rng.integers(lo, hi + 1))
    half = extent / 2
    cx = float(rng.uniform(MARGIN + half, IMAGE_SIZE - MARGIN - half))
    cy = float(rng.uniform(MARGIN + half, IMAGE_SIZE - MARGIN - half))
    choices = [c for c in BACKGROUND_COLORS if c != color]
    background = str(choices[rng.integers(len(choices))])
    background2 = split = None
    if rng.random() < TWO_TONE_PROBABILITY:
        rest = [c for c in choices if c != background]
        background2 = str(rest[rng.integers(len(rest))])
        split = "horizontal" if rng.random() < 0.5 else "vertical"
    return ToyObject(shape, color, size, extent, round(cx, 3), round(cy, 3), position_name(cx, cy),
                     background, background2, split)


def render(obj: ToyObject, rng: np.random.Generator | None = None, width: int = IMAGE_SIZE,
           height: int = IMAGE_SIZE) -> Image.Image:
    """Draw ``obj`` as a ``width`` x ``height`` RGB image (colours jittered by ``rng`` when given);
    its box is in that image's pixels (a larger canvas: a scene to cut frames from)."""
    def color(name: str) -> np.ndarray:
        rgb = BACKGROUND_COLORS[name]
        return _jittered(rng, rgb) if rng is not None else np.asarray(rgb, dtype=np.float32)

    canvas = np.empty((height, width, 3), dtype=np.float32)
    canvas[:] = color(obj.background)
    if obj.background2 is not None:
        if obj.split == "horizontal":
            canvas[height // 2:, :] = color(obj.background2)
        else:
            canvas[:, width // 2:] = color(obj.background2)
    alpha = shape_coverage(obj.shape, obj.box, height, width)[..., None]
    canvas = canvas * (1 - alpha) + color(obj.color) * alpha
    return Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8), "RGB")


def _articles(text: str) -> str:
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


def caption_for(obj: ToyObject, template: str) -> str:
    """Fill a caption template with ``obj``'s attributes (``an`` before a vowel)."""
    return _articles(template.format(
        color=obj.color, shape=obj.shape, size=obj.size, background=obj.background_phrase,
        position=POSITION_PHRASES[obj.position],
    ))


def row_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of row ``index`` of world ``seed`` (independent of every other row)."""
    return np.random.default_rng([int(seed), int(index)])


def make_row(seed: int, index: int, shapes: Sequence[str] = SHAPES) -> tuple[Image.Image, str, ToyObject]:
    """Row ``index`` of world ``seed``: ``(image, caption, ground truth)``."""
    rng = row_rng(seed, index)
    obj = sample_object(rng, shapes)
    template = CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))]
    return render(obj, rng), caption_for(obj, template), obj


def check_shapes(names: Sequence[str]) -> None:
    """Raise ValueError naming any unknown shape."""
    unknown = [s for s in names if s not in SHAPES]
    if unknown:
        raise ValueError(f"unknown shape(s) {', '.join(unknown)}; known: {', '.join(SHAPES)}")


def parse_caption(caption: str) -> dict[str, str]:
    """The attributes a grammar caption names: ``color`` and ``shape``, and any of
    ``size``, ``position``, ``background`` it mentions (``background`` as its phrase)."""
    found: dict[str, str] = {}
    head, _, bg = re.sub(r"\ban ", "a ", caption).partition(" on a ")
    if bg:
        found["background"] = bg.removesuffix(" background")
    for position, phrase in sorted(POSITION_PHRASES.items(), key=lambda kv: -len(kv[1])):
        if head.endswith(" " + phrase):
            found["position"] = position
            head = head[: -len(phrase) - 1]
            break
    words = head.split()
    found["shape"] = words[-1]
    found["color"] = words[-2]
    if words[-3] in SIZES:
        found["size"] = words[-3]
    return found
