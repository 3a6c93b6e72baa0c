"""The commands: each loads its config and preflights it (``config.preflight``), starts the
runtime, runs a flow and prints its summary (``--json`` for one JSON line)."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

from pixelmill.config import CampaignConfig, EditConfig, PairsConfig, RetrieveConfig, VideoConfig, load_config
from pixelmill.config.preflight import check_model_path, local_url, local_url_if_path
from pixelmill.runtime import default_home


class UsageError(Exception):
    """Bad command-line use: printed without a traceback, exit status 2."""


def load_flow_config(model, path: str, args, preflight: bool = True):
    """A flow's config from YAML with ``--set`` and ``--limit``, preflighted (``ConfigError``: exit 2)."""
    overrides = list(args.overrides) + ([f"limit={args.limit}"] if args.limit is not None else [])
    cfg = load_config(model, path, overrides)
    return cfg.preflight(overwrite=args.overwrite, dry_run=args.dry_run) if preflight else cfg


def cmd_edit(args) -> int:
    if getattr(args, "retry_rejects", False):
        args.overrides = [*args.overrides, "retry_rejects=true"]
    cfg = load_flow_config(EditConfig, args.config, args)
    if args.dry_run:
        from pixelmill.datasets.claims import new_run_id
        from pixelmill.flows.bulk_edit import editor_class
        from pixelmill.flows.incremental import plan_edit

        data = cfg.model_dump()
        plan = plan_edit(data, cfg.output_affecting(), editor_class(data).dataset, run=new_run_id(),
                         retry_rejects=cfg.retry_rejects, claim=False)
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


@contextmanager
def connected(args, cfg, requests=None):
    """The command's runtime, entered, with the config's GPU counts checked against the cluster.

    An explicit GPU count that the connected cluster's nodes cannot provide raises
    ``PlacementError`` (exit status 2) here, before any flow run, shard or job starts.
    """
    from pixelmill.cli.cancel import cancellable
    from pixelmill.runtime import check_cluster_gpus

    with flow_runtime(args, cfg.runtime) as runtime:
        check_cluster_gpus(cfg.gpu_requests() if requests is None else requests)
        with cancellable(args.command):  # Ctrl-C or a cancel in the Prefect UI stops the run cleanly
            yield runtime


def summary_extras(summary) -> dict:
    """What every flow summary adds to ``--json``: notes, GPU-hours, rejects by reason, nodes, flow run."""
    return {k: getattr(summary, k) for k in ("notes", "gpus", "gpu_hours", "rejected_by_reason", "nodes",
                                             "flow_run_id") if hasattr(summary, k)}


def print_notes(summary) -> None:
    """The summary's notes (``ran on CPU: …``) and GPU-hours, under its figures."""
    for note in getattr(summary, "notes", []):
        print(f"note: {note}")
    if getattr(summary, "gpu_hours", 0):
        print(f"GPU-hours: {summary.gpu_hours:.4f}")


def run_edit(cfg: EditConfig, args, show_progress: bool = True):
    """Start the runtime and run the bulk-edit flow."""
    with connected(args, cfg):
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
        **{k: getattr(summary, k) for k in ("run", "rows_skipped", "rows_claimed_elsewhere", "retried", "timing",
                                                   "model_family")
           if hasattr(summary, k)},
        **summary_extras(summary),
    }
    if as_json:
        print(json.dumps(data))
        return
    if not summary.shards_run:
        print(f"nothing to do: {len(summary.shards_skipped)} shard(s) already committed in {summary.output}"
              + (f" ({summary.rows_skipped} row(s) processed before)" if getattr(summary, "rows_skipped", 0) else ""))
        for note in getattr(summary, "notes", []):
            print(f"note: {note}")
        return
    print(f"done: {summary.rows_in} rows in -> {summary.rows_out} edited + {summary.rejects} rejected "
          f"({len(summary.shards_run)} shard(s) run, {len(summary.shards_skipped)} skipped) "
          f"in {summary.seconds:.1f}s, {summary.images_per_second:.2f} images/s")
    print_notes(summary)
    if family := getattr(summary, "model_family", None):
        print(f"model: {family['family']} ({family['pipeline_class'] or 'pipeline'}, "
              f"{family['prediction_type']} prediction)")
    print(f"output: {summary.output}")


