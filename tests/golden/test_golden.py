"""Golden test: every example config in ``configs/`` gives the same hashed config and the same rows.

Each case runs one example config (``configs/<name>.yaml``) through the real CLI, against
this module's Ray head and Prefect server, with ``--set`` overrides only for what makes
it small and offline (steps, iterations, sample counts, the pool and the tiny models);
every other key is the example's. The inputs sit where the examples expect them
(``pixelmill-demo/...`` under a temporary folder that is the CLI's working directory),
so the examples' relative paths are used as written.

For each case ``expected.json`` (written by ``make_expected.py`` from the code before
the restructure) holds:

* ``config_hash``: the hash of the output's recorded config (the manifest's ``config``,
  or ``config.json``'s for videos) after normalising run-specific values (the
  temporary folder, the tiny models' folder and the loopback server's address become
  ``<ROOT>``, ``<MODELS>`` and ``<HTTP>``), re-hashed with
  ``pixelmill.datasets.config_hash``; the normalised config itself is kept as
  ``config`` so a failure names the keys that changed. For the fine-tuning campaign the
  config hashes are the job ids (hashes of each job's weight-affecting config).
* per output table, a digest of its rows: SHA-256 over the rows sorted by id (and the
  sort key columns) as canonical JSON, over the deterministic columns only. Columns
  that measure time, speed, memory or the process (``seconds``, ``*_per_second``,
  ``peak_memory_mb``, ``pid``, ``worker``...) are left out; path values are normalised
  as above; image and other binary cells are included as the SHA-256 of their bytes;
  floats are included as they are (every flow here reran bit-identically on this
  machine). A digest per column and the row and column counts are kept too, so a
  failure says which column changed.
* for the fine-tuning and video flows, digests of the files each job or video wrote
  (adapter weights, samples, atlases, edit layers, the edited MP4s; paths inside
  ``.json``/``.txt`` files normalised).

What each case runs (inputs built here; everything small):

* ``edit-sdedit``, ``edit-ip2p``, ``edit-masked-sdedit``, ``edit-text2live``: the bulk-edit
  flow over 3 drawn sample images plus 1 corrupt file (imported with ``import_folder``;
  the masked case's copy has a rectangle ``mask`` column), 3-4 steps or 3 Text2Live
  iterations: edits, their CLIP metrics and the reject.
* ``pairs``: the template writer and Prompt-to-Prompt over those 4 captions, 2 samples
  per caption, 3 steps: ``text/`` and ``pairs/``.
* ``retrieve``: ``pixelmill pool build`` over a 16-image sample pool (with the LAION
  metadata columns the example's filters read) served from a loopback server, then
  exactly 3 images per prompt (the cat prompt runs short): ``candidates/``, ``images/`` (kept, dropped and failed
  downloads) and the ``real_reg/`` export.
* ``finetune``: DreamBooth (2 generated class images), LoRA and Textual Inversion (the
  grid cut to one learning rate) on 2 concept images, 2 steps each, 1 evaluation sample
  per prompt. Its output lies under the temporary folder like the others: a class
  sample's noise derives from its source's place in the job, not the dataset's URL, so
  the weights do not depend on where the campaign is written.
* ``video-homography``: a 6-frame pan and a 6-frame moving shape (a video dataset of
  bytes), homography atlases, SDEdit. ``video-neural``: the moving-shape file, a tiny
  neural atlas (100 steps) and 3 Text2Live iterations on its foreground.

Under ``make test`` one case per flow (all cases but three of the four edit ones) has its
first run SIGKILLed (its whole process group) a seeded moment after it starts writing, and
the command is run again: the expected record must come out of the resumed run, so one
comparison checks both that the outputs are unchanged and that a killed run resumes to the
same bytes (``tests/chaos/test_kill_points.py`` does the same at 10 seeded points per case
under ``make chaos``).

The CLI runs go 3 at a time. The module takes about 3.5 minutes on 2 CPU cores shared
with other work (CPU-bound: less on an idle machine); it is marked ``slow``.

To regenerate ``expected.json`` (only from code whose outputs are known to be right,
e.g. the commit before a refactor), see ``make_expected.py``.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
import warnings
from fractions import Fraction
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
EXPECTED = HERE / "expected.json"
# Set by make_expected.py: write the records to this file instead of comparing.
WRITE_ENV = "PIXELMILL_GOLDEN_WRITE"

# Columns that measure time, speed, memory or the process: never part of a digest.
EXCLUDED_COLUMNS = frozenset({
    "seconds", "atlas_seconds", "edit_seconds", "steps_per_second", "images_per_second", "throughput",
    "peak_memory_mb", "peak_memory_bytes", "pid", "worker", "worker_id", "node_id", "created_at", "updated_at",
    "elapsed", "duration", "timestamp", "time",
})


def _excluded(column: str) -> bool:
    return column in EXCLUDED_COLUMNS or column.endswith(("_seconds", "_per_second", "_time", "_at"))


# --- normalising and digesting --------------------------------------------------------


class Normaliser:
    """Replaces the run-specific prefixes (temporary folders, the server's port) in strings."""

    def __init__(self, replacements: dict[str, str]) -> None:
        pairs: list[tuple[str, str]] = []
        for prefix, name in replacements.items():
            for variant in {prefix, os.path.realpath(prefix)}:
                pairs.append((variant, name))
                pairs.append(("file://" + variant, name))
        # longest first, so a nested folder wins over its parent
        self.pairs = sorted(set(pairs), key=lambda p: -len(p[0]))

    def text(self, value: str) -> str:
        for prefix, name in self.pairs:
            if prefix in value:
                value = value.replace(prefix, name)
        return value

    def value(self, value: Any) -> Any:
        """A JSON-able, run-independent form of a cell or config value."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, (bytes, bytearray, memoryview)):
            return {"sha256": hashlib.sha256(bytes(value)).hexdigest()}
        if isinstance(value, float):
            if math.isnan(value):
                return "nan"
            if math.isinf(value):
                return "inf" if value > 0 else "-inf"
            return value
        if isinstance(value, dict):
            return {str(k): self.value(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.value(v) for v in value]
        if value is None or isinstance(value, (bool, int)):
            return value
        if hasattr(value, "isoformat"):
            return value.isoformat()
        return str(value)


def canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def sha(value: Any) -> str:
    return hashlib.sha256(canonical(value).encode("utf-8")).hexdigest()


def file_sha(path: Path, norm: Normaliser | None = None) -> str:
    """SHA-256 of a file; text files (``.json``, ``.txt``) after normalising the paths in them."""
    data = path.read_bytes()
    if norm is not None and path.suffix in (".json", ".txt", ".jsonl"):
        data = norm.text(data.decode("utf-8")).encode("utf-8")
    return hashlib.sha256(data).hexdigest()


def digest_table(table: pa.Table | None, norm: Normaliser, sort_by: tuple[str, ...] = ("id",)) -> dict[str, Any]:
    """Row and per-column digests of ``table`` over its deterministic columns, rows in key order."""
    if table is None:
        return {"rows": 0, "columns": {}, "digest": sha([])}
    columns = sorted(c for c in table.column_names if not _excluded(c))
    rows = [{c: norm.value(r[c]) for c in columns} for r in table.select(columns).to_pylist()]
    keys = [c for c in sort_by if c in columns]
    rows.sort(key=lambda r: ([canonical(r[k]) for k in keys], canonical(r)))
    return {
        "rows": len(rows),
        "columns": {c: sha([r[c] for r in rows]) for c in columns},
        "digest": sha(rows),
    }


def _read_parquet_files(files: list[Path]) -> pa.Table | None:
    tables = [pq.read_table(f) for f in sorted(files)]
    tables = [t for t in tables if t.num_rows]
    if not tables:
        return None
    return pa.concat_tables(tables, promote_options="permissive")


def read_dataset_files(folder: Path) -> dict[str, pa.Table | None]:
    """A pixelmill dataset folder's committed rows, rejects and dropped rows, straight from its Parquet files."""
    return {
        "rows": _read_parquet_files(list(folder.glob("part-*.parquet"))),
        "rejects": _read_parquet_files(list((folder / "__rejects").glob("part-*.parquet"))),
        "dropped": _read_parquet_files(list((folder / "__dropped").glob("part-*.parquet"))),
    }


def hashed_config(config: dict[str, Any], stored_hash: str, norm: Normaliser) -> dict[str, Any]:
    """The normalised recorded config and its hash; checks the recorded hash is the config's."""
    from pixelmill.datasets import config_hash

    assert config_hash(config) == stored_hash, "the recorded config_hash is not the hash of the recorded config"
    normalised = norm.value(config)
    return {"config_hash": config_hash(normalised), "config": normalised}


def digest_dataset(folder: Path, norm: Normaliser, sort_by: tuple[str, ...] = ("id",)) -> dict[str, Any]:
    """Config hash, shard list and row digests of one output dataset."""
    manifest = json.loads((folder / "_manifest.json").read_text())
    out = hashed_config(manifest["config"], manifest["config_hash"], norm)
    out["schema"] = [manifest["schema_name"], manifest["schema_version"]]
    out["complete"] = manifest["complete"]
    out["shards"] = [[s["name"], s["rows"], s.get("rejects", 0), s.get("dropped", 0), s.get("input_rows")]
                     for s in sorted(manifest["shards"], key=lambda s: s["name"])]
    tables = read_dataset_files(folder)
    out["tables"] = {name: digest_table(t, norm, sort_by) for name, t in tables.items()}
    return out


def diff_paths(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted paths where two JSON-like values differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            p = f"{prefix}.{k}" if prefix else str(k)
            if k not in a or k not in b:
                out.append(f"{p} ({'added' if k not in a else 'missing'})")
            else:
                out += diff_paths(a[k], b[k], p)
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        out = []
        for i, (x, y) in enumerate(zip(a, b)):
            out += diff_paths(x, y, f"{prefix}[{i}]")
        return out
    return [] if a == b else [f"{prefix}: expected {canonical(a)[:200]} got {canonical(b)[:200]}"]


# --- inputs, laid out where the example configs look for them -------------------------


def _masks_for(images_url: str, out_url: str) -> None:
    """The imported sample images with a ``mask`` column: a rectangle in the middle of each image."""
    from PIL import Image

    from pixelmill.datasets import IMAGE_TYPE, DatasetWriter, encode_image

    rows = []
    for f in sorted(Path(images_url).glob("part-*.parquet")):
        rows += pq.read_table(f).to_pylist()
    rows.sort(key=lambda r: r["id"])
    masks = []
    for r in rows:
        try:
            size = Image.open(io.BytesIO(r["image"]["bytes"])).size
        except Exception:  # noqa: BLE001 - the corrupt sample keeps a mask; the edit rejects it
            size = (96, 64)
        w, h = size
        m = Image.new("L", size, 0)
        m.paste(255, (w // 4, h // 4, (3 * w) // 4, (3 * h) // 4))
        masks.append(encode_image(m))
    table = pa.table({
        "id": [r["id"] for r in rows],
        "image": pa.array([r["image"] for r in rows], IMAGE_TYPE),
        "caption": [r["caption"] for r in rows],
        "mask": pa.array(masks, IMAGE_TYPE),
    })
    w = DatasetWriter(out_url, "images", 1, {"golden": "images-with-masks"}).open()
    sw = w.shard("00000")
    sw.write(table)
    sw.commit(input_rows=table.num_rows)
    w.finish()


def _pool_source(folder: str, base_url: str, out_url: str) -> None:
    """The sample pool's source with the LAION metadata columns the example's filters read.

    Every fifth row is unsafe, every seventh too small, so the filters remove some
    candidates.
    """
    from pixelmill.datasets import DatasetWriter
    from pixelmill.samples import write_sample_pool_source

    tmp = out_url + "-plain"
    write_sample_pool_source(folder, base_url, tmp, per_subject=4, seed=0)
    rows = []
    for f in sorted(Path(tmp).glob("part-*.parquet")):
        rows += pq.read_table(f).to_pylist()
    for i, r in enumerate(rows):
        r["punsafe"] = 0.9 if i % 5 == 4 else 0.05
        r["pwatermark"] = 0.1
        r["width"] = 128 if i % 7 == 6 else 512
        r["height"] = 384
    shutil.rmtree(tmp)
    w = DatasetWriter(out_url, "images", 1, {"golden": "pool-source"}).open()
    sw = w.shard("00000")
    sw.write(pa.Table.from_pylist(rows))
    sw.commit(input_rows=len(rows))
    w.finish()


def _check_workers_import_this_tree(cluster: dict[str, str], cwd: Path) -> None:
    """CLI subprocesses and Ray workers import pixelmill from the tree this process does.

    ``make_expected.py`` runs the old code from another checkout via ``PYTHONPATH``; a
    worker importing the installed (new) code instead would make the golden values
    meaningless.
    """
    import subprocess
    import sys

    import pixelmill.cli

    script = ("import ray, pixelmill.cli\n"
              "ray.init(address='auto', log_to_driver=False)\n"
              "f = ray.remote(num_cpus=0)(lambda: __import__('pixelmill.cli').cli.__file__)\n"
              "print(pixelmill.cli.__file__); print(ray.get(f.remote()))\n")
    env = {**os.environ, **cluster}
    proc = subprocess.run([sys.executable, "-c", script], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    mine = str(Path(pixelmill.cli.__file__).resolve())
    assert [str(Path(p).resolve()) for p in proc.stdout.split()[-2:]] == [mine, mine], (mine, proc.stdout)


@pytest.fixture(scope="module")
def golden(tmp_path_factory, tiny_models, cluster):
    """The CLI's working directory, with ``pixelmill-demo/`` holding every example's inputs.

    Yields ``(cwd, normaliser)``; the loopback server for the retrieval downloads runs
    for the whole module.
    """
    from pixelmill.datasets.importer import import_folder
    from pixelmill.datasets.videos import write_video_dataset
    from pixelmill.samples import draw_concept_images, draw_sample_images, write_image_dataset
    from pixelmill.tasks.video.io import encode_video
    from pixelmill.tasks.video.synthetic import synthetic_moving_shape, synthetic_pan
    from tests.helpers.http_server import serve_directory

    cwd = tmp_path_factory.mktemp("golden")
    demo = cwd / "pixelmill-demo"
    (demo / "datasets").mkdir(parents=True)
    models_root = Path(tiny_models["img2img"]).parent
    (demo / "models").symlink_to(models_root, target_is_directory=True)

    draw_sample_images(str(cwd / "files"), n=3, corrupt=1, seed=1)
    import_folder(str(cwd / "files"), str(demo / "datasets" / "images"))
    _masks_for(str(demo / "datasets" / "images"), str(demo / "datasets" / "images-with-masks"))
    write_image_dataset(str(demo / "datasets" / "concept-dog"), draw_concept_images(2, seed=0))

    clips = demo / "videos"
    pan = synthetic_pan(frames=6, size=(48, 32), shift=(2.0, 1.0), fps=24, seed=3)
    encode_video(pan.frames, pan.fps, clips / "pan.mp4")
    # the integration test's clip: a tiny neural atlas finds its foreground within 100 steps
    shape = synthetic_moving_shape(frames=6, size=(47, 35), radius=6.0, velocity=(3.0, 1.0))
    encode_video(shape.frames, Fraction(30000, 1001), clips / "moving-shape.mp4")
    write_video_dataset(str(demo / "datasets" / "videos"),
                        [(name, (clips / f"{name}.mp4").read_bytes()) for name in ("pan", "moving-shape")])

    _check_workers_import_this_tree(cluster, cwd)
    with serve_directory(str(cwd / "web")) as srv:
        _pool_source(str(cwd / "web" / "files"), srv.base_url + "/files", str(demo / "datasets" / "pool-src"))
        norm = Normaliser({str(cwd): "<ROOT>", str(models_root): "<MODELS>", srv.base_url: "<HTTP>"})
        yield cwd, norm


# --- the cases --------------------------------------------------------------------------


def collect_edit(out: Path, norm: Normaliser) -> dict[str, Any]:
    return {"output": digest_dataset(out, norm)}


def collect_pairs(out: Path, norm: Normaliser) -> dict[str, Any]:
    return {"text": digest_dataset(out / "text", norm), "pairs": digest_dataset(out / "pairs", norm)}


def collect_retrieve(out: Path, norm: Normaliser) -> dict[str, Any]:
    record = {"candidates": digest_dataset(out / "candidates", norm, ("id", "parent_id", "rank")),
              "images": digest_dataset(out / "images", norm, ("id", "parent_id", "rank"))}
    export = {}
    for f in sorted((out / "real_reg").rglob("*")):
        if f.is_file():
            export[f.relative_to(out / "real_reg").as_posix()] = norm.text(f.read_text()) \
                if f.suffix == ".txt" else file_sha(f, norm)
    record["real_reg"] = sha(export)
    record["real_reg_files"] = sorted(export)
    return record


def collect_finetune(out: Path, norm: Normaliser) -> dict[str, Any]:
    table = pq.read_table(out / "results.parquet")
    rows = table.to_pylist()
    record: dict[str, Any] = {
        "config_hash": {r["name"]: r["job"] for r in rows},  # the job ids: hashes of each job's config
        "results": digest_table(table, norm, ("job",)),
    }
    files = {}
    for r in rows:
        job = out / "jobs" / r["job"]
        for f in sorted((job / "artifacts").rglob("*")) + sorted((job / "samples").rglob("*.png")):
            if f.is_file():
                files[f.relative_to(out).as_posix()] = file_sha(f, norm)
    record["files"] = files
    class_images = sorted((out / "class_images").glob("*/images"))
    record["class_images"] = [digest_dataset(d, norm) for d in class_images]
    return record


def collect_video(out: Path, norm: Normaliser) -> dict[str, Any]:
    doc = json.loads((out / "config.json").read_text())
    record = hashed_config(doc["config"], doc["config_hash"], norm)
    record["metrics"] = digest_table(pq.read_table(out / "metrics.parquet"), norm)
    files = {}
    for d in sorted((out / "videos").iterdir()):
        for name in ("edit_layer.png", "edited_atlas.png", "edited.mp4"):
            if (d / name).is_file():
                files[f"{d.name}/{name}"] = file_sha(d / name, norm)
        for f in sorted((d / "atlas").rglob("*")) if (d / "atlas").is_dir() else []:
            if f.is_file() and f.suffix in (".png", ".npy", ".npz", ".safetensors"):
                files[f"{d.name}/{f.relative_to(d).as_posix()}"] = file_sha(f, norm)
    record["files"] = files
    return record


def _check_videos(out: Path) -> None:
    """Each edited video has its source's frame count, size and rate (a sanity check, not golden)."""
    from pixelmill.tasks.video.io import probe_video

    for d in (out / "videos").iterdir():
        if (d / "edited.mp4").is_file():
            assert probe_video(d / "edited.mp4").frames >= 2


CASES: dict[str, dict[str, Any]] = {
    "edit-sdedit": dict(
        command="edit", output="pixelmill-demo/datasets/my-sdedit", collect=collect_edit,
        overrides=["steps=4"]),
    "edit-ip2p": dict(
        command="edit", output="pixelmill-demo/datasets/my-ip2p", collect=collect_edit,
        overrides=["steps=3"]),
    "edit-masked-sdedit": dict(
        command="edit", output="pixelmill-demo/datasets/my-masked-sdedit", collect=collect_edit,
        overrides=["steps=4"]),
    "edit-text2live": dict(
        command="edit", output="pixelmill-demo/datasets/my-text2live", collect=collect_edit,
        overrides=["text2live.iterations=3", "text2live.views=2"]),
    "pairs": dict(
        command="pairs", output="pixelmill-demo/datasets/my-pairs", collect=collect_pairs,
        overrides=["images.samples_per_caption=2", "images.steps=3", "images.max_per_caption=2"]),
    "retrieve": dict(
        command="retrieve", output="outputs/regularization", collect=collect_retrieve,
        # the pool is built by the CLI too, in the case's turn (it needs the cluster)
        before=["pool", "build", "pixelmill-demo/datasets/pool-src", "--clip", "pixelmill-demo/models/clip",
                "--out", "pixelmill-demo/datasets/pool"],
        overrides=["pool=pixelmill-demo/datasets/pool",
                   # absolute: the flow reads it on a Ray worker, in another folder
                   "clip_model={cwd}/pixelmill-demo/models/clip", "num_images=3",
                   "resolution=64", "download.allow_loopback=true", "download.timeout=5", "download.retries=0"]),
    "finetune": dict(
        command="finetune", output="pixelmill-demo/my-campaign", collect=collect_finetune,
        overrides=["defaults.max_steps=2", "defaults.checkpoint_every=2",
                   "defaults.num_class_images=2", "grid.settings.learning_rate=[0.001]",
                   "eval.samples_per_prompt=1", "eval.steps=2"]),
    "video-homography": dict(
        command="video", output="pixelmill-demo/my-video-homography", collect=collect_video,
        overrides=["edit.steps=4"]),
    "video-neural": dict(
        command="video", output="pixelmill-demo/my-video-neural", collect=collect_video,
        overrides=["atlas.neural.iterations=100", "atlas.neural.checkpoint_every=50", "edit.text2live.iterations=3"]),
}


# Longest first: the cases run a few at a time, so the slow ones should not start last.
ORDER = ["finetune", "pairs", "retrieve", "video-homography", "edit-sdedit", "edit-ip2p", "edit-masked-sdedit",
         "edit-text2live", "video-neural"]
# CLI runs in flight at once: most of a run is process start-up and imports, which overlap
# well on 2 cores; the Ray head's 2 CPUs queue the actual work.
PARALLEL = 3

_records: dict[str, Any] = {}


def _args(case: str, cwd: Path) -> list[str]:
    spec = CASES[case]
    config = ROOT / "configs" / f"{case}.yaml"
    sets = [a for o in spec["overrides"] for a in ("--set", o.format(cwd=cwd))]
    return [spec["command"], str(config), *sets, "--json"]


def _has_started_writing(out: Path) -> bool:
    """Whether the run has written anything of its own under ``out`` (preflight's probe aside)."""
    if not out.exists():
        return False
    return any(f.is_file() and not f.name.startswith(".pixelmill-probe") for f in out.rglob("*"))


def kill_mid_run(args: list[str], cluster: dict[str, str], cwd: Path, out: Path, delay: float,
                 timeout: float = 600, from_start: bool = False) -> dict[str, Any]:
    """Start ``pixelmill ARGS``, SIGKILL its process group ``delay`` seconds after it starts writing
    (``from_start``: after it starts).

    Returns what happened: ``killed`` (False when the run ended before the kill point),
    ``after`` (seconds from start to the kill), the return code.
    """
    import signal
    import subprocess
    import sys
    import time

    env = {**os.environ, **cluster}
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "pixelmill.cli", *args], env=env, cwd=cwd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        while not from_start and proc.poll() is None and not _has_started_writing(out):
            if time.monotonic() - start > timeout:
                raise TimeoutError(f"{args}: nothing written under {out} within {timeout} s")
            time.sleep(0.05)
        deadline = time.monotonic() + delay
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        killed = proc.poll() is None
        if killed:
            os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return {"killed": killed, "after": round(time.monotonic() - start, 2), "returncode": proc.returncode}


def _run_and_collect(case: str, cwd: Path, cluster: dict[str, str], norm: Normaliser,
                     kill_delay: float | None = None, from_start: bool = False):
    """Run one case through the CLI and collect its record; returns ``(process, record or None, kill)``.

    With ``kill_delay`` the first run is killed (SIGKILL, its whole process group) that many
    seconds after it starts writing, and the command is run again: the record is then the
    resumed run's. ``kill`` says whether the kill landed mid-run and whether the killed
    output was still short of the final one.
    """
    spec = CASES[case]
    out = cwd / spec["output"]
    shutil.rmtree(out, ignore_errors=True)
    kill = None
    if spec.get("before"):
        proc = run_cli(spec["before"], cluster, cwd, 900)
        if proc.returncode != 0:
            return proc, None, kill
    if kill_delay is not None:
        kill = kill_mid_run(_args(case, cwd), cluster, cwd, out, kill_delay, from_start=from_start)
        try:
            kill["partial"] = spec["collect"](out, norm)
        except Exception:  # noqa: BLE001 - a killed output may not be collectable at all
            kill["partial"] = None
    proc = run_cli(_args(case, cwd), cluster, cwd, 900)
    if proc.returncode != 0:
        return proc, None, kill
    if spec["command"] == "video":
        _check_videos(out)
    return proc, spec["collect"](out, norm), kill


# ``make test`` kills every case once, this many seconds after it starts writing (drawn per
# case from a seeded generator), and checks the resumed output against the expected record:
# one golden comparison covers "unchanged output" and "a killed run resumes to the same
# bytes". make_expected.py runs uninterrupted (no kill).
KILL_SEED = 0
MAX_KILL_DELAY = 0.2
# One case per flow is killed under ``make test`` (the four edit cases are one flow: its kill is
# edit-sdedit's); ``make chaos`` kills every case at 10 points. The campaign is the exception: its
# killed-then-resumed CLI run is the suite's longest path (about 150 s of its 30 minutes), and a
# killed job resuming from its checkpoint to the same weights is tested in this suite by
# tests/unit/tasks/test_train.py (in process) and tests/integration/test_object_storage.py (on S3).
KILLED = [c for c in ORDER if (not c.startswith("edit-") or c == "edit-sdedit") and c != "finetune"]


def kill_delay_for(case: str, seed: int, max_delay: float = MAX_KILL_DELAY) -> float:
    import random

    return round(random.Random(f"{case}-{seed}").uniform(0.0, max_delay), 2)


@pytest.fixture(scope="module")
def runs(request, golden, cluster):
    """The selected cases' CLI runs and records, started ``PARALLEL`` at a time once the inputs exist."""
    from concurrent.futures import ThreadPoolExecutor

    cwd, norm = golden
    selected = {item.callspec.params["case"] for item in request.session.items
                if getattr(item, "module", None) is request.module and hasattr(item, "callspec")}
    pool = ThreadPoolExecutor(max_workers=PARALLEL, thread_name_prefix="golden")
    kill = not os.environ.get(WRITE_ENV)
    futures = {case: pool.submit(_run_and_collect, case, cwd, cluster, norm,
                                 kill_delay_for(case, KILL_SEED) if kill and case in KILLED else None)
               for case in ORDER if case in selected}
    try:
        yield futures
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class Expected(dict):
    """The expected record of each case for this machine (see ``load_expected``), and what not to compare.

    ``expected.json`` holds one set of records per machine (``machines``: machine → case →
    record) and, per case, the record paths seen to differ between machines running the
    same code (``machine_dependent``: float and image digests). On a machine with its own
    record a case is compared exactly. On another machine it is compared with a known
    machine's record less those paths, and ``notes`` says so (the test warns); a case never
    recorded on two machines cannot be split that way and is compared exactly (it fails
    on a new machine, naming ``make_expected.py``).
    """

    def __init__(self, records: dict[str, Any], ignored: dict[str, tuple[str, ...]], notes: dict[str, str]):
        super().__init__(records)
        self.ignored, self.notes = ignored, notes

    def differences(self, case: str, record: Any) -> list[str]:
        """``diff_paths`` between the case's expected record and ``record``, less the paths not compared here."""
        skip = self.ignored.get(case, ())
        return [d for d in diff_paths(self[case], record) if not skip or not record_path(d).startswith(skip)]


def record_path(difference: str) -> str:
    """The dotted path of one ``diff_paths`` line."""
    return difference.split(": expected ", 1)[0].split(" (", 1)[0]


def load_expected(doc: dict[str, Any], here: str) -> Expected:
    """This machine's view of ``expected.json`` (see ``Expected``)."""
    machines: dict[str, dict[str, Any]] = doc.get("machines", {})
    dependent: dict[str, list[str]] = doc.get("machine_dependent", {})
    records, ignored, notes = {}, {}, {}
    for case in CASES:
        if case in machines.get(here, {}):
            records[case] = machines[here][case]
            continue
        known = sorted(m for m, cases in machines.items() if case in cases)
        if not known:
            continue
        records[case] = machines[known[0]][case]
        if dependent.get(case):
            ignored[case] = tuple(dependent[case])
            notes[case] = (f"{case}: no record for this machine ({here!r}); compared with {known[0]!r}'s less "
                           f"{len(dependent[case])} machine-dependent paths (float and image digests). Write this "
                           "machine's record from the same code with make_expected.py to compare every value.")
        else:
            notes[case] = (f"{case}: recorded only on {', '.join(map(repr, known))}, never on two machines, so its "
                           f"machine-dependent values are not known; this is {here!r}: if only image and float "
                           "digests differ, write this machine's record from the same code with make_expected.py")
    return Expected(records, ignored, notes)


@pytest.fixture(scope="module")
def expected() -> dict[str, Any]:
    """The expected records; in write mode, collects the records and writes them at the end."""
    target = os.environ.get(WRITE_ENV)
    if not target:
        assert EXPECTED.is_file(), f"{EXPECTED} is missing; see make_expected.py"
        yield load_expected(json.loads(EXPECTED.read_text()), machine())
        return
    _records.clear()
    yield {}
    doc = {"_machine": machine(),
           "_about": "written by tests/golden/make_expected.py from the pre-restructure code; "
                     "see tests/golden/test_golden.py for what each record holds",
           **{k: _records[k] for k in CASES if k in _records}}
    Path(target).write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")


def machine() -> str:
    """What float results depend on: the CPU model, torch's kernel set for it, torch's version.

    Image bytes and float columns are compared bit for bit, and CPUs of another model (or
    another SIMD capability) round differently: on another machine the expected values must
    be written again from the reference code (``make_expected.py``), and a failure says so.
    """
    import platform

    import torch

    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                 platform.processor())
    return f"{platform.machine()} {model} / torch {torch.__version__} {torch.backends.cpu.get_cpu_capability()}"


def test_every_case_is_an_example_config():
    """The cases are the example configs that existed when the expected values were made
    (configs added since have no pre-change values to compare with)."""
    assert sorted(CASES) == sorted(ORDER)
    assert set(CASES) <= {p.stem for p in (ROOT / "configs").glob("*.yaml")}


@pytest.mark.parametrize("case", ORDER)
def test_example_config_output_is_unchanged(case, golden, runs, expected):
    """Each example, killed once mid-run and run again, writes exactly the expected output."""
    cwd, _ = golden
    proc, record, kill = runs[case].result()
    assert proc.returncode == 0, f"{case}: {' '.join(map(str, proc.args))}\n{proc.stderr[-5000:]}"
    if os.environ.get(WRITE_ENV):
        _records[case] = record
        return
    assert case in expected, f"no expected record for {case}; regenerate with make_expected.py"
    differences = expected.differences(case, record)
    where = f"\n({expected.notes[case]})" if case in expected.notes else ""
    assert not differences, (f"{case}: output differs from the reference code's:\n  "
                             + "\n  ".join(differences[:40]) + where)
    if case in expected.ignored:
        warnings.warn(expected.notes[case], stacklevel=1)
    if case not in KILLED:
        return
    assert kill["killed"] and kill["returncode"] == -9, f"{case}: the run ended before the kill point: {kill}"
    if CASES[case]["command"] != "edit":
        # the edit cases are 4 rows: their last shards can commit within the kill delay, so a
        # killed-mid-shard edit is tested by tests/chaos/test_interrupted_edit.py instead
        assert kill["partial"] != expected[case], f"{case}: the killed run had already written everything: {kill}"
