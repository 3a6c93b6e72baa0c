"""Toy-world quality measurements of pixelmill's own stages (``make quality``).

Each measure runs the real stage classes (the ones Ray actors run in a flow) directly on
toy-world rows of a held-out world seed, and scores the outputs against the generator's
ground truth with the frozen detectors (``pixelmill.toy.detect``):

- **retrieval precision**: a pool of toy captions embedded by ``PoolEmbedder`` with the toy
  CLIP, scanned by the retrieval kernel at the paper's 0.85 caption-similarity threshold;
  a retrieved row is right when its caption names the class prompt's colour and shape.
- **SDEdit colour change** (at the edit stage's default guidance, 7.5): ``SDEditEditor``
  with each row's caption, its colour swapped for another ("a small red circle ..." ->
  "a small green circle ..."); an edit succeeds on colour when the detector reads the new
  colour, on shape when it still reads the row's shape.
- **trade-off**: the same edits at several strengths: faithfulness (RGB RMSE to the input,
  SDEdit's L2) and prompt agreement (new colour detected) both rise with strength.
- **text to image** (``samples`` > 0): held-out prompts sampled by the toy SD with and
  without guidance and by the random-weight tiny SD (the negative control); the share
  whose detected colour / shape match the prompt.
- **t0 search**: ``strength: auto`` with ``target_l2``; the achieved L2 should lie in
  ``[0.7 * target, target]`` (zero noise steps always meets the target: the band shows the
  search went as far as it could).

``python -m pixelmill.toy.measure --out DIR`` writes ``quality.json`` and ``report.html``;
``--fast`` is the small version the test suite asserts.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from pixelmill.toy import world

EDIT_SEED = 13
"""World seed of the rows edited (no toy model trains on it)."""
POOL_SEED = 14
"""World seed of the retrieval pool's rows."""
THRESHOLD = 0.85
BAND = 0.7
"""The t0 search is on target when ``BAND * target <= L2 <= target``."""
FULL = {"pool_rows": 5000, "prompts": 24, "edits": 200, "strengths": (0.2, 0.4, 0.6, 0.8, 1.0), "search": 100,
        "samples": 200, "low_guidance": True}
FAST = {"pool_rows": 600, "prompts": 8, "edits": 12, "strengths": (0.8,), "search": 6, "samples": 0,
        "low_guidance": False}
LOW_GUIDANCE = 4.0
"""Text to image is sampled at this guidance (the model card's); the edits run at the edit
stage's default (``EditConfig.guidance_scale``, 7.5 as in diffusers' img2img), and the full
measure adds the strength-0.8 colour change at this lower guidance for reference."""


def edit_guidance() -> float:
    """What a user's edit runs at unless told otherwise: ``EditConfig``'s default guidance scale."""
    from pixelmill.config import EditConfig

    return float(EditConfig.model_fields["guidance_scale"].default)


# -- rows -----------------------------------------------------------------------------------
def target_colour(obj: world.ToyObject, index: int) -> str:
    """A colour for the edit: not the object's, not a background colour (the object would vanish)."""
    taken = {obj.color, obj.background, obj.background2}
    choices = [c for c in world.COLORS if c not in taken]
    return choices[index % len(choices)]


def recolour(caption: str, phrase: str, new: str) -> str:
    """``caption`` with ``phrase`` replaced by ``new``, articles fixed ("an orange star" -> "a red star")."""
    import re

    text = caption.replace(phrase, new, 1)
    return world._articles(re.sub(r"\ban (?=[^aeiou\W])", "a ", text))


def edit_rows(n: int, seed: int = EDIT_SEED) -> list[dict[str, Any]]:
    """``n`` held-out rows (training shapes) with an edit prompt that changes the object's colour."""
    from pixelmill.datasets.images import encode_image
    from pixelmill.toy.dataset import toy_row_id

    rows = []
    for i in range(n):
        image, caption, obj = world.make_row(seed, i, world.TRAIN_SHAPES)
        target = target_colour(obj, i)
        phrase = f"{obj.color} {obj.shape}"
        assert phrase in caption, caption
        rows.append({"id": toy_row_id(seed, i), "image": encode_image(image), "caption": caption,
                     "edit_prompt": recolour(caption, phrase, f"{target} {obj.shape}"), "color": obj.color,
                     "shape": obj.shape, "target": target})
    return rows


