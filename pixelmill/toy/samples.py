"""Toy-world inputs for the demo (and tests): images with a broken row, a retrieval pool, concept images, clips.

Everything here is drawn by ``pixelmill.toy.world`` from fixed seeds, so the demo's inputs
are the same on every machine and every edit can be read by the toy detectors: the
images carry their ``shape`` and ``color`` labels, which prompt templates can name
(``"a green {shape}"``).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from fractions import Fraction

import numpy as np
import pyarrow as pa

from pixelmill.datasets import storage
from pixelmill.datasets.sharding import stable_id
from pixelmill.datasets.writer import write_table_dataset
from pixelmill.tasks.video.synthetic import SyntheticClip
from pixelmill.toy import world
from pixelmill.toy.dataset import TOY_SCHEMA, TOY_SCHEMA_NAME, toy_row, toy_row_id

MAX_SCAN = 20_000
"""Rows of a world scanned at most when looking for rows with given attributes."""


def _find(seed: int, count: int, pred, start: int = 0,
          taken: set[int] | frozenset[int] = frozenset()) -> list[int] | None:
    """The first ``count`` row indices (from ``start``, not in ``taken``) of world ``seed`` whose
    object satisfies ``pred``; None when ``MAX_SCAN`` rows hold fewer."""
    found = []
    for index in range(start, start + MAX_SCAN):
        if len(found) == count:
            break
        if index not in taken and pred(world.sample_object(world.row_rng(seed, index))):
            found.append(index)
    return found if len(found) == count else None


def toy_indices(seed: int, count: int, shape: str | None = None, color: str | None = None,
                start: int = 0) -> list[int]:
    """The first ``count`` row indices (from ``start``) of world ``seed`` whose object has ``shape`` / ``color``.

    Raises:
        ValueError: an unknown shape or colour, or fewer matches in ``MAX_SCAN`` rows.
    """
    if shape is not None:
        world.check_shapes([shape])
    if color is not None and color not in world.COLORS:
        raise ValueError(f"unknown colour {color!r}; known: {', '.join(world.COLORS)}")
    found = _find(seed, count, lambda o: (shape is None or o.shape == shape) and (color is None or o.color == color),
                  start)
    if found is None:
        raise ValueError(f"fewer than {count} rows of world {seed} with shape={shape} color={color} "
                         f"in {MAX_SCAN} rows")
    return found


def _truncated_png(seed: int, index: int) -> bytes:
    buf = io.BytesIO()
    world.make_row(seed, index)[0].save(buf, format="PNG")
    data = buf.getvalue()
    return data[: len(data) // 2]


def write_toy_images(url: str, rows: int = 12, seed: int = 0, broken: int = 1) -> dict:
    """Rows ``0 .. rows-1`` of world ``seed`` as a dataset (``TOY_SCHEMA``), plus ``broken`` undecodable rows.

    A broken row is a toy row whose image bytes are a PNG cut in half (its labels and
    caption intact): every stage that decodes it records it as a reject with the reason.

    Returns:
        ``{"url", "rows", "broken", "shapes", "colors"}`` (shapes and colours of the good rows).
    """
    good = [toy_row(seed, i) for i in range(rows)]
    bad = []
    for k in range(broken):
        row = toy_row(seed, rows + k)
        row["id"] = stable_id("toy-broken", seed, rows + k)
        row["image"] = {"bytes": _truncated_png(seed, rows + k), "path": f"broken-{k:03d}.png"}
        bad.append(row)
    table = pa.Table.from_pylist(good + bad, schema=TOY_SCHEMA)
    write_table_dataset(url, table, TOY_SCHEMA_NAME,
                        {"generator": "pixelmill.toy.samples", "seed": seed, "rows": rows, "broken": broken})
    return {"url": url, "rows": rows, "broken": broken, "shapes": sorted({r["shape"] for r in good}),
            "colors": sorted({r["color"] for r in good})}


def write_toy_rows(url: str, seed: int, indices: Sequence[int], meta: dict, extra=None) -> list[str]:
    """Rows ``indices`` of world ``seed`` as a dataset (``TOY_SCHEMA``; ``meta`` in its manifest), plus a
    column ``name`` of ``extra(row)`` for each ``(name, extra)`` in ``extra``. Returns the rows' captions."""
    rows = [toy_row(seed, i) for i in indices]
    table = pa.Table.from_pylist(rows, schema=TOY_SCHEMA)
    for name, value in (extra or {}).items():
        table = table.append_column(name, pa.array([value(r) for r in rows]))
    write_table_dataset(url, table, TOY_SCHEMA_NAME, meta)
    return [r["caption"] for r in rows]


