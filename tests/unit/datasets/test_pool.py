"""Retrieval pools: both layouts, any fsspec URL, block reads, row reads, validation."""

from __future__ import annotations

import json
import uuid

import numpy as np
import pyarrow as pa
import pytest

from pixelmill.datasets import storage
from pixelmill.datasets.manifest import read_manifest
from pixelmill.datasets.pool import (
    BAD_NONFINITE,
    BAD_ZERO,
    POOL_INFO_NAME,
    Pool,
    PoolError,
    embedding_array,
    embedding_matrix,
    write_laion_layout,
    write_pool_parquet,
)
from pixelmill.tasks.retrieval import validate

DIM = 8
SIZES = (37, 50, 13)


def make_parts(seed: int = 0, sizes=SIZES, dim: int = DIM, dtype=np.float16):
    """LAION-style parts: (img_emb, text_emb, metadata) with ids ``p{part}-{row}``."""
    rng = np.random.default_rng(seed)
    parts = []
    for i, n in enumerate(sizes):
        meta = pa.table({
            "id": [f"p{i}-{r}" for r in range(n)],
            "url": [f"https://example.com/{i}/{r}.jpg" for r in range(n)],
            "caption": [f"caption {i} {r}" for r in range(n)],
            "punsafe": rng.random(n),
            "width": rng.integers(64, 1024, n),
            "height": rng.integers(64, 1024, n),
        })
        parts.append((rng.standard_normal((n, dim)).astype(dtype), rng.standard_normal((n, dim)).astype(dtype), meta))
    return parts


def as_parquet_table(parts, packed: bool = False) -> pa.Table:
    tables = []
    for img, txt, meta in parts:
        tables.append(meta.append_column("text_emb", embedding_array(txt, txt.dtype, packed=packed))
                      .append_column("img_emb", embedding_array(img, img.dtype, packed=packed)))
    return pa.concat_tables(tables)


@pytest.fixture(params=["local", "memory"])
def root(request, tmp_path) -> str:
    if request.param == "local":
        yield str(tmp_path)
        return
    url = f"memory://pool-{uuid.uuid4().hex}"
    yield url
    storage.remove(url)


def test_laion_layout_reads_every_row_in_order_with_its_metadata(root):
    parts = make_parts()
    url = write_laion_layout(storage.join(root, "laion"), parts, clip_model="tiny-clip")
    pool = Pool.open(url)
    assert pool.layout == "laion"
    assert [p.name for p in pool.parts] == ["0", "1", "2"]
    assert pool.num_rows == sum(SIZES) and pool.dim == DIM and pool.clip_model == "tiny-clip"
    assert pool.kinds == ["text", "image"]
    assert json.loads(storage.read_text(storage.join(url, POOL_INFO_NAME))) == {
        "clip_model": "tiny-clip", "dim": DIM, "layout": "laion"}

    blocks = list(pool.iter_blocks("text", block_rows=16, columns=["url", "caption"]))
    # blocks never cross parts: 37 -> 16+16+5, 50 -> 16*3+2, 13 -> 13
    spans = [(b.part, b.start, len(b)) for b in blocks]
    assert spans[:4] == [("0", 0, 16), ("0", 16, 16), ("0", 32, 5), ("1", 0, 16)]
    assert len(blocks) == 3 + 4 + 1
    emb = np.concatenate([b.emb for b in blocks])
    assert emb.dtype == np.float16
    np.testing.assert_array_equal(emb, np.concatenate([p[1] for p in parts]))
    ids = [i for b in blocks for i in b.ids]
    assert ids == [f"p{i}-{r}" for i, n in enumerate(SIZES) for r in range(n)]
    urls = [u for b in blocks for u in b.meta.column("url").to_pylist()]
    assert urls == [f"https://example.com/{i}/{r}.jpg" for i, n in enumerate(SIZES) for r in range(n)]
    image = np.concatenate([b.emb for b in pool.iter_blocks("image", block_rows=1000)])
    np.testing.assert_array_equal(image, np.concatenate([p[0] for p in parts]))


def test_laion_layout_without_id_column_gets_part_row_ids(tmp_path):
    parts = [(img, txt, meta.drop_columns(["id"])) for img, txt, meta in make_parts()]
    pool = Pool.open(write_laion_layout(str(tmp_path), parts))
    assert not pool.has_ids and pool.clip_model is None
    block = pool.read_block("text", "1", 10, 13, columns=["id", "caption"])
    assert block.ids == ["1:10", "1:11", "1:12"]
    assert block.meta.to_pydict() == {"id": ["1:10", "1:11", "1:12"],
                                      "caption": ["caption 1 10", "caption 1 11", "caption 1 12"]}


