"""Hub ids on a two-node Ray cluster, and the safety checker setting, through the real CLI.

The hub is a local cache folder in huggingface_hub's real layout (``HF_HOME`` /
``HF_HUB_CACHE``, ``HF_HUB_OFFLINE=1``), named only in the command's environment: the
workers of both nodes get it through what pixelmill passes on, fetch the id once per node
(a cache hit here) and load the commit it resolved to. A missing id fails in preflight.
``HF_TOKEN`` reaches no output, log or Ray session file.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml

from pixelmill.datasets import Dataset
from tests.conftest import run_cli
from tests.helpers.hub_cache import add_to_hub_cache

pytestmark = pytest.mark.slow

OBJECT_STORE = 80 * 1024 * 1024
TOKEN = "hf_pixelmillTestToken9d1c2e7a"  # distinctive: swept for below


@pytest.fixture(scope="module")
def two_nodes(cluster):
    """A head and one worker node (2 CPUs each); only this cluster is stopped (``Cluster.shutdown``)."""
    from ray.cluster_utils import Cluster

    temp = tempfile.mkdtemp(prefix="pmh")  # short: Ray's socket paths must fit in 107 bytes
    common = dict(num_cpus=2, num_gpus=0, object_store_memory=OBJECT_STORE)
    ray_cluster = Cluster(initialize_head=True, head_node_args=dict(**common, include_dashboard=False,
                                                                    temp_dir=temp))
    try:
        worker = ray_cluster.add_node(**common)
        ray_cluster.wait_for_nodes()
        yield {"address": ray_cluster.address, "nodes": {ray_cluster.head_node.node_id, worker.node_id},
               "env": {"PREFECT_API_URL": cluster["PREFECT_API_URL"]}, "temp": Path(temp)}
    finally:
        ray_cluster.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory, tiny_models) -> dict:
    home = tmp_path_factory.mktemp("hf")
    commit = add_to_hub_cache(home / "hub", "tiny-org/tiny-sd", tiny_models["img2img"])
    env = {"HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"), "HF_HUB_OFFLINE": "1", "HF_TOKEN": TOKEN}
    return {"env": env, "commit": commit}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> str:
    from tests.helpers.edit_inputs import sample_dataset

    images, _ = sample_dataset(tmp_path_factory.mktemp("inputs"), n=12, corrupt=0, seed=5, buckets=3)
    return images


def _config(path: Path, images: str, model: str, **kw) -> Path:
    path.write_text(yaml.safe_dump({**dict(input=images, output=str(path.parent / "out"), model=model,
                                           prompt="a sketch", strength=0.5, steps=2, resolution=64, batch_size=2),
                                    **kw}))
    return path


def _summary(proc) -> dict:
    assert proc.returncode == 0, proc.stderr[-5000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_hub_id_runs_on_two_nodes_from_the_cache(two_nodes, hf_home, images, tmp_path):
    # 2 CPUs per actor: one actor per node; calls of 2 rows keep both busy
    cfg = _config(tmp_path / "edit.yaml", images, "tiny-org/tiny-sd", safety_checker="on", steps=4,
                  placement={"workers": 2, "cpus": 2, "gpus": 0, "rows_per_call": 2})
    proc = run_cli(["edit", str(cfg), "--json", "--ray-address", two_nodes["address"]],
                   {**two_nodes["env"], **hf_home["env"]})
    summary = _summary(proc)
    assert summary["rows_out"] == 12 and summary["rejects"] == 0
    # fetched on both nodes before the actors started; the actors (Ray Data starts one or two) loaded it
    commit = hf_home["commit"]
    assert f"hub model tiny-org/tiny-sd@{commit}: in the hub cache of 2 node(s)" in " ".join(summary["notes"])
    assert set(summary["nodes"]) <= two_nodes["nodes"] and sum(summary["nodes"].values()) == 12
    # `on` set for a checkpoint that ships no safety checker: not an error, and the summary says so
    assert any("ships no safety checker" in n for n in summary["notes"])
    table = Dataset.open(str(tmp_path / "out")).to_table(["model", "model_hash"]).to_pylist()
    assert {(r["model"], r["model_hash"]) for r in table} == {("tiny-org/tiny-sd", f"tiny-org/tiny-sd@{commit}")}

    # the token is a credential: in no output, no Ray session file (runtime environments are logged there)
    assert TOKEN not in proc.stdout + proc.stderr
    leaked = [p for p in two_nodes["temp"].rglob("*") if p.is_file() and not p.is_symlink()
              and p.stat().st_size < 64 << 20 and TOKEN.encode() in p.read_bytes()]
    assert not leaked, leaked
    assert not any(TOKEN in p.read_text(errors="replace") for p in (tmp_path / "out").rglob("*.json"))


_LOAD_PROBE = """
import json, os, sys
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from pixelmill.runtime import Runtime

