"""Start-up and fixed costs of a pixelmill command, cold and warm, as a user meets them.

Each figure is the median of ``--reps`` fresh processes (the first rep of each kind is
kept: a user's first command is a cold one too):

- ``pixelmill --help``: the CLI's own imports.
- runtime cold: entering ``Runtime`` on a new home (a Prefect server of its own and a
  local Ray, started together), against the two started one after the other in the same
  invocation (server alone + Ray alone): the baseline the overlap is measured against. A
  new home starts from the set-up database the machine's first server left in the cache
  (``server_boot.py``); the same without it (the machine's very first command, which
  creates and migrates the database) is printed beside it.
- runtime warm: the same home with ``pixelmill server`` running: the server is found and
  reused, and Ray waits until work needs it.
- no-op rerun: ``pixelmill edit`` on an output that holds every row already, with a warm
  server (and cold, for comparison): the run is still recorded in Prefect.
- small edit, warm: ``pixelmill edit`` of 2 new images with a warm server: the command's wall
  time, and what is left of it beyond the stage's model load and calls (its ``--json``
  ``timing``): interpreter and imports, Ray start, Prefect flow and task runs, plan, commit.
- the same with ``pixelmill server --ray``: the command joins the server's Ray instead of
  starting one.

Targets (issue #17): runtime ready ≤ 8 s cold and ≤ 3 s warm; a no-op rerun ≤ 3 s warm; a
flow run's fixed cost beyond loading the model ≤ 3 s (``benchmarks/bulk_edit.py`` measures
that one inside a runtime). Figures depend on the machine's load: run it on a quiet one.

    python benchmarks/startup.py [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

PY = sys.executable

ENTER = """
import sys, time
from pathlib import Path
t = time.perf_counter()
from pixelmill.runtime import PrefectServer, Runtime
mode, home = sys.argv[1], Path(sys.argv[2])
if mode == "runtime":
    with Runtime(home=home, lazy_ray=False if sys.argv[3] == "eager" else None):
        print(time.perf_counter() - t)
elif mode == "server":
    from pixelmill.server_boot import ServerBoot
    with ServerBoot(home) as boot:  # as a command's own server starts: from the set-up database if kept
        boot.seed_database()
        s = PrefectServer(home).start()
    print(time.perf_counter() - t)
    s.stop()
else:
    import ray
    ray.init(address="local", include_dashboard=False, logging_level="ERROR")
    print(time.perf_counter() - t)
    ray.shutdown()
