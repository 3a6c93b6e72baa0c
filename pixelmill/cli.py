"""pixelmill's command line: one subcommand per flow, plus demo, server, report, dataset and models.

Exit status: 0 success, 1 the run failed, 2 bad input (config, paths, or an existing
output made with another config).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pixelmill.config import ConfigError, EditConfig, load_config
from pixelmill.runtime import apply_quiet_defaults, default_home


class UsageError(Exception):
    """Bad input: printed without a traceback, exit status 2."""


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

    p = sub.add_parser("edit", help="bulk-edit an image dataset with SDEdit, InstructPix2Pix or Text2Live",
                       description="Bulk-edit an image dataset (SDEdit, masked SDEdit, InstructPix2Pix or "
                                   "Text2Live). Examples: configs/edit-sdedit.yaml, configs/edit-ip2p.yaml, "
                                   "configs/edit-masked-sdedit.yaml, configs/edit-text2live.yaml.")
    _add_flow_args(p)
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

    p = sub.add_parser("pool", help="build or index a retrieval pool")
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

    p = sub.add_parser("demo", help="run every pipeline on drawn sample images with tiny offline models",
                       description="Draw sample images, build tiny models, start the embedded runtime, "
                                   "run the bulk-edit flow with SDEdit and InstructPix2Pix, write a report.")
    p.add_argument("--out", default="pixelmill-demo", help="demo folder (default: ./pixelmill-demo)")
    p.add_argument("--ray-address", default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("server", help="start the Prefect API server and UI in the foreground",
                       description="Start the Prefect server (UI included) on the same SQLite database "
                                   "the embedded runtime uses, to browse past runs.")
    p.add_argument("--home", default=None, help="pixelmill home folder (default: $PIXELMILL_HOME or ./.pixelmill)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=4200)
    p.set_defaults(func=cmd_server)

    p = sub.add_parser("report", help="write an HTML contact sheet of a dataset",
                       description="HTML contact sheet: image columns side by side with the metrics; any pixelmill dataset.")
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


def load_flow_config(model, path: str, args):
    """A flow's config from YAML with ``--set`` overrides and ``--limit``; exit 2 naming the field if bad."""
    overrides = list(args.overrides) + ([f"limit={args.limit}"] if args.limit is not None else [])
    try:
        return load_config(model, path, overrides)
    except ConfigError as e:
        raise UsageError(str(e)) from None


def _check_model_path(field: str, value: str | None, kind: str) -> None:
    from pixelmill.models.loading import ModelNotFound, check_model_reference

    if value is None:
        return
    try:
        check_model_reference(value, kind)
    except ModelNotFound as e:
        raise UsageError(f"{field}: {e}") from None


def absolute_paths(cfg: EditConfig) -> EditConfig:
    """Make relative local paths absolute: Ray workers run in another folder. URLs and hub ids stay."""
    from pixelmill.models.loading import looks_local

    def local(value: str | None, is_model: bool) -> str | None:
        if value is None or "://" in value or value.startswith(("hf-hub:", "local-dir:")):
            return value
        if is_model and not looks_local(value):
            return value
        return str(Path(value).expanduser().resolve())

    update = {
        "input": local(cfg.input, False), "output": local(cfg.output, False),
        "model": local(cfg.model, True), "clip_model": local(cfg.clip_model, True),
    }
    if cfg.adapters:
        update["adapters"] = resolved_adapters("adapters", cfg.adapters)
    t2l = getattr(cfg, "text2live", None)
    if t2l is not None:
        update["text2live"] = t2l.model_copy(update={"structure_model": local(t2l.structure_model, True),
                                                     "structure_weights": local(t2l.structure_weights, False)})
    return cfg.model_copy(update=update)


def resolved_adapters(field: str, adapters: list) -> list:
    """Adapters with absolute paths, each checked to hold adapter files (exit 2 otherwise)."""
    from pixelmill.models.adapters import AdapterError, adapter_kind

    out = []
    for i, a in enumerate(adapters):
        a = a.model_copy(update={"path": _local_url(a.path)})
        try:
            adapter_kind(a.path, a.kind)
        except AdapterError as e:
            raise UsageError(f"{field}[{i}]: {e}") from None
        out.append(a)
    if sum(adapter_kind(a.path, a.kind) == "custom_diffusion" for a in out) > 1:
        raise UsageError(f"{field}: only one custom_diffusion adapter per pipeline (train the concepts jointly)")
    return out


