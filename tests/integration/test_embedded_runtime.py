"""The embedded start-up on its own: local Ray + a Prefect server pixelmill starts and stops itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from pixelmill.datasets import Dataset

pytestmark = pytest.mark.slow


def test_embedded_runtime_records_runs_in_its_own_database(tmp_path, tiny_models):
    from pixelmill.datasets.importer import import_folder
    from pixelmill.samples import draw_sample_images

    draw_sample_images(str(tmp_path / "files"), n=4, seed=2)
    import_folder(str(tmp_path / "files"), str(tmp_path / "images"))
    cfg = tmp_path / "ip2p.yaml"
    cfg.write_text(yaml.safe_dump(dict(
        input=str(tmp_path / "images"), output=str(tmp_path / "out"), method="instruct_pix2pix",
        model=tiny_models["instruct_pix2pix"], instruction="make it snowy", steps=3, resolution=64,
    )))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PREFECT_API_URL")}
    home = tmp_path / "home"
    proc = subprocess.run([sys.executable, "-m", "pixelmill.cli", "edit", str(cfg), "--json", "--home", str(home)],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["rows_out"] == 4 and summary["worker"]["in_ray_worker"] is True
    assert Dataset.open(str(tmp_path / "out")).num_rows == 4
    assert (home / "prefect.db").is_file()

    # The same database, reopened by a new server (what `pixelmill server --home` does), has the runs.
    from pixelmill.runtime import PrefectServer
    from tests.integration.test_bulk_edit_cli import _prefect_runs

    server = PrefectServer(home).start()
    try:
        runs = _prefect_runs(server.api_url)
    finally:
        server.stop()
    assert len(runs) == 1
    flow_run, task_runs = runs[0]
    assert flow_run.state.is_completed()
    assert sorted(t.name.rsplit("-", 1)[0] for t in task_runs) == ["commit-manifest", "edit-shards"]
