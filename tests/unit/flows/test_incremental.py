"""Incremental planning, claims, retries and compaction with a tiny stage, in this process (no Ray).

``plan_edit`` + ``run_stage_into_writer(..., execute=run_stage_inline)`` + ``release`` is
what the bulk-edit flow runs (its stage on Ray); here the stage decodes each image with
PIL and reports its size, so undecodable files become rejects with a reason.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from PIL import Image

from pixelmill.datasets import Dataset, DatasetWriter, read_manifest
from pixelmill.datasets.claims import RunClaim, list_claims, new_run_id
from pixelmill.datasets.compaction import OutputBusy, compact
from pixelmill.datasets.incremental import latest_status, processed_table
from pixelmill.datasets.writer import write_table_dataset
from pixelmill.flows.common import run_stage_into_writer
from pixelmill.flows.incremental import plan_edit, release
from pixelmill.tasks.stage import STATUS_OK, STATUS_REJECT, Stage, run_stage_inline

HASHED = {"stage": "size", "version": 1}
OUT_SCHEMA = pa.schema([("id", pa.string()), ("width", pa.int64()), ("status", pa.string()),
                        ("error", pa.string()), ("stage", pa.string()), ("shard", pa.string())])


class SizeStage(Stage):
    """Decodes ``image`` and outputs its width; an undecodable image is a reject."""

    name = "size"
    dataset = ("sizes", 1)

    @classmethod
    def input_columns(cls, config: dict[str, Any]) -> list[str]:
        return ["id", "image"]

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = []
        for r in batch.to_pylist():
            base = {"id": r["id"], "shard": r["shard"], "stage": self.name, "width": None, "error": None}
            try:
                img = Image.open(io.BytesIO((r["image"] or {}).get("bytes") or b""))
                img.load()
                rows.append({**base, "width": img.width, "status": STATUS_OK})
            except Exception as e:  # noqa: BLE001 - the reason is the row's reject
                rows.append({**base, "status": STATUS_REJECT, "error": f"undecodable: {type(e).__name__}"})
        return pa.Table.from_pylist(rows, schema=OUT_SCHEMA)


def _png(width: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, 8), (width % 255, 0, 0)).save(buf, "PNG")
    return buf.getvalue()


def _run(inp: str, out: str, retry: bool = False, **extra) -> Any:
    """One incremental run the way the flow does it; returns the plan."""
    run = new_run_id()
    config = {"input": inp, "output": out, "limit": None, **extra}
    plan = plan_edit(config, HASHED, SizeStage.dataset, run=run, retry_rejects=retry)
    try:
        if plan.specs:
            run_stage_into_writer(plan, partial(SizeStage, {}), ["id", "image"],
                                  DatasetWriter(out, *SizeStage.dataset, HASHED, run=run), workers=1,
                                  execute=run_stage_inline)
        DatasetWriter(out, *SizeStage.dataset, HASHED, run=run).open().finish()
    finally:
        release(plan, SizeStage.dataset)
    return plan


def _ids_once(out: str) -> list[str]:
    ds = Dataset.open(out)
    ids = ds.to_table(["id"])["id"].to_pylist() + ds.rejects()["id"].to_pylist()
    assert len(ids) == len(set(ids)), "an id is in the output or the rejects twice"
    return sorted(ids)


def test_growing_folder_edits_only_new_files_and_records_them(tmp_path):
    inp, out = tmp_path / "incoming", str(tmp_path / "out")
    inp.mkdir()
    for w in (8, 16, 24):
        (inp / f"a{w}.png").write_bytes(_png(w))
    (inp / "broken.png").write_bytes(b"not an image")
    (inp / "notes.txt").write_text("not an input: no image extension")
    first = _run(str(inp), out)
    assert first.raw and first.rows_todo == 4
    t = processed_table(out)
    assert sorted(t["status"].to_pylist()) == ["ok", "ok", "ok", "reject"]
    assert "undecodable" in [r for r in t["reason"].to_pylist() if r][0]
    (inp / "b32.png").write_bytes(_png(32))
    (inp / "copy-of-a8.png").write_bytes(_png(8))  # same content: same id, already processed
    second = _run(str(inp), out)
    import hashlib

    assert second.rows_todo == 1 and second.rows_done == 4
    assert Dataset.open(out).to_table(["id"])["id"].to_pylist().count(hashlib.sha256(_png(32)).hexdigest()) == 1
    assert len(_ids_once(out)) == 5
    assert _run(str(inp), out).rows_todo == 0
    assert not list_claims(out) and not (Path(out) / "__staging").exists() or not os.listdir(Path(out) / "__staging")
    m = read_manifest(out)
    assert m.complete and len(m.shards) == 2  # one new shard per run; the first never rewritten
    assert len(list((Path(out) / "__sources").iterdir())) == 2  # the id cache: a file per run that hashed
    assert compact(out, target_rows=100)["after"] == 1
    assert len(list((Path(out) / "__sources").iterdir())) == 1
    assert _run(str(inp), out).rows_todo == 0 and len(_ids_once(out)) == 5


def test_dataset_input_is_incremental_by_id_and_retry_rejects_supersedes(tmp_path):
    inp, out = str(tmp_path / "in"), str(tmp_path / "out")
    rows = [{"id": f"r{i}", "image": {"bytes": _png(8 + i), "path": None}} for i in range(3)]
    rows[1]["image"] = {"bytes": b"broken", "path": None}
    write_table_dataset(inp, pa.Table.from_pylist(rows), "images", {"v": 1})
    _run(inp, out)
    assert latest_status(processed_table(out))["r1"][0] == "reject"
    # the input shard grows in place (same shard name, more rows): only the new id is edited
    rows.append({"id": "r3", "image": {"bytes": _png(40), "path": None}})
    write_table_dataset(inp, pa.Table.from_pylist(rows), "images", {"v": 1})
    plan = _run(inp, out)
    assert plan.rows_todo == 1 and plan.rows_done == 3
    assert _run(inp, out).rows_todo == 0  # rejects count as processed
    # fixed at the source under the same id: --retry-rejects moves it to the output, once
    rows[1]["image"] = {"bytes": _png(99), "path": None}
    write_table_dataset(inp, pa.Table.from_pylist(rows), "images", {"v": 1})
    plan = _run(inp, out, retry=True)
    assert plan.rows_todo == 1 and list(plan.retried) == ["r1"]
    ds = Dataset.open(out)
    assert "r1" in ds.to_table(["id"])["id"].to_pylist() and "r1" not in ds.rejects()["id"].to_pylist()
    assert _ids_once(out) == ["r0", "r1", "r2", "r3"]
    assert processed_table(out).num_rows == 4
    assert sum(s.rejects for s in read_manifest(out).shards) == 0

    before = {r["id"]: r["width"] for r in Dataset.open(out).to_table(["id", "width"]).to_pylist()}
    assert compact(out, target_rows=100) == {"before": 3, "after": 1, "rows": 4}
    ds = Dataset.open(out)
    assert {r["id"]: r["width"] for r in ds.to_table(["id", "width"]).to_pylist()} == before
    assert sorted(processed_table(out)["id"].to_pylist()) == ["r0", "r1", "r2", "r3"]
    assert sorted(p.name for p in Path(out).glob("part-*.parquet")) == [f"part-{ds.shard_names()[0]}.parquet"]
    assert _run(inp, out).rows_todo == 0  # the compacted processed table still covers every id


def test_live_claims_are_respected_and_dead_ones_taken_over(tmp_path):
    inp, out = str(tmp_path / "in"), str(tmp_path / "out")
    rows = [{"id": f"r{i}", "image": {"bytes": _png(8 + i), "path": None}} for i in range(4)]
    write_table_dataset(inp, pa.Table.from_pylist(rows[:2]), "images", {"v": 1})
    # a live run of another process (this one) holds r0, r1
    other = plan_edit({"input": inp, "output": out}, HASHED, SizeStage.dataset, run="other-run")
    assert other.claim is not None and sorted(other.claim.ids()) == ["r0", "r1"]
    write_table_dataset(inp, pa.Table.from_pylist(rows), "images", {"v": 1})
    plan = _run(inp, out)
    assert plan.rows_todo == 2 and plan.rows_claimed == 2 and plan.others == ["other-run"]
    with pytest.raises(OutputBusy):
        compact(out)
    # the same claim, owned by a process that is gone: taken over by the next run
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    other.claim.record.update(pid=int(dead.stdout), pid_start=1.0)
    from pixelmill.datasets import storage

    storage.write_text_atomic(other.claim.url, json.dumps(other.claim.record))
    plan = _run(inp, out)
    assert plan.rows_todo == 2 and plan.rows_claimed == 0
    assert _ids_once(out) == ["r0", "r1", "r2", "r3"]
    assert not list_claims(out)


def test_expired_claim_of_another_host_is_taken_over(tmp_path, monkeypatch):
    inp, out = str(tmp_path / "in"), str(tmp_path / "out")
    write_table_dataset(inp, pa.Table.from_pylist([{"id": "x", "image": {"bytes": _png(8), "path": None}}]),
                        "images", {"v": 1})
    claim = RunClaim(out, "elsewhere", shards=["00000"])
    claim.write(["x"], ttl=60)
    claim.record.update(host="another-host")  # its process cannot be checked from here: only expiry counts
    from pixelmill.datasets import storage

    storage.write_text_atomic(claim.url, json.dumps(claim.record))
    assert _run(inp, out).rows_claimed == 1  # live: left to it
    storage.write_text_atomic(claim.url, json.dumps({**claim.record, "expires": time.time() - 1}))
    assert _run(inp, out).rows_todo == 1
    assert _ids_once(out) == ["x"] and not list_claims(out)


@pytest.mark.slow
def test_s3_prefix_grows_and_killed_runs_leftovers_are_cleaned(s3_server):
    from pixelmill.datasets import storage

    inp, out = s3_server.url("incr", "incoming"), s3_server.url("incr", "out")
    for w in (8, 16):
        storage.write_bytes(storage.join(inp, f"a{w}.jpg"), _png(w))
    storage.write_bytes(storage.join(inp, "skip.png"), _png(4))  # not matched by the glob
    assert _run(inp, out, input_glob="*.jpg").rows_todo == 2
    # what a killed run leaves: a staging folder and a claim whose owner is gone
    storage.write_bytes(storage.join(out, "__staging", "dead-run", "00000.parquet"), b"half a shard")
    dead = RunClaim(out, "dead-run", shards=["dead-run-00000"]).write(["nothing"], ttl=60)
    storage.write_text_atomic(dead.url, json.dumps({**dead.record, "expires": time.time() - 1}))
    storage.write_bytes(storage.join(inp, "b24.jpg"), _png(24))
    plan = _run(inp, out, input_glob="*.jpg")
    assert (plan.rows_todo, plan.rows_done, plan.rows_claimed) == (1, 2, 0)
    assert not storage.exists(storage.join(out, "__staging")) and not list_claims(out)
    assert len(_ids_once(out)) == 3
