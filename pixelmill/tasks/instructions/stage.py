"""The Ray Data stage that turns captions into instruction rows, and the cross-shard caption dedup."""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

from pixelmill.tasks.edit import row_seed
from pixelmill.tasks.instructions.answer import WriterAnswer, filter_pair, normalize_caption, parse_answer
from pixelmill.tasks.instructions.writers import (
    InstructionWriter,
    WriterFatalError,
    build_writer,
)
from pixelmill.tasks.stage import STATUS_OK, STATUS_REJECT, Resources, RowError, Stage

OUTPUT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("caption", pa.string()),
        ("edit_prompt", pa.string()),
        ("edited_caption", pa.string()),
        ("raw_answer", pa.string()),
        ("writer", pa.string()),
        ("writer_model", pa.string()),
        ("seed", pa.int64()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("stage", pa.string()),
        ("shard", pa.string()),
    ]
)

DEFAULT_CONFIG: dict[str, Any] = {
    "writer": "template",
    "writer_options": {},
    "caption_column": "caption",
    "seed": 0,
    "batch_size": 16,
    "min_length": 2,
    "max_length": 256,
    "duplicates_url": None,
}


def find_duplicate_captions(dataset_url: str, caption_column: str, limit: int | None, out_url: str) -> int:
    """Map every row whose normalised caption appeared earlier in the input to that first row.

    Order is shard name, then row (the flow's plan order), within the first ``limit``
    rows. Writes ``{id: first_id}`` as JSON to ``out_url``; returns how many duplicates.
    """
    from pixelmill.datasets import Dataset
    from pixelmill.datasets.storage import write_text_atomic

    ds = Dataset.open(dataset_url)
    first: dict[str, str] = {}
    duplicates: dict[str, str] = {}
    remaining = limit
    for name in ds.shard_names():
        if remaining is not None and remaining <= 0:
            break
        t = ds.read_shard(name, ["id", caption_column])
        if remaining is not None:
            t = t.slice(0, remaining)
            remaining -= t.num_rows
        for row_id, caption in zip(t["id"].to_pylist(), t[caption_column].to_pylist()):
            key = normalize_caption(caption) if isinstance(caption, str) else ""
            if not key:
                continue
            if key in first:
                duplicates[str(row_id)] = first[key]
            else:
                first[key] = str(row_id)
    write_text_atomic(out_url, json.dumps(duplicates))
    return len(duplicates)


