"""The bad-input corpus: inputs users really send, each with the outcome pixelmill promises.

Every kind is built at test time, deterministically, from PIL / numpy / PyAV (nothing
binary is committed). :data:`KINDS` is the table: a kind's ``category`` says how the
tests exercise it, ``outcome`` what must happen and ``expect`` a substring of the reject
reason, the recorded note or the exit-2 message.

* ``image row`` / ``text row``: one row of ONE edit dataset (:func:`build_edit_rows`),
  edited once through ``pixelmill edit`` (``tests/integration/test_bad_input_cli.py``);
  the image kinds are also checked directly against ``normalize_image``.
* ``video``: video bytes, checked against the video job's decoder (``_decode``).
* ``dataset`` / ``config`` / ``pool`` / ``names``: whole-input problems; the CLI must
  exit 2 before anything starts, naming the problem, without a traceback
  (:func:`build_case` returns the command line).

The README's "Bad input" table is :func:`markdown_table` (a test keeps them equal).
"""

from __future__ import annotations

import io
import json
import shutil
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from PIL import Image

EDITED = "edited"
RECORDED = "edited, recorded in `notes`"
TRUNCATED = "truncated, recorded in `notes`"
REJECT = "row reject"
EXIT2 = "exit 2 before work starts"
POOL_REJECT = "row rejects (`invalid_vectors: reject`)"

MARKER = (255, 0, 0)  # the red corner that says which way is up
PROMPT = "a watercolor painting"


@dataclass(frozen=True)
class Kind:
    """One kind of bad or unusual input.

    Args:
        name: short id (test ids, the README table).
        category: how it is exercised (see the module docstring).
        what: what the input is, for the README.
        outcome: what must happen (``EDITED``, ``REJECT``, ``EXIT2``...).
        expect: a substring of the reject reason / note / error message.
    """

    name: str
    category: str
    what: str
    outcome: str
    expect: str


def _png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95, **kw)
    return buf.getvalue()


