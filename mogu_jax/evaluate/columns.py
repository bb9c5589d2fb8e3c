"""Any prompt file by named columns: a ``.csv``, ``.tsv`` or ``.jsonl`` / ``.json`` file whose prompt is in one
column (field) and whose kind is in another (its values mapped onto our kinds by a kind map) or given for the
whole file, so a published refusal or over-refusal benchmark a user has locally loads without code::

    load_prompts_by_column("xstest.csv", "prompt", kind_column="label",
                           kind_map=parse_kind_map("safe=benign,unsafe=harmful"))
    load_prompts_by_column("advbench.csv", "goal", kind="harmful")
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional

from mogu_jax.errors import MoguError
from mogu_jax.evaluate.loaders import json_records, read_table
from mogu_jax.evaluate.rows import KINDS, check_ids, check_kind, type_name

#: File name endings -> how the file is read.
TABLE_TYPES = {".csv": ",", ".tsv": "\t"}
JSON_TYPES = (".jsonl", ".json")


def parse_kind_map(text: str) -> dict[str, str]:
    """``'safe=benign,unsafe=harmful'`` -> ``{"safe": "benign", "unsafe": "harmful"}``: comma-separated
    ``value=kind`` pairs, each kind one of :data:`KINDS`, each value once."""
    if not isinstance(text, str) or not text.strip():
        raise MoguError("the kind map is empty; give value=kind pairs, e.g. 'safe=benign,unsafe=harmful'")
    out: dict[str, str] = {}
    for item in text.split(","):
        value, sep, kind = (x.strip() for x in item.partition("="))
        if not sep or not value or not kind:
            raise MoguError(f"kind map entry {item.strip()!r} is not value=kind "
                            "(e.g. 'safe=benign,unsafe=harmful')")
        if kind not in KINDS:
            raise MoguError(f"kind map entry {item.strip()!r}: unknown kind {kind!r}; kinds: {', '.join(KINDS)}")
        if value in out:
            raise MoguError(f"kind map: value {value!r} is mapped twice")
        out[value] = kind
    return out


def _records(path: str, needed: list[str]) -> tuple[list[dict], list[str]]:
    """The file's rows as dicts with their locations; a needed column missing from the header (CSV/TSV) is an
    error here, a field missing from a JSON row is one in :func:`_cell`."""
    ext = os.path.splitext(path)[1].lower()
    if ext in TABLE_TYPES:
        recs, locs, _ = read_table(path, needed, "a prompt table with these columns", TABLE_TYPES[ext])
        return recs, locs
    if ext in JSON_TYPES:
        recs, locs = [], []
        for v, loc in json_records(path):
            if not isinstance(v, dict):
                raise MoguError(f"{path}: {loc}: expected a JSON object with field(s) {', '.join(needed)}, "
                                f"got a JSON {type_name(v)}")
            recs.append(v)
            locs.append(loc)
        return recs, locs
    raise MoguError(f"{path}: prompts by column are read from {', '.join(list(TABLE_TYPES) + list(JSON_TYPES))} "
                    "files (by the name's ending)")


def _cell(path: str, rec: Mapping[str, Any], loc: str, column: str) -> str:
    """A row's value in ``column`` as text (JSON numbers and booleans as JSON writes them)."""
    if column not in rec:
        have = ", ".join(map(str, rec)) or "none"
        raise MoguError(f"{path}: {loc}: missing column {column!r} (the row has: {have})")
    if rec[column] is None:
        raise MoguError(f"{path}: {loc}: no value in column {column!r}")
    v = rec[column]
    if isinstance(v, str):
        return v
    if isinstance(v, (bool, int, float)):
        return json.dumps(v)
    raise MoguError(f"{path}: {loc}: column {column!r} holds a JSON {type_name(v)}, not text")


def _row_kind(path: str, loc: str, value: str, column: str, kind_map: Optional[Mapping[str, str]]) -> str:
    value = value.strip()
    kind = (kind_map or {}).get(value, value)
    if kind in KINDS:
        return kind
    mapped = f"; the kind map maps {', '.join(map(repr, kind_map))}" if kind_map else \
        "; map the file's values onto kinds with a kind map, e.g. 'safe=benign,unsafe=harmful'"
    raise MoguError(f"{path}: {loc}: unknown kind value {value!r} in column {column!r} (kinds: {', '.join(KINDS)}"
                    f"{mapped})")


def load_prompts_by_column(path: str | os.PathLike, prompt_column: str, *, kind_column: Optional[str] = None,
                           kind_map: Optional[Mapping[str, str]] = None, kind: Optional[str] = None) -> list[dict]:
    """Rows ``{"id", "prompt", "kind"}`` from the ``prompt_column`` of a CSV / TSV / JSONL / JSON-list file.

    The kind: with ``kind_column``, each row's value there, mapped through ``kind_map`` (a value not in the map
    must be a kind itself); ``kind`` then keeps only the rows of that kind. Without ``kind_column``, ``kind`` is
    every row's kind. Ids are ``"{file stem}-{row}"`` (rows count from 1, in file order, before any filtering).
    A missing column, an empty prompt, or a kind value that is neither mapped nor a kind is a MoguError naming
    the file and row.
    """
    path = os.fspath(path)
    if not isinstance(prompt_column, str) or not prompt_column.strip():
        raise MoguError("the prompt column name is empty")
    if kind is not None:
        check_kind(kind, path, "kind argument")
    if kind_column is None:
        if kind is None:
            raise MoguError(f"{path}: say where the kind is: a kind column, or one kind for every row")
        if kind_map:
            raise MoguError("a kind map needs a kind column to map")
    needed = [prompt_column] + ([kind_column] if kind_column else [])
    recs, locs = _records(path, needed)
    stem = os.path.splitext(os.path.basename(path))[0]
    rows, row_locs = [], []
    for i, (rec, loc) in enumerate(zip(recs, locs)):
        prompt = _cell(path, rec, loc, prompt_column)
        if not prompt.strip():
            raise MoguError(f"{path}: {loc}: empty prompt in column {prompt_column!r}")
        row_kind = kind if kind_column is None else _row_kind(path, loc, _cell(path, rec, loc, kind_column),
                                                              kind_column, kind_map)
        if kind_column is not None and kind is not None and row_kind != kind:
            continue
        rows.append({"id": f"{stem}-{i + 1}", "prompt": prompt, "kind": row_kind})
        row_locs.append(loc)
    if not rows:
        raise MoguError(f"{path}: no rows of kind {kind!r} (column {kind_column!r})")
    return check_ids(rows, path, row_locs)
