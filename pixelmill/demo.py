"""``pixelmill demo``: every pipeline that exists, on toy-world images and the toy models shipped in the package.

Writes 12 toy-world images (32x32, one coloured shape each, with ``shape``/``color``
labels) plus one broken row (to show rejects), starts the embedded runtime (local Ray +
a Prefect API server on 127.0.0.1) and runs, on the trained toy models ``toy:sd`` and
``toy:clip``: SDEdit colour changes at two strengths and with the t0 search, instruction
pairs (template writer, Prompt-to-Prompt, CLIP filter), exactly-N retrieval from a toy
pool served on 127.0.0.1, a fine-tuning campaign (Textual Inversion, LoRA, DreamBooth)
on the held-out heart shape and a bulk edit with its adapters, and the two video edits.
InstructPix2Pix runs on ``toy:ip2p`` (trained from toy:sd on toy instruction pairs): a bulk edit,
and the pairs -> fine-tune -> edit pipeline, a small version of ``configs/pipeline-toy-ip2p.yaml``.
"""

from __future__ import annotations

import time
from pathlib import Path

import yaml

from pixelmill.config import EditConfig

DEMO_SEED = 164
"""World seed of the demo's input images: its 13 rows (12 + the broken one) show all five shapes and never use
green, as object or background, so "a green {shape} on a {background} background" is always a change."""
CONCEPT_SEED = 21
POOL_SEED = 7
TOY_RES = 32
TOY_SAMPLING = {"steps": 20, "guidance_scale": 4.0}
COLOR_PROMPT = "a green {shape} on a {background} background"
STRENGTHS = (0.5, 0.8)
VIDEO_PROMPT = "a large green circle on a white and blue background"
RETRIEVAL_PROMPTS = ("a red circle", "a blue square")
CONCEPT = "heart"
# LoRA and DreamBooth steps: enough to draw the heart (2026-12-05: LoRA 6 of 8 samples, DreamBooth's edit 9 of 12)
CAMPAIGN_STEPS = 300
IP2P = "InstructPix2Pix on toy:ip2p: 'make the {shape} green'"


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def _write_config(root: Path, name: str, cfg) -> None:
    data = cfg if isinstance(cfg, dict) else cfg.model_dump(exclude_defaults=True, exclude={"runtime"})
    (root / "configs").mkdir(parents=True, exist_ok=True)
    (root / "configs" / f"{name}.yaml").write_text(yaml.safe_dump(data, sort_keys=False))


def demo_configs(root: Path, models: dict[str, str]) -> dict[str, EditConfig]:
    """The demo's bulk-edit configs (also written as YAML next to the outputs), by report title."""
    images = str(root / "datasets" / "images")
    common = dict(input=images, resolution=TOY_RES, batch_size=4, seed=0, clip_model=models["clip"], workers=1)
    toy = dict(common, method="sdedit", model=models["sd"], **TOY_SAMPLING)
    cfgs = {f"SDEdit on toy:sd, strength {s}: '{COLOR_PROMPT}'": EditConfig(
        **toy, output=str(root / "datasets" / f"edit-sdedit-{s}"), prompt=COLOR_PROMPT, strength=s)
        for s in STRENGTHS}
    cfgs[f"SDEdit t0 search on toy:sd (strength auto, target L2 0.2): '{COLOR_PROMPT}'"] = EditConfig(
        **toy, output=str(root / "datasets" / "edit-sdedit-auto"), prompt=COLOR_PROMPT, strength="auto",
        target_l2=0.2)
    cfgs[IP2P] = EditConfig(
        **common, output=str(root / "datasets" / "edit-ip2p"), method="instruct_pix2pix",
        model=models["instruct_pix2pix"], instruction="make the {shape} green", steps=TOY_SAMPLING["steps"],
        guidance_scale=TOY_SAMPLING["guidance_scale"], image_guidance_scale=1.5)
    names = [f"edit-sdedit-{s}" for s in STRENGTHS] + ["edit-sdedit-auto", "edit-ip2p"]
    for name, cfg in zip(names, cfgs.values()):
        _write_config(root, name, cfg)
    return cfgs


