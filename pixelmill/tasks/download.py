"""Download exactly N images per class prompt from ranked candidate URLs.

The download half of regularization retrieval (Custom Diffusion): the candidate scan
ranks pool rows by CLIP similarity, and :func:`download_exact_n` turns that ranking into
exactly the N highest-ranked distinct images that download and decode, never more and
never padded. The reference scripts skip failures sequentially, write N+1 images or crash
when candidates run out; here the result is deterministic whatever the network timing,
and a shortfall is reported, not hidden.

Fetching is img2dataset-like (per-sample ``status`` / ``error_message``, a stats dict,
``timeout=10``, X-Robots-Tag ``noai`` honoured) and safe against SSRF: only http(s),
every hop (the first request and each redirect, followed by hand) is checked against
loopback, private, link-local (cloud metadata), multicast, unspecified and reserved
addresses, and the client built by :func:`make_client` re-checks the resolved address at
connect time and connects to exactly the address it checked, so DNS rebinding between the
check and the connection cannot reach an internal host.
"""

from __future__ import annotations

import asyncio
import fnmatch
import hashlib
import ipaddress
import math
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

import httpcore
import httpx
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator

from pixelmill.datasets.images import ImageError, normalize_image

DEFAULT_USER_AGENT = "pixelmill/0.1 (regularization-image downloader; honours X-Robots-Tag noai)"
DEFAULT_ROBOTS_DIRECTIVES = ("noai", "noimageai", "noindex", "noimageindex", "none")
REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
DECODE_ERRORS = frozenset({"undecodable", "too_many_pixels", "empty", "unsupported_mode"})

Resolver = Callable[[str, int], Sequence[str]]
"""``(host, port) -> IP address strings``; blocking, like ``socket.getaddrinfo``."""

