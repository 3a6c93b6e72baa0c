"""Preflight: what a config's types cannot check, checked before a flow starts.

Local paths made absolute (Ray workers run in another folder), models and adapters that
must exist, input columns, and existing outputs made with another config. Bad input
raises ``PreflightError`` (a ``ConfigError``: the CLI exits 2) naming the field; nothing
has started yet. Each flow config's ``preflight()`` calls its ``check_<flow>`` here, and
``pixelmill run`` calls ``check_pipeline`` on the whole pipeline. The checks open
datasets and model folders, so their imports are inside the functions: importing
``pixelmill.config`` stays free of compute.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pixelmill.config.base import ConfigError

if TYPE_CHECKING:
    from pixelmill.config.edit import EditConfig


class PreflightError(ConfigError):
    """A config that validates but cannot run as it stands (missing input, model, column...)."""


def check_model_path(field: str, value: str | None, kind: str, revision: str | None = None) -> None:
    from pixelmill.models.loading import ModelNotFound, check_model_reference

    if value is None:
        return
    try:
        check_model_reference(value, kind, revision)
    except ModelNotFound as e:
        raise PreflightError(f"{field}: {e}") from None


def check_model_family(field: str, value: str | None, families, what: str, revision: str | None = None) -> None:
    """Exit 2 (``PreflightError``) unless ``value``'s family is one of ``families`` (``models/family.py``).

    Reads the checkpoint's configs (a hub id through the hub cache, downloading configs
    only when online), so a hub id that does not resolve fails here too, naming it.
    """
    from pixelmill.models.family import UnsupportedFamily, describe_model, require_family
    from pixelmill.models.loading import ModelNotFound

    if value is None or not families:
        return
    try:
        require_family(describe_model(value, revision), families, what, value)
    except (ModelNotFound, UnsupportedFamily) as e:
        raise PreflightError(f"{field}: {e}") from None


def local_url(value: str) -> str:
    return value if "://" in value else str(Path(value).expanduser().resolve())


def local_url_if_path(value: str) -> str:
    from pixelmill.models.loading import looks_local

    return local_url(value) if looks_local(value) and not value.startswith(("local-dir:", "hf-hub:")) else value


def absolute_paths(cfg: EditConfig) -> EditConfig:
    """Make relative local paths absolute: Ray workers run in another folder. URLs and hub ids stay."""
    from pixelmill.models.loading import looks_local

    def local(value: str | None, is_model: bool) -> str | None:
        if value is None or "://" in value or value.startswith(("hf-hub:", "local-dir:")):
            return value
        if is_model and not looks_local(value):
            return value
        return str(Path(value).expanduser().resolve())

    update = {
        "input": local(cfg.input, False), "output": local(cfg.output, False),
        "model": local(cfg.model, True), "clip_model": local(cfg.clip_model, True),
    }
    if cfg.adapters:
        update["adapters"] = resolved_adapters("adapters", cfg.adapters)
    t2l = getattr(cfg, "text2live", None)
    if t2l is not None:
        update["text2live"] = t2l.model_copy(update={"structure_model": local(t2l.structure_model, True),
                                                     "structure_weights": local(t2l.structure_weights, False)})
    return cfg.model_copy(update=update)


def resolved_adapters(field: str, adapters: list) -> list:
    """Adapters with absolute paths, each checked to hold adapter files (exit 2 otherwise)."""
    from pixelmill.models.adapters import AdapterError, adapter_kind

    out = []
    for i, a in enumerate(adapters):
        a = a.model_copy(update={"path": local_url(a.path)})
        try:
            adapter_kind(a.path, a.kind)
        except AdapterError as e:
            raise PreflightError(f"{field}[{i}]: {e}") from None
        out.append(a)
    if sum(adapter_kind(a.path, a.kind) == "custom_diffusion" for a in out) > 1:
        raise PreflightError(f"{field}: only one custom_diffusion adapter per pipeline (train the concepts jointly)")
    return out


def check_input_columns(cfg: EditConfig, names: list[str]) -> EditConfig:
    """Every column the config names must be in the input; the default caption column is optional."""
    from pixelmill.tasks.edit import template_fields

    if cfg.caption_column and cfg.caption_column not in names and "caption_column" not in cfg.model_fields_set:
        cfg = cfg.model_copy(update={"caption_column": None})
    wanted = {"image_column": [cfg.image_column], "caption_column": [cfg.caption_column],
              "prompt_column": [cfg.prompt_column], "instruction_column": [cfg.instruction_column],
              "prompt": template_fields(cfg.prompt), "instruction": template_fields(cfg.instruction),
              "mask_column": [cfg.mask_column], "stroke_column": [cfg.stroke_column]}
    for key, columns in wanted.items():
        for col in columns:
            if col and col not in names:
                raise PreflightError(f"{key}: column {col!r} is not in the input (columns: {', '.join(names)})")
    return cfg


def check_writable(url: str, dry_run: bool = False) -> None:
    """Exit 2 when the output folder cannot be written (read-only, full, no permission).

    Writes and removes one empty probe file, so a run never starts only to fail at its
    first commit. A dry run writes nothing and skips the probe.
    """
    if dry_run:
        return
    import uuid

    from pixelmill.datasets import storage

    probe = storage.join(url, f".pixelmill-probe-{uuid.uuid4().hex[:8]}")
    try:
        storage.makedirs(url)
        storage.write_bytes(probe, b"")
        storage.remove(probe)
    except OSError as e:
        raise PreflightError(f"output {url} is not writable: {e.strerror or e}") from None


def edit_input_columns(cfg: EditConfig) -> dict[str, tuple[str, str]]:
    """The input columns a bulk edit reads, with their kind and the config key naming each."""
    from pixelmill.tasks.edit import template_fields

    cols = {cfg.image_column: ("image", "image_column")}
    for key in ("caption_column", "prompt_column", "instruction_column"):
        if getattr(cfg, key):
            cols[getattr(cfg, key)] = ("text", key)
    for key in ("prompt", "instruction"):
        for col in template_fields(getattr(cfg, key)):
            cols.setdefault(col, ("any", key))
    for key in ("mask_column", "stroke_column"):
        if getattr(cfg, key):
            cols[getattr(cfg, key)] = ("image", key)
    return cols


def check_input(url: str, columns: dict[str, tuple[str, str]], field: str = "input") -> None:
    """The whole-input checks of ``pixelmill.datasets.checks`` as a preflight (exit 2 naming the problem)."""
    from pixelmill.datasets import DatasetNotFound
    from pixelmill.datasets.checks import check_input_dataset
    from pixelmill.datasets.errors import InputError

    try:
        check_input_dataset(url, columns, field)
    except (DatasetNotFound, InputError) as e:
        raise PreflightError(str(e) if str(e).startswith(field) else f"{field}: {e}") from None


def check_output_config(url: str, hashed: dict, overwrite: bool = False, dry_run: bool = False,
                        remove_url: str | None = None) -> None:
    """Exit 2 naming the changed keys when ``url`` was made with another config, or it is not writable.

    With ``--overwrite`` the old output (``remove_url``, default ``url``) is removed instead.
    """
    from pixelmill.datasets import config_hash, diff_config, read_manifest
    from pixelmill.datasets.errors import InputError

    check_writable(url, dry_run)
    try:
        existing = read_manifest(url)
    except InputError as e:
        raise PreflightError(f"output: {e}; remove it or choose another output") from None
    if existing is None or existing.config_hash == config_hash(hashed):
        return
    changed = diff_config(existing.config, hashed)
    if not overwrite:
        raise PreflightError(f"output {url} was made with another config (changed: {', '.join(changed) or 'unknown'}); "
                         "use a new output or --overwrite")
    if not dry_run:
        from pixelmill.datasets.storage import remove

        remove(remove_url or url)


def _raw_files_input(cfg: EditConfig) -> bool:
    """Whether the edit's input is a folder/prefix of image files (a missing local one is left to the dataset check)."""
    from pixelmill.datasets import storage
    from pixelmill.datasets.errors import InputError
    from pixelmill.datasets.incremental import is_raw_input

    if not storage.is_remote(cfg.input) and not Path(cfg.input).is_dir():
        return False
    try:
        return is_raw_input(cfg.input, cfg.input_glob)
    except InputError as e:
        raise PreflightError(f"input: {e}") from None