def check_input_columns(cfg: EditConfig, names: list[str]) -> EditConfig:
    """Every column the config names must be in the input; the default caption column is optional."""
    from pixelmill.tasks.edit import template_fields

    if cfg.caption_column and cfg.caption_column not in names and "caption_column" not in cfg.model_fields_set:
        cfg = cfg.model_copy(update={"caption_column": None})
    wanted = {"image_column": [cfg.image_column], "caption_column": [cfg.caption_column],
              "prompt_column": [cfg.prompt_column], "instruction_column": [cfg.instruction_column],
              "prompt": template_fields(cfg.prompt), "instruction": template_fields(cfg.instruction),
              "mask_column": [cfg.mask_column], "stroke_column": [cfg.stroke_column]}
    for key, columns in wanted.items():
        for col in columns:
            if col and col not in names:
                raise UsageError(f"{key}: column {col!r} is not in the input (columns: {', '.join(names)})")
    return cfg


def prepare_edit(args) -> EditConfig:
    """Validate the config and its inputs before anything starts (no Ray, no server)."""
    from pixelmill.datasets import Dataset, DatasetNotFound

    cfg = load_flow_config(EditConfig, args.config, args)
    cfg = absolute_paths(cfg)
    try:
        schema = Dataset.open(cfg.input).schema
    except DatasetNotFound as e:
        raise UsageError(f"input: {e}") from None
    cfg = check_input_columns(cfg, schema.names)
    _check_model_path("model", cfg.model, "pipeline")
    _check_model_path("clip_model", cfg.clip_model, "clip")
    t2l = getattr(cfg, "text2live", None)
    if t2l is not None:
        _check_model_path("text2live.structure_model", t2l.structure_model, "folder")
        _check_model_path("text2live.structure_weights", t2l.structure_weights, "folder")
    check_output_config(cfg.output, cfg.output_affecting(), args)
    return cfg


def cmd_edit(args) -> int:
    cfg = prepare_edit(args)
    from pixelmill.flows.common import plan_shards

    plan = plan_shards(cfg.model_dump(), cfg.output_affecting())
    if args.dry_run:
        print(f"bulk-edit {cfg.method}: {cfg.input} -> {cfg.output}")
        print(plan.describe())
        return 0
    summary = run_edit(cfg, args)
    print_summary(summary, args.json)
    return 0


def flow_runtime(args, runtime_cfg=None):
    """The Runtime for a command: ``--ray-address``/``--home`` first, then the config's ``runtime``."""
    from pixelmill.config import RuntimeConfig
    from pixelmill.runtime import Runtime

    rc = runtime_cfg or RuntimeConfig()
    home = Path(args.home).resolve() if getattr(args, "home", None) else default_home()
    return Runtime(ray_address=getattr(args, "ray_address", None) or rc.ray_address,
                   prefect_api_url=rc.prefect_api_url, home=home, num_cpus=rc.num_cpus)


def run_edit(cfg: EditConfig, args, show_progress: bool = True):
    """Start the runtime and run the bulk-edit flow."""
    with flow_runtime(args, cfg.runtime):
        from pixelmill.flows.bulk_edit import bulk_edit_flow

        return bulk_edit_flow(cfg.model_dump(), show_progress=show_progress)


def print_summary(summary, as_json: bool = False) -> None:
    data = {
        "output": summary.output,
        "rows_in": summary.rows_in,
        "rows_out": summary.rows_out,
        "rejects": summary.rejects,
        "shards_run": summary.shards_run,
        "shards_skipped": summary.shards_skipped,
        "seconds": round(summary.seconds, 3),
        "images_per_second": round(summary.images_per_second, 4),
        "worker": summary.worker,
    }
    if as_json:
        print(json.dumps(data))
        return
    if not summary.shards_run:
        print(f"nothing to do: {len(summary.shards_skipped)} shard(s) already committed in {summary.output}")
        return
    print(f"done: {summary.rows_in} rows in -> {summary.rows_out} edited + {summary.rejects} rejected "
          f"({len(summary.shards_run)} shard(s) run, {len(summary.shards_skipped)} skipped) "
          f"in {summary.seconds:.1f}s, {summary.images_per_second:.2f} images/s")
    print(f"output: {summary.output}")


