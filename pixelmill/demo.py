"""``pixelmill demo``: every pipeline that exists, on drawn images and tiny offline models.

Draws a small sample image dataset (one file corrupt on purpose, to show rejects),
builds tiny random-weight models, starts the embedded runtime (local Ray + a Prefect API
server on 127.0.0.1), runs the bulk-edit flow with SDEdit (fixed t0 and the t0 search)
and with InstructPix2Pix, generates instruction pairs (template writer, Prompt-to-Prompt,
CLIP filter), retrieves exactly N regularization images per class prompt from a sample
pool served on 127.0.0.1, runs a small fine-tuning campaign (Textual Inversion, LoRA,
DreamBooth with generated class images) and bulk-edits with two of its adapters, and
writes the HTML reports.
"""

from __future__ import annotations

import time
from pathlib import Path

import yaml

from pixelmill.config import EditConfig


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def demo_configs(root: Path, models: dict[str, str], clip: str | None) -> dict[str, EditConfig]:
    """The demo's bulk-edit configs (also written as YAML next to the outputs)."""
    images = str(root / "datasets" / "images")
    common = dict(input=images, resolution=64, steps=10, batch_size=4, seed=0, clip_model=clip,
                  workers=1)
    cfgs = {
        "sdedit": EditConfig(**common, output=str(root / "datasets" / "edit-sdedit"), method="sdedit",
                             model=models["img2img"], prompt="a watercolor painting of {caption}",
                             negative_prompt="blurry", strength=0.2, guidance_scale=5.0),
        "sdedit-auto-t0": EditConfig(**common, output=str(root / "datasets" / "edit-sdedit-auto"),
                                     method="sdedit", model=models["img2img"],
                                     prompt="a pencil sketch of {caption}", strength="auto", target_l2=0.2,
                                     guidance_scale=5.0),
        "instruct-pix2pix": EditConfig(**common, output=str(root / "datasets" / "edit-ip2p"),
                                       method="instruct_pix2pix", model=models["instruct_pix2pix"],
                                       instruction="make it look like winter", guidance_scale=7.5,
                                       image_guidance_scale=1.5),
    }
    (root / "configs").mkdir(parents=True, exist_ok=True)
    for name, cfg in cfgs.items():
        (root / "configs" / f"edit-{name}.yaml").write_text(
            yaml.safe_dump(cfg.model_dump(exclude_defaults=True, exclude={"runtime"}), sort_keys=False)
        )
    return cfgs


def _demo_retrieval(root: Path, models: dict[str, str]) -> str:
    """Build a sample pool served from 127.0.0.1 and retrieve exactly N images per prompt."""
    from pixelmill.config import RetrieveConfig
    from pixelmill.datasets.storage import remove
    from pixelmill.flows.pool import build_pool_flow
    from pixelmill.flows.retrieve import retrieve_flow
    from pixelmill.samples import LoopbackFileServer, write_sample_pool_source

    web = root / "web"
    with LoopbackFileServer(str(web)) as server:
        _say(f"regularization retrieval: a sample pool of 48 drawn images served at {server.base_url}")
        write_sample_pool_source(str(web / "images"), server.base_url + "/images", str(root / "datasets" / "pool-src"))
        remove(str(root / "datasets" / "pool"))
        build_pool_flow(dataset=str(root / "datasets" / "pool-src"), out=str(root / "datasets" / "pool"),
                        clip_model=models["clip"], batch_size=16)
        cfg = RetrieveConfig(prompts=["a photo of a dog", "a photo of a car"], pool=str(root / "datasets" / "pool"),
                             clip_model=models["clip"], output=str(root / "datasets" / "regularization"),
                             num_images=4, threshold=0.85, resolution=64,
                             download={"allow_loopback": True, "timeout": 5})
        (root / "configs" / "retrieve.yaml").write_text(
            yaml.safe_dump(cfg.model_dump(exclude_defaults=True, exclude={"runtime"}), sort_keys=False))
        remove(cfg.output)
        summary = retrieve_flow(cfg.model_dump())
        for s in summary.prompts.values():
            _say(f"  {s['prompt']!r}: {s['found']} candidates above {cfg.threshold}, {s['downloaded']} downloaded "
                 f"(exactly {cfg.num_images} wanted)")
        for prompt, folder in summary.exported.items():
            _say(f"  --real_prior folder for {prompt!r}: {folder}")
    return str(root / "datasets" / "regularization" / "images")