def detector_readout(edited_url: str, input_url: str) -> list[tuple[object, dict]]:
    """What the toy detectors (``pixelmill.toy.detect``) read from each edited image of an edit output,
    beside the input row's labels: ``(Detection, {"shape": ..., "color": ...})`` per edited row."""
    import io

    from PIL import Image

    from pixelmill.datasets import Dataset
    from pixelmill.toy.detect import detect

    labels = {r.pop("id"): r for r in Dataset.open(input_url).to_table(columns=["id", "shape", "color"]).to_pylist()}
    out = []
    for r in Dataset.open(edited_url).to_table(columns=["id", "edited_image"]).to_pylist():
        image = Image.open(io.BytesIO(r["edited_image"]["bytes"])).convert("RGB")
        out.append((detect(image), labels.get(r["id"], {})))
    return out


def green_readout(edited_url: str, input_url: str) -> str:
    """The toy detectors' verdict on a "make it green" edit output: how many read green and keep their shape."""
    read = detector_readout(edited_url, input_url)
    green = sum(d.color == "green" for d, _ in read)
    kept = sum(d.shape == lab.get("shape") for d, lab in read)
    return f"{green}/{len(read)} read green, {kept}/{len(read)} keep their shape"


def retrieval_precision(images_url: str) -> dict[str, int]:
    """Per prompt, how many retrieved images' captions name the prompt's colour and shape (toy grammar)."""
    from pixelmill.datasets import Dataset
    from pixelmill.toy.world import parse_caption

    right: dict[str, int] = {}
    for r in Dataset.open(images_url).to_table(columns=["prompt", "caption"]).to_pylist():
        want, got = parse_caption(r["prompt"]), parse_caption(r["caption"])
        ok = (want["color"], want["shape"]) == (got["color"], got["shape"])
        right[r["prompt"]] = right.get(r["prompt"], 0) + ok
    return right


def _demo_retrieval(root: Path, models: dict[str, str], notes: list[str]) -> str:
    """Build a toy pool with ``toy:clip`` from images served on 127.0.0.1; retrieve exactly N per prompt."""
    from pixelmill.config import RetrieveConfig
    from pixelmill.datasets.storage import remove
    from pixelmill.flows.pool import build_pool_flow
    from pixelmill.flows.retrieve import retrieve_flow
    from pixelmill.samples import LoopbackFileServer
    from pixelmill.toy.samples import write_toy_pool_source

    web = root / "web"
    targets = [tuple(p.split()[1:]) for p in RETRIEVAL_PROMPTS]
    with LoopbackFileServer(str(web)) as server:
        rows = write_toy_pool_source(str(web / "toy"), server.base_url + "/toy", str(root / "datasets" / "pool-src"),
                                     targets=targets, seed=POOL_SEED)
        _say(f"regularization retrieval: a toy pool of {rows} images (6 of each prompt's colour and shape, "
             f"near misses, others) served at {server.base_url}, embedded with toy:clip (pixelmill pool build)")
        remove(str(root / "datasets" / "pool"))
        build_pool_flow(dataset=str(root / "datasets" / "pool-src"), out=str(root / "datasets" / "pool"),
                        clip_model=models["clip"], batch_size=16)
        cfg = RetrieveConfig(prompts=list(RETRIEVAL_PROMPTS), pool=str(root / "datasets" / "pool"),
                             clip_model=models["clip"], output=str(root / "datasets" / "regularization"),
                             num_images=4, threshold=0.85, resolution=TOY_RES,
                             download={"allow_loopback": True, "timeout": 5})
        _write_config(root, "retrieve", cfg)
        remove(cfg.output)
        summary = retrieve_flow(cfg.model_dump())
        right = retrieval_precision(str(root / "datasets" / "regularization" / "images"))
        for s in summary.prompts.values():
            line = (f"{s['found']} pool captions above {cfg.threshold}, {s['downloaded']} downloaded (exactly "
                    f"{cfg.num_images} wanted), {right.get(s['prompt'], 0)} of them with the prompt's colour and shape")
            _say(f"  {s['prompt']!r}: {line}")
            notes.append(f"retrieval {s['prompt']!r} from {rows} toy pool images: {line}")
        for prompt, folder in summary.exported.items():
            _say(f"  --real_prior folder for {prompt!r}: {folder}")
    return str(root / "datasets" / "regularization" / "images")


