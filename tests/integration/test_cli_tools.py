"""The non-flow commands as a user runs them: import, info, make-tiny, report, help."""

from __future__ import annotations

import pytest

from pixelmill.datasets import Dataset
from tests.conftest import run_cli


def test_import_info_and_report(tmp_path):
    from pixelmill.samples import draw_sample_images

    draw_sample_images(str(tmp_path / "files"), n=5, corrupt=1)
    proc = run_cli(["dataset", "import", str(tmp_path / "files"), "--out", str(tmp_path / "ds")])
    assert proc.returncode == 0, proc.stderr
    assert "imported 6 images (6 with captions)" in proc.stdout
    ds = Dataset.open(str(tmp_path / "ds"))
    assert ds.num_rows == 6 and set(ds.schema.names) >= {"id", "image", "caption"}

    info = run_cli(["dataset", "info", str(tmp_path / "ds")])
    assert info.returncode == 0 and "6 rows" in info.stdout and "complete" in info.stdout

    rep = run_cli(["report", str(tmp_path / "ds"), "--out", str(tmp_path / "r.html")])
    assert rep.returncode == 0, rep.stderr
    html = (tmp_path / "r.html").read_text()
    assert html.count("<img") == 5  # the corrupt file gets a placeholder, not an image
    for row_id in ds.to_table(["id"])["id"].to_pylist():
        assert row_id in html


def test_errors_are_one_line_and_exit_2(tmp_path):
    for args, needle in [
        (["dataset", "import", str(tmp_path / "nope"), "--out", str(tmp_path / "x")], "not a folder"),
        (["report", str(tmp_path / "nope")], "nope"),
        (["dataset", "info", str(tmp_path / "nope")], "nope"),
        (["edit", str(tmp_path / "missing.yaml")], "config file not found"),
    ]:
        proc = run_cli(args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert needle in proc.stderr and "Traceback" not in proc.stderr


def test_make_tiny_writes_loadable_safetensors_pipelines(tmp_path):
    proc = run_cli(["models", "make-tiny", "--out", str(tmp_path / "m")])
    assert proc.returncode == 0, proc.stderr
    files = {p.suffix for p in (tmp_path / "m").rglob("*") if p.is_file()}
    assert ".safetensors" in files and not files & {".bin", ".pt", ".ckpt", ".pkl"}
    from pixelmill.models.loading import load_img2img_pipeline

    pipe = load_img2img_pipeline(str(tmp_path / "m" / "sd-img2img"), device="cpu")
    assert pipe.unet.config.in_channels == 4


@pytest.mark.parametrize("cmd", [[], ["edit"], ["demo"], ["server"], ["report"], ["dataset", "import"],
                                 ["models", "make-tiny"]])
def test_every_command_has_help(cmd):
    proc = run_cli([*cmd, "--help"])
    assert proc.returncode == 0 and "usage: pixelmill" in proc.stdout
