"""The text stage of InstructPix2Pix's dataset pipeline: captions → (instruction, edited caption).

For each input caption a writer produces an edit instruction and the caption of the
edited image, in InstructPix2Pix's format: the prompt is ``caption + "\\n##\\n"`` and the
answer is ``instruction + "\\n%%\\n" + edited_caption + "\\nEND"``. Three writers share one
interface (``write(captions, seeds) -> list[WriterAnswer]``):

- ``TemplateInstructionWriter`` (default): offline and deterministic per seed, a small
  grammar of edit types (swap an object, recolour, change material, add, remove,
  restyle, season, weather, time of day) applied to the parsed caption.
- ``TransformersInstructionWriter``: any local causal LM, sampled with the reference
  settings (temperature 0.7, top_p 1.0, OpenAI-style frequency penalty 0.1, 256 tokens,
  stop at ``"\\nEND"``), batched, one seed per row.
- ``OpenAIInstructionWriter``: any OpenAI-compatible endpoint (``/completions`` or
  ``/chat/completions``) with bounded concurrency, retries with exponential backoff, and
  a fail-fast error on bad credentials.

``InstructionStage`` turns answers into rows: ``parse_answer`` and ``filter_pair`` apply
the reference filters (exactly two parts; the edited caption differs from the input
ignoring case and punctuation; length limits), and duplicate captions within a call are
rejected (``duplicate_caption``). Every input row gives exactly one output row.
"""

from __future__ import annotations

from typing import Any

from pixelmill.tasks.instructions.answer import (
    ANSWER_SEPARATOR,
    CHAT_SYSTEM_PROMPT,
    PROMPT_SEPARATOR,
    STOP,
    WriterAnswer,
    filter_pair,
    format_answer,
    normalize_caption,
    parse_answer,
)
from pixelmill.tasks.instructions.stage import (
    DEFAULT_CONFIG,
    OUTPUT_SCHEMA,
    InstructionStage,
    find_duplicate_captions,
)
from pixelmill.tasks.instructions.writers import (
    InstructionWriter,
    WriterAuthError,
    WriterFatalError,
    build_writer,
    writer_class,
)
from pixelmill.tasks.instructions.writers.openai import OpenAIInstructionWriter, SleepFn
from pixelmill.tasks.instructions.writers.template import (
    EDIT_TYPES,
    TEMPLATE_VERSION,
    TemplateEdit,
    TemplateInstructionWriter,
)
from pixelmill.tasks.instructions.writers.transformers import _LAZY_HF_CLASSES, TransformersInstructionWriter, _hf_class


def __getattr__(name: str) -> Any:
    # FrequencyPenaltyLogitsProcessor, SeededSamplerLogitsProcessor, StopOnTextCriteria:
    # built on first use because they subclass transformers classes (see writers/transformers.py).
    if name in _LAZY_HF_CLASSES:
        return _hf_class(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ANSWER_SEPARATOR",
    "CHAT_SYSTEM_PROMPT",
    "DEFAULT_CONFIG",
    "EDIT_TYPES",
    "OUTPUT_SCHEMA",
    "PROMPT_SEPARATOR",
    "STOP",
    "TEMPLATE_VERSION",
    "InstructionStage",
    "InstructionWriter",
    "OpenAIInstructionWriter",
    "SleepFn",
    "TemplateEdit",
    "TemplateInstructionWriter",
    "TransformersInstructionWriter",
    "WriterAnswer",
    "WriterAuthError",
    "WriterFatalError",
    "build_writer",
    "filter_pair",
    "find_duplicate_captions",
    "format_answer",
    "normalize_caption",
    "parse_answer",
    "writer_class",
]