_PRIVATE_NETWORKS = tuple(
    ipaddress.ip_network(net)
    for net in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7")
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NUMERIC_HOST = re.compile(r"(0x[0-9a-f]*|[0-9]+)(\.(0x[0-9a-f]*|[0-9]+)){0,3}", re.IGNORECASE)
_VALUED_ROBOTS_DIRECTIVES = frozenset(
    {"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview"}
)


class DownloadError(Exception):
    """A fetch that failed for a reason fit for ``error_message``.

    Args:
        reason: short img2dataset-style reason (``http_404``, ``timeout``, ...).
        retryable: whether another attempt may succeed (timeouts, connection errors,
            429, 5xx).
        http_status: the status of the response that failed, when there was one.
        content_type: its Content-Type header, when there was one.
    """

    def __init__(self, reason: str, retryable: bool = False, http_status: int | None = None,
                 content_type: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable
        self.http_status = http_status
        self.content_type = content_type


class DownloadConfig(BaseModel):
    """How candidate images are fetched: img2dataset-like defaults, safe by default.

    Field names are a superset of ``pixelmill.config.DownloadSettings``, so
    ``DownloadConfig(**settings.model_dump(), resolution=..., max_pixels=...)`` works.

    Args:
        timeout: seconds for one attempt, all of it (every redirect hop, headers and
            body); a server that stalls or trickles bytes fails with ``timeout``.
        retries: extra attempts after timeouts, connection errors, 429 and 5xx.
        backoff: the first retry waits ``backoff`` seconds, then twice as long each time.
        sleep: the async callable that waits between retries (tests inject a recorder).
        max_bytes: largest body accepted (Content-Length checked first, then while
            streaming, after content decoding).
        per_host_concurrency: requests in flight to one host at most.
        concurrency: requests in flight overall at most.
        user_agent: sent with every request (``None`` means the pixelmill default).
        robots_user_agent_token: ``X-Robots-Tag: <token>: noai`` applies to us when the
            token is this one (directives without a token apply to everyone).
        allowed_content_types: media-type patterns accepted; a response without a
            Content-Type is decoded and judged by its bytes. The generic
            ``application/octet-stream`` is accepted by default because object stores
            serve many real images with it.
        respect_robots_tags: refuse images whose ``X-Robots-Tag`` carries one of
            ``robots_directives`` (img2dataset's defaults plus ``none``, which means
            ``noindex, nofollow``).
        allow_loopback: allow 127.0.0.0/8 and ::1 (tests, local mirrors).
        allow_private_addresses: allow RFC 1918, shared (100.64/10) and unique-local
            (fc00::/7) addresses. Link-local (cloud metadata), multicast, unspecified and
            reserved addresses are never allowed.
        max_redirects: redirects followed per attempt at most.
        resolution / max_pixels: passed to ``normalize_image``.
        resolver: ``(host, port) -> [ip, ...]`` (default: ``socket.getaddrinfo``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    timeout: float = Field(default=10.0, gt=0)
    retries: int = Field(default=2, ge=0)
    backoff: float = Field(default=0.5, ge=0)
    sleep: Callable[[float], Awaitable[Any]] = Field(default=asyncio.sleep, exclude=True)
    max_bytes: int = Field(default=20_000_000, ge=1)
    per_host_concurrency: int = Field(default=4, ge=1)
    concurrency: int = Field(default=32, ge=1)
    user_agent: str = DEFAULT_USER_AGENT
    robots_user_agent_token: str = "pixelmill"
    allowed_content_types: tuple[str, ...] = ("image/*", "application/octet-stream", "binary/octet-stream")
    respect_robots_tags: bool = True
    robots_directives: tuple[str, ...] = DEFAULT_ROBOTS_DIRECTIVES
    allow_private_addresses: bool = False
    allow_loopback: bool = False
    max_redirects: int = Field(default=5, ge=0)
    resolution: int = Field(default=512, ge=8, le=4096)
    max_pixels: int = Field(default=50_000_000, ge=64)
    resolver: Resolver | None = Field(default=None, exclude=True)

    @field_validator("user_agent", mode="before")
    @classmethod
    def _default_user_agent(cls, value: Any) -> Any:
        return DEFAULT_USER_AGENT if value is None else value


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


def system_resolver(host: str, port: int) -> list[str]:
    """Resolve ``host`` with ``socket.getaddrinfo``: unique addresses, in its order."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def classify_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address | str) -> str | None:
    """Label a non-public address, or return ``None`` for a global unicast one.

    Labels: ``unspecified``, ``loopback``, ``link-local`` (169.254/16 with the cloud
    metadata address, fe80::/10), ``multicast``, ``private`` (10/8, 172.16/12,
    192.168/16, 100.64/10, fc00::/7), ``reserved`` (anything else not globally routable).
    IPv4 addresses embedded in IPv6 (mapped, 6to4, NAT64) are judged as IPv4.

    Args:
        ip: the address (object or string, IPv6 zone ids allowed).
    """
    if isinstance(ip, str):
        ip = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            label = classify_address(embedded)
            if label is not None:
                return label
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    if any(ip in net for net in _PRIVATE_NETWORKS if net.version == ip.version):
        return "private"
    if ip.is_reserved or not ip.is_global:
        return "reserved"
    return None


def address_block_reason(ip: str, cfg: DownloadConfig) -> str | None:
    """``blocked_address: <ip> (<label>)`` when ``cfg`` forbids ``ip``, else ``None``."""
    label = classify_address(ip)
    if label is None or (label == "loopback" and cfg.allow_loopback) or (
        label == "private" and cfg.allow_private_addresses
    ):
        return None
    return f"blocked_address: {ip} ({label})"


def _literal_ip(host: str) -> str | None:
    """The address a numeric host denotes, legacy IPv4 forms included (``2130706433``,
    ``0x7f.1``, ``127.1``: ``inet_aton`` and so getaddrinfo accept them), else ``None``."""
    host = host.strip("[]").split("%", 1)[0]
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if _NUMERIC_HOST.fullmatch(host):
        try:
            return socket.inet_ntoa(socket.inet_aton(host))
        except OSError:
            return None
    return None


def _split_url(url: str) -> tuple[httpx.URL | None, str | None]:
    """Parse ``url``; return it with ``None``, or ``None`` with the reason it is refused."""
    if not isinstance(url, str) or not url.strip():
        return None, "invalid_url"
    try:
        parsed = httpx.URL(url.strip())
    except Exception:  # noqa: BLE001 - any parse failure is a bad URL
        return None, "invalid_url"
    scheme = parsed.scheme.lower()
    if scheme not in ("http", "https"):
        return None, f"unsupported_scheme: {scheme or 'none'}"
    if not parsed.host:
        return None, "invalid_url"
    return parsed, None


def resolve_checked(host: str, port: int, cfg: DownloadConfig, resolver: Resolver | None = None) -> list[str]:
    """Resolve ``host`` and return its addresses if every one is allowed by ``cfg``.

    All addresses must pass (not just the first), since an attacker controlling DNS
    chooses which one a client ends up using.

    Raises:
        DownloadError: ``dns_error`` or ``blocked_address: <ip> (<label>)``.
    """
    literal = _literal_ip(host)
    if literal is not None:
        addresses = [literal]
    else:
        try:
            addresses = list((resolver or cfg.resolver or system_resolver)(host, port))
        except (OSError, UnicodeError) as exc:
            raise DownloadError("dns_error") from exc
        if not addresses:
            raise DownloadError("dns_error")
    for ip in addresses:
        try:
            reason = address_block_reason(ip, cfg)
        except ValueError as exc:
            raise DownloadError("dns_error") from exc
        if reason:
            raise DownloadError(reason)
    return addresses


def check_url(url: str, cfg: DownloadConfig, resolver: Resolver | None = None) -> str | None:
    """SSRF guard for one URL: ``None`` if it may be requested, else the reason.

    Only ``http`` and ``https`` are allowed (``file:``, ``ftp:``, ``data:`` are refused);
    the host is resolved (``resolver``, then ``cfg.resolver``, then getaddrinfo) and every
    address must pass :func:`address_block_reason`. Blocking: call it from a thread in
    async code.

    Args:
        url: the URL about to be requested (first request or redirect target).
        cfg: which address classes are allowed.
        resolver: overrides ``cfg.resolver`` for this call.

    Returns:
        ``None``, or a reason such as ``unsupported_scheme: file``, ``invalid_url``,
        ``dns_error``, ``blocked_address: 169.254.169.254 (link-local)``.
    """
    parsed, reason = _split_url(url)
    if parsed is None:
        return reason
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        resolve_checked(parsed.host, port, cfg, resolver)
    except DownloadError as exc:
        return exc.reason
    return None


async def _aresolve_checked(host: str, port: int, cfg: DownloadConfig) -> list[str]:
    """:func:`resolve_checked` without blocking the loop (a thread only for DNS names)."""
    if _literal_ip(host) is not None:
        return resolve_checked(host, port, cfg)
    return await asyncio.to_thread(resolve_checked, host, port, cfg)


async def _acheck_url(url: str, cfg: DownloadConfig) -> str | None:
    parsed, reason = _split_url(url)
    if parsed is None:
        return reason
    try:
        await _aresolve_checked(parsed.host, parsed.port or (443 if parsed.scheme == "https" else 80), cfg)
    except DownloadError as exc:
        return exc.reason
    return None


def robots_disallow(values: Sequence[str], token: str, directives: Sequence[str]) -> str | None:
    """The first disallowing ``X-Robots-Tag`` directive that applies to us, or ``None``.

    img2dataset's semantics: each header value is ``[<ua token>:] d1, d2, ...``; a value
    without a token applies to every crawler, one with a token only to that token. A
    first part that is itself a valued directive (``unavailable_after: <date>``) is not a
    token.

    Args:
        values: every ``X-Robots-Tag`` header value of the response.
        token: our user-agent token (``pixelmill``).
        directives: the disallowing directives (lower case).
    """
    wanted = {d.lower() for d in directives}
    for value in values:
        head, sep, rest = value.partition(":")
        ua = head.strip().lower() if sep else None
        if ua in _VALUED_ROBOTS_DIRECTIVES:
            ua, rest = None, value
        elif not sep:
            rest = value
        if ua is not None and ua != token.lower():
            continue
        for directive in rest.split(","):
            d = directive.strip().lower()
            if d in wanted:
                return d
    return None


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


class _GuardedBackend(httpcore.AsyncNetworkBackend):
    """Resolves and checks the host at connect time, then connects to a checked address."""

    def __init__(self, cfg: DownloadConfig) -> None:
        self._cfg = cfg
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None, socket_options: Any = None) -> Any:
        try:
            addresses = await _aresolve_checked(host, port, self._cfg)
        except DownloadError as exc:
            raise httpcore.ConnectError(exc.reason) from exc
        last: Exception | None = None
        for ip in addresses:
            try:
                return await self._inner.connect_tcp(ip, port, timeout=timeout, local_address=local_address,
                                                     socket_options=socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last = exc
        assert last is not None
        raise last

    async def connect_unix_socket(self, path: str, timeout: float | None = None, socket_options: Any = None) -> Any:
        raise httpcore.ConnectError("blocked_address: unix socket")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


def make_client(cfg: DownloadConfig) -> httpx.AsyncClient:
    """An ``httpx.AsyncClient`` for :func:`fetch_image`, with the connect-time SSRF guard.

    Its connections go only to addresses that passed the same check as
    :func:`check_url`, resolved once per connection (no DNS-rebinding window); proxies
    from the environment are ignored (a proxy would make the address check meaningless);
    redirects are not followed automatically. Other clients work with
    :func:`fetch_image` too, with the per-hop check only.

    Args:
        cfg: timeouts, limits, user agent and the address policy.
    """
    limits = httpx.Limits(max_connections=cfg.concurrency, max_keepalive_connections=cfg.concurrency,
                          keepalive_expiry=5.0)
    transport = httpx.AsyncHTTPTransport(trust_env=False, limits=limits)
    if not isinstance(getattr(transport, "_pool", None), httpcore.AsyncConnectionPool):
        raise RuntimeError("unsupported httpx version: cannot install the connect-time address guard")
    transport._pool = httpcore.AsyncConnectionPool(
        ssl_context=httpx.create_ssl_context(),
        max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections,
        keepalive_expiry=limits.keepalive_expiry,
        network_backend=_GuardedBackend(cfg),
    )
    return httpx.AsyncClient(transport=transport, follow_redirects=False, trust_env=False,
                             timeout=httpx.Timeout(cfg.timeout), headers={"User-Agent": cfg.user_agent})


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


__all__ = [
    "DEFAULT_ROBOTS_DIRECTIVES", "DEFAULT_USER_AGENT", "DownloadConfig", "DownloadError", "ExactNResult",
    "FetchResult", "HostLimiter", "Resolver", "address_block_reason", "check_url", "classify_address",
    "download_exact_n", "fetch_image", "make_client", "resolve_checked", "robots_disallow", "run_download_exact_n",
    "system_resolver",
]
