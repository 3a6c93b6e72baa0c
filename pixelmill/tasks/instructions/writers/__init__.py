"""The instruction writers, found by config name: ``build_writer(name, options)``.

``WRITERS`` maps each name to the ``"module:Class"`` that implements it, imported only
when that writer is asked for, so naming one writer never imports the others' code (and
adding a writer is one line here plus its own module, not another branch).
``build_writer`` checks the options against the class's ``__init__`` before building,
so a typo in ``writer_options`` fails with the list of known options instead of a
``TypeError`` deep inside a worker.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from pixelmill.tasks.instructions.writers.base import InstructionWriter, WriterAuthError, WriterFatalError

WRITERS: dict[str, str] = {
    "template": "pixelmill.tasks.instructions.writers.template:TemplateInstructionWriter",
    "transformers": "pixelmill.tasks.instructions.writers.transformers:TransformersInstructionWriter",
    "openai": "pixelmill.tasks.instructions.writers.openai:OpenAIInstructionWriter",
}
_NOT_CONFIGURABLE = {"self", "sleep"}


def writer_class(kind: str) -> type[InstructionWriter]:
    """The class registered under ``kind``, imported on first use.

    Raises:
        ValueError: ``kind`` is not a registered writer.
    """
    if kind not in WRITERS:
        raise ValueError(f"writer must be one of {', '.join(WRITERS)}, not {kind!r}")
    module, _, name = WRITERS[kind].partition(":")
    return getattr(importlib.import_module(module), name)


def _check_writer_options(kind: str, options: dict[str, Any]) -> type[InstructionWriter]:
    cls = writer_class(kind)
    params = inspect.signature(cls.__init__).parameters
    known = [p for p in params if p not in _NOT_CONFIGURABLE]
    unknown = [k for k in options if k not in known]
    if unknown:
        raise ValueError(f"unknown writer_options {', '.join(map(repr, unknown))} for writer {kind!r} "
                         f"(known: {', '.join(known)})")
    missing = [p.name for p in params.values() if p.name not in _NOT_CONFIGURABLE
               and p.default is inspect.Parameter.empty and p.name not in options]
    if missing:
        raise ValueError(f"writer {kind!r} needs writer_options {', '.join(map(repr, missing))}")
    return cls


def build_writer(kind: str, options: dict[str, Any] | None = None) -> InstructionWriter:
    """Build a writer from its config name and options (cheap: models load in ``setup()``).

    Raises:
        ValueError: unknown writer, unknown or missing option, or an invalid value.
    """
    options = dict(options or {})
    cls = _check_writer_options(kind, options)
    return cls(**options)


__all__ = ["WRITERS", "InstructionWriter", "WriterAuthError", "WriterFatalError", "build_writer", "writer_class"]
