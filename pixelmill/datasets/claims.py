"""Claims in an output folder, so that overlapping runs never edit the same rows twice.

Everything rests on one primitive, :func:`create_if_absent`: an object is created only if
no object has that name, atomically, and exactly one of many racing creators wins (an
exclusive ``os.link`` of a finished temporary file on local disks, so a reader never sees
a half-written claim; a conditional ``PutObject`` with ``If-None-Match: *`` on S3).

Layout under the output (``__`` folders: no dataset reader lists them)::

    __claims/lock/<generation>.json   the output's lock: the highest generation is its state
    __claims/runs/<run>.json          a run's claim: owner, expiry (renewed by a heartbeat)
    __claims/runs/<run>.ids.parquet   the ids that run will edit

:class:`OutputLock` is taken by creating generation ``g + 1`` once generation ``g`` is
released or expired; only one process can create it. Under the lock a run reads the
processed table and the live claims, and writes its own claim; commits re-read and
rewrite the manifest under it, so two runs never lose each other's shards. A claim (or a
lock generation) is expired when its ``expires`` time has passed, or at once when its
owner ran on this host and that process is gone (a killed run).
"""

from __future__ import annotations

import json
import os
import posixpath
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from pixelmill.datasets import storage

CLAIMS_DIR = "__claims"
LOCK_KEEP = 32
_memory_lock = threading.Lock()


def claim_ttl() -> float:
    """Seconds a run's claim lives without a heartbeat (``$PIXELMILL_CLAIM_TTL``, default 120)."""
    return float(os.environ.get("PIXELMILL_CLAIM_TTL", "120"))


def lock_ttl() -> float:
    """Seconds a lock holder may keep the output's lock (``$PIXELMILL_LOCK_TTL``, default 60)."""
    return float(os.environ.get("PIXELMILL_LOCK_TTL", "60"))


def create_if_absent(url: str, data: bytes) -> bool:
    """Create the object ``url`` with ``data`` unless one exists; True when this call created it.

    Local disks: the data goes to a temporary file that is then hard-linked to ``url``
    (``link`` fails if the name exists, and the object appears whole). S3: ``PutObject``
    with ``If-None-Match: *``. ``memory://``: an in-process lock.
    """
    local = storage.local_path(url)
    if local is not None:
        os.makedirs(os.path.dirname(local) or ".", exist_ok=True)
        tmp = f"{os.path.dirname(local)}/.{os.path.basename(local)}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "xb") as f:
            f.write(data)
        try:
            os.link(tmp, local)
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
    fs, path = storage.resolve(url)
    if "memory" in storage._protocols(fs):
        with _memory_lock:
            if fs.exists(path):
                return False
            fs.pipe_file(path, data)
            return True
    fs.makedirs(posixpath.dirname(path), exist_ok=True)  # local-like filesystems need the folder; S3: nothing
    try:
        fs.pipe_file(path, data, mode="create")
    except FileExistsError:
        return False
    return True


def _owner() -> dict[str, Any]:
    info: dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid()}
    try:
        import psutil

        info["pid_start"] = psutil.Process().create_time()
    except Exception:  # noqa: BLE001 - only makes the dead-owner check stricter
        pass
    return info


def owner_dead(record: dict[str, Any]) -> bool:
    """Whether the process that wrote ``record`` ran on this host and is gone."""
    if record.get("host") != socket.gethostname() or not record.get("pid"):
        return False
    try:
        import psutil

        proc = psutil.Process(int(record["pid"]))
        started = record.get("pid_start")
        return started is not None and abs(proc.create_time() - float(started)) > 1.0
    except Exception:  # noqa: BLE001 - no such process (or no psutil): gone
        return True


def expired(record: dict[str, Any], now: float | None = None) -> bool:
    """Whether a claim or lock record no longer holds: past its ``expires``, or its owner is gone."""
    return float(record.get("expires", 0)) < (now or time.time()) or owner_dead(record)


def _read_json(url: str) -> dict[str, Any] | None:
    try:
        return json.loads(storage.read_text(url))
    except (FileNotFoundError, ValueError):
        return None


class LockTimeout(TimeoutError):
    """The output's lock stayed held by a live holder for longer than the wait allowed."""