def prepare_retrieve(args):
    """Validate a retrieval config and its pool before anything starts."""
    from pixelmill.config import RetrieveConfig
    from pixelmill.tasks.regularization import check_retrieve_inputs

    cfg = load_flow_config(RetrieveConfig, args.config, args)
    cfg = cfg.model_copy(update={
        "pool": _local_url(cfg.pool), "output": _local_url(cfg.output),
        "index": _local_url(cfg.index) if cfg.index else None,
    })
    try:
        cfg = check_retrieve_inputs(cfg)
    except ValueError as e:
        raise UsageError(str(e)) from None
    from pixelmill.datasets.storage import join

    check_output_config(join(cfg.output, "images"), cfg.output_affecting(), args, remove_url=cfg.output)
    return cfg


def _local_url(value: str) -> str:
    return value if "://" in value else str(Path(value).expanduser().resolve())


def cmd_retrieve(args) -> int:
    cfg = prepare_retrieve(args)
    from pixelmill.flows.retrieve import plan_retrieval

    plan = plan_retrieval(cfg)
    if args.dry_run:
        print(f"retrieve {cfg.num_images} per prompt above {cfg.threshold} from {cfg.pool} -> {cfg.output}")
        print(plan.describe())
        return 0

    with flow_runtime(args, cfg.runtime):
        from pixelmill.flows.retrieve import retrieve_flow

        summary = retrieve_flow(cfg.model_dump())
    print_retrieve_summary(summary, cfg.num_images, args.json)
    return 0


def prepare_finetune(config_path: str, args):
    """Load and check a campaign before anything starts: config, paths, models, datasets, tokens."""
    from pixelmill.config import CampaignConfig
    from pixelmill.flows.campaign import check_campaign_inputs

    cfg = load_flow_config(CampaignConfig, config_path, args)
    model_local = _local_url_if_path
    concepts = {
        name: c.model_copy(update={
            "instance_data": _local_url(c.instance_data),
            "class_data": _local_url(c.class_data) if c.class_data and c.class_data != "retrieval" else c.class_data,
        }) for name, c in cfg.concepts.items()
    }
    jobs = [j.model_copy(update={"model": model_local(j.model) if j.model else None}) for j in cfg.jobs]
    retrieve = dict(cfg.retrieve) if cfg.retrieve else None
    if retrieve and "pool" in retrieve:
        retrieve["pool"] = _local_url(retrieve["pool"])
    cfg = cfg.model_copy(update={"output": _local_url(cfg.output), "model": model_local(cfg.model),
                                 "clip_model": model_local(cfg.clip_model) if cfg.clip_model else None,
                                 "concepts": concepts, "jobs": jobs, "retrieve": retrieve})
    try:
        cfg = CampaignConfig.model_validate(cfg.model_dump())
        cfg.expand()
    except (ConfigError, ValueError) as e:
        raise UsageError(str(e)) from None
    for model in sorted({cfg.model, *(j.model for j in cfg.jobs if j.model)}):
        _check_model_path("model", model, "pipeline")
    _check_model_path("clip_model", cfg.clip_model, "clip")
    if retrieve:
        from pydantic import ValidationError

        from pixelmill.config import RetrieveConfig, format_validation_error
        from pixelmill.flows.campaign import retrieve_config
        from pixelmill.tasks.regularization import check_retrieve_inputs

        try:
            rc = check_retrieve_inputs(RetrieveConfig.model_validate(retrieve_config(cfg)))
        except ValidationError as e:
            raise UsageError("retrieve: " + format_validation_error(e)) from None
        except ValueError as e:
            raise UsageError(f"retrieve: {e}") from None
        cfg = cfg.model_copy(update={"retrieve": rc.model_dump(exclude={"output", "runtime"})})
    try:
        check_campaign_inputs(cfg)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return cfg


