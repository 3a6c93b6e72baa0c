"""Regularization retrieval steps: scan → candidates, exact-N downloads → images, export.

These run on Ray workers inside the retrieval flow's tasks (no Prefect here). The scan
and index code live in ``tasks/retrieval.py``, the safe downloader in ``tasks/download.py``;
this module turns their results into pixelmill datasets and the folder layout diffusers'
Custom Diffusion trainer reads with ``--real_prior``.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pyarrow as pa

from pixelmill.config import RetrieveConfig
from pixelmill.datasets import IMAGE_TYPE, Dataset, DatasetWriter, encode_image
from pixelmill.datasets.storage import exists, join, makedirs, read_text, resolve, write_text_atomic

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

CANDIDATE_SCHEMA = pa.schema([
    ("id", pa.string()), ("parent_id", pa.string()), ("prompt", pa.string()), ("pool_id", pa.string()),
    ("part", pa.string()), ("row", pa.int64()), ("similarity", pa.float64()), ("candidate_rank", pa.int64()),
    ("url", pa.string()), ("caption", pa.string()),
])

IMAGE_SCHEMA = pa.schema([
    ("id", pa.string()), ("parent_id", pa.string()), ("image", IMAGE_TYPE), ("caption", pa.string()),
    ("url", pa.string()), ("similarity", pa.float64()), ("prompt", pa.string()), ("rank", pa.int64()),
    ("candidate_rank", pa.int64()), ("pool_id", pa.string()), ("sha256", pa.string()),
    ("http_status", pa.int64()), ("width", pa.int64()), ("height", pa.int64()), ("clip_model", pa.string()),
    ("embedding", pa.string()), ("threshold", pa.float64()), ("pool", pa.string()),
])

DROPPED_SCHEMA = pa.schema([
    ("id", pa.string()), ("parent_id", pa.string()), ("pool_id", pa.string()), ("url", pa.string()),
    ("similarity", pa.float64()), ("candidate_rank", pa.int64()), ("drop_reason", pa.string()),
    ("error_message", pa.string()),
])


def slug(text: str, max_len: int = 60) -> str:
    """A folder name for a prompt: lowercase words joined by underscores."""
    s = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")
    return s[:max_len] or "prompt"


def download_prompt(cfg: RetrieveConfig, pid: str, prompt: str, candidates_url: str, images_url: str,
                    stats_url: str, schema: tuple[str, int]) -> dict[str, Any]:
    """Download exactly N images for one prompt and publish its shard of the images dataset.

    Accepted images are the N highest-similarity distinct ones that downloaded; failed,
    duplicate and surplus candidates go to ``__dropped/`` with their reasons; a prompt
    with no image at all is a reject. img2dataset-style stats go to ``stats/<pid>_stats.json``.
    Prompts download side by side in separate processes, so this neither tidies the output's
    staging (the flow opened the output) nor writes its manifest: the result's ``shard`` is the
    entry the flow records (``DatasetWriter.record``).
    """
    from pixelmill.tasks.download import DownloadConfig, run_download_exact_n

    cands = Dataset.open(candidates_url).read_shard(pid).sort_by("candidate_rank").to_pylist()
    dcfg = DownloadConfig(**cfg.download.model_dump(), resolution=cfg.resolution, max_pixels=cfg.max_pixels)
    res = run_download_exact_n([{**c, "id": c["pool_id"]} for c in cands], cfg.num_images, dcfg)
    by_pool = {c["pool_id"]: c for c in cands}
    store = {"format": "PNG"} if cfg.image_format == "png" else {"format": "JPEG", "quality": cfg.image_quality}
    rows = []
    for a in res.accepted:
        c = by_pool[a["id"]]
        rows.append({
            "id": f"{pid}-{a['rank']:04d}", "parent_id": pid, "image": encode_image(a["image"], **store),
            "caption": c["caption"], "url": c["url"], "similarity": c["similarity"], "prompt": prompt,
            "rank": a["rank"], "candidate_rank": c["candidate_rank"], "pool_id": c["pool_id"],
            "sha256": a["sha256"], "http_status": a.get("http_status"), "width": a["image"].width,
            "height": a["image"].height, "clip_model": cfg.clip_model, "embedding": cfg.embedding,
            "threshold": cfg.threshold, "pool": cfg.pool,
        })
    dropped = [_dropped_row(pid, d, "failed") for d in res.failed]
    dropped += [_dropped_row(pid, d, d["reason"]) for d in res.dropped]
    writer = DatasetWriter(images_url, *schema, cfg.output_affecting()).open(owner=False)
    sw = writer.shard(pid)
    sw.write(pa.Table.from_pylist(rows, schema=IMAGE_SCHEMA))
    if dropped:
        sw.drop(pa.Table.from_pylist(dropped, schema=DROPPED_SCHEMA))
    message = res.message or ""
    reason = None
    if not rows:
        reason = (f"no image: {len(cands)} candidates above threshold {cfg.threshold}, none downloaded"
                  if cands else f"no candidate above threshold {cfg.threshold}")
        sw.reject(pa.table({"id": [pid], "error": [reason], "stage": ["download"]}))
        message = message or reason
    entry = sw.commit(input_rows=1, record=False)
    stats = {**res.stats, "prompt": prompt, "prompt_id": pid, "found": len(cands), "message": message}
    makedirs(stats_url)
    write_text_atomic(join(stats_url, f"{pid}_stats.json"), json.dumps(stats, indent=2, default=str))
    return {"prompt": prompt, "found": len(cands), "downloaded": len(rows), "failed": len(res.failed),
            "dropped": len(res.dropped), "shortfall": res.shortfall, "message": message, "reject": reason,
            "shard": entry.model_dump()}


def _dropped_row(pid: str, d: dict[str, Any], reason: str) -> dict[str, Any]:
    return {"id": f"{pid}:{d['id']}", "parent_id": pid, "pool_id": d["id"], "url": d.get("url"),
            "similarity": d.get("similarity"), "candidate_rank": d.get("candidate_rank"),
            "drop_reason": reason, "error_message": d.get("error_message")}


def export_custom_diffusion(images_url: str, out_url: str, prompts: dict[str, str], n: int) -> dict[str, str]:
    """Write ``<out>/<prompt slug>/`` folders in the layout of diffusers' ``retrieve.py``.

    Each holds ``images/<i>.jpg`` (``.png`` when stored as PNG), ``caption.txt``, ``urls.txt`` and ``images.txt`` (one
    line per image, in rank order), exactly N images: what the Custom Diffusion trainer
    asserts with ``--real_prior --num_class_images N``. Prompts short of N are not
    exported (the trainer would refuse them); an export already complete is left as is.
    """
    ds = Dataset.open(images_url)
    done: dict[str, str] = {}
    shards = set(ds.shard_names())
    for pid, prompt in prompts.items():
        if pid not in shards:
            continue
        folder = join(out_url, slug(prompt))
        if _export_complete(folder, n):
            done[prompt] = folder
            continue
        table = ds.read_shard(pid).sort_by("rank")
        if table.num_rows != n:
            continue
        makedirs(join(folder, "images"))
        fs, _ = resolve(folder)
        paths = []
        for i, row in enumerate(table.select(["image"]).to_pylist()):
            data = row["image"]["bytes"]
            path = join(folder, "images", f"{i}{'.png' if data.startswith(PNG_MAGIC) else '.jpg'}")
            with fs.open(resolve(path)[1], "wb") as f:
                f.write(data)
            paths.append(path)
        write_text_atomic(join(folder, "caption.txt"), "\n".join(table["caption"].to_pylist()) + "\n")
        write_text_atomic(join(folder, "urls.txt"), "\n".join(table["url"].to_pylist()) + "\n")
        write_text_atomic(join(folder, "images.txt"), "\n".join(paths) + "\n")
        done[prompt] = folder
    return done


def _export_complete(folder: str, n: int) -> bool:
    url = join(folder, "images.txt")
    if not exists(url):
        return False
    lines = [x for x in read_text(url).splitlines() if x]
    return len(lines) == n and all(exists(p) for p in lines)


def clip_embed_dim(clip_model: str) -> int | None:
    """The embedding width of an open_clip model, from its config (no weights loaded)."""
    from pathlib import Path

    from pixelmill.models.loading import looks_local, resolve_model_name

    if clip_model.startswith("toy:"):
        clip_model = resolve_model_name(clip_model)  # a packaged folder
    if looks_local(clip_model):
        cfg_file = Path(clip_model.removeprefix("local-dir:")).expanduser() / "open_clip_config.json"
        if cfg_file.is_file():
            return int(json.loads(cfg_file.read_text())["model_cfg"]["embed_dim"])
        return None
    import open_clip

    arch = clip_model.removeprefix("hf-hub:").split("/")[0]
    cfg = open_clip.get_model_config(arch)
    return int(cfg["embed_dim"]) if cfg else None


PREFLIGHT_VALUE_CHECK_ROWS = 2_000_000
"""Pools up to this many rows have every vector checked before the run starts."""


def check_retrieve_inputs(cfg: RetrieveConfig) -> RetrieveConfig:
    """Refuse, before anything starts, a pool that cannot be scanned with the CLIP model.

    Fills ``clip_model`` from the pool's ``pool.json`` when the config leaves it out, and
    checks the structure (embedding width against the model, aligned parts); with
    ``invalid_vectors: error``, a pool of up to ``PREFLIGHT_VALUE_CHECK_ROWS`` rows has its
    vectors checked too (a larger one is checked by the scan itself).

    Raises:
        ValueError: naming the field and the problem.
    """
    from pixelmill.datasets.pool import Pool, PoolError
    from pixelmill.models.loading import ModelNotFound, check_model_reference
    from pixelmill.tasks.retrieval import validate

    try:
        pool = Pool.open(cfg.pool)
    except (ValueError, FileNotFoundError) as e:
        raise ValueError(f"pool: {e}") from None
    with pool:
        clip_model = cfg.clip_model or pool.clip_model
        if not clip_model:
            raise ValueError("clip_model: not set, and the pool has no pool.json naming the model it was "
                             "embedded with")
        try:
            check_model_reference(clip_model, "clip")
        except ModelNotFound as e:
            raise ValueError(f"clip_model: {e}") from None
        if cfg.embedding not in pool.kinds:
            raise ValueError(f"embedding: the pool has no {cfg.embedding} embeddings (it has {', '.join(pool.kinds)})")
        # Bad vectors (NaN/Inf, all zero) stop the run before it starts when reading them
        # all is cheap; in a larger pool the scan finds them (and fails, or rejects them).
        small = sum(p.rows for p in pool.parts) <= PREFLIGHT_VALUE_CHECK_ROWS
        try:
            validate(pool, clip_embed_dim(clip_model), cfg.embedding, check_values=small and
                     cfg.invalid_vectors == "error", clip_model=clip_model)
        except PoolError as e:
            raise ValueError(f"pool: {e}".replace("use on_bad='reject'", "set `invalid_vectors: reject`")) from None
        _hint_stored_norms(cfg, pool)
    if cfg.index:
        from pixelmill.tasks.retrieval.faiss_index import check_index_kind, read_index_info

        if not exists(join(cfg.index, "index.json")):
            raise ValueError(f"index: no faiss index at {cfg.index} (build one with `pixelmill pool index`)")
        try:
            check_index_kind(cfg.index, cfg.embedding, read_index_info(cfg.index))
        except ValueError as e:
            raise ValueError(f"index: {e}") from None
    return cfg.model_copy(update={"clip_model": clip_model})


def _hint_stored_norms(cfg: RetrieveConfig, pool: Any) -> None:
    """Say once that ``pixelmill pool norms`` would speed up this scan, where it would."""
    from pixelmill.datasets.pool import LAYOUT_LAION
    from pixelmill.tasks.retrieval.fused import FUSED_MAX_QUERIES

    if cfg.index or pool.layout != LAYOUT_LAION or len(cfg.prompts) <= FUSED_MAX_QUERIES:
        return
    missing = [p.name for p in pool.parts if cfg.embedding in p.emb_rows and cfg.embedding not in p.norm_urls]
    if missing:
        print(f"note: {len(missing)} of {len(pool.parts)} pool part(s) have no stored row norms; "
              f"`pixelmill pool norms {cfg.pool}` once makes scans of {FUSED_MAX_QUERIES + 1}+ prompts "
              "about 1.15x faster")


def write_candidates(cfg: RetrieveConfig, prompts: dict[str, str], url: str,
                     schema: tuple[str, int]) -> dict[str, int]:
    """Embed the prompts, scan the pool (or its index) once for all, write one shard per prompt.

    Pool rows whose vectors are NaN/Inf/zero fail the run naming them, or with
    ``invalid_vectors: reject`` are recorded in the candidates' ``__rejects/``.
    """
    from pixelmill.datasets.pool import PoolError
    from pixelmill.tasks.retrieval import embed_prompts, scan_pool_ray, search_index

    pids = list(prompts)
    queries = embed_prompts([prompts[p] for p in pids], cfg.clip_model)
    if cfg.index:
        result = search_index(cfg.index, queries, cfg.threshold, k=cfg.index_k, pool_url=cfg.pool,
                              kind=cfg.embedding, filters=cfg.filters.model_dump(),
                              max_candidates=cfg.max_candidates)
    else:
        result = scan_pool_ray(cfg.pool, queries, cfg.threshold, kind=cfg.embedding,
                               filters=cfg.filters.model_dump(), block_rows=cfg.scan_block_rows,
                               max_candidates=cfg.max_candidates, num_tasks=cfg.placement.workers)
    bad = result.rejects
    if bad.num_rows and cfg.invalid_vectors == "error":
        ids = bad["id"].to_pylist()
        raise PoolError(f"{cfg.pool}: {len(ids)} pool row(s) have invalid vectors (NaN/Inf/zero), e.g. "
                        f"{', '.join(ids[:5])}; fix the pool or set invalid_vectors: reject")
    writer = DatasetWriter(url, *schema, cfg.scan_affecting()).open()
    counts = {}
    for qi, pid in enumerate(pids):
        t = result.candidates[qi]
        n = t.num_rows
        rows = pa.table({
            "id": [f"{pid}:{x}" for x in t["id"].to_pylist()], "parent_id": [pid] * n,
            "prompt": [prompts[pid]] * n, "pool_id": t["id"], "part": t["part"], "row": t["row"],
            "similarity": t["similarity"], "candidate_rank": list(range(n)),
            "url": t["url"] if "url" in t.column_names else [None] * n,
            "caption": t["caption"] if "caption" in t.column_names else [None] * n,
        }).cast(CANDIDATE_SCHEMA)
        sw = writer.shard(pid)
        sw.write(rows)
        if qi == 0 and bad.num_rows:
            sw.reject(bad.select(["id", "error", "stage"]))
        sw.commit(input_rows=1)
        counts[pid] = n
    return counts


def build_index_and_report(pool_url: str, out_url: str, kind: str = "text", index_type: str = "ivf",
                           nlist: int | None = None, nprobe: int = 16, threshold: float = 0.85,
                           sample: int = 32) -> str:
    """Build a faiss index over a pool and measure its recall against the exact scan.

    Recall is measured on ``sample`` held-out queries (``held_out_queries``): each is
    near a pool row drawn from the whole pool but is not itself in the index, and that
    row is counted in neither the exact nor the index hits, so no query "finds itself".
    """
    import math
    import time

    from pixelmill.tasks.retrieval import build_index, held_out_queries, measure_recall

    t0 = time.perf_counter()
    info = build_index(pool_url, out_url, kind=kind, index_type=index_type, nlist=nlist, nprobe=nprobe)
    built = time.perf_counter() - t0
    queries, sources = held_out_queries(pool_url, kind, sample=sample)
    recall = measure_recall(pool_url, out_url, queries, threshold, sample=None, exclude=sources)
    excluded = f", {info['excluded_rows']} rows left out (NaN/Inf/zero)" if info.get("excluded_rows") else ""
    head = (f"index: {out_url} ({index_type}, {kind} embeddings, {info['rows']} vectors{excluded}) "
            f"built in {built:.1f}s\n")
    if math.isnan(recall):
        return head + (f"recall vs the exact scan above {threshold}: not measurable: none of the {len(queries)} "
                       "held-out queries has a pool row above the threshold besides its source row")
    return head + (f"recall vs the exact scan above {threshold}: {recall:.3f} on {len(queries)} held-out queries "
                   "(not in the index; each near a sampled row, which is not counted)")