class OutputLock:
    """The lock of an output folder (a generation counter of create-if-absent objects).

    Args:
        output: the dataset folder.
        ttl: seconds after which a holder that did not release is presumed dead.
    """

    def __init__(self, output: str, ttl: float | None = None) -> None:
        self.dir = storage.join(output, CLAIMS_DIR, "lock")
        self.ttl = lock_ttl() if ttl is None else ttl
        self.gen: int | None = None
        self.nonce = ""

    def _name(self, gen: int) -> str:
        return storage.join(self.dir, f"{gen:012d}.json")

    def _generations(self) -> list[int]:
        return sorted(int(n[:-5]) for n in storage.listdir(self.dir) if n.endswith(".json") and n[:-5].isdigit())

    def try_acquire(self) -> bool:
        """One attempt: True when this call now holds the lock."""
        gens = self._generations()
        top = gens[-1] if gens else -1
        if top >= 0:
            rec = _read_json(self._name(top))
            if rec is None:
                return False  # removed between listing and reading: look again
            if not rec.get("released") and not expired(rec):
                return False
        self.nonce = uuid.uuid4().hex
        record = {**_owner(), "nonce": self.nonce, "expires": time.time() + self.ttl}
        won = create_if_absent(self._name(top + 1), json.dumps(record).encode())
        if not won:  # a retried PUT may have landed the first time: it is ours if it holds our nonce
            won = (_read_json(self._name(top + 1)) or {}).get("nonce") == self.nonce
        if won and max(self._generations(), default=-1) != top + 1:
            return False  # a stale view: generations were cleaned past ours while this process stalled
        if won:
            self.gen = top + 1
            for old in gens[: max(0, len(gens) - LOCK_KEEP)]:
                storage.remove(self._name(old))
        return won

    def acquire(self, timeout: float = 300.0) -> OutputLock:
        """Wait for the lock (polling), taking over a holder that expired or died.

        Raises:
            LockTimeout: a live holder kept it for ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        delay = 0.02
        while not self.try_acquire():
            if time.monotonic() > deadline:
                raise LockTimeout(f"the lock of {posixpath.dirname(self.dir)} stayed held for {timeout:.0f}s")
            time.sleep(delay)
            delay = min(0.5, delay * 1.5)
        return self

    def release(self) -> None:
        """Hand the lock back (a later generation saying so; nothing if it was taken over)."""
        if self.gen is not None:
            create_if_absent(self._name(self.gen + 1), json.dumps({"released": True, "by": self.nonce}).encode())
            self.gen = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def new_run_id() -> str:
    """A sortable, unique run id: UTC time and 6 random hex characters (``20260101t020000-1a2b3c``)."""
    return time.strftime("%Y%m%dt%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


@dataclass
class RunClaim:
    """One run's claim on ids of an output (its record; the ids live in a Parquet file beside it).

    Args:
        output: the dataset folder.
        run: the run id.
        shards: the output shard names the run will write (reserved for it).
        rows: how many ids it claimed.
        record: the owner fields and ``expires``.
    """

    output: str
    run: str
    shards: list[str] = field(default_factory=list)
    rows: int = 0
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return storage.join(self.output, CLAIMS_DIR, "runs", f"{self.run}.json")

    @property
    def ids_url(self) -> str:
        return storage.join(self.output, CLAIMS_DIR, "runs", f"{self.run}.ids.parquet")

    def write(self, ids: list[str], ttl: float | None = None) -> RunClaim:
        """Create the claim (call under the output's lock): the ids first, then the record."""
        from pixelmill.datasets.writer import write_parquet_file

        write_parquet_file(self.ids_url, pa.table({"id": pa.array(ids, pa.string())}))
        self.rows = len(ids)
        self.record = {**_owner(), "run": self.run, "shards": self.shards, "rows": self.rows,
                       "expires": time.time() + (claim_ttl() if ttl is None else ttl)}
        if not create_if_absent(self.url, json.dumps(self.record).encode()):
            raise FileExistsError(f"claim {self.url} exists already")
        return self

    def renew(self, ttl: float | None = None) -> bool:
        """Push the expiry on (call under the lock); False when the claim was taken over."""
        if _read_json(self.url) is None:
            return False
        self.record["expires"] = time.time() + (claim_ttl() if ttl is None else ttl)
        storage.write_text_atomic(self.url, json.dumps(self.record))
        return True

    def held(self) -> bool:
        """Whether the claim still exists (nobody took it over)."""
        rec = _read_json(self.url)
        return rec is not None and rec.get("pid") == self.record.get("pid", rec.get("pid"))

    def remove(self) -> None:
        """Delete the claim (call under the lock)."""
        storage.remove(self.url)
        storage.remove(self.ids_url)

    def ids(self) -> list[str]:
        """The claimed ids."""
        from pixelmill.datasets.reader import read_parquet_file

        try:
            return read_parquet_file(self.ids_url, ["id"])["id"].to_pylist()
        except FileNotFoundError:
            return []


def list_claims(output: str) -> list[RunClaim]:
    """Every run claim in the output (live or not)."""
    folder = storage.join(output, CLAIMS_DIR, "runs")
    claims = []
    for name in storage.listdir(folder):
        if name.endswith(".json") and not name.startswith("."):
            rec = _read_json(storage.join(folder, name))
            if rec is not None:
                claims.append(RunClaim(output, rec.get("run", name[:-5]), list(rec.get("shards", [])),
                                       int(rec.get("rows", 0)), rec))
    return claims


class Heartbeat:
    """Renews a claim every ``ttl / 3`` seconds from a daemon thread, under the output's lock.

    ``lost`` turns true when the claim was taken over (the run must not commit more).
    """

    def __init__(self, claim: RunClaim, ttl: float | None = None) -> None:
        self.claim = claim
        self.ttl = claim_ttl() if ttl is None else ttl
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"claim-heartbeat-{claim.run}", daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                with OutputLock(self.claim.output):
                    if not self.claim.renew(self.ttl):
                        self.lost = True
                        return
            except Exception:  # noqa: BLE001 - a missed beat is retried; the claim outlives several
                continue

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
