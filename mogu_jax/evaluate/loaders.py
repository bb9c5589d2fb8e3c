"""Prompt files -> rows ``{"id", "prompt", "kind"}``: our JSONL / JSON list, AdvBench and JailbreakBench
behaviour CSVs (by their known columns), and any CSV / TSV / JSONL file by named columns
(:func:`load_prompts_by_column`, in :mod:`mogu_jax.evaluate.columns`)."""

from __future__ import annotations

import csv
import io
import os
from typing import Any, Optional, Sequence

from mogu_jax.errors import MoguError
from mogu_jax.evaluate.rows import KINDS, check_ids, check_kind, type_name
from mogu_jax.io_utils import read_text_file


def _read_text(path: str) -> str:
    return read_text_file(path, "a prompt file")


def json_records(path: str) -> list[tuple[Any, str]]:
    """The values of a JSON-lines file (blank lines skipped) or of a JSON list, each with its location for error
    messages (``row N`` or ``row N (line L)``): the project's one reader, :func:`mogu_jax.io_utils.read_json_records`."""
    from mogu_jax.io_utils import read_json_records

    return list(zip(*read_json_records(path, "a prompt file")))


def load_prompts_jsonl(path: str | os.PathLike, default_kind: Optional[str] = None) -> list[dict]:
    """JSONL (one object per line) or a JSON list of ``{"prompt", "kind"}`` objects, ``"id"`` optional.

    Rows without an id get ``"{file stem}-{row}"`` (rows count from 1). ``default_kind`` is used for rows
    without a ``kind`` (otherwise ``kind`` is required).
    """
    path = os.fspath(path)
    if default_kind is not None:
        check_kind(default_kind, path, "default_kind")
    stem = os.path.splitext(os.path.basename(path))[0]
    records = json_records(path)
    needed = "prompt" if default_kind is not None else "prompt, kind"
    rows, locs = [], []
    for i, (v, loc) in enumerate(records):
        if not isinstance(v, dict):
            raise MoguError(f"{path}: {loc}: expected a JSON object with fields {needed}, got a JSON {type_name(v)}")
        if "prompt" not in v:
            raise MoguError(f"{path}: {loc}: missing field 'prompt' (each row needs {needed}; 'id' is optional)")
        prompt = v["prompt"]
        if not isinstance(prompt, str):
            raise MoguError(f"{path}: {loc}: field 'prompt' must be a string, got a JSON {type_name(prompt)}")
        if not prompt.strip():
            raise MoguError(f"{path}: {loc}: empty 'prompt'")
        if "kind" not in v and default_kind is None:
            raise MoguError(f"{path}: {loc}: missing field 'kind' (each row needs {needed}; 'id' is optional; "
                            f"kinds: {', '.join(KINDS)})")
        kind = check_kind(v.get("kind", default_kind), path, loc)
        rid = v.get("id")
        if rid is None:
            rid = f"{stem}-{i + 1}"
        elif isinstance(rid, bool) or not isinstance(rid, (str, int)) or (isinstance(rid, str) and not rid.strip()):
            raise MoguError(f"{path}: {loc}: field 'id' must be a non-empty string or an integer, "
                            f"got {rid!r}")
        rows.append({"id": str(rid), "prompt": prompt, "kind": kind})
        locs.append(loc)
    return check_ids(rows, path, locs)


def _table_name(delimiter: str) -> str:
    return "TSV" if delimiter == "\t" else "CSV"


def read_table(path: str, needed: Sequence[str], what: str,
               delimiter: str = ",") -> tuple[list[dict], list[str], list[str]]:
    """A CSV (or, with ``delimiter="\\t"``, TSV) file with a header: (records, their locations, columns); a
    MoguError when a ``needed`` column is missing (naming the file's columns), a row has too many fields, or
    there are no rows."""
    text = _read_text(path)
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        columns = [c.strip() if isinstance(c, str) else c for c in (reader.fieldnames or [])]
    except csv.Error as e:
        raise MoguError(f"{path}: not a valid {_table_name(delimiter)} file: {e}") from None
    reader.fieldnames = columns
    missing = [c for c in needed if c not in columns]
    if missing:
        raise MoguError(f"{path}: not {what}: missing column(s) {', '.join(missing)} "
                        f"(needs {', '.join(needed)}; the file has columns: {', '.join(map(str, columns)) or 'none'})")
    rows, locs = [], []
    try:
        for i, rec in enumerate(reader):
            loc = f"row {i + 1} (line {reader.line_num})"
            if None in rec:
                raise MoguError(f"{path}: {loc}: more fields than the {len(columns)} columns of the header")
            rows.append(rec)
            locs.append(loc)
    except csv.Error as e:
        raise MoguError(f"{path}: not a valid {_table_name(delimiter)} file at line {reader.line_num}: {e}") from None
    if not rows:
        raise MoguError(f"{path}: contains no rows (only a header)")
    return rows, locs, columns


