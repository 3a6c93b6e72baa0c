"""Download settings: :class:`DownloadConfig`, the user agent and the ``Resolver`` type."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from pydantic import ConfigDict, Field, field_validator

from pixelmill.config.retrieve import DownloadSettings
from pixelmill.tasks.download.robots import DEFAULT_ROBOTS_DIRECTIVES

DEFAULT_USER_AGENT = "pixelmill/0.1 (regularization-image downloader; honours X-Robots-Tag noai)"


Resolver = Callable[[str, int], Sequence[str]]
"""``(host, port) -> IP address strings``; blocking, like ``socket.getaddrinfo``."""


class DownloadConfig(DownloadSettings):
    """The downloader's settings: the user-facing ``DownloadSettings`` plus what the run adds.

    Every user-facing field (timeouts, retries, sizes, concurrency, the address and robots
    policy) is declared once, in ``pixelmill.config.DownloadSettings``, with its limits;
    this adds the image size limits from ``RetrieveConfig`` and the knobs only code sets
    (test hooks, the content-type and robots lists). Build it as
    ``DownloadConfig(**cfg.download.model_dump(), resolution=..., max_pixels=...)``.

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

    sleep: Callable[[float], Awaitable[Any]] = Field(default=asyncio.sleep, exclude=True)
    user_agent: str = DEFAULT_USER_AGENT
    robots_user_agent_token: str = "pixelmill"
    allowed_content_types: tuple[str, ...] = ("image/*", "application/octet-stream", "binary/octet-stream")
    robots_directives: tuple[str, ...] = DEFAULT_ROBOTS_DIRECTIVES
    max_redirects: int = Field(default=5, ge=0)
    resolution: int = Field(default=512, ge=8, le=4096)
    max_pixels: int = Field(default=50_000_000, ge=64)
    resolver: Resolver | None = Field(default=None, exclude=True)

    @field_validator("user_agent", mode="before")
    @classmethod
    def _default_user_agent(cls, value: Any) -> Any:
        return DEFAULT_USER_AGENT if value is None else value
