"""The generic run-and-commit path with a fake stage, in this process: no Ray, no Prefect.

``plan_shards`` + ``run_stage_into_writer(..., execute=run_stage_inline)`` is what
``flows/stage_run.py`` runs inside its Prefect task on a Ray worker; here the same code
runs a tiny stage that upper-cases text, rejects empty text with a reason, makes two
rows (named by ``parent_id``) for some inputs and drops a candidate for others.
"""

from __future__ import annotations

import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from pixelmill.datasets import Dataset, DatasetWriter, account, read_manifest
from pixelmill.datasets.writer import write_table_dataset
from pixelmill.flows.common import plan_shards, run_stage_into_writer
from pixelmill.tasks.stage import STATUS_DROPPED, STATUS_OK, STATUS_REJECT, Resources, Stage, run_stage_inline

INPUT_SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string()), ("note", pa.string())])
OUTPUT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("parent_id", pa.string()),
        ("text", pa.string()),
        ("note", pa.string()),
        ("score", pa.float64()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("stage", pa.string()),
        ("shard", pa.string()),
    ]
)

# Three input shards of four rows. "" / "   " / None are rejected, "two …" makes two output
# rows, "drop …" makes one output row and one dropped candidate.
TEXTS = [
    ["apple", "", "two pears", "drop plum"],
    ["kiwi", "two figs", "   ", "lime"],
    ["drop fig", "two limes", None, "pear"],
]
HASHED = {"stage": "upper", "version": 1}


class UpperStage(Stage):
    """Upper-cases ``text``; reads ``note`` and passes it through, but it must not reach the output."""

    name = "upper"
    dataset = ("upper", 1)

    @classmethod
    def input_columns(cls, config: dict[str, Any]) -> list[str]:
        return ["id", "text", "note"]

    @classmethod
    def dropped_columns(cls, config: dict[str, Any]) -> tuple[str, ...]:
        return ("note",)

    def __init__(self, config: dict[str, Any], resources: Resources | None = None) -> None:
        super().__init__(config, resources)
        self.ready = False

    def setup(self) -> None:
        self.ready = True

    def rows_for(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        base = {"parent_id": row["id"], "note": row["note"], "shard": row["shard"],
                "score": None, "error": None, "stage": None}
        text = row["text"] or ""
        if not text.strip():
            return [{**base, "id": row["id"], "text": text, "status": STATUS_REJECT,
                     "error": "empty text", "stage": self.name}]
        n = 2 if text.startswith("two") else 1
        rows = [{**base, "id": f"{row['id']}-{k}", "text": text.upper(), "status": STATUS_OK} for k in range(n)]
        if text.startswith("drop"):
            rows.append({**base, "id": f"{row['id']}-x", "text": text, "status": STATUS_DROPPED, "score": 0.25})
        return rows

    def __call__(self, batch: pa.Table) -> pa.Table:
        assert self.ready, "setup() runs before the first batch"
        assert set(batch.column_names) == {"id", "text", "note", "shard"}
        rows = [r for row in batch.to_pylist() for r in self.rows_for(row)]
        return pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA)