@pytest.mark.parametrize("packed", [False, True], ids=["list", "packed"])
def test_parquet_layout_matches_laion_layout(root, packed):
    parts = make_parts(seed=3)
    laion = Pool.open(write_laion_layout(storage.join(root, "laion"), parts, clip_model="m"))
    url = write_pool_parquet(storage.join(root, "pq"), as_parquet_table(parts, packed), clip_model="m",
                             rows_per_shard=40)
    pool = Pool.open(url)
    assert pool.layout == "parquet"
    assert [p.rows for p in pool.parts] == [40, 40, 20]
    assert pool.clip_model == "m" and pool.dim == DIM and pool.num_rows == laion.num_rows
    manifest = read_manifest(url)
    assert manifest.config["clip_model"] == "m" and manifest.config["embed_dim"] == DIM
    assert not storage.exists(storage.join(url, POOL_INFO_NAME))  # a JSON beside one shard breaks load_dataset
    for kind in ("text", "image"):
        a = list(pool.iter_blocks(kind, block_rows=16, columns=["url"]))
        b = list(laion.iter_blocks(kind, block_rows=16, columns=["url"]))
        np.testing.assert_array_equal(np.concatenate([x.emb for x in a]), np.concatenate([x.emb for x in b]))
        assert [i for x in a for i in x.ids] == [i for x in b for i in x.ids]
        urls = [[u for x in blocks for u in x.meta.column("url").to_pylist()] for blocks in (a, b)]
        assert urls[0] == urls[1]


def test_fixed_size_list_and_fp32_columns_read_as_stored(tmp_path):
    rng = np.random.default_rng(1)
    emb = rng.standard_normal((30, DIM)).astype(np.float32)
    table = pa.table({"id": [f"r{i}" for i in range(30)], "caption": ["c"] * 30,
                      "text_emb": embedding_array(emb, np.float32, fixed_size=True)})
    pool = Pool.open(write_pool_parquet(str(tmp_path), table, rows_per_shard=7))
    got = np.concatenate([b.emb for b in pool.iter_blocks(block_rows=5)])
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, emb)


def test_packed_columns_read_without_copying_keep_nulls_and_are_stored_uncompressed(tmp_path):
    import pyarrow.parquet as pq

    from pixelmill.datasets import Dataset

    emb = np.random.default_rng(2).standard_normal((9, DIM)).astype(np.float16)
    col = embedding_array(emb, packed=True)
    assert col.type == pa.binary(2 * DIM)
    matrix, nulls = embedding_matrix(col.slice(2, 5))
    assert matrix.dtype == np.float16 and not nulls.any()
    np.testing.assert_array_equal(matrix, emb[2:7])
    assert np.shares_memory(matrix, np.frombuffer(col.buffers()[1], np.uint8))  # no copy
    with_nulls = col.take(pa.array([0, None, 3], pa.int64()))
    matrix, nulls = embedding_matrix(with_nulls)
    assert nulls.tolist() == [False, True, False] and not matrix[1].any()
    np.testing.assert_array_equal(matrix[[0, 2]], emb[[0, 3]])
    with pytest.raises(PoolError, match="not a whole number"):
        embedding_matrix(pa.array([b"abc"], pa.binary(3)), "x.parquet column text_emb")
    with pytest.raises(ValueError, match="float16"):
        embedding_array(emb, np.float32, packed=True)

    table = pa.table({"id": [f"r{i}" for i in range(9)], "caption": ["c"] * 9, "text_emb": col})
    url = write_pool_parquet(str(tmp_path / "pq"), table, clip_model="m")
    pool = Pool.open(url)
    assert pool.dim == DIM and pool.part(pool.parts[0].name).emb_dtypes == {"text": "float16"}
    np.testing.assert_array_equal(pool.read_block("text", pool.parts[0].name, 0, 9).emb, emb)
    shard = Dataset.open(url).shard_url(pool.parts[0].name)
    meta = pq.ParquetFile(shard).metadata.row_group(0)
    codecs = {meta.column(i).path_in_schema: meta.column(i).compression for i in range(meta.num_columns)}
    assert codecs["text_emb"] == "UNCOMPRESSED" and codecs["caption"] == "ZSTD"
    features = json.loads(pq.read_schema(shard).metadata[b"huggingface"])["info"]["features"]
    assert features["text_emb"] == {"dtype": "binary", "_type": "Value"}  # `datasets` has no fixed-size binary
    import datasets

    hf = datasets.load_dataset(url, split="train", cache_dir=str(tmp_path / "hf"))
    np.testing.assert_array_equal(np.frombuffer(hf[4]["text_emb"], "<f2"), emb[4])