def load(commit):
    from pixelmill.models.loading import load_img2img_pipeline
    pipe = load_img2img_pipeline("tiny-org/tiny-sd", device="cpu", dtype="float32", revision=commit)
    return {"node": ray.get_runtime_context().get_node_id(), "path": str(pipe.name_or_path),
            "hf_home": os.environ.get("HF_HOME"), "token": "HF_TOKEN" in os.environ}

with Runtime(ray_address=sys.argv[1], lazy_ray=False):
    f = ray.remote(num_cpus=0)(load)
    nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    got = ray.get([f.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote(sys.argv[2])
                   for n in nodes])
print(json.dumps(got))
"""


def test_a_worker_on_every_node_loads_the_id_from_the_forwarded_cache(two_nodes, hf_home):
    """What a stage's actors do, on each node in turn: the HF settings of the driver's environment
    reach them through pixelmill's runtime (the nodes were started without them), the token does not,
    and the commit loads from the node's cache."""
    import os
    import subprocess
    import sys

    env = {**os.environ, **two_nodes["env"], **hf_home["env"]}
    proc = subprocess.run([sys.executable, "-c", _LOAD_PROBE, two_nodes["address"], hf_home["commit"]], env=env,
                          text=True, capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {g["node"] for g in got} == two_nodes["nodes"]
    assert all(g["hf_home"] == hf_home["env"]["HF_HOME"] and not g["token"] for g in got)
    assert all(g["path"].endswith(f"snapshots/{hf_home['commit']}") for g in got), got


def test_a_missing_hub_id_fails_before_any_work(hf_home, images, tmp_path):
    cfg = _config(tmp_path / "edit.yaml", images, "tiny-org/not-there")
    proc = run_cli(["edit", str(cfg), "--json"], hf_home["env"])
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "tiny-org/not-there" in proc.stderr and "HF_HUB_OFFLINE" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


def test_safety_checker_on_rejects_flagged_rows_counted_by_reason_and_off_loads_none(cluster, images, tmp_path):
    from pixelmill.models.tiny import save_tiny_img2img

    model = save_tiny_img2img(tmp_path / "flagging", flagging_safety_checker=True)
    (tmp_path / "on").mkdir()
    on = _config(tmp_path / "on" / "edit.yaml", images, model)
    summary = _summary(run_cli(["edit", str(on), "--json"], cluster))
    assert (summary["rows_out"], summary["rejects"]) == (0, 12)
    assert summary["rejected_by_reason"] == {"nsfw": 12}
    report = tmp_path / "report.html"
    assert run_cli(["report", str(tmp_path / "on" / "out"), "--out", str(report)]).returncode == 0
    assert "By reason: nsfw: 12" in report.read_text()

    (tmp_path / "off").mkdir()
    off = _config(tmp_path / "off" / "edit.yaml", images, model, safety_checker="off")
    summary = _summary(run_cli(["edit", str(off), "--json"], cluster))
    assert (summary["rows_out"], summary["rejects"], summary["rejected_by_reason"]) == (12, 0, {})
