"""Stage-call timeouts: attempt records, the per-call watchdog, rejects made without the stage, and
how the writer commits a shard that is nothing but such rejects. In this process, no Ray.

``restarting_inline`` plays Ray Data's part: each shard's call goes through the guard, and a
call whose watchdog "ended the process" is made again on a freshly built stage, as Ray Data
restarts a dead actor and retries its shard.
"""

from __future__ import annotations

import threading
import time
from functools import partial
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads
import pytest

from pixelmill.datasets import Dataset, DatasetWriter, account, read_manifest
from pixelmill.datasets.attempts import ShardAttempts
from pixelmill.datasets.writer import write_table_dataset
from pixelmill.flows.common import plan_shards, run_stage_into_writer
from pixelmill.tasks.call_guard import CallGuard, call_key, timeout_rejects
from pixelmill.tasks.stage import STATUS_OK, Resources, Stage
from pixelmill.tasks.watchdog import EXIT_TIMED_OUT

OUT_SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string()), ("status", pa.string()),
                        ("error", pa.string()), ("stage", pa.string()), ("shard", pa.string())])


class WorkerEnded(Exception):
    """What a call sees here when its watchdog ended "the process"."""


class SlowStage(Stage):
    """Upper-cases ``text`` row by row, beating after each; ``hang`` names shards where it stops after one row.

    ``calls`` counts calls per shard over every instance (a restarted actor is a new instance).
    """

    name = "upper"
    dataset = ("upper", 1)
    calls: dict[str, int] = {}

    @classmethod
    def input_columns(cls, config: dict[str, Any]) -> list[str]:
        return ["id", "text"]

    def __init__(self, config: dict[str, Any], resources: Resources | None = None) -> None:
        super().__init__(config, resources)
        self.ended: threading.Event | None = None

    def __call__(self, batch: pa.Table) -> pa.Table:
        shard = batch["shard"][0].as_py()
        SlowStage.calls[shard] = SlowStage.calls.get(shard, 0) + 1
        rows = []
        for k, row in enumerate(batch.to_pylist()):
            if k == 1 and shard in self.config.get("hang", ()):
                while not (self.ended and self.ended.wait(0.02)):
                    pass
                raise WorkerEnded
            rows.append({**row, "text": row["text"].upper(), "status": STATUS_OK, "error": None, "stage": None})
            self.beat(f"{k + 1} of {batch.num_rows} rows")
        return pa.Table.from_pylist(rows, schema=OUT_SCHEMA)


def restarting_inline(specs, columns, builder, workers=1, guard=None):
    from pixelmill.datasets.incremental import read_spec

    for spec in specs:
        table = read_spec(str(spec["url"]), int(spec["rows"]), "", columns)
        table = table.append_column("shard", pa.array([spec["shard"]] * table.num_rows, pa.string()))
        while True:
            stage = builder()
            stage.setup()
            stage.ended = ended = threading.Event()
            exits: list[int] = []
            try:
                out = guard.run(stage, table, exit=lambda code, e=ended, x=exits: (x.append(code), e.set()))
            except WorkerEnded:
                assert exits == [EXIT_TIMED_OUT]
                continue
            break
        yield out


@pytest.fixture(autouse=True)
def _fresh_calls():
    SlowStage.calls = {}


def _run(src: str, out: str, config: dict, timeouts: dict) -> tuple:
    plan = plan_shards({"input": src, "output": out}, {"v": 1})
    writer = DatasetWriter(out, *SlowStage.dataset, plan.config)
    stats = run_stage_into_writer(plan=plan, builder=partial(SlowStage, config, Resources(cpus=1)),
                                  columns=["id", "text"], writer=writer, workers=1,
                                  execute=restarting_inline, timeouts=timeouts)
    writer.finish()
    return stats, writer


def _input(tmp_path, shards: int = 2) -> tuple[str, list[str]]:
    ids = [f"r{i:02d}" for i in range(3 * shards)]
    url = str(tmp_path / "in")
    write_table_dataset(url, pa.table({"id": ids, "text": [f"text {i}" for i in ids]}), "texts", {}, rows_per_shard=3)
    return url, ids


def test_attempt_records_count_calls_and_keep_the_last_reason(tmp_path):
    rec = ShardAttempts(str(tmp_path / "att"))
    assert rec.read("00001.abc") == {"attempts": 0, "reason": None}
    assert rec.start("00001.abc") == {"attempts": 0, "reason": None}
    rec.record("00001.abc", "timed out: x")
    assert rec.read("00001.abc") == {"attempts": 1, "reason": "timed out: x"}
    assert rec.start("00001.abc") == {"attempts": 1, "reason": "timed out: x"}
    assert rec.read("00001.abc") == {"attempts": 2, "reason": None}  # the new call has no reason (yet)
    (tmp_path / "att" / "00002.abc.json").write_text("{not json")
    assert rec.read("00002.abc") == {"attempts": 0, "reason": None}  # unreadable: counts as none