def test_read_rows_follows_the_requested_order(root):
    parts = make_parts()
    for url in (write_laion_layout(storage.join(root, "laion"), parts),
                write_pool_parquet(storage.join(root, "pq"), as_parquet_table(parts[1:2]))):
        pool = Pool.open(url)
        part = pool.parts[-1 if pool.layout == "laion" else 0]
        meta = parts[int(part.name) if pool.layout == "laion" else 1][2]
        got = pool.read_rows(part.name, [12, 3, 12, 0], ["id", "url"])
        assert got.column("id").to_pylist() == [meta["id"][r].as_py() for r in (12, 3, 12, 0)]
        assert got.column("url").to_pylist() == [meta["url"][r].as_py() for r in (12, 3, 12, 0)]
        with pytest.raises(PoolError, match="no metadata column"):
            pool.read_rows(part.name, [0], ["aesthetic"])


def test_remote_npy_is_read_by_range_like_a_local_memory_map(tmp_path):
    parts = make_parts(sizes=(300,), dim=16)
    local = Pool.open(write_laion_layout(str(tmp_path), parts))
    url = f"memory://ranged-{uuid.uuid4().hex}"
    remote = Pool.open(write_laion_layout(url, parts))
    try:
        for start, stop in ((0, 1), (17, 230), (299, 300), (250, 400)):
            np.testing.assert_array_equal(remote.read_block("text", "0", start, stop).emb,
                                          local.read_block("text", "0", start, stop).emb)
    finally:
        storage.remove(url)


def test_not_a_pool_is_refused(tmp_path):
    with pytest.raises(PoolError, match="no pool at"):
        Pool.open(str(tmp_path))
    with pytest.raises(PoolError, match="no embedding column"):
        Pool.open(write_pool_parquet_plain(tmp_path / "plain"))
    pool = Pool.open(write_laion_layout(str(tmp_path / "laion"), [(None, t, m) for _, t, m in make_parts()]))
    assert pool.kinds == ["text"]
    with pytest.raises(PoolError, match="no image embeddings"):
        list(pool.iter_blocks("image"))


def write_pool_parquet_plain(path) -> str:
    import pyarrow.parquet as pq

    path.mkdir()
    pq.write_table(pa.table({"id": ["a"], "caption": ["x"]}), str(path / "part-00000.parquet"))
    return str(path)


# ---------------------------------------------------------------------------- validation


def test_validate_accepts_a_good_pool_and_reports_its_shape(root):
    pool = Pool.open(write_laion_layout(storage.join(root, "ok"), make_parts(), clip_model="m"))
    report = validate(pool, DIM, clip_model="other")
    assert report.ok and report.num_rows == sum(SIZES) and report.dim == DIM and report.parts == 3
    assert report.warnings == [f"pool {pool.url} records CLIP model 'm', queries use 'other'"]


def test_validate_refuses_a_width_other_than_the_clip_models(tmp_path):
    pool = Pool.open(write_laion_layout(str(tmp_path), make_parts()))
    with pytest.raises(PoolError) as err:
        validate(pool, expected_dim=512, check_values=False)
    assert "width 8" in str(err.value) and "embedding width 512" in str(err.value)


def test_validate_names_a_misaligned_part_and_both_counts(tmp_path):
    parts = make_parts()
    img, txt, meta = parts[1]
    parts[1] = (img, txt[:45], meta)
    pool = Pool.open(write_laion_layout(str(tmp_path), parts))
    expected = r"part 1 is misaligned: text_emb_1.npy has 45 rows but metadata_1.parquet has 50"
    with pytest.raises(PoolError, match=expected):
        validate(pool, DIM)
    validate(pool, DIM, kind="image", check_values=False)  # the image side of part 1 is fine
    with pytest.raises(PoolError, match="misaligned"):
        list(pool.iter_blocks("text"))  # never scanned with shifted ids, validated or not


