"""The bulk-edit flow through the real CLI, with a real Ray cluster and a real Prefect server."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml

from pixelmill.config.placement import NO_GPUS
from pixelmill.datasets import Dataset, account
from pixelmill.datasets.images import decode_image
from tests.conftest import run_cli
from tests.helpers.prefect_api import summary_artifact

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> tuple[str, list[str]]:
    """40 input rows, 3 of them corrupt files."""
    from pixelmill.datasets.importer import import_folder
    from pixelmill.samples import draw_sample_images

    root = tmp_path_factory.mktemp("inputs")
    draw_sample_images(str(root / "files"), n=37, corrupt=3, seed=1)
    import_folder(str(root / "files"), str(root / "images"))
    ids = Dataset.open(str(root / "images")).to_table(["id"])["id"].to_pylist()
    assert len(ids) == 40
    return str(root / "images"), ids


def write_config(path: Path, **values) -> Path:
    path.write_text(yaml.safe_dump(values))
    return path


@pytest.fixture(scope="module")
def sdedit_config(tmp_path_factory, images, tiny_models) -> Path:
    root = tmp_path_factory.mktemp("sdedit")
    return write_config(
        root / "edit.yaml", input=images[0], output=str(root / "out"), model=tiny_models["img2img"],
        prompt_column="caption", strength=0.5, steps=4, resolution=64, batch_size=4, seed=3,
        clip_model=tiny_models["clip"],
    )


def _summary(proc) -> dict:
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _prefect_runs(api_url: str, flow_run_id: str | None = None):
    """Flow runs of the bulk-edit flow and their task runs, read back through the Prefect client."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, TaskRunFilter, TaskRunFilterFlowRunId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def go():
        async with get_client() as client:
            runs = await client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["bulk-edit"])))
            out = []
            for r in runs:
                tasks = await client.read_task_runs(
                    task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[r.id]))
                )
                out.append((r, tasks))
            return out

    with temporary_settings({PREFECT_API_URL: api_url}):
        return asyncio.run(go())


def test_edit_accounts_for_every_row_and_reports_to_one_prefect_server(cluster, images, sdedit_config):
    runs_before = {r.id for r, _ in _prefect_runs(cluster["PREFECT_API_URL"])}
    proc = run_cli(["edit", str(sdedit_config), "--json"], cluster)
    summary = _summary(proc)
    out = yaml.safe_load(sdedit_config.read_text())["output"]
    assert summary["rows_in"] == 40 and summary["rows_out"] == 37 and summary["rejects"] == 3

    ds = Dataset.open(out)
    assert ds.complete and ds.num_rows == 37
    report = account(images[1], ds)
    assert report.ok, str(report)
    rejects = ds.rejects().to_pylist()
    assert len(rejects) == 3
    assert all(r["stage"] == "edit" and r["error"].split(":")[0] in ("undecodable", "empty") for r in rejects)

    table = ds.to_table()
    for col in ("input_image", "edited_image", "edit_prompt", "l2", "clip_image_text", "model_hash", "seed"):
        assert col in table.column_names
    assert all(0 <= v <= 1 for v in table["l2"].to_pylist())

    # The stage ran as a Prefect task recorded in the server we started, driven from the command's own
    # process: it joined the cluster on its head node (the only node, where the actors ran too), so no
    # Ray worker was started for it.
    assert summary["worker"]["in_ray_worker"] is False
    assert summary["worker"]["pid"] != os.getpid() and set(summary["nodes"]) == {summary["worker"]["node_id"]}
    new = [(r, t) for r, t in _prefect_runs(cluster["PREFECT_API_URL"]) if r.id not in runs_before]
    assert len(new) == 1
    flow_run, task_runs = new[0]
    assert flow_run.state.is_completed()
    names = {t.name.rsplit("-", 1)[0]: t for t in task_runs}
    assert names["edit-shards"].state.is_completed()
    assert names["commit-manifest"].state.is_completed()
    # ... and in no other: Prefect announces a temporary server whenever it starts one. (Only this
    # run's own output is checked: other Prefect servers may run on the machine, not ours to judge.)
    assert "temporary server" not in proc.stdout + proc.stderr

    # The run's summary is an artifact of its flow run, with the manifest's figures; GPUs were
    # `auto`: where the cluster has none, the summary says the run was on CPU.
    assert summary["flow_run_id"] == str(flow_run.id)
    key, figures, _ = summary_artifact(cluster["PREFECT_API_URL"], summary["flow_run_id"])
    shards = ds.manifest.shards
    assert key == "pixelmill-bulk-edit-summary" and figures["output"] == out
    assert (figures["rows in"], figures["rows out"], figures["rejected"]) == (
        sum(s.input_rows for s in shards), sum(s.rows for s in shards), sum(s.rejects for s in shards))
    reasons = Counter(r["error"].split(": ", 1)[0] for r in rejects)
    assert {k.removeprefix("rejected: "): v for k, v in figures.items() if k.startswith("rejected: ")} == reasons
    assert figures["throughput (rows/s)"] > 0
    if summary["gpus"] == 0:
        assert summary["notes"] == figures["note"] == [NO_GPUS] and figures["GPU-hours"] == 0


