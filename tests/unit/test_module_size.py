"""No module of the package grows past a size one person can read in a sitting.

A module over the limit is a sign it holds more than one idea: split it (as was done for
``tasks/edit``, ``tasks/download``, ``report``…) rather than raise the limit.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "pixelmill"
MAX_LINES = 600


def _line_count(path: Path) -> int:
    with path.open("rb") as f:
        return sum(1 for _ in f)


def oversized_modules(package: Path = PACKAGE, limit: int | None = None) -> list[tuple[str, int]]:
    """``(path relative to the repository, lines)`` of every module over ``limit`` lines."""
    limit = MAX_LINES if limit is None else limit
    found = []
    for path in sorted(package.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        lines = _line_count(path)
        if lines > limit:
            found.append((path.relative_to(package.parent).as_posix(), lines))
    return found


def test_the_package_is_where_the_check_looks():
    import pixelmill  # a namespace package: no __init__.py at its top

    assert PACKAGE in {Path(p).resolve() for p in pixelmill.__path__}, f"pixelmill is not imported from {PACKAGE}"
    assert len(list(PACKAGE.rglob("*.py"))) > 10


def test_the_check_finds_a_module_over_the_limit(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "small.py").write_text("x = 1\n" * 10)
    (pkg / "sub" / "big.py").write_text("x = 1\n" * 11)
    (pkg / "exact.py").write_text("x = 1\n" * 10)
    assert oversized_modules(pkg, limit=10) == [("pkg/sub/big.py", 11)]


def test_no_module_is_over_600_lines():
    found = oversized_modules()
    listing = "\n".join(f"  {path}: {lines} lines" for path, lines in sorted(found, key=lambda t: -t[1]))
    assert not found, (
        f"{len(found)} module(s) over {MAX_LINES} lines; split them by responsibility:\n{listing}"
    )
