"""The shipped toy CLIP loads like any open_clip checkpoint and knows the toy world."""

from __future__ import annotations

import json

import pytest
import torch

from pixelmill.models import ModelNotFound, load_clip
from pixelmill.models.loading import looks_local, model_fingerprint, resolve_model_name
from pixelmill.toy import clip as toy_clip
from pixelmill.toy import train_clip

SHIPPED = toy_clip.PACKAGED_CLIP
needs_weights = pytest.mark.skipif(not (SHIPPED / train_clip.WEIGHTS_NAME).is_file(),
                                   reason="the toy CLIP has not been trained yet (python -m pixelmill.toy.train_clip)")


def test_geometry_loss_pulls_same_pairs_and_pushes_others():
    a = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0]]), dim=1)
    keys = torch.tensor([0, 0, 1])
    assert train_clip.geometry_loss(a, keys, 0.92, 0.75) == pytest.approx(0.0, abs=1e-6)
    b = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.05]]), dim=1)
    assert train_clip.geometry_loss(b, keys, 0.92, 0.75) > 0.5


def test_measure_counts_hits_and_pairs():
    colors, shapes = ["red", "red", "blue"], ["circle", "circle", "star"]
    text = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0]]), dim=1)
    images = torch.nn.functional.normalize(torch.tensor([[1.0, 0.05], [1.0, 0.0], [0.1, 1.0]]), dim=1)
    m = toy_clip.measure(text, images, colors, shapes)
    assert m.recall_at_1 == 1.0 and m.pairs == 3 and m.agreeing_pairs == 1
    assert m.pair_accuracy == 1.0 and m.differing_below == 1.0


def test_checkpoints_round_trip(tmp_path):
    args = train_clip.parse_args(["--work", str(tmp_path)])
    model = toy_clip.build_toy_clip(seed=1)
    opt = train_clip.make_optimizer(model, args)
    model(torch.zeros(2, 3, 32, 32), torch.zeros(2, toy_clip.CONTEXT_LENGTH, dtype=torch.long))[0].sum().backward()
    opt.step()
    train_clip.save_checkpoint(tmp_path, model, opt, {"step": 7, "train_seconds": 1.0})
    other = toy_clip.build_toy_clip(seed=2)
    other_opt = train_clip.make_optimizer(other, args)
    assert train_clip.load_checkpoint(tmp_path, other, other_opt)["step"] == 7
    for (name, p), q in zip(model.named_parameters(), other.parameters()):
        assert torch.equal(p, q), name
    assert len(other_opt.state) == len(opt.state)


def test_toy_names_resolve_to_the_package(tmp_path, monkeypatch):
    from pixelmill.models import loading

    assert loading.TOY_MODELS_DIR == SHIPPED.parent
    monkeypatch.setattr(loading, "TOY_MODELS_DIR", tmp_path)
    (tmp_path / "clip").mkdir()
    assert not looks_local("toy:clip")
    assert resolve_model_name("toy:clip") == str(tmp_path / "clip")
    assert resolve_model_name("/some/path") == "/some/path"
    with pytest.raises(ModelNotFound, match="unknown toy model 'toy:nope'; shipped: toy:clip"):
        resolve_model_name("toy:nope")
    with pytest.raises(ModelNotFound, match="unknown toy model"):
        load_clip("toy:../clip")


@needs_weights
def test_shipped_clip_is_small_and_described():
    config = json.loads((SHIPPED / train_clip.CONFIG_NAME).read_text())
    assert config["model_cfg"] == toy_clip.MODEL_CFG
    assert (SHIPPED / train_clip.WEIGHTS_NAME).stat().st_size < 5_000_000
    card = (SHIPPED / "MODEL_CARD.md").read_text()
    assert "recall@1" in card and "python -m pixelmill.toy.train_clip" in card


@needs_weights
@pytest.mark.parametrize("name", ["path", "toy:clip"])
def test_shipped_clip_loads_and_retrieves_the_right_objects(name, one_torch_thread):
    model, preprocess, tokenizer = load_clip(str(SHIPPED) if name == "path" else name, device="cpu")
    assert model_fingerprint("toy:clip") == model_fingerprint(str(SHIPPED))
    rows = toy_clip.make_rows(toy_clip.EVAL_SEED, 1000, 1100)
    m = toy_clip.evaluate(model, tokenizer, rows, preprocess=preprocess)
    assert m.recall_at_1 >= 0.9, m
    assert m.pair_accuracy >= 0.95, m


def test_pool_width_check_knows_the_toy_clip_by_its_short_name():
    """Retrieval checks a pool's embedding width against the model's; a short name must not skip it."""
    from pathlib import Path

    from pixelmill.models.loading import resolve_model_name
    from pixelmill.tasks.regularization import clip_embed_dim

    folder = resolve_model_name("toy:clip")
    width = json.loads((Path(folder) / "open_clip_config.json").read_text())["model_cfg"]["embed_dim"]
    assert clip_embed_dim("toy:clip") == clip_embed_dim(folder) == width