def demo_campaign(root: Path, models: dict[str, str]) -> dict:
    """The demo's fine-tuning campaign on the held-out heart (also written as ``configs/finetune.yaml``)."""
    from pixelmill.samples import draw_concept_images, write_image_dataset
    from pixelmill.toy.samples import write_toy_concept

    concept = str(root / "datasets" / f"concept-{CONCEPT}")
    write_toy_concept(concept, shape=CONCEPT, count=6, seed=CONCEPT_SEED)
    # the shipped configs/finetune.yaml (tiny model) trains on this drawn concept
    write_image_dataset(str(root / "datasets" / "concept-dog"), draw_concept_images(6, seed=0))
    cfg = {
        "output": str(root / "campaign"), "model": models["sd"], "clip_model": models["clip"],
        "concepts": {CONCEPT: {"instance_data": concept, "token": f"<{CONCEPT}>", "class_word": "shape"},
                     f"{CONCEPT}-db": {"instance_data": concept, "token": "sks", "class_word": "shape"}},
        "defaults": {"resolution": TOY_RES, "max_steps": CAMPAIGN_STEPS, "train_batch_size": 2, "learning_rate": 1e-3,
                     "checkpoint_every": 100, "num_class_images": 2, "center_crop": True, "random_flip": False,
                     "cache_latents": True, "cache_text_embeddings": True},
        # Textual Inversion only finds an embedding for what the frozen model can draw, never a heart
        # (README "Quality"), so it stays short.
        "jobs": [{"name": f"{CONCEPT}-textual-inversion", "method": "textual_inversion", "concepts": [CONCEPT],
                  "settings": {"learning_rate": 5e-3, "max_steps": 50}},
                 {"name": f"{CONCEPT}-lora", "method": "lora", "concepts": [CONCEPT]},
                 {"name": f"{CONCEPT}-dreambooth", "method": "dreambooth", "concepts": [f"{CONCEPT}-db"],
                  "settings": {"learning_rate": 2e-4}}],
        "eval": {"prompts": ["a photo of {concept}", "a red {concept}"], "samples_per_prompt": 8,
                 "steps": TOY_SAMPLING["steps"], "guidance_scale": TOY_SAMPLING["guidance_scale"]},
    }
    _write_config(root, "finetune", cfg)
    return cfg


def campaign_readout(job_dir: str) -> str:
    """What the toy detectors read from a campaign job's final samples, per eval prompt: how many draw the
    concept's shape (and, where the prompt names a colour, that shape in that colour)."""
    import json

    from PIL import Image

    from pixelmill.datasets import storage
    from pixelmill.toy import world
    from pixelmill.toy.detect import detect

    by_prompt: dict[str, list] = {}
    for sample in json.loads(storage.read_text(storage.join(job_dir, "job.json"))).get("samples") or []:
        image = Image.open(storage.local_path(storage.join(job_dir, sample["file"]))).convert("RGB")
        by_prompt.setdefault(sample["prompt"], []).append(detect(image))
    parts = []
    for prompt, found in by_prompt.items():
        colour = next((c for c in world.COLORS if f" {c} " in f" {prompt} "), None)
        shaped = sum(d.shape == CONCEPT for d in found)
        part = f"'{prompt}' {shaped}/{len(found)} {CONCEPT}s"
        if colour:
            part += f" ({sum(d.shape == CONCEPT and d.color == colour for d in found)} {colour})"
        parts.append(part)
    return "; ".join(parts)


