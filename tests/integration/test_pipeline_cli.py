"""``pixelmill run``: a pipeline of flows as ONE Prefect flow, with an editing method added by a plugin.

The plugin is a module outside the package, named in the pipeline's ``plugins:``; it
registers a new editing method (one file, nothing else changed) that the bulk-edit flow
runs on Ray workers through the real CLI in a subprocess.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml

from pixelmill.datasets import Dataset, account
from pixelmill.datasets.images import decode_image
from tests.conftest import run_cli

pytestmark = pytest.mark.slow

PLUGIN = '''
"""A plugin editing method: invert the image's colours (no model)."""
from PIL import Image, ImageOps
from pydantic import BaseModel

from pixelmill.registry import register
from pixelmill.tasks.edit.base import BulkEditor


class InvertSettings(BaseModel):
    amount: float = 1.0


@register("edit", "invert", settings=InvertSettings, text=None, needs_model=False)
class InvertEditor(BulkEditor):
    method = "invert"
    text_key = None

    def setup(self):
        self.device = "cpu"
        self.model_hash = "invert"
        self.settings = InvertSettings.model_validate(self.config.get("invert") or {})

    def edit(self, images, texts, seeds):
        return [{"image": ImageOps.invert(im.convert("RGB"))} for im in images]

    def _base(self, row):
        return {**super()._base(row), "model": "invert", "steps": 0, "guidance_scale": None}
'''


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> tuple[str, list[str]]:
    from pixelmill.datasets.importer import import_folder
    from pixelmill.samples import draw_sample_images

    root = tmp_path_factory.mktemp("pipeline-inputs")
    draw_sample_images(str(root / "files"), n=5, corrupt=1, seed=2)
    import_folder(str(root / "files"), str(root / "images"))
    return str(root / "images"), Dataset.open(str(root / "images")).to_table(["id"])["id"].to_pylist()


def _pipeline(root: Path, images: str, tiny_models: dict, second_input: str = "${steps.invert.output}") -> Path:
    (root / "my_invert_plugin.py").write_text(textwrap.dedent(PLUGIN))
    cfg = {
        "plugins": ["my_invert_plugin"],
        "steps": [
            {"name": "invert", "uses": "edit",
             "with": {"input": images, "output": str(root / "inverted"), "method": "invert", "resolution": 64,
                      "invert": {"amount": 1.0}}},
            {"name": "sdedit", "uses": "edit",
             "with": {"input": second_input, "output": str(root / "edited"), "model": tiny_models["img2img"],
                      "image_column": "edited_image",
                      "prompt": "a painting", "strength": 0.5, "steps": 2, "resolution": 64,
                      "placement": {"workers": 1, "gpus": 0}}},
        ],
    }
    path = root / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _flow_runs(api_url: str):
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def go():
        async with get_client() as client:
            runs = await client.read_flow_runs(limit=200)
            parents = {}
            for r in runs:
                if r.parent_task_run_id:
                    parents[r.id] = (await client.read_task_run(r.parent_task_run_id)).flow_run_id
            flows = {f.id: f.name for f in await client.read_flows()}
            return [(r, flows.get(r.flow_id), parents.get(r.id)) for r in runs]

    with temporary_settings({PREFECT_API_URL: api_url}):
        return asyncio.run(go())


def test_pipeline_runs_a_plugin_method_then_chains_into_sdedit_as_one_flow(cluster, images, tiny_models, tmp_path):
    path = _pipeline(tmp_path, images[0], tiny_models)
    before = {r.id for r, _, _ in _flow_runs(cluster["PREFECT_API_URL"])}
    proc = run_cli(["run", str(path), "--json"], cluster, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summaries = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summaries["invert"]["rows_out"] == 5 and summaries["invert"]["rejects"] == 1

    inverted = Dataset.open(str(tmp_path / "inverted"))
    assert account(images[1], inverted).ok
    row = inverted.to_table().to_pylist()[0]
    assert row["method"] == "invert"
    src = np.asarray(decode_image(row["input_image"]).convert("RGB"), dtype=int)
    out = np.asarray(decode_image(row["edited_image"]).convert("RGB"), dtype=int)
    assert np.array_equal(out, 255 - src)  # the plugin's edit, run on a Ray worker
    edited = Dataset.open(str(tmp_path / "edited"))
    assert edited.complete and edited.num_rows == 5  # the second step read the first step's output

    new = [(r, name, parent) for r, name, parent in _flow_runs(cluster["PREFECT_API_URL"]) if r.id not in before]
    top = [r for r, name, parent in new if name == "pipeline"]
    assert len(top) == 1 and top[0].state.is_completed()
    children = [(r, name) for r, name, parent in new if parent == top[0].id]
    assert sorted(r.name for r, _ in children) == ["invert", "sdedit"]
    assert all(name == "bulk-edit" and r.state.is_completed() for r, name in children)

    # A rerun does no work in either step.
    again = run_cli(["run", str(path), "--json"], cluster, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-4000:]
    assert all(s["shards_run"] == [] for s in json.loads(again.stdout.strip().splitlines()[-1]).values())


def test_a_dangling_reference_or_unknown_method_exits_2_before_anything_starts(images, tiny_models, tmp_path):
    path = _pipeline(tmp_path, images[0], tiny_models, second_input="${steps.nope.output}")
    proc = run_cli(["run", str(path)], cwd=tmp_path)
    assert proc.returncode == 2
    assert "steps[1] (sdedit)" in proc.stderr and "${steps.nope.output} names no earlier step" in proc.stderr
    assert not (tmp_path / "inverted").exists()

    cfg = yaml.safe_load(path.read_text())
    cfg["plugins"] = []
    cfg["steps"][1]["with"]["input"] = "${steps.invert.output}"
    path.write_text(yaml.safe_dump(cfg))
    proc = run_cli(["run", str(path)], cwd=tmp_path)
    assert proc.returncode == 2
    assert "unknown editing method 'invert'" in proc.stderr and "plugins" in proc.stderr