def _csv_prompts(path: str, recs: list[dict], locs: list[str], column: str, kind: str, id_of) -> list[dict]:
    rows = []
    for i, (rec, loc) in enumerate(zip(recs, locs)):
        prompt = rec.get(column)
        if prompt is None:
            raise MoguError(f"{path}: {loc}: missing value in column {column!r} (row has fewer fields than the header)")
        if not prompt.strip():
            raise MoguError(f"{path}: {loc}: empty {column!r}")
        rows.append({"id": id_of(i, rec), "prompt": prompt, "kind": kind})
    return check_ids(rows, path, locs)


ADVBENCH_COLUMNS = ("goal", "target")
JBB_COLUMNS = ("Goal", "Target", "Behavior", "Category")


def load_advbench_csv(path: str | os.PathLike, kind: str = "harmful") -> list[dict]:
    """AdvBench ``harmful_behaviors.csv`` (columns ``goal``, ``target``): prompt = goal; ids ``advbench-{row}``."""
    path = os.fspath(path)
    check_kind(kind, path, "kind argument")
    recs, locs, _ = read_table(path, ADVBENCH_COLUMNS, "an AdvBench behaviours CSV")
    return _csv_prompts(path, recs, locs, "goal", kind, lambda i, rec: f"advbench-{i + 1}")


def load_jbb_csv(path: str | os.PathLike, kind: str = "harmful") -> list[dict]:
    """JailbreakBench behaviours CSV (columns ``Goal``, ``Target``, ``Behavior``, ``Category``; ``Index``
    optional): prompt = Goal; ids ``jbb-{Index}`` (or ``jbb-{row}`` without an Index column). Pass
    ``kind="benign"`` for JailbreakBench's benign behaviours file."""
    path = os.fspath(path)
    check_kind(kind, path, "kind argument")
    recs, locs, columns = read_table(path, JBB_COLUMNS, "a JailbreakBench behaviours CSV")
    has_index = "Index" in columns

    def id_of(i, rec):
        idx = (rec.get("Index") or "").strip() if has_index else ""
        return f"jbb-{idx}" if idx else f"jbb-{i + 1}"

    return _csv_prompts(path, recs, locs, "Goal", kind, id_of)


PROMPT_FORMATS = ("auto", "jsonl", "advbench", "jbb")


def load_prompts(path: str | os.PathLike, fmt: str = "auto", kind: Optional[str] = None) -> list[dict]:
    """Load a prompt file. ``fmt="auto"``: ``.csv`` files are AdvBench (``goal`` column) or JailbreakBench
    (``Goal`` column); anything else is JSON lines / a JSON list. ``kind`` overrides the CSV kind (default
    harmful) or is the JSONL default for rows without one."""
    path = os.fspath(path)
    if fmt not in PROMPT_FORMATS:
        raise MoguError(f"unknown prompt format {fmt!r}; formats: {', '.join(PROMPT_FORMATS)}")
    if fmt == "auto":
        if path.lower().endswith(".csv"):
            text = _read_text(path)
            header = next(csv.reader(io.StringIO(text, newline="")), [])
            cols = [c.strip() for c in header]
            if "Goal" in cols:
                fmt = "jbb"
            elif "goal" in cols:
                fmt = "advbench"
            else:
                raise MoguError(f"{path}: unknown prompt CSV: needs a 'goal' column (AdvBench: "
                                f"{', '.join(ADVBENCH_COLUMNS)}) or a 'Goal' column (JailbreakBench: "
                                f"{', '.join(JBB_COLUMNS)}); the file has columns: {', '.join(cols) or 'none'}")
        else:
            fmt = "jsonl"
    if fmt == "jsonl":
        return load_prompts_jsonl(path, default_kind=kind)
    loader = load_advbench_csv if fmt == "advbench" else load_jbb_csv
    return loader(path, kind=kind or "harmful")