def test_the_key_names_the_shard_and_the_calls_rows():
    t = pa.table({"id": ["a", "b"], "shard": ["00003", "00003"]})
    what, key = call_key(t)
    assert what == "shard 00003" and key.startswith("00003.")
    assert call_key(t)[1] == key and call_key(t.slice(0, 1))[1] != key  # a retry matches, a part does not


def test_a_shard_out_of_attempts_comes_back_as_rejects_without_calling_the_stage(tmp_path):
    guard = CallGuard(stall=None, attempts=2, records=str(tmp_path / "att"))
    stage = SlowStage({})
    batch = pa.table({"id": ["a", "b", "c"], "text": ["x", "y", "z"], "shard": ["00001"] * 3})
    for _ in range(2):  # two calls whose worker "ended" (counted before they ran, never finished)
        guard.begin(call_key(batch)[1])
    out = guard.run(stage, batch)
    assert SlowStage.calls == {}
    assert out.column_names == ["id", "status", "error", "stage", "shard"]
    assert out["id"].to_pylist() == ["a", "b", "c"] and set(out["status"].to_pylist()) == {"reject"}
    assert set(out["stage"].to_pylist()) == {"upper"} and set(out["shard"].to_pylist()) == {"00001"}
    assert out["error"][0].as_py() == ("worker ended: the stage's worker process ended during each of 2 "
                                       "attempt(s) at this shard (killed, out of memory or crashed)")


def test_a_stalled_call_records_why_and_ends_the_process_and_beats_keep_calls_alive(tmp_path):
    guard = CallGuard(stall=0.3, attempts=1, records=str(tmp_path / "att"), poll=0.02)
    batch = pa.table({"id": ["a", "b", "c"], "text": ["x", "y", "z"], "shard": ["00001"] * 3})
    stage = SlowStage({"hang": ["00001"]})
    stage.ended = ended = threading.Event()
    exits: list[int] = []
    t0 = time.monotonic()
    with pytest.raises(WorkerEnded):
        guard.run(stage, batch, exit=lambda code: (exits.append(code), ended.set()))
    assert exits == [EXIT_TIMED_OUT] and time.monotonic() - t0 < 3
    reason = ShardAttempts(guard.records).read(call_key(batch)[1])["reason"]
    assert reason == "timed out: upper of shard 00001 made no progress for stall_timeout=0.3 s (1 of 3 rows)"
    assert stage._heartbeat is None  # unwired after the call
    out = guard.run(SlowStage({}), batch)  # attempts=1: the next call gives up, naming the timeout
    assert out["error"][0].as_py() == reason + "; gave up after 1 attempt(s)"

    class Beating(SlowStage):  # 1 s of work, beating every 0.1 s, under a 0.3 s stall
        def __call__(self, b):
            for _ in range(10):
                time.sleep(0.1)
                self.beat()
            return super().__call__(b)

    exits.clear()
    other = batch.set_column(2, "shard", pa.array(["00002"] * 3))
    assert guard.run(Beating({}), other, exit=exits.append).num_rows == 3 and exits == []

    class Silent(SlowStage):  # never beats: timed by the whole call
        def __call__(self, b):
            time.sleep(0.8)
            return pa.Table.from_pylist([], schema=OUT_SCHEMA)

    third = batch.set_column(2, "shard", pa.array(["00003"] * 3))
    guard.run(Silent({}), third, exit=exits.append)
    assert exits == [EXIT_TIMED_OUT]


def test_a_hung_shard_is_retried_then_rejected_and_the_output_reads_whole(tmp_path):
    src, ids = _input(tmp_path, shards=3)
    out = str(tmp_path / "out")
    stats, _ = _run(src, out, {"hang": ["00000"]}, {"stall": 0.3, "attempts": 2})
    assert SlowStage.calls == {"00000": 2, "00001": 1, "00002": 1}  # retried once, then not called
    assert (stats.rows_in, stats.rows_out, stats.rejects) == (9, 6, 3)
    assert stats.reject_reasons == {"timed out": 3}
    ds = Dataset.open(out)
    assert ds.complete and account(ids, ds).ok
    rejects = ds.rejects().to_pylist()
    assert {r["id"] for r in rejects} == set(ids[:3])
    assert {r["error"] for r in rejects} == {"timed out: upper of shard 00000 made no progress for "
                                             "stall_timeout=0.3 s (1 of 3 rows); gave up after 2 attempt(s)"}
    # the all-reject shard is committed (0 rows) without a data file, so no reader sees a schema of `id` alone
    entry = read_manifest(out).get("00000")
    assert (entry.rows, entry.rejects, entry.input_rows) == (0, 3, 3)
    assert not (tmp_path / "out" / "part-00000.parquet").exists()
    assert ds.schema.names == ["id", "text"] and ds.read_shard("00000").schema.names == ["id", "text"]
    table = ds.to_table()
    assert table.column_names == ["id", "text"] and sorted(table["id"].to_pylist()) == ids[3:]
    folder = pads.dataset(out, format="parquet").to_table()  # a plain folder reader (as DuckDB, HF would glob)
    assert folder.column_names == ["id", "text"] and folder.num_rows == 6
    assert not (tmp_path / "out" / "__staging").exists()  # attempt records go with the staging folder