class InstructionStage(Stage):
    """Captions → (instruction, edited caption), one output row per input row.

    Rows need ``id`` and the caption column. A missing or blank caption is rejected
    (``missing_caption``), and so is a caption equal (ignoring case and punctuation) to
    an earlier one in the same call (``duplicate_caption``); neither is sent to the
    writer. The rest go to the writer in chunks of ``batch_size``, each with its seed
    ``row_seed(seed, id)``. An answer is kept when it parses (``parse_answer``) and
    passes ``filter_pair``; otherwise the row is a reject with the reason (a writer
    error, ``truncated`` when the answer hit ``max_tokens``, or a parse/filter reason).
    Rejects keep the raw answer and whatever parsed, for inspection.

    Deduplication is per call, plus global when ``duplicates_url`` names a JSON map of
    row id → the id of the first row with the same normalised caption (what
    :func:`find_duplicate_captions` writes for the whole input, across shards).

    A writer error that every row would hit (bad API key, wrong URL) raises
    ``WriterFatalError`` out of ``__call__`` instead of rejecting the whole dataset.

    Args:
        config: ``writer`` (template | transformers | openai), ``writer_options`` (dict
            passed to the writer), ``caption_column``, ``seed``, ``batch_size``,
            ``min_length`` and ``max_length`` (characters, for both parts).
        resources: CPUs/GPUs per worker.
        writer: an already built writer to use instead of building one from the config
            (tests inject one with a recording ``sleep``).
    """

    name = "instructions"
    dataset = ("instructions", 1)

    @classmethod
    def input_columns(cls, config: dict[str, Any]) -> list[str]:
        return ["id", config["caption_column"]]


    def __init__(self, config: dict[str, Any], resources: Resources | None = None,
                 writer: InstructionWriter | None = None) -> None:
        unknown = [k for k in config if k not in DEFAULT_CONFIG]
        if unknown:
            raise ValueError(f"unknown instructions config keys {unknown!r} (known: {', '.join(DEFAULT_CONFIG)})")
        merged = {**DEFAULT_CONFIG, **config}
        merged["writer_options"] = dict(merged.get("writer_options") or {})
        if int(merged["batch_size"]) < 1:
            raise ValueError("batch_size must be at least 1")
        if not 0 <= int(merged["min_length"]) <= int(merged["max_length"]):
            raise ValueError("need 0 <= min_length <= max_length")
        if not isinstance(merged["caption_column"], str) or not merged["caption_column"]:
            raise ValueError("caption_column must be a column name")
        super().__init__(merged, resources)
        self.writer = writer or build_writer(merged["writer"], merged["writer_options"])
        self._ready = False

    def setup(self) -> None:
        self.writer.setup()
        self.duplicates: dict[str, str] = {}
        if self.config.get("duplicates_url"):
            from pixelmill.datasets.storage import read_text

            self.duplicates = json.loads(read_text(self.config["duplicates_url"]))
        self._ready = True

    def __call__(self, batch: pa.Table) -> pa.Table:
        if not self._ready:
            self.setup()
        c = self.config
        rows = batch.to_pylist()
        out: list[dict[str, Any] | None] = [None] * len(rows)
        seen: set[str] = set()
        pending: list[tuple[int, str, int]] = []
        for i, row in enumerate(rows):
            seed = row_seed(int(c["seed"]), str(row.get("id")))
            caption = row.get(c["caption_column"])
            if not isinstance(caption, str) or not normalize_caption(caption):
                out[i] = self._row(row, seed, None, error=f"missing_caption in column {c['caption_column']!r}")
                continue
            key = normalize_caption(caption)
            if str(row.get("id")) in self.duplicates:
                out[i] = self._row(row, seed, None,
                                   error=f"duplicate_caption of {self.duplicates[str(row.get('id'))]}")
                continue
            if key in seen:
                out[i] = self._row(row, seed, None, error="duplicate_caption")
                continue
            seen.add(key)
            pending.append((i, " ".join(caption.split()), seed))
        size = int(c["batch_size"])
        for start in range(0, len(pending), size):
            chunk = pending[start:start + size]
            for (i, caption, seed), answer in zip(chunk, self._write(chunk)):
                out[i] = self._judge(rows[i], seed, caption, answer)
            self.beat(f"{start + len(chunk)} of {len(pending)} captions written")
        return pa.Table.from_pylist(out, schema=OUTPUT_SCHEMA)

    def _write(self, chunk: list[tuple[int, str, int]]) -> list[WriterAnswer]:
        """Write a chunk; if it fails, retry row by row so one bad row cannot sink the batch."""
        try:
            answers = self.writer.write([x[1] for x in chunk], [x[2] for x in chunk])
        except WriterFatalError:
            raise
        except Exception as exc:  # noqa: BLE001 - isolate, then report per row
            if len(chunk) == 1:
                return [WriterAnswer(raw=None, error=f"writer_failed: {type(exc).__name__}: {exc}"[:300])]
            return [self._write([x])[0] for x in chunk]
        if len(answers) != len(chunk):
            raise RuntimeError(
                f"{type(self.writer).__name__} returned {len(answers)} answers for {len(chunk)} captions")
        return answers

    def _judge(self, row: dict, seed: int, caption: str, answer: WriterAnswer) -> dict[str, Any]:
        if answer.error:
            return self._row(row, seed, answer, error=answer.error)
        if answer.finish_reason == "length":
            return self._row(row, seed, answer, error="truncated")
        try:
            instruction, edited = parse_answer(answer.raw)
        except RowError as e:
            return self._row(row, seed, answer, error=e.reason)
        reason = filter_pair(caption, instruction, edited, int(self.config["min_length"]),
                             int(self.config["max_length"]))
        return self._row(row, seed, answer, instruction, edited, error=reason)

    def _row(self, row: dict, seed: int, answer: WriterAnswer | None, instruction: str | None = None,
             edited: str | None = None, error: str | None = None) -> dict[str, Any]:
        shard = row.get("shard")
        return {
            "id": str(row.get("id")),
            "caption": row.get(self.config["caption_column"]),
            "edit_prompt": instruction,
            "edited_caption": edited,
            "raw_answer": answer.raw if answer else None,
            "writer": self.writer.name,
            "writer_model": (answer.model if answer and answer.model else None) or self.writer.model_name,
            "seed": seed,
            "status": STATUS_REJECT if error else STATUS_OK,
            "error": error,
            "stage": self.name,
            "shard": None if shard is None else str(shard),
        }