# -- stages run directly --------------------------------------------------------------------
def run_edit_stage(rows: list[dict[str, Any]], **settings: Any) -> list[dict[str, Any]]:
    """Run the bulk-edit stage for ``EditConfig(**settings)`` over ``rows``; its output rows."""
    import pyarrow as pa

    from pixelmill.config import EditConfig
    from pixelmill.datasets.images import IMAGE_TYPE
    from pixelmill.flows.bulk_edit import editor_class

    cfg = EditConfig(input="memory://toy", output="memory://toy-out", **settings).model_dump()
    stage = editor_class(cfg)(cfg)
    stage.setup()
    table = pa.table({"id": pa.array([r["id"] for r in rows], pa.string()),
                      "image": pa.array([r["image"] for r in rows], IMAGE_TYPE),
                      "edit_prompt": pa.array([r["edit_prompt"] for r in rows], pa.string())})
    out = stage(table).to_pylist()
    by_id = {r["id"]: r for r in out}
    return [by_id[r["id"]] for r in rows]


def score_edits(rows: list[dict[str, Any]], out: list[dict[str, Any]]) -> dict[str, Any]:
    """Share of edits with the new colour / the kept shape / both, and their mean L2."""
    from pixelmill.datasets.images import decode_image
    from pixelmill.toy.detect import detect

    colour = shape = both = 0
    l2 = []
    rejects = 0
    for r, o in zip(rows, out):
        if o["status"] != "ok":
            rejects += 1
            continue
        d = detect(decode_image(o["edited_image"]).convert("RGB"))
        colour += d.color == r["target"]
        shape += d.shape == r["shape"]
        both += d.color == r["target"] and d.shape == r["shape"]
        l2.append(o["l2"])
    n = len(rows)
    return {"edits": n, "rejects": rejects, "colour": colour / n, "shape_kept": shape / n, "both": both / n,
            "l2_mean": float(np.mean(l2)) if l2 else None}


def sdedit_settings(model: str, steps: int, guidance: float | None, seed: int) -> dict[str, Any]:
    """The edit stage's settings; ``guidance`` None is what a user's edit runs at (``edit_guidance``)."""
    guidance = edit_guidance() if guidance is None else guidance
    return {"method": "sdedit", "model": model, "prompt": "{edit_prompt}", "caption_column": None,
            "resolution": world.IMAGE_SIZE, "steps": steps, "guidance_scale": guidance, "seed": seed,
            "batch_size": 50, "device": "cpu", "dtype": "float32"}


def measure_sdedit(model: str, rows, strengths, steps: int = 20, guidance: float | None = None,
                   seed: int = 0) -> tuple[list[dict[str, Any]], dict[float, list[dict[str, Any]]]]:
    """The colour-change edits at each strength: one score per strength, and the output rows."""
    curve, outputs = [], {}
    for s in strengths:
        out = run_edit_stage(rows, strength=s, **sdedit_settings(model, steps, guidance, seed))
        curve.append({"strength": s, **score_edits(rows, out)})
        outputs[s] = out
    return curve, outputs


def measure_t0_search(model: str, rows, target: float = 0.12, steps: int = 20, guidance: float | None = None,
                      seed: int = 0) -> dict[str, Any]:
    """``strength: auto``: the share of rows whose achieved L2 lies in ``[BAND * target, target]``."""
    out = run_edit_stage(rows, strength="auto", target_l2=target, **sdedit_settings(model, steps, guidance, seed))
    ok = [o for o in out if o["status"] == "ok"]
    l2 = np.array([o["l2"] for o in ok], dtype=np.float64)
    t0 = np.array([o["t0_steps"] for o in ok], dtype=np.float64)
    in_band = (l2 >= BAND * target) & (l2 <= target)
    return {"rows": len(rows), "rejects": len(rows) - len(ok), "target_l2": target, "steps": steps,
            "in_band": float(in_band.mean()) if len(ok) else 0.0, "over_target": int((l2 > target).sum()),
            "l2_mean": float(l2.mean()) if len(ok) else None, "t0_steps_mean": float(t0.mean()) if len(ok) else None,
            "zero_steps": int((t0 == 0).sum())}


