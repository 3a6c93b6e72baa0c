"""pixelmill on a real several-node Ray cluster, through the CLI by address.

A head and two worker nodes on 127.0.0.1 (``ray.cluster_utils.Cluster``, as Ray's own
tests do: ``ray start --address`` refuses to join nodes bound to 127.0.0.1), one worker
declaring ``GPU: 1`` (compute stays on the CPU where there is no CUDA), each node one CPU
and a small object store. The CLI runs as a user would, with ``--ray-address``, reporting
to the session's one Prefect server and writing its outputs to the session's S3 server:

- a bulk edit's GPU-declaring actors run on the GPU node (node ids in the run's summary),
  the task that drives them on the head node; its task runs and summary artifact are in the
  shared Prefect server, its dataset in the bucket;
- a fine-tuning job with ``num_workers: 2`` trains on two nodes (its attempt records them);
  ``auto`` GPUs run it on CPU and say why (one GPU, two workers), and an explicit
  ``num_gpus`` the cluster cannot provide is refused with exit status 2 before any work;
- the progress bar's counter lives on the head node, and losing it never fails a run;
- (last, as it changes the cluster) a node running one of a bulk edit's two actors is
  removed mid-stage: the run finishes on the other and every row is accounted for once.

Only the cluster started here is stopped (``Cluster.shutdown``: its own processes).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml

from pixelmill.datasets import Dataset, account
from tests.conftest import run_cli
from tests.helpers.prefect_api import summary_artifact, task_runs

pytestmark = pytest.mark.slow

OBJECT_STORE = 80 * 1024 * 1024  # bytes per node: small, the machine is shared


@pytest.fixture(scope="module")
def nodes(cluster, s3_server):
    """Three Ray nodes (head, GPU node, CPU node); yields the env a CLI needs and the node ids."""
    from ray.cluster_utils import Cluster

    temp = tempfile.mkdtemp(prefix="pmn")  # short: Ray's socket paths must fit in 107 bytes
    common = dict(num_cpus=1, object_store_memory=OBJECT_STORE)
    ray_cluster = Cluster(initialize_head=True, head_node_args=dict(
        **common, num_gpus=0, include_dashboard=False, temp_dir=temp))
    try:
        gpu = ray_cluster.add_node(**common, num_gpus=1)
        cpu = ray_cluster.add_node(**common, num_gpus=0)
        ray_cluster.wait_for_nodes()
        env = {"PREFECT_API_URL": cluster["PREFECT_API_URL"]}
        yield {"env": env, "address": ray_cluster.address, "head": ray_cluster.head_node.node_id,
               "gpu": gpu.node_id, "cpu": cpu.node_id, "cluster": ray_cluster}
    finally:
        ray_cluster.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


def _json(proc) -> dict:
    assert proc.returncode == 0, proc.stderr[-5000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_bulk_edit_gpu_actors_land_on_the_gpu_node(nodes, s3_server, tmp_path, tiny_models):
    from pixelmill.datasets.importer import import_folder
    from pixelmill.samples import draw_sample_images

    draw_sample_images(str(tmp_path / "files"), n=5, corrupt=1, seed=2)
    import_folder(str(tmp_path / "files"), str(tmp_path / "images"))
    out = s3_server.url("multinode", "edit")
    cfg = tmp_path / "edit.yaml"
    cfg.write_text(yaml.safe_dump({
        "input": str(tmp_path / "images"), "output": out, "method": "sdedit", "model": tiny_models["img2img"],
        "prompt_column": "caption", "strength": 0.5, "steps": 2, "resolution": 64, "batch_size": 4, "seed": 0,
        "placement": {"workers": 1, "cpus": 1},  # gpus: auto
    }))
    summary = _json(run_cli(["edit", str(cfg), "--json", "--ray-address", nodes["address"]], nodes["env"]))

    # The GPU-declaring actors ran on the GPU node, claiming its GPU; the task driving them on the
    # head node (it owns them: its node's loss would take them all).
    assert summary["gpus"] == 1 and summary["notes"] == []
    assert set(summary["nodes"]) == {nodes["gpu"]} and sum(summary["nodes"].values()) == 6
    assert summary["worker"]["node_id"] == nodes["head"]  # a Ray task there, or the command itself when it is
    assert summary["gpu_hours"] > 0

    # Every row accounted for, in the bucket.
    ds = Dataset.open(out)
    assert ds.complete and (ds.num_rows, ds.rejects().num_rows) == (5, 1)
    ids = Dataset.open(str(tmp_path / "images")).to_table(["id"])["id"].to_pylist()
    assert account(ids, ds).ok
    assert s3_server.filesystem().exists(f"{s3_server.bucket}/multinode/edit/_manifest.json")

    # Task runs and the run's summary artifact are in the one shared Prefect server.
    api = nodes["env"]["PREFECT_API_URL"]
    runs = {t.name.rsplit("-", 1)[0]: t for t in task_runs(api, summary["flow_run_id"])}
    assert runs["edit-shards"].state.is_completed() and runs["commit-manifest"].state.is_completed()
    key, figures, description = summary_artifact(api, summary["flow_run_id"])
    assert key == "pixelmill-bulk-edit-summary"
    shards = ds.manifest.shards
    assert figures["rows in"] == sum(s.input_rows for s in shards) == 6
    assert figures["rows out"] == sum(s.rows for s in shards) == 5
    assert figures["rejected"] == sum(s.rejects for s in shards) == 1
    reason = ds.rejects()["error"].to_pylist()[0].split(": ", 1)[0]
    assert figures[f"rejected: {reason}"] == 1
    assert figures["output"] == out and figures["GPU-hours"] > 0 and figures["note"] == []
    assert out in description


def test_finetune_with_two_workers_trains_on_two_nodes(nodes, tmp_path, tiny_models):
    from pixelmill.samples import draw_concept_images, write_image_dataset

    write_image_dataset(str(tmp_path / "dog"), draw_concept_images(2, seed=0))
    cfg = tmp_path / "campaign.yaml"
    cfg.write_text(yaml.safe_dump({
        "output": str(tmp_path / "campaign"), "model": tiny_models["img2img"],
        "concepts": {"dog": {"instance_data": str(tmp_path / "dog"), "token": "<dog1>", "class_word": "dog"}},
        "defaults": {"resolution": 64, "max_steps": 2, "train_batch_size": 2, "checkpoint_every": 2},
        # one CPU per worker and one CPU per node: the two workers cannot share a node
        "jobs": [{"name": "dog-lora", "method": "lora", "concepts": ["dog"],
                  "settings": {"num_workers": 2, "cpus_per_worker": 1}}],
        "eval": {"prompts": ["a photo of {concept}"], "samples_per_prompt": 1, "steps": 1},
    }))
    at = ["--ray-address", nodes["address"]]

    # Two whole GPUs asked, one on the cluster: refused before anything starts.
    refused = run_cli(["finetune", str(cfg), "--set", "defaults.num_gpus=2", *at], nodes["env"])
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "jobs[dog-lora].num_gpus: 2 GPU(s) asked (1 for each of 2 workers)" in refused.stderr
    assert "Traceback" not in refused.stderr and not (tmp_path / "campaign" / "jobs").exists()

    summary = _json(run_cli(["finetune", str(cfg), "--json", *at], nodes["env"]))
    assert summary["ran"] == ["dog-lora"] and not summary["failed"]
    assert summary["notes"] and "need one whole GPU each" in summary["notes"][0]  # auto: 1 GPU, 2 workers
    assert summary["gpu_hours"] == 0
    (job,) = [json.loads(p.read_text()) for p in (tmp_path / "campaign" / "jobs").glob("*/job.json")]
    workers = job["attempts"][-1]["nodes"]
    assert len(workers) == 2 and len(set(workers)) == 2
    assert set(workers) <= {nodes["head"], nodes["gpu"], nodes["cpu"]}
    assert summary["nodes"] == {n: 1 for n in workers}

    key, figures, _ = summary_artifact(nodes["env"]["PREFECT_API_URL"], summary["flow_run_id"])
    assert key == "pixelmill-finetune-summary"
    assert (figures["jobs in"], figures["jobs out"], figures["rejected"]) == (1, 1, 0)
    assert figures["GPU-hours"] == 0 and figures["note"] == summary["notes"]
    assert Path(figures["output"]) == tmp_path / "campaign"


def _node_processes(node) -> list:
    """Every process of one ``Cluster`` node (its raylet's tree), with their command lines."""
    import psutil

    out = []
    for info in node.all_processes.get("raylet", []):
        try:
            root = psutil.Process(info.process.pid)
            for p in [root, *root.children(recursive=True)]:
                try:
                    out.append((p, " ".join(p.cmdline())))
                except psutil.Error:
                    pass
        except psutil.Error:
            pass
    return out


_PROGRESS_PROBE = """
import json, sys
import ray
from pixelmill.flows.common import Progress
ray.init(address=sys.argv[1], log_to_driver=False)
p = Progress.create(total=10)
p.add(3)
first = p.get()
where = ray.get(p.handle.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()))
ray.kill(p.handle)  # asynchronous: a call sent before the actor is gone may still count
while True:
    try:
        ray.get(p.handle.get.remote(), timeout=10)
    except ray.exceptions.RayActorError:
        break
p.add(4)
print(json.dumps({"first": first, "after_loss": p.get(), "where": where}))
"""


def test_the_progress_counter_lives_on_the_head_and_its_loss_never_fails_a_run(nodes):
    """The bar's row counter is placed on the head node (a lost worker node, the driver's own
    among them, cannot take it down mid-stage) and, if it is lost anyway, the bar freezes at its
    last count. (Every node here is on 127.0.0.1, so a driver attaches to any node's raylet.)"""
    import os
    import subprocess
    import sys

    env = {**os.environ, **nodes["env"]}
    proc = subprocess.run([sys.executable, "-c", _PROGRESS_PROBE, nodes["address"]], env=env, text=True,
                          capture_output=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["first"] == 3 and got["after_loss"] == 3
    assert got["where"] == nodes["head"]


def test_a_node_removed_mid_stage_loses_no_row(nodes, tmp_path, tiny_models):
    """Runs last in this module: it adds a second GPU node and removes one whose actor is working.
    The task driving the stage (which owns the actors) runs on the head node, never on a node that
    can be lost without losing the cluster: no worker node holds it at any moment."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from pixelmill.datasets import read_manifest
    from tests.helpers.edit_inputs import sample_dataset, sdedit_config

    ray_cluster = nodes["cluster"]
    extra = ray_cluster.add_node(num_cpus=1, num_gpus=1, object_store_memory=OBJECT_STORE)
    ray_cluster.wait_for_nodes()
    images, ids = sample_dataset(tmp_path, n=14, corrupt=1, seed=41, buckets=8)
    out = tmp_path / "out"
    cfg = sdedit_config(tmp_path / "edit.yaml", images, tiny_models["img2img"], str(out), "a sketch of {caption}",
                        steps=8)
    doc = yaml.safe_load(cfg.read_text())
    doc["placement"] = {"workers": 2, "gpus": 1, "cpus": 1}  # one actor per GPU node
    cfg.write_text(yaml.safe_dump(doc))
    env = {**os.environ, **nodes["env"]}
    proc = subprocess.Popen([sys.executable, "-m", "pixelmill.cli", "edit", str(cfg), "--json",
                             "--ray-address", nodes["address"]], env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    gpu_nodes = {n.node_id: n for n in ray_cluster.worker_nodes if n.node_id in (nodes["gpu"], extra.node_id)}
    removed, drivers_seen = None, []
    try:
        deadline = time.monotonic() + 600
        while removed is None and proc.poll() is None and time.monotonic() < deadline:
            m = read_manifest(str(out))
            titles = {node_id: [t for _, t in _node_processes(node)] for node_id, node in gpu_nodes.items()}
            drivers_seen += [node_id for node_id, ts in titles.items() if any("_run_prefect_task" in t for t in ts)]
            if m and m.shards and not m.complete:
                for node_id, node in gpu_nodes.items():
                    if any("_StageActor" in t for t in titles[node_id]):
                        ray_cluster.remove_node(node, allow_graceful=False)
                        removed = node_id
                        break
            time.sleep(0.1)
        stdout, stderr = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert removed, f"no node was removed mid-stage (rc={proc.returncode}); the test proves nothing"
    assert proc.returncode == 0, stderr[-5000:]
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert drivers_seen == [] and summary["worker"]["node_id"] == nodes["head"]
    assert summary["rows_out"] + summary["rejects"] == summary["rows_in"] == len(ids)
    ds = Dataset.open(str(out))
    assert ds.complete
    report = account(ids, ds)
    assert report.ok, str(report)
    assert ds.rejects().num_rows == 1  # the corrupt file only: no row became a reject through the lost node