def cmd_finetune(args) -> int:
    if args.config == "status":
        if not args.status_config:
            raise UsageError("usage: pixelmill finetune status CAMPAIGN.yaml")
        return finetune_status(args.status_config, args)
    if args.status_config:
        raise UsageError(f"unexpected argument {args.status_config!r} (did you mean `finetune status`?)")
    cfg = prepare_finetune(args.config, args)
    from pixelmill.flows.campaign import plan_campaign

    plan = plan_campaign(cfg)
    if args.dry_run:
        print(f"campaign -> {cfg.output}")
        print(plan.describe())
        return 0
    if args.overwrite:
        from pixelmill.datasets import storage

        for j in plan.jobs:
            storage.remove(j.spec["dir"])
    with flow_runtime(args, cfg.runtime):
        import ray

        have = float(ray.cluster_resources().get("GPU", 0))
        for j in plan.jobs:
            s = j.spec["settings"]
            if j.action != "skip" and s["num_gpus"] > have:
                raise UsageError(f"job {j.spec['name']!r} asks for num_gpus={s['num_gpus']}, but the Ray cluster "
                                 f"has {have:g} GPU(s); it would wait forever (set num_gpus: 0 to train on CPU)")
        from pixelmill.flows.finetune import finetune_flow

        summary = finetune_flow(cfg.model_dump())
    data = {"output": summary.output, "ran": summary.ran, "skipped": summary.skipped, "failed": summary.failed,
            "class_images": summary.class_images, "results": summary.results, "report": summary.report,
            "seconds": round(summary.seconds, 3)}
    if args.json:
        print(json.dumps(data))
    else:
        print(f"done: {len(summary.ran)} job(s) trained, {len(summary.skipped)} skipped (finished), "
              f"{len(summary.failed)} failed in {summary.seconds:.1f}s")
        for name, err in summary.failed.items():
            print(f"  FAILED {name}: {err}")
        print(f"results: {summary.results}\nreport:  {summary.report}")
    return 1 if summary.failed else 0


def finetune_status(config_path: str, args) -> int:
    """Print each job's state without starting anything."""
    from pixelmill.flows.campaign import plan_campaign
    from pixelmill.tasks.train.results import result_row

    cfg = prepare_finetune(config_path, args)
    plan = plan_campaign(cfg)
    rows = []
    for j in plan.jobs:
        r = result_row(j.spec)
        state = {"finished": "finished", "resume": "interrupted" if r["status"] == "running" else "resumable",
                 "retry": "failed", "new": "not started"}[j.state]
        if j.state == "resume" and r["status"] == "finished":
            state = "extend"  # finished, max_steps raised
        rows.append({**r, "state": state})
    if args.json:
        print(json.dumps([{k: r[k] for k in ("job", "name", "method", "state", "step", "max_steps", "final_loss",
                                             "clip_text_alignment", "clip_image_alignment", "error")} for r in rows]))
        return 0
    print(f"campaign {cfg.output}: {len(rows)} job(s)")
    w = min(60, max([4] + [len(r["name"]) for r in rows]))
    print(f"  {'job':<12} {'name':<{w}} {'method':<18} {'state':<12} {'step':>11} {'loss':>8}  clip text/image")
    for r in rows:
        clip = ("—" if r["clip_text_alignment"] is None
                else f"{r['clip_text_alignment']:.3f}/{r['clip_image_alignment']:.3f}")
        loss = f"{r['final_loss']:.4f}" if r["final_loss"] is not None else "—"
        name = r["name"] if len(r["name"]) <= w else r["name"][: w - 1] + "…"
        print(f"  {r['job']:<12} {name:<{w}} {r['method']:<18} {r['state']:<12} "
              f"{str(r['step']) + '/' + str(r['max_steps']):>11} {loss:>8}  {clip}")
        if r["error"]:
            print(f"      error: {r['error']}")
    return 0


def print_retrieve_summary(summary, n: int, as_json: bool = False) -> None:
    if as_json:
        print(json.dumps({"output": summary.output, "prompts": summary.prompts, "skipped": summary.skipped,
                          "exported": summary.exported, "seconds": round(summary.seconds, 3)}))
        return
    if not summary.prompts:
        print(f"nothing to do: {len(summary.skipped)} prompt(s) already complete in {summary.output}")
    for pid, s in summary.prompts.items():
        line = (f"{s['prompt']!r}: {s['found']} candidates above threshold, {s['downloaded']} downloaded, "
                f"{s['failed']} failed, {s['dropped']} dropped")
        if s["shortfall"]:
            line += f"  SHORTFALL: needed {n}, got {s['downloaded']} (candidates ran out; not padded)"
        print(line)
    for prompt, folder in summary.exported.items():
        print(f"real prior for {prompt!r}: {folder}")
    print(f"output: {summary.output}  ({summary.seconds:.1f}s)")


