"""Tests for pixelmill.datasets: image cells, normalisation, writer, reader, importer."""

from __future__ import annotations

import io
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import uuid
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pixelmill.datasets import (
    IMAGE_TYPE,
    REJECTS_SCHEMA,
    ConfigMismatch,
    Dataset,
    DatasetNotFound,
    DatasetWriter,
    ImageError,
    account,
    config_hash,
    decode_image,
    diff_config,
    encode_image,
    hf_features,
    import_folder,
    normalize_image,
    read_manifest,
    shard_for_id,
    stable_id,
    storage,
    with_hf_features,
)

SCHEMA = pa.schema([("id", pa.string()), ("parent_id", pa.string()), ("image", IMAGE_TYPE), ("score", pa.float32())])


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _rows(ids: list[str], parents: list[str] | None = None) -> pa.Table:
    """A small output table with one 8x8 image per row."""
    images = [encode_image(Image.new("RGB", (8, 8), (i * 20 % 255, 0, 0))) for i in range(len(ids))]
    return pa.Table.from_pydict(
        {"id": ids, "parent_id": parents or ids, "image": images, "score": [0.5] * len(ids)}, schema=SCHEMA
    )


def _rejects(ids: list[str], stage: str = "edit") -> pa.Table:
    return pa.table({"id": ids, "error": ["undecodable"] * len(ids), "stage": [stage] * len(ids)})


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height but whose pixel data is a few bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.fixture
def hf_datasets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The Hugging Face ``datasets`` module, offline, caching under tmp_path."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets

    datasets.disable_progress_bars()
    return datasets


@pytest.fixture
def mem_url() -> str:
    url = f"memory://pm-test-{uuid.uuid4().hex}"
    yield url
    storage.remove(url)


# ---------------------------------------------------------------- image cells


def test_encode_decode_round_trip() -> None:
    arr = np.random.default_rng(0).integers(0, 255, (12, 20, 3), dtype=np.uint8)
    cell = encode_image(Image.fromarray(arr))
    assert cell["path"] is None and cell["bytes"].startswith(b"\x89PNG")
    for value in (cell, cell["bytes"]):
        out = decode_image(value)
        assert out.size == (20, 12)
        assert np.array_equal(np.asarray(out), arr)
    with pytest.raises(ImageError) as err:
        decode_image({"bytes": None, "path": None})
    assert err.value.reason == "empty"


def test_hf_features_match_datasets_naming(hf_datasets) -> None:
    schema = pa.schema(
        [
            ("image", IMAGE_TYPE),
            ("caption", pa.string()),
            ("n", pa.int64()),
            ("k", pa.int32()),
            ("s", pa.float32()),
            ("d", pa.float64()),
            ("ok", pa.bool_()),
            ("emb", pa.list_(pa.float32())),
        ]
    )
    features = hf_features(schema)
    assert features["image"] == {"_type": "Image"}
    assert features["emb"] == {"feature": {"dtype": "float32", "_type": "Value"}, "_type": "List"}
    assert features["s"] == {"dtype": "float32", "_type": "Value"}
    reference = hf_datasets.Features.from_arrow_schema(schema.remove(0)).to_dict()
    assert {k: v for k, v in features.items() if k != "image"} == reference
    table = with_hf_features(schema.empty_table())
    stored = json.loads(table.schema.metadata[b"huggingface"])
    assert stored == {"info": {"features": features}}
    assert hf_datasets.Features.from_dict(stored["info"]["features"])["image"] == hf_datasets.Image()


# ---------------------------------------------------------------- normalisation


def test_normalize_keeps_aspect_and_snaps_to_multiple() -> None:
    assert normalize_image(_png(Image.new("RGB", (300, 100)))).size == (512, 168)
    assert normalize_image(_png(Image.new("RGB", (100, 300))), resolution=256).size == (80, 256)
    assert normalize_image(_png(Image.new("RGB", (2000, 10))), resolution=64).size == (64, 8)
    big = normalize_image(_png(Image.new("RGB", (1024, 768))), resolution=512, multiple=64)
    assert big.size == (512, 384)


