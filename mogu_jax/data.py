"""Training data for the three MoGU stages (MOGU_SPEC.md section 2): loading, tokenisation, batching.

Pipeline::

    rows = load_stage_data("glad", "data/unsafety_affirm.json", "data/unsafety_reject.json")
    data = tokenize_stage("glad", rows, tokenizer, template="llama2-chat", max_len=1024)
    loader = StageLoader(data, batch_size=8, seed=0)
    for batch in loader: ...            # numpy arrays, fixed shapes (see below)
    state = loader.state()              # JSON-able; StageLoader.from_state(data, state) resumes exactly

**Loading.** The published layout (row-aligned JSON lists of ``{"instruction", "output"}``; for the router
``data_normal.json`` plus a JSON list of 0/1 labels) and our JSONL layout (``{"instruction", "affirmative",
"refusal"}`` or ``{"instruction", "output", "label"}``) load to the same rows. Each file is parsed once, with
Python's ``json`` (exact line/column for invalid JSON; rows, fields and their types checked; fields a stage does
not use are ignored). Every problem is a :class:`MoguError` naming the file and the row (rows count from 1;
JSONL rows also give their line). Nothing is dropped silently.

**Tokenisation.** prompt = ``format_prompt(tokenizer, instruction, template, system)`` encoded with
``encode_prompt``; the response is ``tokenizer(response, add_special_tokens=False)`` appended directly (separate
tokenisation, so the prompt/response boundary is exact); no EOS is appended (with ``refusal_eos`` the refusal
targets get one, see :func:`tokenize_stage`); the whole example is cut at
``max_len`` tokens (counted as truncated). ``loss_mask`` is True exactly at the response tokens (the tokens the
LM loss predicts, ``tokens[t]`` from position ``t - 1``).

**Batches** (numpy). Pair stages (glad, unwilling)::

    {"affirm":  {"tokens": [B, Ta] int32, "loss_mask": [B, Ta] bool, "attn_mask": [B, Ta] bool},
     "refusal": {"tokens": [B, Tr] int32, "loss_mask": [B, Tr] bool, "attn_mask": [B, Tr] bool},
     "weight": [B] float32}

router stage::

    {"tokens": [B, T] int32, "loss_mask": [B, T] bool, "attn_mask": [B, T] bool,
     "label": [B] int32 (1 = malicious), "weight": [B] float32}

``B`` is the per-process batch size (global batch size / process_count); ``T`` is the smallest bucket that holds
the longest real example of the *global* batch (so every process gets the same shapes). Sequences are right
padded with the pad id (``attn_mask``/``loss_mask`` False there). The last batch of an epoch may be short: it is
filled up to ``B`` rows with **copies of the batch's first example with weight 0**, so every row has a non-empty
``loss_mask`` and finite per-row losses (a ratio loss of an all-padding row would be 0/0); use ``weight`` to
exclude them (``sum(weight * loss) / sum(weight)``) and to count real examples/tokens.

**Order.** For epoch ``e`` the batch order is a pure function of ``(seed, e)`` and the data: shuffle, sort
windows of ``group_batches`` batches by length (less padding), cut into batches, shuffle the full batches (a
short batch goes last). :meth:`StageLoader.state` is the global position (epoch, step) and a fingerprint of the
data and settings; it does not depend on the process count, so a run may resume on a different number of hosts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Iterable, Iterator, Optional, Sequence

import numpy as np

from mogu_jax.errors import MoguError
from mogu_jax.templates import encode_prompt, format_prompt

DEFAULT_MAX_LEN = 1024
DEFAULT_BUCKETS = (64, 128, 256, 512, 1024)
DEFAULT_GROUP_BATCHES = 8
MIN_SHARED_PREFIX = 8  # shorter common prefixes are not worth a second forward call

PAIR_STAGES = ("glad", "unwilling")
STAGES = ("glad", "unwilling", "router")

# stage -> the two files of the published code's data folder
PUBLISHED_FILES = {
    "glad": ("unsafety_affirm.json", "unsafety_reject.json"),
    "unwilling": ("safety_affirm.json", "safety_reject.json"),
    "router": ("data_normal.json", "data_label.json"),
}

PAIR_FIELDS = ("instruction", "affirmative", "refusal")
ROUTER_FIELDS = ("instruction", "output", "label")

_STATE_VERSION = 1


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------

def _check_stage(stage: str) -> str:
    if stage not in STAGES:
        raise MoguError(f"unknown training stage {stage!r}; stages: {', '.join(STAGES)}")
    return stage


def _type_name(v) -> str:
    return "null" if v is None else type(v).__name__


def _parse_records(path: str, scalars: bool = False) -> tuple[list, list[str]]:
    """Parse a JSON list / JSON lines file with Python's ``json``; return the rows and their location labels.

    ``scalars``: rows must be JSON scalars (the label file); otherwise rows must be JSON objects.
    """
    from mogu_jax.io_utils import read_json_records, read_text_file
    text = read_text_file(path, "a JSON or JSONL file")
    listed = text.lstrip().startswith("[")
    if scalars and not listed:
        raise MoguError(f"{path}: expected a JSON list of 0/1 labels")
    values, locs = read_json_records(path, text=text)
    for v, loc in zip(values, locs):
        if scalars:
            if isinstance(v, (dict, list)):
                raise MoguError(f"{path}: {loc}: expected a label 0 or 1, got a JSON {_type_name(v)}")
        elif not listed and isinstance(v, list):
            raise MoguError(f"{path}: {loc}: expected a JSON list of objects or JSON lines (one object per line)")
        elif not isinstance(v, dict):
            raise MoguError(f"{path}: {loc}: expected a JSON object with fields, got {_type_name(v)}")
    return values, locs


class _Records:
    """A data file, parsed once with Python's ``json``: its rows (``raw``, exact types) and their location labels;
    :meth:`text` and :meth:`label` return a row's checked values."""

    def __init__(self, path: str | os.PathLike, scalars: bool = False):
        self.path = os.fspath(path)
        self.raw, self.locs = _parse_records(self.path, scalars=scalars)
        self.scalars = scalars

    def __len__(self):
        return len(self.raw)

    def text(self, i: int, field: str, expected: Sequence[str]) -> str:
        v = self.raw[i].get(field)
        loc = self.locs[i]
        if v is None:
            raise MoguError(f"{self.path}: {loc}: missing field {field!r} (each row needs {', '.join(expected)})")
        if not isinstance(v, str):
            raise MoguError(f"{self.path}: {loc}: field {field!r} must be a string, got {_type_name(v)}")
        if not v.strip():
            raise MoguError(f"{self.path}: {loc}: empty {field!r}")
        return v

    def label(self, i: int, field: Optional[str] = None) -> int:
        v = self.raw[i] if field is None else self.raw[i].get(field)
        if field is not None and v is None:
            raise MoguError(f"{self.path}: {self.locs[i]}: missing field {field!r} (each row needs "
                            f"{', '.join(ROUTER_FIELDS)})")
        return _label_value(v, self.path, self.locs[i])


