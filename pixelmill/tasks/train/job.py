"""One fine-tuning job: decide (skip / resume / start), train, save, evaluate, record.

``run_job(spec)`` is what the campaign flow runs, one Prefect task per job on a Ray
worker. A job that asks for several workers trains data-parallel under Ray Train's
``TorchTrainer`` (gloo on CPU, NCCL on GPUs); each worker runs ``train_worker`` and
rank 0 writes checkpoints, artifacts and samples. ``python -m pixelmill.tasks.train.job
SPEC.json`` runs a job spec directly in this process (what the resume tests kill).

A job spec is a plain dict made by the flow: ``id``, ``name``, ``method``, ``model``,
``settings`` (TrainSettings), ``concepts`` (Concept dicts with ``instance_prompt_text``,
``class_prompt_text`` and resolved ``class_data``), ``dir`` (the job's URL), ``cache``
(``latents``/``text`` URLs or None), ``eval`` (EvalSettings) and ``clip_model``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from pixelmill.config.campaign import prior_in_use
from pixelmill.datasets import storage
from pixelmill.tasks.train.checkpoint import JobStore
from pixelmill.tasks.train.data import (
    Sample,
    TrainingData,
    TrainingDataError,
    derived_seed,
    prompt_key,
    read_image_rows,
    row_prompts,
)
from pixelmill.tasks.train.optim import set_adamw_kernel
from pixelmill.tasks.watchdog import Watchdog

_log = logging.getLogger("pixelmill.train")

STATUS_FINISHED = "finished"
STATUS_RUNNING = "running"
STATUS_FAILED = "failed"


# -- data ----------------------------------------------------------------------------------

def load_training_data(spec: dict[str, Any]) -> TrainingData:
    """The job's samples from its datasets; raises ``TrainingDataError`` naming what is wrong."""
    from pixelmill import registry

    s, method = spec["settings"], spec["method"]
    declared = registry.get("train", method).meta
    data = TrainingData()
    for ci, c in enumerate(spec["concepts"]):
        what = f"concept {c['name']!r} instance_data"
        if declared.get("data") == "pairs":
            cols = (s["input_column"], s["instruction_column"])
            rows, skipped = read_image_rows(c["instance_data"], s["edited_column"], what, extra=cols)
            for r in rows:
                src = r.get(s["input_column"])
                src_bytes = src.get("bytes") if isinstance(src, dict) else src
                if not src_bytes or not r.get(s["instruction_column"]):
                    skipped.append({"id": r["id"], "dataset": c["instance_data"],
                                    "reason": "missing input image or instruction"})
                    continue
                data.instance.append(Sample(f"pair{ci}:{r['id']}", "pair", r[s["instruction_column"]], r["_bytes"],
                                            source=bytes(src_bytes), concept=ci, size=r["_size"]))
        else:
            col = c.get("instance_prompt_column")
            rows, skipped = read_image_rows(c["instance_data"], c.get("image_column", "image"), what,
                                            extra=(col,) if col else ())
            prompts = (row_prompts(rows, col, c["prompt_fields"], what) if col
                       else [c["instance_prompt_text"]] * len(rows))
            data.instance += [Sample(f"c{ci}:{r['id']}", "instance", p, r["_bytes"], concept=ci, size=r["_size"])
                              for p, r in zip(prompts, rows)]
        data.skipped += skipped
        uses_prior = prior_in_use(declared.get("prior"), s.get("with_prior_preservation"))
        if uses_prior and c.get("class_sources"):
            wanted = s["num_class_images"]
            for k, src in enumerate(c["class_sources"]):
                need = wanted - sum(x.concept == ci for x in data.klass)
                if need <= 0:
                    break
                col = c.get("class_prompt_column") if src["url"] == c.get("class_data") else None  # not generated
                cwhat = f"concept {c['name']!r} class images"
                crows, cskipped = read_image_rows(src["url"], "image", cwhat, extra=(col,) if col else (),
                                                  shard=src.get("shard"), allow_empty=True)
                crows = crows[:need]
                cprompts = (row_prompts(crows, col, {"class": c.get("class_word", "")}, cwhat, token=None)
                            if col else [c["class_prompt_text"]] * len(crows))
                # the source by its place, not its URL: the same class images draw the same wherever they lie
                data.klass += [Sample(f"class{ci}:{k}:{r['id']}", "class", p, r["_bytes"], concept=ci,
                                      size=r["_size"]) for p, r in zip(cprompts, crows)]
                data.skipped += cskipped
            used = sum(x.concept == ci for x in data.klass)
            data.prior.append({"concept": c["name"], "wanted": wanted, "used": used})
            warning = prior_shortfall(c["name"], used, wanted, s.get("prior_shortfall", "error"), c["class_sources"])
            if warning:
                data.warnings.append(warning)
        elif uses_prior and s.get("with_prior_preservation"):
            raise TrainingDataError(f"concept {c['name']!r}: with_prior_preservation needs class images "
                                    "(class_data, or let the campaign generate them)")
    if not data.instance:
        raise TrainingDataError(f"job {spec['name']!r}: no training samples")
    return data