def cmd_pool_build(args) -> int:

    _check_model_path("--clip", args.clip, "clip")
    with flow_runtime(args):
        from pixelmill.flows.pool import build_pool_flow

        summary = build_pool_flow(
            dataset=_local_url(args.dataset), out=_local_url(args.out), clip_model=_local_url_if_path(args.clip),
            caption_column=args.caption_column or None, image_column=args.image_column or None,
            batch_size=args.batch_size, overwrite=args.overwrite,
        )
    print(f"pool: {summary['rows']} rows embedded ({summary['rejects']} rejected) into {args.out}")
    return 0


def _local_url_if_path(value: str) -> str:
    from pixelmill.models.loading import looks_local

    return _local_url(value) if looks_local(value) and not value.startswith(("local-dir:", "hf-hub:")) else value


def cmd_pool_index(args) -> int:
    from pixelmill.tasks.regularization import build_index_and_report

    print(build_index_and_report(_local_url(args.pool), _local_url(args.out), kind=args.kind,
                                 index_type=args.index_type, nlist=args.nlist, nprobe=args.nprobe,
                                 threshold=args.threshold))
    return 0


def check_output_config(url: str, hashed: dict, args, remove_url: str | None = None) -> None:
    """Exit 2 naming the changed keys when ``url`` was made with another config.

    With ``--overwrite`` the old output (``remove_url``, default ``url``) is removed instead.
    """
    from pixelmill.datasets import config_hash, diff_config, read_manifest

    existing = read_manifest(url)
    if existing is None or existing.config_hash == config_hash(hashed):
        return
    changed = diff_config(existing.config, hashed)
    if not args.overwrite:
        raise UsageError(f"output {url} was made with another config (changed: {', '.join(changed) or 'unknown'}); "
                         "use a new output or --overwrite")
    if not args.dry_run:
        from pixelmill.datasets.storage import remove

        remove(remove_url or url)


def prepare_pairs(args):
    """Validate a pairs config and its inputs before anything starts."""
    from pixelmill.config import PairsConfig
    from pixelmill.datasets import Dataset, DatasetNotFound

    cfg = load_flow_config(PairsConfig, args.config, args)
    images = cfg.images.model_copy(update={"model": _local_url_if_path(cfg.images.model),
                                           "clip_model": _local_url_if_path(cfg.images.clip_model),
                                           "adapters": resolved_adapters("images.adapters", cfg.images.adapters)})
    options = dict(cfg.text.options)
    if cfg.text.writer == "transformers" and isinstance(options.get("model"), str):
        options["model"] = _local_url_if_path(options["model"])
    if isinstance(options.get("few_shot_file"), str):
        options["few_shot_file"] = _local_url(options["few_shot_file"])
    cfg = cfg.model_copy(update={"input": _local_url(cfg.input), "output": _local_url(cfg.output), "images": images,
                                 "text": cfg.text.model_copy(update={"options": options})})
    try:
        names = Dataset.open(cfg.input).schema.names
    except DatasetNotFound as e:
        raise UsageError(f"input: {e}") from None
    if cfg.caption_column not in names:
        raise UsageError(f"caption_column: column {cfg.caption_column!r} is not in the input "
                         f"(columns: {', '.join(names)})")
    _check_model_path("images.model", cfg.images.model, "pipeline")
    _check_model_path("images.clip_model", cfg.images.clip_model, "clip")
    if cfg.text.writer == "transformers":
        _check_model_path("text.options.model", options.get("model"), "folder")
    try:
        from pixelmill.tasks.instructions import build_writer

        build_writer(cfg.text.writer, options)
    except ValueError as e:
        raise UsageError(f"text.options: {e}") from None
    from pixelmill.datasets.storage import join

    check_output_config(join(cfg.output, "text"), cfg.text_affecting(), args)
    check_output_config(join(cfg.output, "pairs"), cfg.pairs_affecting(), args)
    return cfg