def write_toy_concept(url: str, shape: str = world.HELD_OUT_SHAPE, count: int = 6, seed: int = 0) -> list[str]:
    """A concept's instance images: the first ``count`` rows of world ``seed`` showing ``shape``.

    Returns the rows' captions.
    """
    return write_toy_rows(url, seed, toy_indices(seed, count, shape=shape),
                          {"generator": "pixelmill.toy.samples", "concept": shape, "seed": seed, "rows": count})


def toy_pool_indices(seed: int, targets: Sequence[tuple[str, str]], per_target: int = 6,
                     near_misses: int = 3, others: int = 24) -> list[int]:
    """Row indices of a toy retrieval pool: matches of each ``(color, shape)`` target, near misses, the rest.

    For each target: ``per_target`` rows with its colour and shape, ``near_misses`` with its
    colour and another shape and as many with its shape and another colour (the rows a
    0.85 caption-similarity threshold must leave out); then ``others`` further rows of
    any attributes. Sorted, without duplicates.
    """
    chosen: set[int] = set()

    def take(count: int, pred) -> None:
        found = _find(seed, count, pred, taken=chosen)
        if found is None:
            raise ValueError(f"world {seed}: fewer than {count} rows for the toy pool")
        chosen.update(found)

    for color, shape in targets:
        take(per_target, lambda o, c=color, s=shape: o.color == c and o.shape == s)
        take(near_misses, lambda o, c=color, s=shape: o.color == c and o.shape != s)
        take(near_misses, lambda o, c=color, s=shape: o.shape == s and o.color != c)
    take(others, lambda o: all((o.color, o.shape) != t for t in targets))
    return sorted(chosen)


def write_toy_pool_source(folder: str, base_url: str, out_url: str,
                          targets: Sequence[tuple[str, str]] = (("red", "circle"), ("blue", "square")),
                          per_target: int = 6, seed: int = 7) -> int:
    """Write a toy pool's PNG files into ``folder`` and the dataset ``pixelmill pool build`` embeds.

    The dataset has ``id``, ``caption`` (the world's grammar caption), ``url`` (``base_url``
    + file name, for a loopback server serving ``folder``), ``image``, ``shape`` and
    ``color``; the rows are ``toy_pool_indices``. Returns the row count.
    """
    indices = toy_pool_indices(seed, targets, per_target)
    storage.makedirs(folder)
    rows = []
    for index in indices:
        image, caption, obj = world.make_row(seed, index)
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        name = f"toy-{seed}-{index:05d}.png"
        fs, path = storage.resolve(storage.join(folder, name))
        fs.pipe_file(path, buf.getvalue())
        rows.append({"id": toy_row_id(seed, index), "caption": caption,
                     "url": f"{base_url.rstrip('/')}/{name}", "image": {"bytes": buf.getvalue(), "path": name},
                     "shape": obj.shape, "color": obj.color})
    write_table_dataset(out_url, pa.Table.from_pylist(rows), "images",
                        {"toy_pool": [list(t) for t in targets], "seed": seed, "per_target": per_target})
    return len(rows)


def toy_pan_clip(frames: int = 8, shift: tuple[int, int] = (1, 1), shape: str = "circle", color: str = "red",
                 background: str = "white", background2: str = "blue", extent: int = 18,
                 fps: int = 24) -> SyntheticClip:
    """A camera pan across a toy scene: ``world.IMAGE_SIZE`` frames cut from a larger canvas.

    The scene is one ``color`` ``shape`` on a two-tone (left/right) background; frame ``t``
    shows the canvas offset by ``t * shift`` whole pixels, so the clip is exact and its
    atlas is the canvas itself.
    """
    n = world.IMAGE_SIZE
    dx, dy = shift
    width, height = n + dx * (frames - 1), n + dy * (frames - 1)
    obj = world.ToyObject(shape, color, "large", extent, width / 2, height / 2, "center", background,
                          background2, "vertical")
    canvas = np.asarray(world.render(obj, width=width, height=height))
    out = [canvas[t * dy: t * dy + n, t * dx: t * dx + n].copy() for t in range(frames)]
    shifts = np.array([[t * dx, t * dy] for t in range(frames)], dtype=np.float64)
    return SyntheticClip(frames=out, fps=Fraction(fps), shifts=shifts)