class LossyStage(UpperStage):
    """A broken stage: silently loses input ``r05`` (shard 00001), neither output nor reject."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = super().__call__(batch)
        keep = [p != "r05" for p in out["parent_id"].to_pylist()]
        return out.filter(pa.array(keep))


def input_table(shards: list[list[str | None]], start: int = 0) -> pa.Table:
    texts = [t for shard in shards for t in shard]
    ids = [f"r{start + i:02d}" for i in range(len(texts))]
    return pa.table({"id": ids, "text": texts, "note": [f"note of {i}" for i in ids]}, schema=INPUT_SCHEMA)


def all_ids(shards: list[list[str | None]], start: int = 0) -> list[str]:
    return input_table(shards, start)["id"].to_pylist()


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """``run_stage_inline`` sets torch's thread count from the stage's CPUs; leave it as it was."""
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def ray_init_calls(monkeypatch) -> list:
    """Refuse to start Ray here (recording who tried): these runs are in-process only."""
    import ray

    calls: list = []

    def refuse(*args, **kwargs):
        calls.append((args, kwargs))
        raise RuntimeError("the inline stage runner must not start Ray")

    monkeypatch.setattr(ray, "init", refuse)
    return calls


@pytest.fixture
def src(tmp_path) -> str:
    url = str(tmp_path / "input")
    write_table_dataset(url, input_table(TEXTS), "texts", {"made_by": "test"}, rows_per_shard=4)
    assert Dataset.open(url).shard_names() == ["00000", "00001", "00002"]
    return url


@pytest.fixture
def out(tmp_path) -> str:
    return str(tmp_path / "output")


def run(stage_cls: type, src: str, out: str, hashed: dict[str, Any] = HASHED, *, limit: int | None = None,
        execute=run_stage_inline, finish: bool = True, rows_per_call: int | None = None):
    """What ``flows/stage_run.run_stage`` does, minus Prefect and Ray: plan → run → finish."""
    config: dict[str, Any] = {}
    plan = plan_shards({"input": src, "output": out, "limit": limit}, hashed)
    writer = DatasetWriter(out, *stage_cls.dataset, plan.config)
    stats = run_stage_into_writer(
        plan=plan,
        builder=partial(stage_cls, config, Resources(cpus=1)),
        columns=stage_cls.input_columns(config),
        writer=writer,
        workers=1,
        drop_columns=stage_cls.dropped_columns(config),
        execute=execute,
        rows_per_call=rows_per_call,
    )
    if finish:
        writer.finish()
    return plan, stats, writer


# (a) accounting -----------------------------------------------------------------------------


def test_every_input_is_an_output_parent_or_a_reject_exactly_once(src, out):
    plan, stats, _ = run(UpperStage, src, out)
    ds = Dataset.open(out)
    report = account(all_ids(TEXTS), ds)
    assert report.ok, str(report)
    assert (report.inputs, report.outputs, report.rejected) == (12, 12, 3)

    data = ds.to_table()
    parents = set(data["parent_id"].to_pylist())
    rejected = ds.rejects()["id"].to_pylist()
    assert len(rejected) == len(set(rejected))
    assert parents.isdisjoint(rejected)
    assert parents | set(rejected) == set(all_ids(TEXTS))

    assert (stats.rows_in, stats.rows_out, stats.rejects, stats.dropped) == (12, 12, 3, 2)
    assert stats.reject_reasons == {"empty text": 3}  # what the run's summary artifact reports
    assert plan.todo == ["00000", "00001", "00002"] and plan.rows_todo == 12


def test_outputs_are_the_stages_rows_without_control_or_dropped_columns(src, out):
    run(UpperStage, src, out)
    data = Dataset.open(out).to_table()
    assert set(data.column_names) == {"id", "parent_id", "text", "score"}
    assert all(t == t.upper() for t in data["text"].to_pylist())
    two = sorted(i for i, p in zip(data["id"].to_pylist(), data["parent_id"].to_pylist()) if p == "r02")
    assert two == ["r02-0", "r02-1"]


class CountingStage(UpperStage):
    """Records the input rows of each call it gets."""

    calls: list[list[str]] = []

    def __call__(self, batch: pa.Table) -> pa.Table:
        CountingStage.calls.append(batch["id"].to_pylist())
        return super().__call__(batch)


def test_a_shard_streams_through_the_stage_in_calls_of_rows_per_call_and_commits_whole(src, out, tmp_path):
    CountingStage.calls = []
    plan, stats, _ = run(CountingStage, src, out, rows_per_call=3)
    # each 4-row shard in two calls (3 + 1), in row order; never two shards in one call
    assert CountingStage.calls == [["r00", "r01", "r02"], ["r03"], ["r04", "r05", "r06"], ["r07"],
                                   ["r08", "r09", "r10"], ["r11"]]
    assert read_manifest(out).complete and Dataset.open(out).shard_names() == ["00000", "00001", "00002"]
    whole = str(tmp_path / "whole")
    CountingStage.calls = []
    run(CountingStage, src, whole)
    assert [len(c) for c in CountingStage.calls] == [4, 4, 4]
    # the same rows, shard for shard, as one call per shard
    for name in ("00000", "00001", "00002"):
        a, b = Dataset.open(out).read_shard(name), Dataset.open(whole).read_shard(name)
        assert a.sort_by("id").equals(b.sort_by("id"))
    assert Dataset.open(out).rejects().sort_by("id").equals(Dataset.open(whole).rejects().sort_by("id"))
    assert (stats.rows_in, stats.rows_out, stats.rejects) == (12, 12, 3)


def test_split_specs_covers_every_row_once():
    from pixelmill.flows.common import spec_rows, split_specs

    specs = [{"url": "u", "shard": "a", "rows": 7}, {"url": "u", "shard": "b", "rows": 2},
             {"url": "u", "shard": "c", "rows": 0}]
    calls = split_specs(specs, 3)
    assert [(c["shard"], c["start"], c["stop"]) for c in calls] == [
        ("a", 0, 3), ("a", 3, 6), ("a", 6, 7), ("b", 0, 2), ("c", 0, 0)]
    assert [spec_rows(c) for c in calls] == [3, 3, 1, 2, 0]
    assert [(c["start"], c["stop"]) for c in split_specs(specs, None)] == [(0, 7), (0, 2), (0, 0)]


def test_read_spec_parts_read_the_same_rows_as_the_whole(tmp_path):
    import json

    import pyarrow.parquet as pq

    from pixelmill.datasets.incremental import read_spec

    url = str(tmp_path / "part.parquet")
    table = pa.table({"id": [f"r{i:02d}" for i in range(10)], "text": [str(i) for i in range(10)]})
    pq.write_table(table, url, row_group_size=3)  # row groups 0-2, 3-5, 6-8, 9
    whole = read_spec(url, 8, "", ["id"])
    parts = [read_spec(url, 8, "", ["id"], start=a, stop=b) for a, b in ((0, 2), (2, 7), (7, 8))]
    assert pa.concat_tables(parts).equals(whole) and whole.num_rows == 8
    assert read_spec(url, 8, "", ["id"], start=4, stop=5)["id"].to_pylist() == ["r04"]
    chosen = json.dumps({"ids": ["r01", "r03", "r06", "r09"], "head": 8})  # r09 is past the head
    assert read_spec(url, 3, chosen, ["id"], start=1, stop=3)["id"].to_pylist() == ["r03", "r06"]
    files = json.dumps({"files": [[str(tmp_path / f"f{i}"), f"f{i}", f"f{i}.png"] for i in range(4)]})
    assert read_spec(str(tmp_path), 4, files, ["id", "image"], start=2, stop=4)["id"].to_pylist() == ["f2", "f3"]


# (b) rejects ----------------------------------------------------------------------------------


def test_rejects_carry_the_reason_and_the_stage(src, out):
    run(UpperStage, src, out)
    rejects = Dataset.open(out).rejects()
    assert sorted(rejects["id"].to_pylist()) == ["r01", "r06", "r10"]
    assert set(rejects["error"].to_pylist()) == {"empty text"}
    assert set(rejects["stage"].to_pylist()) == {"upper"}
    assert "shard" not in rejects.column_names


# (c) dropped rows ----------------------------------------------------------------------------


def test_dropped_rows_go_to_the_dropped_folder_not_the_data(src, out):
    run(UpperStage, src, out)
    ds = Dataset.open(out)
    dropped = ds.dropped()
    assert sorted(dropped["id"].to_pylist()) == ["r03-x", "r08-x"]
    assert sorted(dropped["parent_id"].to_pylist()) == ["r03", "r08"]
    assert dropped["score"].to_pylist() == [0.25, 0.25]
    assert "status" not in dropped.column_names and "shard" not in dropped.column_names
    assert "note" not in dropped.column_names
    assert not set(dropped["id"].to_pylist()) & set(ds.to_table()["id"].to_pylist())
    assert sorted(p.name for p in (Path(out) / "__dropped").iterdir()) == ["part-00000.parquet", "part-00002.parquet"]


# (d) manifest ---------------------------------------------------------------------------------


def test_each_shard_is_in_the_manifest_once_committed_and_finish_marks_it_complete(src, out):
    committed_after_batch: list[list[str]] = []

    def recording(specs, columns, builder, workers=1):
        for table in run_stage_inline(specs, columns, builder, workers):
            yield table  # the runner writes (and, when whole, commits) this shard before asking for more
            committed_after_batch.append(read_manifest(out).shard_names())

    _, _, writer = run(UpperStage, src, out, execute=recording, finish=False)
    assert committed_after_batch == [["00000"], ["00000", "00001"], ["00000", "00001", "00002"]]

    before = read_manifest(out)
    assert before.complete is False
    assert before.shard_names() == ["00000", "00001", "00002"]
    entries = {s.name: (s.rows, s.rejects, s.dropped, s.input_rows) for s in before.shards}
    assert entries == {"00000": (4, 1, 1, 4), "00001": (4, 1, 0, 4), "00002": (4, 1, 1, 4)}
    assert before.config == HASHED

    writer.finish()
    after = read_manifest(out)
    assert after.complete is True
    assert after.shard_names() == before.shard_names()
    assert Dataset.open(out).complete
    assert not (Path(out) / "__staging").exists()


# (e) resume by config hash ---------------------------------------------------------------------


def test_the_same_hashed_config_skips_committed_shards_and_another_runs_them_all(src, out):
    run(UpperStage, src, out)

    again = plan_shards({"input": src, "output": out}, dict(HASHED))
    assert again.todo == [] and again.specs == [] and again.rows_todo == 0
    assert again.skip == ["00000", "00001", "00002"]
    assert again.output_complete is True
    assert again.rows_total == 12

    other = plan_shards({"input": src, "output": out}, {**HASHED, "version": 2})
    assert other.todo == ["00000", "00001", "00002"] and other.skip == []
    assert other.rows_todo == 12 and other.output_complete is False


def test_an_empty_plan_runs_nothing(src, out):
    run(UpperStage, src, out)
    plan, stats, _ = run(UpperStage, src, out)
    assert plan.todo == []
    assert (stats.rows_in, stats.rows_out) == (0, 0)
    assert read_manifest(out).complete is True


# (f) a growing input ---------------------------------------------------------------------------


def test_a_new_input_shard_is_the_only_shard_planned(src, out):
    run(UpperStage, src, out)
    first_part = Path(out) / "part-00000.parquet"
    stamp = first_part.stat().st_mtime_ns

    new = [["plum", "", "two dates", "drop lime"]]
    writer = DatasetWriter(src, "texts", 1, {"made_by": "test"}).open()
    shard = writer.shard("00003")
    shard.write(input_table(new, start=12))
    shard.commit()
    writer.finish()

    plan = plan_shards({"input": src, "output": out}, HASHED)
    assert plan.todo == ["00003"]
    assert plan.skip == ["00000", "00001", "00002"]
    assert plan.rows_todo == 4 and plan.rows_total == 16
    assert plan.output_complete is False

    _, stats, _ = run(UpperStage, src, out)
    assert stats.rows_in == 4
    assert read_manifest(out).shard_names() == ["00000", "00001", "00002", "00003"]
    assert first_part.stat().st_mtime_ns == stamp  # committed shards are not rewritten
    report = account(all_ids(TEXTS) + all_ids(new, start=12), out)
    assert report.ok, str(report)


def test_limit_keeps_the_first_rows_in_shard_order(src, out):
    plan, stats, _ = run(UpperStage, src, out, limit=6)
    assert plan.todo == ["00000", "00001"]
    assert [s["rows"] for s in plan.specs] == [4, 2]
    assert stats.rows_in == 6
    assert {s.name: s.input_rows for s in read_manifest(out).shards} == {"00000": 4, "00001": 2}
    report = account(all_ids(TEXTS)[:6], out)
    assert report.ok, str(report)


# (g) a stage that loses rows --------------------------------------------------------------------


def test_a_stage_that_loses_a_row_raises_and_leaves_that_shard_uncommitted(src, out):
    with pytest.raises(RuntimeError, match="00001"):
        run(LossyStage, src, out)

    manifest = read_manifest(out)
    assert manifest.shard_names() == ["00000", "00002"]
    assert manifest.complete is False
    root = Path(out)
    assert not (root / "part-00001.parquet").exists()
    assert not (root / "__rejects" / "part-00001.parquet").exists()
    assert not (root / "__dropped" / "part-00001.parquet").exists()
    assert Dataset.open(out).shard_names() == ["00000", "00002"]

    # a fixed stage under the same config redoes only the shard that was not committed
    plan, stats, _ = run(UpperStage, src, out)
    assert plan.todo == ["00001"] and stats.rows_in == 4
    report = account(all_ids(TEXTS), out)
    assert report.ok, str(report)


def test_running_inline_does_not_try_to_start_ray(src, out, ray_init_calls):
    import ray

    if ray.is_initialized():
        pytest.skip("another test left Ray initialized in this process")
    run(UpperStage, src, out)
    assert ray_init_calls == []
    assert not ray.is_initialized()


def test_the_runner_and_the_stage_contract_import_without_prefect_or_ray():
    code = (
        "import sys\n"
        "import pixelmill.flows.common, pixelmill.tasks.stage\n"
        "bad = sorted(m for m in ('prefect', 'ray') if m in sys.modules)\n"
        "assert not bad, bad\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
