"""Time limits and bounded attempts for the calls of a data-parallel stage.

A stage call handles one whole input shard (``tasks/ray_data.py``). A call that hangs (a
stuck driver, a read that never returns) would hang its run for ever, and a shard that
ends its worker every time (a hang, a crash, running out of memory) would be retried for
ever: Ray Data restarts a dead actor and calls it again with the same shard, without limit.

:class:`CallGuard` wraps each call:

1. it counts the call in the shard's attempt record (``datasets/attempts.py``, in the
   output's staging folder) *before* the stage runs, so the next actor knows it is the
   N-th try;
2. a shard that already had ``attempts`` calls is not run again: every one of its rows
   comes back as a reject saying why (the last call's timeout, or that the worker ended);
3. otherwise the stage runs under a :class:`~pixelmill.tasks.watchdog.Watchdog`: the stage
   calls :meth:`Stage.beat` as it makes progress (a batch done); ``stall`` seconds without
   a beat (counted from the call's start, so a stage that never beats is timed by the whole
   call) records the reason in the shard's record and ends the worker process.

A worker's set-up (model loading, in the actor's constructor) is timed as a whole by
``setup_limit``; Ray restarts an actor that died there without limit, so after
``attempts`` timed-out set-ups the next actor raises :class:`SetupTimedOut` instead, and
the stage run fails with that reason.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from pixelmill.tasks.stage import STATUS_REJECT, Stage
from pixelmill.tasks.watchdog import Watchdog


class SetupTimedOut(RuntimeError):
    """A stage's set-up (model loading) timed out on every attempt: the stage run fails with this reason."""


def timeout_rejects(batch: pa.Table, reason: str, stage: str) -> pa.Table:
    """Every row of ``batch`` as a reject with ``reason``: ``id``, ``status``, ``error``, ``stage``, ``shard``.

    The stage is not called, so the table has none of its data columns; the writer keeps
    such a shard's data file out (``flows/common.py``) rather than give it this schema.
    """
    n = batch.num_rows
    ids = batch["id"] if "id" in batch.column_names else pa.nulls(n, pa.string())
    shards = batch["shard"] if "shard" in batch.column_names else pa.nulls(n, pa.string())
    return pa.table({
        "id": pc.cast(ids, pa.string()),
        "status": pa.array([STATUS_REJECT] * n, pa.string()),
        "error": pa.array([reason] * n, pa.string()),
        "stage": pa.array([stage] * n, pa.string()),
        "shard": pc.cast(shards, pa.string()),
    })


def out_of_attempts(last_reason: str | None, attempts: int) -> str:
    """The reject reason of a shard whose ``attempts`` calls all ended their worker."""
    if last_reason:
        return f"{last_reason}; gave up after {attempts} attempt(s)"
    return (f"worker ended: the stage's worker process ended during each of {attempts} attempt(s) at this "
            "shard (killed, out of memory or crashed)")


