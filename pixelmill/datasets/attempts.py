"""Per-shard attempt records of a stage run: how many calls a shard has had, and why the last one ended.

A stage call whose worker process ends (a watchdog ended a hung call, or the worker was
killed, ran out of memory or crashed) leaves no output; Ray Data restarts the actor and
calls it again with the same shard. A new actor knows nothing of the old one, so the
count lives in storage beside the output, in the run's staging folder::

    <output>/__staging[/<run>]/__attempts/<shard>.<ids digest>.json   {"attempts": 2, "reason": "timed out: ..."}

A call writes its record *before* it runs (a hang in native code never returns to write
one after), and the watchdog adds the reason just before it ends the process. Staging is
scoped to one run (a run without a claim clears ``__staging/`` when it opens the output; a
run with one stages under its own id), so a later run starts every shard at zero, and a
committed shard is never called again within its run.
"""

from __future__ import annotations

import json
import sys

from pixelmill.datasets import storage

ATTEMPTS_DIR = "__attempts"


class ShardAttempts:
    """The attempt records of one stage run's calls (one per shard), in the folder ``url``.

    Records are best effort: a record that cannot be read counts as none, and one that
    cannot be written (a full disk) is reported on stderr and the call goes ahead; the
    output's own writes then fail and name the path.

    Args:
        url: the records' folder (``DatasetWriter.staging`` + ``__attempts``).
    """

    def __init__(self, url: str) -> None:
        self.url = str(url)

    def _file(self, key: str) -> str:
        return storage.join(self.url, f"{key}.json")

    def read(self, key: str) -> dict:
        """``{"attempts": calls started so far, "reason": why the last one ended or None}``."""
        try:
            record = json.loads(storage.read_text(self._file(key)))
            return {"attempts": int(record.get("attempts", 0)), "reason": record.get("reason")}
        except (OSError, ValueError, AttributeError, TypeError):
            return {"attempts": 0, "reason": None}

    def _write(self, key: str, record: dict) -> None:
        try:
            storage.write_text_atomic(self._file(key), json.dumps(record))
        except OSError as e:
            print(f"pixelmill: could not record the attempts of {key} at {self._file(key)}: {e}",
                  file=sys.stderr)

    def start(self, key: str, before: dict | None = None) -> dict:
        """Count a call that is about to run; returns the record as it was before.

        Args:
            key: names the call's rows: its shard and a digest of its ids (``tasks/call_guard.call_key``).
            before: the record as the caller just read it (saves reading it again).
        """
        before = self.read(key) if before is None else before
        self._write(key, {"attempts": before["attempts"] + 1, "reason": None})
        return before

    def record(self, key: str, reason: str, attempts: int | None = None) -> None:
        """Say why the current call named ``key`` is ending (called just before its process ends).

        Args:
            attempts: the count to store (default: as it is; set-ups count only their timeouts).
        """
        count = self.read(key)["attempts"] if attempts is None else attempts
        self._write(key, {"attempts": count, "reason": reason})