def cmd_pairs(args) -> int:
    cfg = prepare_pairs(args)
    if args.dry_run:
        from pixelmill.flows.common import plan_shards
        from pixelmill.datasets.storage import join

        text = plan_shards({"input": cfg.input, "output": join(cfg.output, "text"), "limit": cfg.limit},
                           cfg.text_affecting())
        print(f"pairs: {cfg.input} -> {cfg.output} (writer {cfg.text.writer}, "
              f"{cfg.images.samples_per_caption} samples per caption)")
        print("text stage: " + text.describe())
        print("image stage: runs over text/ once it is complete" + (
            "" if text.todo else " (text/ is complete; run without --dry-run to see its shards)"))
        return 0

    with flow_runtime(args, cfg.runtime):
        from pixelmill.flows.pairs import pairs_flow

        s = pairs_flow(cfg.model_dump())
    data = {k: getattr(s, k) for k in ("output", "captions", "instructions", "text_rejects", "pairs", "dropped",
                                       "pair_rejects", "text_skipped", "pairs_skipped")}
    data["seconds"] = round(s.seconds, 3)
    if args.json:
        print(json.dumps(data))
    else:
        print(f"text: {s.captions} captions -> {s.instructions} instructions + {s.text_rejects} rejected "
              f"({len(s.text_skipped)} shard(s) skipped)")
        print(f"pairs: {s.pairs} kept, {s.dropped} dropped by the CLIP filter, {s.pair_rejects} captions with no "
              f"surviving pair ({len(s.pairs_skipped)} shard(s) skipped) in {s.seconds:.1f}s")
        print(f"output: {s.output}/pairs (columns input_image, edit_prompt, edited_image)")
    return 0


def prepare_video(args):
    """Load and check a video config and its input before anything starts; returns (config, plan)."""
    from pixelmill.config import VideoConfig
    from pixelmill.datasets import DatasetNotFound, config_hash, diff_config
    from pixelmill.flows.video_plan import plan_videos, read_output_config

    cfg = load_flow_config(VideoConfig, args.config, args)
    if "://" in cfg.output and not cfg.output.startswith("file://"):
        raise UsageError(f"output: {cfg.output}: the video flow writes to a local (or shared) folder; "
                         "object-store URLs are not supported for video outputs")
    edit = cfg.edit
    t2l = getattr(edit, "text2live", None)
    if t2l is not None:
        t2l = t2l.model_copy(update={
            "structure_model": _local_url_if_path(t2l.structure_model) if t2l.structure_model else None,
            "structure_weights": _local_url(t2l.structure_weights) if t2l.structure_weights else None})
    edit = edit.model_copy(update={
        "model": _local_url_if_path(edit.model) if edit.model else None,
        "clip_model": _local_url_if_path(edit.clip_model) if edit.clip_model else None,
        "adapters": resolved_adapters("edit.adapters", edit.adapters),
        **({"text2live": t2l} if t2l is not None else {})})
    output = _local_url(cfg.output.removeprefix("file://"))
    cfg = cfg.model_copy(update={"input": _local_url(cfg.input), "output": output, "edit": edit})
    _check_model_path("edit.model", edit.model, "pipeline")
    _check_model_path("edit.clip_model", edit.clip_model, "clip")
    if t2l is not None:
        _check_model_path("edit.text2live.structure_model", t2l.structure_model, "folder")
        _check_model_path("edit.text2live.structure_weights", t2l.structure_weights, "folder")
    try:
        plan = plan_videos(cfg)
    except DatasetNotFound as e:
        raise UsageError(f"input: {e}") from None
    except ValueError as e:
        raise UsageError(f"input: {e}") from None
    if not plan.jobs:
        raise UsageError(f"input: {cfg.input} has no videos")
    previous = read_output_config(cfg.output)
    if previous is not None and previous.get("config_hash") != config_hash(plan.config) and not args.overwrite:
        changed = diff_config(previous.get("config") or {}, plan.config)
        raise UsageError(f"output {cfg.output} was made with another config "
                         f"(changed: {', '.join(changed) or 'unknown'}); use a new output or --overwrite "
                         "(videos are redone; atlases whose settings and video are unchanged are reused)")
    return cfg, plan


