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

from pixelmill.tasks.download.exact_n import ExactNResult, download_exact_n, run_download_exact_n
from pixelmill.tasks.download.fetch import DECODE_ERRORS, REDIRECT_CODES, FetchResult, HostLimiter, fetch_image
from pixelmill.tasks.download.guard import (
    DownloadError,
    address_block_reason,
    check_url,
    classify_address,
    make_client,
    resolve_checked,
    system_resolver,
)
from pixelmill.tasks.download.robots import DEFAULT_ROBOTS_DIRECTIVES, robots_disallow
from pixelmill.tasks.download.settings import DEFAULT_USER_AGENT, DownloadConfig, Resolver

__all__ = [
    "DEFAULT_ROBOTS_DIRECTIVES", "DEFAULT_USER_AGENT", "DownloadConfig", "DownloadError", "ExactNResult",
    "FetchResult", "HostLimiter", "Resolver", "address_block_reason", "check_url", "classify_address",
    "download_exact_n", "fetch_image", "make_client", "resolve_checked", "robots_disallow", "run_download_exact_n",
    "system_resolver",
]
