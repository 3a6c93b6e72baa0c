"""Fetching one image: redirects by hand, size limits, the host limiter, decoding."""

from __future__ import annotations

import asyncio
import fnmatch
import hashlib
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

import httpx
from PIL import Image

from pixelmill.datasets.images import ImageError, normalize_image
from pixelmill.tasks.download.guard import DownloadError, _acheck_url
from pixelmill.tasks.download.robots import robots_disallow
from pixelmill.tasks.download.settings import DownloadConfig

REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
DECODE_ERRORS = frozenset({"undecodable", "too_many_pixels", "empty", "unsupported_mode"})


@dataclass
class FetchResult:
    """The outcome of fetching one URL (img2dataset's per-sample fields and more).

    ``sha256`` hashes the *normalised pixels* (size + RGB bytes after ``normalize_image``):
    it is the dedup key, so the same picture served from two URLs, or re-encoded
    losslessly, is one image. ``bytes_sha256`` hashes the downloaded bytes, for provenance.

    Args:
        url: the URL asked for.
        status: ``success`` or ``failed``.
        error_message: short reason when failed (``http_404``, ``timeout``, ``too_large``,
            ``not_an_image: text/html``, ``undecodable``, ``blocked_address: ...``,
            ``redirect_loop``, ``robots: noai``, ...).
        failed_stage: ``download`` or ``decode`` (img2dataset's failed_to_download /
            failed_to_resize), ``None`` on success.
        image: the normalised RGB image on success.
        sha256 / bytes_sha256: see above.
        num_bytes: size of the downloaded body.
        content_type / http_status: of the last response, when there was one.
        final_url: the last URL requested or refused (after redirects).
        attempts: requests chains tried (1 + retries used).
        seconds: wall time of the whole fetch, backoff included.
    """

    url: str
    status: Literal["success", "failed"]
    error_message: str | None = None
    failed_stage: Literal["download", "decode"] | None = None
    image: Image.Image | None = None
    sha256: str | None = None
    bytes_sha256: str | None = None
    num_bytes: int | None = None
    content_type: str | None = None
    http_status: int | None = None
    final_url: str | None = None
    attempts: int = 0
    seconds: float = 0.0

    def info(self) -> dict[str, Any]:
        """The fields worth keeping on a row (everything but the image)."""
        return {
            "status": self.status,
            "error_message": self.error_message,
            "sha256": self.sha256,
            "bytes_sha256": self.bytes_sha256,
            "num_bytes": self.num_bytes,
            "content_type": self.content_type,
            "http_status": self.http_status,
            "final_url": self.final_url,
            "attempts": self.attempts,
            "seconds": self.seconds,
        }


def _content_type_allowed(media_type: str, patterns: Sequence[str]) -> bool:
    return not media_type or any(fnmatch.fnmatchcase(media_type, p.lower()) for p in patterns)


class HostLimiter:
    """Per-host concurrency under a global limit (one instance per event loop).

    A request takes its host's slot first and a global slot second, so requests queued
    behind one busy host never hold global slots idle.

    Args:
        concurrency: requests in flight overall at most.
        per_host: requests in flight to one host at most.
    """

    def __init__(self, concurrency: int, per_host: int) -> None:
        self._global = asyncio.Semaphore(concurrency)
        self._per_host = per_host
        self._hosts: dict[str, asyncio.Semaphore] = {}

    @asynccontextmanager
    async def slot(self, host: str) -> AsyncIterator[None]:
        """Hold one slot for ``host`` (case-insensitive) and one global slot."""
        key = host.lower()
        sem = self._hosts.get(key)
        if sem is None:
            sem = self._hosts[key] = asyncio.Semaphore(self._per_host)
        async with sem, self._global:
            yield


@dataclass
class _Body:
    data: bytes
    http_status: int
    content_type: str | None
    final_url: str


@dataclass
class _Hop:
    """One request of a redirect chain: a body, or where to go next."""

    body: _Body | None = None
    location: str | None = None


async def _request(client: httpx.AsyncClient, url: str, cfg: DownloadConfig, seconds: float) -> _Hop:
    headers = {"User-Agent": cfg.user_agent, "Accept": "image/*,*/*;q=0.5", "Accept-Encoding": "identity"}
    async with client.stream("GET", url, headers=headers, follow_redirects=False,
                             timeout=httpx.Timeout(seconds)) as resp:
        status = resp.status_code
        if status in REDIRECT_CODES:
            location = resp.headers.get("location")
            if not location:
                raise DownloadError("bad_redirect", http_status=status)
            try:
                return _Hop(location=str(resp.url.join(location.strip())))
            except Exception as exc:  # noqa: BLE001 - a malformed Location header
                raise DownloadError("bad_redirect", http_status=status) from exc
        raw_type = resp.headers.get("content-type")
        if not 200 <= status < 300:
            raise DownloadError(f"http_{status}", retryable=status == 429 or status >= 500, http_status=status,
                                content_type=raw_type)
        media_type = (raw_type or "").split(";", 1)[0].strip().lower()
        if cfg.respect_robots_tags:
            directive = robots_disallow(resp.headers.get_list("x-robots-tag"), cfg.robots_user_agent_token,
                                        cfg.robots_directives)
            if directive:
                raise DownloadError(f"robots: {directive}", http_status=status, content_type=raw_type)
        if not _content_type_allowed(media_type, cfg.allowed_content_types):
            raise DownloadError(f"not_an_image: {media_type}", http_status=status, content_type=raw_type)
        declared = resp.headers.get("content-length")
        if declared and declared.strip().isdigit() and int(declared) > cfg.max_bytes:
            raise DownloadError("too_large", http_status=status, content_type=raw_type)
        buf = bytearray()
        async for chunk in resp.aiter_bytes():
            buf += chunk
            if len(buf) > cfg.max_bytes:
                raise DownloadError("too_large", http_status=status, content_type=raw_type)
        return _Hop(body=_Body(bytes(buf), status, raw_type, str(url)))


