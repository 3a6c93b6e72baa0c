"""Download settings: :class:`DownloadConfig`, the user agent and the ``Resolver`` type."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pixelmill.tasks.download.robots import DEFAULT_ROBOTS_DIRECTIVES


DEFAULT_USER_AGENT = "pixelmill/0.1 (regularization-image downloader; honours X-Robots-Tag noai)"


Resolver = Callable[[str, int], Sequence[str]]
"""``(host, port) -> IP address strings``; blocking, like ``socket.getaddrinfo``."""


class DownloadConfig(BaseModel):
    """How candidate images are fetched: img2dataset-like defaults, safe by default.

    Field names are a superset of ``pixelmill.config.DownloadSettings``, so
    ``DownloadConfig(**settings.model_dump(), resolution=..., max_pixels=...)`` works.

    Construct it from the config's settings, not by hand:
    ``pixelmill.config.DownloadSettings`` (``RetrieveConfig.download``) is the
    user-facing, validated model and must supply every field it has; only what it lacks
    is added here (``resolution`` and ``max_pixels`` from ``RetrieveConfig``; ``sleep``
    and ``resolver`` are test hooks; the other fields keep their defaults), as
    ``pixelmill.tasks.regularization.download_prompt`` does. The two models have drifted
    (``max_bytes`` is ``ge=1024`` there but ``ge=1`` here) and are to be unified into
    one; until then, building from the settings keeps the user-facing limits in force.

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