def check_edit(cfg: EditConfig, overwrite: bool = False, dry_run: bool = False) -> EditConfig:
    """Validate the config and its inputs before anything starts (no Ray, no server)."""
    from pixelmill.datasets import Dataset, DatasetNotFound
    from pixelmill.datasets.errors import InputError

    cfg = absolute_paths(cfg)
    if _raw_files_input(cfg):
        from pixelmill.datasets.incremental import RAW_SCHEMA

        cfg = check_input_columns(cfg, RAW_SCHEMA.names)
    else:
        try:
            schema = Dataset.open(cfg.input).schema
        except (DatasetNotFound, InputError) as e:
            raise PreflightError(f"input: {e}") from None
        cfg = check_input_columns(cfg, schema.names)
        check_input(cfg.input, edit_input_columns(cfg))
    check_model_path("model", cfg.model, "pipeline", cfg.revision)
    check_model_family("model", cfg.model, _edit_families(cfg.method), f"edit method {cfg.method!r}",
                       cfg.revision)
    check_model_path("clip_model", cfg.clip_model, "clip")
    t2l = getattr(cfg, "text2live", None)
    if t2l is not None:
        check_model_path("text2live.structure_model", t2l.structure_model, "folder")
        check_model_path("text2live.structure_weights", t2l.structure_weights, "folder")
    check_output_config(cfg.output, cfg.output_affecting(), overwrite, dry_run)
    return cfg


