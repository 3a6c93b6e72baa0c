"""Planning a fine-tuning campaign: expand jobs, give each its id, and read its state.

No Prefect and no models here: ``pixelmill finetune --dry-run`` and ``finetune status``
use this as is, and the flow (``flows/finetune.py``) runs what it plans.

A job's id hashes what changes its weights: the method, the base model's fingerprint,
the content of its datasets (their manifests, not their paths), the concept's tokens and
prompts and the weight-affecting settings. Not hashed: evaluation prompts, paths, GPU or
worker counts, caching, checkpoint frequency and ``max_steps`` (so raising ``max_steps``
on a finished job resumes it).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from pixelmill.config import CampaignConfig, ExpandedJob, train_method
from pixelmill.config.campaign import method_families, prior_in_use
from pixelmill.datasets import storage

RETRIEVAL_DIR = "retrieval"


@dataclass
class JobPlan:
    """One job of the plan: its spec, state and what the run will do with it."""

    spec: dict[str, Any]
    state: str  # new | resume | finished | retry
    last_step: int

    @property
    def action(self) -> str:
        return {"finished": "skip", "resume": "resume", "retry": "retry", "new": "run"}[self.state]

    def describe(self) -> str:
        s = self.spec
        why = {"finished": f"finished at step {self.last_step} with the same id",
               "resume": f"resume from checkpoint at step {self.last_step}",
               "retry": f"failed before; retry from step {self.last_step}",
               "new": "new"}[self.state]
        return (f"  {self.action:<6} {s['id']}  {s['name']:<40} {s['method']:<18} "
                f"{s['settings']['max_steps']:>6} steps  ({why})")


@dataclass
class ClassImageRequest:
    """Class images a prior-preservation job needs generated (only the missing ones)."""

    key: str
    model: str
    prompt: str
    count: int
    first_index: int
    resolution: int | tuple[int, int]
    seed: int
    url: str


@dataclass
class CampaignPlan:
    jobs: list[JobPlan] = field(default_factory=list)
    class_images: list[ClassImageRequest] = field(default_factory=list)
    retrieve: dict[str, Any] | None = None

    def describe(self) -> str:
        counts = {a: sum(j.action == a for j in self.jobs) for a in ("run", "resume", "retry", "skip")}
        lines = [f"{len(self.jobs)} job(s): {counts['run']} to run, {counts['resume']} to resume, "
                 f"{counts['retry']} to retry, {counts['skip']} finished (skipped)"]
        if self.retrieve:
            lines.append(f"  retrieval first: {len(self.retrieve['prompts'])} class prompt(s) "
                         f"-> {self.retrieve['output']}")
        for r in self.class_images:
            lines.append(f"  generate {r.count} class image(s) for {r.prompt!r} -> {r.url}")
        lines += [j.describe() for j in self.jobs]
        return "\n".join(lines)


def _hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def dataset_fingerprint(url: str) -> str:
    """A content fingerprint of a dataset: its manifest (config hash, shards and row counts),
    or the names and sizes of its Parquet files when it has none."""
    from pixelmill.datasets import read_manifest

    m = read_manifest(url)
    if m is not None:
        return _hash({"config": m.config_hash, "shards": [(s.name, s.rows) for s in m.shards]})[:16]
    fs, path = storage.resolve(url)
    if not fs.exists(path):
        return "missing"
    files = sorted((f, fs.size(f)) for f in fs.find(path) if f.endswith(".parquet"))
    return _hash([(f.rsplit("/", 1)[-1], size) for f, size in files])[:16]


def jobs_root(output: str) -> str:
    return storage.join(output, "jobs")


def retrieve_config(cfg: CampaignConfig) -> dict[str, Any] | None:
    """The campaign's retrieval config with its output under the campaign root."""
    if not cfg.retrieve:
        return None
    return {**cfg.retrieve, "output": storage.join(cfg.output, RETRIEVAL_DIR)}


def _class_sources(cfg: CampaignConfig, name: str) -> list[dict[str, Any]]:
    c = cfg.concepts[name]
    if not c.class_data:
        return []
    if c.class_data == "retrieval":
        from pixelmill.datasets import stable_id

        rc = retrieve_config(cfg)
        # the retrieval flow's images/ dataset has one shard per class prompt (flows/retrieve.prompt_id)
        return [{"url": storage.join(rc["output"], "images"), "shard": stable_id("prompt", c.class_text().strip()),
                 "retrieval": True}]
    return [{"url": c.class_data}]


def _count_class_images(sources: list[dict[str, Any]]) -> int:
    from pixelmill.datasets import Dataset

    n = 0
    for src in sources:
        try:
            ds = Dataset.open(src["url"])
        except FileNotFoundError:
            continue
        names = [src["shard"]] if src.get("shard") else ds.shard_names()
        n += sum(ds.shard_rows(s) for s in names if s in ds.shard_names())
    return n


def _complete(url: str) -> bool:
    from pixelmill.datasets import read_manifest

    m = read_manifest(url)
    return bool(m is not None and m.complete)