def _demo_finetune(root: Path, models: dict[str, str], notes: list[str]) -> tuple[str, str]:
    """Train three jobs on toy:sd (DreamBooth generating its class images), read their samples, then
    bulk-edit with the DreamBooth model: every object becomes the heart it learnt, in the object's colour."""
    from pixelmill.config import CampaignConfig
    from pixelmill.datasets.storage import join, remove
    from pixelmill.flows.bulk_edit import bulk_edit_flow
    from pixelmill.flows.finetune import finetune_flow
    from pixelmill.tasks.train.plan import plan_campaign

    cfg = demo_campaign(root, models)
    remove(cfg["output"])
    _say(f"fine-tuning campaign on toy:sd: the {CONCEPT} it never saw (6 toy images), LoRA and DreamBooth "
         f"(+2 generated class images) {CAMPAIGN_STEPS} steps each, Textual Inversion 50, at {TOY_RES}px")
    summary = finetune_flow(cfg)
    _say(f"  {len(summary.ran)} jobs trained, {summary.class_images} class images generated; "
         f"results: {summary.results}")
    notes.append(f"campaign: {len(summary.ran)} jobs trained, report {summary.report}")
    jobs = {j.spec["name"]: j.spec["dir"] for j in plan_campaign(CampaignConfig.model_validate(cfg)).jobs}
    for name, job_dir in jobs.items():
        line = f"{name} samples, toy detectors: {campaign_readout(job_dir)}"
        _say(f"  {line}")
        notes.append(line)
    prompt = "a {color} sks shape on a {background} background"
    edit = EditConfig(input=str(root / "datasets" / "images"), output=str(root / "datasets" / "edit-dreambooth"),
                      method="sdedit", model=join(jobs[f"{CONCEPT}-dreambooth"], "artifacts"),
                      prompt=prompt, strength=0.8, resolution=TOY_RES, batch_size=4, seed=0,
                      clip_model=models["clip"], **TOY_SAMPLING)
    _write_config(root, "edit-dreambooth", edit)
    remove(edit.output)
    _say(f"bulk-edit with the campaign's DreamBooth model (a diffusers pipeline folder): '{prompt}' at strength 0.8")
    s = bulk_edit_flow(edit.model_dump(), show_progress=True)
    read = detector_readout(edit.output, edit.input)
    others = [(d, lab) for d, lab in read if lab.get("shape") != CONCEPT]  # inputs that were not hearts already
    hearts = sum(d.shape == CONCEPT for d, _ in others)
    colour = sum(d.color == lab.get("color") for d, lab in read)
    line = (f"{s.rows_in} rows in -> {s.rows_out} edited + {s.rejects} rejected; toy detectors: {hearts} of the "
            f"{len(others)} objects that were not {CONCEPT}s now read as one, {colour}/{len(read)} keep their colour")
    _say(f"  {line}")
    notes.append(f"bulk edit with the campaign's DreamBooth model: {line}")
    return summary.report, edit.output