def test_second_run_does_no_work(cluster, sdedit_config):
    out = Path(yaml.safe_load(sdedit_config.read_text())["output"])
    if not (out / "_manifest.json").exists():
        _summary(run_cli(["edit", str(sdedit_config), "--json"], cluster))
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")}
    manifest_before = (out / "_manifest.json").read_text()
    runs_before = {r.id for r, _ in _prefect_runs(cluster["PREFECT_API_URL"])}

    summary = _summary(run_cli(["edit", str(sdedit_config), "--json"], cluster))
    assert summary["shards_run"] == [] and summary["rows_out"] == 0
    assert len(summary["shards_skipped"]) == len(Dataset.open(str(out)).shard_names())
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")} == before
    assert (out / "_manifest.json").read_text() == manifest_before
    new = [(r, t) for r, t in _prefect_runs(cluster["PREFECT_API_URL"]) if r.id not in runs_before]
    assert len(new) == 1
    assert [t.name for t in new[0][1]] == []


def _pixels(url: str) -> dict[str, np.ndarray]:
    t = Dataset.open(url).to_table(["id", "edited_image"]).to_pylist()
    return {r["id"]: np.asarray(decode_image(r["edited_image"]), dtype=np.int16) for r in t}


def test_batch_size_only_moves_pixels_slightly(cluster, tmp_path, images, tiny_models):
    """Batches of 4 vs 3 over the same rows: each row's noise comes from its id, so only batched
    arithmetic differs. (Reruns with the same config give identical bytes: tests/golden.)"""
    base = dict(input=images[0], model=tiny_models["img2img"], prompt="a watercolor painting",
                strength=0.75, steps=4, resolution=64, seed=11)
    steps = [{"name": name, "uses": "edit", "with": {**base, "output": str(tmp_path / name), "batch_size": bs}}
             for name, bs in (("a", 4), ("c", 3))]
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump({"steps": steps}))
    proc = run_cli(["run", str(pipeline), "--limit", "8"], cluster)
    assert proc.returncode == 0, proc.stderr[-4000:]
    outs = {name: _pixels(str(tmp_path / name)) for name in ("a", "c")}
    assert outs["a"].keys() == outs["c"].keys() and len(outs["a"]) >= 6
    for k in outs["a"]:
        assert np.abs(outs["a"][k] - outs["c"][k]).max() <= 3


def test_outputs_open_in_hf_datasets_pandas_and_duckdb(cluster, sdedit_config, tmp_path, monkeypatch):
    import datasets
    import duckdb
    import pandas as pd
    from PIL import Image

    out = yaml.safe_load(sdedit_config.read_text())["output"]
    if not Path(out, "_manifest.json").exists():
        _summary(run_cli(["edit", str(sdedit_config), "--json"], cluster))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    hf = datasets.load_dataset(out, split="train", cache_dir=str(tmp_path / "hf"))
    assert hf.num_rows == 37
    assert isinstance(hf[0]["edited_image"], Image.Image) and isinstance(hf[0]["input_image"], Image.Image)
    files = sorted(str(p) for p in Path(out).glob("part-*.parquet"))
    hf2 = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path / "hf"))
    assert hf2.num_rows == 37 and isinstance(hf2[0]["edited_image"], Image.Image)
    df = pd.concat([pd.read_parquet(f) for f in files])
    assert len(df) == 37 and set(df["id"]) == set(hf["id"])
    n = duckdb.sql(f"select count(*) from read_parquet('{out}/*.parquet')").fetchall()[0][0]
    assert n == 37


def test_changed_config_is_refused_naming_the_keys_then_overwrite(cluster, sdedit_config, tmp_path):
    out = yaml.safe_load(sdedit_config.read_text())["output"]
    if not Path(out, "_manifest.json").exists():
        _summary(run_cli(["edit", str(sdedit_config), "--json"], cluster))
    proc = run_cli(["edit", str(sdedit_config), "--set", "strength=0.9", "--set", "seed=5"], cluster)
    assert proc.returncode == 2
    assert "strength" in proc.stderr and "seed" in proc.stderr and "--overwrite" in proc.stderr
    dry = run_cli(["edit", str(sdedit_config), "--set", "strength=0.9", "--overwrite", "--dry-run",
                   "--limit", "5"], cluster)
    assert dry.returncode == 0, dry.stderr
    assert "to run (5 rows)" in dry.stdout
    assert Dataset.open(out).num_rows == 37  # a dry run changes nothing


def test_bad_input_exits_2_before_anything_starts(tmp_path, images, tiny_models):
    env = {"RAY_ADDRESS": "127.0.0.1:1", "PREFECT_API_URL": "http://127.0.0.1:1/api"}  # nothing listens
    cases = [
        (dict(input=images[0], output=str(tmp_path / "o"), model=tiny_models["img2img"], prompt="p", stepz=3),
         "stepz: unknown key"),
        (dict(input=images[0], output=str(tmp_path / "o"), model=str(tmp_path / "no-model"), prompt="p"),
         "model: model folder not found"),
        (dict(input=str(tmp_path / "missing"), output=str(tmp_path / "o"), model=tiny_models["img2img"],
              prompt="p"), "input:"),
        (dict(input=images[0], output=str(tmp_path / "o"), model=tiny_models["img2img"], prompt="p",
              steps="many"), "steps:"),
        (dict(input=images[0], output=str(tmp_path / "o"), model=tiny_models["img2img"], prompt_column="nope"),
         "prompt_column: column 'nope' is not in the input"),
        (dict(input=images[0], output=str(tmp_path / "o"), model=tiny_models["img2img"], prompt="a {style} cat"),
         "prompt: column 'style' is not in the input"),
    ]
    for values, needle in cases:
        proc = run_cli(["edit", str(write_config(tmp_path / "bad.yaml", **values))], env)
        assert proc.returncode == 2, proc.stderr
        assert needle in proc.stderr
        assert "Traceback" not in proc.stderr