def cmd_video(args) -> int:
    cfg, plan = prepare_video(args)
    if args.dry_run:
        print(f"video: {cfg.input} -> {cfg.output} ({cfg.atlas.method} atlas, {cfg.edit.method} on the "
              f"{cfg.edit.layer} layer)")
        print(plan.describe())
        return 0
    with flow_runtime(args, cfg.runtime):
        from pixelmill.flows.video import video_flow

        summary = video_flow(cfg.model_dump())
    print_video_summary(summary, args.json)
    return 1 if summary.failed else 0


def print_video_summary(summary, as_json: bool = False) -> None:
    data = {"output": summary.output, "videos": summary.videos, "ran": summary.ran, "skipped": summary.skipped,
            "rejected": summary.rejected, "failed": summary.failed, "num_gpus": summary.num_gpus,
            "metrics": summary.metrics, "report": summary.report, "seconds": round(summary.seconds, 3)}
    if as_json:
        print(json.dumps(data))
        return
    print(f"done: {summary.videos} video(s) in: {len(summary.ran)} edited, {len(summary.skipped)} skipped "
          f"(finished before), {len(summary.rejected)} rejected, {len(summary.failed)} failed "
          f"in {summary.seconds:.1f}s")
    for vid, reason in summary.rejected.items():
        print(f"  rejected {vid}: {reason}")
    for vid, err in summary.failed.items():
        print(f"  FAILED {vid}: {err}")
    print(f"metrics: {summary.metrics}\nreport:  {summary.report}")


def cmd_server(args) -> int:
    import subprocess

    from pixelmill.runtime import prefect_server_command, prefect_server_env

    home = Path(args.home).resolve() if args.home else default_home()
    print(f"Prefect server with the database in {home / 'prefect.db'}")
    print(f"UI and API at http://{args.host}:{args.port} (Ctrl-C to stop)", flush=True)
    proc = subprocess.Popen(prefect_server_command(args.host, args.port, ui=True),
                            env=prefect_server_env(home, ui=True))
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait()
        return 0


def cmd_report(args) -> int:
    from pixelmill.datasets import DatasetNotFound
    from pixelmill.report import render_report

    try:
        path = render_report(args.dataset, args.out, limit=args.limit)
    except DatasetNotFound as e:
        raise UsageError(str(e)) from None
    print(f"report: {path}")
    return 0


def cmd_dataset_import(args) -> int:
    from pixelmill.datasets import ConfigMismatch
    from pixelmill.datasets.importer import import_folder

    if not Path(args.dir).is_dir():
        raise UsageError(f"not a folder: {args.dir}")
    try:
        summary = import_folder(args.dir, args.out, overwrite=args.overwrite)
    except (ValueError, ConfigMismatch) as e:
        raise UsageError(str(e)) from None
    print(f"imported {summary['images']} images ({summary['captioned']} with captions) "
          f"into {args.out} ({summary['shards']} shard(s))")
    return 0


def cmd_dataset_info(args) -> int:
    from pixelmill.datasets import Dataset, DatasetNotFound

    try:
        ds = Dataset.open(args.dataset)
    except DatasetNotFound as e:
        raise UsageError(str(e)) from None
    m = ds.manifest
    print(f"{args.dataset}: {ds.num_rows} rows in {len(ds.shard_names())} shard(s), "
          f"{ds.rejects().num_rows} rejects")
    if m is not None:
        print(f"schema {m.schema_name} v{m.schema_version}, config {m.config_hash}, "
              f"{'complete' if m.complete else 'INCOMPLETE'}")
    return 0


def cmd_models_make_tiny(args) -> int:
    from pixelmill.models.tiny import save_tiny_models

    paths = save_tiny_models(args.out)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def cmd_demo(args) -> int:
    from pixelmill.demo import run_demo

    return run_demo(Path(args.out), ray_address=args.ray_address)


def main(argv: list[str] | None = None) -> int:
    apply_quiet_defaults()
    parser = build_parser()
    args = parser.parse_args(argv)
    from pixelmill.datasets.storage import StorageUnavailable

    try:
        return args.func(args) or 0
    except (UsageError, StorageUnavailable) as e:
        print(f"pixelmill: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - the traceback helps; the last line says what failed
        import traceback

        traceback.print_exc()
        print(f"pixelmill: error: {args.command} failed: {type(e).__name__}: {e}", file=sys.stderr)
        if args.command == "edit":
            print("Committed shards are kept: rerun the same command to resume.", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and closed early
        return 0


if __name__ == "__main__":
    sys.exit(main())
