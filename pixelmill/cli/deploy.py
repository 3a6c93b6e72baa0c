"""``pixelmill deploy`` and ``pixelmill serve``: configs as Prefect deployments with schedules.

Each config becomes one deployment of the matching entrypoint flow in
``pixelmill.flows.deployed`` (``pixelmill-edit``, ..., ``pixelmill-run`` for a chained
pipeline). Its parameter is the config itself, validated and preflighted here (local
paths made absolute, a pipeline's step files inlined), so a worker that has pixelmill
installed needs no copy of the YAML. The config's ``schedule:`` becomes the deployment's
schedule and its ``deployment:`` block the work pool, queue, tags and concurrency limit
(default 1, ``enqueue``: a run that fires while the previous one still works waits for
it, then finds only what is still new).

``deploy`` registers with the Prefect server at ``PREFECT_API_URL`` (never an embedded
one: it would vanish with the command), creating the work pool as a ``process`` pool if
missing; ``--notify URL`` adds an automation that POSTs to URL when a run of these
deployments fails or crashes. ``serve`` runs the schedules in this process (Prefect's
``serve``; no work pool), on ``PREFECT_API_URL`` or the embedded server.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import sys
import urllib.parse
import urllib.request
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from pixelmill.cli.commands import UsageError

PIPELINE_KIND = "run"
# Deployable flow kinds: the registered pipelines with an entrypoint in flows/deployed.py, and
# "run" (a chained pipeline). Here, not there: building the CLI's parser must not import Prefect.
KINDS = ("edit", "retrieve", "pairs", "finetune", "video", PIPELINE_KIND)
# Keys that only a pipeline / a campaign / ... has: how a config's flow is told apart.
_DISTINCTIVE = (("concepts", "finetune"), ("grid", "finetune"), ("jobs", "finetune"),
                ("atlas", "video"), ("render", "video"), ("pool", "retrieve"), ("prompts", "retrieve"),
                ("text", "pairs"), ("images", "pairs"))


def add_parsers(sub) -> None:
    """Add ``deploy`` and ``serve`` to the ``pixelmill`` subcommands."""

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("configs", nargs="+", metavar="CONFIG",
                       help="flow or pipeline config files (edit, retrieve, pairs, finetune, video, or a "
                            "`pixelmill run` pipeline)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a key of every config (dotted keys for nested ones); repeatable")
        p.add_argument("--flow", choices=KINDS, default=None,
                       help="the flow the configs are for (default: told from their keys)")

    p = sub.add_parser("deploy", help="register configs as Prefect deployments (schedule, work pool, concurrency)",
                       description="Register one Prefect deployment per config with the server at "
                                   "PREFECT_API_URL: the config (validated, paths made absolute) as its "
                                   "parameter, its `schedule:` (cron or interval) and its `deployment:` "
                                   "settings (work pool, default `pixelmill`, created as a process pool if "
                                   "missing; concurrency limit, default 1). Start a worker with "
                                   "`prefect worker start --pool pixelmill` where pixelmill is installed.")
    common(p)
    p.add_argument("--pool", default=None, help="work pool for every config (default: its deployment.work_pool)")
    p.add_argument("--notify", nargs="?", const="", default=None, metavar="URL",
                   help="POST a JSON message to URL when a run of these deployments fails or crashes "
                        "(a Prefect automation with a webhook action). Without URL: $PIXELMILL_NOTIFY_URL "
                        "(better: a webhook URL is a secret, and arguments show in `ps` and shell history). "
                        "Printed with its path hidden.")
    p.add_argument("--json", action="store_true", help="print the deployments as JSON")
    p.set_defaults(func=cmd_deploy)

    p = sub.add_parser("serve", help="run the configs' schedules in this process (Prefect serve, no work pool)",
                       description="Serve one deployment per config from this process: its schedule fires "
                                   "runs here until Ctrl-C (schedules are paused then). Uses PREFECT_API_URL, "
                                   "a `pixelmill server` on --home, or an embedded server.")
    common(p)
    p.add_argument("--limit", type=int, default=None, metavar="N", help="at most N runs at once in this process")
    p.add_argument("--no-ray", dest="ray", action="store_false",
                   help="each run starts a local Ray of its own (default: the runs join one Ray hosted by this "
                        "process, unless RAY_ADDRESS, a config's runtime.ray_address or a `pixelmill server "
                        "--ray` on --home names one)")
    p.add_argument("--home", default=None,
                   help="folder for the embedded Prefect database (default: $PIXELMILL_HOME or ./.pixelmill)")
    p.set_defaults(func=cmd_serve)


def guess_kind(data: dict[str, Any]) -> str:
    """The flow a config is for, from the keys only one kind of config has (else a bulk edit)."""
    if isinstance(data.get("steps"), list):  # an edit's `steps` is a number of sampling steps
        return "run"
    for key, kind in _DISTINCTIVE:
        if key in data:
            return kind
    return "edit"


def prepare(path: str, overrides: list[str], kind: str | None = None) -> dict[str, Any]:
    """Load, validate and preflight one config for deployment.

    Returns ``kind``, ``name`` (the deployment's), ``cfg`` (the validated config) and
    ``parameters`` (what the entrypoint flow gets: the config's contents, paths absolute).
    """
    from pixelmill import registry
    from pixelmill.config import apply_overrides, read_yaml, validate

    data = apply_overrides(read_yaml(path), overrides)
    kind = kind or guess_kind(data)
    if kind == PIPELINE_KIND:
        from pixelmill.config.pipeline import PipelineConfig

        cfg = validate(PipelineConfig, data, path)
        cfg.preflight_steps(Path(path).resolve().parent)  # every step and reference checked (exit 2)
        config = inline_steps(cfg, Path(path).resolve().parent)
    else:
        model = registry.get("pipeline", kind).obj.config_model()
        cfg = validate(model, data, path)
        config = cfg.preflight(dry_run=True).model_dump(mode="json", exclude={"schedule", "deployment"})
    name = cfg.deployment.name or Path(path).stem
    return {"kind": kind, "name": name, "cfg": cfg, "parameters": {"config": config}, "path": path}


def inline_steps(cfg, base_dir: Path) -> dict[str, Any]:
    """A pipeline's config with each step's base file merged into ``with:`` (a worker has no such files).

    Steps that name no earlier step are preflighted as ``pixelmill run`` does (paths made
    absolute); the others keep their values and are checked when they start.
    """
    from pixelmill import registry
    from pixelmill.config import read_yaml, validate
    from pixelmill.config.pipeline import deep_merge, references

    steps = []
    for step in cfg.steps:
        data = deep_merge(read_yaml(base_dir / step.config) if step.config else {}, step.with_)
        if not references(data):
            model = registry.get("pipeline", step.uses).obj.config_model()
            data = validate(model, data).preflight(dry_run=True).model_dump(
                mode="json", exclude={"schedule", "deployment"})
        steps.append({"name": step.name, "uses": step.uses, "with": data})
    out = cfg.model_dump(mode="json", exclude={"schedule", "deployment", "steps"})
    out["steps"] = steps
    return out


def to_deployment(item: dict[str, Any], pool: str | None = None, served: bool = False):
    """The Prefect ``RunnerDeployment`` for a prepared config (module-path entrypoint).

    ``served``: for ``pixelmill serve`` (this process runs it: no work pool or queue).
    """
    from datetime import timedelta

    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.deployments.runner import EntrypointType
    from prefect.schedules import Cron, Interval

    from pixelmill.flows.deployed import FLOWS

    cfg = item["cfg"]
    d = cfg.deployment
    schedules = []
    if cfg.schedule is not None:
        s = cfg.schedule
        schedules = [Cron(s.cron, timezone=s.timezone or "UTC") if s.cron
                     else Interval(timedelta(seconds=s.interval), timezone=s.timezone or "UTC")]
    strategy = {"enqueue": ConcurrencyLimitStrategy.ENQUEUE, "cancel_new": ConcurrencyLimitStrategy.CANCEL_NEW}
    return FLOWS[item["kind"]].to_deployment(
        name=item["name"],
        parameters=item["parameters"],
        schedules=schedules,
        concurrency_limit=ConcurrencyLimitConfig(limit=d.concurrency_limit,
                                                 collision_strategy=strategy[d.collision_strategy]),
        tags=sorted({"pixelmill", *d.tags}),
        work_pool_name=None if served else (pool or d.work_pool),
        work_queue_name=None if served else d.work_queue,
        description=f"pixelmill {item['kind']} from {Path(item['path']).name}",
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


def describe_schedule(cfg) -> str:
    s = cfg.schedule
    if s is None:
        return "no schedule (start runs from the UI, the API or `prefect deployment run`)"
    what = f"cron {s.cron!r}" if s.cron else f"every {s.interval:g}s"
    return f"{what} ({s.timezone or 'UTC'})"


def _auth_headers() -> dict[str, str]:
    auth = os.environ.get("PREFECT_API_AUTH_STRING")
    return {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()} if auth else {}


def check_server(url: str | None) -> str:
    """The API URL if a Prefect server answers there; ``UsageError`` (exit 2) otherwise."""
    if not url:
        raise UsageError("PREFECT_API_URL is not set: `pixelmill deploy` registers deployments with a Prefect "
                         "server that outlives it (e.g. export PREFECT_API_URL=http://HOST:4200/api); without "
                         "one, `pixelmill serve CONFIG` runs schedules in its own process")
    url = url.rstrip("/")
    try:
        req = urllib.request.Request(f"{url}/health", headers=_auth_headers())
        with urllib.request.urlopen(req, timeout=10) as r:
            if r.status == 200:
                return url
            problem = f"HTTP {r.status}"
    except OSError as e:
        problem = str(getattr(e, "reason", None) or e)
    raise UsageError(f"the Prefect server at PREFECT_API_URL={url} does not answer ({problem}); "
                     "start it or fix the URL")


def use_api(url: str) -> None:
    """Point this process's Prefect client at ``url``."""
    from pixelmill.runtime import refresh_prefect_settings

    os.environ["PREFECT_API_URL"] = url
    os.environ["PREFECT_SERVER_ALLOW_EPHEMERAL_MODE"] = "false"
    refresh_prefect_settings()


def ensure_pool(name: str) -> bool:
    """Create work pool ``name`` (type ``process``) unless it exists; True when created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
            return False
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(
                name=name, type="process", base_job_template=ProcessWorker.get_default_base_job_template()))
            return True


NOTIFY_ENV = "PIXELMILL_NOTIFY_URL"


def notify_url(arg: str | None) -> str | None:
    """The webhook URL of ``--notify [URL]`` (``$PIXELMILL_NOTIFY_URL`` when given without one)."""
    if arg is None:
        return None
    url = arg or os.environ.get(NOTIFY_ENV, "")
    if not url:
        raise UsageError(f"--notify without a URL reads ${NOTIFY_ENV}, which is not set")
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise UsageError(f"--notify: {redacted_url(url)} is not an http(s) URL")
    return url


def redacted_url(url: str) -> str:
    """``scheme://host[:port]/…``: a webhook URL's path and query often hold its secret."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or "?"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}/…" if parts.path.strip("/") or parts.query else f"{parts.scheme}://{host}{port}"


def notify_on_failure(url: str, deployments: list[tuple[str, Any]]) -> str:
    """A webhook block for ``url`` and one automation per deployment: on Failed/Crashed, POST JSON to it.

    ``deployments``: (full name, id). Redeploying replaces the automation (same name).
    Returns the webhook block's name.
    """
    from prefect.automations import AutomationCore, CallWebhook, EventTrigger, Posture
    from prefect.blocks.webhook import Webhook
    from prefect.client.orchestration import get_client

    block_name = "pixelmill-notify-" + hashlib.sha256(url.encode()).hexdigest()[:12]
    block_id = Webhook(url=url, method="POST", headers={"Content-Type": "application/json"}).save(
        block_name, overwrite=True)
    payload = ('{"event": "pixelmill scheduled run failed", "flow_run": "{{ flow_run.name }}", '
               '"flow_run_id": "{{ flow_run.id }}", "deployment": "{{ deployment.name }}", '
               '"state": "{{ flow_run.state.name }}", "message": {{ flow_run.state.message | tojson }}}')
    with get_client(sync_client=True) as client:
        for full_name, dep_id in deployments:
            name = f"pixelmill: notify when {full_name} fails"
            for old in client.read_automations_by_name(name):
                client.delete_automation(old.id)
            client.create_automation(AutomationCore(
                name=name,
                description=f"POST to the webhook block {block_name} when a run of {full_name} fails or crashes",
                trigger=EventTrigger(
                    expect={"prefect.flow-run.Failed", "prefect.flow-run.Crashed", "prefect.flow-run.TimedOut"},
                    match={"prefect.resource.id": "prefect.flow-run.*"},
                    match_related={"prefect.resource.id": f"prefect.deployment.{dep_id}"},
                    posture=Posture.Reactive, threshold=1,
                ),
                actions=[CallWebhook(block_document_id=block_id, payload=payload)],
            ))
    return block_name


def _prepare_all(args) -> list[dict[str, Any]]:
    items = [prepare(path, args.overrides, args.flow) for path in args.configs]
    seen: dict[tuple[str, str], str] = {}
    for it in items:
        key = (it["kind"], it["name"])
        if key in seen:
            raise UsageError(f"{it['path']} and {seen[key]} would both be deployment {it['name']!r} of "
                             f"pixelmill-{it['kind']}: set `deployment.name` in one of them")
        seen[key] = it["path"]
    return items


def cmd_deploy(args) -> int:
    from pixelmill.config import RuntimeConfig

    notify = notify_url(args.notify)
    url = os.environ.get("PREFECT_API_URL")
    if url:
        url = check_server(url)
    items = _prepare_all(args)
    if not url:  # the configs' runtime.prefect_api_url, when they name one
        named = {(it["cfg"].runtime or RuntimeConfig()).prefect_api_url for it in items} - {None}
        url = check_server(named.pop() if len(named) == 1 else None)
    use_api(url)
    created_pools = []
    for pool in sorted({args.pool or it["cfg"].deployment.work_pool for it in items}):
        if ensure_pool(pool):
            created_pools.append(pool)
    out = []
    for it in items:
        dep = to_deployment(it, args.pool)
        dep_id = dep.apply(work_pool_name=dep.work_pool_name)
        d = it["cfg"].deployment
        out.append({"name": f"{dep.flow_name}/{dep.name}", "id": str(dep_id), "config": it["path"],
                    "flow": it["kind"], "work_pool": dep.work_pool_name, "schedule": describe_schedule(it["cfg"]),
                    "concurrency_limit": d.concurrency_limit, "collision_strategy": d.collision_strategy})
    if notify:
        block = notify_on_failure(notify, [(o["name"], o["id"]) for o in out])
        for o in out:
            o["notify"] = {"url": redacted_url(notify), "webhook_block": block}
    if args.json:
        print(json.dumps(out))
        return 0
    for pool in created_pools:
        print(f"created work pool {pool!r} (type process)")
    for o in out:
        print(f"deployment {o['name']} ({o['id']}): {o['config']} on pool {o['work_pool']}, {o['schedule']}, "
              f"concurrency {o['concurrency_limit']} ({o['collision_strategy']})")
        if notify:
            print(f"  notifies {redacted_url(notify)} when a run fails or crashes")
    pools = sorted({o["work_pool"] for o in out})
    print("runs start on a worker: " + "; ".join(f"prefect worker start --pool {p}" for p in pools))
    return 0


def cmd_serve(args) -> int:
    from prefect import serve

    from pixelmill.runtime import (
        CLIENT_AUTH_ENV,
        SERVER_AUTH_ENV,
        PrefectServer,
        Watchdog,
        default_home,
        host_ray,
        user_server,
    )
    from pixelmill.server_boot import ServerBoot

    items = _prepare_all(args)
    home = Path(args.home).resolve() if args.home else default_home()
    url = os.environ.get("PREFECT_API_URL")
    server = watchdog = None
    hosted, joined = ExitStack(), False
    try:
        found = (None if url else user_server(home)) or {}
        if args.ray and not os.environ.get("RAY_ADDRESS"):
            # the runs (this process's children) join one Ray: the home's server's, else one hosted here
            if not found.get("ray_address"):
                found["ray_address"] = hosted.enter_context(host_ray())
                print(f"Ray for the scheduled runs at {found['ray_address']}")
            os.environ["RAY_ADDRESS"], joined = found["ray_address"], True
        if url:
            url = check_server(url)
        else:
            url = found.get("api_url")
            if url is None:
                with ServerBoot(home) as boot:  # one server boots at a time on a home (server_boot.py)
                    url = (user_server(home) or {}).get("api_url")
                    if url is None:
                        watchdog = Watchdog().start()  # the server ends with this command, however it ends
                        boot.seed_database()
                        server = PrefectServer(home).start()
                        url = server.api_url
                        boot.mark_ready()
            if server is not None:
                print(f"embedded Prefect server at {url} (database in {home}); "
                      f"browse it later with `pixelmill server --home {home}`")
            # a server of this home has auth on when PREFECT_SERVER_API_AUTH_STRING is set: send it
            if os.environ.get(SERVER_AUTH_ENV) and not os.environ.get(CLIENT_AUTH_ENV):
                os.environ[CLIENT_AUTH_ENV] = os.environ[SERVER_AUTH_ENV]
        use_api(url)
        deployments = [to_deployment(it, served=True) for it in items]
        for it in items:
            print(f"serving {it['kind']} {it['name']} from {it['path']}: {describe_schedule(it['cfg'])}")
        sys.stdout.flush()
        serve(*deployments, limit=args.limit, print_starting_message=False)
    except KeyboardInterrupt:
        pass
    finally:
        if server is not None:
            server.stop()
        hosted.close()
        if joined:
            os.environ.pop("RAY_ADDRESS", None)
        if watchdog is not None:
            watchdog.stop()
    return 0