def demo_campaign(root: Path, models: dict[str, str]) -> dict:
    """The demo's fine-tuning campaign (also written as ``configs/finetune.yaml``)."""
    from pixelmill.samples import draw_concept_images, write_image_dataset

    concept = str(root / "datasets" / "concept-dog")
    write_image_dataset(concept, draw_concept_images(6, seed=0))
    cfg = {
        "output": str(root / "campaign"), "model": models["img2img"], "clip_model": models["clip"],
        "concepts": {"dog": {"instance_data": concept, "token": "<dog1>", "class_word": "dog"},
                     "dog-db": {"instance_data": concept, "token": "sks", "class_word": "dog"}},
        "defaults": {"resolution": 64, "max_steps": 8, "train_batch_size": 2, "learning_rate": 1e-3,
                     "checkpoint_every": 4, "num_class_images": 2, "center_crop": True,
                     "cache_latents": True, "cache_text_embeddings": True},
        "jobs": [{"name": "dog-textual-inversion", "method": "textual_inversion", "concepts": ["dog"],
                  "settings": {"learning_rate": 5e-3}},
                 {"name": "dog-lora", "method": "lora", "concepts": ["dog"]},
                 {"name": "dog-dreambooth", "method": "dreambooth", "concepts": ["dog-db"]}],
        "eval": {"prompts": ["a photo of {concept}", "a photo of {concept} on the beach"],
                 "samples_per_prompt": 2, "steps": 10},
    }
    (root / "configs").mkdir(parents=True, exist_ok=True)
    (root / "configs" / "finetune.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return cfg


def _demo_finetune(root: Path, models: dict[str, str]) -> tuple[str, str]:
    """Train three small jobs (one generating its DreamBooth class images), then edit with two adapters."""
    from pixelmill.config import CampaignConfig
    from pixelmill.datasets.storage import remove
    from pixelmill.flows.bulk_edit import bulk_edit_flow
    from pixelmill.flows.finetune import finetune_flow
    from pixelmill.tasks.train.plan import plan_campaign

    cfg = demo_campaign(root, models)
    remove(cfg["output"])
    _say("fine-tuning campaign: Textual Inversion, LoRA and DreamBooth (+2 generated class images), 8 steps each")
    summary = finetune_flow(cfg)
    _say(f"  {len(summary.ran)} jobs trained, {summary.class_images} class images generated; "
         f"results: {summary.results}")
    jobs = {j.spec["name"]: j.spec["dir"] for j in plan_campaign(CampaignConfig.model_validate(cfg)).jobs}
    edit = EditConfig(input=str(root / "datasets" / "images"), output=str(root / "datasets" / "edit-adapters"),
                      method="sdedit", model=models["img2img"], prompt="a photo of <dog1> in the style of {caption}",
                      strength=0.5, steps=10, resolution=64, batch_size=4, seed=0,
                      adapters=[{"path": jobs["dog-textual-inversion"]}, {"path": jobs["dog-lora"], "scale": 0.8}])
    (root / "configs" / "edit-adapters.yaml").write_text(
        yaml.safe_dump(edit.model_dump(exclude_defaults=True, exclude={"runtime"}), sort_keys=False))
    remove(edit.output)
    _say("bulk-edit with the campaign's Textual Inversion embedding and LoRA (scale 0.8) loaded on the worker")
    s = bulk_edit_flow(edit.model_dump(), show_progress=True)
    _say(f"  {s.rows_in} rows in -> {s.rows_out} edited + {s.rejects} rejected")
    return summary.report, edit.output


def _demo_video(root: Path, models: dict[str, str]) -> str:
    """Edit two synthetic clips through layered atlases; returns the homography run's report.

    A camera pan across a drawn texture goes through a homography atlas and SDEdit; a
    clip with a moving shape through a tiny neural atlas and a Text2Live layer on its
    foreground. The clips are written as MP4 files and as a video dataset (bytes).
    """
    from pixelmill.config import VideoConfig
    from pixelmill.datasets.storage import remove
    from pixelmill.datasets.videos import write_video_dataset
    from pixelmill.flows.video import video_flow
    from pixelmill.tasks.video.io import encode_video
    from pixelmill.tasks.video.synthetic import synthetic_moving_shape, synthetic_pan

    clips = root / "videos"
    pan = synthetic_pan(frames=10, size=(64, 48), shift=(2.0, 1.0), fps=24, seed=3)
    shape = synthetic_moving_shape(frames=8, size=(64, 48), radius=7.0, velocity=(3.0, 1.0), fps=24)
    encode_video(pan.frames, pan.fps, clips / "pan.mp4")
    encode_video(shape.frames, shape.fps, clips / "moving-shape.mp4")
    dataset = str(root / "datasets" / "videos")
    write_video_dataset(dataset, [("pan", (clips / "pan.mp4").read_bytes()),
                                  ("moving-shape", (clips / "moving-shape.mp4").read_bytes())])
    runs = {
        "homography": VideoConfig(
            input=dataset, output=str(root / "video-homography"), atlas={"method": "homography"},
            edit={"method": "sdedit", "model": models["img2img"], "prompt": "a watercolor painting",
                  "strength": 0.5, "steps": 6, "guidance_scale": 5.0}, placement={"cpus": 1}),
        "neural": VideoConfig(
            input=str(clips / "moving-shape.mp4"), output=str(root / "video-neural"),
            atlas={"method": "neural", "neural": {"preset": "tiny", "iterations": 300, "checkpoint_every": 100}},
            edit={"method": "text2live", "layer": "foreground", "prompt": "fire", "clip_model": models["clip"],
                  "text2live": {"iterations": 30, "alpha_init": 0.5, "sparsity_weight": 0.1}}, placement={"cpus": 1}),
    }
    what = {"homography": f"{dataset} (a 10-frame pan and an 8-frame moving shape, 64x48): homography atlas, "
                          "SDEdit on the atlas",
            "neural": "the moving-shape clip: tiny neural atlas (background + foreground, 300 steps), "
                      "Text2Live layer on the foreground"}
    reports = {}
    for name, cfg in runs.items():
        (root / "configs" / f"video-{name}.yaml").write_text(
            yaml.safe_dump(cfg.model_dump(exclude_defaults=True, exclude={"runtime"}), sort_keys=False))
        remove(cfg.output)
        _say(f"video editing through layered atlases, {what[name]}")
        s = video_flow(cfg.model_dump())
        rejected = "".join(f"; rejected {k}: {v}" for k, v in s.rejected.items())
        _say(f"  {s.videos} video(s) in -> {len(s.ran)} edited (same frames, size and fps), {len(s.failed)} failed"
             f"{rejected}; report: {s.report}")
        reports[name] = s.report
    return reports["homography"]


def demo_pipeline(root: Path, models: dict[str, str]) -> dict:
    """The demo's chained pipeline (also written as ``configs/pipeline-ip2p.yaml``):
    instruction pairs -> an InstructPix2Pix fine-tune on them -> a bulk edit with the result."""
    out = root / "pipeline-ip2p"
    return {"steps": [
        {"name": "pairs", "uses": "pairs", "with": {
            "input": str(root / "datasets" / "images"), "output": str(out / "pairs"), "seed": 0,
            "images": {"model": models["img2img"], "clip_model": models["clip"], "samples_per_caption": 2,
                       "steps": 4, "height": 64, "width": 64, "max_per_caption": 1, "min_direction": -1.0,
                       "min_image_caption": -1.0}}},
        {"name": "train", "uses": "finetune", "with": {
            "output": str(out / "campaign"), "model": models["instruct_pix2pix"],
            "concepts": {"edits": {"instance_data": "${steps.pairs.output}/pairs"}},
            "defaults": {"resolution": 64, "max_steps": 6, "train_batch_size": 2, "learning_rate": 1e-4,
                         "center_crop": True},
            "jobs": [{"name": "ip2p", "method": "instruct_pix2pix", "concepts": ["edits"]}],
            "eval": {"prompts": ["make it look like winter"], "samples_per_prompt": 1, "steps": 4}}},
        {"name": "edit", "uses": "edit", "with": {
            "input": str(root / "datasets" / "images"), "output": str(out / "edited"), "method": "instruct_pix2pix",
            "model": "${steps.train.jobs.ip2p}", "instruction": "make it look like winter", "steps": 6,
            "resolution": 64, "batch_size": 4, "seed": 0}},
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
    _say("pipeline (pixelmill run): pairs -> InstructPix2Pix fine-tune on them -> bulk edit with it, one flow")
    steps = PipelineConfig.model_validate(data).preflight_steps(path.parent)
    summaries = pipeline_flow(steps)
    edited = summaries["edit"]
    _say(f"  {summaries['pairs'].get('pairs')} pairs -> job trained -> {edited.get('rows_out')} rows edited "
         f"with it ({edited.get('rejects')} rejected); config: {path}")
    return str(root / "pipeline-ip2p" / "edited")


def run_demo(root: Path, ray_address: str | None = None) -> int:
    """Run the demo into ``root``; returns the exit status."""
    from pixelmill.datasets.importer import import_folder
    from pixelmill.models.tiny import save_tiny_models
    from pixelmill.report import render_multi_report
    from pixelmill.runtime import Runtime
    from pixelmill.samples import draw_sample_images

    t_start = time.perf_counter()
    root = root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    _say(f"writing everything under {root}")

    _say("drawing 12 sample images (+1 corrupt file, to show how bad rows become rejects)")
    draw_sample_images(str(root / "samples"), n=12, corrupt=1, seed=0)
    summary = import_folder(str(root / "samples"), str(root / "datasets" / "images"), overwrite=True)
    _say(f"imported {summary['images']} files into {root / 'datasets' / 'images'}")

    _say("building tiny random-weight models offline (img2img, InstructPix2Pix, CLIP)")
    models = save_tiny_models(str(root / "models"))
    cfgs = demo_configs(root, models, models.get("clip"))

    home = root / ".pixelmill"
    _say("starting the embedded runtime: local Ray + a Prefect API server on 127.0.0.1")
    sections = []
    with Runtime(ray_address=ray_address, home=home) as rt:
        _say(f"Prefect API at {rt.prefect_api_url}")
        from pixelmill.datasets.storage import remove
        from pixelmill.flows.bulk_edit import bulk_edit_flow

        for name, cfg in cfgs.items():
            remove(cfg.output)
            _say(f"bulk-edit with {name}: {cfg.input} -> {cfg.output}")
            s = bulk_edit_flow(cfg.model_dump(), show_progress=True)
            _say(f"  {s.rows_in} rows in -> {s.rows_out} edited + {s.rejects} rejected, "
                 f"{s.images_per_second:.1f} images/s")
            sections.append((name, cfg.output))

        from pixelmill.config import PairsConfig
        from pixelmill.flows.pairs import pairs_flow

        pairs = PairsConfig(
            input=str(root / "datasets" / "images"), output=str(root / "datasets" / "pairs"), seed=0,
            images=dict(model=models["img2img"], clip_model=models["clip"], samples_per_caption=3, steps=4,
                        height=64, width=64, max_per_caption=2, min_direction=-1.0, min_image_caption=-1.0),
        )
        (root / "configs" / "pairs.yaml").write_text(
            yaml.safe_dump(pairs.model_dump(exclude_defaults=True, exclude={"runtime"}), sort_keys=False))
        remove(pairs.output)
        _say("instruction pairs: template writer -> Prompt-to-Prompt pairs (3 seeds each) -> CLIP filter")
        ps = pairs_flow(pairs.model_dump())
        _say(f"  {ps.captions} captions -> {ps.instructions} instructions -> {ps.pairs} pairs kept, "
             f"{ps.dropped} dropped, {ps.pair_rejects} captions without a pair")
        sections.append(("instruction pairs", str(root / "datasets" / "pairs" / "pairs")))
        sections.append(("regularization retrieval", _demo_retrieval(root, models)))
        campaign_report, adapter_edit = _demo_finetune(root, models)
        _demo_video(root, models)
        sections.append(("bulk edit with campaign adapters", adapter_edit))
        sections.append(("pipeline: pairs -> InstructPix2Pix fine-tune -> edit", _demo_pipeline(root, models)))
    report = render_multi_report(sections, str(root / "report.html"), title="pixelmill demo")
    _say(f"finished in {time.perf_counter() - t_start:.0f}s")
    print()
    print(f"Report:  {report}")
    print(f"Fine-tuning campaign report: {campaign_report}")
    print(f"Configs: {root / 'configs'}  (rerun one with: pixelmill edit {root / 'configs' / 'edit-sdedit.yaml'})")
    print(f"Browse the demo's runs in the Prefect UI:  pixelmill server --home {home}")
    print("(the models are random-weight test models: the edits are noise, the pipeline is real)")
    return 0