def _demo_video(root: Path, models: dict[str, str], notes: list[str]) -> str:
    """Edit two toy clips through layered atlases; returns the homography run's report.

    A camera pan across a toy scene (a red circle on a white/blue background) goes through
    a homography atlas and SDEdit on ``toy:sd``; a red disk moving over a texture through
    a tiny neural atlas and a Text2Live layer (``toy:clip``) on its foreground. The clips
    are written as MP4 files; the pan also as a video dataset (bytes).
    """
    from pixelmill.config import VideoConfig
    from pixelmill.datasets.storage import remove
    from pixelmill.datasets.videos import write_video_dataset
    from pixelmill.flows.video import video_flow
    from pixelmill.tasks.video.io import encode_video
    from pixelmill.tasks.video.synthetic import synthetic_moving_shape
    from pixelmill.toy import world
    from pixelmill.toy.samples import toy_pan_clip

    clips = root / "videos"
    pan = toy_pan_clip(frames=8, shift=(1, 1))
    shape = synthetic_moving_shape(frames=8, size=(TOY_RES, TOY_RES), radius=7.0, velocity=(2.0, 1.0), fps=24,
                                   color=world.COLORS["red"])
    encode_video(pan.frames, pan.fps, clips / "toy-pan.mp4")
    encode_video(shape.frames, shape.fps, clips / "moving-shape.mp4")
    dataset = str(root / "datasets" / "videos")
    write_video_dataset(dataset, [("toy-pan", (clips / "toy-pan.mp4").read_bytes())])
    runs = {
        "homography": VideoConfig(
            input=dataset, output=str(root / "video-homography"), atlas={"method": "homography"},
            edit={"method": "sdedit", "model": models["sd"], "prompt": VIDEO_PROMPT, "strength": 0.5,
                  "resolution": TOY_RES, **TOY_SAMPLING}, placement={"cpus": 1}),
        "neural": VideoConfig(
            input=str(clips / "moving-shape.mp4"), output=str(root / "video-neural"),
            atlas={"method": "neural", "neural": {"preset": "tiny", "iterations": 300, "checkpoint_every": 100}},
            edit={"method": "text2live", "layer": "foreground", "prompt": "a blue circle", "clip_model": models["clip"],
                  "text2live": {"iterations": 30, "alpha_init": 0.5, "sparsity_weight": 0.1}}, placement={"cpus": 1}),
    }
    what = {"homography": f"{dataset} (an 8-frame camera pan across a red circle, 32x32): homography atlas, "
                          f"SDEdit '{VIDEO_PROMPT}' (strength 0.5) on the atlas with toy:sd",
            "neural": "a red disk moving over a texture (8 frames, 32x32): tiny neural atlas (background + "
                      "foreground, 300 steps), Text2Live layer 'a blue circle' with toy:clip on the foreground"}
    reports = {}
    for name, cfg in runs.items():
        _write_config(root, f"video-{name}", cfg)
        remove(cfg.output)
        _say(f"video editing through layered atlases, {what[name]}")
        s = video_flow(cfg.model_dump())
        rejected = "".join(f"; rejected {k}: {v}" for k, v in s.rejected.items())
        _say(f"  {s.videos} video(s) in -> {len(s.ran)} edited (same frames, size and fps), {len(s.failed)} failed"
             f"{rejected}; report: {s.report}")
        notes.append(f"video {name}: {len(s.ran)} of {s.videos} edited, report {s.report}")
        reports[name] = s.report
    return reports["homography"]


def demo_pipeline(root: Path, models: dict[str, str]) -> dict:
    """The demo's chained pipeline (also written as ``configs/pipeline-ip2p.yaml``), a small version of
    ``configs/pipeline-toy-ip2p.yaml``: instruction pairs on the toy models -> a few fine-tuning steps of the
    toy InstructPix2Pix (``toy:ip2p``, itself trained from toy:sd on such pairs) on them -> a bulk edit with it."""
    out = root / "pipeline-ip2p"
    return {"steps": [
        {"name": "pairs", "uses": "pairs", "with": {
            "input": str(root / "datasets" / "images"), "output": str(out / "pairs"), "seed": 0, "limit": 6,
            "text": {"options": {"edits": ["change_colour"]}},
            "images": {"model": models["sd"], "clip_model": models["clip"], "samples_per_caption": 1,
                       "steps": TOY_SAMPLING["steps"], "height": TOY_RES, "width": TOY_RES, "cfg_range": [3.0, 6.0],
                       "max_per_caption": 1, "min_image_similarity": 0.0, "min_direction": -1.0,
                       "min_image_caption": -1.0}}},
        {"name": "train", "uses": "finetune", "with": {
            "output": str(out / "campaign"), "model": models["instruct_pix2pix"],
            "concepts": {"edits": {"instance_data": "${steps.pairs.output}/pairs"}},
            "defaults": {"resolution": TOY_RES, "max_steps": 6, "train_batch_size": 2, "learning_rate": 1e-5,
                         "center_crop": True, "random_flip": False},
            "jobs": [{"name": "ip2p", "method": "instruct_pix2pix", "concepts": ["edits"]}],
            "eval": {"prompts": ["make the circle green"], "samples_per_prompt": 1, "steps": 4}}},
        {"name": "edit", "uses": "edit", "with": {
            "input": str(root / "datasets" / "images"), "output": str(out / "edited"), "method": "instruct_pix2pix",
            "model": "${steps.train.jobs.ip2p}", "instruction": "make the {shape} green",
            "steps": TOY_SAMPLING["steps"], "guidance_scale": TOY_SAMPLING["guidance_scale"],
            "image_guidance_scale": 1.5, "resolution": TOY_RES, "batch_size": 4, "seed": 0}},
    ]}


