"""What the real stages declare for the generic runner (``flows/stage_run.py``) is consistent.

The runner knows no method: it reads ``dataset`` (the output's schema name and version),
``input_columns(config)`` (what to read) and ``dropped_columns(config)`` (what must not
reach the output) from the stage class. These are class-level checks; no model loads.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pixelmill.config import EditConfig, PairsConfig, load_config
from pixelmill.tasks.edit import BulkEditor, InstructPix2PixEditor, MaskedSDEditEditor, SDEditEditor
from pixelmill.tasks.edit.text2live import Text2LiveEditor
from pixelmill.tasks.instructions import InstructionStage
from pixelmill.tasks.instructions.stage import OUTPUT_SCHEMA as INSTRUCTIONS_SCHEMA
from pixelmill.tasks.p2p import PairRenderStage
from pixelmill.tasks.retrieval.embedder import PoolEmbedder
from pixelmill.tasks.stage import Stage
from pixelmill.tasks.train.class_images import ClassImageGenerator

CONFIGS = Path(__file__).resolve().parents[3] / "configs"
EDITORS = [SDEditEditor, MaskedSDEditEditor, InstructPix2PixEditor, Text2LiveEditor]
BY_METHOD = {"sdedit": SDEditEditor, "instruct_pix2pix": InstructPix2PixEditor, "text2live": Text2LiveEditor}


def test_the_output_datasets_the_stages_declare():
    assert SDEditEditor.dataset == ("edits", 1)
    for editor in EDITORS:
        assert issubclass(editor, BulkEditor) and editor.dataset == ("edits", 1), editor
    assert InstructionStage.dataset == ("instructions", 1)
    assert PairRenderStage.dataset == ("pairs", 1)
    assert PoolEmbedder.dataset == ("pool", 1)
    assert ClassImageGenerator.dataset == ("class-images", 1)


def test_every_real_stage_is_a_stage_with_its_own_name():
    stages = [BulkEditor, InstructionStage, PairRenderStage, PoolEmbedder, ClassImageGenerator]
    assert all(issubclass(s, Stage) for s in stages)
    names = [s.name for s in stages]
    assert "stage" not in names and len(set(names)) == len(names)


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("edit-*.yaml")))
def test_edit_stages_read_id_first_then_what_the_example_config_names(name):
    config = load_config(EditConfig, CONFIGS / name).model_dump()
    editor = BY_METHOD[config["method"]].for_config(config)
    cols = editor.input_columns(config)
    assert cols[0] == "id" and len(cols) == len(set(cols))
    assert config["image_column"] in cols
    for key in ("caption_column", "prompt_column", "instruction_column", "mask_column", "stroke_column"):
        if config.get(key):
            assert config[key] in cols, key
    assert set(editor.dropped_columns(config)) <= set(cols)


def test_masked_sdedit_is_picked_and_reads_its_mask_column():
    config = load_config(EditConfig, CONFIGS / "edit-masked-sdedit.yaml").model_dump()
    assert SDEditEditor.for_config(config) is MaskedSDEditEditor
    assert config["mask_column"] in MaskedSDEditEditor.input_columns(config)
    plain = {**config, "mask_column": None, "stroke_column": None}
    assert SDEditEditor.for_config(plain) is SDEditEditor


def test_prompt_template_fields_are_read():
    config = {"image_column": "image", "caption_column": None, "prompt": "a {style} photo of {caption}"}
    assert SDEditEditor.input_columns(config) == ["id", "image", "style", "caption"]


def test_pair_rendering_reads_what_the_instruction_stage_writes():
    cfg = load_config(PairsConfig, CONFIGS / "pairs.yaml")
    text_cols = InstructionStage.input_columns(cfg.text_stage_config())
    assert text_cols[0] == "id"
    pair_cols = PairRenderStage.input_columns(cfg.image_stage_config())
    assert pair_cols == PairRenderStage.input_columns({})
    assert "edit_prompt" in pair_cols and pair_cols[0] == "id"
    assert set(pair_cols) <= set(INSTRUCTIONS_SCHEMA.names)


def test_the_pool_embedder_reads_but_does_not_keep_its_image_column():
    config = {"caption_column": "caption", "image_column": "image", "keep_columns": ["url"]}
    cols = PoolEmbedder.input_columns(config)
    assert cols == ["id", "caption", "image", "url"]
    assert PoolEmbedder.dropped_columns(config) == ("image",)
    assert PoolEmbedder.dropped_columns({"caption_column": "caption"}) == ()


def test_class_image_generation_reads_prompt_and_seed():
    assert ClassImageGenerator.input_columns({}) == ["id", "prompt", "seed"]