def prior_shortfall(concept: str, used: int, wanted: int, policy: str, sources: list[dict[str, Any]]) -> str | None:
    """What to say about a concept trained with fewer class images than ``num_class_images``.

    Args:
        concept: the concept's name.
        used: usable class images found in its sources.
        wanted: ``num_class_images``.
        policy: the ``prior_shortfall`` setting (``error``, ``warn`` or ``strict``).
        sources: the concept's class image sources (named in the message).

    Returns:
        The warning to record (None when nothing is short).

    Raises:
        TrainingDataError: no class image at all under ``error`` or ``strict``, or any
            shortfall under ``strict``: the job fails with this reason.
    """
    if used >= wanted:
        return None
    where = ", ".join(src["url"] + (f" (shard {src['shard']})" if src.get("shard") else "") for src in sources)
    if used == 0:
        what = (f"concept {concept!r}: prior preservation has NO class image (0 of {wanted}: the downloads "
                f"failed or the safety checker rejected every generated image; see the rejects of {where})")
        if policy in ("error", "strict"):
            raise TrainingDataError(f"{what}; refusing to train without the prior (prior_shortfall: {policy}); "
                                    "set prior_shortfall: warn to train without it, or with_prior_preservation: "
                                    "false")
        return f"{what}: trained WITHOUT the prior"
    what = f"concept {concept!r}: prior preservation with only {used} of {wanted} class images (from {where})"
    if policy == "strict":
        raise TrainingDataError(f"{what}; refusing a short prior (prior_shortfall: strict); set prior_shortfall: "
                                "error or warn to train on the images there are")
    return what


# -- caches --------------------------------------------------------------------------------

def cache_key(spec: dict[str, Any], kind: str) -> str:
    """Jobs share a cache when the model, data and image geometry (or prompts) match."""
    s = spec["settings"]
    parts = {"model": spec.get("model_hash", spec["model"]), "data": spec.get("data_hashes"), "kind": kind}
    if kind == "latents":
        parts.update({k: s[k] for k in ("resolution", "aspect_buckets", "center_crop")})
    else:
        parts["concepts"] = [(c["instance_prompt_text"], c["class_prompt_text"])
                             + tuple(c[k] for k in ("instance_prompt_column", "class_prompt_column") if c.get(k))
                             for c in spec["concepts"]]
        parts["rescale"] = s["rescale"]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cache_allowed(spec: dict[str, Any], method) -> dict[str, bool]:
    s = spec["settings"]
    return {"latents": bool(s["cache_latents"] and s["center_crop"] and not s["rescale"]),
            "text": bool(s["cache_text_embeddings"] and method.text_is_fixed())}