"""


CACHE: Path | None = None  # the benchmark's own cache (models, and the Prefect database template)


def env(cache: Path | None = None) -> dict[str, str]:
    drop = {"PREFECT_API_URL", "RAY_ADDRESS", "PIXELMILL_HOME"}
    out = {**{k: v for k, v in os.environ.items() if k not in drop}, "HF_HUB_OFFLINE": "1"}
    if cache or CACHE:
        out["PIXELMILL_CACHE"] = str(cache or CACHE)
    return out


def timed(cmd: list[str], cwd: Path, cache: Path | None = None) -> tuple[float, str]:
    t = time.perf_counter()
    p = subprocess.run(cmd, cwd=cwd, env=env(cache), capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    return wall, p.stdout


def inner(mode: str, home: Path, cwd: Path, how: str = "eager", cache: Path | None = None) -> float:
    """Seconds measured inside a fresh interpreter (its own imports included)."""
    _, out = timed([PY, "-c", ENTER, mode, str(home), how], cwd, cache)
    return float(out.strip().splitlines()[-1])


def cli(args: list[str], home: Path, cwd: Path) -> tuple[float, dict]:
    wall, out = timed([PY, "-m", "pixelmill.cli", *args, "--home", str(home), "--json"], cwd)
    return wall, json.loads(out.strip().splitlines()[-1])


def start_server(home: Path, cwd: Path, ray: bool = False) -> subprocess.Popen:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([PY, "-m", "pixelmill.cli", "server", "--home", str(home), "--port", str(port),
                             *(["--ray"] if ray else [])],
                            cwd=cwd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 180
    while not (home / "server.json").exists() or not _healthy(port) or \
            (ray and "ray_address" not in (home / "server.json").read_text()):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("pixelmill server did not start")
        time.sleep(0.5)
    return proc


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="pixelmill-startup-"))
    global CACHE
    CACHE = root / "cache"
    import yaml

    from pixelmill.datasets.importer import import_folder
    from pixelmill.models import save_tiny_img2img

    sys.path.insert(0, str(Path(__file__).parent))
    from bulk_edit import make_images

    model = save_tiny_img2img(root / "model")
    make_images(root / "files", 2 + 2 * args.reps)
    import_folder(str(root / "files"), str(root / "images"), num_buckets=1)

    def edit_config(name: str, limit: int) -> Path:
        cfg = root / f"{name}.yaml"
        cfg.write_text(yaml.safe_dump(dict(input=str(root / "images"), output=str(root / name), model=model,
                                           prompt="a painting", strength=0.5, steps=2, resolution=64,
                                           limit=limit, caption_column=None)))
        return cfg

    rows: list[tuple[str, float, str]] = []

    def med(xs: list[float]) -> float:
        return statistics.median(xs)

    def small_edits(prefix: str) -> tuple[list[float], list[float]]:
        """``--reps`` edits of 2 new images: command wall, and wall less the stage's set-up and calls."""
        walls, rest = [], []
        for i in range(args.reps):
            wall, summary = cli(["edit", str(edit_config(f"out-{prefix}-{i}", 2))], home, root)
            t = summary["timing"]
            walls.append(wall)
            rest.append(wall - t["setup_seconds"] - t["call_seconds"])
        return walls, rest

    help_s = [timed([PY, "-m", "pixelmill.cli", "--help"], root)[0] for _ in range(args.reps)]
    rows.append(("pixelmill --help", med(help_s), ""))

    server_s, ray_s, cold_s, first_server_s, first_cold_s = [], [], [], [], []
    inner("runtime", root / "home-prime", root)  # the machine's first command: leaves the set-up database
    for i in range(args.reps):
        # a cache of its own: no set-up database to start from, as on a machine's first command
        # (the server alone never keeps one: the runtime marks the database ready, which keeps it)
        first_server_s.append(inner("server", root / f"home-fs{i}", root, cache=root / f"cache-fs{i}"))
        first_cold_s.append(inner("runtime", root / f"home-fc{i}", root, cache=root / f"cache-fc{i}"))
        server_s.append(inner("server", root / f"home-s{i}", root))
        ray_s.append(inner("ray", root / f"home-r{i}", root))
        cold_s.append(inner("runtime", root / f"home-c{i}", root))
    seq = [a + b for a, b in zip(server_s, ray_s)]
    rows.append(("runtime ready, cold (server + Ray together)", med(cold_s),
                 f"one after the other: {med(seq):.1f} s (server {med(server_s):.1f}, Ray {med(ray_s):.1f}); "
                 f"ratio {med(cold_s) / med(seq):.2f}; target <= 8 s"))
    rows.append(("  the machine's first (database migrated)", med(first_cold_s),
                 f"server alone {med(first_server_s):.1f} s"))

    home = root / "home-warm"
    no_op = edit_config("out-noop", 2)
    cli(["edit", str(no_op)], root / "home-first", root)  # does the work once
    cold_noop = [cli(["edit", str(no_op)], root / f"home-n{i}", root)[0] for i in range(args.reps)]
    server = start_server(home, root)
    try:
        warm_s = [inner("runtime", home, root, "lazy") for _ in range(args.reps)]
        warm_ray = [inner("runtime", home, root, "eager") for _ in range(args.reps)]
        rows.append(("runtime ready, warm (pixelmill server running)", med(warm_s),
                     f"with Ray started at once: {med(warm_ray):.1f} s; target <= 3 s"))
        noop = []
        for _ in range(args.reps):
            wall, summary = cli(["edit", str(no_op)], home, root)
            assert not summary["shards_run"], summary
            noop.append(wall)
        rows.append(("no-op rerun, warm server", med(noop), f"cold server: {med(cold_noop):.1f} s; target <= 3 s"))
        walls, rest = small_edits("small")
        rows.append(("2-image edit, warm server: command wall", med(walls),
                     f"beyond model load and stage calls: {med(rest):.1f} s (interpreter, imports, Ray start, "
                     f"Prefect runs, plan, commit)"))
    finally:
        stop(server)
    server = start_server(home, root, ray=True)  # the same home, its server hosting a Ray
    try:
        warm_ray = [inner("runtime", home, root, "eager") for _ in range(args.reps)]
        rows.append(("runtime ready, warm (pixelmill server --ray)", med(warm_ray),
                     "Ray joined, not started; target <= 3 s"))
        walls, rest = small_edits("small-ray")
        rows.append(("2-image edit, warm server --ray: command wall", med(walls),
                     f"beyond model load and stage calls: {med(rest):.1f} s; target <= 3 s"))
    finally:
        stop(server)
    print(f"start-up ({args.reps} reps each, medians; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f})")
    for name, value, note in rows:
        print(f"  {name:<48} {value:6.1f} s   {note}")


if __name__ == "__main__":
    main()