def _edit_families(method: str):
    from pixelmill import registry

    return registry.get("edit", method).meta.get("families")


def check_retrieve(cfg, overwrite: bool = False, dry_run: bool = False):
    """Validate a retrieval config and its pool before anything starts."""
    from pixelmill.tasks.regularization import check_retrieve_inputs

    cfg = cfg.model_copy(update={
        "pool": local_url(cfg.pool), "output": local_url(cfg.output),
        "index": local_url(cfg.index) if cfg.index else None,
    })
    try:
        cfg = check_retrieve_inputs(cfg)
    except ValueError as e:
        raise PreflightError(str(e)) from None
    from pixelmill.datasets.storage import join

    check_output_config(join(cfg.output, "images"), cfg.output_affecting(), overwrite, dry_run, remove_url=cfg.output)
    return cfg


def check_finetune(cfg, overwrite: bool = False, dry_run: bool = False):
    """Load and check a campaign before anything starts: config, paths, models, datasets, tokens."""
    from pixelmill.config import CampaignConfig
    from pixelmill.tasks.train.plan import check_campaign_inputs

    model_local = local_url_if_path
    concepts = {
        name: c.model_copy(update={
            "instance_data": local_url(c.instance_data),
            "class_data": local_url(c.class_data) if c.class_data and c.class_data != "retrieval" else c.class_data,
        }) for name, c in cfg.concepts.items()
    }
    jobs = [j.model_copy(update={"model": model_local(j.model) if j.model else None}) for j in cfg.jobs]
    retrieve = dict(cfg.retrieve) if cfg.retrieve else None
    if retrieve and "pool" in retrieve:
        retrieve["pool"] = local_url(retrieve["pool"])
    cfg = cfg.model_copy(update={"output": local_url(cfg.output), "model": model_local(cfg.model),
                                 "clip_model": model_local(cfg.clip_model) if cfg.clip_model else None,
                                 "concepts": concepts, "jobs": jobs, "retrieve": retrieve})
    try:
        cfg = CampaignConfig.model_validate(cfg.model_dump())
        cfg.expand()
    except (ConfigError, ValueError) as e:
        raise PreflightError(str(e)) from None
    for model in sorted({cfg.model, *(j.model for j in cfg.jobs if j.model)}):
        check_model_path("model", model, "pipeline")
    check_model_path("clip_model", cfg.clip_model, "clip")
    if retrieve:
        from pydantic import ValidationError

        from pixelmill.config import RetrieveConfig, format_validation_error
        from pixelmill.tasks.regularization import check_retrieve_inputs
        from pixelmill.tasks.train.plan import retrieve_config

        try:
            rc = check_retrieve_inputs(RetrieveConfig.model_validate(retrieve_config(cfg)))
        except ValidationError as e:
            raise PreflightError("retrieve: " + format_validation_error(e)) from None
        except ValueError as e:
            raise PreflightError(f"retrieve: {e}") from None
        cfg = cfg.model_copy(update={"retrieve": rc.model_dump(exclude={"output", "runtime"})})
    try:
        check_campaign_inputs(cfg)
    except ValueError as e:
        raise PreflightError(str(e)) from None
    check_writable(cfg.output, dry_run)
    return cfg