def _demo_pipeline(root: Path, models: dict[str, str]) -> str:
    """Run ``demo_pipeline`` as ``pixelmill run`` does: checked whole, then ONE flow with three child flows."""
    from pixelmill.config.pipeline import PipelineConfig
    from pixelmill.datasets.storage import remove
    from pixelmill.flows.run import pipeline_flow

    data = demo_pipeline(root, models)
    path = root / "configs" / "pipeline-ip2p.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    remove(str(root / "pipeline-ip2p"))
    _say("pipeline (pixelmill run): toy pairs -> 6 fine-tuning steps of toy:ip2p on them -> bulk edit with the "
         "result, one flow (configs/pipeline-toy-ip2p.yaml is the full-size version that made toy:ip2p)")
    steps = PipelineConfig.model_validate(data).preflight_steps(path.parent)
    summaries = pipeline_flow(steps)
    edited = summaries["edit"]
    readout = green_readout(str(root / "pipeline-ip2p" / "edited"), str(root / "datasets" / "images"))
    _say(f"  {summaries['pairs'].get('pairs')} pairs -> job trained -> {edited.get('rows_out')} rows edited "
         f"with it ({edited.get('rejects')} rejected; toy detectors: {readout}); config: {path}")
    return str(root / "pipeline-ip2p" / "edited")


def _demo_pairs(root: Path, models: dict[str, str], notes: list[str]) -> str:
    """Instruction pairs on the toy models: template colour edits, Prompt-to-Prompt on toy:sd, toy:clip filter."""
    from pixelmill.config import PairsConfig
    from pixelmill.datasets.storage import remove
    from pixelmill.flows.pairs import pairs_flow

    pairs = PairsConfig(
        input=str(root / "datasets" / "images"), output=str(root / "datasets" / "pairs"), seed=0,
        text={"options": {"edits": ["change_colour"]}},
        images=dict(model=models["sd"], clip_model=models["clip"], samples_per_caption=2,
                    steps=TOY_SAMPLING["steps"], height=TOY_RES, width=TOY_RES, cfg_range=(3.0, 6.0),
                    max_per_caption=1, min_image_similarity=0.0, min_direction=0.2, min_image_caption=0.1),
    )
    _write_config(root, "pairs", pairs)
    remove(pairs.output)
    _say("instruction pairs: template writer (colour changes) -> Prompt-to-Prompt pairs on toy:sd (2 seeds each) "
         "-> toy:clip filter (loose demo thresholds)")
    ps = pairs_flow(pairs.model_dump())
    _say(f"  {ps.captions} captions -> {ps.instructions} instructions -> {ps.pairs} pairs kept, "
         f"{ps.dropped} dropped, {ps.pair_rejects} captions without a pair")
    notes.append(f"instruction pairs: {ps.captions} captions -> {ps.pairs} pairs kept, {ps.dropped} dropped")
    return str(root / "datasets" / "pairs" / "pairs")