def _label_value(v, path: str, loc: str) -> int:
    if isinstance(v, bool) or v is None or not isinstance(v, (int, float)) or v not in (0, 1):
        shown = "missing" if v is None else json.dumps(v)
        raise MoguError(f"{path}: {loc}: label must be 0 (benign) or 1 (malicious), got {shown}")
    return int(v)


def _same_text(a: str, b: str) -> bool:
    return a == b or " ".join(a.split()) == " ".join(b.split())


def _short(s: str, n: int = 60) -> str:
    s = json.dumps(s, ensure_ascii=False)
    return s if len(s) <= n else s[:n - 4] + '..."'


def _read_outputs(path) -> tuple[list[dict], str]:
    rec = _Records(path)
    fields = ("instruction", "output")
    return [{f: rec.text(i, f, fields) for f in fields} for i in range(len(rec))], rec.path


def load_pairs(affirm_path: str | os.PathLike, reject_path: str | os.PathLike) -> list[dict]:
    """The published pair layout: two row-aligned JSON lists of ``{"instruction", "output"}``.

    Returns ``[{"instruction", "affirmative", "refusal"}]``. Rows must align: same count and the same
    instruction at every row (whitespace differences are tolerated; the affirmative file's text is kept).
    """
    aff, ap = _read_outputs(affirm_path)
    rej, rp = _read_outputs(reject_path)
    if len(aff) != len(rej):
        raise MoguError(f"pair files are not row-aligned: {ap} has {len(aff)} rows but {rp} has {len(rej)}")
    out = []
    for i, (a, r) in enumerate(zip(aff, rej)):
        if not _same_text(a["instruction"], r["instruction"]):
            raise MoguError(f"pair files are not row-aligned: row {i + 1} has instruction {_short(a['instruction'])} "
                            f"in {ap} but {_short(r['instruction'])} in {rp}")
        out.append({"instruction": a["instruction"], "affirmative": a["output"], "refusal": r["output"]})
    return out


def load_pairs_jsonl(path: str | os.PathLike) -> list[dict]:
    """Our pair layout: JSON lines (or a JSON list) of ``{"instruction", "affirmative", "refusal"}``."""
    rec = _Records(path)
    return [{f: rec.text(i, f, PAIR_FIELDS) for f in PAIR_FIELDS} for i in range(len(rec))]


def load_router(normal_path: str | os.PathLike, label_path: str | os.PathLike) -> list[dict]:
    """The published router layout: ``data_normal.json`` (JSON list of ``{"instruction", "output"}``) and
    ``data_label.json`` (JSON list of 0/1, 1 = malicious, aligned with the rows).

    Returns ``[{"instruction", "output", "label"}]``.
    """
    rows, np_ = _read_outputs(normal_path)
    lab = _Records(label_path, scalars=True)
    if len(lab) != len(rows):
        raise MoguError(f"label file {lab.path} has {len(lab)} labels but {np_} has {len(rows)} rows; "
                        "they must be aligned row by row")
    return [{"instruction": r["instruction"], "output": r["output"], "label": lab.label(i)} for i, r in enumerate(rows)]