def check_pairs(cfg, overwrite: bool = False, dry_run: bool = False):
    """Validate a pairs config and its inputs before anything starts."""
    from pixelmill.datasets import Dataset, DatasetNotFound
    from pixelmill.datasets.errors import InputError

    images = cfg.images.model_copy(update={"model": local_url_if_path(cfg.images.model),
                                           "clip_model": local_url_if_path(cfg.images.clip_model),
                                           "adapters": resolved_adapters("images.adapters", cfg.images.adapters)})
    options = dict(cfg.text.options)
    if cfg.text.writer == "transformers" and isinstance(options.get("model"), str):
        options["model"] = local_url_if_path(options["model"])
    if isinstance(options.get("few_shot_file"), str):
        options["few_shot_file"] = local_url(options["few_shot_file"])
    cfg = cfg.model_copy(update={"input": local_url(cfg.input), "output": local_url(cfg.output), "images": images,
                                 "text": cfg.text.model_copy(update={"options": options})})
    try:
        names = Dataset.open(cfg.input).schema.names
    except (DatasetNotFound, InputError) as e:
        raise PreflightError(f"input: {e}") from None
    if cfg.caption_column not in names:
        raise PreflightError(f"caption_column: column {cfg.caption_column!r} is not in the input "
                         f"(columns: {', '.join(names)})")
    check_input(cfg.input, {cfg.caption_column: ("text", "caption_column")})
    check_model_path("images.model", cfg.images.model, "pipeline")
    from pixelmill.tasks.p2p.sampling import P2P_FAMILIES

    check_model_family("images.model", cfg.images.model, P2P_FAMILIES, "Prompt-to-Prompt pair rendering")
    check_model_path("images.clip_model", cfg.images.clip_model, "clip")
    if cfg.text.writer == "transformers":
        check_model_path("text.options.model", options.get("model"), "folder")
    try:
        from pixelmill.tasks.instructions import build_writer

        build_writer(cfg.text.writer, options)
    except ValueError as e:
        raise PreflightError(f"text.options: {e}") from None
    from pixelmill.datasets.storage import join

    check_output_config(join(cfg.output, "text"), cfg.text_affecting(), overwrite, dry_run)
    check_output_config(join(cfg.output, "pairs"), cfg.pairs_affecting(), overwrite, dry_run)
    return cfg


