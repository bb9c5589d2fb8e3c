"""Prompt rows ``{"id", "prompt", "kind"}`` and per-system responses: the kinds, their validation, and
:func:`collect_responses` (generation is passed in, so nothing here calls a model)."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from mogu_jax.errors import MoguError

#: The seed splits' kinds (``benign_twin``: the benign twins of the malicious seeds, plain requests in their form),
#: then the finer kinds of the independent test set (mogu_jax/seeds/independent_test.jsonl): short direct harmful
#: questions, unsafe twins of safe-but-alarming prompts, harmful and benign requests inside the same jailbreak-style
#: wrappers, plain everyday imperatives.
KINDS = ("harmful", "jailbreak", "benign", "borderline", "benign_twin", "harmful_direct", "borderline_unsafe_twin",
         "jailbreak_harmful", "benign_plain", "jailbreak_benign")
#: should be refused
MALICIOUS_KINDS = ("harmful", "jailbreak", "harmful_direct", "borderline_unsafe_twin", "jailbreak_harmful")
#: should be answered
USABLE_KINDS = ("benign", "borderline", "benign_plain", "jailbreak_benign", "benign_twin")


def check_kind(kind: Any, path: str, loc: str) -> str:
    if kind not in KINDS:
        shown = repr(kind) if isinstance(kind, str) else f"a JSON {type_name(kind)}"
        raise MoguError(f"{path}: {loc}: unknown kind {shown}; kinds: {', '.join(KINDS)}")
    return kind


def type_name(v) -> str:
    return "null" if v is None else {dict: "object", list: "list", str: "string", bool: "boolean"}.get(
        type(v), type(v).__name__)


def check_ids(rows: list[dict], path: str, locs: list[str]) -> list[dict]:
    seen: dict[str, str] = {}
    for r, loc in zip(rows, locs):
        if r["id"] in seen:
            raise MoguError(f"{path}: {loc}: duplicate id {r['id']!r} (first used at {seen[r['id']]})")
        seen[r["id"]] = loc
    return rows


def check_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Validate rows built in code (same rules as the loaders); returns plain dict copies."""
    if not rows:
        raise MoguError("no prompt rows to evaluate")
    out, locs = [], []
    for i, r in enumerate(rows):
        loc = f"row {i + 1}"
        if not isinstance(r, Mapping):
            raise MoguError(f"rows: {loc}: expected a dict with id, prompt, kind, got {type(r).__name__}")
        for f in ("id", "prompt", "kind"):
            if f not in r:
                raise MoguError(f"rows: {loc}: missing field {f!r} (each row needs id, prompt, kind)")
        if not isinstance(r["prompt"], str):
            raise MoguError(f"rows: {loc}: field 'prompt' must be a string")
        check_kind(r["kind"], "rows", f"{loc} (id {r['id']!r})")
        out.append({"id": str(r["id"]), "prompt": r["prompt"], "kind": r["kind"]})
        locs.append(loc)
    return check_ids(out, "rows", locs)


def collect_responses(rows: Sequence[Mapping[str, Any]],
                      generators: Mapping[str, Callable[[list[str]], Sequence[str]]],
                      batch_size: int = 8) -> dict[str, list[str]]:
    """Call each system's ``generate(prompts) -> responses`` on the rows' prompts in batches of ``batch_size``
    (prompt order kept). Returns ``{system: [response per row]}`` for :func:`evaluate_responses`."""
    rows = check_rows(rows)
    if batch_size < 1:
        raise MoguError(f"batch_size must be >= 1, got {batch_size}")
    prompts = [r["prompt"] for r in rows]
    out: dict[str, list[str]] = {}
    for name, fn in generators.items():
        got: list[str] = []
        for s in range(0, len(prompts), batch_size):
            chunk = prompts[s:s + batch_size]
            res = list(fn(chunk))
            if len(res) != len(chunk):
                raise MoguError(f"system {name!r}: the generator returned {len(res)} responses for "
                                f"{len(chunk)} prompts")
            for j, r in enumerate(res):
                if not isinstance(r, str):
                    raise MoguError(f"system {name!r}: response for row {s + j + 1} is a {type(r).__name__}, "
                                    "not a string")
            got.extend(res)
        out[name] = got
    return out


def check_responses(rows: list[dict], responses_by_system: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    if not isinstance(responses_by_system, Mapping) or not responses_by_system:
        raise MoguError("responses_by_system must be a non-empty dict {system name: [response per row]}")
    out = {}
    for name, resps in responses_by_system.items():
        if not isinstance(name, str) or not name:
            raise MoguError(f"system names must be non-empty strings, got {name!r}")
        if isinstance(resps, str):
            raise MoguError(f"system {name!r}: expected a list of responses, got one string")
        resps = list(resps)
        if len(resps) != len(rows):
            raise MoguError(f"system {name!r} has {len(resps)} responses for {len(rows)} prompt rows")
        for i, r in enumerate(resps):
            if not isinstance(r, str):
                raise MoguError(f"system {name!r}: response for row {i + 1} (id {rows[i]['id']!r}) is a "
                                f"{type(r).__name__}, not a string")
        out[name] = resps
    return out
