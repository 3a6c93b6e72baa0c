"""Write ``tests/golden/expected.json`` from the code BEFORE a change (never from the changed code).

The golden values must come from code whose outputs are the reference: the commit
before a refactor. Check that commit out as a separate worktree and run this script
with that checkout first on ``PYTHONPATH`` (the venv's editable install points at the
working checkout; ``PYTHONPATH`` puts the old code in front of it):

    git worktree add /tmp/base HEAD~1          # the pre-change commit
    cd /tmp/base && PYTHONPATH=/tmp/base /work/main/.venv/bin/python \\
        /work/main/tests/golden/make_expected.py --base /tmp/base

The script copies this folder into ``BASE/tests/golden`` (so pytest's rootdir, and with it
every ``import pixelmill`` of the test process, the CLI subprocesses and the Ray
workers, is the old checkout; the module checks that its Ray workers import the same
tree), runs the golden module there in write mode (``PIXELMILL_GOLDEN_WRITE``), removes
the copy and leaves ``expected.json`` next to this file (or at ``--out``).

To confirm the values are deterministic, run it twice with ``--out`` to two files and
compare them; then run ``pytest tests/golden`` in the changed checkout.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--base", default=".", help="checkout of the pre-change code (default: the current folder)")
    parser.add_argument("--out", default=str(HERE / "expected.json"), help="file to write")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (e.g. -k edit)")
    args = parser.parse_args(argv)

    base = Path(args.base).resolve()
    out = Path(args.out).resolve()
    cli = base / "pixelmill" / "cli"
    if not (cli.is_dir() or cli.with_suffix(".py").is_file()) or not (base / "tests" / "conftest.py").is_file():
        parser.error(f"{base} is not a pixelmill checkout")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(base)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                                                       if p and Path(p).resolve() != base])
    partial = out.with_name(out.name + ".partial")
    env["PIXELMILL_GOLDEN_WRITE"] = str(partial)
    where = subprocess.run([sys.executable, "-c", "import pixelmill.cli; print(pixelmill.cli.__file__)"],
                           cwd=base, env=env, capture_output=True, text=True, check=True).stdout.strip()
    if not Path(where).resolve().is_relative_to(base):
        parser.error(f"`import pixelmill` loads {where}, not the code under {base}")
    print(f"generating {out} from {Path(where).parent}", flush=True)

    target = base / "tests" / "golden"
    copied = target.resolve() != HERE
    if copied:
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(HERE, target, ignore=shutil.ignore_patterns("__pycache__", "expected.json*"))
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "tests/golden", "-x", "-q", "-p", "no:cacheprovider",
                               *args.pytest_args], cwd=base, env=env)
    finally:
        if copied:
            shutil.rmtree(target, ignore_errors=True)
    if proc.returncode != 0:
        partial.unlink(missing_ok=True)
        print("the golden module failed on the base code; nothing written", file=sys.stderr)
        return proc.returncode
    partial.replace(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