def build_caches(trainer, data: TrainingData, method, allowed: dict[str, bool]) -> tuple[dict | None, dict | None]:
    """VAE posteriors of every sample (both flips) and embeddings of every fixed prompt."""
    from PIL import Image

    from pixelmill.tasks.train.data import _cover_crop, _open, pixel_tensor

    latents = None
    if allowed["latents"]:
        from pixelmill.tasks.train.data import nearest_bucket

        latents, items, n = {}, data.instance + data.klass, max(1, trainer.settings["train_batch_size"])
        for j in range(0, len(items), n):  # n samples (2n images: both flips) per VAE call of one size
            keys, pixels = [], []
            for x in items[j:j + n]:
                bucket = (trainer.buckets[nearest_bucket(x.size, trainer.buckets)]
                          if trainer.settings["aspect_buckets"] else trainer.buckets[0])
                img, _, _ = _cover_crop(_open(x.image), None, bucket, True, None)
                for flip in (False, True):
                    keys.append((x.id, flip))
                    pixels.append(pixel_tensor(img.transpose(Image.FLIP_LEFT_RIGHT) if flip else img))
            for key, (mean, std) in zip(keys, trainer.posteriors(pixels)):  # own copies: no shared storage
                latents[key] = (mean.to("cpu", copy=True), std.to("cpu", copy=True))
    text = None
    if allowed["text"]:
        prompts = sorted({x.prompt for x in data.instance + data.klass} | {""})
        if trainer.settings["rescale"]:
            prompts = sorted(set(prompts) | {p + q for q in prompts for p in
                                             ("a far away ", "very small ", "zoomed in ", "close up ")})
        text = {}
        for i in range(0, len(prompts), 16):
            chunk = prompts[i:i + 16]
            text.update(trainer.encode_text(chunk).cache_entries([prompt_key(p) for p in chunk]))
    return latents, text


def _cache_to_bytes(latents: dict | None, text: dict | None) -> tuple[bytes | None, bytes | None]:
    from safetensors.torch import save

    lb = tb = None
    if latents is not None:
        flat = {}
        for (sid, flip), (m, sd) in latents.items():
            flat[f"{sid}|{int(flip)}|mean"], flat[f"{sid}|{int(flip)}|std"] = m.contiguous(), sd.contiguous()
        lb = save(flat)
    if text is not None:
        tb = save({k: e.contiguous() for k, e in text.items()})
    return lb, tb


def _cache_from_storage(spec: dict[str, Any]) -> tuple[dict | None, dict | None]:
    from safetensors.torch import load

    cache = spec.get("cache") or {}
    latents = text = None
    if cache.get("latents") and storage.exists(cache["latents"]):
        flat = load(storage.read_bytes(cache["latents"]))
        latents = {}
        for k, v in flat.items():
            sid, flip, part = k.rsplit("|", 2)
            latents.setdefault((sid, flip == "1"), [None, None])[0 if part == "mean" else 1] = v
        latents = {k: tuple(v) for k, v in latents.items()}
    if cache.get("text") and storage.exists(cache["text"]):
        text = load(storage.read_bytes(cache["text"]))
    return latents, text


def load_or_build_caches(spec, trainer, data, method) -> tuple[dict | None, dict | None]:
    """Read the job's caches from storage, building (and storing) the missing ones.

    In a data-parallel job with cache URLs, rank 0 builds what is missing and the other
    workers wait for it and read the stored files, so the work is done once.
    """
    allowed = cache_allowed(spec, method)
    if not any(allowed.values()):
        return None, None
    urls = spec.get("cache") or {}
    shared = trainer.world > 1 and all(urls.get(k) for k, on in allowed.items() if on)
    if shared and trainer.rank != 0:
        import torch.distributed as dist

        dist.barrier()  # rank 0 has stored every missing cache
        return _allowed_only(_cache_from_storage(spec), allowed)
    latents, text = _cache_from_storage(spec)
    need = {"latents": allowed["latents"] and latents is None, "text": allowed["text"] and text is None}
    if any(need.values()):
        built = build_caches(trainer, data, method, need)
        lb, tb = _cache_to_bytes(*built)
        for kind, blob in (("latents", lb), ("text", tb)):
            if blob is not None and urls.get(kind):
                tmp = f"{urls[kind]}.{os.getpid()}.tmp"
                storage.write_bytes(tmp, blob)
                storage.move(tmp, urls[kind])
        latents = latents if latents is not None else built[0]
        text = text if text is not None else built[1]
    if shared:
        import torch.distributed as dist

        dist.barrier()
    return _allowed_only((latents, text), allowed)


