"""InstructPix2Pix on the toy world: the pairs pipeline's quality before/after the CLIP filter, and
the shipped toy InstructPix2Pix (``toy:ip2p``) measured by the frozen detectors.

Fast subset (``make test``): the pure parts, ``toy:ip2p`` loading as users load it (its shared
components the toy SD's, byte for byte), and a small fixed-seed edit run asserting the issue's
thresholds. Full (``make quality``): 200 report captions through the pairs stages, 120 held-out
edits with the guidance grid and the random-weight control; figures in ``quality-report/``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pixelmill.toy import ip2p, pairs_quality, world


def _judged(parent: str, sample: int, scores, good: bool) -> dict:
    return {"id": f"{parent}-{sample}", "parent_id": parent, "sample": sample, "scores": scores, "target": "red",
            "target_is_background": False, "before_ok": True, "after_colour": good, "after_shape": True,
            "after_position": True, "after_background": True, "good": good}


def test_filter_summary_and_calibration_on_given_scores():
    """``kept`` is the stage's decision (thresholds, then rank by direction, at most max_per_caption);
    calibration picks the setting with the best good share that keeps enough captions."""
    judged = [_judged("a", 0, (0.9, 0.5, 0.3, 0.3), True), _judged("a", 1, (0.9, 0.1, 0.3, 0.3), False),
              _judged("b", 0, (0.3, 0.5, 0.3, 0.3), False), _judged("b", 1, (0.8, 0.6, 0.3, 0.3), True),
              _judged("c", 0, (0.9, 0.0, 0.3, 0.3), False), _judged("c", 1, (0.9, 0.7, 0.1, 0.3), True)]
    assert pairs_quality.summary(judged, None)["good"] == 0.5
    paper = pairs_quality.summary(judged, pairs_quality.PAPER)
    assert paper["pairs"] == 2 and paper["good"] == 1.0 and paper["yield"] == round(2 / 3, 4)
    cal = pairs_quality.calibrate(judged, min_yield=0.9)
    assert cal["summary"]["yield"] >= 0.9 and cal["summary"]["good"] == 1.0, cal
    with pytest.raises(ValueError):
        pairs_quality.calibrate(judged[:2], min_yield=1.01)


def test_edit_items_ask_for_a_new_colour_never_the_objects_or_a_background_one():
    items = ip2p.edit_items(80)
    for it in items:
        assert it["target"] != it["color"] and it["shape"] in it["instruction"] and it["target"] in it["instruction"]
        parsed = world.parse_caption(it["caption"])
        assert it["target"] not in parsed.get("background", "")
    assert {it["target"] for it in items} == set(world.COLORS)
    assert ip2p.edit_items(5)[3]["instruction"] == items[3]["instruction"]


def test_toy_ip2p_loads_with_the_normal_loaders_and_shares_the_toy_sds_frozen_parts():
    """``toy:ip2p`` ships its UNet only; the folder loaders see has the toy SD's text encoder,
    tokenizer and VAE, the very files (so exactly what its training used: ``ip2p.ship`` checked)."""
    import filecmp

    from pixelmill.models.loading import load_instruct_pix2pix_pipeline, model_fingerprint, resolve_model_name

    folder, sd = Path(resolve_model_name("toy:ip2p")), Path(resolve_model_name("toy:sd"))
    shipped = Path(world.__file__).parent / "models" / "ip2p"
    assert not (shipped / "text_encoder").exists() and (shipped / "unet").is_dir()
    for part in ip2p.SHARED:
        for f in (sd / part).iterdir():
            assert filecmp.cmp(f, folder / part / f.name, shallow=False), f
    pipe = load_instruct_pix2pix_pipeline("toy:ip2p", device="cpu", dtype="float32")
    assert type(pipe).__name__ == "StableDiffusionInstructPix2PixPipeline" and pipe.unet.config.in_channels == 8
    assert model_fingerprint("toy:ip2p") == model_fingerprint("toy:ip2p") != model_fingerprint("toy:sd")


def test_a_toy_model_borrowing_components_resolves_to_a_complete_folder(tmp_path, monkeypatch):
    """``shared_components.json``: the borrowed parts appear, file by file, beside the model's own;
    the folder is built once and reused; a missing source is named."""
    from pixelmill.models import loading
    from pixelmill.models.shared_components import assembled_folder

    base, own = tmp_path / "base", tmp_path / "own"
    (base / "vae").mkdir(parents=True)
    (base / "vae" / "config.json").write_text("{}")
    (own / "unet").mkdir(parents=True)
    (own / "unet" / "config.json").write_text('{"in_channels": 8}')
    (own / "model_index.json").write_text("{}")
    (own / "shared_components.json").write_text('{"components": {"vae": "base"}}')
    monkeypatch.setattr(loading, "TOY_MODELS_DIR", tmp_path)
    folder = Path(loading.resolve_model_name("toy:own"))
    assert folder != own and (folder / "vae" / "config.json").read_text() == "{}"
    assert (folder / "unet" / "config.json").read_text() == '{"in_channels": 8}'
    assert not (folder / "shared_components.json").exists()
    assert assembled_folder(own, tmp_path) == folder and loading.resolve_model_name("toy:base") == str(base)
    (own / "shared_components.json").write_text('{"components": {"text_encoder": "base"}}')
    with pytest.raises(FileNotFoundError, match="text_encoder"):
        assembled_folder(own, tmp_path)


def test_shipped_toy_ip2p_is_small_and_described():
    shipped = Path(world.__file__).parent / "models"
    size = sum(f.stat().st_size for f in (shipped / "ip2p").rglob("*") if f.is_file())
    total = sum(f.stat().st_size for f in shipped.rglob("*") if f.is_file())
    assert size < 10_000_000 and total < 40_000_000, (size, total)
    card = (shipped / "ip2p" / "MODEL_CARD.md").read_text()
    assert "pixelmill finetune configs/finetune-toy-ip2p.yaml" in card and "toy:ip2p" in card


def check_edit_targets(doc: dict) -> None:
    """The issue's thresholds as written: requested colour >= 0.7 and shape kept >= 0.7."""
    d = doc["default"]
    assert d["color"] >= 0.7 and d["shape"] >= 0.7, d