def load_router_jsonl(path: str | os.PathLike) -> list[dict]:
    """Our router layout: JSON lines (or a JSON list) of ``{"instruction", "output", "label"}``."""
    rec = _Records(path)
    return [{"instruction": rec.text(i, "instruction", ROUTER_FIELDS),
             "output": rec.text(i, "output", ROUTER_FIELDS), "label": rec.label(i, "label")} for i in range(len(rec))]


def load_stage_data(stage: str, *paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[dict]:
    """Rows for a stage from its files.

    * two files: the published layout (pair stages: affirm file then reject file; router: data then labels);
    * one file: our JSONL layout;
    * one directory: the published file names inside it (:data:`PUBLISHED_FILES`).
    """
    _check_stage(stage)
    flat: list[str] = []
    for p in paths:
        if isinstance(p, (list, tuple)):
            flat.extend(os.fspath(q) for q in p)
        elif p is not None:
            flat.append(os.fspath(p))
    if len(flat) == 1 and os.path.isdir(flat[0]):
        d = flat[0]
        names = PUBLISHED_FILES[stage]
        missing = [n for n in names if not os.path.isfile(os.path.join(d, n))]
        if missing:
            raise MoguError(f"{d}: the {stage} stage needs {' and '.join(names)} in this folder; "
                            f"missing {', '.join(missing)}")
        flat = [os.path.join(d, n) for n in names]
    if len(flat) == 1:
        return load_pairs_jsonl(flat[0]) if stage in PAIR_STAGES else load_router_jsonl(flat[0])
    if len(flat) == 2:
        return load_pairs(*flat) if stage in PAIR_STAGES else load_router(*flat)
    a, b = PUBLISHED_FILES[stage]
    raise MoguError(f"the {stage} stage takes one JSONL file, a folder with {a} and {b}, or those two files; "
                    f"got {len(flat)} paths")


# --------------------------------------------------------------------------------------------------------------
# Tokenisation
# --------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, eq=False)
class Example:
    """One tokenised sequence: prompt tokens then response tokens (possibly truncated)."""
    tokens: np.ndarray      # int32 [length]
    loss_mask: np.ndarray   # bool [length], True at response tokens
    prompt_len: int
    full_length: int        # length before truncation

    @property
    def length(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def truncated(self) -> bool:
        return self.full_length > self.length

    @property
    def response_len(self) -> int:
        return self.length - self.prompt_len


def _pad_id(tokenizer) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, attr, None)
        if isinstance(v, (list, tuple)):
            v = v[0] if v else None
        if v is not None:
            return int(v)
    return 0


def _make_example(prompt_ids: Sequence[int], response_ids: Sequence[int], max_len: int, where: str) -> Example:
    if not prompt_ids:
        raise MoguError(f"{where}: the prompt encodes to no tokens (the first response token needs a "
                        "position before it)")
    if not response_ids:
        raise MoguError(f"{where}: the response encodes to no tokens")
    p = len(prompt_ids)
    full = p + len(response_ids)
    if p >= max_len:
        raise MoguError(f"{where}: the prompt alone is {p} tokens, so truncation at max_len={max_len} cuts off "
                        "the whole response; shorten the instruction or raise max_len")
    n = min(full, max_len)
    tokens = np.empty((n,), np.int32)
    tokens[:p] = prompt_ids
    tokens[p:] = response_ids[:n - p]
    mask = np.zeros((n,), bool)
    mask[p:] = True
    return Example(tokens=tokens, loss_mask=mask, prompt_len=p, full_length=full)


def tokenize_example(tokenizer, instruction: str, response: str, *, template: Optional[str] = None,
                     system: Optional[str] = None, max_len: int = DEFAULT_MAX_LEN, where: str = "example") -> Example:
    """Tokenise one (instruction, response) as the stages train on it (see the module docstring)."""
    prompt = encode_prompt(tokenizer, format_prompt(tokenizer, instruction, template, system))
    resp = list(tokenizer(response, add_special_tokens=False)["input_ids"])
    return _make_example(prompt, resp, max_len, where)


#: The LM head's per-row window (:func:`loss_window_width`) is rounded up to a multiple of this.
LOSS_WINDOW_MULTIPLE = 8


def loss_window_width(examples: Sequence[Example], length: int, logits_from: int) -> int:
    """The width of the LM head's per-row window for batches padded to ``length``: the longest response among the
    ``examples`` that fit ``length`` (rounded up to :data:`LOSS_WINDOW_MULTIPLE`), when that is fewer positions
    than the ``length - logits_from`` the head otherwise runs on; else 0 (no window). Every example of such a batch
    then has all its loss positions inside its own window (:func:`loss_window`)."""
    spans = [ex.response_len for ex in examples if ex.length <= length]
    if not spans:
        return 0
    m = LOSS_WINDOW_MULTIPLE
    width = -(-max(spans) // m) * m
    return width if width < length - logits_from else 0


def loss_window(prompt_lens: np.ndarray, width: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the ``width`` positions from the one that predicts its first response token (``prompt_len - 1``):
    ``(positions [B, width] int32, valid [B, width] bool)``; positions past ``length - 2`` (the last one that
    predicts a token) are clipped to it and marked not valid, so no loss position is counted twice."""
    raw = np.asarray(prompt_lens, np.int64)[:, None] - 1 + np.arange(width)[None]
    return np.minimum(raw, length - 2).astype(np.int32), raw <= length - 2


def logits_start(shortest_prompt: int) -> int:
    """Where the LM head may start for data whose shortest prompt has ``shortest_prompt`` tokens: position t
    predicts token t + 1, so the first response token needs the logits of position ``shortest_prompt - 1``;
    rounded down to a multiple of 8."""
    return max(shortest_prompt - 1, 0) // 8 * 8


@dataclasses.dataclass(eq=False)
class StageData:
    """The tokenised examples of one stage.

    Pair stages fill ``affirm`` and ``refusal`` (aligned lists); the router stage fills ``examples`` and
    ``labels``.
    """
    stage: str
    max_len: int
    pad_id: int
    affirm: Optional[list[Example]] = None
    refusal: Optional[list[Example]] = None
    examples: Optional[list[Example]] = None
    labels: Optional[np.ndarray] = None  # int32 [N]

    @property
    def is_pairs(self) -> bool:
        return self.stage in PAIR_STAGES

    @property
    def num_examples(self) -> int:
        return len(self.affirm if self.is_pairs else self.examples)

    def sequences(self) -> dict[str, list[Example]]:
        return {"affirm": self.affirm, "refusal": self.refusal} if self.is_pairs else {"tokens": self.examples}

    def logits_from(self) -> int:
        """The first position whose logits any example's loss uses (:func:`logits_start` of the shortest
        prompt)."""
        return logits_start(min(ex.prompt_len for seqs in self.sequences().values() for ex in seqs))

    def shared_prefix(self, min_len: int = MIN_SHARED_PREFIX) -> tuple:
        """The tokens every sequence of the stage starts with (typically the chat template's system prompt),
        cut to :meth:`logits_from` so that no loss position falls inside it; ``()`` when shorter than
        ``min_len``. Training runs them once per batch instead of once per row
        (``forward(..., shared_prefix=)``)."""
        seqs = [ex.tokens for s in self.sequences().values() for ex in s]
        first = np.asarray(seqs[0])
        n = min(min(len(t) for t in seqs), self.logits_from())
        for t in seqs[1:]:
            if n == 0:
                break
            diff = np.flatnonzero(np.asarray(t[:n]) != first[:n])
            n = int(diff[0]) if diff.size else n
        return tuple(int(x) for x in first[:n]) if n >= min_len else ()

    def sort_keys(self) -> np.ndarray:
        """Per example, the length used to group examples into batches (sum of both halves for pairs)."""
        return np.asarray([sum(s[i].length for s in self.sequences().values()) for i in range(self.num_examples)],
                          np.int64)

    @property
    def num_truncated(self) -> int:
        return sum(ex.truncated for seq in self.sequences().values() for ex in seq)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(f"{self.stage}|{self.max_len}|{self.num_examples}".encode())
        for name, seq in self.sequences().items():
            h.update(name.encode())
            for ex in seq:
                h.update(np.int64(ex.prompt_len).tobytes())
                h.update(np.int64(ex.length).tobytes())
                h.update(ex.tokens.tobytes())
        if self.labels is not None:
            h.update(np.asarray(self.labels, np.int32).tobytes())
        return h.hexdigest()[:16]

    def summary(self) -> dict:
        """Counts for logging: examples, truncated sequences, tokens, mean/max length, label balance."""
        out: dict[str, Any] = {"stage": self.stage, "examples": self.num_examples, "max_len": self.max_len,
                               "truncated": self.num_truncated}
        for name, seq in self.sequences().items():
            lens = np.asarray([ex.length for ex in seq])
            key = "sequences" if name == "tokens" else name
            out[key] = {"truncated": int(sum(ex.truncated for ex in seq)), "tokens": int(lens.sum()),
                        "response_tokens": int(sum(ex.response_len for ex in seq)),
                        "mean_length": round(float(lens.mean()), 1), "max_length": int(lens.max())}
        if self.labels is not None:
            n1 = int(np.sum(self.labels == 1))
            out["labels"] = {"malicious": n1, "benign": int(len(self.labels) - n1)}
        return out


def eos_id(tokenizer) -> int:
    """The tokenizer's EOS id (the first one when it has several)."""
    v = getattr(tokenizer, "eos_token_id", None)
    if isinstance(v, (list, tuple)):
        v = v[0] if v else None
    if v is None:
        raise MoguError("data.refusal_eos needs a tokenizer with an EOS token; this one has none")
    return int(v)


def tokenize_stage(stage: str, rows: Sequence[dict], tokenizer, *, template: Optional[str] = None,
                   system: Optional[str] = None, max_len: int = DEFAULT_MAX_LEN,
                   source: Optional[str] = None, refusal_eos: bool = False) -> StageData:
    """Tokenise the rows of :func:`load_stage_data` for ``stage``.

    ``refusal_eos`` (``data.refusal_eos``; off in the published setting): append the tokenizer's EOS id to every
    refusal target, i.e. the ``refusal`` side of the glad and unwilling pairs and the ``output`` of the router
    stage's malicious rows (label 1), so the model learns that a refusal ends there instead of looping; cut with
    the rest of the example at ``max_len``. Affirmative / benign responses are unchanged.

    Raises :class:`MoguError` naming the row (counted from 1) when an example's response would be cut off
    entirely by ``max_len`` or encodes to nothing. ``source`` (e.g. the file name) prefixes those messages.
    """
    _check_stage(stage)
    if not isinstance(max_len, int) or max_len < 2:
        raise MoguError(f"max_len must be an integer >= 2, got {max_len!r}")
    if not isinstance(refusal_eos, bool):
        raise MoguError(f"data.refusal_eos must be true or false, got {refusal_eos!r}")
    if not rows:
        raise MoguError(f"no training rows for the {stage} stage")
    pairs = stage in PAIR_STAGES
    fields = ("affirmative", "refusal") if pairs else ("output",)
    for i, r in enumerate(rows):
        for f in ("instruction",) + fields + (() if pairs else ("label",)):
            if f not in r:
                raise MoguError(f"row {i + 1}: missing field {f!r} for the {stage} stage")
    prefix = f"{source}: " if source else ""
    labels = None if pairs else np.asarray(
        [_label_value(r["label"], source or "rows", f"row {i + 1}") for i, r in enumerate(rows)], np.int32)
    eos = [eos_id(tokenizer)] if refusal_eos else []
    prompts = [encode_prompt(tokenizer, format_prompt(tokenizer, r["instruction"], template, system)) for r in rows]
    seqs: dict[str, list[Example]] = {}
    for f in fields:
        resp = tokenizer([r[f] for r in rows], add_special_tokens=False)["input_ids"]
        is_refusal = [f == "refusal"] * len(rows) if pairs else [bool(lab == 1) for lab in labels]
        seqs[f] = [_make_example(p, list(ids) + (eos if ref else []), max_len, f"{prefix}{stage} row {i + 1} ({f})")
                   for i, (p, ids, ref) in enumerate(zip(prompts, resp, is_refusal))]
    pad = _pad_id(tokenizer)
    if pairs:
        return StageData(stage, max_len, pad, affirm=seqs["affirmative"], refusal=seqs["refusal"])
    return StageData(stage, max_len, pad, examples=seqs["output"], labels=labels)


def load_and_tokenize(stage: str, paths, tokenizer, *, template: Optional[str] = None, system: Optional[str] = None,
                      max_len: int = DEFAULT_MAX_LEN, refusal_eos: bool = False) -> StageData:
    """:func:`load_stage_data` then :func:`tokenize_stage`."""
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    rows = load_stage_data(stage, *paths)
    src = os.fspath(paths[0]) if len(paths) == 1 else " + ".join(os.path.basename(os.fspath(p)) for p in paths)
    return tokenize_stage(stage, rows, tokenizer, template=template, system=system, max_len=max_len, source=src,
                          refusal_eos=refusal_eos)


# --------------------------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------------------------

def resolve_buckets(buckets: Optional[Iterable[int]], max_len: int) -> tuple[int, ...]:
    """Sorted length buckets, capped at ``max_len`` (which is always the largest bucket)."""
    bs = DEFAULT_BUCKETS if buckets is None else tuple(buckets)
    for b in bs:
        if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b < 1:
            raise MoguError(f"length buckets must be positive integers, got {b!r}")
    return tuple(sorted({int(b) for b in bs if b < max_len} | {int(max_len)}))


def bucket_for(length: int, buckets: Sequence[int]) -> int:
    for b in buckets:
        if b >= length:
            return b
    raise MoguError(f"sequence of {length} tokens is longer than the largest bucket {buckets[-1]}")


def _stable_permutation(rng: np.random.Generator, n: int) -> np.ndarray:
    # argsort of uniform doubles: the Generator's double stream is stable across NumPy versions, unlike
    # the algorithms behind Generator.permutation, so a resumed run reorders identically.
    return np.argsort(rng.random(n), kind="stable")


class StageLoader:
    """Deterministic, resumable, multi-host batches over a :class:`StageData`.

    ``batch_size`` is the global batch size; each process gets rows ``[process_index * b, (process_index + 1) * b)``
    of every global batch, ``b = batch_size // process_count``. ``num_epochs=None`` iterates forever.
    ``shuffle=False`` keeps the data order (no shuffling, no length grouping). ``group_batches``: the number of
    batches per window that is sorted by length before cutting batches (1 disables grouping).
    ``drop_last`` drops the short last batch of each epoch (its examples then miss that epoch).
    ``balance_labels`` (router stage): every batch gets the labels in its length bucket's proportion (each
    label's rows of a bucket shuffled, then interleaved evenly; no length grouping, which would sort short
    refusals, label 1, into batches of their own and make the shared router biases swing from batch to batch).
    A batch never mixes buckets, so a few long rows (wrapped prompts) do not pad every batch to their length;
    each bucket's batches are spread evenly over the epoch. With one bucket: the data's proportion.
    ``label_weights`` (router stage): ``"balanced"`` weighs each example in the loss by ``N / (2 N_label)``, so both
    labels weigh the same in every epoch however many rows each has (None: every example 1).

    ``loss_windows``: batches whose responses all fit a window narrower than the positions from
    :meth:`StageData.logits_from` on (:func:`loss_window_width`) also carry ``loss_pos`` [B, W] int32 and
    ``loss_valid`` [B, W] bool (:func:`loss_window`): the LM head then runs on each row's W positions only
    (the same loss, less work when prompts differ in length).
    """

    def __init__(self, data: StageData, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 num_epochs: Optional[int] = None, buckets: Optional[Iterable[int]] = DEFAULT_BUCKETS,
                 group_batches: int = DEFAULT_GROUP_BATCHES, drop_last: bool = False, process_index: int = 0,
                 process_count: int = 1, balance_labels: bool = False, label_weights: Optional[str] = None,
                 loss_windows: bool = False):
        def pos_int(name, v, minimum=1):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
                raise MoguError(f"{name} must be an integer >= {minimum}, got {v!r}")
            return int(v)

        self.data = data
        self.batch_size = pos_int("batch_size", batch_size)
        self.seed = pos_int("seed", seed, 0)
        self.shuffle = bool(shuffle)
        self.num_epochs = None if num_epochs is None else pos_int("num_epochs", num_epochs, 0)
        self.group_batches = pos_int("group_batches", group_batches)
        self.drop_last = bool(drop_last)
        self.balance_labels = bool(balance_labels)
        if self.balance_labels and data.labels is None:
            raise MoguError(f"balance_labels needs labelled data (the router stage); {data.stage} has none")
        self.example_weights = None
        if label_weights is not None:
            if label_weights != "balanced":
                raise MoguError(f"data.label_weights must be null or 'balanced', got {label_weights!r}")
            if data.labels is None:
                raise MoguError(f"label_weights needs labelled data (the router stage); {data.stage} has none")
            labels = np.asarray(data.labels)
            values, counts = np.unique(labels, return_counts=True)
            per = {v: len(labels) / (len(values) * c) for v, c in zip(values, counts)}
            self.example_weights = np.asarray([per[v] for v in labels], np.float32)
        self.process_count = pos_int("process_count", process_count)
        self.process_index = pos_int("process_index", process_index, 0)
        if self.process_index >= self.process_count:
            raise MoguError(f"process_index {process_index} is out of range for process_count {process_count}")
        if self.batch_size % self.process_count:
            raise MoguError(f"global batch size {batch_size} is not divisible by the process count "
                            f"{process_count}; choose a multiple of {process_count}")
        self.local_batch_size = self.batch_size // self.process_count
        self.buckets = resolve_buckets(buckets, data.max_len)
        self.num_examples = data.num_examples
        n = self.num_examples
        self._keys = data.sort_keys()
        self._seqs = data.sequences()
        self._lengths = {k: np.asarray([ex.length for ex in v], np.int64) for k, v in self._seqs.items()}
        # per sequence kind and bucket, the LM head's per-row window (0: none; loss_window_width)
        start = data.logits_from()
        self._windows = {k: {t: loss_window_width(v, t, start) if loss_windows else 0 for t in self.buckets}
                         for k, v in self._seqs.items()}
        self._bucket_rows = self._rows_by_bucket() if self.balance_labels else [np.arange(n)]
        sizes = [len(rows) for rows in self._bucket_rows]
        self.steps_per_epoch = sum(m // self.batch_size if self.drop_last else -(-m // self.batch_size)
                                   for m in sizes)
        if self.steps_per_epoch == 0:
            raise MoguError(f"{n} examples make no full batch of {self.batch_size} with drop_last; "
                            "lower the batch size or keep the last batch")
        self._order_cache: tuple[int, list[np.ndarray]] | None = None
        # ``f(sequences, example_rows, length) -> {name: [rows, length, ...]}``, more per-row inputs of a batch
        # (``sequences``: "tokens", or "affirm" / "refusal" of a pair stage; the trainer's cached lower-layer
        # hidden states, mogu_jax.train.FrozenLayersCache)
        self.extra_inputs = None
        self._fingerprint: Optional[str] = None
        self.epoch = 0
        self.step = 0

    # ---- order ---------------------------------------------------------------------------------------------
    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        """The global batches of ``epoch``, as arrays of example indices (a pure function of seed and epoch)."""
        if self._order_cache is not None and self._order_cache[0] == epoch:
            return self._order_cache[1]
        n, b = self.num_examples, self.batch_size
        if not self.shuffle:
            order = np.arange(n)
            batches = [order[i:i + b] for i in range(0, n, b)]
        elif self.balance_labels:
            batches = self._balanced_batches(self._epoch_rng(epoch))
        else:
            rng = self._epoch_rng(epoch)
            order = _stable_permutation(rng, n)
            # the short batch (n % b random examples) goes last; the full batches are length-grouped
            n_full = n - n % b
            short = order[n_full:]
            order = order[:n_full]
            if self.group_batches > 1 and n_full:
                w = b * self.group_batches
                order = np.concatenate([c[np.argsort(self._keys[c], kind="stable")]
                                        for c in (order[i:i + w] for i in range(0, n_full, w))])
            batches = [order[i:i + b] for i in range(0, n_full, b)]
            batches = [batches[j] for j in _stable_permutation(rng, len(batches))]
            if len(short):
                batches.append(short)
        if self.drop_last and len(batches[-1]) < b:
            batches.pop()
        self._order_cache = (epoch, batches)
        return batches

    def _epoch_rng(self, epoch: int) -> np.random.Generator:
        return np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, int(epoch)])))

    def _rows_by_bucket(self) -> list[np.ndarray]:
        """The example indices of each length bucket that holds any (shortest bucket first; labelled, unpaired
        data: ``balance_labels`` refuses pairs)."""
        which = np.asarray([bucket_for(int(n), self.buckets) for n in self._lengths["tokens"]], np.int64)
        return [np.flatnonzero(which == b) for b in self.buckets if np.any(which == b)]

    def _balanced_batches(self, rng) -> list[np.ndarray]:
        labels = np.asarray(self.data.labels)
        b = self.batch_size
        batches, keys = [], []
        for rows in self._bucket_rows:
            idx, key = [], []
            for value in np.unique(labels[rows]):
                part = rows[labels[rows] == value]
                part = part[_stable_permutation(rng, len(part))]
                idx.append(part)
                key.append((np.arange(len(part)) + 0.5) / len(part))  # evenly spread over the bucket's batches
            idx, key = np.concatenate(idx), np.concatenate(key)
            order = idx[np.lexsort((idx, key))]
            cut = [order[i:i + b] for i in range(0, len(order), b)]
            if self.drop_last:
                cut = [c for c in cut if len(c) == b]
            batches += cut
            keys += [(j + 0.5) / len(cut) for j in range(len(cut))]  # each bucket's batches spread over the epoch
        return [batches[j] for j in np.lexsort((np.arange(len(batches)), keys))]

    def batch_indices(self, epoch: int, step: int) -> np.ndarray:
        """Global example indices of batch ``step`` of ``epoch`` (fewer than batch_size for a short batch)."""
        if not 0 <= step < self.steps_per_epoch:
            raise MoguError(f"step {step} is out of range (0..{self.steps_per_epoch - 1})")
        return self.epoch_batches(epoch)[step]

    # ---- batches -------------------------------------------------------------------------------------------
    def _pad_rows(self, seq: list[Example], lengths: np.ndarray, real: np.ndarray, rows: np.ndarray,
                  windows: dict) -> dict:
        t = bucket_for(int(lengths[real].max()), self.buckets)
        tokens = np.full((len(rows), t), self.data.pad_id, np.int32)
        loss_mask = np.zeros((len(rows), t), bool)
        attn_mask = np.zeros((len(rows), t), bool)
        for r, i in enumerate(rows):
            ex = seq[i]
            tokens[r, :ex.length] = ex.tokens
            loss_mask[r, :ex.length] = ex.loss_mask
            attn_mask[r, :ex.length] = True
        out = {"tokens": tokens, "loss_mask": loss_mask, "attn_mask": attn_mask}
        if windows.get(t):  # the LM head runs on each row's response window only
            out["loss_pos"], out["loss_valid"] = loss_window(np.asarray([seq[i].prompt_len for i in rows]),
                                                             windows[t], t)
        return out

    def make_batch(self, indices: np.ndarray) -> dict:
        """This process's slice of the global batch made of examples ``indices`` (see the module docstring)."""
        indices = np.asarray(indices, np.int64)
        real = len(indices)
        if not 0 < real <= self.batch_size:
            raise MoguError(f"a batch needs 1..{self.batch_size} examples, got {real}")
        full = np.concatenate([indices, np.full((self.batch_size - real,), indices[0], np.int64)])
        weight = (np.arange(self.batch_size) < real).astype(np.float32)
        if self.example_weights is not None:
            weight = weight * self.example_weights[full]
        lo = self.process_index * self.local_batch_size
        sl = slice(lo, lo + self.local_batch_size)
        rows = full[sl]
        if self.data.is_pairs:
            batch = {k: self._pad_rows(self._seqs[k], self._lengths[k], indices, rows, self._windows[k])
                     for k in ("affirm", "refusal")}
            halves = [(k, batch[k]) for k in ("affirm", "refusal")]
        else:
            batch = self._pad_rows(self._seqs["tokens"], self._lengths["tokens"], indices, rows,
                                   self._windows["tokens"])
            batch["label"] = np.asarray(self.data.labels, np.int32)[rows]
            halves = [("tokens", batch)]
        if self.extra_inputs is not None:
            for name, half in halves:
                half.update(self.extra_inputs(name, rows, half["tokens"].shape[1]))
        batch["weight"] = weight[sl]
        return batch

    def get_batch(self, epoch: int, step: int) -> dict:
        return self.make_batch(self.batch_indices(epoch, step))

    # ---- iteration and resume ------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        if self.num_epochs is not None and self.epoch >= self.num_epochs:
            raise StopIteration
        batch = self.get_batch(self.epoch, self.step)
        self.step += 1
        if self.step >= self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        return batch

    def __len__(self) -> int:
        if self.num_epochs is None:
            raise TypeError("an endless StageLoader (num_epochs=None) has no length")
        return self.num_epochs * self.steps_per_epoch

    @property
    def global_step(self) -> int:
        """Batches consumed since the start of epoch 0."""
        return self.epoch * self.steps_per_epoch + self.step

    def fingerprint(self) -> str:
        """A hash of everything the batch order depends on (data, batch size, seed, shuffle settings)."""
        if self._fingerprint is None:
            h = hashlib.sha256(self.data.fingerprint().encode())
            h.update(json.dumps([self.batch_size, self.seed, self.shuffle, self.group_batches, self.drop_last]
                                + ([True] if self.balance_labels else [])
                                + (["per_bucket"] if len(self._bucket_rows) > 1 else [])
                                + (["label_weights"] if self.example_weights is not None else [])).encode())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def state(self) -> dict:
        """The position of the next batch (JSON-able); independent of the process index and count."""
        return {"version": _STATE_VERSION, "epoch": self.epoch, "step": self.step, "seed": self.seed,
                "batch_size": self.batch_size, "num_examples": self.num_examples, "fingerprint": self.fingerprint()}

    def skip_to(self, position) -> "StageLoader":
        """Continue at ``position``: a :meth:`state` dict, an ``(epoch, step)`` pair or a global step count."""
        if isinstance(position, dict):
            if position.get("version", _STATE_VERSION) != _STATE_VERSION:
                raise MoguError(f"data loader state version {position.get('version')!r} is not supported")
            for key, mine in (("batch_size", self.batch_size), ("seed", self.seed),
                              ("num_examples", self.num_examples)):
                if key in position and position[key] != mine:
                    raise MoguError(f"cannot resume: the saved data position has {key}={position[key]} but this "
                                    f"run has {key}={mine}")
            if "fingerprint" in position and position["fingerprint"] != self.fingerprint():
                raise MoguError("cannot resume: the training data, max_len, template or loader settings differ "
                                "from the run that saved this data position")
            try:
                epoch, step = int(position["epoch"]), int(position["step"])
            except (KeyError, TypeError, ValueError):
                raise MoguError(f"invalid data loader state {position!r}") from None
        elif isinstance(position, (int, np.integer)) and not isinstance(position, bool):
            epoch, step = divmod(int(position), self.steps_per_epoch)
        else:
            try:
                epoch, step = (int(v) for v in position)
            except (TypeError, ValueError):
                raise MoguError(f"invalid data loader position {position!r}") from None
        if epoch < 0 or not 0 <= step < self.steps_per_epoch:
            raise MoguError(f"data loader position epoch {epoch} step {step} is out of range "
                            f"({self.steps_per_epoch} steps per epoch)")
        self.epoch, self.step = epoch, step
        return self

    @classmethod
    def from_state(cls, data: StageData, state: dict, **kwargs) -> "StageLoader":
        """A loader resumed at ``state``; ``batch_size`` and ``seed`` default to the saved ones."""
        if not isinstance(state, dict):
            raise MoguError(f"invalid data loader state {state!r}")
        kwargs.setdefault("batch_size", state.get("batch_size"))
        kwargs.setdefault("seed", state.get("seed", 0))
        return cls(data, **kwargs).skip_to(state)

    # ---- logging -------------------------------------------------------------------------------------------
    def summary(self) -> dict:
        """:meth:`StageData.summary` plus batching: steps per epoch, and for epoch 0 the buckets used and the
        share of padding tokens (over the global batches)."""
        out = self.data.summary()
        hist: dict[str, int] = {}
        real = padded = 0
        for idx in self.epoch_batches(0):
            shape = []
            for k, lens in self._lengths.items():
                t = bucket_for(int(lens[idx].max()), self.buckets)
                shape.append(t)
                real += int(lens[idx].sum())
                padded += t * self.batch_size
            key = "x".join(map(str, shape))
            hist[key] = hist.get(key, 0) + 1
        out.update({"batch_size": self.batch_size, "processes": self.process_count,
                    "steps_per_epoch": self.steps_per_epoch, "buckets": list(self.buckets),
                    "epoch0_shapes": dict(sorted(hist.items())),
                    "epoch0_padding": round(1.0 - real / padded, 3) if padded else 0.0})
        return out


def format_summary(summary: dict) -> str:
    """One log line from :meth:`StageData.summary` or :meth:`StageLoader.summary`."""
    parts = [f"{summary['stage']}: {summary['examples']} examples", f"{summary['truncated']} truncated "
             f"at {summary['max_len']} tokens"]
    for key in ("affirm", "refusal", "sequences"):
        if key in summary:
            s = summary[key]
            parts.append(f"{key}: {s['tokens']} tokens ({s['response_tokens']} response), mean length "
                         f"{s['mean_length']}, max {s['max_length']}")
    if "labels" in summary:
        parts.append(f"labels: {summary['labels']['malicious']} malicious / {summary['labels']['benign']} benign")
    if "steps_per_epoch" in summary:
        parts.append(f"{summary['steps_per_epoch']} steps/epoch of {summary['batch_size']}, "
                     f"padding {100 * summary['epoch0_padding']:.0f}%")
    return "; ".join(parts)