def _allowed_only(caches: tuple[dict | None, dict | None], allowed: dict[str, bool]):
    latents, text = caches
    return (latents if allowed["latents"] else None), (text if allowed["text"] else None)


def _setup(spec: dict[str, Any], device: torch.device, rank: int = 0, world: int = 1):
    from pixelmill.models.loading import load_training_components
    from pixelmill.tasks.train.core import Trainer
    from pixelmill.tasks.train.methods import make_method

    parts = load_training_components(spec["model"])
    method = make_method(spec["method"], parts, spec["settings"], spec["concepts"])
    with torch.random.fork_rng(devices=[]):
        # new weights (LoRA matrices) start the same on every worker and every attempt
        torch.manual_seed(derived_seed(spec["settings"]["seed"], "init"))
        method.setup()
    data = load_training_data(spec)
    for k in ("unet", "text_encoder", "text_encoder_2", "vae"):
        if parts.get(k) is not None:
            parts[k].to(device)
    vae_scale = 2 ** (len(parts["vae"].config.block_out_channels) - 1)
    multiple = vae_scale * 2 ** (len(parts["unet"].config.block_out_channels) - 1)
    trainer = Trainer(method, data, spec["settings"], device=device, rank=rank, world=world, vae_multiple=multiple)
    return method, data, trainer


def write_caches(spec: dict[str, Any]) -> list[str]:
    """Build the job's caches on storage (the flow's cache stage); returns the URLs written or found."""
    method, data, trainer = _setup(spec, _device(spec))
    load_or_build_caches(spec, trainer, data, method)
    return [u for u in (spec.get("cache") or {}).values() if u and storage.exists(u)]


# -- training -------------------------------------------------------------------------------

class PeakMemory:
    """Peak memory while training: CUDA allocated bytes, or this process's RSS sampled on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            import psutil

            proc = psutil.Process()

            def sample() -> None:
                while not self._stop.is_set():
                    self.peak = max(self.peak, proc.memory_info().rss)
                    self._stop.wait(0.02)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()

    @property
    def kind(self) -> str:
        return "cuda_max_allocated" if self.device.type == "cuda" else "process_rss"


def _device(spec: dict[str, Any]) -> torch.device:
    from pixelmill.models.device import resolve_device

    return resolve_device(spec["settings"].get("device", "auto"))


def train_worker(spec: dict[str, Any], rank: int = 0, world: int = 1, device: torch.device | None = None,
                 stop_at: int | None = None) -> dict[str, Any]:
    """Train (or resume) one job on this worker; rank 0 also saves artifacts and evaluates.

    Args:
        spec: the job spec (see the module docstring).
        rank / world: data-parallel place; torch.distributed is initialised when world > 1.
        device: defaults to the spec's device setting.
        stop_at: stop after this step without finishing (tests, benchmarks).
    """
    store = JobStore(spec["dir"])
    limits = spec.get("timeouts") or {}
    watchdog = Watchdog(limits.get("stall"), limits.get("job"), functools.partial(_record_timeout, store, rank),
                        what=f"job {spec['name']}" + (f" (rank {rank})" if world > 1 else "")).start()
    try:
        return _train(spec, store, watchdog, rank, world, device or _device(spec), stop_at)
    finally:
        watchdog.stop()


def _record_timeout(store: JobStore, rank: int, reason: str) -> None:
    """The watchdog's record of why it ended this worker (read by the flow and a rerun)."""
    _log.error("%s; the job resumes from its last checkpoint when the campaign is run again", reason)
    store.update_record(status=STATUS_FAILED, error=f"{reason}; rerun the campaign to resume it", timed_out=True)


