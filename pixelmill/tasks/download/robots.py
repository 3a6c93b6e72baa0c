"""X-Robots-Tag handling (img2dataset's semantics): which directives refuse an image."""

from __future__ import annotations

from collections.abc import Sequence

DEFAULT_ROBOTS_DIRECTIVES = ("noai", "noimageai", "noindex", "noimageindex", "none")


_VALUED_ROBOTS_DIRECTIVES = frozenset(
    {"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview"}
)


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