def test_validate_finds_nan_inf_and_zero_rows(tmp_path):
    parts = make_parts()
    txt0, txt2 = parts[0][1].copy(), parts[2][1].copy()
    txt0[[3, 20], 1] = np.nan
    txt0[30, 0] = np.inf
    txt2[5] = 0
    parts[0] = (parts[0][0], txt0, parts[0][2])
    parts[2] = (parts[2][0], txt2, parts[2][2])
    pool = Pool.open(write_laion_layout(str(tmp_path), parts))
    with pytest.raises(PoolError) as err:
        validate(pool, DIM)
    message = str(err.value)
    assert "3 with NaN/Inf values (first ids: p0-3, p0-20, p0-30)" in message
    assert "1 all-zero or null (first ids: p2-5)" in message

    report = validate(pool, DIM, on_bad="reject")
    assert report.bad_ids == ["p0-3", "p0-20", "p0-30", "p2-5"]
    assert report.bad.column("error").to_pylist() == [BAD_NONFINITE] * 3 + [BAD_ZERO]
    assert report.skip() == {"0": {3: BAD_NONFINITE, 20: BAD_NONFINITE, 30: BAD_NONFINITE}, "2": {5: BAD_ZERO}}


def test_null_and_ragged_parquet_embeddings(tmp_path):
    values = [[1.0] * DIM, None, [0.5] * DIM]
    table = pa.table({"id": ["a", "b", "c"], "text_emb": pa.array(values, pa.list_(pa.float16()))})
    matrix, nulls = embedding_matrix(table.column("text_emb"))
    assert nulls.tolist() == [False, True, False] and not matrix[1].any()
    pool = Pool.open(write_pool_parquet(str(tmp_path / "null"), table))
    assert validate(pool, DIM, on_bad="reject").bad_ids == ["b"]

    ragged = pa.table({"id": ["a", "b"],
                       "text_emb": pa.array([[1.0] * DIM, [1.0] * (DIM - 1)], pa.list_(pa.float16()))})
    pool = Pool.open(write_pool_parquet(str(tmp_path / "ragged"), ragged))
    with pytest.raises(PoolError, match="row 1 has 7 values but row 0 has 8"):
        validate(pool, DIM)


def test_stored_norms_are_written_read_with_each_block_and_resumed(root):
    from pixelmill.tasks.retrieval.kernel import scan_norms
    from pixelmill.tasks.retrieval.norms import write_pool_norms

    parts = make_parts(sizes=(300, 40), dim=16)
    txt0 = parts[0][1].copy()
    txt0[7] = 0
    parts[0] = (parts[0][0], txt0, parts[0][2])
    write_laion_layout(root, parts)
    assert Pool.open(root).read_block("text", "0", 0, 300).norms is None
    summary = write_pool_norms(root, kinds=["text"], block_rows=128)
    assert summary.written == {"text": ["0", "1"]} and summary.rows == {"text": 340}
    pool = Pool.open(root)
    assert set(pool.part("0").norm_urls) == {"text"}
    block = pool.read_block("text", "0", 100, 250)
    assert block.norms.tobytes() == scan_norms(txt0[100:250]).tobytes()
    assert pool.read_block("image", "0", 0, 10).norms is None
    report = validate(pool, 16, on_bad="reject")
    assert report.bad_ids == ["p0-7"]

    again = write_pool_norms(root, block_rows=128)  # text kept, image written
    assert again.kept == {"text": ["0", "1"], "image": []} and again.written["image"] == ["0", "1"]
    assert write_pool_norms(root, kinds=["text"], overwrite=True).written == {"text": ["0", "1"]}


def test_a_norms_file_that_does_not_fit_is_ignored_with_a_warning(tmp_path):
    from pixelmill.tasks.retrieval.norms import write_pool_norms

    root = write_laion_layout(str(tmp_path), make_parts(dim=16))
    (tmp_path / "norms").mkdir(exist_ok=True)
    np.save(tmp_path / "norms" / "text_norms_1.npy", np.ones(SIZES[1] + 1, np.float32))
    np.save(tmp_path / "norms" / "text_norms_2.npy", np.ones(SIZES[2], np.float64))
    with pytest.warns(RuntimeWarning, match="does not fit its") as caught:
        pool = Pool.open(root)
    assert len(caught) == 2
    assert all(not p.norm_urls for p in pool.parts)
    with pytest.warns(RuntimeWarning, match="does not fit its"):
        assert write_pool_norms(root, kinds=["text"]).written == {"text": ["0", "1", "2"]}
    assert Pool.open(root).read_block("text", "1", 0, 5).norms.dtype == np.float32


def test_stored_norms_are_refused_for_a_parquet_pool_and_a_missing_kind(tmp_path):
    from pixelmill.tasks.retrieval.norms import write_pool_norms

    with pytest.raises(PoolError, match="LAION-layout pools"):
        write_pool_norms(write_pool_parquet(str(tmp_path / "pq"), as_parquet_table(make_parts())))
    root = write_laion_layout(str(tmp_path / "laion"), [(None, t, m) for _, t, m in make_parts()])
    with pytest.raises(PoolError, match="no image embeddings"):
        write_pool_norms(root, kinds=["image"])
