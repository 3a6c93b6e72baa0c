"""Synthetic sample images with captions, drawn locally with PIL.

Demos and tests need a small, varied folder of captioned images without downloading
anything. :func:`draw_sample_images` draws simple scenes (shapes on gradients,
landscapes, houses, stripes, checkerboards) in several sizes, aspect ratios, modes and
formats, including the awkward cases an importer must cope with (grayscale, alpha,
palette, EXIF orientation) and, on request, files that cannot be decoded at all.
"""

from __future__ import annotations

import http.server
import io
import random
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw

from pixelmill.datasets import storage
from pixelmill.datasets.writer import write_table_dataset  # noqa: F401 - also used by tests and the demo

Color = tuple[int, int, int]

COLORS: dict[str, Color] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (245, 215, 40),
    "green": (50, 170, 70),
    "blue": (40, 90, 210),
    "purple": (140, 60, 180),
    "pink": (240, 130, 180),
    "brown": (130, 80, 40),
    "black": (20, 20, 20),
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
}
_SHAPE_COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "black", "white")
_SHAPES = ("circle", "square", "triangle")
_SCENES = ("shapes", "landscape", "house", "stripes", "checkerboard")
_EXIF_ORIENTATION = 0x0112

Scene = tuple[Image.Image, str]


def _shade(color: Color, factor: float) -> Color:
    """Lighten (factor > 1) or darken (factor < 1) a colour."""
    if factor >= 1:
        return tuple(round(c + (255 - c) * (factor - 1)) for c in color)  # type: ignore[return-value]
    return tuple(round(c * factor) for c in color)  # type: ignore[return-value]


def _gradient(size: tuple[int, int], top: Color, bottom: Color) -> Image.Image:
    """A vertical gradient from ``top`` to ``bottom``."""
    width, height = size
    img = Image.new("RGB", size)
    draw = ImageDraw.Draw(img)
    for y in range(height):
        t = y / max(1, height - 1)
        draw.line([(0, y), (width, y)], fill=tuple(round(a + (b - a) * t) for a, b in zip(top, bottom)))
    return img


def _a(phrase: str) -> str:
    """``phrase`` with its indefinite article (``a red…``, ``an orange…``)."""
    return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"


