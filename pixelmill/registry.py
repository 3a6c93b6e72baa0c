"""One place where editing methods, training methods, instruction writers and pipelines are found.

Each implementation declares itself once, next to its code, with :func:`register`
(usually as a class decorator): its name, and the metadata the rest of pixelmill needs
to use it without branching on names (its settings model, the columns it reads, whether
it needs a diffusion model, …). Configs, the CLI's choices, the flows and the video job
look entries up here.

Entries come from three places, loaded on first use:

1. the built-in modules listed in ``BUILTIN_MODULES``;
2. the Python entry-point group ``pixelmill.plugins`` (each entry point names a module,
   imported for the registrations it makes), so a separate package can add methods;
3. a config's ``plugins:`` list of import paths (:func:`load_plugins`), for a module of
   one's own that is not packaged.

Modules that declare entries keep heavy imports (torch, diffusers) inside functions, so
looking a name up stays cheap and validating a config loads no model code.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

KINDS = ("edit", "train", "writer", "pipeline")
ENTRY_POINT_GROUP = "pixelmill.plugins"

BUILTIN_MODULES: dict[str, tuple[str, ...]] = {
    "edit": (
        "pixelmill.tasks.edit.sdedit",
        "pixelmill.tasks.edit.instruct_pix2pix",
        "pixelmill.tasks.edit.text2live",
    ),
    "train": ("pixelmill.tasks.train.methods",),
    "writer": (
        "pixelmill.tasks.instructions.writers.template",
        "pixelmill.tasks.instructions.writers.transformers",
        "pixelmill.tasks.instructions.writers.openai",
    ),
    "pipeline": ("pixelmill.pipelines",),
}


class UnknownEntry(ValueError):
    """A name that no built-in module, plugin or entry point registered; the message lists the known ones."""


class PluginError(ValueError):
    """A ``plugins:`` import path or entry point that could not be imported."""


@dataclass(frozen=True)
class Entry:
    """One registered implementation.

    Args:
        kind: ``edit``, ``train``, ``writer`` or ``pipeline``.
        name: the name configs use (``method: sdedit``).
        obj: what was registered (a class, or a spec object for pipelines).
        meta: the declared metadata (kind-specific; see the declaring decorators).
    """

    kind: str
    name: str
    obj: Any
    meta: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, key: str) -> Any:
        try:
            return self.meta[key]
        except KeyError:
            raise AttributeError(f"{self.kind} {self.name!r} declares no {key!r}") from None


_entries: dict[str, dict[str, Entry]] = {k: {} for k in KINDS}
_loaded: set[str] = set()
_lock = threading.RLock()


def register(kind: str, name: str, **meta: Any) -> Callable[[Any], Any]:
    """Declare ``obj`` under ``kind``/``name``; use as a decorator (returns ``obj`` unchanged).

    Registering the same object again is a no-op (modules may be imported twice under
    Ray); registering another object under a taken name is an error naming both.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown registry kind {kind!r} (known: {', '.join(KINDS)})")

    def add(obj: Any) -> Any:
        with _lock:
            old = _entries[kind].get(name)
            if old is not None and _qualname(old.obj) != _qualname(obj):
                raise ValueError(f"{kind} {name!r} is registered twice: {_qualname(old.obj)} and {_qualname(obj)}")
            _entries[kind][name] = Entry(kind, name, obj, dict(meta))
        return obj

    return add


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__qualname__)}"


def _import(module: str, source: str) -> None:
    try:
        importlib.import_module(module)
    except ImportError as e:
        raise PluginError(f"{source} {module!r} could not be imported: {e}") from None


def _load_builtin(kind: str) -> None:
    with _lock:
        if kind in _loaded:
            return
        for module in BUILTIN_MODULES[kind]:
            importlib.import_module(module)
        _load_entry_points()
        _loaded.add(kind)


_entry_points_loaded = False


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        _import(ep.value.split(":", 1)[0], f"entry point {ep.name!r} of group {ENTRY_POINT_GROUP}:")


def load_plugins(modules: Iterable[str], search: Iterable[str] = ()) -> None:
    """Import the modules a config's ``plugins:`` names, so their registrations take effect.

    Modules are found on ``sys.path``, then in ``search`` folders (the config file's
    folder) and the working directory, as a script next to the config would be.

    Raises:
        PluginError: naming the module that failed and why.
    """
    import os
    import sys

    for folder in (*search, os.getcwd()):
        folder = os.path.abspath(folder)
        if folder not in sys.path:
            sys.path.append(folder)
    for module in modules:
        _import(module, "plugins:")


def get(kind: str, name: str) -> Entry:
    """The entry registered as ``kind``/``name``.

    Raises:
        UnknownEntry: naming the known names (and how to add one).
    """
    _load_builtin(kind)
    try:
        return _entries[kind][name]
    except KeyError:
        known = ", ".join(sorted(_entries[kind])) or "none"
        raise UnknownEntry(f"unknown {_LABEL[kind]} {name!r} (known: {known}; a plugin module listed in "
                           "`plugins:` or installed under the `pixelmill.plugins` entry point can add one)") from None


def names(kind: str) -> list[str]:
    """Registered names of a kind, sorted."""
    _load_builtin(kind)
    return sorted(_entries[kind])


def entries(kind: str) -> list[Entry]:
    """Registered entries of a kind, sorted by name."""
    _load_builtin(kind)
    return [_entries[kind][n] for n in sorted(_entries[kind])]


_LABEL = {"edit": "editing method", "train": "training method", "writer": "instruction writer",
          "pipeline": "pipeline"}