def uses_prior(job: ExpandedJob) -> bool:
    """Methods that declare a prior use it unless it is turned off (LoRA: only when turned on; ``prior_in_use``)."""
    return prior_in_use(train_method(job.method).meta.get("prior"), job.settings.with_prior_preservation)


def plan_campaign(cfg: CampaignConfig, model_hash=None) -> CampaignPlan:
    """Expand the campaign, fingerprint data and models, and read every job's state.

    Args:
        cfg: the validated campaign.
        model_hash: ``model -> fingerprint`` (defaults to ``models.loading.model_fingerprint``).
    """
    from pixelmill.models.loading import model_fingerprint
    from pixelmill.tasks.train.job import cache_key, job_state

    fingerprint = model_hash or model_fingerprint
    plan = CampaignPlan(retrieve=retrieve_config(cfg))
    fp_cache: dict[str, str] = {}

    def fp(url: str) -> str:
        if url not in fp_cache:
            fp_cache[url] = dataset_fingerprint(url)
        return fp_cache[url]

    model_fps: dict[str, str] = {}
    families: dict[str, str | None] = {}
    requests: dict[str, ClassImageRequest] = {}
    for job in cfg.expand():
        if job.model not in model_fps:
            model_fps[job.model] = fingerprint(job.model)
            families[job.model] = _family_of(job.model)
        concepts, data_hashes = [], {}
        for name in job.concepts:
            c = cfg.concepts[name]
            sources = _class_sources(cfg, name) if uses_prior(job) else []
            entry = {**c.model_dump(), "name": name, "instance_prompt_text": c.instance_text(job.method),
                     "prompt_fields": c.prompt_fields(job.method),
                     "class_prompt_text": c.class_text(), "class_sources": sources}
            # retrieval output may not exist yet: it is named by the retrieval config, not its content
            data_hashes[name] = {"instance": fp(c.instance_data),
                                 "class": [(_hash(cfg.retrieve)[:16] if s.get("retrieval") else fp(s["url"]),
                                            s.get("shard")) for s in sources]}
            if uses_prior(job):
                need = job.settings.num_class_images
                retrieval = any(s.get("retrieval") for s in sources)
                have = need if retrieval else _count_class_images(sources)
                if have < need:
                    key = _hash({"model": model_fps[job.model], "prompt": c.class_text(), "from": have, "to": need,
                                 "resolution": job.settings.resolution, "seed": job.settings.seed})[:16]
                    url = storage.join(cfg.output, "class_images", key, "images")
                    if not _complete(url):
                        requests.setdefault(key, ClassImageRequest(key, job.model, c.class_text(), need - have,
                                                                   have, job.settings.resolution,
                                                                   job.settings.seed, url))
                    entry["class_sources"] = sources + [{"url": url}]
                    data_hashes[name]["class"].append(("generated", key))
            concepts.append(entry)
        job_id = _hash(job.weight_affecting(cfg.concepts, model_fps[job.model], data_hashes))[:12]
        spec = {
            "id": job_id, "name": job.name, "method": job.method, "model": job.model,
            "family": families[job.model],
            "model_hash": model_fps[job.model], "data_hashes": data_hashes,
            "settings": job.settings.model_dump(), "concepts": concepts,
            "dir": storage.join(jobs_root(cfg.output), job_id),
            "eval": cfg.eval.model_dump(), "clip_model": cfg.clip_model,
            "timeouts": cfg.timeouts.model_dump(),
        }
        spec["cache"] = {
            "latents": storage.join(cfg.output, "cache", f"latents-{cache_key(spec, 'latents')}.safetensors")
            if job.settings.cache_latents else None,
            "text": storage.join(cfg.output, "cache", f"text-{cache_key(spec, 'text')}.safetensors")
            if job.settings.cache_text_embeddings else None,
        }
        state, last = job_state(spec)
        plan.jobs.append(JobPlan(spec, state, last))
    ids = [j.spec["id"] for j in plan.jobs]
    dupes = {i for i in ids if ids.count(i) > 1}
    if dupes:
        names = [j.spec["name"] for j in plan.jobs if j.spec["id"] in dupes]
        raise ValueError(f"jobs {names} have identical weight-affecting settings (same id); remove the duplicates")
    plan.class_images = list(requests.values())
    return plan