def _join(items: list[str]) -> str:
    """English list: ``a``, ``a and b``, ``a, b and c``."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill: Color) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill, outline=_shade(fill, 0.6))
    elif shape == "square":
        draw.rectangle(box, fill=fill, outline=_shade(fill, 0.6))
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill, outline=_shade(fill, 0.6))


def _shapes(rng: random.Random, size: tuple[int, int], transparent: bool = False) -> Scene:
    """One to three coloured shapes on a gradient (or transparent) background."""
    width, height = size
    background = rng.choice(("yellow", "blue", "green", "pink", "gray", "orange", "purple"))
    if transparent:
        img = Image.new("RGBA", size, (0, 0, 0, 0))
    else:
        base = COLORS[background]
        img = _gradient(size, _shade(base, 1.3), _shade(base, 0.85))
    draw = ImageDraw.Draw(img)
    count = rng.randint(1, 3)
    slot = width // count
    names: list[str] = []
    used: set[tuple[str, str]] = set()
    colors = [c for c in _SHAPE_COLORS if c != background]
    for i in range(count):
        color, shape = rng.choice(colors), rng.choice(_SHAPES)
        while (color, shape) in used:
            color, shape = rng.choice(colors), rng.choice(_SHAPES)
        used.add((color, shape))
        side = max(6, min(slot, height) * rng.randint(55, 85) // 100)
        x0 = i * slot + rng.randint(0, max(0, slot - side))
        y0 = rng.randint(0, max(0, height - side))
        _draw_shape(draw, shape, (x0, y0, x0 + side, y0 + side), COLORS[color])
        names.append(_a(f"{color} {shape}"))
    where = "a transparent background" if transparent else _a(f"{background} background")
    return img, f"{_join(names)} on {where}"


def _landscape(rng: random.Random, size: tuple[int, int]) -> Scene:
    """Sky, ground with a hill, and a sun or moon."""
    width, height = size
    sky_name, sky_top, sky_bottom, body, body_color = rng.choice([
        ("a blue sky", (60, 120, 220), (170, 210, 250), "sun", COLORS["yellow"]),
        ("an orange sunset sky", (230, 110, 60), (250, 200, 120), "sun", (250, 240, 150)),
        ("a dark night sky", (10, 15, 50), (40, 50, 100), "moon", (235, 235, 210)),
    ])
    ground_name, ground = rng.choice([("green hills", COLORS["green"]), ("sand dunes", (220, 190, 120)),
                                      ("snowy hills", (235, 240, 250))])
    img = _gradient(size, sky_top, sky_bottom)
    draw = ImageDraw.Draw(img)
    horizon = height * rng.randint(55, 70) // 100
    radius = max(3, min(width, height) // rng.randint(7, 10))
    cx = rng.randint(radius, width - radius)
    cy = rng.randint(radius, max(radius, horizon - 2 * radius))
    draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=body_color)
    hill_x = rng.randint(0, width)
    draw.ellipse((hill_x - width // 2, horizon - height // 5, hill_x + width // 2, horizon + height // 5),
                 fill=_shade(ground, 0.85))
    draw.rectangle((0, horizon, width, height), fill=ground)
    body_name = "yellow sun" if body == "sun" else "pale moon"
    return img, f"a landscape with a {body_name} over {ground_name} under {sky_name}"


def _house(rng: random.Random, size: tuple[int, int]) -> Scene:
    """A house with a coloured roof, a door and windows, on grass under a sky."""
    width, height = size
    roof_name = rng.choice(["red", "brown", "blue", "black"])
    wall_name = rng.choice(["white", "yellow", "pink", "orange"])
    img = _gradient(size, (70, 130, 225), (180, 215, 250))
    draw = ImageDraw.Draw(img)
    ground_y = height * 4 // 5
    draw.rectangle((0, ground_y, width, height), fill=COLORS["green"])
    house_w = width * rng.randint(40, 55) // 100
    x0 = rng.randint(width // 10, width - house_w - width // 10)
    wall_top = ground_y - height * 2 // 5
    draw.rectangle((x0, wall_top, x0 + house_w, ground_y), fill=COLORS[wall_name], outline=COLORS["black"])
    draw.polygon([(x0 - 3, wall_top), (x0 + house_w + 3, wall_top), (x0 + house_w // 2, wall_top - height // 4)],
                 fill=COLORS[roof_name], outline=COLORS["black"])
    door_w = max(3, house_w // 5)
    door_x = x0 + house_w // 2 - door_w // 2
    draw.rectangle((door_x, ground_y - (ground_y - wall_top) // 2, door_x + door_w, ground_y), fill=COLORS["brown"])
    win = max(3, house_w // 6)
    win_y = wall_top + (ground_y - wall_top) // 5
    for wx in (x0 + house_w // 8, x0 + house_w - house_w // 8 - win):
        draw.rectangle((wx, win_y, wx + win, win_y + win), fill=(180, 220, 255), outline=COLORS["black"])
    return img, f"{_a(wall_name)} house with {_a(roof_name)} roof under a blue sky"


def _stripes(rng: random.Random, size: tuple[int, int]) -> Scene:
    """Two-colour vertical or horizontal stripes."""
    width, height = size
    first, second = rng.sample(["red", "white", "blue", "yellow", "black", "green"], 2)
    vertical = rng.random() < 0.5
    band = rng.randint(4, 12)
    img = Image.new("RGB", size, COLORS[first])
    draw = ImageDraw.Draw(img)
    for start in range(band, width if vertical else height, 2 * band):
        box = (start, 0, start + band - 1, height) if vertical else (0, start, width, start + band - 1)
        draw.rectangle(box, fill=COLORS[second])
    return img, f"{first} and {second} {'vertical' if vertical else 'horizontal'} stripes"


def _checkerboard(rng: random.Random, size: tuple[int, int]) -> Scene:
    """A two-colour checkerboard."""
    width, height = size
    first, second = rng.choice([("black", "white"), ("red", "white"), ("blue", "yellow"), ("green", "pink")])
    cell = rng.randint(6, 16)
    img = Image.new("RGB", size, COLORS[first])
    draw = ImageDraw.Draw(img)
    for y in range(0, height, cell):
        for x in range(0, width, cell):
            if (x // cell + y // cell) % 2:
                draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=COLORS[second])
    return img, _a(f"{first} and {second} checkerboard")


_DRAW: dict[str, Callable[[random.Random, tuple[int, int]], Scene]] = {
    "shapes": _shapes,
    "landscape": _landscape,
    "house": _house,
    "stripes": _stripes,
    "checkerboard": _checkerboard,
}


def _vary_size(rng: random.Random, size: tuple[int, int], index: int) -> tuple[int, int]:
    """``size`` scaled by 80–130 %, some landscape, some portrait, some square."""
    width, height = size
    scale = rng.uniform(0.8, 1.3)
    width, height = max(8, round(width * scale)), max(8, round(height * scale))
    shape = index % 3
    if shape == 1:
        width, height = height, width
    elif shape == 2:
        width = height = max(width, height)
    return width, height


def _encode(img: Image.Image, variant: str) -> tuple[bytes, str]:
    """Encode one drawn image in the given variant; returns the bytes and file extension."""
    buf = io.BytesIO()
    if variant == "exif":
        exif = Image.Exif()
        exif[_EXIF_ORIENTATION] = 6
        img.transpose(Image.Transpose.ROTATE_90).save(buf, format="JPEG", quality=90, exif=exif)
        return buf.getvalue(), ".jpg"
    if variant == "jpeg":
        img.save(buf, format="JPEG", quality=90)
        return buf.getvalue(), ".jpg"
    if variant == "L":
        img = img.convert("L")
    elif variant == "P":
        img = img.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    img.save(buf, format="PNG")
    return buf.getvalue(), ".png"


def _variants(n: int) -> list[str]:
    """How each of the ``n`` images is stored.

    The others are RGB PNG (every third) or JPEG; the special modes sit at odd indices 1, 3, 5, 7 (or
    at the first indices when ``n < 8``, as many as fit).
    """
    variants = ["png" if i % 3 == 0 else "jpeg" for i in range(n)]
    for k, special in enumerate(("L", "RGBA", "P", "exif")):
        position = 2 * k + 1 if n >= 8 else k
        if position < n:
            variants[position] = special
    return variants


def _corrupt_file(rng: random.Random, kind: int) -> tuple[bytes, str, str]:
    """Bytes, extension and caption of one undecodable file."""
    if kind == 0:
        buf = io.BytesIO()
        _gradient((64, 48), COLORS["blue"], COLORS["green"]).save(buf, format="PNG")
        return buf.getvalue()[: len(buf.getvalue()) // 2], ".png", "a truncated picture of a blue and green gradient"
    if kind == 1:
        return rng.randbytes(512), ".jpg", "random noise that is not really a photo"
    return b"", ".png", "an empty file that should have been a picture"


def _write(url: str, data: bytes) -> None:
    fs, path = storage.resolve(url)
    fs.pipe_file(path, data)


def draw_sample_images(
    out_dir: str,
    n: int = 12,
    corrupt: int = 0,
    seed: int = 0,
    size: tuple[int, int] = (96, 64),
) -> list[str]:
    """Draw ``n`` captioned synthetic images (plus ``corrupt`` undecodable files) into a folder.

    Scenes cycle through coloured shapes on gradients, landscapes, houses, stripes and
    checkerboards; each image's size varies around ``size`` with landscape, portrait
    and square aspect ratios. Most are RGB PNG or JPEG; with ``n >= 8`` one each is a
    grayscale ``L`` PNG, an ``RGBA`` PNG with a transparent background, a palette ``P``
    PNG and a JPEG whose pixels are stored rotated with EXIF orientation 6 (it shows
    upright once the orientation is applied). Each file ``sample-NNN.<ext>`` gets a
    ``sample-NNN.txt`` caption in plain English, so the folder can be imported with
    :func:`pixelmill.datasets.import_folder`. The corrupt files ``corrupt-NNN.<ext>``
    (a truncated PNG, random bytes named ``.jpg``, a zero-byte ``.png``, in turn) get
    captions too. The output is byte-for-byte the same for the same arguments.

    Args:
        out_dir: the folder to write (created if missing; local path or fsspec URL).
        n: number of decodable images.
        corrupt: number of extra undecodable files.
        seed: seed of the random choices.
        size: nominal ``(width, height)`` the sizes vary around.

    Returns:
        The paths of the image files written (not the captions), sorted.
    """
    rng = random.Random(seed)
    storage.makedirs(out_dir)
    written: list[str] = []
    scene_order = list(_SCENES)
    rng.shuffle(scene_order)
    for index, variant in enumerate(_variants(n)):
        img_size = _vary_size(rng, size, index)
        if variant == "RGBA":
            img, caption = _shapes(rng, img_size, transparent=True)
        else:
            scene = "house" if variant == "exif" else scene_order[index % len(scene_order)]
            img, caption = _DRAW[scene](rng, img_size)
        if variant == "L":
            caption = f"a black and white picture of {caption}"
        data, ext = _encode(img, variant)
        stem = storage.join(out_dir, f"sample-{index:03d}")
        _write(stem + ext, data)
        _write(stem + ".txt", (caption + "\n").encode("utf-8"))
        written.append(stem + ext)
    for index in range(corrupt):
        data, ext, caption = _corrupt_file(rng, index % 3)
        stem = storage.join(out_dir, f"corrupt-{index:03d}")
        _write(stem + ext, data)
        _write(stem + ".txt", (caption + "\n").encode("utf-8"))
        written.append(stem + ext)
    return sorted(written)


POOL_SUBJECTS = ("dog", "cat", "house", "car")
POOL_ADJECTIVES = ("brown", "black", "small", "happy", "white", "big", "sleepy", "young", "red", "old",
                   "tiny", "fluffy")


def sample_pool_captions(per_subject: int = 12) -> list[str]:
    """Captions for a sample retrieval pool: "a photo of a <adjective> <subject>" variations."""
    return [f"a photo of a {adj} {subject}" for subject in POOL_SUBJECTS
            for adj in POOL_ADJECTIVES[:per_subject]]


def write_sample_pool_source(folder: str, base_url: str, out_url: str, per_subject: int = 12,
                             seed: int = 0) -> int:
    """Draw one image per sample caption into ``folder`` and write a dataset for ``pool build``.

    The dataset has ``id``, ``caption``, ``url`` (``base_url`` + file name, for a loopback
    server serving ``folder``) and ``image``; returns its row count.
    """
    import pyarrow as pa

    from pixelmill.datasets import DatasetWriter, stable_id

    captions = sample_pool_captions(per_subject)
    paths = draw_sample_images(folder, n=len(captions), seed=seed)
    rows = []
    for caption, path in zip(captions, paths):
        name = path.rsplit("/", 1)[-1]
        with open(path, "rb") as f:
            data = f.read()
        rows.append({"id": stable_id("pool", caption), "caption": caption, "url": f"{base_url.rstrip('/')}/{name}",
                     "image": {"bytes": data, "path": name}})
    writer = DatasetWriter(out_url, "images", 1, {"sample_pool": per_subject, "seed": seed}).open(overwrite=True)
    sw = writer.shard("00000")
    sw.write(pa.Table.from_pylist(rows))
    sw.commit()
    writer.finish()
    return len(rows)


class LoopbackFileServer:
    """Serve a folder over HTTP on 127.0.0.1 (a free port) in a background thread.

    The demo's stand-in for the web: retrieval downloads the sample pool's images from it.
    """

    def __init__(self, folder: str) -> None:
        import functools
        import threading

        handler = functools.partial(_QuietHandler, directory=folder)
        self.httpd = _QuietServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> LoopbackFileServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        """A client that hangs up early (a cancelled surplus download) is not an error."""
        import sys

        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args) -> None:  # noqa: A002 - the stdlib's name
        pass


def draw_concept_images(n: int, seed: int = 0, size: tuple[int, int] = (64, 64),
                        color: tuple[int, int, int] = (220, 40, 40), shape: str = "disk") -> list[Image.Image]:
    """``n`` pictures of one made-up subject (a coloured disk or square with a stripe) on varied backgrounds.

    The subject keeps its colour and shape while its position, scale and background
    change, as a handful of photos of one object would: a small instance set for the
    fine-tuning tests and demo.
    """
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        w, h = size
        bg = rng.integers(40, 200, size=3)
        grad = np.linspace(0.6, 1.2, h)[:, None, None] * bg[None, None, :]
        arr = np.clip(np.repeat(grad, w, axis=1), 0, 255).astype(np.uint8)
        img = Image.fromarray(arr)
        d = ImageDraw.Draw(img)
        r = int(min(w, h) * rng.uniform(0.2, 0.32))
        cx, cy = int(rng.uniform(r, w - r)), int(rng.uniform(r, h - r))
        box = (cx - r, cy - r, cx + r, cy + r)
        (d.ellipse if shape == "disk" else d.rectangle)(box, fill=tuple(int(c) for c in color))
        d.rectangle((cx - r // 2, cy - 2, cx + r // 2, cy + 2), fill=(250, 250, 250))
        out.append(img)
    return out


def write_image_dataset(url: str, images: list[Image.Image], captions: list[str] | None = None,
                        ids: list[str] | None = None) -> str:
    """Write images (and captions) as a one-shard pixelmill dataset; returns ``url``."""
    import pyarrow as pa

    from pixelmill.datasets.images import IMAGE_TYPE, encode_image

    ids = ids or [f"{i:04d}" for i in range(len(images))]
    captions = captions or [""] * len(images)
    table = pa.table({"id": ids, "image": pa.array([encode_image(im) for im in images], IMAGE_TYPE),
                      "caption": captions})
    return write_table_dataset(url, table, "images", {"source": "pixelmill.samples"})
