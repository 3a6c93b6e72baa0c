"""Tests for pixelmill.samples: synthetic captioned images for demos and tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image, ImageOps

from pixelmill.datasets import import_folder
from pixelmill.samples import draw_sample_images


def _decode(path: str) -> Image.Image:
    img = Image.open(path)
    img.load()
    return img


def _folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_same_seed_gives_identical_files_and_other_seed_differs(tmp_path: Path) -> None:
    a = draw_sample_images(str(tmp_path / "a"), n=12, corrupt=3, seed=7)
    b = draw_sample_images(str(tmp_path / "b"), n=12, corrupt=3, seed=7)
    c = draw_sample_images(str(tmp_path / "c"), n=12, corrupt=3, seed=8)
    assert [Path(p).name for p in a] == [Path(p).name for p in b] == [Path(p).name for p in c]
    assert _folder_bytes(tmp_path / "a") == _folder_bytes(tmp_path / "b")
    assert _folder_bytes(tmp_path / "a") != _folder_bytes(tmp_path / "c")


def test_returns_sorted_image_paths_each_with_a_caption(tmp_path: Path) -> None:
    paths = draw_sample_images(str(tmp_path), n=10, corrupt=2)
    assert paths == sorted(paths)
    assert len(paths) == 12
    assert all(Path(p).suffix in {".png", ".jpg"} for p in paths)
    for path in paths:
        caption = Path(path).with_suffix(".txt").read_text(encoding="utf-8").strip()
        assert len(caption.split()) >= 2 and caption.isprintable()
    assert len(list(tmp_path.glob("*.txt"))) == 12


def test_images_decode_and_corrupt_files_do_not(tmp_path: Path) -> None:
    paths = draw_sample_images(str(tmp_path), n=12, corrupt=3)
    good = [p for p in paths if Path(p).name.startswith("sample-")]
    bad = [p for p in paths if Path(p).name.startswith("corrupt-")]
    assert len(good) == 12 and len(bad) == 3
    for path in good:
        assert _decode(path).size[0] > 0
    for path in bad:
        with pytest.raises(Exception):
            _decode(path)
    assert {Path(p).suffix for p in bad} == {".png", ".jpg"}
    assert min(Path(p).stat().st_size for p in bad) == 0


def test_covers_awkward_modes_sizes_and_exif_orientation(tmp_path: Path) -> None:
    paths = draw_sample_images(str(tmp_path), n=12, size=(96, 64))
    images = {p: _decode(p) for p in paths}
    modes = {img.mode for img in images.values()}
    assert {"RGB", "L", "RGBA", "P"} <= modes
    rgba = next(img for img in images.values() if img.mode == "RGBA")
    assert rgba.getchannel("A").getextrema()[0] == 0
    assert {img.format for img in images.values()} == {"PNG", "JPEG"}

    rotated = [(p, img) for p, img in images.items() if img.getexif().get(0x0112) == 6]
    assert len(rotated) == 1
    path, img = rotated[0]
    upright = ImageOps.exif_transpose(img)
    assert upright.size == img.size[::-1] and upright.height > upright.width
    assert "house" in Path(path).with_suffix(".txt").read_text()
    sky, grass = upright.getpixel((upright.width // 2, 1)), upright.getpixel((upright.width // 2, upright.height - 2))
    assert sky[2] > sky[1] and grass[1] > grass[0]

    sizes = {ImageOps.exif_transpose(img).size for img in images.values()}
    assert len(sizes) >= 6
    assert any(w > h for w, h in sizes) and any(w < h for w, h in sizes) and any(w == h for w, h in sizes)
    assert all(40 <= side <= 130 for s in sizes for side in s)


def test_captions_name_what_is_drawn(tmp_path: Path) -> None:
    paths = draw_sample_images(str(tmp_path), n=20, seed=1)
    captions = [Path(p).with_suffix(".txt").read_text() for p in paths]
    text = " ".join(captions)
    for word in ("house", "roof", "landscape", "background", "stripes", "checkerboard"):
        assert word in text
    assert "transparent background" in text
    assert not any(" a orange" in c or " a a" in c for c in captions)


def test_small_n_still_writes_n_images(tmp_path: Path) -> None:
    assert draw_sample_images(str(tmp_path / "zero"), n=0) == []
    assert len(draw_sample_images(str(tmp_path / "two"), n=2)) == 2


def test_folder_imports_with_every_caption(tmp_path: Path) -> None:
    draw_sample_images(str(tmp_path / "src"), n=6, corrupt=2)
    summary = import_folder(str(tmp_path / "src"), str(tmp_path / "ds"), num_buckets=2)
    assert summary["images"] == 8
    assert summary["captioned"] == 8
