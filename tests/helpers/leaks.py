"""Search everything a run left behind for a planted secret (an API key, a storage password)."""

from __future__ import annotations

import stat
from pathlib import Path


def regular_files(root: Path) -> list[Path]:
    """Every regular file under ``root`` (sockets, pipes and links skipped)."""
    out = []
    for p in root.rglob("*"):
        try:
            mode = p.lstat().st_mode
        except FileNotFoundError:  # removed while we walked
            continue
        if stat.S_ISREG(mode):
            out.append(p)
    return out


def find_secret(secret: str, roots: dict[str, Path], texts: dict[str, str] | None = None) -> list[str]:
    """Where ``secret`` appears: ``"<label>: <file>"`` for files under each root, ``"<label>"`` for texts.

    Files are searched as bytes (a SQLite database, a Parquet file, a log), so a secret
    stored in any UTF-8 text cell or record is found.
    """
    needle = secret.encode()
    found = [label for label, text in (texts or {}).items() if secret in text]
    for label, root in roots.items():
        for path in regular_files(root):
            try:
                if needle in path.read_bytes():
                    found.append(f"{label}: {path}")
            except OSError:
                continue
    return found
