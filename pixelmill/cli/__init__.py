"""pixelmill's command line: one subcommand per flow, plus ``run`` (chained pipelines), demo,
server, report, dataset, pool and models.

Exit status: 0 success, 1 the run failed, 2 bad input (config, paths, or an existing
output made with another config). The checks that run before a flow starts are the
configs' ``preflight()`` (``pixelmill.config.preflight``); ``commands.py`` holds the commands.
"""

from __future__ import annotations

import argparse
import sys

from pixelmill.cli.commands import (
    UsageError,
    cmd_dataset_compact,
    cmd_dataset_import,
    cmd_dataset_info,
    cmd_demo,
    cmd_edit,
    cmd_finetune,
    cmd_models_make_tiny,
    cmd_pairs,
    cmd_pool_build,
    cmd_pool_index,
    cmd_pool_norms,
    cmd_report,
    cmd_retrieve,
    cmd_run,
    cmd_server,
    cmd_video,
    flow_runtime,
)
from pixelmill.config import ConfigError

__all__ = ["UsageError", "build_parser", "flow_runtime", "main"]
from pixelmill.runtime import apply_quiet_defaults


def _add_runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ray-address", default=None,
                   help="existing Ray cluster (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--home", default=None,
                   help="folder for the embedded Prefect database and logs (default: $PIXELMILL_HOME or ./.pixelmill)")


