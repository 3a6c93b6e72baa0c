"""The bad-input corpus (``tests/data/corpus.py``) at unit level: image normalisation, text cells,
video decoding, and the README table. The same rows go through ``pixelmill edit`` in
``tests/integration/test_bad_input_cli.py``."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pixelmill.datasets.images import ImageError, normalize_image
from pixelmill.datasets.text import MAX_TEXT_CHARS, TextError, table_rows, text_value
from tests.data.corpus import (
    EDITED,
    KINDS,
    LONG_PROMPT,
    RECORDED,
    REJECT,
    ROW_BUILDERS,
    TRUNCATED,
    VIDEO_BUILDERS,
    _string_array,
    kinds,
    markdown_table,
    marker_corner,
)

README = Path(__file__).resolve().parents[3] / "README.md"


def test_the_corpus_has_at_least_30_kinds_and_unique_names():
    assert len(KINDS) >= 30
    assert len({k.name for k in KINDS}) == len(KINDS)
    assert set(ROW_BUILDERS) == {k.name for k in kinds("image row", "text row")}
    assert set(VIDEO_BUILDERS) == {k.name for k in kinds("video")}


def test_readme_table_is_the_corpus_table():
    text = README.read_text()
    start, end = "<!-- bad-input-table:start -->", "<!-- bad-input-table:end -->"
    assert start in text and end in text, "README.md lost its bad-input table markers"
    table = text.split(start, 1)[1].split(end, 1)[0].strip()
    assert table == markdown_table(), "README's Bad input table differs: python -m tests.data.corpus prints it"


@pytest.mark.parametrize("kind", [k for k in kinds("image row") if k.name != "null_image"], ids=lambda k: k.name)
def test_image_kind(kind):
    data = ROW_BUILDERS[kind.name][0]()
    notes: list[str] = []
    if kind.outcome == REJECT:
        with pytest.raises(ImageError) as err:
            normalize_image(data or b"", 64, notes=notes)
        assert kind.expect.split(":")[0] in str(err.value)
        return
    img = normalize_image(data, 64, notes=notes)
    assert img.mode == "RGB" and img.width % 8 == 0 and img.height % 8 == 0 and max(img.size) == 64
    arr = np.asarray(img, dtype=np.float64)
    assert arr.std() > 1.0 or kind.name == "animated_gif", "the picture was lost in conversion"
    if kind.outcome == RECORDED:
        assert any(kind.expect in n for n in notes), notes
    else:
        assert notes == []
    if kind.name in ("plain", "exif_rotated", "cmyk_jpeg", "grayscale", "palette_transparency", "webp"):
        assert img.width > img.height and marker_corner(img) == "tl"  # upright, marker top-left


def test_exif_rotated_source_is_sideways_until_its_orientation_is_applied():
    raw = Image.open(io.BytesIO(ROW_BUILDERS["exif_rotated"][0]()))
    assert raw.height > raw.width and marker_corner(raw) == "bl"  # as stored
    img = normalize_image(ROW_BUILDERS["exif_rotated"][0](), 64)
    assert img.width > img.height and marker_corner(img) == "tl"


def test_animated_gif_uses_its_first_frame():
    img = normalize_image(ROW_BUILDERS["animated_gif"][0](), 64)
    r, g, b = np.asarray(img, dtype=np.float64).reshape(-1, 3).mean(axis=0)
    assert b > 200 and r < 50 and g < 50  # frame 0 is blue; frames 1-2 are red and green


def test_sixteen_bit_and_float_keep_their_range():
    for name in ("gray16_png", "float_tiff"):
        arr = np.asarray(normalize_image(ROW_BUILDERS[name][0](), 64))
        assert arr.min() <= 10 and arr.max() >= 245, name  # full range, not clipped to black or white


def test_text_cells():
    notes: list[str] = []
    assert text_value("a cat", "prompt") == "a cat"
    for bad, reason in ((None, "missing prompt (null)"), ("", "missing prompt (empty)"), (" \t", "(empty)"),
                        (b"caf\xe9", "prompt is not valid UTF-8 (byte 0xe9 at offset 3)"), (3, "is a int")):
        with pytest.raises(TextError, match=reason.replace("(", r"\(").replace(")", r"\)")):
            text_value(bad, "prompt")
    assert text_value("café".encode(), "prompt") == "café"
    cut = text_value(LONG_PROMPT, "prompt", notes=notes)
    assert len(cut) <= MAX_TEXT_CHARS and LONG_PROMPT.startswith(cut) and not cut.endswith(" ")
    assert notes == [f"prompt truncated from 10000 to {len(cut)} characters"]


def test_table_rows_keeps_the_batch_when_one_string_is_not_utf8():
    table = pa.table({"id": ["a", "b", "c"], "caption": _string_array(["fine", b"caf\xe9", None])})
    with pytest.raises(UnicodeDecodeError):
        table.to_pylist()  # what a stage would have done: the whole batch lost
    rows = table_rows(table)
    assert [r["id"] for r in rows] == ["a", "b", "c"]
    assert rows[0]["caption"] == "fine" and rows[1]["caption"] == b"caf\xe9" and rows[2]["caption"] is None
    assert list(rows[0]) == ["id", "caption"]


@pytest.mark.parametrize("kind", kinds("video"), ids=lambda k: k.name)
def test_video_kind(kind, tmp_path):
    from pixelmill.tasks.video.job import VideoRejected, _decode

    path = tmp_path / "v.mp4"
    path.write_bytes(VIDEO_BUILDERS[kind.name]())
    spec = {"source": {"kind": "path", "path": str(path), "id": kind.name}, "atlas": {"max_frames": 50}}
    if kind.outcome == REJECT:
        with pytest.raises(VideoRejected) as err:
            _decode(spec)
        assert kind.expect in str(err.value)
    else:
        video = _decode(spec)
        assert len(video.frames) == 6 and (video.width, video.height) == (64, 48)


def test_outcome_words_are_the_documented_ones():
    allowed = {EDITED, RECORDED, TRUNCATED, REJECT, "edited upright", "decoded", "exit 2 before work starts",
               "row rejects (`invalid_vectors: reject`)"}
    assert {k.outcome for k in KINDS} <= allowed