def check_video(cfg, overwrite: bool = False, dry_run: bool = False):
    """Check a video config and its input videos before anything starts."""
    from pixelmill.datasets import DatasetNotFound, config_hash, diff_config
    from pixelmill.tasks.video.plan import plan_videos, read_output_config

    edit = cfg.edit
    t2l = getattr(edit, "text2live", None)
    if t2l is not None:
        t2l = t2l.model_copy(update={
            "structure_model": local_url_if_path(t2l.structure_model) if t2l.structure_model else None,
            "structure_weights": local_url(t2l.structure_weights) if t2l.structure_weights else None})
    edit = edit.model_copy(update={
        "model": local_url_if_path(edit.model) if edit.model else None,
        "clip_model": local_url_if_path(edit.clip_model) if edit.clip_model else None,
        "adapters": resolved_adapters("edit.adapters", edit.adapters),
        **({"text2live": t2l} if t2l is not None else {})})
    output = local_url(cfg.output.removeprefix("file://"))
    cfg = cfg.model_copy(update={"input": local_url(cfg.input), "output": output, "edit": edit})
    check_model_path("edit.model", edit.model, "pipeline", edit.revision)
    check_model_family("edit.model", edit.model, _edit_families(edit.method), f"edit method {edit.method!r}",
                       edit.revision)
    check_model_path("edit.clip_model", edit.clip_model, "clip")
    if t2l is not None:
        check_model_path("edit.text2live.structure_model", t2l.structure_model, "folder")
        check_model_path("edit.text2live.structure_weights", t2l.structure_weights, "folder")
    try:
        plan = plan_videos(cfg)
    except DatasetNotFound as e:
        raise PreflightError(f"input: {e}") from None
    except ValueError as e:
        raise PreflightError(f"input: {e}") from None
    if not plan.jobs:
        raise PreflightError(f"input: {cfg.input} has no videos")
    previous = read_output_config(cfg.output)
    if previous is not None and previous.get("config_hash") != config_hash(plan.config) and not overwrite:
        changed = diff_config(previous.get("config") or {}, plan.config)
        raise PreflightError(f"output {cfg.output} was made with another config "
                         f"(changed: {', '.join(changed) or 'unknown'}); use a new output or --overwrite "
                         "(videos are redone; atlases whose settings and video are unchanged are reused)")
    check_writable(cfg.output, dry_run)
    return cfg


def check_pipeline(cfg, base_dir: Path, overwrite: bool = False) -> list[dict]:
    """Check every step of a pipeline before anything starts; returns the steps to run.

    Each step's config (base file + ``with:``) is validated with its references to earlier
    steps replaced by where those results will be; a step without references is checked
    in full (inputs, models, existing outputs), the others when they start. A reference
    to an unknown or later step, or to a result the step does not offer, is an error
    naming the step.
    """
    from pixelmill import registry
    from pixelmill.config import read_yaml, validate
    from pixelmill.config.pipeline import deep_merge, references, substitute

    offered: dict[str, dict[str, str]] = {}
    steps = []
    for i, step in enumerate(cfg.steps):
        where = f"steps[{i}] ({step.name})"
        pipeline = registry.get("pipeline", step.uses).obj
        try:
            data = read_yaml(base_dir / step.config) if step.config else {}
        except ConfigError as e:
            raise PreflightError(f"{where}: {e}") from None
        data = deep_merge(data, step.with_)
        if cfg.limit is not None:
            data["limit"] = cfg.limit
        for name, key in references(data):
            if name not in offered:
                raise PreflightError(f"{where}: ${{steps.{name}.{key}}} names no earlier step "
                                     f"(earlier: {', '.join(offered) or 'none'})")
            if key not in offered[name]:
                raise PreflightError(f"{where}: ${{steps.{name}.{key}}}: step {name!r} offers "
                                     f"{', '.join(sorted(offered[name]))}")
        try:
            step_cfg = validate(pipeline.config_model(), substitute(data, lambda n, k: offered[n][k]), where)
        except ConfigError as e:
            raise PreflightError(str(e)) from None
        if not references(data):
            try:
                step_cfg = step_cfg.preflight(overwrite=overwrite, dry_run=True)
            except PreflightError as e:
                raise PreflightError(f"{where}: {e}") from None
        out = str(step_cfg.output)
        offered[step.name] = {k: out if k == "output" else f"{out}/jobs/{k.split('.', 1)[1]}/artifacts"
                              for k in pipeline.offers(step_cfg)}
        steps.append({"name": step.name, "uses": step.uses, "data": data})
    return steps