def _add_flow_args(p: argparse.ArgumentParser, limit_help: str = "only the first N input rows") -> None:
    p.add_argument("config", help="YAML config file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (dotted keys for nested ones); repeatable")
    p.add_argument("--dry-run", action="store_true", help="print the plan (shards to run and to skip) and exit")
    p.add_argument("--limit", type=int, default=None, metavar="N", help=limit_help)
    p.add_argument("--overwrite", action="store_true", help="replace an output made with another config")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    _add_runtime_args(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pixelmill",
        description="Distributed batch pipelines for diffusion-based image editing "
                    "(Prefect flows, Ray workers, Parquet datasets).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    from pixelmill import registry

    methods = ", ".join(registry.names("edit"))
    p = sub.add_parser("edit", help=f"bulk-edit an image dataset with a registered editing method ({methods})",
                       description="Bulk-edit an image dataset (SDEdit, masked SDEdit, InstructPix2Pix or "
                                   "Text2Live). Examples: configs/edit-sdedit.yaml, configs/edit-ip2p.yaml, "
                                   "configs/edit-masked-sdedit.yaml, configs/edit-text2live.yaml.")
    _add_flow_args(p)
    p.add_argument("--retry-rejects", action="store_true",
                   help="edit rejected ids again (otherwise a reject counts as processed)")
    p.set_defaults(func=cmd_edit)

    p = sub.add_parser("retrieve", help="retrieve exactly N real images per class prompt from a pool",
                       description="Regularization retrieval (Custom Diffusion): pool rows whose CLIP similarity "
                                   "to each class prompt is above the threshold, downloaded until exactly N per "
                                   "prompt. Example: configs/retrieve.yaml.")
    _add_flow_args(p)
    p.set_defaults(func=cmd_retrieve)

    p = sub.add_parser("finetune", help="run a fine-tuning campaign (or `finetune status CAMPAIGN.yaml`)",
                       usage="pixelmill finetune [status] CAMPAIGN.yaml [options]",
                       description="Fine-tuning campaign: Textual Inversion, DreamBooth, LoRA, Custom Diffusion and "
                                   "InstructPix2Pix jobs, listed or expanded from a grid, one Prefect task per job "
                                   "on Ray. `pixelmill finetune status CAMPAIGN.yaml` shows each job's state. "
                                   "Example: configs/finetune.yaml.")
    _add_flow_args(p, limit_help="only the first N jobs")
    p.add_argument("status_config", nargs="?", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("pool", help="build, index or prepare a retrieval pool")
    psub = p.add_subparsers(dest="pool_command", metavar="ACTION", required=True)
    q = psub.add_parser("build", help="embed a dataset's captions and/or images with open_clip into a pool",
                        description="Embed a pixelmill dataset with open_clip into a pool (Parquet layout), "
                                    "as a Ray Data pipeline.")
    q.add_argument("dataset", help="input dataset (needs `caption` and/or `image` and `url` columns)")
    q.add_argument("--clip", required=True, help="open_clip model: local folder, hf-hub:..., or ARCH/PRETRAINED")
    q.add_argument("--out", required=True, help="pool folder or URL to write")
    q.add_argument("--caption-column", default="caption")
    q.add_argument("--image-column", default="image", help="'' to embed captions only")
    q.add_argument("--batch-size", type=int, default=64)
    q.add_argument("--overwrite", action="store_true")
    q.add_argument("--stall-timeout", type=float, default=1800.0, metavar="SECONDS",
                   help="end a call that embeds no batch for this long and retry its shard (0: off; default 1800)")
    q.add_argument("--attempts", type=int, default=2,
                   help="calls a shard gets before its rows become rejects naming why (default 2)")
    _add_runtime_args(q)
    q.set_defaults(func=cmd_pool_build)
    q = psub.add_parser("index", help="build a faiss index (IVF or HNSW, inner product) and print its recall",
                        description="Build a faiss inner-product index over a pool's normalised embeddings for "
                                    "pools too large to scan; prints recall against the exact scan on a sample.")
    q.add_argument("pool")
    q.add_argument("--out", required=True, help="index folder or URL")
    q.add_argument("--kind", choices=["text", "image"], default="text")
    q.add_argument("--type", dest="index_type", choices=["ivf", "hnsw"], default="ivf")
    q.add_argument("--nlist", type=int, default=None, help="IVF lists (default: about 4*sqrt(rows))")
    q.add_argument("--nprobe", type=int, default=16)
    q.add_argument("--threshold", type=float, default=0.85, help="threshold used for the recall check")
    q.set_defaults(func=cmd_pool_index)
    q = psub.add_parser("norms", help="store each embedding row's norm beside a LAION-layout pool (faster scans)",
                        description="Compute every embedding row's norm once, exactly as the scan would, into "
                                    "POOL/norms/. Scans of many prompts then read them instead of computing them "
                                    "(about 1.15x faster at 64 prompts); a stale file is detected and ignored.")
    q.add_argument("pool")
    q.add_argument("--kind", choices=["text", "image"], action="append",
                   help="embedding kind (repeatable; default: every kind the pool has)")
    q.add_argument("--overwrite", action="store_true", help="recompute parts whose norms look up to date")
    q.set_defaults(func=cmd_pool_norms)

    p = sub.add_parser("pairs", help="generate instruction-edit image pairs (InstructPix2Pix's dataset pipeline)",
                       description="Captions -> (instruction, edited caption) by a writer -> Prompt-to-Prompt "
                                   "before/after images from K seeds -> CLIP filter. Example: configs/pairs.yaml.")
    _add_flow_args(p)
    p.set_defaults(func=cmd_pairs)

    p = sub.add_parser("video", help="edit videos through layered atlases (homography or neural, Text2Live-style)",
                       description="Edit every video of a dataset (a video column of paths or bytes, or a folder "
                                   "of video files) through a layered atlas: build a homography atlas or train a "
                                   "neural one, edit an atlas layer with SDEdit, InstructPix2Pix or Text2Live, "
                                   "render the edit through every frame, encode an MP4 with the source's frame "
                                   "count, size and rate. One Prefect job per video on Ray; metrics.parquet and "
                                   "report.html under `output`. Examples: configs/video-homography.yaml, "
                                   "configs/video-neural.yaml.")
    _add_flow_args(p)
    p.set_defaults(func=cmd_video)

    p = sub.add_parser("run", help="run a pipeline: several flows chained into one Prefect flow",
                       description="Run the steps of a pipeline config (each step a pixelmill flow: "
                                   f"{', '.join(registry.names('pipeline'))}) as ONE Prefect flow, each step a "
                                   "subflow, Parquet datasets between them; a step's config may name an earlier "
                                   "step's output as ${steps.NAME.output}. Examples: configs/pipeline-*.yaml.")
    _add_flow_args(p, limit_help="only the first N input rows of every step")
    p.set_defaults(func=cmd_run)

    from pixelmill.cli.deploy import add_parsers as add_deploy_parsers

    add_deploy_parsers(sub)  # deploy, serve

    p = sub.add_parser("demo", help="run every pipeline on toy-world images with the trained toy models",
                       description="Write toy-world images (one broken row), start the embedded runtime, run "
                                   "SDEdit, instruction pairs, retrieval, a fine-tuning campaign and video edits on "
                                   "toy:sd and toy:clip (InstructPix2Pix on toy:ip2p), write "
                                   "the reports.")
    p.add_argument("--out", default="pixelmill-demo", help="demo folder (default: ./pixelmill-demo)")
    p.add_argument("--ray-address", default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("server", help="start the Prefect API server and UI in the foreground",
                       description="Start the Prefect server (UI included) on the same SQLite database "
                                   "the embedded runtime uses, to browse past runs.")
    p.add_argument("--home", default=None, help="pixelmill home folder (default: $PIXELMILL_HOME or ./.pixelmill)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=4200)
    p.add_argument("--ray", action="store_true",
                   help="also host a local Ray that this home's commands join instead of starting their own "
                        "(saves ~4 s per command); their Ray workers then see this server's environment "
                        "(storage credentials, HF_HOME), as a cluster node's workers see that node's")
    p.add_argument("--ray-cpus", type=int, default=None, metavar="N", help="CPUs of that Ray (default: all)")
    p.set_defaults(func=cmd_server)

    p = sub.add_parser("report", help="write an HTML contact sheet of a dataset",
                       description="HTML contact sheet: image columns side by side with the metrics; "
                                   "any pixelmill dataset.")
    p.add_argument("dataset", help="dataset folder or URL")
    p.add_argument("--out", default=None, help="HTML file (default: DATASET/report.html)")
    p.add_argument("--limit", type=int, default=200, help="rows to show (default 200)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("dataset", help="dataset tools")
    dsub = p.add_subparsers(dest="dataset_command", metavar="ACTION", required=True)
    q = dsub.add_parser("import", help="import a folder of images (captions from .txt files or a CSV)",
                        description="Import a folder of images into a pixelmill dataset. Captions come from "
                                    "same-named .txt files, or captions.csv / metadata.csv (file_name, caption).")
    q.add_argument("dir", help="folder of images")
    q.add_argument("--out", required=True, help="dataset folder or URL to write")
    q.add_argument("--overwrite", action="store_true")
    q.set_defaults(func=cmd_dataset_import)
    from pixelmill.toy.cli import add_dataset_toy_parser

    add_dataset_toy_parser(dsub)
    q = dsub.add_parser("compact", help="merge a dataset's small shards into fewer (ids and rows unchanged)",
                        description="Merge the many small shards incremental runs append into shards of about "
                                    "--rows rows: manifest switched atomically, processed table kept consistent. "
                                    "Refused while a run holds a live claim on the dataset.")
    q.add_argument("dataset", help="dataset folder or URL")
    q.add_argument("--rows", type=int, default=10_000, help="target rows per shard (default 10000)")
    q.set_defaults(func=cmd_dataset_compact)
    q = dsub.add_parser("info", help="print a dataset's manifest summary")
    q.add_argument("dataset")
    q.set_defaults(func=cmd_dataset_info)

    p = sub.add_parser("models", help="model tools")
    msub = p.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    q = msub.add_parser("make-tiny", help="save tiny random-weight pipelines (for tests and the demo)",
                        description="Save tiny random-weight pipelines (img2img, InstructPix2Pix, CLIP) to disk, "
                                    "so configs name them by path exactly as they name a real checkpoint.")
    q.add_argument("--out", required=True, help="folder to write")
    q.set_defaults(func=cmd_models_make_tiny)
    return parser


def main(argv: list[str] | None = None) -> int:
    apply_quiet_defaults()
    parser = build_parser()
    args = parser.parse_args(argv)
    from pixelmill.datasets.errors import InputError
    from pixelmill.datasets.storage import StorageUnavailable

    try:
        return args.func(args) or 0
    except (UsageError, ConfigError, StorageUnavailable, InputError) as e:
        print(f"pixelmill: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and closed early (before OSError: it is one)
        return 0
    except OSError as e:  # storage: a full disk, a read-only or failing filesystem, permissions
        where = f": {e.filename}" if e.filename else ""
        print(f"pixelmill: error: {args.command} failed: {e.strerror or e}{where}", file=sys.stderr)
        _resume_hint(args.command)
        return 1
    except Exception as e:  # noqa: BLE001 - the traceback helps; the last line says what failed
        lost = _lost_prefect_api(e)
        if lost:
            # a new line first: Prefect's log shipper ends its own complaint without one
            print(f"\npixelmill: error: {args.command} failed: lost the Prefect API at {lost} ({e})", file=sys.stderr)
            _resume_hint(args.command)
            return 1
        import traceback

        traceback.print_exc()
        print(f"pixelmill: error: {args.command} failed: {type(e).__name__}: {e}", file=sys.stderr)
        _resume_hint(args.command)
        return 1
    except KeyboardInterrupt as e:
        from pixelmill.cli.cancel import RunCancelled

        print(f"\npixelmill: {e}" if isinstance(e, RunCancelled) else "\ninterrupted", file=sys.stderr)
        _resume_hint(args.command)
        return getattr(e, "exit_status", 130)


def run() -> None:
    """The console script: ``main`` then a process exit that skips native static destructors.

    Python-level shutdown still happens in order (non-daemon threads joined, ``atexit``
    handlers such as Ray's and Prefect's run, output flushed); only the C++ teardown is
    skipped. pyarrow's thread pool can race the interpreter's exit there and abort the
    process ("terminate called without an active exception", exit -6) after the command
    had already finished, which turned a clean exit 2 into a crash under load.
    """
    import atexit
    import os
    import threading

    try:
        code = main()
    except SystemExit as e:  # argparse's --help and usage errors
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    try:
        threading._shutdown()  # what the interpreter does first at exit: join non-daemon threads
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def _lost_prefect_api(exc: BaseException) -> str | None:
    """The Prefect API URL when ``exc`` (or its cause) is a failed connection to it, else None."""
    import os

    url = os.environ.get("PREFECT_API_URL")
    seen = 0
    while exc is not None and seen < 10:
        if type(exc).__module__.startswith(("httpx", "httpcore")) and "Connect" in type(exc).__name__:
            return url or "(unknown URL)"
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


# Commands that keep committed shards (jobs, videos, steps) and resume from them on a rerun.
RESUMABLE = {"edit", "retrieve", "pairs", "finetune", "video", "run", "pool"}


def _resume_hint(command: str) -> None:
    if command in RESUMABLE:
        print("Nothing half-written is visible: committed shards are kept; "
              "rerun the same command to resume.", file=sys.stderr)