def cmd_retrieve(args) -> int:
    cfg = load_flow_config(RetrieveConfig, args.config, args)
    from pixelmill.flows.retrieve import plan_retrieval

    plan = plan_retrieval(cfg)
    if args.dry_run:
        print(f"retrieve {cfg.num_images} per prompt above {cfg.threshold} from {cfg.pool} -> {cfg.output}")
        print(plan.describe())
        return 0

    with connected(args, cfg):
        from pixelmill.flows.retrieve import retrieve_flow

        summary = retrieve_flow(cfg.model_dump())
    print_retrieve_summary(summary, cfg.num_images, args.json)
    return 0


def cmd_finetune(args) -> int:
    if args.config == "status":
        if not args.status_config:
            raise UsageError("usage: pixelmill finetune status CAMPAIGN.yaml")
        return finetune_status(args.status_config, args)
    if args.status_config:
        raise UsageError(f"unexpected argument {args.status_config!r} (did you mean `finetune status`?)")
    cfg = load_flow_config(CampaignConfig, args.config, args)
    from pixelmill.tasks.train.plan import plan_campaign

    plan = plan_campaign(cfg)
    if args.dry_run:
        print(f"campaign -> {cfg.output}")
        print(plan.describe())
        return 0
    if args.overwrite:
        from pixelmill.datasets import storage

        for j in plan.jobs:
            storage.remove(j.spec["dir"])
    from pixelmill.config.campaign import job_gpu_request

    requests = [job_gpu_request(j.spec["name"], j.spec["settings"]["num_gpus"], j.spec["settings"]["num_workers"])
                for j in plan.jobs if j.action != "skip"]
    with connected(args, cfg, requests):
        from pixelmill.flows.finetune import finetune_flow

        summary = finetune_flow(cfg.model_dump())
    data = {"output": summary.output, "ran": summary.ran, "skipped": summary.skipped, "failed": summary.failed,
            "warnings": summary.warnings, "class_images": summary.class_images, "results": summary.results,
            "report": summary.report, "seconds": round(summary.seconds, 3), **summary_extras(summary)}
    if args.json:
        print(json.dumps(data))
    else:
        print(f"done: {len(summary.ran)} job(s) trained, {len(summary.skipped)} skipped (finished), "
              f"{len(summary.failed)} failed in {summary.seconds:.1f}s")
        for name, err in summary.failed.items():
            print(f"  FAILED {name}: {err}")
        for name, warnings in summary.warnings.items():
            for w in warnings:
                print(f"  WARNING {name}: {w}")
        print_notes(summary)
        print(f"results: {summary.results}\nreport:  {summary.report}")
    return 1 if summary.failed else 0


def finetune_status(config_path: str, args) -> int:
    """Print each job's state without starting anything."""
    from pixelmill.tasks.train.plan import plan_campaign
    from pixelmill.tasks.train.results import result_row

    cfg = load_flow_config(CampaignConfig, config_path, args)
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
                                             "clip_text_alignment", "clip_image_alignment", "error",
                                             "warnings")} for r in rows]))
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
        for w in r["warnings"]:
            print(f"      warning: {w}")
    return 0


def print_retrieve_summary(summary, n: int, as_json: bool = False) -> None:
    if as_json:
        print(json.dumps({"output": summary.output, "prompts": summary.prompts, "skipped": summary.skipped,
                          "exported": summary.exported, "seconds": round(summary.seconds, 3),
                          **summary_extras(summary)}))
        return
    if not summary.prompts:
        print(f"nothing to do: {len(summary.skipped)} prompt(s) already complete in {summary.output}")
    for s in summary.prompts.values():
        line = (f"{s['prompt']!r}: {s['found']} candidates above threshold, {s['downloaded']} downloaded, "
                f"{s['failed']} failed, {s['dropped']} dropped")
        if s["shortfall"]:
            line += f"  SHORTFALL: needed {n}, got {s['downloaded']} (candidates ran out; not padded)"
        print(line)
    for prompt, folder in summary.exported.items():
        print(f"real prior for {prompt!r}: {folder}")
    print(f"output: {summary.output}  ({summary.seconds:.1f}s)")


