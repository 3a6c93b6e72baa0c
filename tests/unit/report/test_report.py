"""Tests for pixelmill.report: the self-contained HTML contact sheet of a dataset."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pixelmill.report import is_image_type, render_multi_report, render_report

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
DATA_URI = re.compile(r'src="data:image/(jpeg|png);base64,([A-Za-z0-9+/=]+)"')
SCRIPT_PROMPT = 'make it <script>alert("x")</script> & blue'


def _png(size: tuple[int, int], color: tuple[int, ...], mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def _rotated_jpeg() -> bytes:
    """A 120x80 JPEG whose EXIF orientation 6 makes it display as 80x120."""
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.new("RGB", (120, 80), (200, 30, 30)).save(buf, format="JPEG", exif=exif)
    return buf.getvalue()


def _rows(start: int, count: int) -> list[dict[str, Any]]:
    rows = []
    for i in range(start, start + count):
        rows.append({
            "id": f"row-{i:03d}",
            "input_image": {"bytes": _png((64, 48), (10 * i % 255, 100, 150)), "path": f"in/{i}.png"},
            "edited_image": {"bytes": _png((48, 64), (200, 10 * i % 255, 50)), "path": None},
            "edit_prompt": SCRIPT_PROMPT if i == 0 else f"turn the sky into a sunset number {i}",
            "method": "sdedit",
            "strength": 0.5,
            "seed": 1000 + i,
            "l2": 0.1 * (i + 1),
            "clip_image_text": 0.25 + 0.01 * i,
            "model_hash": "f" * 64,
            "latents": b"\x00" * 16,
        })
    return rows


SCHEMA = pa.schema([
    ("id", pa.string()), ("input_image", IMAGE), ("edited_image", IMAGE), ("edit_prompt", pa.string()),
    ("method", pa.string()), ("strength", pa.float32()), ("seed", pa.int64()), ("l2", pa.float64()),
    ("clip_image_text", pa.float64()), ("model_hash", pa.string()), ("latents", pa.binary()),
])


def _write_dataset(root: str, shards: dict[str, list[dict[str, Any]]], rejects: list[dict[str, str]],
                   manifest: bool = True) -> None:
    fs, path = fsspec.core.url_to_fs(root)
    fs.makedirs(path, exist_ok=True)
    for name, rows in shards.items():
        with fs.open(f"{path}/part-{name}.parquet", "wb") as f:
            pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), f)
    if rejects:
        fs.makedirs(f"{path}/__rejects", exist_ok=True)
        with fs.open(f"{path}/__rejects/part-00000.parquet", "wb") as f:
            pq.write_table(pa.Table.from_pylist(rejects), f)
    if manifest:
        doc = {
            "schema_name": "pairs",
            "schema_version": 1,
            "shards": [{"name": n, "rows": len(r), "rejects": len(rejects) if n == "00000" else 0}
                       for n, r in sorted(shards.items())],
            "config": {"method": "sdedit", "strength": 0.5, "note": "<b>bold</b>"},
            "config_hash": "0123456789abcdef",
            "complete": True,
        }
        with fs.open(f"{path}/_manifest.json", "w") as f:
            f.write(json.dumps(doc))


REJECTS = [
    {"id": "row-900", "error": "undecodable: UnidentifiedImageError <bad header>", "stage": "normalize"},
    {"id": "row-901", "error": "too_large: 20000x20000 exceeds 50000000 pixels", "stage": "normalize"},
]


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """Two shards of 3 + 2 edit rows, a rejects file and a manifest."""
    root = tmp_path / "edits"
    _write_dataset(str(root), {"00000": _rows(0, 3), "00001": _rows(3, 2)}, REJECTS)
    return root


def _images(page: str) -> list[Image.Image]:
    images = []
    for _, data in DATA_URI.findall(page):
        img = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
        img.load()
        images.append(img)
    return images


def test_report_defaults_to_dataset_folder_and_lists_every_row(dataset: Path) -> None:
    out = render_report(str(dataset))
    assert out == str(dataset / "report.html")
    page = Path(out).read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    for i in range(5):
        assert f"row-{i:03d}" in page
    assert page.count("<img") == 10
    assert page.count('class="row"') == 5
    assert "input_image → edited_image" in page


def test_thumbnails_are_data_uris_that_decode(dataset: Path) -> None:
    page = Path(render_report(str(dataset), out_file=str(dataset.parent / "r.html"))).read_text()
    images = _images(page)
    assert len(images) == page.count("<img") == 10
    assert sorted({img.size for img in images}) == [(48, 64), (64, 48)]


def test_large_transparent_rotated_broken_and_null_images(tmp_path: Path) -> None:
    rows = _rows(0, 4)
    rows[0]["input_image"] = {"bytes": _png((1000, 500), (0, 0, 255)), "path": None}
    rows[1]["input_image"] = {"bytes": _png((40, 40), (255, 0, 0, 0), mode="RGBA"), "path": None}
    rows[2]["input_image"] = {"bytes": _rotated_jpeg(), "path": None}
    rows[3]["input_image"] = {"bytes": b"not an image at all", "path": None}
    rows[3]["edited_image"] = None
    root = tmp_path / "odd"
    _write_dataset(str(root), {"00000": rows}, [])
    page = Path(render_report(str(root))).read_text()

    inputs = _images(page)
    assert len(inputs) == page.count("<img") == 6
    assert max(max(img.size) for img in inputs) <= 256
    assert (256, 128) in {img.size for img in inputs}
    assert "1000×500" in page
    assert any(img.format == "PNG" and img.mode == "RGBA" for img in inputs)
    assert (80, 120) in {img.size for img in inputs} and "80×120" in page
    assert page.count('class="noimg"') == 2
    assert "undecodable" in page and "empty" in page


def test_text_is_escaped(dataset: Path) -> None:
    page = Path(render_report(str(dataset))).read_text()
    assert "<script" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; blue" in page
    assert "&lt;bad header&gt;" in page
    assert "<b>bold</b>" not in page and "&lt;b&gt;bold&lt;/b&gt;" in page


def test_header_shows_manifest_config_and_metric_stats(dataset: Path) -> None:
    page = Path(render_report(str(dataset), title="Edits <run 1>")).read_text()
    assert "<title>Edits &lt;run 1&gt;</title>" in page
    assert str(dataset) in page
    assert "pairs v1" in page and "0123456789abcdef" in page and "complete" in page
    assert re.search(r"<details><summary>Config</summary><pre>.*&quot;strength&quot;: 0.5", page, re.S)
    stats = re.search(r'<table class="stats">(.*?)</table>', page, re.S).group(1)
    # l2 over all 5 rows is 0.1..0.5: mean 0.3, min 0.1, max 0.5
    assert re.search(r"<th>l2</th><td>5</td><td>0.300</td><td>0.100</td><td>0.500</td>", stats)
    assert "clip_image_text" in stats and "strength" in stats and "seed" not in stats


def test_row_metrics_are_compact(dataset: Path) -> None:
    page = Path(render_report(str(dataset))).read_text()
    def chip(name: str, value: str) -> bool:
        return re.search(rf'<dt title="{name}">{name}</dt><dd>{re.escape(value)}</dd>', page) is not None

    assert chip("l2", "0.100") and chip("seed", "1000") and chip("method", "sdedit")
    assert chip("model_hash", "ffffffffffff…") and "f" * 13 not in page
    assert re.search(r'<span class="k">edit_prompt</span> turn the sky into a sunset number 4</p>', page)
    assert "latents" not in page


def test_rejects_section(dataset: Path) -> None:
    page = Path(render_report(str(dataset))).read_text()
    rejects = re.search(r'<table class="rejects">(.*?)</table>', page, re.S).group(1)
    assert "row-900" in rejects and "row-901" in rejects
    assert "too_large: 20000x20000 exceeds 50000000 pixels" in rejects
    assert rejects.count("<td>normalize</td>") == 2
    assert "By stage: normalize: 2" in page


def test_limit_caps_rows_and_says_so(dataset: Path) -> None:
    page = Path(render_report(str(dataset), limit=2)).read_text()  # rejects are not capped by limit
    assert page.count('class="row"') == 2
    assert page.count("<img") == 4
    assert "row-001" in page and "row-002" not in page
    assert "first 2 of 5" in page
    rejects = re.search(r'<table class="rejects">(.*?)</table>', page, re.S).group(1)
    assert "row-900" in rejects and "row-901" in rejects
    assert re.search(r"<th>l2</th><td>5</td>", page)


def test_self_contained(dataset: Path) -> None:
    page = Path(render_report(str(dataset))).read_text()
    assert "<link" not in page and "@import" not in page and "<script" not in page
    assert "http://" not in page and "https://" not in page and "url(" not in page


def test_plain_folder_without_manifest_or_rejects(tmp_path: Path) -> None:
    root = tmp_path / "plain"
    _write_dataset(str(root), {"00000": _rows(0, 2)}, [], manifest=False)
    page = Path(render_report(str(root))).read_text()
    assert page.count("<img") == 4
    assert "no manifest" in page and "No rejected rows." in page


def test_empty_and_image_free_datasets(tmp_path: Path) -> None:
    root = tmp_path / "empty"
    _write_dataset(str(root), {"00000": []}, [])
    assert "No rows." in Path(render_report(str(root))).read_text()

    root = tmp_path / "metrics"
    root.mkdir()
    scores = [0.5, 1.5, float("nan"), None]
    pq.write_table(pa.table({"id": ["a", "b", "c", "d"], "score": scores}), root / "part-00000.parquet")
    page = Path(render_report(str(root))).read_text()
    assert "<img" not in page and '<dt title="score">score</dt><dd>1.500</dd>' in page
    assert "<th>score</th><td>2</td><td>1.000</td><td>0.500</td><td>1.500</td>" in page


def test_remote_dataset_needs_out_file() -> None:
    url = "memory://pixelmill-report-test/edits"
    _write_dataset(url, {"00000": _rows(0, 2)}, REJECTS)
    with pytest.raises(ValueError, match="out_file"):
        render_report(url)
    out = render_report(url, out_file="memory://pixelmill-report-test/out/report.html")
    fs = fsspec.filesystem("memory")
    page = fs.cat_file("/pixelmill-report-test/out/report.html").decode()
    assert out.endswith("report.html") and page.count("<img") == 4
    fs.rm("/pixelmill-report-test", recursive=True)


def test_multi_report_has_toc_and_both_datasets(tmp_path: Path, dataset: Path) -> None:
    other = tmp_path / "ip2p"
    rows = _rows(10, 2)
    for r in rows:
        r["method"] = "instruct_pix2pix"
    _write_dataset(str(other), {"00000": rows}, [])
    out = render_multi_report([("SDEdit", str(dataset)), ("InstructPix2Pix", str(other))],
                              str(tmp_path / "all.html"), title="Editing demo")
    page = Path(out).read_text()
    assert '<a href="#ds-1">SDEdit</a>' in page and '<a href="#ds-2">InstructPix2Pix</a>' in page
    assert 'id="ds-1"' in page and 'id="ds-2"' in page
    assert page.count("<img") == 14 and len(_images(page)) == 14
    assert "row-004" in page and "row-011" in page and "instruct_pix2pix" in page


def test_images_written_without_any_path_are_found(tmp_path: Path) -> None:
    root = tmp_path / "inferred"
    root.mkdir()
    rows = [{"id": "a", "image": {"bytes": _png((8, 8), (1, 2, 3)), "path": None}}]
    table = pa.Table.from_pylist(rows)
    assert pa.types.is_null(table.schema.field("image").type.field("path").type)
    pq.write_table(table, root / "part-00000.parquet")
    assert Path(render_report(str(root))).read_text().count("<img") == 1


def test_is_image_type() -> None:
    assert is_image_type(IMAGE)
    assert is_image_type(pa.struct([("bytes", pa.large_binary()), ("path", pa.large_string())]))
    assert is_image_type(pa.struct([("bytes", pa.binary()), ("path", pa.null())]))
    assert not is_image_type(pa.binary())
    assert not is_image_type(pa.struct([("bytes", pa.binary())]))


def test_campaign_report_shows_results_concepts_curves_and_samples(tmp_path):
    import json as _json

    from pixelmill.datasets.images import encode_image
    from pixelmill.report import render_campaign_report
    from pixelmill.samples import draw_concept_images

    def row(name, lr, status="finished", error=None):
        return {"job": name[:4], "name": name, "method": "lora", "concepts": ["dog"], "status": status,
                "step": 4, "max_steps": 4, "seconds": 1.5, "peak_memory_mb": 900.0, "clip_text_alignment": 0.21,
                "clip_image_alignment": 0.9, "final_loss": 0.5, "artifacts": ["/x/pytorch_lora_weights.safetensors"],
                "settings": _json.dumps({"learning_rate": lr, "rank": 4}), "error": error}

    log = [{"step": i, "loss": 1.0 / i} for i in range(1, 6)]
    jobs = [{"row": row("lora-a", 0.001), "log": log, "rel_dir": "jobs/a",
             "samples": [{"file": "samples/final/000.png", "prompt": "a photo of sks dog",
                          "clip_text_alignment": 0.2}]},
            {"row": row("lora-b", 0.005, "failed", "TrainingDataError: no rows"), "log": [], "rel_dir": "jobs/b",
             "samples": []}]
    cells = [encode_image(im) for im in draw_concept_images(3, seed=0)] + [{"bytes": b"junk", "path": None}]
    out = render_campaign_report(str(tmp_path / "report.html"), jobs, concepts={"dog": cells})
    html = (tmp_path / "report.html").read_text()
    assert out.endswith("report.html")
    assert "learning_rate=0.001" in html and "learning_rate=0.005" in html and "rank=" not in html  # only what varies
    assert "failed: TrainingDataError: no rows" in html
    assert html.count("<polyline") == 2  # one job has a curve (raw + smoothed), the other says so
    assert "no loss curve yet" in html and "no samples yet" in html
    assert 'src="jobs/a/samples/final/000.png"' in html
    assert html.count("data:image/") == 3  # three readable instance thumbnails, the junk one skipped
