"""Regularization retrieval, pool side: embed prompts, scan a pool, build and query faiss indices.

Custom Diffusion keeps pool rows whose caption's CLIP text embedding has cosine
similarity above 0.85 to the class prompt. The exact scan here reads every vector once
for all prompts together, on as many Python threads as torch has, each single-threaded
in torch and BLAS. For up to 4 prompts a compiled kernel (``fused.py``, torch.compile)
converts fp16 rows in registers and takes the dots and squared norms in one read; for
more prompts, or where it cannot compile, fp16 rows are upcast to fp32 in cache-sized
sub-blocks for a BLAS product (numpy's own fp16 arithmetic is ~50× slower than fp32
BLAS, and a whole-block fp32 copy would double the memory traffic). Similarities
are computed in fp32 as ``dot / ‖row‖`` (queries are unit vectors) and compared strictly
with the threshold rounded to fp32, so a row exactly at the threshold is never a
candidate.

Rows that can never be scored (NaN/Inf values, all-zero or null vectors) are never
matched, and the scan reports them as rejects; rows a :class:`ValidationReport` lists
are skipped and reported the same way.

``scan_pool`` runs in this process; ``scan_pool_ray`` splits the pool's block ranges
across Ray tasks that each open the pool from its URL and read their own ranges (only
URLs, ranges and the small query matrix travel), then merges. faiss indices
(``build_index``, ``search_index``, ``measure_recall``) trade exactness for speed on
pools too large to scan per request.
"""

from pixelmill.tasks.retrieval.embedder import PoolEmbedder, embed_prompts
from pixelmill.tasks.retrieval.faiss_index import (
    INDEX_FILE,
    INDEX_INFO,
    build_index,
    check_index_kind,
    held_out_queries,
    measure_recall,
    read_index_info,
    search_index,
)
from pixelmill.tasks.retrieval.filters import CandidateFilters
from pixelmill.tasks.retrieval.kernel import (
    SUB_ROWS,
    BlockHits,
    bad_rows,
    normalize_queries,
    norms_of,
    row_norms,
    scan_block,
    scan_block_hits,
    torch_module,
    torch_single_thread,
    upcast_into,
)
from pixelmill.tasks.retrieval.results import HIT_COLUMNS, ScanResult, merge_results
from pixelmill.tasks.retrieval.scan import (
    DEFAULT_COLUMNS,
    SCAN_STAGE,
    ExactScanner,
    Kind,
    scan_pool,
    scan_pool_ray,
)
from pixelmill.tasks.retrieval.validation import ValidationReport, as_skip, validate

__all__ = [
    "DEFAULT_COLUMNS",
    "HIT_COLUMNS",
    "INDEX_FILE",
    "INDEX_INFO",
    "SCAN_STAGE",
    "SUB_ROWS",
    "BlockHits",
    "CandidateFilters",
    "ExactScanner",
    "Kind",
    "PoolEmbedder",
    "ScanResult",
    "ValidationReport",
    "as_skip",
    "bad_rows",
    "build_index",
    "embed_prompts",
    "check_index_kind",
    "held_out_queries",
    "measure_recall",
    "merge_results",
    "normalize_queries",
    "norms_of",
    "read_index_info",
    "row_norms",
    "scan_block",
    "scan_block_hits",
    "scan_pool",
    "scan_pool_ray",
    "search_index",
    "torch_module",
    "torch_single_thread",
    "upcast_into",
    "validate",
]