def _train(spec, store, watchdog, rank, world, device, stop_at) -> dict[str, Any]:
    s = spec["settings"]
    method, data, trainer = _setup(spec, device, rank, world)
    if rank == 0:  # on the record as soon as the data is known, not only when the job ends
        store.update_record(prior=data.prior, warnings=data.warnings)
        for warning in data.warnings:
            _log.warning("job %s: %s", spec["name"], warning)
    trainer.latent_cache, trainer.text_cache = load_or_build_caches(spec, trainer, data, method)
    trainer.park_idle()  # the VAE / text encoders with everything cached: out of memory until sampling
    log = store.read_log()
    start = restore_checkpoint(store, method, trainer, device)
    log = [r for r in log if r["step"] <= start]
    end = min(s["max_steps"], stop_at) if stop_at is not None else s["max_steps"]
    t0 = time.perf_counter()
    with PeakMemory(device) as mem:
        for step in range(start, end):
            watchdog.beat(f"last finished step {step} of {s['max_steps']}")
            entry = trainer.step(step)
            if rank == 0 and (entry.step % s["log_every"] == 0 or entry.step == end):
                log.append({"step": entry.step, "loss": entry.loss, "instance_loss": entry.instance_loss,
                            "prior_loss": entry.prior_loss, "lr": entry.lr, "seconds": entry.seconds,
                            **({"grad_scale": entry.grad_scale} if entry.grad_scale is not None else {})})
            if entry.step % s["checkpoint_every"] == 0 or entry.step == s["max_steps"]:
                _checkpoint(store, trainer, method, entry.step, rank, world, log, s)
            if rank == 0 and s.get("validation_every") and entry.step % s["validation_every"] == 0:
                _validation(spec, method, trainer, data, entry.step, device)
    watchdog.disarm_stall()  # evaluation and saving follow, with no steps; the job timeout still applies
    seconds = time.perf_counter() - t0
    trainer.release()  # saved pipelines and samples use the base model's weights exactly
    out = {"rank": rank, "start_step": start, "end_step": end, "seconds": seconds, "peak_memory_bytes": mem.peak,
           "memory_kind": mem.kind, "skipped_rows": data.skipped, "prior": data.prior, "warnings": data.warnings,
           "steps_per_second": (end - start) / seconds if seconds > 0 and end > start else None}
    if rank == 0 and end == s["max_steps"]:
        out.update(_finish(spec, method, trainer, data, device))
    out["method_obj"] = method if world == 1 else None
    return out


def restore_checkpoint(store: JobStore, method, trainer, device: torch.device) -> int:
    """Load the job's last checkpoint into ``method`` and ``trainer``; returns its step (0: none).

    Restores the trained tensors, the optimiser, the EMA averages and the fp16 grad
    scaler (its scale and growth tracker), so the resumed steps are the ones an
    uninterrupted run would have taken.
    """
    steps = store.checkpoint_steps()
    if not steps:
        return 0
    ckpt = store.load_checkpoint(steps[-1])
    method.load_state(ckpt["model"])
    trainer.optimizer.load_state_dict(ckpt["optimizer"])
    set_adamw_kernel(trainer.optimizer)  # this machine's kernel, not the saving run's
    if trainer.ema is not None and ckpt["ema"] is not None:
        trainer.ema.shadow = {k: v.to(device) for k, v in ckpt["ema"].items()}
        trainer.ema.updates = ckpt["state"].get("ema_updates", steps[-1])
    trainer.load_scaler_state(ckpt["state"].get("grad_scaler"))
    return steps[-1]