@pytest.mark.slow
def test_toy_ip2p_fast_subset(one_torch_thread):
    """24 held-out images at the default guidance (fixed seeds): the issue's thresholds. An edit
    that returns its input reads the new colour in none of them (``identity``)."""
    doc = ip2p.evaluate("toy:ip2p", n=24, grid=False, control=False)
    assert doc["identity"]["color"] == 0.0 and doc["identity"]["shape"] == 1.0
    check_edit_targets(doc)


@pytest.mark.slow
def test_toy_pairs_fast_subset_the_filter_raises_the_good_share(tmp_path, one_torch_thread):
    """40 report captions through the pairs stages (fixed seeds): the toy filter's kept pairs are good
    more often than all rendered ones."""
    doc = pairs_quality.measure_pairs(tmp_path, 40)
    assert doc["toy_filter"]["pairs"] > 0 and doc["toy_filter"]["good"] > doc["unfiltered"]["good"], doc


@pytest.mark.quality
def test_toy_pairs_quality_the_filter_raises_the_good_share(one_torch_thread):
    """``make quality``: 200 report captions (a seed the thresholds were not calibrated on); kept pairs
    with the toy thresholds are good more often than all rendered pairs."""
    doc = pairs_quality.measure_pairs(Path("quality-report"), 200)
    assert doc["toy_filter"]["good"] > doc["unfiltered"]["good"], doc
    assert doc["toy_filter"]["yield"] >= 0.4, doc
    assert json.loads((Path("quality-report") / "pairs.json").read_text())["toy_filter"] == doc["toy_filter"]


@pytest.mark.quality
def test_toy_ip2p_full(one_torch_thread):
    """``make quality``: 120 held-out images, the thresholds, the random-weight control near chance
    (requested colour within 0.15 of 1/6), and the guidance grid."""
    doc = ip2p.evaluate("toy:ip2p", n=120, out=Path("quality-report"))
    check_edit_targets(doc)
    assert abs(doc["random_weights"]["color"] - doc["chance_color"]) <= 0.15, doc["random_weights"]
    assert len(doc["grid"]) == len(ip2p.GRID_IMAGE_GUIDANCE) * len(ip2p.GRID_GUIDANCE)
