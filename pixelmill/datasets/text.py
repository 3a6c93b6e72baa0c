"""Text cells from untrusted datasets: rows that never crash a batch, prompts of bounded length.

A Parquet ``string`` column written by another tool can hold bytes that are not UTF-8;
pyarrow reads the file but fails on the whole batch when it converts a cell to Python.
:func:`table_rows` converts a batch row by row instead, leaving such a cell as
:class:`InvalidText` so that only its row is rejected. :func:`text_value` turns any text
cell (a string, bytes of a ``binary`` column, null) into usable text or a
:class:`TextError` with a readable reason, and truncates very long text, saying so.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

MAX_TEXT_CHARS = 1000
"""Longest prompt or instruction passed on (a CLIP text encoder reads 77 tokens, roughly 300 characters)."""


class TextError(ValueError):
    """A text cell that cannot be used; the message is the reject reason."""


class InvalidText(bytes):
    """The raw bytes of a ``string`` cell that is not valid UTF-8 (see :func:`table_rows`)."""


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def table_rows(table: pa.Table) -> list[dict[str, Any]]:
    """``table.to_pylist()``, except that a string cell holding invalid UTF-8 becomes :class:`InvalidText`.

    Valid tables take the fast path; only a column that fails UTF-8 validation is
    converted cell by cell.
    """
    bad: dict[str, list[Any]] = {}
    for name, column in zip(table.column_names, table.columns):
        if not _is_text(column.type):
            continue
        try:
            column.validate(full=True)
        except pa.ArrowInvalid:
            raw = column.cast(pa.large_binary() if pa.types.is_large_string(column.type) else pa.binary())
            bad[name] = [_text_or_invalid(v) for v in raw.to_pylist()]
    if not bad:
        return table.to_pylist()
    rows = table.drop_columns(list(bad)).to_pylist()
    for name, values in bad.items():
        for row, value in zip(rows, values):
            row[name] = value
    return [{name: row[name] for name in table.column_names} for row in rows]


def _text_or_invalid(value: bytes | None) -> str | InvalidText | None:
    if value is None:
        return None
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return InvalidText(value)


def text_value(value: Any, what: str, max_chars: int = MAX_TEXT_CHARS,
               notes: list[str] | None = None) -> str:
    """A usable text from a cell: UTF-8, not empty, at most ``max_chars`` characters.

    Args:
        value: a ``str``, the bytes of a binary cell (decoded as UTF-8), or None.
        what: how the reason names the value (``prompt in column 'caption'``).
        max_chars: longer text is cut to this many characters (at a word boundary when
            one is near) and the cut is appended to ``notes``, never a reject.
        notes: receives the truncation note.

    Raises:
        TextError: null, empty or blank, or bytes that are not UTF-8.
    """
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        try:
            value = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise TextError(f"{what} is not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})") from None
    if value is None:
        raise TextError(f"missing {what} (null)")
    if not isinstance(value, str):
        raise TextError(f"{what} is a {type(value).__name__}, not text")
    if not value.strip():
        raise TextError(f"missing {what} (empty)")
    if len(value) > max_chars:
        cut = value[:max_chars]
        space = cut.rfind(" ", max_chars - 50)
        cut = (cut[:space] if space > 0 else cut).rstrip()
        if notes is not None:
            notes.append(f"{what} truncated from {len(value)} to {len(cut)} characters")
        value = cut
    return value
