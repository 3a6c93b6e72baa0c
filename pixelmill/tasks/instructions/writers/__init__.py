"""The instruction writers, found by config name: ``build_writer(name, options)``.

Each writer registers itself in its own module (``pixelmill.registry``, kind
``writer``), so adding one is a new module (or a plugin) and no branch here.
``build_writer`` checks the options against the class's ``__init__`` before building,
so a typo in ``writer_options`` fails with the list of known options instead of a
``TypeError`` deep inside a worker.
"""

from __future__ import annotations

import inspect
from typing import Any

from pixelmill.tasks.instructions.writers.base import InstructionWriter, WriterAuthError, WriterFatalError

_NOT_CONFIGURABLE = {"self", "sleep"}


def writer_class(kind: str) -> type[InstructionWriter]:
    """The class registered under ``kind``, imported on first use.

    Raises:
        ValueError: ``kind`` is not a registered writer.
    """
    from pixelmill import registry

    if kind not in registry.names("writer"):
        raise ValueError(f"writer must be one of {', '.join(registry.names('writer'))}, not {kind!r}")
    return registry.get("writer", kind).obj


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


__all__ = ["InstructionWriter", "WriterAuthError", "WriterFatalError", "build_writer", "writer_class"]
