"""Image cells in Parquet, stored the way Hugging Face ``datasets`` stores its ``Image``.

An image column is a ``struct<bytes: binary, path: string>``; with the ``huggingface``
schema metadata written by :func:`with_hf_features`, ``datasets.load_dataset`` decodes it
to PIL images, while DuckDB, pandas and Ray Data read the plain struct.
"""

from __future__ import annotations

import io
import json
import warnings
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])

_WHITE = (255, 255, 255)


class ImageError(ValueError):
    """An image that cannot be used; ``reason`` is a short code fit for a reject row.

    Args:
        reason: short machine-readable cause (``undecodable``, ``too_large``, ``empty``,
            ``unsupported_mode``).
        detail: human-readable explanation.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


def encode_image(img: Image.Image, format: str = "PNG", **options: Any) -> dict[str, Any]:
    """Encode a PIL image into an image cell ``{"bytes": ..., "path": None}``.

    Args:
        img: the image.
        format: any format PIL can write (``PNG`` is lossless; ``JPEG`` needs RGB or L).
        options: the format's save options (``quality=95`` for JPEG; PIL's default is 75).
    """
    buf = io.BytesIO()
    img.save(buf, format=format, **options)
    return {"bytes": buf.getvalue(), "path": None}


def decode_image(value: dict[str, Any] | bytes | bytearray | memoryview) -> Image.Image:
    """Decode an image cell (or raw encoded bytes) into a loaded PIL image.

    Args:
        value: a ``{"bytes", "path"}`` dict as read from Parquet, or the encoded bytes.
            A cell without bytes is read from its ``path`` (any fsspec URL).
    """
    if isinstance(value, dict):
        data = value.get("bytes")
        if data is None:
            path = value.get("path")
            if not path:
                raise ImageError("empty", "image cell has neither bytes nor path")
            from pixelmill.datasets.storage import read_bytes

            data = read_bytes(path)
    else:
        data = value
    if data is None or len(data) == 0:
        raise ImageError("empty", "no image bytes")
    try:
        img = Image.open(io.BytesIO(bytes(data)))
        img.load()
    except Exception as exc:
        raise ImageError("undecodable", f"{type(exc).__name__}: {exc}") from exc
    return img


MIN_SIDE = 8
"""Smallest accepted width or height of a source image: below it there is nothing to edit."""


def normalize_image(
    data: bytes,
    resolution: int = 512,
    max_pixels: int = 50_000_000,
    multiple: int = 8,
    min_side: int = MIN_SIDE,
    notes: list[str] | None = None,
) -> Image.Image:
    """Decode untrusted image bytes into an RGB image sized for a diffusion model.

    The header is read first and images over ``max_pixels`` are refused before any pixel
    is decoded, so a small file declaring a huge canvas cannot exhaust memory (PIL's own
    global ``Image.MAX_IMAGE_PIXELS`` guard is turned into the same error). EXIF
    orientation is applied; grey, palette (with transparency), alpha, CMYK, 16-bit and
    float images become 8-bit RGB, transparent areas white. An animated image (GIF, APNG,
    WebP) gives its first frame, and says so in ``notes``. The long side is resized to
    ``resolution`` (up or down, LANCZOS, aspect kept), then both sides are rounded down
    to a multiple of ``multiple``.

    Args:
        data: the encoded image file.
        resolution: target length of the long side, before snapping.
        max_pixels: largest accepted ``width * height`` of the source.
        multiple: both output sides are multiples of this (and at least this).
        min_side: smallest accepted source width or height (a 1x1 pixel is no image to edit).
        notes: when given, what was done that a reader of the output should know is
            appended to it (``first of 3 frames of an animated GIF``).

    Raises:
        ImageError: ``empty``, ``too_large``, ``too_small``, ``undecodable`` or ``unsupported_mode``.
    """
    if not data:
        raise ImageError("empty", "no image bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(bytes(data)))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError("too_large", str(exc)) from exc
    except UnidentifiedImageError as exc:
        raise ImageError("undecodable", "not a recognised image format") from exc
    except Exception as exc:
        raise ImageError("undecodable", f"{type(exc).__name__}: {exc}") from exc

    width, height = img.size
    if width <= 0 or height <= 0:
        raise ImageError("undecodable", f"invalid size {width}x{height}")
    if width * height > max_pixels:
        raise ImageError("too_large", f"{width}x{height} exceeds {max_pixels} pixels")
    if min(width, height) < min_side:
        raise ImageError("too_small", f"{width}x{height}: both sides must be at least {min_side} pixels")

    try:
        frames = int(getattr(img, "n_frames", 1) or 1)
        if frames > 1:
            img.seek(0)
            if notes is not None:
                notes.append(f"first of {frames} frames used ({img.format or 'multi-frame'} image)")
        if img.format == "JPEG":
            img.draft(None, (resolution, resolution))
        img.load()
        img = ImageOps.exif_transpose(img)
    except Exception as exc:
        raise ImageError("undecodable", f"{type(exc).__name__}: {exc}") from exc

    rgb = _to_rgb(img)
    return rgb.resize(_target_size(rgb.size, resolution, multiple), Image.Resampling.LANCZOS)


def _target_size(size: tuple[int, int], resolution: int, multiple: int) -> tuple[int, int]:
    width, height = size
    scale = resolution / max(width, height)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    return (
        max(multiple, new_w // multiple * multiple),
        max(multiple, new_h // multiple * multiple),
    )


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB, compositing transparency onto white."""
    mode = img.mode
    try:
        if mode == "RGB":
            return img
        if mode.startswith("I;16") or mode in ("I", "F"):
            return Image.fromarray(_to_uint8(np.asarray(img), mode), "L").convert("RGB")
        if mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")
        elif mode in ("LA", "La", "PA", "RGBa"):
            img = img.convert("RGBA")
        if img.mode == "RGBA":
            background = Image.new("RGB", img.size, _WHITE)
            background.paste(img, mask=img.getchannel("A"))
            return background
        return img.convert("RGB")
    except ImageError:
        raise
    except Exception as exc:
        raise ImageError("unsupported_mode", f"cannot convert mode {mode}: {exc}") from exc


