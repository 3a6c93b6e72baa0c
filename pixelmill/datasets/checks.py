"""Whole-input checks run before a flow starts: what would otherwise fail half-way through a run.

:func:`check_input_dataset` opens an input dataset and checks, reading only Parquet
footers and the id column: every shard the manifest lists exists, is Parquet and has the
rows the manifest says; the columns a flow reads are in every shard with a usable type;
there is at least one row; ids are present, unique and safe (no ``..`` path segment, no
absolute path, no control characters: ids may end up in file names downstream). Each
problem raises :class:`~pixelmill.datasets.errors.InputError` naming it (and some
offending shards or ids), which the CLI turns into exit status 2.
"""

from __future__ import annotations

import re
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq

from pixelmill.datasets import storage
from pixelmill.datasets.errors import InputError
from pixelmill.datasets.reader import Dataset
from pixelmill.datasets.text import table_rows

ID_COLUMN = "id"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _sample(items: list[str], n: int = 5) -> str:
    shown = ", ".join(str(i) for i in items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")


def unsafe_id_reason(value: str) -> str | None:
    """Why an id cannot be used as (part of) a file name, or None when it can.

    Ids may hold ``/`` (a folder import names rows by relative path), but never a ``..``
    segment, a leading ``/`` or ``\\``, or control characters.
    """
    if _CONTROL.search(value):
        return "a control character"
    if value.startswith(("/", "\\")):
        return "an absolute path"
    if any(part == ".." for part in re.split(r"[/\\]", value)):
        return "a '..' path segment"
    return None


def check_ids(ids: list, where: str) -> None:
    """Ids must be present, unique and safe; raises ``InputError`` naming some offenders.

    Args:
        ids: the id values in row order (None for nulls).
        where: how the message names the input.
    """
    invalid = [i for i, v in enumerate(ids) if isinstance(v, bytes)]
    if invalid:
        raise InputError(f"{where}: {len(invalid)} id(s) are not valid UTF-8 (row {', '.join(map(str, invalid[:5]))})")
    nulls = [i for i, v in enumerate(ids) if v is None or (isinstance(v, str) and not v.strip())]
    if nulls:
        raise InputError(f"{where}: {len(nulls)} row(s) have a null or empty id (row {', '.join(map(str, nulls[:5]))}"
                         f"{' …' if len(nulls) > 5 else ''}); every row needs an id")
    keys = [str(v) for v in ids]
    dupes = sorted(k for k, n in Counter(keys).items() if n > 1)
    if dupes:
        raise InputError(f"{where}: ids must be unique; repeated: {_sample(dupes)}"
                         + (f" ({len(dupes)} ids in all)" if len(dupes) > 5 else ""))
    unsafe = [(k, r) for k in keys if (r := unsafe_id_reason(k))]
    if unsafe:
        raise InputError(f"{where}: {len(unsafe)} id(s) cannot be used safely as names: "
                         + ", ".join(f"{k!r} ({r})" for k, r in unsafe[:5]))


def _is_text(t: pa.DataType) -> bool:
    return (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t)
            or pa.types.is_large_binary(t) or pa.types.is_null(t))


def _is_image(t: pa.DataType) -> bool:
    if pa.types.is_struct(t):
        names = {f.name for f in t}
        return "bytes" in names and all(
            pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type) for f in t if f.name == "bytes")
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_null(t)


def _is_id(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t)


KIND_CHECKS = {
    "id": (_is_id, "string or integer ids"),
    "text": (_is_text, "text (string, or binary holding UTF-8)"),
    "image": (_is_image, "an image (struct<bytes, path> as Hugging Face stores it, or binary file bytes)"),
    "any": (lambda t: True, "anything"),
}


def check_input_dataset(url: str, columns: dict[str, tuple[str, str]], field: str = "input") -> Dataset:
    """Open an input dataset and check it as a whole before any work starts.

    Args:
        url: the dataset.
        columns: column name -> (kind, config key naming it); kind is ``text``,
            ``image`` or ``any``.
        field: the config key naming the dataset, for messages.

    Returns:
        The opened dataset.

    Raises:
        InputError: naming the first problem found.
        DatasetNotFound: nothing at ``url``.
    """
    ds = Dataset.open(url)
    where = f"{field} {url}"
    names = ds.shard_names()
    if not names:
        raise InputError(f"{where} has no shards: the dataset is empty")
    schemas: dict[str, pa.Schema] = {}
    missing = []
    total = 0
    for name in names:
        shard_url = ds.shard_url(name)
        expected = ds._expected_rows(name)
        if not storage.exists(shard_url):
            if expected == 0:
                continue
            missing.append(name)
            continue
        try:
            fs, path = storage.resolve(shard_url)
            with fs.open(path, "rb") as f:
                meta = pq.ParquetFile(f).metadata
                schema = meta.schema.to_arrow_schema()
        except Exception as e:  # noqa: BLE001 - any unreadable footer is the same input problem
            raise InputError(f"{where}: shard {name} ({shard_url}) is not a readable Parquet file "
                             f"({type(e).__name__}: {e})") from None
        if expected is not None and meta.num_rows != expected:
            raise InputError(f"{where}: shard {name} has {meta.num_rows} rows but the manifest lists {expected}; "
                             "the dataset was changed after it was written")
        schemas[name] = schema
        total += meta.num_rows
    if missing:
        raise InputError(f"{where}: {len(missing)} shard(s) listed in the manifest are missing: "
                         f"{', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}")
    if total == 0:
        raise InputError(f"{where} has no rows: nothing to do")
    wanted = {ID_COLUMN: ("id", "id"), **columns}
    for name, schema in schemas.items():
        for column, (kind, key) in wanted.items():
            label = f"{key}: column {column!r}" if key != "id" else "column 'id'"
            if column not in schema.names:
                raise InputError(f"{where}: {label} is not in shard {name} (columns: {', '.join(schema.names)})")
            ok, expected_kind = KIND_CHECKS[kind]
            typ = schema.field(column).type
            if not ok(typ):
                raise InputError(f"{where}: {label} has type {typ} in shard {name}; expected {expected_kind}")
    ids: list = []
    for name in schemas:
        ids += [r[ID_COLUMN] for r in table_rows(ds.read_shard(name, columns=[ID_COLUMN]))]
    check_ids(ids, where)
    return ds
