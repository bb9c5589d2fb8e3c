"""Checks of the command line's inputs, all made before any model is loaded or any work is done: numbers
(finite, in range), the prompts file (one JSON lines reader, unique ids) and prompt lengths against the model's
positions (or ``--truncate left|right``)."""

from __future__ import annotations

import argparse
import math
from typing import Callable, Optional

from mogu_jax.errors import MoguError


# ------------------------------------------------------------------------------------- argparse types
def number(kind: type = float, low: Optional[float] = None, high: Optional[float] = None,
           low_open: bool = False) -> Callable[[str], float]:
    """An argparse ``type=``: a finite ``kind`` (int or float) within ``[low, high]`` (``(low, high]`` with
    ``low_open``); anything else is refused with a message that says what is accepted."""
    if low is None:
        lo = ""
    elif low_open:
        lo = f"> {low:g}"
    else:
        lo = f">= {low:g}"
    hi = f"<= {high:g}" if high is not None else ""
    wanted = ("a finite number" if kind is float else "an integer") + (f" {lo}" if lo else "") + (
        f"{' and' if lo else ''} {hi}" if hi else "")

    def parse(text: str):
        try:
            value = kind(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}") from None
        if (isinstance(value, float) and not math.isfinite(value)) or (
                low is not None and (value <= low if low_open else value < low)) or (
                high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}")
        return value

    return parse


POSITIVE_INT = number(int, 1)
NON_NEGATIVE_INT = number(int, 0)


def path_arg(text: str) -> str:
    """A path argument: any non-empty text (whether it exists is checked where it is used)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a path, got an empty string")
    return text


def with_handoff(cfg, handoff: Optional[str], threshold: Optional[float]):
    """``cfg`` with ``--handoff`` and ``--handoff-threshold`` where given (routed decoding after the routed tokens)."""
    if handoff is not None:
        cfg = cfg.replace(handoff=handoff)
    return cfg if threshold is None else cfg.replace(handoff_threshold=float(threshold))


def routed_tokens(text: str) -> str:
    """``--routed-tokens``: a count >= 0 or ``all`` (kept as text; ``cli.decoding_mode`` reads it)."""
    if text.strip().lower() != "all":
        NON_NEGATIVE_INT(text)
    return text.strip().lower()


def layer_ids(text: str) -> tuple:
    """``--router-layers``: comma-separated layer ids >= 0, e.g. ``3,5,7``."""
    try:
        ids = tuple(int(x) for x in text.split(","))
    except ValueError:
        ids = ()
    if not ids or min(ids) < 0 or len(set(ids)) != len(ids):
        raise argparse.ArgumentTypeError(f"expected comma-separated, distinct layer ids >= 0, got {text!r}")
    return ids


# ------------------------------------------------------------------------------------- prompts
def read_prompts(path: str) -> list[dict]:
    """``{"id", "prompt"}`` rows of a JSON lines file (``id`` optional: the row number). Every error names
    the file and line; a repeated id is refused, naming both lines."""
    from mogu_jax.io_utils import read_json_records
    values, locs = read_json_records(path, 'a JSON lines file of {"id", "prompt"} rows')
    rows, seen = [], {}
    for v, loc in zip(values, locs):
        if not isinstance(v, dict) or not isinstance(v.get("prompt"), str):
            raise MoguError(f'{path}: {loc}: each line needs a string "prompt" field')
        if not v["prompt"].strip():
            raise MoguError(f"{path}: {loc}: empty prompt")
        rid = v.get("id", len(rows))
        if isinstance(rid, bool) or not isinstance(rid, (str, int)):
            raise MoguError(f'{path}: {loc}: "id" must be a string or an integer, got {rid!r}')
        if str(rid) in seen:
            raise MoguError(f"{path}: {loc}: duplicate id {rid!r} (first used at {seen[str(rid)]}); ids must be "
                            "unique so that every output row names its prompt")
        seen[str(rid)] = loc
        rows.append(dict(v, id=rid))
    return rows


def fit_prompts(rows: list[dict], tok, max_positions: int, max_new_tokens: int, template=None, system=None,
                truncate: Optional[str] = None) -> list[dict]:
    """Check that every prompt, with its template, leaves room for ``max_new_tokens`` in the model's
    ``max_positions``; too long: refused naming the prompt's id and the excess, or, with ``truncate``
    ("left" keeps the end of the instruction, "right" keeps its start), cut to fit. Returns the rows."""
    from mogu_jax.templates import encode_prompt, format_prompt
    budget = max_positions - max_new_tokens
    if budget < 1:
        raise MoguError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the model's "
                        f"{max_positions} positions")
    out = []
    for r in rows:
        n = len(encode_prompt(tok, format_prompt(tok, r["prompt"], template, system)))
        if n <= budget:
            out.append(r)
            continue
        if truncate is None:
            raise MoguError(f"prompt {r['id']!r} has {n} tokens; with --max-new-tokens {max_new_tokens} that is "
                            f"{n - budget} more than the model's {max_positions} positions allow (shorten it, "
                            "lower --max-new-tokens, or pass --truncate left|right)")
        out.append(dict(r, prompt=_truncated(r["prompt"], tok, budget, n, truncate, template, system)))
    return out


def _truncated(text: str, tok, budget: int, n: int, side: str, template, system) -> str:
    """The instruction cut (by tokens, on ``side``) until its templated prompt takes ``budget`` tokens."""
    from mogu_jax.templates import encode_prompt, format_prompt
    ids = list(tok(text, add_special_tokens=False)["input_ids"])
    keep = max(len(ids) - (n - budget), 0)
    for _ in range(8):  # decode -> encode may not round-trip exactly: trim until it fits
        kept = ids[len(ids) - keep:] if side == "left" else ids[:keep]
        cut = tok.decode(kept, skip_special_tokens=True) if keep else ""
        n = len(encode_prompt(tok, format_prompt(tok, cut, template, system)))
        if n <= budget:
            return cut
        keep = max(keep - (n - budget), 0)
    raise MoguError(f"cannot truncate a prompt to {budget} tokens with this tokenizer")