def run_demo(root: Path, ray_address: str | None = None) -> int:
    """Run the demo into ``root``; returns the exit status."""
    from pixelmill.models.tiny import save_tiny_models
    from pixelmill.report import render_multi_report
    from pixelmill.runtime import Runtime
    from pixelmill.toy.samples import write_toy_images

    t_start = time.perf_counter()
    root = root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    _say(f"writing everything under {root}")

    images = str(root / "datasets" / "images")
    info = write_toy_images(images, rows=12, seed=DEMO_SEED, broken=1)
    _say(f"12 toy-world images (32x32, {', '.join(info['shapes'])} in {', '.join(info['colors'])}; with shape/color "
         f"columns) + 1 broken row (a PNG cut in half, to show how bad rows become rejects) -> {images}")

    models = {"sd": "toy:sd", "clip": "toy:clip"}
    _say("models: toy:sd and toy:clip, trained on the toy world and shipped in the package "
         "(pixelmill/toy/models/*/MODEL_CARD.md)")
    models["instruct_pix2pix"] = "toy:ip2p"
    _say("InstructPix2Pix: toy:ip2p, trained from toy:sd on toy instruction pairs (its model card)")
    _say("writing the random-weight tiny models the example configs name (pixelmill-demo/models/*) offline")
    save_tiny_models(str(root / "models"))
    cfgs = demo_configs(root, models)

    home = root / ".pixelmill"
    _say("starting the embedded runtime: local Ray + a Prefect API server on 127.0.0.1")
    sections: list[tuple[str, str]] = []
    notes: list[str] = []
    with Runtime(ray_address=ray_address, home=home) as rt:
        _say(f"Prefect API at {rt.prefect_api_url}")
        from pixelmill.datasets.storage import remove
        from pixelmill.flows.bulk_edit import bulk_edit_flow

        for title, cfg in cfgs.items():
            remove(cfg.output)
            _say(f"bulk-edit, {title}: {cfg.input} -> {cfg.output}")
            s = bulk_edit_flow(cfg.model_dump(), show_progress=True)
            line = f"{s.rows_in} rows in -> {s.rows_out} edited + {s.rejects} rejected"
            if cfg.method in ("sdedit", "instruct_pix2pix"):
                line += f"; toy detectors: {green_readout(cfg.output, images)}"
            _say(f"  {line}, {s.images_per_second:.1f} images/s")
            notes.append(f"{title}: {line}")
            sections.append((title, cfg.output))

        sections.append(("instruction pairs: template colour edits, Prompt-to-Prompt on toy:sd, toy:clip filter",
                         _demo_pairs(root, models, notes)))
        sections.append(("regularization retrieval: toy pool, toy:clip, threshold 0.85, exactly 4 per prompt",
                         _demo_retrieval(root, models, notes)))
        campaign_report, dreambooth_edit = _demo_finetune(root, models, notes)
        _demo_video(root, models, notes)
        sections.append((f"bulk edit with the campaign's DreamBooth model ({CONCEPT}s in each object's colour)",
                         dreambooth_edit))
        sections.append(("pipeline: toy pairs -> InstructPix2Pix fine-tune of toy:ip2p -> edit",
                         _demo_pipeline(root, models)))
    report = render_multi_report(sections, str(root / "report.html"), title="pixelmill demo (toy world)")
    _say(f"finished in {time.perf_counter() - t_start:.0f}s")
    print()
    print("Summary:")
    for note in notes:
        print(f"  - {note}")
    print()
    print(f"Report:  {report}")
    print(f"Fine-tuning campaign report: {campaign_report}")
    print(f"Configs: {root / 'configs'}  (rerun one with: pixelmill edit {root / 'configs' / 'edit-sdedit-0.8.yaml'})")
    print(f"Browse the demo's runs in the Prefect UI:  pixelmill server --home {home}")
    print("(the edits ran on toy-world models trained by pixelmill, toy:sd and toy:clip: real edits in a 32x32 "
          "world of coloured shapes, where the campaign teaches toy:sd a heart it never saw; InstructPix2Pix runs on "
          "toy:ip2p, trained on toy instruction pairs)")
    return 0