def _checkpoint(store, trainer, method, step, rank, world, log, s) -> None:
    if rank == 0:
        ema = {k: v.detach().cpu() for k, v in trainer.ema.shadow.items()} if trainer.ema is not None else None
        extra = {"ema_updates": trainer.ema.updates if trainer.ema else 0}
        if trainer.scaler is not None:
            extra["grad_scaler"] = trainer.scaler_state()
        store.save_checkpoint(step, method.state(), trainer.optimizer.state_dict(), ema, extra, s["keep_checkpoints"])
        store.write_log(log)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _with_ema(trainer, fn):
    if trainer.ema is None:
        return fn()
    trainer.ema.swap(trainer.params)
    try:
        return fn()
    finally:
        trainer.ema.swap(trainer.params)


def _validation(spec, method, trainer, data, step, device) -> None:
    from pixelmill.tasks.train.evaluate import render_samples, write_samples

    s, e = spec["settings"], spec["eval"]
    prompts = s.get("validation_prompts") or e["prompts"][:1]
    was = trainer.unet.training
    trainer.unet.eval()
    with trainer.exact_weights():  # the base model as loaded: parked networks back, frozen weights fp32
        rows = _with_ema(trainer, lambda: render_samples(method, data, spec["concepts"], prompts, 1, e["steps"],
                                                         e["guidance_scale"], e["image_guidance_scale"], e["seed"],
                                                         s["resolution"], device))
    trainer.unet.train(was)
    write_samples(spec["dir"], f"step-{step:06d}", rows)


def _finish(spec, method, trainer, data, device) -> dict[str, Any]:
    """Save the artifacts (EMA weights where the method uses them) and evaluate."""
    from pixelmill.tasks.train.evaluate import clip_metrics, render_samples, write_samples

    s, e = spec["settings"], spec["eval"]
    trainer.eval_mode()
    local = storage.local_path(spec["dir"])
    tmp = Path(tempfile.mkdtemp(prefix="pixelmill-artifacts-", dir=local if local else None))
    try:
        files = _with_ema(trainer, lambda: method.save(tmp))
        storage.remove(storage.join(spec["dir"], "artifacts"))
        if local:
            os.replace(tmp, os.path.join(local, "artifacts"))
        else:
            storage.sync_dir(str(tmp), storage.join(spec["dir"], "artifacts"), last="")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = _with_ema(trainer, lambda: render_samples(method, data, spec["concepts"], e["prompts"],
                                                     e["samples_per_prompt"], e["steps"], e["guidance_scale"],
                                                     e["image_guidance_scale"], e["seed"], s["resolution"], device))
    metrics = clip_metrics(rows, data, spec.get("clip_model"), str(device))
    index = write_samples(spec["dir"], "final", rows)
    return {"artifacts": files, "metrics": metrics, "samples": index}


# -- the job entry ----------------------------------------------------------------------------

def job_state(spec: dict[str, Any]) -> tuple[str, int]:
    """(``finished`` | ``resume`` | ``new`` | ``retry``, last step) of a job from its storage."""
    store = JobStore(spec["dir"])
    rec = store.record()
    steps = store.checkpoint_steps()
    last = steps[-1] if steps else 0
    if rec and rec.get("status") == STATUS_FINISHED and rec.get("step", 0) >= spec["settings"]["max_steps"] \
            and storage.exists(store.path("artifacts")):
        return "finished", rec["step"]
    if rec and rec.get("status") == STATUS_FAILED:
        return "retry", last
    return ("resume", last) if last > 0 else ("new", 0)


