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

``expected.json`` keeps one record per case and machine (floats and image bytes round
differently on another CPU model or SIMD set; ``test_golden.machine()`` names it). The
records written are merged into ``--out``: this machine's records of the cases run are
replaced, and every path where another machine's record of a case differs from this one
is added to that case's ``machine_dependent`` paths (the printout lists them: check that
they are only float and image digests), which is right when both came from the same code,
e.g. to add a new machine:

    PYTHONPATH=/tmp/base python tests/golden/make_expected.py --base /tmp/base

After a deliberate change of a case's outputs, pass ``--changed`` (with ``-- -k CASE``):
the other machines' records of the cases run are dropped (they came from other code),
and their ``machine_dependent`` paths are kept, so those machines still compare the rest.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--base", default=".", help="checkout of the pre-change code (default: the current folder)")
    parser.add_argument("--out", default=str(HERE / "expected.json"), help="file to write")
    parser.add_argument("--changed", action="store_true",
                        help="the cases run changed their outputs on purpose: drop other machines' records of them")
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
    written = json.loads(partial.read_text())
    partial.unlink()
    doc = merge(json.loads(out.read_text()) if out.is_file() else {}, written, args.changed)
    out.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    print(f"wrote {out}")
    return 0


def merge(doc: dict[str, Any], written: dict[str, Any], changed: bool) -> dict[str, Any]:
    """``doc`` (``expected.json``) with one machine's newly ``written`` records merged in (see the module doc)."""
    sys.path.insert(0, str(HERE.parents[1]))
    from tests.golden.test_golden import diff_paths, record_path

    if "machines" not in doc and "_machine" in doc:  # the one-machine layout before records per machine
        doc = {"_about": doc.get("_about"), "machine_dependent": {},
               "machines": {doc["_machine"]: {k: v for k, v in doc.items() if not k.startswith("_")}}}
    machines: dict[str, dict[str, Any]] = doc.setdefault("machines", {})
    dependent: dict[str, list[str]] = doc.setdefault("machine_dependent", {})
    here = written["_machine"]
    doc["_about"] = written["_about"]
    for case, record in ((k, v) for k, v in written.items() if not k.startswith("_")):
        for other, cases in machines.items():
            if other == here or case not in cases:
                continue
            if changed:
                del cases[case]
                print(f"{case}: dropped {other!r}'s record (outputs changed)")
                continue
            paths = sorted({record_path(d) for d in diff_paths(cases[case], record)})
            dependent[case] = sorted(set(dependent.get(case, [])) | set(paths))
            print(f"{case}: {len(paths)} paths differ from {other!r}'s record:" + "".join(f"\n    {p}" for p in paths))
        machines.setdefault(here, {})[case] = record
    doc["machines"] = {m: cases for m, cases in machines.items() if cases}
    return doc


if __name__ == "__main__":
    sys.exit(main())