def cmd_pool_build(args) -> int:
    from pydantic import ValidationError

    from pixelmill.config.base import StageTimeouts

    try:
        timeouts = StageTimeouts(stall=args.stall_timeout or None, attempts=args.attempts).model_dump()
    except ValidationError as e:
        bad = "; ".join(f"--{'stall-timeout' if x['loc'][0] == 'stall' else 'attempts'}: {x['msg']}"
                        for x in e.errors())
        raise UsageError(bad) from None
    check_model_path("--clip", args.clip, "clip")
    from pixelmill.cli.cancel import cancellable

    with flow_runtime(args), cancellable(args.command):
        from pixelmill.flows.pool import build_pool_flow

        summary = build_pool_flow(
            dataset=local_url(args.dataset), out=local_url(args.out), clip_model=local_url_if_path(args.clip),
            caption_column=args.caption_column or None, image_column=args.image_column or None,
            batch_size=args.batch_size, overwrite=args.overwrite,
            timeouts=timeouts,
        )
    print(f"pool: {summary['rows']} rows embedded ({summary['rejects']} rejected) into {args.out}")
    return 0


def cmd_pool_index(args) -> int:
    from pixelmill.tasks.regularization import build_index_and_report

    print(build_index_and_report(local_url(args.pool), local_url(args.out), kind=args.kind,
                                 index_type=args.index_type, nlist=args.nlist, nprobe=args.nprobe,
                                 threshold=args.threshold))
    return 0


def cmd_pool_norms(args) -> int:
    from pixelmill.tasks.retrieval.norms import write_pool_norms

    print(write_pool_norms(local_url(args.pool), kinds=args.kind, overwrite=args.overwrite).describe())
    return 0


def cmd_pairs(args) -> int:
    cfg = load_flow_config(PairsConfig, args.config, args)
    if args.dry_run:
        from pixelmill.datasets.storage import join
        from pixelmill.flows.common import plan_shards

        text = plan_shards({"input": cfg.input, "output": join(cfg.output, "text"), "limit": cfg.limit},
                           cfg.text_affecting())
        print(f"pairs: {cfg.input} -> {cfg.output} (writer {cfg.text.writer}, "
              f"{cfg.images.samples_per_caption} samples per caption)")
        print("text stage: " + text.describe())
        print("image stage: runs over text/ once it is complete" + (
            "" if text.todo else " (text/ is complete; run without --dry-run to see its shards)"))
        return 0

    with connected(args, cfg):
        from pixelmill.flows.pairs import pairs_flow

        s = pairs_flow(cfg.model_dump())
    data = {k: getattr(s, k) for k in ("output", "captions", "instructions", "text_rejects", "pairs", "dropped",
                                       "pair_rejects", "text_skipped", "pairs_skipped")}
    data["seconds"] = round(s.seconds, 3)
    data.update(summary_extras(s))
    if args.json:
        print(json.dumps(data))
    else:
        print(f"text: {s.captions} captions -> {s.instructions} instructions + {s.text_rejects} rejected "
              f"({len(s.text_skipped)} shard(s) skipped)")
        print(f"pairs: {s.pairs} kept, {s.dropped} dropped by the CLIP filter, {s.pair_rejects} captions with no "
              f"surviving pair ({len(s.pairs_skipped)} shard(s) skipped) in {s.seconds:.1f}s")
        print_notes(s)
        print(f"output: {s.output}/pairs (columns input_image, edit_prompt, edited_image)")
    return 0


def cmd_video(args) -> int:
    from pixelmill.tasks.video.plan import plan_videos

    cfg = load_flow_config(VideoConfig, args.config, args)
    plan = plan_videos(cfg)
    if args.dry_run:
        print(f"video: {cfg.input} -> {cfg.output} ({cfg.atlas.method} atlas, {cfg.edit.method} on the "
              f"{cfg.edit.layer} layer)")
        print(plan.describe())
        return 0
    with connected(args, cfg):
        from pixelmill.flows.video import video_flow

        summary = video_flow(cfg.model_dump())
    print_video_summary(summary, args.json)
    return 1 if summary.failed else 0


