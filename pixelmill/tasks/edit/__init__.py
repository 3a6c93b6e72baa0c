"""Editing methods: SDEdit (fixed t0 or a per-image t0 search, optionally masked), InstructPix2Pix, Text2Live.

Each stage maps a batch of input rows to one output row per input: an edited row, or a
reject with its reason (undecodable or oversized image, missing prompt, bad mask, ``nsfw``).
Rows are normalised on read, grouped by size, edited in batches with one generator per
row (seeded by the row id and the config seed, so a row's noise never depends on its
batch), and scored.

The package is split by method: :mod:`~pixelmill.tasks.edit.base` (output schema, row
seeds, prompt templates, the shared ``BulkEditor``), :mod:`~pixelmill.tasks.edit.sdedit`
(SDEdit and its ``sdedit_steps`` loop), :mod:`~pixelmill.tasks.edit.masked_sdedit`
(masked SDEdit and the mask helpers), :mod:`~pixelmill.tasks.edit.instruct_pix2pix` and
:mod:`~pixelmill.tasks.edit.text2live` (its layer generator in ``text2live_layer``). Each
method registers itself (``pixelmill.registry``, kind ``edit``) with what it needs; a new
method is one new file here (or in a plugin module) and nothing else changes.
"""

from __future__ import annotations

from pixelmill.tasks.edit.base import (
    OUTPUT_SCHEMA,
    BulkEditor,
    fill_template,
    input_columns,
    row_seed,
    template_fields,
)
from pixelmill.tasks.edit.instruct_pix2pix import InstructPix2PixEditor
from pixelmill.tasks.edit.masked_sdedit import (
    MaskedSDEditEditor,
    dilate_mask,
    oriented_size,
    read_mask,
    resize_mask,
    stroke_region,
)
from pixelmill.tasks.edit.sdedit import SDEditEditor, paste_outside_mask, sdedit_steps, unedited_output

__all__ = [
    "OUTPUT_SCHEMA",
    "BulkEditor",
    "InstructPix2PixEditor",
    "MaskedSDEditEditor",
    "SDEditEditor",
    "dilate_mask",
    "fill_template",
    "input_columns",
    "oriented_size",
    "paste_outside_mask",
    "read_mask",
    "resize_mask",
    "row_seed",
    "sdedit_steps",
    "stroke_region",
    "template_fields",
    "unedited_output",
]