def measure_generation(model: str, n: int, guidance: float = LOW_GUIDANCE, steps: int = 25) -> dict[str, Any]:
    """Prompt agreement of ``n`` held-out prompts: guided, unguided, and the random tiny SD."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from pixelmill.models.loading import load_text2img_pipeline
    from pixelmill.models.tiny import build_tiny_sd_components
    from pixelmill.toy.quality import agreement, eval_prompts, generate

    items = eval_prompts(n)
    prompts = [p for p, _, _ in items]
    pipe = load_text2img_pipeline(model, device="cpu", dtype="float32")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    tiny = StableDiffusionPipeline(**build_tiny_sd_components(seed=0))
    tiny.set_progress_bar_config(disable=True)
    return {"prompts": n, "guidance": guidance, "steps": steps,
            "guided": agreement(generate(pipe, prompts, guidance, steps), items),
            "unguided": agreement(generate(pipe, prompts, 1.0, steps), items),
            "random_tiny_sd": agreement(generate(tiny, prompts, guidance, steps, size=64), items),
            "chance": {"color": 1 / len(world.COLORS), "shape": 1 / len(world.TRAIN_SHAPES)}}


def class_prompts(n: int) -> list[tuple[str, str, str]]:
    """``(prompt, colour, shape)``: "a red circle", "an orange star", ... over colours x training shapes."""
    pairs = [(c, s) for s in world.TRAIN_SHAPES for c in world.COLORS]
    rng = np.random.default_rng(0)
    picked = [pairs[i] for i in rng.permutation(len(pairs))[:n]]
    return [(world._articles(f"a {c} {s}"), c, s) for c, s in picked]


def measure_retrieval(clip: str, pool_rows: int, prompts: int, seed: int = POOL_SEED) -> dict[str, Any]:
    """Precision (and count) of the rows whose caption scores above 0.85 against each class prompt."""
    import pyarrow as pa

    from pixelmill.datasets.pool.parquet import embedding_matrix
    from pixelmill.tasks.retrieval.embedder import PoolEmbedder, embed_prompts
    from pixelmill.tasks.retrieval.kernel import scan_block

    caps, labels = [], []
    for i in range(pool_rows):
        _, caption, obj = world.make_row(seed, i)
        caps.append(caption)
        labels.append((obj.color, obj.shape))
    stage = PoolEmbedder({"clip_model": clip, "caption_column": "caption", "device": "cpu", "batch_size": 256})
    stage.setup()
    out = stage(pa.table({"id": [str(i) for i in range(pool_rows)], "caption": caps}))
    emb, null = embedding_matrix(out.column("text_emb"), "text_emb")  # packed float16, as pool build writes it
    if null.any():
        raise RuntimeError(f"{int(null.sum())} toy captions got no embedding")
    items = class_prompts(prompts)
    q = embed_prompts([p for p, _, _ in items], clip)
    hits = scan_block(emb, q, THRESHOLD)
    per = [{"prompt": p, "retrieved": 0, "right": 0, "relevant": sum(lab == (c, s) for lab in labels)}
           for p, c, s in items]
    wrong: dict[str, int] = {}
    for qi, row, _ in hits:
        per[qi]["retrieved"] += 1
        if labels[row] == (items[qi][1], items[qi][2]):
            per[qi]["right"] += 1
        else:
            key = labels[row][1] if labels[row][1] != items[qi][2] else "other colour"
            wrong[key] = wrong.get(key, 0) + 1
    retrieved = sum(p["retrieved"] for p in per)
    right = sum(p["right"] for p in per)
    relevant = sum(p["relevant"] for p in per)
    # the same scan over the pool without the held-out shape (what the toy SD can draw)
    seen = np.array([lab[1] != world.HELD_OUT_SHAPE for lab in labels])
    hits_seen = [(qi, row) for qi, row, _ in hits if seen[row]]
    right_seen = sum(labels[row] == (items[qi][1], items[qi][2]) for qi, row in hits_seen)
    return {"pool_rows": pool_rows, "prompts": len(items), "threshold": THRESHOLD, "retrieved": retrieved,
            "precision": right / retrieved if retrieved else 0.0, "recall": right / relevant if relevant else 0.0,
            "wrong_hits": wrong,
            "precision_without_held_out_shape": right_seen / len(hits_seen) if hits_seen else 0.0,
            "per_prompt": per}


# -- report ---------------------------------------------------------------------------------
def _png_b64(images) -> str:
    from PIL import Image

    size = world.IMAGE_SIZE * 2
    sheet = Image.new("RGB", (size * len(images), size), "white")
    for i, im in enumerate(images):
        sheet.paste(im.convert("RGB").resize((size, size), Image.Resampling.NEAREST), (i * size, 0))
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _curve_svg(curve: list[dict[str, Any]]) -> str:
    w, h, pad = 420, 220, 36
    xs = [c["strength"] for c in curve]

    def pt(x, y, ymax):
        return pad + (x - 0.0) / 1.0 * (w - 2 * pad), h - pad - y / ymax * (h - 2 * pad)

    lines = []
    for key, colour, ymax in (("colour", "#1a7f37", 1.0), ("shape_kept", "#0550ae", 1.0), ("l2_mean", "#cf222e", 0.5)):
        pts = " ".join("{:.1f},{:.1f}".format(*pt(x, c[key] or 0.0, ymax)) for x, c in zip(xs, curve))
        lines.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{pts}"/>')
    ticks = "".join(f'<text x="{pt(x, 0, 1)[0]:.0f}" y="{h - 12}" font-size="11" text-anchor="middle">{x}</text>'
                    for x in xs)
    legend = ('<text x="40" y="16" font-size="11" fill="#1a7f37">new colour detected (0-1)</text>'
              '<text x="200" y="16" font-size="11" fill="#0550ae">shape kept (0-1)</text>'
              '<text x="320" y="16" font-size="11" fill="#cf222e">L2 (0-0.5)</text>')
    return (f'<svg width="{w}" height="{h}" xmlns="http://www.w3.org/2000/svg">'
            f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="#888"/>'
            f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="#888"/>{"".join(lines)}{ticks}{legend}'
            f'<text x="{w / 2}" y="{h - 1}" font-size="11" text-anchor="middle">strength</text></svg>')


def _generation_html(g: dict[str, Any] | None) -> str:
    if not g:
        return ""
    rows = "".join(f"<tr><td>{name}</td><td>{g[key]['color']:.3f}</td><td>{g[key]['shape']:.3f}</td></tr>"
                   for name, key in (("toy SD, guidance " + str(g["guidance"]), "guided"),
                                     ("toy SD, no guidance", "unguided"),
                                     ("random tiny SD (negative control)", "random_tiny_sd")))
    return (f"<h2>Text to image ({g['prompts']} held-out prompts, {g['steps']} DDIM steps)</h2>"
            f"<table><tr><th>model</th><th>colour</th><th>shape</th></tr>{rows}"
            f"<tr><td>chance</td><td>{g['chance']['color']:.3f}</td><td>{g['chance']['shape']:.3f}</td></tr></table>")


def _low_guidance_html(c: dict[str, Any] | None) -> str:
    if not c:
        return ""
    return (f"<p>At guidance {c['guidance']} (strength {c['strength']}): new colour {c['colour']:.3f}, "
            f"shape kept {c['shape_kept']:.3f}, both {c['both']:.3f}.</p>")


def write_report(out: Path, result: dict[str, Any], rows, outputs) -> Path:
    from html import escape

    from pixelmill.datasets.images import decode_image

    show = rows[:8]

    def cells(images) -> str:
        return "".join(f'<td><img src="data:image/png;base64,{_png_b64([im])}"></td>' for im in images)

    strips = ["<tr><th>edit prompt</th>" + "".join(f'<td class="p">{escape(r["edit_prompt"])}</td>' for r in show)
              + "</tr>", "<tr><td>input</td>" + cells([decode_image(r["image"]) for r in show]) + "</tr>"]
    for s, outs in outputs.items():
        ims = [decode_image(o["edited_image"]) if o["status"] == "ok" else decode_image(r["image"])
               for r, o in zip(show, outs)]
        strips.append(f"<tr><td>strength {s}</td>{cells(ims)}</tr>")
    rows_html = "".join(
        f"<tr><td>{c['strength']}</td><td>{c['colour']:.3f}</td><td>{c['shape_kept']:.3f}</td>"
        f"<td>{c['both']:.3f}</td><td>{(c['l2_mean'] or 0):.4f}</td></tr>" for c in result["sdedit"])
    r, t = result["retrieval"], result["t0_search"]
    html = f"""<!doctype html><html><head><meta charset="utf-8"><title>pixelmill toy-world quality</title>