def _to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    """Scale a 16-bit, 32-bit integer or float grey image to 0..255 without clipping.

    ``I;16*`` is 0..65535. ``I`` and ``F`` carry no declared range: values already in
    0..255 are kept (``F`` in 0..1 is scaled by 255), 16-bit-ranged ``I`` is scaled like
    ``I;16``, anything else is stretched from its min to its max.
    """
    values = arr.astype(np.float64)
    finite = values[np.isfinite(values)]
    lo = float(finite.min()) if finite.size else 0.0
    hi = float(finite.max()) if finite.size else 0.0
    if mode.startswith("I;16"):
        scaled = values / 257.0
    elif mode == "F" and lo >= 0.0 and hi <= 1.0:
        scaled = values * 255.0
    elif lo >= 0.0 and hi <= 255.0:
        scaled = values
    elif mode == "I" and lo >= 0.0 and hi <= 65535.0:
        scaled = values / 257.0
    elif hi > lo:
        scaled = (values - lo) * (255.0 / (hi - lo))
    else:
        scaled = np.zeros_like(values)
    scaled = np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def hf_feature(pa_type: pa.DataType) -> dict[str, Any]:
    """Describe one Arrow type the way ``datasets.Features.to_dict()`` does.

    Args:
        pa_type: the column type; :data:`IMAGE_TYPE` becomes an ``Image`` feature.
    """
    if pa_type == IMAGE_TYPE:
        return {"_type": "Image"}
    if pa.types.is_struct(pa_type):
        return {field.name: hf_feature(field.type) for field in pa_type}
    if pa.types.is_fixed_size_list(pa_type):
        return {"feature": hf_feature(pa_type.value_type), "length": pa_type.list_size, "_type": "List"}
    if pa.types.is_list(pa_type):
        return {"feature": hf_feature(pa_type.value_type), "_type": "List"}
    if pa.types.is_large_list(pa_type):
        return {"feature": hf_feature(pa_type.value_type), "_type": "LargeList"}
    if pa.types.is_dictionary(pa_type):
        return hf_feature(pa_type.value_type)
    if pa.types.is_fixed_size_binary(pa_type):  # `datasets` has no fixed-size binary; it reads these as binary
        return {"dtype": "binary", "_type": "Value"}
    return {"dtype": _value_dtype(pa_type), "_type": "Value"}


def _value_dtype(pa_type: pa.DataType) -> str:
    names = {pa.float16(): "float16", pa.float32(): "float32", pa.float64(): "float64",
             pa.bool_(): "bool", pa.date32(): "date32", pa.date64(): "date64"}
    if pa_type in names:
        return names[pa_type]
    if pa.types.is_timestamp(pa_type) and pa_type.tz:
        return f"timestamp[{pa_type.unit}, tz={pa_type.tz}]"
    return str(pa_type)


def hf_features(schema: pa.Schema) -> dict[str, Any]:
    """The ``datasets`` features dict for every column of a schema."""
    return {field.name: hf_feature(field.type) for field in schema}


def with_hf_schema(schema: pa.Schema) -> pa.Schema:
    """Return ``schema`` with the ``huggingface`` features metadata set (other keys kept)."""
    metadata = dict(schema.metadata or {})
    metadata[b"huggingface"] = json.dumps({"info": {"features": hf_features(schema)}}).encode()
    return schema.with_metadata(metadata)


def with_hf_features(table: pa.Table) -> pa.Table:
    """Attach Hugging Face ``datasets`` features metadata to a table.

    With it, ``datasets.load_dataset`` decodes :data:`IMAGE_TYPE` columns into PIL
    images and keeps the declared dtypes; other readers ignore the metadata.

    Args:
        table: the table to describe; its data is not copied.
    """
    return table.replace_schema_metadata(with_hf_schema(table.schema).metadata)

