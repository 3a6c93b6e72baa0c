"""What every instruction writer shares: the interface, the errors that stop a stage, few-shot files."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pixelmill.tasks.instructions.answer import WriterAnswer


class WriterFatalError(RuntimeError):
    """A writer problem that every row would hit (bad key, wrong URL): the stage stops."""


class WriterAuthError(WriterFatalError):
    """The endpoint refused the credentials (HTTP 401/403)."""


class InstructionWriter:
    """Base of the instruction writers: ``setup()`` once per worker, then ``write``.

    Subclasses set ``name`` and implement ``write``; ``model_name`` is the provenance
    string recorded in the ``writer_model`` column.
    """

    name: ClassVar[str] = "writer"

    def setup(self) -> None:
        """Load models or other per-worker state (idempotent)."""

    @property
    def model_name(self) -> str:
        return self.name

    def write(self, captions: list[str], seeds: list[int]) -> list[WriterAnswer]:  # pragma: no cover
        """One answer per caption, in order; ``seeds[i]`` seeds caption ``i``."""
        raise NotImplementedError


def _read_few_shot(path: str | None) -> str:
    if not path:
        return ""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"few_shot_file not found: {file}")
    text = file.read_text(encoding="utf-8")
    return text if not text or text.endswith("\n") else text + "\n"
