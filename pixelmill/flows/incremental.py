"""Planning an incremental bulk edit: ids not yet processed, claimed so no other run edits them.

The input is a dataset (ids from its ``id`` column) or a growing folder of raw image
files (ids are content hashes, ``datasets/incremental.py``). Under the output's lock
(``datasets/claims.py``) the planner removes what killed runs left, reads the processed
table and the live claims of other runs, keeps the ids neither holds (rejects too with
``retry_rejects``), and writes its own claim on them and on the output shard names it
will write. Each run appends new shards; committed ones are never rewritten.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from pixelmill.datasets import Dataset, DatasetWriter, config_hash, read_manifest, storage
from pixelmill.datasets.claims import OutputLock, RunClaim, expired, list_claims
from pixelmill.datasets.incremental import file_ids, is_raw_input, latest_status, list_files, processed_table
from pixelmill.flows.common import ShardPlan

FILES_PER_SHARD = 256


@dataclass
class IncrementalPlan(ShardPlan):
    """A shard plan over the ids a run claimed.

    Args:
        run: the run id (output shard names and records carry it).
        raw: the input is a folder of image files.
        rows_done: input rows already processed (skipped).
        rows_claimed: input rows a live run of another process holds (left to it).
        others: those runs' ids.
        retried: rejected ids planned again (``retry_rejects``) → the shard holding their reject.
        claim: this run's claim (None for a dry run or when there is nothing to do).
    """

    run: str = ""
    raw: bool = False
    rows_done: int = 0
    rows_claimed: int = 0
    others: list[str] = field(default_factory=list)
    retried: dict[str, str] = field(default_factory=dict)
    claim: RunClaim | None = None

    def describe(self) -> str:
        lines = [f"{len(self.specs)} new shard(s) to run ({self.rows_todo} rows); "
                 f"{self.rows_done} row(s) already processed (skipped)"
                 + (f"; {self.rows_claimed} claimed by live run(s) {', '.join(self.others)}" if self.rows_claimed
                    else "") + (f"; {len(self.retried)} reject(s) retried" if self.retried else "")]
        lines += [f"  run   {s['shard']}  {s['rows']} rows  from {s['url']}" for s in self.specs]
        return "\n".join(lines)


def _candidates(config: dict[str, Any], output: str, run: str, write_cache: bool) -> tuple[bool, list[dict]]:
    """Input units before any processed/claimed filtering: ``name``, ``url``, ``head``, ``ids`` (+ ``files``)."""
    limit = config.get("limit")
    if is_raw_input(config["input"], config.get("input_glob")):
        files = list_files(config["input"], config.get("input_glob"))
        if limit is not None:
            files = files[:limit]
        file_ids(output, files, run, write=write_cache)
        seen: dict[str, dict] = {}
        for f in files:
            if f["id"] is not None:
                seen.setdefault(f["id"], f)
        return True, [{"name": "", "url": config["input"], "head": 0, "ids": list(seen), "files": seen}]
    source = Dataset.open(config["input"])
    units, remaining = [], limit
    for name in source.shard_names():
        if remaining is not None and remaining <= 0:
            break
        head = source.shard_rows(name) if remaining is None else min(source.shard_rows(name), remaining)
        if remaining is not None:
            remaining -= head
        if head == 0:
            continue
        ids = [str(i) for i in source.read_shard(name, ["id"])["id"].to_pylist()[:head]]
        units.append({"name": name, "url": source.shard_url(name), "head": head, "ids": ids})
    return False, units


def plan_edit(config: dict[str, Any], hashed: dict[str, Any], dataset: tuple[str, int], *, run: str,
              retry_rejects: bool = False, claim: bool = True) -> IncrementalPlan:
    """Plan (and, with ``claim``, claim) the ids this run edits.

    Args:
        config: ``input``, ``output``, ``limit``, ``input_glob``.
        hashed: the output-affecting config (a different hash: a new output, nothing processed).
        dataset: the output's schema name and version.
        run: this run's id.
        retry_rejects: plan rejected ids again.
        claim: take the lock and write a claim (False: a dry run, which writes nothing).
    """
    output = config["output"]
    raw, units = _candidates(config, output, run, write_cache=claim)
    plan = IncrementalPlan(config=hashed, run=run, raw=raw)
    lock = OutputLock(output).acquire() if claim else None
    try:
        writer = DatasetWriter(output, *dataset, hashed, run=run)
        manifest = read_manifest(output)
        same = manifest is not None and manifest.config_hash == config_hash(hashed)
        table = processed_table(output, manifest) if same else None
        if claim:
            writer.open()
            if table is not None and repair_superseded(writer, table):
                manifest = read_manifest(output)
                table = processed_table(output, manifest)
            plan.others = writer.tidy()
            others = [c for c in list_claims(output) if c.run in plan.others]
        else:
            others = [c for c in list_claims(output) if not expired(c.record)]
            plan.others = [c.run for c in others]
        status = latest_status(table) if table is not None else {}
        taken = {i for c in others for i in c.ids()}
        used = set(manifest.shard_names() if same else []) | {s for c in others for s in c.shards}
        plan.output_complete = bool(same and manifest.complete)
        claimed_ids: list[str] = []
        for unit in units:
            plan.rows_total += len(unit["ids"])
            pending = []
            for i in unit["ids"]:
                state = status.get(i)
                if state is not None and not (retry_rejects and state[0] == "reject"):
                    plan.rows_done += 1
                elif i in taken:
                    plan.rows_claimed += 1
                else:
                    pending.append(i)
                    if state is not None:
                        plan.retried[i] = state[1]
            if not pending:
                if unit["name"]:
                    plan.skip.append(unit["name"])
                continue
            claimed_ids += pending
            plan.rows_todo += len(pending)
            if raw:
                for k in range(0, len(pending), FILES_PER_SHARD):
                    files = [[unit["files"][i]["url"], i, unit["files"][i]["name"]]
                             for i in pending[k:k + FILES_PER_SHARD]]
                    name = f"{run}-{k // FILES_PER_SHARD:05d}"
                    plan.todo.append(name)
                    plan.specs.append({"url": unit["url"], "shard": name, "rows": len(files),
                                       "select": json.dumps({"files": files})})
                continue
            name = unit["name"] if unit["name"] not in used else f"{unit['name']}-{run}"
            used.add(name)
            select = "" if len(pending) == unit["head"] else json.dumps({"ids": pending, "head": unit["head"]})
            plan.todo.append(unit["name"])
            plan.specs.append({"url": unit["url"], "shard": name, "rows": len(pending) if select else unit["head"],
                               "select": select})
        if plan.todo:
            plan.output_complete = False
        if claim and claimed_ids:
            plan.claim = RunClaim(output, run, shards=[s["shard"] for s in plan.specs]).write(claimed_ids)
    finally:
        if lock is not None:
            lock.release()
    return plan


def repair_superseded(writer: DatasetWriter, table=None) -> int:
    """Keep each id's latest record only (call under the lock): a retried reject's old record goes.

    A run with ``retry_rejects`` does this after its commits; a run killed before it left
    both records, and the next run's planning finishes the job. Returns the ids fixed.

    Args:
        writer: the output's writer (opened, with the run id).
        table: the output's processed table, when the caller has read it already.
    """
    table = processed_table(writer.url) if table is None else table
    if table.num_rows == len(set(table["id"].to_pylist())):
        return 0
    latest = latest_status(table)
    stale: dict[str, set[str]] = {}
    for i, shard, status in zip(table["id"].to_pylist(), table["shard"].to_pylist(), table["status"].to_pylist()):
        if latest[i][1] != shard and status == "reject":
            stale.setdefault(shard, set()).add(i)
    if stale:
        writer.supersede(stale)
    return sum(len(v) for v in stale.values())


def release(plan: IncrementalPlan, dataset: tuple[str, int]) -> None:
    """After the run: drop superseded reject records (``retry_rejects``) and remove the claim."""
    if plan.claim is None:
        return
    with OutputLock(plan.claim.output):
        if plan.retried and storage.exists(plan.claim.output):
            repair_superseded(DatasetWriter(plan.claim.output, *dataset, plan.config, run=plan.run).open())
        plan.claim.remove()
