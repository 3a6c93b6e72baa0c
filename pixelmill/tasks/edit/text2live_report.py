"""What a Text2Live row shows in the edit report: the final alpha and the loss curves, as PNGs.

The report (``pixelmill.report.dataset``) shows every image column of a row, so the rows
carry ``edit_alpha`` (the layer's alpha as a grey image) and ``loss_curves`` (each loss
term per iteration, scaled to its own range, drawn with PIL).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"total": (0, 0, 0), "composition": (200, 30, 30), "directional": (230, 130, 0),
           "screen": (30, 150, 50), "structure": (40, 80, 220), "sparsity": (150, 40, 190),
           "bootstrap": (120, 120, 120)}


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def alpha_png(rgba: np.ndarray) -> bytes:
    """The layer's alpha channel as an 8-bit grey PNG (white = opaque)."""
    return _png(Image.fromarray(np.ascontiguousarray(rgba[..., 3]), "L"))


def curves_png(losses: list[float], curves: dict[str, list[float]], width: int = 320, height: int = 160) -> bytes:
    """A plot of the total loss and each term over the iterations, each scaled to its own min..max."""
    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    left, top, right, bottom = 4, 4, width - 84, height - 4
    draw.rectangle((left, top, right, bottom), outline=(200, 200, 200))
    n = max(len(losses), 1)
    for row, (name, values) in enumerate([("total", losses), *curves.items()]):
        colour = COLOURS.get(name, (0, 128, 128))
        draw.text((right + 6, top + 12 * row), name, fill=colour)
        v = np.asarray(values, dtype=np.float64)
        if v.size < 2 or not np.isfinite(v).all():
            continue
        lo, hi = float(v.min()), float(v.max())
        ys = bottom - (v - lo) / (hi - lo if hi > lo else 1.0) * (bottom - top)
        xs = left + np.arange(v.size) / max(n - 1, 1) * (right - left)
        draw.line(list(zip(xs.tolist(), ys.tolist())), fill=colour, width=1)
    return _png(img)