async def _attempt(client: httpx.AsyncClient, url: str, cfg: DownloadConfig,
                   limiter: HostLimiter | None, trail: list[str]) -> _Body:
    """One attempt: follow the redirect chain by hand within one ``cfg.timeout`` budget.

    The budget counts time spent in requests only (not waiting for a slot).
    """
    budget = cfg.timeout
    current = url
    seen = {url}
    redirects = 0
    while True:
        trail.append(current)
        reason = await _acheck_url(current, cfg)
        if reason:
            raise DownloadError(reason)
        host = httpx.URL(current).host
        async with limiter.slot(host) if limiter else _nullslot():
            if budget <= 0:
                raise DownloadError("timeout", retryable=True)
            started = time.monotonic()
            try:
                async with asyncio.timeout(budget):
                    hop = await _request(client, current, cfg, budget)
            except TimeoutError as exc:
                raise DownloadError("timeout", retryable=True) from exc
            except httpx.TimeoutException as exc:
                raise DownloadError("timeout", retryable=True) from exc
            except httpx.ConnectError as exc:
                text = str(exc)
                if text.startswith("blocked_address") or text == "dns_error":
                    raise DownloadError(text) from exc
                raise DownloadError("connection_error", retryable=True) from exc
            except httpx.TransportError as exc:
                raise DownloadError("connection_error", retryable=True) from exc
            finally:
                budget -= time.monotonic() - started
        if hop.body is not None:
            return hop.body
        assert hop.location is not None
        if hop.location in seen:
            raise DownloadError("redirect_loop")
        redirects += 1
        if redirects > cfg.max_redirects:
            raise DownloadError("too_many_redirects")
        seen.add(hop.location)
        current = hop.location


@asynccontextmanager
async def _nullslot() -> AsyncIterator[None]:
    yield


def _decode(data: bytes, cfg: DownloadConfig) -> tuple[Image.Image, str]:
    img = normalize_image(data, resolution=cfg.resolution, max_pixels=cfg.max_pixels)
    digest = hashlib.sha256(f"{img.mode}:{img.width}x{img.height}:".encode())
    digest.update(img.tobytes())
    return img, digest.hexdigest()


async def fetch_image(client: httpx.AsyncClient, url: str, cfg: DownloadConfig,
                      limiter: HostLimiter | None = None) -> FetchResult:
    """Fetch, check and normalise one image; never raises for a bad URL or server.

    Redirects are followed by hand, each target checked like the first URL (loops and
    more than ``cfg.max_redirects`` fail). Timeouts, connection errors, 429 and 5xx are
    retried ``cfg.retries`` times after ``cfg.backoff * 2**k`` seconds (via ``cfg.sleep``);
    other failures are final. The body is streamed and abandoned past ``cfg.max_bytes``;
    decoding runs in a worker thread so it never stalls other downloads' deadlines.

    Args:
        client: an ``httpx.AsyncClient``, ideally from :func:`make_client`.
        url: the image URL.
        cfg: the download settings.
        limiter: shared per-host and global limits (none if omitted).
    """
    started = time.monotonic()
    attempts = 0
    last: DownloadError | None = None
    body: _Body | None = None
    trail: list[str] = []
    while True:
        attempts += 1
        try:
            body = await _attempt(client, url, cfg, limiter, trail)
            break
        except DownloadError as exc:
            last = exc
        except Exception as exc:  # noqa: BLE001 - a surprise from the client is one failed row
            last = DownloadError(f"error: {type(exc).__name__}")
        if not last.retryable or attempts > cfg.retries:
            break
        await cfg.sleep(cfg.backoff * 2 ** (attempts - 1))

    def failed(reason: str, stage: Literal["download", "decode"], **extra: Any) -> FetchResult:
        return FetchResult(url=url, status="failed", error_message=reason, failed_stage=stage, attempts=attempts,
                           final_url=trail[-1] if trail else None, seconds=time.monotonic() - started, **extra)

    if body is None:
        assert last is not None
        return failed(last.reason, "download", http_status=last.http_status, content_type=last.content_type)
    info = {"content_type": body.content_type, "http_status": body.http_status, "num_bytes": len(body.data),
            "bytes_sha256": hashlib.sha256(body.data).hexdigest()}
    try:
        image, digest = await asyncio.to_thread(_decode, body.data, cfg)
    except ImageError as exc:
        return failed("too_many_pixels" if exc.reason == "too_large" else exc.reason, "decode", **info)
    except Exception as exc:  # noqa: BLE001 - any decoder crash is an undecodable image
        return failed(f"undecodable: {type(exc).__name__}", "decode", **info)
    return FetchResult(url=url, status="success", image=image, sha256=digest, final_url=body.final_url,
                       attempts=attempts, seconds=time.monotonic() - started, **info)


async def _safe_fetch(client: httpx.AsyncClient, url: Any, cfg: DownloadConfig, limiter: HostLimiter) -> FetchResult:
    if not isinstance(url, str):
        return FetchResult(url=str(url), status="failed", error_message="invalid_url", failed_stage="download")
    try:
        return await fetch_image(client, url, cfg, limiter)
    except Exception as exc:  # noqa: BLE001 - one candidate never fails the whole prompt
        return FetchResult(url=url, status="failed", error_message=f"error: {type(exc).__name__}",
                           failed_stage="download")