def print_video_summary(summary, as_json: bool = False) -> None:
    data = {"output": summary.output, "videos": summary.videos, "ran": summary.ran, "skipped": summary.skipped,
            "rejected": summary.rejected, "failed": summary.failed, "num_gpus": summary.num_gpus,
            "metrics": summary.metrics, "report": summary.report, "seconds": round(summary.seconds, 3),
            **summary_extras(summary)}
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
    print_notes(summary)
    print(f"metrics: {summary.metrics}\nreport:  {summary.report}")


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def cmd_server(args) -> int:
    import signal
    import subprocess
    from contextlib import ExitStack

    from pixelmill.runtime import (
        die_with_parent,
        host_ray,
        prefect_server_command,
        prefect_server_env,
        public_bind_problem,
        wait_for_health,
    )
    from pixelmill.server_boot import ServerBoot, remove_server_file, write_server_file

    problem = public_bind_problem(args.host)
    if problem:
        raise UsageError(problem)
    home = Path(args.home).resolve() if args.home else default_home()
    print(f"Prefect server with the database in {home / 'prefect.db'}")
    print(f"UI and API at http://{args.host}:{args.port} (Ctrl-C to stop)", flush=True)
    # one server boots at a time on a home (server_boot.py): held until server.json is written
    boot = ServerBoot(home).acquire()
    boot.seed_database()  # a new home starts from the cached set-up database (server_boot.py)
    # a service manager's stop or `kill` (SIGTERM) ends it as Ctrl-C does: the Prefect server and a
    # hosted Ray stopped, server.json removed, exit 0 (Python's default would die there and then)
    previous_term = signal.signal(signal.SIGTERM, _interrupt)
    # the UI calls the API at this host and port; the server ends if this command is killed
    proc = subprocess.Popen(die_with_parent(prefect_server_command(args.host, args.port, ui=True)),
                            env=prefect_server_env(home, ui=True, host=args.host, port=args.port))
    local = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "[::1]"}.get(args.host, args.host)
    local = f"[{local}]" if ":" in local and not local.startswith("[") else local
    hosted, ray_address = ExitStack(), None
    try:
        if args.ray:
            ray_address = hosted.enter_context(host_ray(args.ray_cpus))  # starts while the server does
            print(f"Ray for this home's commands at {ray_address}; its workers see this command's environment",
                  flush=True)
        wait_for_health(f"http://{local}:{args.port}/api", proc=proc)
        # commands run with this home record their runs here instead of starting a server (and join its Ray)
        write_server_file(home, proc.pid, f"http://{local}:{args.port}/api", ray_address)
        boot.mark_ready()
        boot.release()
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    except RuntimeError:
        if proc.poll() is not None:
            return proc.returncode or 1
        raise
    finally:
        signal.signal(signal.SIGTERM, previous_term)  # a second SIGTERM while stopping ends it at once
        boot.release()
        remove_server_file(home, proc.pid)
        hosted.close()
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


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


def cmd_dataset_compact(args) -> int:
    from pixelmill.datasets.compaction import compact

    if args.rows < 1:
        raise UsageError("--rows must be at least 1")
    result = compact(local_url(args.dataset), target_rows=args.rows)
    print(f"compacted {args.dataset}: {result['before']} shard(s) -> {result['after']}, {result['rows']} rows")
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


def cmd_run(args) -> int:
    """``pixelmill run PIPELINE.yaml``: check every step, then run them as one Prefect flow."""
    from pixelmill.config.pipeline import PipelineConfig, pipeline_gpu_requests

    cfg = load_flow_config(PipelineConfig, args.config, args, preflight=False)
    steps = cfg.preflight_steps(Path(args.config).resolve().parent, overwrite=args.overwrite)
    if args.dry_run:
        print(f"pipeline {args.config}: {len(steps)} step(s), run in order as one Prefect flow")
        for s in steps:
            print(f"  {s['name']:<16} {s['uses']:<10} -> {s['data'].get('output')}")
        print("each step skips what it already committed (shards, jobs, videos)")
        return 0
    with connected(args, cfg, pipeline_gpu_requests(steps)):
        from pixelmill.flows.run import pipeline_flow

        run_name = Path(args.config).stem  # the parent flow run is named after the pipeline file
        summaries = pipeline_flow.with_options(flow_run_name=run_name)(steps, overwrite=args.overwrite)
    if args.json:
        print(json.dumps(summaries, default=str))
    else:
        for name, s in summaries.items():
            figures = ", ".join(f"{k} {v if not isinstance(v, list | dict) else len(v)}" for k, v in s.items()
                                if k not in ("output", "worker", "notes", "nodes", "flow_run_id", "gpus")
                                and v not in (None, [], {}, 0))
            print(f"{name}: {figures}")
            for note in s.get("notes") or []:
                print(f"  note: {note}")
        print(f"done: {len(summaries)} step(s)")
    return 0