@dataclass(frozen=True)
class CallGuard:
    """Per-call watchdog and bounded attempts of a stage (plain data: it travels to the workers).

    Args:
        stall: seconds a call may go without a :meth:`Stage.beat` (None: no watchdog).
        setup_limit: seconds a worker's :meth:`Stage.setup` may take (None: no watchdog).
        attempts: calls a shard gets before its rows become rejects (at least 1).
        records: the folder of the shards' attempt records (``DatasetWriter.staging`` +
            ``/__attempts``); None: calls are not counted.
        poll: seconds between the watchdog's checks.
    """

    stall: float | None = None
    attempts: int = 2
    records: str | None = None
    poll: float = 0.5
    setup_limit: float | None = None

    @classmethod
    def from_timeouts(cls, timeouts: dict | None, records: str | None) -> CallGuard | None:
        """A guard from a config's ``timeouts`` block as plain data (``{"stall": s, "attempts": n, "setup": s}``)."""
        timeouts = timeouts or {}
        stall, setup = timeouts.get("stall"), timeouts.get("setup")
        shortest = min([t for t in (stall, setup) if t] or [2.5])
        guard = cls(stall=stall, attempts=int(timeouts.get("attempts") or 2), records=records,
                    poll=min(0.5, shortest / 5), setup_limit=setup)
        return guard if guard.stall is not None or guard.setup_limit is not None or guard.records is not None else None

    def begin(self, key: str) -> str | None:
        """Count a call of the rows named by ``key``; the reject reason instead when they are out of attempts."""
        if self.records is None:
            return None
        from pixelmill.datasets.attempts import ShardAttempts

        records = ShardAttempts(self.records)
        before = records.read(key)
        if before["attempts"] >= self.attempts:
            return out_of_attempts(before["reason"], before["attempts"])
        records.start(key, before)
        return None

    def setup(self, stage: Stage, exit: Callable[[int], None] = os._exit) -> None:
        """Run ``stage.setup()`` (model loading) within ``setup_limit`` seconds.

        A set-up past it records the timeout and ends the process; Ray restarts the actor
        (without limit). Once set-ups timed out ``attempts`` times, the next one is not
        tried: it raises :class:`SetupTimedOut`, which fails the stage run with the reason
        (a model store that never answers is no row's fault, so no row is rejected for it).
        """
        if self.setup_limit is None:
            stage.setup()
            return
        from pixelmill.datasets.attempts import ShardAttempts

        records = ShardAttempts(self.records) if self.records is not None else None
        key = f"setup-{stage.name}"
        if records is not None:
            before = records.read(key)
            if before["attempts"] >= self.attempts:
                raise SetupTimedOut(f"{before['reason']}; gave up after {before['attempts']} attempt(s)")

        def on_expire(reason: str) -> None:
            print(f"pixelmill: {reason}; ending this worker", file=sys.stderr, flush=True)
            if records is not None:
                records.record(key, reason, attempts=records.read(key)["attempts"] + 1)

        with Watchdog(stall=None, total=self.setup_limit, on_expire=on_expire, what=f"the set-up of stage {stage.name}",
                      exit=exit, poll=self.poll):
            stage.setup()

    def watchdog(self, stage: Stage, what: str, key: str, exit: Callable[[int], None] = os._exit) -> Watchdog:
        """The watchdog of one call of ``stage`` (records the reason under ``key``, then ends the process)."""

        def on_expire(reason: str) -> None:
            print(f"pixelmill: {reason}; ending this worker (the shard is retried up to {self.attempts} "
                  "attempt(s) in all)", file=sys.stderr, flush=True)
            if self.records is not None:
                from pixelmill.datasets.attempts import ShardAttempts

                ShardAttempts(self.records).record(key, reason)

        return Watchdog(stall=self.stall, total=None, on_expire=on_expire, what=f"{stage.name} of {what}",
                        exit=exit, poll=self.poll)

    def run(self, stage: Stage, batch: pa.Table, exit: Callable[[int], None] = os._exit) -> pa.Table:
        """Call ``stage(batch)`` under this guard (the batch carries its shard in a ``shard`` column)."""
        what, key = call_key(batch)
        reason = self.begin(key)
        if reason is not None:
            print(f"pixelmill: {what}: {reason}; its {batch.num_rows} row(s) are rejects", file=sys.stderr, flush=True)
            return timeout_rejects(batch, reason, stage.name)
        if self.stall is None:
            return stage(batch)
        dog = self.watchdog(stage, what, key, exit=exit)
        stage._heartbeat = dog.beat
        try:
            with dog:
                dog.beat()  # the stall clock starts with the call
                return stage(batch)
        finally:
            stage._heartbeat = None


def call_key(batch: pa.Table) -> tuple[str, str]:
    """What a call works on, in words (``shard 00003``), and the key of its attempt record.

    The key is the shard name plus a digest of the call's ids in order: a retry of the
    same call has the same key, and should Ray Data ever split a shard over several calls,
    each part is counted on its own.
    """
    import hashlib

    shards = sorted({str(s) for s in batch["shard"].to_pylist()}) if "shard" in batch.column_names else []
    ids = batch["id"].cast(pa.string()).to_pylist() if "id" in batch.column_names else []
    digest = hashlib.blake2b("\n".join(str(i) for i in ids).encode(), digest_size=6).hexdigest()
    name = "+".join(shards) or "batch"
    return (f"shard {', '.join(shards)}" if shards else "a batch"), f"{name}.{digest}"
