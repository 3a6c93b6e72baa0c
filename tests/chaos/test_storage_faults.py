"""Storage faults through the real CLI: a full disk, a write that stops half-way, an I/O
error and a read-only output.

The output lives on ``faulty://`` (tests/netguard/faultyfs.py, registered in every process
the tests start, Ray workers included): the local disk, with the faults a ``.faults.json``
file above the output asks for. For each fault: the run fails with a message naming the
path (no traceback from pixelmill itself), readers see only whole committed shards, and
once the fault is gone a rerun completes with every input id in the output or the rejects
exactly once. A read-only output is refused before anything starts (exit 2).

``make test`` runs the full-disk case and the read-only case; ``make sweep`` runs the
half-written and I/O-error cases at several seeded write counts.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pixelmill.datasets import Dataset, account, read_manifest
from tests.conftest import run_cli
from tests.helpers.edit_inputs import sample_dataset, sdedit_config


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> tuple[str, list[str]]:
    """12 rows in 6 shards, 1 of them a corrupt file (a reject)."""
    return sample_dataset(tmp_path_factory.mktemp("storage-fault-inputs"), n=11, corrupt=1, seed=8, buckets=6)


def _config(tmp_path: Path, images: str, model: str, output: str) -> Path:
    return sdedit_config(tmp_path / "edit.yaml", images, model, output, "a watercolour of {caption}", steps=2)


def _set_fault(folder: Path, fault: str | None, after: int = 0) -> None:
    spec = folder / ".faults.json"
    if fault is None:
        spec.unlink(missing_ok=True)
        return
    (folder / ".faults.count").unlink(missing_ok=True)
    spec.write_text(json.dumps({"fault": fault, "after": after}))


def _assert_only_whole_shards_visible(out: Path) -> set[str]:
    """Every data file a folder reader can see is a committed shard, and it reads whole."""
    m = read_manifest(str(out))
    listed = set(m.shard_names()) if m else set()
    for folder in (out, out / "__rejects"):
        visible = {f.stem.removeprefix("part-") for f in folder.glob("part-*.parquet")}
        assert visible <= listed, f"{folder}: uncommitted shard files visible to readers: {visible - listed}"
        for f in folder.glob("part-*.parquet"):
            pq.read_table(f)  # a half-written file would not parse
    if m is not None:
        for entry in m.shards:
            assert pq.read_metadata(out / f"part-{entry.name}.parquet").num_rows == entry.rows
    return listed


def _fail_then_resume(cluster, tmp_path, images, tiny_models, fault: str, after: int) -> None:
    root = tmp_path / "bucket"
    root.mkdir()
    out = root / "out"
    cfg = _config(tmp_path, images[0], tiny_models["img2img"], f"faulty://{out}")
    _set_fault(root, fault, after)
    failed = run_cli(["edit", str(cfg), "--json"], env_extra=cluster)
    assert failed.returncode == 1, (failed.returncode, failed.stdout[-2000:], failed.stderr[-3000:])
    tail = failed.stderr.strip().splitlines()[-2:]
    reason = {"enospc": "No space left on device", "partial": "Input/output error", "eio": "Input/output error"}[fault]
    assert tail[0].startswith("pixelmill: error: edit failed: " + reason), tail
    assert str(out) in tail[0], f"the message does not name the path: {tail[0]}"
    assert "rerun the same command to resume" in tail[1]
    # pixelmill's own report of the failure carries no traceback (Prefect's run logs keep theirs)
    assert "Traceback" not in failed.stderr.split("Finished in state Failed")[-1]
    committed = _assert_only_whole_shards_visible(out)
    assert len(committed) < len(Dataset.open(images[0]).shard_names()), "the fault hit after the run ended"

    _set_fault(root, None)
    done = run_cli(["edit", str(cfg), "--json"], env_extra=cluster)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(summary["shards_skipped"]) == committed, "committed shards were redone (or lost)"
    _assert_only_whole_shards_visible(out)
    ds = Dataset.open(f"faulty://{out}")
    assert ds.complete and not (out / "__staging").exists()
    report = account(images[1], ds)
    assert report.ok, str(report)
    assert ds.rejects().num_rows == 1


def test_read_only_output_is_refused_before_anything_starts(tmp_path, images, tiny_models):
    root = tmp_path / "bucket"
    root.mkdir()
    _set_fault(root, "erofs")
    cfg = _config(tmp_path, images[0], tiny_models["img2img"], f"faulty://{root}/out")
    # no cluster given: a run that got past the check would start a local Ray and a server
    proc = run_cli(["edit", str(cfg)], timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip() == f"pixelmill: error: output faulty://{root}/out is not writable: Read-only file system"
    assert not (root / "out" / "_manifest.json").exists()


@pytest.mark.slow
def test_full_disk_mid_run_fails_cleanly_and_a_rerun_completes(cluster, tmp_path, images, tiny_models):
    # 1 probe, then 3 writes per shard (data, rejects, manifest): the 7th write, in the 3rd shard, fails
    _fail_then_resume(cluster, tmp_path, images, tiny_models, "enospc", after=6)


@pytest.mark.slow
@pytest.mark.sweep
@pytest.mark.parametrize("fault", ["partial", "eio"])
@pytest.mark.parametrize("seed", range(3))
def test_write_faults_at_seeded_points(cluster, tmp_path, images, tiny_models, fault, seed):
    after = random.Random(f"{fault}-{seed}").randrange(2, 14)
    _fail_then_resume(cluster, tmp_path, images, tiny_models, fault, after)


def test_faulty_filesystem_is_seen_by_subprocesses(tmp_path):
    """The fault tests mean nothing unless a fresh interpreter (as Ray workers are) gets faulty://."""
    code = "import fsspec; print(type(fsspec.filesystem('faulty')).__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "FaultyFileSystem", out.stderr