def test_normalize_applies_exif_orientation() -> None:
    img = Image.new("RGB", (80, 40), (255, 0, 0))
    img.paste((0, 0, 255), (40, 0, 80, 40))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif, quality=95)
    out = normalize_image(buf.getvalue(), resolution=64)
    assert out.size == (32, 64)
    top, bottom = np.asarray(out)[4, 16], np.asarray(out)[60, 16]
    assert top[0] > 200 and top[2] < 60
    assert bottom[2] > 200 and bottom[0] < 60


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "RGBA", "CMYK", "I;16", "I", "F", "RGB"])
def test_normalize_converts_every_mode_to_rgb(mode: str) -> None:
    img = Image.new("RGB", (40, 24), (200, 100, 50)).convert(mode)
    fmt = "TIFF" if mode in ("CMYK", "I", "F") else "PNG"
    buf = io.BytesIO()
    img.save(buf, fmt)
    out = normalize_image(buf.getvalue(), resolution=64)
    assert out.mode == "RGB"
    assert out.size == (64, 32)


def test_normalize_composites_alpha_and_palette_transparency_on_white() -> None:
    rgba = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    rgba.paste((255, 0, 0, 255), (0, 0, 8, 16))
    out = np.asarray(normalize_image(_png(rgba), resolution=16))
    assert tuple(out[8, 2]) == (255, 0, 0)
    assert tuple(out[8, 13]) == (255, 255, 255)

    pal = Image.new("P", (16, 16), 0)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    pal.paste(1, (8, 0, 16, 16))
    buf = io.BytesIO()
    pal.save(buf, "PNG", transparency=0)
    out = np.asarray(normalize_image(buf.getvalue(), resolution=16))
    assert tuple(out[8, 2]) == (255, 255, 255)
    assert tuple(out[8, 13]) == (0, 255, 0)


def test_normalize_scales_16_bit_instead_of_clipping() -> None:
    values = np.full((16, 16), 1000, dtype=np.uint16)
    values[:, 8:] = 65535
    img = Image.fromarray(values)
    assert img.mode == "I;16"
    out = np.asarray(normalize_image(_png(img), resolution=16))
    assert tuple(out[8, 2]) == (4, 4, 4)
    assert tuple(out[8, 13]) == (255, 255, 255)


def test_normalize_refuses_bombs_before_decoding() -> None:
    with pytest.raises(ImageError) as err:
        normalize_image(_png_header(8000, 8000))
    assert err.value.reason == "too_large"
    with pytest.raises(ImageError) as err:
        normalize_image(_png_header(8000, 8000), max_pixels=10**9)
    assert err.value.reason == "undecodable"
    with pytest.raises(ImageError) as err:
        normalize_image(_png_header(100_000, 100_000), max_pixels=10**12)
    assert err.value.reason == "too_large"
    with pytest.raises(ImageError) as err:
        normalize_image(_png_header(10_000, 10_000), max_pixels=10**12)
    assert err.value.reason == "too_large"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"definitely not an image", "undecodable"),
        (_png(Image.new("RGB", (64, 64), (1, 2, 3)))[:60], "undecodable"),
    ],
)
def test_normalize_rejects_bad_bytes(data: bytes, reason: str) -> None:
    with pytest.raises(ImageError) as err:
        normalize_image(data)
    assert err.value.reason == reason
    assert isinstance(err.value, ValueError)


