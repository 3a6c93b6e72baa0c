"""The SSRF guard: address classification, checked DNS resolution, URL checks.

Only http(s) is allowed; every hop is checked against loopback, private, link-local
(cloud metadata), multicast, unspecified and reserved addresses, and the client built by
:func:`make_client` re-checks the resolved address at connect time and connects to exactly
the address it checked (no DNS-rebinding window).
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from typing import Any

import httpcore
import httpx

from pixelmill.tasks.download.settings import DownloadConfig, Resolver

_PRIVATE_NETWORKS = tuple(
    ipaddress.ip_network(net)
    for net in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7")
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NUMERIC_HOST = re.compile(r"(0x[0-9a-f]*|[0-9]+)(\.(0x[0-9a-f]*|[0-9]+)){0,3}", re.IGNORECASE)


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