def upright(size: tuple[int, int] = (96, 64)) -> Image.Image:
    """A landscape test picture: blue-grey gradient with a red square in the top-left corner."""
    w, h = size
    x = np.linspace(0, 1, w)[None, :, None]
    y = np.linspace(0, 1, h)[:, None, None]
    arr = (np.concatenate([0.2 + 0 * x * y, 0.3 + 0.4 * y + 0 * x, 0.4 + 0.5 * x + 0 * y], axis=2) * 255)
    arr = arr.astype(np.uint8)
    arr[: h // 4, : w // 4] = MARKER
    return Image.fromarray(arr, "RGB")


def marker_corner(img: Image.Image) -> str:
    """Which corner (``tl``, ``tr``, ``bl``, ``br``) of an image is the reddest."""
    a = np.asarray(img.convert("RGB"), dtype=np.float64)
    h, w = a.shape[:2]
    red = a[..., 0] - (a[..., 1] + a[..., 2]) / 2
    quads = {"tl": red[: h // 3, : w // 3], "tr": red[: h // 3, -w // 3:],
             "bl": red[-h // 3:, : w // 3], "br": red[-h // 3:, -w // 3:]}
    return max(quads, key=lambda k: quads[k].mean())


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def raw_png(width: int, height: int, bit_depth: int, color_type: int, rows: bytes | None = None) -> bytes:
    """A PNG written by hand: 16-bit RGB (PIL cannot write it), or a header declaring a huge canvas."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    idat = zlib.compress(rows if rows is not None else b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


# --- image rows ------------------------------------------------------------------------


def _gray16() -> bytes:
    arr = (np.linspace(0, 65535, 64 * 48).reshape(48, 64)).astype(np.uint16)
    return _png(Image.fromarray(arr))  # uint16 -> mode I;16


def _rgb48() -> bytes:
    h, w = 40, 56
    arr = np.zeros((h, w, 3), np.uint16)
    arr[..., 0] = np.linspace(0, 65535, w)[None, :]
    arr[..., 2] = 40000
    rows = b"".join(b"\0" + arr[r].astype(">u2").tobytes() for r in range(h))
    return raw_png(w, h, 16, 2, rows)


def _cmyk() -> bytes:
    return _jpeg(upright().convert("CMYK"))


def _palette_transparent() -> bytes:
    img = upright().quantize(16)
    return _png(img, transparency=0)


def _exif_rotated() -> bytes:
    """Pixels stored sideways with EXIF orientation 6 (display rotated 90° clockwise): upright when honoured."""
    stored = upright().transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    return _jpeg(stored, exif=exif.tobytes())


def _animated_gif() -> bytes:
    frames = [Image.new("RGB", (48, 48), c) for c in ((0, 0, 255), (255, 0, 0), (0, 255, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


def _gray() -> bytes:
    return _png(upright().convert("L"))


def _gray_alpha() -> bytes:
    return _png(upright().convert("LA"))


def _rgba() -> bytes:
    img = upright().convert("RGBA")
    img.putalpha(128)
    return _png(img)


def _float_tiff() -> bytes:
    arr = np.linspace(0.0, 1.0, 48 * 40, dtype=np.float32).reshape(40, 48)
    buf = io.BytesIO()
    Image.fromarray(arr, "F").save(buf, format="TIFF")
    return buf.getvalue()


def _webp() -> bytes:
    buf = io.BytesIO()
    upright().save(buf, format="WEBP", quality=90)
    return buf.getvalue()


def _wide() -> bytes:
    return _png(upright((1200, 24)))


def _tall() -> bytes:
    return _png(upright((24, 1200)))


def _truncated_png() -> bytes:
    data = _png(upright((128, 128)).convert("RGB"))
    return data[: len(data) // 2]


def _truncated_jpeg() -> bytes:
    rng = np.random.default_rng(0)
    data = _jpeg(Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)))
    return data[: len(data) // 2]


def _html() -> bytes:
    return b"<!DOCTYPE html><html><head><title>404 Not Found</title></head><body>Not Found</body></html>\n"


def _one_pixel() -> bytes:
    return _png(Image.new("RGB", (1, 1), (200, 10, 10)))


def _bomb() -> bytes:
    """A 100-byte PNG declaring a 100,000 x 100,000 canvas (10 gigapixels)."""
    return raw_png(100_000, 100_000, 8, 2)


LONG_PROMPT = ("a watercolor painting of a lighthouse on a cliff at dusk " * 200)[:10_000]
INVALID_UTF8 = b"a caf\xe9 at night"  # Latin-1 bytes in a UTF-8 column

# name -> (builder of the image cell bytes or None, prompt cell: str, bytes or None)
ROW_BUILDERS: dict[str, tuple[Callable[[], bytes | None], Any]] = {
    "plain": (lambda: _png(upright()), PROMPT),
    "gray16_png": (_gray16, PROMPT),
    "rgb48_png": (_rgb48, PROMPT),
    "cmyk_jpeg": (_cmyk, PROMPT),
    "palette_transparency": (_palette_transparent, PROMPT),
    "exif_rotated": (_exif_rotated, PROMPT),
    "animated_gif": (_animated_gif, PROMPT),
    "grayscale": (_gray, PROMPT),
    "grayscale_alpha": (_gray_alpha, PROMPT),
    "rgba": (_rgba, PROMPT),
    "float_tiff": (_float_tiff, PROMPT),
    "webp": (_webp, PROMPT),
    "wide_50to1": (_wide, PROMPT),
    "tall_1to50": (_tall, PROMPT),
    "zero_bytes": (lambda: b"", PROMPT),
    "null_image": (lambda: None, PROMPT),
    "truncated_png": (_truncated_png, PROMPT),
    "truncated_jpeg": (_truncated_jpeg, PROMPT),
    "html_as_jpg": (_html, PROMPT),
    "one_pixel": (_one_pixel, PROMPT),
    "decompression_bomb": (_bomb, PROMPT),
    "null_prompt": (lambda: _png(upright()), None),
    "empty_prompt": (lambda: _png(upright()), ""),
    "blank_prompt": (lambda: _png(upright()), "   \n\t"),
    "non_utf8_caption": (lambda: _png(upright()), INVALID_UTF8),
    "prompt_10000_chars": (lambda: _png(upright()), LONG_PROMPT),
}


def _string_array(values: list[Any]) -> pa.Array:
    """A ``string`` array that may hold invalid UTF-8 (bytes values), as another tool could write it."""
    data, offsets, valid = b"", [0], []
    for v in values:
        raw = b"" if v is None else (v if isinstance(v, bytes) else v.encode("utf-8"))
        data += raw
        offsets.append(len(data))
        valid.append(v is not None)
    mask = pa.array(valid, pa.bool_()).buffers()[1]
    return pa.Array.from_buffers(pa.string(), len(values),
                                 [mask, pa.py_buffer(np.asarray(offsets, np.int32).tobytes()), pa.py_buffer(data)],
                                 null_count=valid.count(False))


def write_dataset(url: str | Path, table: pa.Table, rows_per_shard: int | None = None) -> str:
    """``table`` as a complete pixelmill dataset (Hugging Face image metadata on the image column)."""
    from pixelmill.datasets.images import with_hf_features
    from pixelmill.datasets.writer import write_table_dataset

    return write_table_dataset(str(url), with_hf_features(table), "images", {"corpus": 1}, rows_per_shard)


def edit_table(names: list[str] | None = None) -> pa.Table:
    """One row per row kind (``id`` = kind name): ``image`` cells and a ``caption`` used as the prompt."""
    from pixelmill.datasets.images import IMAGE_TYPE

    names = names or list(ROW_BUILDERS)
    images, prompts = [], []
    for n in names:
        build, prompt = ROW_BUILDERS[n]
        data = build()
        images.append(None if data is None else {"bytes": data, "path": f"{n}.img"})
        prompts.append(prompt)
    return pa.table({"id": pa.array(names, pa.string()), "image": pa.array(images, IMAGE_TYPE),
                     "caption": _string_array(prompts)})


def build_edit_rows(root: Path) -> str:
    """The one edit dataset holding every row kind (two shards)."""
    return write_dataset(root / "rows", edit_table(), rows_per_shard=13)


# --- videos ----------------------------------------------------------------------------


def _encode(frames: list[np.ndarray], pts: list[int] | None = None, rate: int = 25, codec: str = "mpeg4") -> bytes:
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        stream = out.add_stream(codec, rate=rate)
        h, w = frames[0].shape[:2] if frames else (64, 64)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.codec_context.time_base = Fraction(1, rate)
        if not frames:
            out.start_encoding()  # the header with its video stream, then no frame at all
        for i, f in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(f, format="rgb24")
            frame.pts = pts[i] if pts else i
            frame.time_base = Fraction(1, rate)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def _moving(n: int, size: tuple[int, int] = (64, 48)) -> list[np.ndarray]:
    w, h = size
    frames = []
    for i in range(n):
        a = np.full((h, w, 3), 60, np.uint8)
        a[10:20, 4 + 3 * i: 14 + 3 * i] = (250, 200, 0)
        frames.append(a)
    return frames


VIDEO_BUILDERS: dict[str, Callable[[], bytes]] = {
    "video_zero_frames": lambda: _encode([]),
    "video_one_frame": lambda: _encode(_moving(1)),
    "video_huge_resolution": lambda: _encode([np.zeros((4096, 4160, 3), np.uint8)]),
    "video_variable_frame_rate": lambda: _encode(_moving(6), pts=[0, 1, 2, 6, 7, 12]),
    "video_not_a_video": lambda: _html(),
    "video_constant_rate": lambda: _encode(_moving(6)),
}


# --- whole-input cases (exit 2) ----------------------------------------------------------


def _good_table() -> pa.Table:
    return edit_table(["plain", "grayscale", "cmyk_jpeg"])


def _edit_config(root: Path, models: dict[str, str], data: str, **over) -> Path:
    cfg = dict(input=data, output=str(root / "out"), model=models["img2img"], prompt_column="caption",
               strength=0.5, steps=2, resolution=32, seed=1)
    cfg.update(over)
    path = root / "edit.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _dataset_case(root: Path, models: dict[str, str], kind: str) -> list[str]:
    good = _good_table()
    url = root / "data"
    over: dict[str, Any] = {}
    if kind == "missing_column":
        write_dataset(url, good)
        over = {"prompt_column": "instruction"}
    elif kind == "image_column_wrong_type":
        write_dataset(url, good.set_column(1, "image", pa.array([1, 2, 3], pa.int64())))
    elif kind == "text_column_wrong_type":
        write_dataset(url, good.set_column(2, "caption", pa.array([1.5, 2.5, 3.5])))
    elif kind == "missing_id_column":
        write_dataset(url, good.drop_columns(["id"]))
    elif kind == "duplicate_ids":
        write_dataset(url, good.set_column(0, "id", pa.array(["dup-a", "dup-a", "x"])), rows_per_shard=2)
    elif kind == "null_id":
        write_dataset(url, good.set_column(0, "id", pa.array(["a", None, "c"], pa.string())))
    elif kind == "dotdot_id":
        write_dataset(url, good.set_column(0, "id", pa.array(["a", "../../etc/passwd", "c"])))
    elif kind == "empty_dataset":
        write_dataset(url, good.slice(0, 0))
    elif kind == "missing_shard":
        write_dataset(url, good, rows_per_shard=1)
        (url / "part-00001.parquet").unlink()
    elif kind == "manifest_not_json":
        write_dataset(url, good)
        (url / "_manifest.json").write_text("{'schema_name': 'images', oops")
    elif kind == "shard_not_parquet":
        write_dataset(url, good, rows_per_shard=2)
        (url / "part-00001.parquet").write_bytes(b"PK\x03\x04 this is a zip, not parquet")
    elif kind == "shard_rows_changed":
        write_dataset(url, good)
        pq.write_table(good.slice(0, 2), url / "part-00000.parquet")
    else:
        raise KeyError(kind)
    return ["edit", str(_edit_config(root, models, str(url), **over))]


def _config_case(root: Path, models: dict[str, str], kind: str) -> list[str]:
    data = write_dataset(root / "data", _good_table())
    over: dict[str, Any] = {
        "unknown_key": {"stepz": 3},
        "negative_steps": {"steps": -5},
        "strength_zero": {"strength": 0},
        "strength_above_one": {"strength": 1.5},
        "model_missing": {"model": str(root / "no-such-model")},
        "api_key_in_config": {},
    }.get(kind, {})
    if kind == "pickle_checkpoint":
        model = root / "pickled-model"
        shutil.copytree(models["img2img"], model)
        for f in model.rglob("*.safetensors"):
            f.with_suffix(".bin").write_bytes(b"\x80\x04\x95 pickled: loading this would run code")
            f.unlink()
        over = {"model": str(model)}
    elif kind == "ckpt_file":
        ckpt = root / "sd-v1-5.ckpt"
        ckpt.write_bytes(b"\x80\x02 pickled checkpoint")
        over = {"model": str(ckpt)}
    return ["edit", str(_edit_config(root, models, data, **over))]


def _pool_case(root: Path, models: dict[str, str], kind: str) -> list[str]:
    from pixelmill.datasets.pool.writer import write_laion_layout
    from pixelmill.tasks.regularization import clip_embed_dim

    dim = clip_embed_dim(models["clip"])
    rng = np.random.default_rng(3)
    parts = []
    for i, n in enumerate((20, 20)):
        meta = pa.table({"id": [f"p{i}-{r}" for r in range(n)], "url": [f"http://127.0.0.1:1/{i}/{r}.png"
                                                                        for r in range(n)],
                         "caption": [f"caption {i} {r}" for r in range(n)]})
        txt = rng.standard_normal((n, dim)).astype(np.float16)
        parts.append([None, txt, meta])
    invalid = "error"
    if kind in ("pool_nan", "pool_nan_reject"):
        parts[1][1][[4, 9]] = np.nan
        invalid = "reject" if kind == "pool_nan_reject" else "error"
    elif kind == "pool_zero":
        parts[0][1][7] = 0
    elif kind == "pool_wrong_width":
        parts[1][1] = rng.standard_normal((20, dim + 8)).astype(np.float16)
    elif kind == "pool_misaligned":
        parts[1][2] = parts[1][2].slice(0, 15)
    pool = write_laion_layout(str(root / "pool"), [tuple(p) for p in parts], clip_model=models["clip"])
    cfg = dict(prompts=["a photo of a dog"], pool=pool, output=str(root / "ret"), num_images=2,
               clip_model=models["clip"], invalid_vectors=invalid,
               download={"allow_loopback": True, "timeout": 1, "retries": 0})
    path = root / "retrieve.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return ["retrieve", str(path)] + (["--dry-run"] if kind == "pool_nan_reject" else [])


def _names_case(root: Path, models: dict[str, str], kind: str) -> list[str]:
    from pixelmill.datasets.videos import write_video_dataset

    if kind == "video_dotdot_id":
        data = write_video_dataset(str(root / "videos"), [("ok", VIDEO_BUILDERS["video_constant_rate"]()),
                                                          ("../../escape", b"x")])
        cfg = dict(input=data, output=str(root / "vout"), atlas={"method": "homography"},
                   edit={"method": "sdedit", "model": models["img2img"], "prompt": PROMPT, "steps": 2})
        path = root / "video.yaml"
    elif kind == "pipeline_dotdot_step":
        cfg = {"steps": [{"name": "../escape", "uses": "edit", "with": {}}]}
        path = root / "pipeline.yaml"
    else:
        raise KeyError(kind)
    path.write_text(yaml.safe_dump(cfg))
    return ["run" if kind.startswith("pipeline") else "video", str(path)]


CASE_BUILDERS = {"dataset": _dataset_case, "config": _config_case, "pool": _pool_case, "names": _names_case}


def build_case(kind: Kind, root: Path, models: dict[str, str]) -> list[str]:
    """Build a whole-input case under ``root``; returns the ``pixelmill`` arguments that must exit 2."""
    root.mkdir(parents=True, exist_ok=True)
    return CASE_BUILDERS[kind.category](root, models, kind.name)


# --- the table ---------------------------------------------------------------------------

K = Kind
KINDS: list[Kind] = [
    K("plain", "image row", "an ordinary RGB PNG (the control)", EDITED, ""),
    K("gray16_png", "image row", "16-bit grayscale PNG (I;16)", EDITED, ""),
    K("rgb48_png", "image row", "16-bit-per-channel RGB PNG", EDITED, ""),
    K("cmyk_jpeg", "image row", "CMYK JPEG", EDITED, ""),
    K("palette_transparency", "image row", "palette PNG with a transparent colour", EDITED, ""),
    K("exif_rotated", "image row", "JPEG stored sideways with EXIF orientation 6", "edited upright", ""),
    K("animated_gif", "image row", "animated GIF, 3 frames", RECORDED, "first of 3 frames used"),
    K("grayscale", "image row", "8-bit grayscale PNG", EDITED, ""),
    K("grayscale_alpha", "image row", "grayscale + alpha PNG", EDITED, ""),
    K("rgba", "image row", "RGBA PNG, half transparent", EDITED, ""),
    K("float_tiff", "image row", "32-bit float TIFF (mode F)", EDITED, ""),
    K("webp", "image row", "WebP", EDITED, ""),
    K("wide_50to1", "image row", "1200x24 panorama (50:1)", EDITED, ""),
    K("tall_1to50", "image row", "24x1200 strip (1:50)", EDITED, ""),
    K("zero_bytes", "image row", "zero-byte image cell", REJECT, "empty: no image bytes"),
    K("null_image", "image row", "null image cell", REJECT, "missing image in column 'image'"),
    K("truncated_png", "image row", "PNG cut in half", REJECT, "undecodable"),
    K("truncated_jpeg", "image row", "JPEG cut in half", REJECT, "undecodable"),
    K("html_as_jpg", "image row", "an HTML error page saved as .jpg", REJECT, "not a recognised image format"),
    K("one_pixel", "image row", "1x1 PNG", REJECT, "too_small: 1x1"),
    K("decompression_bomb", "image row", "100-byte PNG declaring 100,000x100,000 pixels", REJECT,
      "too_large"),
    K("null_prompt", "text row", "null prompt", REJECT, "missing prompt in column 'caption' (null)"),
    K("empty_prompt", "text row", "empty prompt", REJECT, "missing prompt in column 'caption' (empty)"),
    K("blank_prompt", "text row", "whitespace-only prompt", REJECT, "(empty)"),
    K("non_utf8_caption", "text row", "caption bytes that are not UTF-8 in a string column", REJECT,
      "not valid UTF-8 (byte 0xe9"),
    K("prompt_10000_chars", "text row", "10,000-character prompt", TRUNCATED, "truncated from 10000 to"),
    K("video_zero_frames", "video", "MP4 with a video stream and no frames", REJECT, "0 frames"),
    K("video_one_frame", "video", "single-frame MP4", REJECT, "has 1 frame"),
    K("video_huge_resolution", "video", "4160x4096 MP4 (over 4096² pixels a frame)", REJECT,
      "exceed the 16777216-pixel limit"),
    K("video_variable_frame_rate", "video", "MP4 with irregular frame timestamps", REJECT,
      "variable frame rate"),
    K("video_not_a_video", "video", "HTML bytes in the video column", REJECT, "unreadable or broken video"),
    K("video_constant_rate", "video", "6-frame constant-rate MP4 (the control)", "decoded", ""),
    K("missing_column", "dataset", "config names a column the input lacks", EXIT2,
      "prompt_column: column 'instruction' is not in the input"),
    K("image_column_wrong_type", "dataset", "image column holds integers", EXIT2,
      "image_column: column 'image' has type int64"),
    K("text_column_wrong_type", "dataset", "prompt column holds floats", EXIT2, "column 'caption' has type double"),
    K("missing_id_column", "dataset", "no id column", EXIT2, "column 'id' is not in shard"),
    K("duplicate_ids", "dataset", "an id repeated across shards", EXIT2, "ids must be unique; repeated: dup-a"),
    K("null_id", "dataset", "a null id", EXIT2, "null or empty id"),
    K("dotdot_id", "dataset", "an id `../../etc/passwd`", EXIT2, "'..' path segment"),
    K("empty_dataset", "dataset", "a dataset with no rows", EXIT2, "has no rows"),
    K("missing_shard", "dataset", "a shard listed in the manifest but missing", EXIT2,
      "listed in the manifest are missing: 00001"),
    K("manifest_not_json", "dataset", "`_manifest.json` that is not JSON", EXIT2, "_manifest.json is not JSON"),
    K("shard_not_parquet", "dataset", "a shard file that is not Parquet", EXIT2,
      "is not a readable Parquet file"),
    K("shard_rows_changed", "dataset", "a shard rewritten with fewer rows than its manifest says", EXIT2,
      "has 2 rows but the manifest lists 3"),
    K("unknown_key", "config", "an unknown config key", EXIT2, "stepz: unknown key"),
    K("negative_steps", "config", "`steps: -5`", EXIT2, "steps: Input should be greater than or equal to 1"),
    K("strength_zero", "config", "`strength: 0`", EXIT2, "outside (0, 1]"),
    K("strength_above_one", "config", "`strength: 1.5`", EXIT2, "outside (0, 1]"),
    K("model_missing", "config", "a model path that does not exist", EXIT2, "model folder not found"),
    K("pickle_checkpoint", "config", "a pipeline folder with only `.bin` weights", EXIT2,
      "weights only as pickled checkpoint(s)"),
    K("ckpt_file", "config", "`model:` a `.ckpt` file", EXIT2, "is a pickled checkpoint"),
    K("pool_nan", "pool", "pool with NaN embeddings", EXIT2, "2 with NaN/Inf values (first ids: p1-4, p1-9)"),
    K("pool_zero", "pool", "pool with an all-zero embedding", EXIT2, "1 all-zero or null (first ids: p0-7)"),
    K("pool_wrong_width", "pool", "pool part with another embedding width", EXIT2, "differs from the CLIP model"),
    K("pool_misaligned", "pool", "pool part with fewer metadata rows than vectors", EXIT2, "is misaligned"),
    K("pool_nan_reject", "pool", "NaN embeddings with `invalid_vectors: reject`", POOL_REJECT,
      "p1-4, p1-9"),
    K("video_dotdot_id", "names", "a video id `../../escape`", EXIT2, "'..' path segment"),
    K("pipeline_dotdot_step", "names", "a pipeline step named `../escape`", EXIT2, "use letters, digits"),
]

KINDS_BY_NAME = {k.name: k for k in KINDS}


def kinds(*categories: str) -> list[Kind]:
    """The kinds of the given categories, in table order."""
    return [k for k in KINDS if k.category in categories]


def markdown_table() -> str:
    """The README's "Bad input" table."""
    lines = ["| kind | input | outcome | reason / message contains |", "|---|---|---|---|"]
    for k in KINDS:
        expect = f"`{k.expect}`" if k.expect else ""
        lines.append(f"| {k.category} | {k.what} | {k.outcome} | {expect.replace('|', '/')} |")
    return "\n".join(lines)


def summary() -> dict[str, int]:
    """How many kinds per outcome (for the README line above the table)."""
    out: dict[str, int] = {}
    for k in KINDS:
        out[k.outcome] = out.get(k.outcome, 0) + 1
    return out


if __name__ == "__main__":  # print the README table
    print(markdown_table())
    print(json.dumps(summary()))