def test_every_shard_timing_out_still_commits_a_readable_dataset(tmp_path):
    src, ids = _input(tmp_path, shards=2)
    out = str(tmp_path / "out")
    stats, _ = _run(src, out, {"hang": ["00000", "00001"]}, {"stall": 0.3, "attempts": 1})
    assert SlowStage.calls == {"00000": 1, "00001": 1}
    assert (stats.rows_out, stats.rejects) == (0, 6)
    ds = Dataset.open(out)
    assert ds.complete and account(ids, ds).ok and ds.to_table().num_rows == 0
    assert sorted(p.name for p in (tmp_path / "out").glob("part-*")) == []


def test_timeout_rejects_keep_ids_as_text():
    t = timeout_rejects(pa.table({"id": pa.array([1, 2]), "shard": ["s", "s"]}), "timed out: x", "edit")
    assert t["id"].type == pa.string() and t["id"].to_pylist() == ["1", "2"]


def test_timeouts_are_validated_documented_defaults_and_never_hashed(tmp_path):
    from pixelmill.config import (
        CampaignConfig,
        ConfigError,
        EditConfig,
        PairsConfig,
        StageTimeouts,
        StallTimeouts,
        validate,
    )

    base = {"input": "in", "output": "out", "model": "m", "prompt": "p"}
    cfg = EditConfig.model_validate(base)
    assert cfg.timeouts == StageTimeouts(stall=1800.0, attempts=2, setup=1800.0)
    assert "timeouts" not in cfg.output_affecting()
    slow = EditConfig.model_validate({**base, "timeouts": {"stall": 30, "attempts": 3}})
    assert slow.output_affecting() == cfg.output_affecting()  # a rerun with other timeouts resumes
    assert EditConfig.model_validate({**base, "timeouts": {"stall": None}}).timeouts.stall is None
    for bad, field in (({"stall": 0}, "timeouts.stall"), ({"stall": -5}, "timeouts.stall"),
                       ({"attempts": 0}, "timeouts.attempts"), ({"setup": 0}, "timeouts.setup"),
                       ({"job": 5}, "timeouts.job")):
        with pytest.raises(ConfigError, match=field):
            validate(EditConfig, {**base, "timeouts": bad})
    pairs = PairsConfig.model_validate({"input": "in", "output": "out", "images": {"model": "m", "clip_model": "c"},
                                        "timeouts": {"stall": 60}})
    assert pairs.timeouts.attempts == 2 and "timeouts" not in str(pairs.pairs_affecting())
    assert issubclass(type(CampaignConfig.model_fields["timeouts"].default_factory()), StallTimeouts)  # one idea


def test_pool_build_refuses_bad_timeouts_before_starting(capsys):
    from pixelmill.cli import main

    assert main(["pool", "build", "ds", "--clip", "c", "--out", "o", "--attempts", "0"]) == 2
    assert "--attempts: Input should be greater than or equal to 1" in capsys.readouterr().err
    assert main(["pool", "build", "ds", "--clip", "c", "--out", "o", "--stall-timeout", "-3"]) == 2
    assert "--stall-timeout: Input should be greater than 0" in capsys.readouterr().err


def test_a_setup_that_hangs_is_ended_counted_and_then_refused_with_the_reason(tmp_path):
    from pixelmill.tasks.call_guard import SetupTimedOut
    from pixelmill.tasks.ray_data import setup_timeout_in

    class HangingSetup(SlowStage):
        setups = 0

        def setup(self):
            HangingSetup.setups += 1
            while not self.ended.wait(0.02):
                pass
            raise WorkerEnded

    guard = CallGuard(stall=None, setup_limit=0.3, attempts=2, records=str(tmp_path / "att"), poll=0.02)
    for attempt in (1, 2):
        stage = HangingSetup({})
        stage.ended = ended = threading.Event()
        exits: list[int] = []
        with pytest.raises(WorkerEnded):
            guard.setup(stage, exit=lambda code, e=ended, x=exits: (x.append(code), e.set()))
        assert exits == [EXIT_TIMED_OUT]
        assert ShardAttempts(guard.records).read("setup-upper")["attempts"] == attempt
    with pytest.raises(SetupTimedOut) as info:
        guard.setup(HangingSetup({}))
    assert HangingSetup.setups == 2  # the third is not tried
    reason = "timed out: the set-up of stage upper ran longer than timeout=0.3 s; gave up after 2 attempt(s)"
    assert str(info.value) == reason
    # how Ray reports it (an actor that died in its constructor), and how the stage run re-raises it
    wrapped = f"ActorDiedError: ...\n    raise\npixelmill.tasks.call_guard.SetupTimedOut: {reason}\n"
    assert setup_timeout_in(RuntimeError(wrapped)) == reason and setup_timeout_in(RuntimeError("other")) is None
    other = CallGuard(setup_limit=0.3, attempts=2, records=str(tmp_path / "other"), poll=0.02)
    other.setup(SlowStage({}))  # a set-up that finishes in time is not counted
    assert ShardAttempts(other.records).read("setup-upper")["attempts"] == 0
