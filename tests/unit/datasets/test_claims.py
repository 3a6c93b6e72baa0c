"""The claim primitive raced on a local disk (threads and processes) and on a real S3 API (moto).

``create_if_absent`` must let exactly one of many racing creators win; the output lock
built on it must exclude: a counter incremented read-modify-write under it by many
threads or processes loses no increment.
"""

from __future__ import annotations

import json
import multiprocessing
import threading
import time

import pytest

from pixelmill.datasets import storage
from pixelmill.datasets.claims import OutputLock, create_if_absent, expired


def _race_threads(url: str, n: int) -> list[int]:
    wins: list[int] = []
    gate = threading.Barrier(n)

    def go(i: int) -> None:
        gate.wait()
        if create_if_absent(url, str(i).encode()):
            wins.append(i)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return wins


def _proc_create(url: str, i: int, gate, out) -> None:
    gate.wait()
    out.put((i, create_if_absent(url, str(i).encode())))


def _locked_increments(root: str, k: int) -> None:
    counter = storage.join(root, "counter")
    for _ in range(k):
        with OutputLock(root, ttl=30):
            n = int(storage.read_text(counter)) if storage.exists(counter) else 0
            time.sleep(0.001)
            storage.write_text_atomic(counter, str(n + 1))


def test_one_creator_wins_among_threads_and_processes_on_local_disk(tmp_path):
    for key in range(5):
        url = str(tmp_path / f"claim-{key}.json")
        wins = _race_threads(url, 24)
        assert len(wins) == 1
        assert storage.read_text(url) == str(wins[0])  # the winner's content, whole
    ctx = multiprocessing.get_context("fork")
    for key in range(3):
        url = str(tmp_path / f"proc-claim-{key}.json")
        gate, out = ctx.Barrier(8), ctx.Queue()
        procs = [ctx.Process(target=_proc_create, args=(url, i, gate, out)) for i in range(8)]
        for p in procs:
            p.start()
        results = [out.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(timeout=60)
        winners = [i for i, won in results if won]
        assert len(winners) == 1 and storage.read_text(url) == str(winners[0])


def test_output_lock_excludes_threads_and_processes_on_local_disk(tmp_path):
    root = str(tmp_path / "out")
    threads = [threading.Thread(target=_locked_increments, args=(root, 10)) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert storage.read_text(storage.join(root, "counter")) == "60"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_locked_increments, args=(root, 10)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert storage.read_text(storage.join(root, "counter")) == "100"
    # old generations are cleaned as it goes
    assert len(storage.listdir(storage.join(root, "__claims", "lock"))) <= 40


def test_a_dead_or_expired_lock_holder_is_taken_over(tmp_path):
    root = str(tmp_path / "out")
    held = OutputLock(root, ttl=60).acquire()
    assert not OutputLock(root).try_acquire()
    # the holder's record, as a killed process on another host leaves it once expired
    url = held._name(held.gen)
    record = json.loads(storage.read_text(url))
    assert not expired(record)
    storage.write_text_atomic(url, json.dumps({**record, "host": "elsewhere", "expires": time.time() - 1}))
    taker = OutputLock(root)
    assert taker.try_acquire() and taker.gen == held.gen + 1
    held.release()  # too late: the taker's generation is the lock now, so this changes nothing
    assert not OutputLock(root).try_acquire()
    taker.release()
    assert OutputLock(root).try_acquire()


@pytest.mark.slow
def test_one_creator_wins_and_the_lock_excludes_on_s3(s3_server):
    for key in range(3):
        url = s3_server.url("claims-race", f"claim-{key}.json")
        wins = _race_threads(url, 24)
        assert len(wins) == 1, wins
        assert storage.read_text(url) == str(wins[0])
    root = s3_server.url("claims-lock")
    threads = [threading.Thread(target=_locked_increments, args=(root, 3)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert storage.read_text(storage.join(root, "counter")) == "9"