<style>body{{font-family:sans-serif;margin:24px;max-width:1100px}}td,th{{padding:3px 8px;border-bottom:1px solid #ddd;
font-size:13px;text-align:left}}table{{border-collapse:collapse;margin:8px 0 20px}}
img{{image-rendering:pixelated}}td.p{{width:80px;font-size:11px;vertical-align:bottom}}</style>
</head><body><h1>Toy-world quality</h1>
<p>Toy-world figures (32x32 shapes, toy SD and toy CLIP shipped in the package), measured by
<code>python -m pixelmill.toy.measure</code> in {result['seconds']:.0f} s. Not figures for real models.</p>
<h2>Regularization retrieval at {r['threshold']}</h2>
<p>{r['prompts']} class prompts over a pool of {r['pool_rows']} toy captions: {r['retrieved']} retrieved,
precision <b>{r['precision']:.3f}</b> (caption names the prompt's colour and shape), recall {r['recall']:.3f}.</p>
<h2>SDEdit colour change (model {escape(result['model'])}, guidance {result['edit_guidance']})</h2>
<table><tr><th>strength</th><th>new colour</th><th>shape kept</th><th>both</th><th>L2 to input</th></tr>{rows_html}
</table>{_low_guidance_html(result.get("sdedit_low_guidance"))}{_curve_svg(result['sdedit'])}
<table>{"".join(strips)}</table>
<h2>t0 search</h2><p>target L2 {t['target_l2']}, {t['steps']} steps: achieved L2 in
[{BAND} x target, target] for <b>{t['in_band']:.3f}</b> of {t['rows']} images (mean L2 {(t['l2_mean'] or 0):.4f},
mean t0 {(t['t0_steps_mean'] or 0):.1f} steps, {t['zero_steps']} at zero steps, {t['over_target']} over target).</p>
{_generation_html(result.get("generation"))}
</body></html>"""
    path = out / "report.html"
    path.write_text(html)
    return path


def measure_all(out: Path, sizes: dict[str, Any], model: str = "toy:sd", clip: str = "toy:clip",
                target_l2: float = 0.12) -> dict[str, Any]:
    """Every measure at ``sizes`` (``FULL`` or ``FAST``); writes ``quality.json`` and ``report.html``."""
    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    rows = edit_rows(sizes["edits"])
    result: dict[str, Any] = {"model": model, "clip": clip, "sizes": {k: list(v) if isinstance(v, tuple) else v
                                                                      for k, v in sizes.items()}}
    result["retrieval"] = measure_retrieval(clip, sizes["pool_rows"], sizes["prompts"])
    guidance = result["edit_guidance"] = edit_guidance()
    result["sdedit"], outputs = measure_sdedit(model, rows, sizes["strengths"], guidance=guidance)
    if sizes.get("low_guidance"):
        (result["sdedit_low_guidance"],), _ = measure_sdedit(model, rows, (0.8,), guidance=LOW_GUIDANCE)
        result["sdedit_low_guidance"]["guidance"] = LOW_GUIDANCE
    result["t0_search"] = measure_t0_search(model, rows[:sizes["search"]], target=target_l2, guidance=guidance)
    if sizes["samples"]:
        result["generation"] = measure_generation(model, sizes["samples"])
    result["seconds"] = round(time.time() - t0, 1)
    (out / "quality.json").write_text(json.dumps(result, indent=2) + "\n")
    write_report(out, result, rows, outputs)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="quality-report", help="folder for quality.json and report.html")
    p.add_argument("--fast", action="store_true", help="the small sizes the test suite uses")
    p.add_argument("--model", default="toy:sd")
    p.add_argument("--clip", default="toy:clip")
    args = p.parse_args(argv)
    res = measure_all(Path(args.out), FAST if args.fast else FULL, args.model, args.clip)
    r, t = res["retrieval"], res["t0_search"]
    print(f"retrieval at {r['threshold']}: precision {r['precision']:.3f} over {r['retrieved']} retrieved "
          f"({r['prompts']} prompts, pool of {r['pool_rows']})")
    for c in res["sdedit"] + ([res["sdedit_low_guidance"]] if "sdedit_low_guidance" in res else []):
        print(f"sdedit strength {c['strength']} guidance {c.get('guidance', res['edit_guidance'])}: new colour "
              f"{c['colour']:.3f}, shape kept {c['shape_kept']:.3f}, L2 {(c['l2_mean'] or 0):.4f} ({c['edits']} edits)")
    print(f"t0 search: L2 in [{BAND}x, 1x] target {t['target_l2']} for {t['in_band']:.3f} of {t['rows']}")
    if "generation" in res:
        g = res["generation"]
        print(f"text to image ({g['prompts']} prompts): guided colour {g['guided']['color']:.3f} shape "
              f"{g['guided']['shape']:.3f}; unguided {g['unguided']['color']:.3f} / {g['unguided']['shape']:.3f}; "
              f"random tiny SD {g['random_tiny_sd']['color']:.3f} / {g['random_tiny_sd']['shape']:.3f}")
    print(f"report: {Path(args.out) / 'report.html'} ({res['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