def run_job(spec: dict[str, Any], stop_at: int | None = None) -> dict[str, Any]:
    """Run one job to ``max_steps`` (skipping a finished one), record it and return its summary."""
    state, last = job_state(spec)
    store = JobStore(spec["dir"])
    if state == "finished":
        rec = store.record()
        return {**rec, "skipped": True}
    rec = store.record() or {}
    attempts = rec.get("attempts", [])
    store.update_record(id=spec["id"], name=spec["name"], method=spec["method"], status=STATUS_RUNNING,
                        step=last, max_steps=spec["settings"]["max_steps"], settings=spec["settings"],
                        concepts=[c["name"] for c in spec["concepts"]], error=None,
                        attempts=attempts + [{"start_step": last, "started": time.time()}])
    try:
        if spec["settings"]["num_workers"] > 1:
            result = _run_data_parallel(spec, stop_at)
        else:
            result = train_worker(spec, stop_at=stop_at)
            result.pop("method_obj", None)
            result["nodes"] = [_node_id()]
    except Exception as e:  # noqa: BLE001 - recorded on the job, then re-raised for Prefect
        store.update_record(status=STATUS_FAILED, error=f"{type(e).__name__}: {e}")
        raise
    rec = store.record()
    attempts = rec["attempts"]
    attempts[-1].update({"end_step": result["end_step"], "seconds": result["seconds"],
                         "num_gpus": spec["settings"]["num_gpus"], "nodes": result.get("nodes") or []})
    finished = result["end_step"] >= spec["settings"]["max_steps"]
    total_seconds = sum(a.get("seconds", 0) for a in attempts)
    fields = dict(status=STATUS_FINISHED if finished else STATUS_RUNNING, step=result["end_step"],
                  attempts=attempts, seconds=total_seconds, peak_memory_bytes=max(
                      rec.get("peak_memory_bytes") or 0, result["peak_memory_bytes"]),
                  memory_kind=result["memory_kind"], skipped_rows=result["skipped_rows"],
                  prior=result.get("prior", []), warnings=result.get("warnings", []),
                  steps_per_second=result["steps_per_second"])
    if finished:
        fields.update(artifacts=result.get("artifacts"), metrics=result.get("metrics"), samples=result.get("samples"))
    return {**store.update_record(**fields), "skipped": False, "start_step": result["start_step"]}


def _rank_worker(spec: dict[str, Any], stop_at: int | None, rank: int, world: int, device) -> None:
    """One data-parallel worker of a job; rank 0 leaves its summary beside the job for ``run_job``."""
    out = train_worker(spec, rank=rank, world=world, device=device, stop_at=stop_at)
    out.pop("method_obj", None)
    if rank == 0:
        storage.write_text_atomic(storage.join(spec["dir"], ".worker-result.json"), json.dumps(out, default=str))


def _run_data_parallel(spec: dict[str, Any], stop_at: int | None) -> dict[str, Any]:
    """Run ``train_worker`` on ``num_workers`` Ray Train workers and return rank 0's summary."""
    from pixelmill.tasks.ray_train import run_data_parallel

    s = spec["settings"]
    # the flow resolves ``auto`` on the cluster; a spec run as it is (``auto`` left) claims no GPUs
    gpus = s["num_gpus"] if isinstance(s["num_gpus"], int | float) else 0.0
    nodes = run_data_parallel(functools.partial(_rank_worker, spec, stop_at), name=f"pixelmill-{spec['id']}",
                              num_workers=s["num_workers"], cpus_per_worker=s["cpus_per_worker"], num_gpus=gpus)
    url = storage.join(spec["dir"], ".worker-result.json")
    result = json.loads(storage.read_text(url))
    storage.remove(url)
    return {**result, "nodes": nodes}


def _node_id() -> str | None:
    from pixelmill.tasks.ray_train import current_node_id

    return current_node_id()


def main(argv: list[str] | None = None) -> int:
    """``python -m pixelmill.tasks.train.job SPEC.json``: run one job spec in this process."""
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 1:
        print("usage: python -m pixelmill.tasks.train.job SPEC.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(args[0]).read_text())
    summary = run_job(spec)
    print(json.dumps({k: summary.get(k) for k in ("id", "status", "step", "start_step", "skipped")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