def check_campaign_inputs(cfg: CampaignConfig) -> None:
    """Errors a campaign would hit only once training starts, found now (``ValueError`` naming them).

    Checks each job's method supports its model's family (``models/family.py``: the model's
    configs are read, no weights), every concept's datasets (present, with rows and the
    columns its jobs read), and the tokens each job adds (a Textual Inversion or Custom
    Diffusion initializer must be one token; new tokens must not exist yet).
    """
    from pixelmill.datasets import Dataset
    from pixelmill.tasks.train.methods import RARE_TOKENS

    problems: list[str] = []
    checked: set[tuple[str, tuple[str, ...]]] = set()
    tokenizers: dict[str, Any] = {}
    infos: dict[str, Any] = {}
    for job in cfg.expand():
        family_problem = _family_problem(job, infos)
        if family_problem:
            problems.append(family_problem)
        for i, name in enumerate(job.concepts):
            c = cfg.concepts[name]
            s = job.settings
            declared = train_method(job.method).meta
            cols = ((s.edited_column, s.input_column, s.instruction_column) if declared.get("data") == "pairs"
                    else (c.image_column,) + ((c.instance_prompt_column,) if c.instance_prompt_column else ()))
            key = (c.instance_data, cols)
            if key not in checked:
                checked.add(key)
                try:
                    ds = Dataset.open(c.instance_data)
                    have = ds.schema.names if ds.shard_names() else []
                    missing = [col for col in cols if col not in have]
                    if not ds.shard_names() or ds.num_rows == 0:
                        problems.append(f"concept {name!r}: instance_data {c.instance_data} has no rows")
                    elif missing:
                        problems.append(f"concept {name!r}: instance_data {c.instance_data} has no column(s) "
                                        f"{missing} (job {job.name!r}, {job.method}); it has {have}")
                    elif c.instance_prompt_column and not _is_text(ds.schema.field(c.instance_prompt_column).type):
                        problems.append(f"concept {name!r}: instance_prompt_column {c.instance_prompt_column!r} of "
                                        f"{c.instance_data} holds {ds.schema.field(c.instance_prompt_column).type}, "
                                        "not text (strings)")
                except FileNotFoundError as e:
                    problems.append(f"concept {name!r}: instance_data: {e}")
            if c.class_data and c.class_data != "retrieval" and uses_prior(job):
                try:
                    cds = Dataset.open(c.class_data)
                    ccol, names = c.class_prompt_column, cds.schema.names if cds.shard_names() else []
                    if ccol and ccol not in names:
                        problems.append(f"concept {name!r}: class_data {c.class_data} has no class_prompt_column "
                                        f"{ccol!r}; it has {names}")
                    elif ccol and not _is_text(cds.schema.field(ccol).type):
                        problems.append(f"concept {name!r}: class_prompt_column {ccol!r} of {c.class_data} holds "
                                        f"{cds.schema.field(ccol).type}, not text (strings)")
                except FileNotFoundError as e:
                    problems.append(f"concept {name!r}: class_data: {e}")
            if declared.get("new_tokens"):
                tok = tokenizers.get(job.model)
                if tok is None:
                    tok = tokenizers[job.model] = _tokenizer(job.model)
                if tok is None:
                    continue
                init = c.initializer_token or (c.class_word if declared.get("initializer") == "class_word"
                                               else RARE_TOKENS[i % len(RARE_TOKENS)])
                if not init:
                    problems.append(f"concept {name!r}: textual_inversion needs initializer_token or class_word")
                else:
                    ids = tok.encode(init, add_special_tokens=False)
                    if len(ids) != 1:
                        problems.append(f"concept {name!r}: initializer_token {init!r} is {len(ids)} tokens "
                                        f"{tok.convert_ids_to_tokens(ids)}; it must be exactly one token")
                if len(tok.encode(c.token, add_special_tokens=False)) == 1 and c.token in tok.get_vocab():
                    problems.append(f"concept {name!r}: token {c.token!r} already exists in the tokenizer; "
                                    "choose a new placeholder such as '<my-dog>'")
    if problems:
        raise ValueError("the campaign cannot start:\n  " + "\n  ".join(dict.fromkeys(problems)))


def _is_text(arrow_type) -> bool:
    import pyarrow as pa

    return pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type)


def _family_of(model: str) -> str | None:
    """The model's family (``models/family.py``) for the results table; None when its configs cannot tell."""
    from pixelmill.models.family import UnsupportedFamily, describe_model
    from pixelmill.models.loading import ModelNotFound

    try:
        return describe_model(model).family
    except (UnsupportedFamily, ModelNotFound, OSError, ValueError):
        return None


def _family_problem(job: ExpandedJob, infos: dict[str, Any]) -> str | None:
    """Why ``job``'s method cannot train its model's family (None when it can); ``infos`` caches per model."""
    from pixelmill.models.family import UnsupportedFamily, describe_model, require_family
    from pixelmill.models.loading import ModelNotFound

    if job.model not in infos:
        try:
            infos[job.model] = describe_model(job.model)
        except (UnsupportedFamily, ModelNotFound) as e:
            infos[job.model] = e
    info = infos[job.model]
    if isinstance(info, Exception):
        return f"job {job.name!r}: model: {info}"
    try:
        require_family(info, method_families(job.method), f"job {job.name!r}: training method {job.method!r}",
                       job.model)
    except UnsupportedFamily as e:
        return str(e)
    return None


def _tokenizer(model: str):
    """The model's tokenizer from a local folder (None for hub ids: checked when the job loads it)."""
    from pathlib import Path

    folder = Path(model) / "tokenizer"
    if not folder.is_dir():
        return None
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(folder))
