"""The answer format InstructPix2Pix's GPT-3 was fine-tuned on, and the rules an answer must pass.

The prompt is ``caption + "\\n##\\n"`` and the completion is
``instruction + "\\n%%\\n" + edited_caption + "\\nEND"``. Every writer answers in this
format (the template writer formats its edits the same way), so one parser and one set
of filters judge all of them: ``parse_answer`` splits an answer, ``filter_pair`` applies
the reference filters, ``normalize_caption`` is the key for "differs from the input" and
for deduplication.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

from pixelmill.tasks.stage import RowError

PROMPT_SEPARATOR = "\n##\n"
ANSWER_SEPARATOR = "\n%%\n"
STOP = "\nEND"

CHAT_SYSTEM_PROMPT = """\
You write instructions for editing images. The user sends the caption of an image. \
Invent one plausible, visual edit of that image and reply in exactly this format, \
with no other text:
<a short instruction, e.g. "make it winter", "turn the cat into a dog", "add a rainbow">
%%
<the caption of the edited image, written like the input caption>
END

Example. Caption: a photograph of a girl riding a horse
Reply:
have her ride a dragon
%%
a photograph of a girl riding a dragon
END"""


@dataclass(frozen=True)
class WriterAnswer:
    """What a writer returned for one caption.

    Args:
        raw: the text the model returned (without the stop sequence when the model
            stopped on it), or None when no answer came back.
        error: None, or why there is no usable answer (``http_429_retries_exhausted``,
            ``timeout_retries_exhausted``, ``prompt_too_long``, ...).
        finish_reason: ``stop`` (stop sequence or end token), ``length`` (cut off at
            ``max_tokens``) or None when unknown.
        model: the model that answered, when the server says (an API may resolve an
            alias such as ``gpt-4o`` to a dated snapshot).
    """

    raw: str | None
    error: str | None = None
    finish_reason: str | None = None
    model: str | None = None


def normalize_caption(text: str) -> str:
    """Lower-case, drop punctuation and symbols, collapse whitespace: the key for comparisons.

    Used both for "the edited caption must differ from the input ignoring case and
    punctuation" and for deduplicating captions.
    """
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(" " if unicodedata.category(ch)[0] in "PS" else ch for ch in text)
    return " ".join(text.split())


def parse_answer(raw: str | None) -> tuple[str, str]:
    """Split a writer's answer into ``(instruction, edited_caption)``.

    The answer must split on ``"\\n%%\\n"`` into exactly two non-empty parts. Everything
    from the first ``"\\nEND"`` on is dropped (an API that honours the stop sequence has
    already removed it), as is a bare trailing ``END``; both parts are stripped.

    Raises:
        RowError: with reason ``empty_answer``, ``no_separator``, ``too_many_parts``,
            ``empty_instruction`` or ``empty_edited_caption``.
    """
    if raw is None or not raw.strip():
        raise RowError("empty_answer")
    text = raw.replace("\r\n", "\n")
    cut = text.find(STOP)
    if cut >= 0:
        text = text[:cut]
    trimmed = text.rstrip()
    if trimmed.endswith("END") and (len(trimmed) == 3 or not trimmed[-4].isalnum()):
        text = trimmed[:-3]
    parts = text.split(ANSWER_SEPARATOR)
    if len(parts) == 1:
        if text.rstrip().endswith("\n%%"):
            raise RowError("empty_edited_caption")
        if text.lstrip().startswith("%%\n"):
            raise RowError("empty_instruction")
        raise RowError("no_separator")
    if len(parts) > 2:
        raise RowError("too_many_parts")
    instruction, edited = parts[0].strip(), parts[1].strip()
    if not instruction:
        raise RowError("empty_instruction")
    if not edited:
        raise RowError("empty_edited_caption")
    return instruction, edited


def filter_pair(
    caption: str, instruction: str, edited: str, min_len: int = 2, max_len: int = 256
) -> str | None:
    """Check a parsed pair; return a reject reason, or None when it is kept.

    Reasons: ``multiline_instruction`` / ``multiline_edited_caption`` (a line break inside
    a part: not usable as a one-line prompt), ``instruction_too_short`` /
    ``instruction_too_long`` / ``edited_caption_too_short`` / ``edited_caption_too_long``
    (characters, after stripping, outside ``[min_len, max_len]``), and
    ``unchanged_caption`` (equal to the input ignoring case and punctuation).

    Args:
        caption: the input caption.
        instruction: the parsed instruction.
        edited: the parsed edited caption.
        min_len: fewest characters allowed in each part.
        max_len: most characters allowed in each part.
    """
    for name, text in (("instruction", instruction.strip()), ("edited_caption", edited.strip())):
        if "\n" in text or "\r" in text:
            return f"multiline_{name}"
        if len(text) < min_len:
            return f"{name}_too_short"
        if len(text) > max_len:
            return f"{name}_too_long"
    if normalize_caption(caption) == normalize_caption(edited):
        return "unchanged_caption"
    return None


def format_answer(instruction: str, edited: str) -> str:
    """The completion format InstructPix2Pix's GPT-3 was fine-tuned on."""
    return f"{instruction}{ANSWER_SEPARATOR}{edited}{STOP}"
