"""Stable ids and shard assignment.

Python's ``hash()`` is salted per process, so every id and bucket here comes from
BLAKE2b: the same input gives the same answer on every worker and every run.
"""

from __future__ import annotations

import hashlib


def stable_id(*parts: object, length: int = 16) -> str:
    """A hex id derived from ``parts`` (joined by NUL), identical across processes.

    Use it for input ids (from a relative path) and for child ids (parent id plus seed,
    rank or frame), so re-runs produce the same ids.

    Args:
        *parts: values converted with ``str``.
        length: number of hex characters (at most 64).
    """
    text = "\x00".join(str(p) for p in parts)
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=32).hexdigest()
    return digest[:length]


def shard_for_id(id: str, num_buckets: int) -> int:
    """The bucket (``0 .. num_buckets - 1``) a row id belongs to.

    The assignment depends only on the id, so adding rows never moves existing ones.

    Args:
        id: the row id.
        num_buckets: how many buckets the plan has.
    """
    if num_buckets < 1:
        raise ValueError(f"num_buckets must be at least 1, got {num_buckets}")
    digest = hashlib.blake2b(id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % num_buckets


def shard_name(index: int) -> str:
    """The conventional shard name for a bucket index (``00000``)."""
    return f"{index:05d}"
