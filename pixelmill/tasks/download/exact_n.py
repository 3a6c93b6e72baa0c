"""Downloading exactly N images from ranked candidates (:func:`download_exact_n`)."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from pixelmill.tasks.download.fetch import FetchResult, HostLimiter, _safe_fetch
from pixelmill.tasks.download.guard import make_client
from pixelmill.tasks.download.settings import DownloadConfig


@dataclass
class ExactNResult:
    """What :func:`download_exact_n` chose, and what happened to every other candidate.

    Every candidate is in exactly one of ``accepted``, ``failed``, ``dropped`` and
    ``not_tried``.

    Args:
        accepted: the top-N successful distinct candidates in similarity order: candidate
            fields plus ``rank`` (0..N-1), ``candidate_rank`` (position in the input),
            ``image`` (normalised PIL), ``sha256`` (pixels), ``bytes_sha256``,
            ``num_bytes``, ``content_type``, ``http_status``, ``final_url``, ``attempts``,
            ``seconds``.
        failed: candidate fields plus ``candidate_rank``, ``error_message``,
            ``failed_stage``, ``http_status``, ``content_type``, ``final_url``,
            ``attempts``, ``seconds``.
        dropped: dropped by design, not rejects: candidate fields plus ``candidate_rank``
            and ``reason`` (``surplus``: launched but not needed once N were accepted, with
            ``fetch_status`` ``success``/``failed``/``cancelled``; or
            ``duplicate_of:<id>`` with ``sha256``).
        not_tried: candidates never requested (copies of the input dicts).
        shortfall: ``n - len(accepted)``; above 0 only when the candidates ran out.
        message: why there is a shortfall (found / downloaded / needed), else ``None``.
        stats: img2dataset-style counts: ``count`` (candidates given), ``needed``,
            ``tried``, ``successes``, ``failed_to_download``, ``failed_to_resize``,
            ``duplicates``, ``surplus``, ``not_tried``, ``shortfall``, ``status_dict``
            (``success`` and each error code, the part of ``error_message`` before ``:``),
            ``start_time``, ``end_time``, ``duration``. ``count`` equals the sum of
            successes, both failure counts, duplicates, surplus and not_tried.
    """

    accepted: list[dict[str, Any]]
    failed: list[dict[str, Any]]
    dropped: list[dict[str, Any]]
    not_tried: list[dict[str, Any]]
    shortfall: int
    stats: dict[str, Any]
    message: str | None = None


def _validate_candidates(candidates: Sequence[dict[str, Any]], n: int) -> None:
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    ids: set[Any] = set()
    previous = math.inf
    for i, cand in enumerate(candidates):
        if not isinstance(cand, dict):
            raise ValueError(f"candidates[{i}] is not a dict")
        for key in ("id", "url", "similarity"):
            if key not in cand:
                raise ValueError(f"candidates[{i}] has no {key!r}")
        if cand["id"] in ids:
            raise ValueError(f"candidates[{i}]: duplicate id {cand['id']!r}")
        ids.add(cand["id"])
        try:
            sim = float(cand["similarity"])
        except (TypeError, ValueError):
            raise ValueError(f"candidates[{i}] (id {cand['id']!r}): similarity is not a number") from None
        if math.isnan(sim):
            raise ValueError(f"candidates[{i}] (id {cand['id']!r}): similarity is NaN")
        if sim > previous:
            raise ValueError(f"candidates[{i}] (id {cand['id']!r}): not sorted by similarity, descending "
                             f"({sim} after {previous})")
        previous = sim


async def download_exact_n(candidates: list[dict[str, Any]], n: int, cfg: DownloadConfig | None = None,
                           client: httpx.AsyncClient | None = None) -> ExactNResult:
    """The N highest-similarity distinct candidates that download, never more, never padded.

    Downloads start in similarity order, a window at a time: at most
    ``min(cfg.concurrency, 2 * still_needed)`` candidates that may still yield an image
    (in flight, or done and waiting) at once. A candidate is decided only once every
    higher-ranked one is, so the accepted set is exactly the top-N successful distinct
    images whatever the network timing. Once N are accepted, what is still in flight is
    cancelled and, with what finished but is not needed, recorded as ``surplus``. A
    candidate whose normalised pixels equal a higher-ranked accepted one is dropped as
    ``duplicate_of:<id>``; a URL listed twice is fetched once.

    Args:
        candidates: dicts with at least ``id`` (unique), ``url`` and ``similarity``,
            sorted by similarity descending (checked: ``ValueError`` otherwise).
        n: how many images are needed.
        cfg: download settings (defaults if omitted).
        client: an ``httpx.AsyncClient``; default: :func:`make_client` for this call.
    """
    cfg = cfg or DownloadConfig()
    _validate_candidates(candidates, n)
    if client is None:
        async with make_client(cfg) as own:
            return await _exact_n(candidates, n, cfg, own)
    return await _exact_n(candidates, n, cfg, client)


async def _exact_n(candidates: list[dict[str, Any]], n: int, cfg: DownloadConfig,
                   client: httpx.AsyncClient) -> ExactNResult:
    start_time = time.time()
    limiter = HostLimiter(cfg.concurrency, cfg.per_host_concurrency)
    tasks: dict[int, asyncio.Task[FetchResult]] = {}
    by_url: dict[str, asyncio.Task[FetchResult]] = {}
    results: dict[int, FetchResult] = {}
    accepted: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    dropped: list[dict[str, Any]] = []
    owner_of: dict[str, Any] = {}
    launched = frontier = 0

    hopeful: set[int] = set()
    unresolved: set[int] = set()

    def launch(i: int) -> None:
        url = candidates[i]["url"]
        key = url.strip() if isinstance(url, str) else None
        task = by_url.get(key) if key is not None else None
        if task is None:
            task = asyncio.create_task(_safe_fetch(client, url, cfg, limiter))
            if key is not None:
                by_url[key] = task
        tasks[i] = task
        hopeful.add(i)
        unresolved.add(i)

    def harvest() -> None:
        for i in [i for i in unresolved if tasks[i].done()]:
            unresolved.discard(i)
            r = results[i] = tasks[i].result()
            if r.status != "success" or r.sha256 in owner_of:
                hopeful.discard(i)

    try:
        while len(accepted) < n and frontier < len(candidates):
            window = min(cfg.concurrency, 2 * (n - len(accepted)))
            while launched < len(candidates) and len(hopeful) < window:
                launch(launched)
                launched += 1
            harvest()
            if frontier not in results:
                await asyncio.wait({tasks[i] for i in unresolved}, return_when=asyncio.FIRST_COMPLETED)
                harvest()
                continue
            cand, r = candidates[frontier], results.pop(frontier)
            hopeful.discard(frontier)
            base = {**cand, "candidate_rank": frontier}
            if r.status != "success":
                failed.append({**base, "error_message": r.error_message, "failed_stage": r.failed_stage,
                               "http_status": r.http_status, "content_type": r.content_type, "final_url": r.final_url,
                               "attempts": r.attempts, "seconds": r.seconds})
            elif r.sha256 in owner_of:
                dropped.append({**base, "reason": f"duplicate_of:{owner_of[r.sha256]}", "sha256": r.sha256,
                                "final_url": r.final_url})
            else:
                owner_of[r.sha256] = cand["id"]
                info = r.info()
                del info["status"], info["error_message"]
                accepted.append({**base, "rank": len(accepted), "image": r.image, **info})
            frontier += 1
    finally:
        running = [t for t in set(tasks.values()) if not t.done()]
        for task in running:
            task.cancel()
        if running:
            await asyncio.gather(*running, return_exceptions=True)

    for i in range(frontier, launched):
        task = tasks[i]
        if task.cancelled():
            status, error = "cancelled", None
        else:
            r = task.result()
            status, error = r.status, r.error_message
        dropped.append({**candidates[i], "candidate_rank": i, "reason": "surplus", "fetch_status": status,
                        "error_message": error})
    not_tried = [dict(c) for c in candidates[launched:]]
    shortfall = n - len(accepted)
    duplicates = sum(1 for d in dropped if d["reason"] != "surplus")
    end_time = time.time()
    status_dict = Counter({"success": len(accepted)} if accepted else {})
    status_dict.update((f["error_message"] or "error").split(":", 1)[0] for f in failed)
    stats = {
        "count": len(candidates),
        "needed": n,
        "tried": launched,
        "successes": len(accepted),
        "failed_to_download": sum(1 for f in failed if f["failed_stage"] != "decode"),
        "failed_to_resize": sum(1 for f in failed if f["failed_stage"] == "decode"),
        "duplicates": duplicates,
        "surplus": len(dropped) - duplicates,
        "not_tried": len(not_tried),
        "shortfall": shortfall,
        "status_dict": dict(status_dict),
        "start_time": start_time,
        "end_time": end_time,
        "duration": end_time - start_time,
    }
    message = None
    if shortfall:
        message = (f"found {len(candidates)} candidates, downloaded {len(accepted)} distinct images, needed {n} "
                   f"({len(failed)} failed, {duplicates} duplicates): short by {shortfall}")
    return ExactNResult(accepted=accepted, failed=failed, dropped=dropped, not_tried=not_tried,
                        shortfall=shortfall, stats=stats, message=message)


def run_download_exact_n(candidates: list[dict[str, Any]], n: int,
                         cfg: DownloadConfig | None = None) -> ExactNResult:
    """Synchronous :func:`download_exact_n` for Ray tasks and other plain functions.

    Runs its own event loop (``asyncio.run``); called from a thread that already runs one
    (an async Ray actor, a notebook), it runs the loop in a helper thread instead.

    Args:
        candidates: as for :func:`download_exact_n`.
        n: how many images are needed.
        cfg: download settings (defaults if omitted).
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(download_exact_n(candidates, n, cfg))
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = asyncio.run(download_exact_n(candidates, n, cfg))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, name="pixelmill-download", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["result"]