def test_truncated_jpeg_is_undecodable() -> None:
    arr = np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG")
    with pytest.raises(ImageError) as err:
        normalize_image(buf.getvalue()[: len(buf.getvalue()) // 2])
    assert err.value.reason == "undecodable"


# ---------------------------------------------------------------- config, sharding


def test_config_hash_and_diff() -> None:
    a = {"model": {"id": "tiny", "steps": 10}, "seed": 1, "tags": [1, 2]}
    b = {"seed": 1, "tags": [1, 2], "model": {"steps": 10, "id": "tiny"}}
    assert config_hash(a) == config_hash(b) and len(config_hash(a)) == 16
    c = {"model": {"id": "tiny", "steps": 20, "eta": 0.0}, "tags": [2, 1]}
    assert diff_config(a, c) == ["model.eta", "model.steps", "seed", "tags"]
    assert diff_config(a, b) == []


def test_shard_for_id_is_stable_across_processes() -> None:
    ids = [stable_id("dir", i) for i in range(200)]
    buckets = [shard_for_id(i, 16) for i in ids]
    assert set(buckets) <= set(range(16)) and len(set(buckets)) > 8
    code = (
        "from pixelmill.datasets import shard_for_id, stable_id\n"
        "print([shard_for_id(stable_id('dir', i), 16) for i in range(200)])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "123"})
    assert json.loads(out.stdout) == buckets


# ---------------------------------------------------------------- writer


def test_writer_commit_resume_mismatch_and_overwrite(tmp_path: Path) -> None:
    url = str(tmp_path / "out")
    config = {"model": {"id": "tiny", "steps": 4}, "seed": 0}
    writer = DatasetWriter(url, "edits", 1, config).open()
    assert writer.committed == set()
    shard = writer.shard("00000")
    shard.write(_rows(["a", "b"]))
    shard.write(_rows(["c"]))
    shard.reject(_rejects(["d"]))
    entry = shard.commit(input_rows=4)
    assert (entry.rows, entry.rejects, entry.input_rows) == (3, 1, 4)
    other = writer.shard("00001")
    other.write(_rows(["e"]))
    other.commit()

    assert pq.read_table(tmp_path / "out" / "part-00000.parquet").column("id").to_pylist() == ["a", "b", "c"]
    empty_rejects = pq.read_table(tmp_path / "out" / "__rejects" / "part-00001.parquet")
    assert empty_rejects.num_rows == 0 and empty_rejects.schema.names == ["id", "error", "stage"]
    assert not (tmp_path / "out" / "__dropped").exists()
    manifest = read_manifest(url)
    assert manifest is not None and not manifest.complete
    assert manifest.shard_names() == ["00000", "00001"] and manifest.config_hash == config_hash(config)

    resumed = DatasetWriter(url, "edits", 1, {"seed": 0, "model": {"steps": 4, "id": "tiny"}}).open()
    assert resumed.committed == {"00000", "00001"}

    with pytest.raises(ConfigMismatch) as err:
        DatasetWriter(url, "edits", 1, {"model": {"id": "tiny", "steps": 8}, "seed": 0}).open()
    assert err.value.changed_keys == ["model.steps"]
    assert "model.steps" in str(err.value)
    with pytest.raises(ConfigMismatch) as err:
        DatasetWriter(url, "edits", 2, config).open()
    assert err.value.changed_keys == ["schema_version"]

    fresh = DatasetWriter(url, "edits", 1, {"model": {"id": "tiny", "steps": 8}, "seed": 0}).open(overwrite=True)
    assert fresh.committed == set()
    assert read_manifest(url) is None
    assert not any(p.name.startswith("part-") for p in (tmp_path / "out").iterdir())
    assert not (tmp_path / "out" / "__rejects").exists()


def test_finish_removes_unlisted_files_and_staging(tmp_path: Path) -> None:
    url = str(tmp_path / "out")
    writer = DatasetWriter(url, "edits", 1, {"x": 1}).open()
    keep = writer.shard("00000")
    keep.write(_rows(["a"]))
    keep.drop(pa.table({"id": ["a-2"], "score": [0.1]}))
    keep.commit()
    pq.write_table(_rows(["zombie"]), tmp_path / "out" / "part-00007.parquet")
    pq.write_table(_rejects(["zombie"]), tmp_path / "out" / "__rejects" / "part-00007.parquet")
    abandoned = writer.shard("00002")
    abandoned.write(_rows(["half"]))
    assert (tmp_path / "out" / "__staging" / "00002.parquet").exists()

    manifest = writer.finish()
    assert manifest.complete and read_manifest(url).complete
    files = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert files == [
        "__dropped/part-00000.parquet",
        "__rejects/part-00000.parquet",
        "_manifest.json",
        "part-00000.parquet",
    ]
    ds = Dataset.open(url)
    assert ds.complete and ds.num_rows == 1
    assert ds.dropped().column("id").to_pylist() == ["a-2"]


def test_tasks_adding_shards_side_by_side_keep_each_others_staging_and_entries(tmp_path: Path) -> None:
    """The retrieval flow's protocol for prompts downloaded in parallel processes (each task's
    writer is its own object here, as in its own process): the owner opens (tidies) and records,
    the tasks open as non-owners (no tidying, no foreign-file check) and commit without recording."""
    url = str(tmp_path / "out")
    owner = DatasetWriter(url, "edits", 1, {"x": 1}).open()
    a = DatasetWriter(url, "edits", 1, {"x": 1}).open(owner=False).shard("00000")
    a.write(_rows(["a"]))
    b_writer = DatasetWriter(url, "edits", 1, {"x": 1}).open(owner=False)  # while a's shard is staged
    assert (tmp_path / "out" / "__staging" / "00000.parquet").exists()
    b = b_writer.shard("00001")
    b.write(_rows(["b"]))
    entries = [b.commit(record=False), a.commit(input_rows=1, record=False)]
    assert read_manifest(url) is None  # published files, not yet part of the dataset
    DatasetWriter(url, "edits", 1, {"x": 1}).open(owner=False)  # a third task joins meanwhile
    for entry in entries:
        owner.record(entry)
    owner.finish()
    ds = Dataset.open(url)
    assert ds.complete and sorted(ds.to_table().column("id").to_pylist()) == ["a", "b"]
    assert read_manifest(url).shards[0].input_rows == 1

    # what an owner's open in a second task did: the first task's staged shard is gone
    c = DatasetWriter(url, "edits", 1, {"x": 1}).open(owner=False).shard("00002")
    c.write(_rows(["c"]))
    DatasetWriter(url, "edits", 1, {"x": 1}).open()
    with pytest.raises(FileNotFoundError):
        c.commit(record=False)


def test_writer_refuses_foreign_parquet_without_manifest(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    pq.write_table(_rows(["x"]), tmp_path / "out" / "part-00000.parquet")
    with pytest.raises(FileExistsError, match="no _manifest.json"):
        DatasetWriter(str(tmp_path / "out"), "edits", 1, {}).open()
    DatasetWriter(str(tmp_path / "out"), "edits", 1, {}).open(overwrite=True)
    assert not (tmp_path / "out" / "part-00000.parquet").exists()


def test_reject_table_needs_id_error_stage(mem_url: str) -> None:
    shard = DatasetWriter(mem_url, "edits", 1, {}).open().shard("00000")
    with pytest.raises(ValueError, match="error"):
        shard.reject(pa.table({"id": ["a"], "stage": ["x"]}))
    with pytest.raises(ValueError, match="invalid shard name"):
        DatasetWriter(mem_url, "edits", 1, {}).open().shard("__bad")


_KILLED_WRITER = textwrap.dedent(
    """
    import os, signal, sys
    import pyarrow as pa
    from PIL import Image
    from pixelmill.datasets import IMAGE_TYPE, DatasetWriter, encode_image

    schema = pa.schema([("id", pa.string()), ("image", IMAGE_TYPE)])
    def rows(ids):
        cells = [encode_image(Image.new("RGB", (8, 8)))] * len(ids)
        return pa.Table.from_pydict({"id": ids, "image": cells}, schema=schema)

    for url, commit_first in ((sys.argv[1], True), (sys.argv[2], False)):
        writer = DatasetWriter(url, "images", 1, {"k": 1}).open()
        if commit_first:
            done = writer.shard("00000")
            done.write(rows(["a", "b"]))
            done.reject(pa.table({"id": ["c"], "error": ["undecodable"], "stage": ["load"]}))
            done.commit()
        half = writer.shard("00001")
        half.write(rows(["x", "y", "z"]))
        half.write(rows(["w"]))
        half.reject(pa.table({"id": ["v"], "error": ["too_large"], "stage": ["load"]}))
    print("written", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_killed_writer_leaves_nothing_readers_count(tmp_path: Path, hf_datasets) -> None:
    import duckdb

    partial, empty = tmp_path / "partial", tmp_path / "empty"
    proc = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(partial), str(empty)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == -signal.SIGKILL and "written" in proc.stdout, proc.stderr
    assert (partial / "__staging" / "00001.parquet").exists()
    assert (empty / "__staging" / "00001.parquet").exists()

    assert pads.dataset(str(partial), format="parquet").to_table().column("id").to_pylist() == ["a", "b"]
    assert pads.dataset(str(empty), format="parquet").count_rows() == 0
    con = duckdb.connect()
    query = f"SELECT list(id ORDER BY id) FROM read_parquet('{partial}/*.parquet')"
    assert con.execute(query).fetchone()[0] == ["a", "b"]
    with pytest.raises(duckdb.IOException):
        con.execute(f"SELECT count(*) FROM read_parquet('{empty}/*.parquet')").fetchall()

    hf = hf_datasets.load_dataset(str(partial), split="train", cache_dir=str(tmp_path / "hfc"))
    assert sorted(hf["id"]) == ["a", "b"]
    with pytest.raises(Exception):
        hf_datasets.load_dataset(str(empty), split="train", cache_dir=str(tmp_path / "hfc"))

    ds = Dataset.open(str(partial))
    assert ds.shard_names() == ["00000"] and ds.num_rows == 2 and not ds.complete
    assert ds.rejects().column("id").to_pylist() == ["c"]
    resumed = DatasetWriter(str(partial), "images", 1, {"k": 1}).open()
    assert resumed.committed == {"00000"}
    assert not (partial / "__staging").exists()


_RAY_READER = textwrap.dedent(
    """
    import json, sys
    import ray
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    ds = ray.data.read_parquet(sys.argv[1])
    rows = ds.take_all()
    print(json.dumps({"ids": sorted(r["id"] for r in rows), "sizes": [len(r["image"]["bytes"]) for r in rows]}))
    ray.shutdown()
    """
)


def test_ray_data_reads_only_committed_shards(tmp_path: Path) -> None:
    partial = tmp_path / "partial"
    subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(partial), str(tmp_path / "empty")],
                   capture_output=True, cwd=tmp_path)
    assert (partial / "__staging" / "00001.parquet").exists() and (partial / "__rejects").is_dir()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    proc = subprocess.run([sys.executable, "-c", _RAY_READER, str(partial)], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["ids"] == ["a", "b"] and all(size > 0 for size in result["sizes"])


# ---------------------------------------------------------------- readers


def _small_dataset(url: str) -> None:
    writer = DatasetWriter(url, "edits", 1, {"m": "tiny"}, schema=SCHEMA).open()
    first = writer.shard("00000")
    first.write(_rows(["a-0", "a-1", "b-0"], ["a", "a", "b"]))
    first.reject(_rejects(["c"]).append_column("note", pa.array(["kept"])))
    first.commit(input_rows=3)
    second = writer.shard("00001")
    second.reject(_rejects(["d"]))
    second.commit(input_rows=1)
    writer.finish()


def test_hf_load_dataset_decodes_images_and_skips_rejects(tmp_path: Path, hf_datasets) -> None:
    url = str(tmp_path / "out")
    _small_dataset(url)
    cache = str(tmp_path / "hfc")
    by_files = hf_datasets.load_dataset("parquet", data_files=f"{url}/part-*.parquet", split="train", cache_dir=cache)
    by_folder = hf_datasets.load_dataset(url, split="train", cache_dir=cache)
    for loaded in (by_files, by_folder):
        assert loaded.num_rows == 3
        assert sorted(loaded["id"]) == ["a-0", "a-1", "b-0"]
        assert isinstance(loaded.features["image"], hf_datasets.Image)
        assert loaded.features["score"] == hf_datasets.Value("float32")
        first = loaded[0]["image"]
        assert isinstance(first, Image.Image) and first.size == (8, 8)


def test_pandas_and_duckdb_read_outputs(tmp_path: Path) -> None:
    import duckdb
    import pandas as pd

    url = str(tmp_path / "out")
    _small_dataset(url)
    frame = pd.read_parquet(url)
    assert sorted(frame["id"]) == ["a-0", "a-1", "b-0"]
    assert isinstance(frame["image"].iloc[0]["bytes"], bytes)
    assert decode_image(frame["image"].iloc[0]).size == (8, 8)
    rows = duckdb.connect().execute(
        f"SELECT parent_id, count(*), min(octet_length(image.bytes)) FROM read_parquet('{url}/part-*.parquet') "
        "GROUP BY parent_id ORDER BY parent_id"
    ).fetchall()
    assert [(p, n) for p, n, _ in rows] == [("a", 2), ("b", 1)] and all(size > 0 for _, _, size in rows)


def test_reader_api_and_memory_round_trip(mem_url: str) -> None:
    _small_dataset(mem_url)
    ds = Dataset.open(mem_url)
    assert ds.complete and ds.shard_names() == ["00000", "00001"]
    assert ds.shard_url("00000") == f"{mem_url}/part-00000.parquet"
    assert ds.num_rows == 3
    assert ds.read_shard("00001").num_rows == 0
    assert ds.read_shard("00000", columns=["id"]).column_names == ["id"]
    table = ds.to_table()
    assert table.schema.remove_metadata() == SCHEMA
    assert decode_image(table.column("image")[0].as_py()).size == (8, 8)
    rejects = ds.rejects()
    assert sorted(rejects.column("id").to_pylist()) == ["c", "d"]
    assert {"id", "error", "stage", "note"} <= set(rejects.column_names)
    assert ds.dropped().num_rows == 0
    assert storage.listdir(mem_url) == ["__rejects", "_manifest.json", "part-00000.parquet", "part-00001.parquet"]


def test_plain_folder_and_missing_dataset(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFound, match="does not exist"):
        Dataset.open(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFound, match="no _manifest.json and no .parquet"):
        Dataset.open(str(tmp_path / "empty"))
    plain = tmp_path / "plain"
    plain.mkdir()
    pq.write_table(_rows(["a"]), plain / "train-1.parquet")
    pq.write_table(_rows(["b", "c"]), plain / "train-0.parquet")
    ds = Dataset.open(str(plain))
    assert ds.manifest is None and ds.complete
    assert ds.shard_names() == ["train-0", "train-1"]
    assert ds.num_rows == 3 and ds.to_table().column("id").to_pylist() == ["b", "c", "a"]
    assert ds.rejects().schema == REJECTS_SCHEMA and ds.rejects().num_rows == 0


def test_accounting_finds_missing_and_duplicated(mem_url: str) -> None:
    _small_dataset(mem_url)
    good = account(["a", "b", "c", "d"], mem_url)
    assert good.ok and (good.inputs, good.outputs, good.rejected) == (4, 3, 2)

    report = account(["a", "b", "c", "d", "e"], Dataset.open(mem_url))
    assert report.missing == ["e"] and not report.ok

    writer = DatasetWriter(mem_url, "edits", 1, {"m": "tiny"}, schema=SCHEMA).open()
    extra = writer.shard("00002")
    extra.write(_rows(["c-0"], ["c"]))
    extra.reject(_rejects(["b"]))
    extra.commit()
    report = account(["a", "b", "c", "d"], mem_url)
    assert report.duplicated == ["b", "c"] and report.missing == []
    assert "2 duplicated" in str(report)


def test_accounting_without_parent_column(mem_url: str) -> None:
    writer = DatasetWriter(mem_url, "images", 1, {}).open()
    shard = writer.shard("00000")
    shard.write(pa.table({"id": ["a", "b", "b"]}))
    shard.commit()
    report = account(["a", "b", "z"], mem_url)
    assert report.duplicated == ["b"] and report.missing == ["z"]


# ---------------------------------------------------------------- importer


def _image_file(path: Path, color: tuple[int, int, int], fmt: str) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 9), color).save(path, fmt)
    return path.read_bytes()


def test_import_folder_with_txt_captions(tmp_path: Path) -> None:
    src = tmp_path / "src"
    original = _image_file(src / "cat.JPG", (200, 10, 10), "JPEG")
    _image_file(src / "sub" / "dog.png", (10, 200, 10), "PNG")
    (src / "cat.txt").write_text("a cat\n")
    (src / "notes.md").write_text("not an image")
    (src / "broken.webp").write_bytes(b"not really a webp")
    out = str(tmp_path / "out")

    summary = import_folder(str(src), out, num_buckets=4)
    assert summary["images"] == 3 and summary["captioned"] == 1
    ds = Dataset.open(out)
    assert ds.manifest.schema_name == "images" and ds.manifest.schema_version == 1 and ds.complete
    assert len(ds.shard_names()) == summary["shards"]
    rows = {r["image"]["path"]: r for r in ds.to_table().to_pylist()}
    assert sorted(rows) == ["broken.webp", "cat.JPG", "sub/dog.png"]
    cat = rows["cat.JPG"]
    assert cat["image"]["bytes"] == original
    assert cat["caption"] == "a cat" and rows["sub/dog.png"]["caption"] is None
    assert cat["id"] == stable_id("cat.JPG") and len(cat["id"]) == 16
    assert cat["source_path"] == str(src / "cat.JPG")
    for name in ds.shard_names():
        for row in ds.read_shard(name).to_pylist():
            assert f"{shard_for_id(row['id'], 4):05d}" == name

    _image_file(src / "zebra.png", (0, 0, 0), "PNG")
    assert import_folder(str(src), out, num_buckets=4)["images"] == 4
    grown = Dataset.open(out).to_table()
    assert grown.num_rows == 4
    assert {r["id"]: r["caption"] for r in grown.to_pylist()}[cat["id"]] == "a cat"
    with pytest.raises(ConfigMismatch, match="num_buckets"):
        import_folder(str(src), out, num_buckets=8)


def test_import_folder_with_csv_captions_in_memory(mem_url: str, tmp_path: Path) -> None:
    src = f"{mem_url}/src"
    fs, root = storage.resolve(src)
    fs.pipe_file(f"{root}/a.png", _png(Image.new("RGB", (8, 8))))
    fs.pipe_file(f"{root}/nested/b.jpeg", _image_file(tmp_path / "b.jpeg", (1, 2, 3), "JPEG"))
    fs.pipe_file(f"{root}/nested/c.tif", _image_file(tmp_path / "c.tif", (1, 2, 3), "TIFF"))
    fs.pipe_file(f"{root}/metadata.csv", b"\xef\xbb\xbffile_name,text\na.png,first\nnested/b.jpeg,\"second, quoted\"\n")
    fs.pipe_file(f"{root}/nested/captions.csv", b"image,caption\nc.tif,third\n")

    summary = import_folder(src, f"{mem_url}/out")
    assert summary == {"url": f"{mem_url}/out", "images": 3, "captioned": 3,
                       "shards": summary["shards"], "num_buckets": 16}
    table = Dataset.open(f"{mem_url}/out").to_table()
    captions = dict(zip(table.column("source_path").to_pylist(), table.column("caption").to_pylist()))
    base = storage.to_url(fs, root)
    assert base.startswith("memory://")
    assert captions == {
        f"{base}/a.png": "first", f"{base}/nested/b.jpeg": "second, quoted", f"{base}/nested/c.tif": "third",
    }
    sizes = {cell["path"]: decode_image(cell).size for cell in table.column("image").to_pylist()}
    assert sizes == {"a.png": (8, 8), "nested/b.jpeg": (12, 9), "nested/c.tif": (12, 9)}


def test_import_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        import_folder(str(tmp_path / "missing"), str(tmp_path / "out"))
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "readme.txt").write_text("hi")
    with pytest.raises(ValueError, match="no image files"):
        import_folder(str(tmp_path / "docs"), str(tmp_path / "out"))
    bad = tmp_path / "badcsv"
    _image_file(bad / "a.png", (0, 0, 0), "PNG")
    (bad / "metadata.csv").write_text("name,label\na.png,x\n")
    with pytest.raises(ValueError, match="metadata.csv: needs a file column"):
        import_folder(str(bad), str(tmp_path / "out"))


def test_a_failed_commit_takes_back_its_files_and_leaves_the_manifest_as_it_was(tmp_path):
    """A commit whose manifest write fails (full disk) leaves no unlisted shard for folder readers."""
    import json

    from pixelmill.datasets.writer import DatasetWriter

    out = tmp_path / "out"
    writer = DatasetWriter(f"faulty://{out}", "t", 1, {"k": 1}).open()
    first = writer.shard("00000")
    first.write(pa.table({"id": ["a"]}))
    first.commit()
    second = writer.shard("00001")
    second.write(pa.table({"id": ["b"]}))
    # the 2nd shard's data file is open already; at commit its rejects file is written, then the manifest fails
    (tmp_path / ".faults.json").write_text(json.dumps({"fault": "enospc", "after": 1}))
    with pytest.raises(OSError, match="No space left"):
        second.commit()
    (tmp_path / ".faults.json").unlink()
    assert sorted(p.name for p in out.glob("part-*.parquet")) == ["part-00000.parquet"]
    assert not list((out / "__rejects").glob("part-00001*"))
    assert writer.committed == {"00000"}
    third = writer.shard("00002")
    third.write(pa.table({"id": ["c"]}))
    third.commit()
    writer.finish()
    assert Dataset.open(str(out)).to_table(["id"])["id"].to_pylist() == ["a", "c"]
