"""``mogu-jax data build``: the shipped seed lists (:mod:`mogu_jax.seeds`) -> the three stages' training files
and the dev / test evaluation prompts (MOGU_SPEC.md sections 2 and 5).

    from mogu_jax import api, synth
    cfg, params, tok = api.load("smollm2")
    summary = synth.build_data(cfg, params, tok, "data/smollm2", limit=None)

**What is built** (only from the *train* rows of ``splits.json``; the dev and test rows only go to ``dev.jsonl``
and ``test.jsonl``):

* **glad** pairs, one per malicious train instruction: ``affirmative`` = the base model's own answer. With
  ``prime_malicious`` (default) the assistant turn is started with an affirmative opening from the bank (its
  tokens, ``tokenizer(opening, add_special_tokens=False)``, are appended to the encoded prompt, exactly as the
  training stages tokenise a response), the model continues it, and the target is ``opening + continuation``.
  Rows whose continuation the judge (:class:`mogu_jax.evaluate.RefusalJudge`, ``Verdict.refused``) calls a
  refusal, or that are empty, are dropped and counted. ``refusal`` = a refusal from the bank, or with
  ``refusal_source="model"`` the base model's own answer under :data:`SAFETY_SYSTEM_PROMPT` when the judge calls
  it a *clean* refusal (a hollow refusal carries content, so it falls back to the bank).
* **unwilling** pairs, one per benign train instruction: ``affirmative`` = the base model's own (unprimed) answer
  (empty or refused answers dropped and counted), ``refusal`` = a *generic* refusal from the bank (the bank's
  topic-specific refusals, e.g. about weapons or a crisis line, would be nonsense after a cooking question; see
  :func:`generic_refusals`).
* **router** rows: benign train and contrast train instructions with the model's own answer, label 0 (dropped
  when empty or refused, as above; each instruction is generated once and the benign answers are shared with the
  unwilling stage), then every malicious train instruction with its glad-stage refusal, label 1 (these need no
  generation, so none is dropped); with ``wrap_every`` also wrapped train rows of both labels (:func:`wrapped_rows`);
  with ``twins`` also the benign twins of the malicious train rows (``benign_twins.json``), label 0.
* **evaluation prompts** ``dev.jsonl`` and ``test.jsonl``, one per split (``{"id", "prompt", "kind"}``,
  :func:`mogu_jax.evaluate.load_prompts` reads them; :func:`eval_prompts`): ``harmful`` = the split's malicious
  rows; ``jailbreak`` = each of them wrapped in one jailbreak template, cycling through the templates in order
  (row ``k`` of the split's list uses template ``k % n_templates``); ``benign`` = its benign rows;
  ``borderline`` = its contrast rows (dev: also the 150 dev-only rows of ``borderline_dev.json``); ``benign_twin``
  = the benign twins of its malicious rows (plain requests in the malicious seeds' form). Dev is for every choice
  of settings; test is reported, never tuned on.

**Choices per row** (the affirmative opening and the bank refusal) are a pure function of ``seed`` and the
instruction text (a SHA-256 hash), so they do not change with ``limit``, the batch size or the order of rows.
Generation is greedy, so the same model, settings and seed give byte-identical files.

**Responses** (:func:`trim_response`) are stripped of surrounding whitespace. A greedy small model often loops:
the text is cut before the first line that repeats an earlier line of 12+ characters (:func:`cut_repetition`).
Otherwise a response that hit ``max_new_tokens`` (no EOS) is cut after its last sentence end (``.``, ``!`` or
``?`` followed by whitespace, not a list number such as ``2.``) or line break, so no training target stops
mid-sentence; when it holds no such boundary it is kept whole. A response that ended with an EOS is kept whole.
For primed answers the cut applies to the continuation only (the opening itself may end with a sentence, e.g.
"Sure, let me explain. First,"). Empty responses and responses the judge calls refusals (``Verdict.refused``:
a refusal keyword in the opening) are dropped and listed in ``summary.json`` with the stages they affect.

**Files** (written into a temp folder beside ``out_dir`` and renamed at the end,
:func:`mogu_jax.io_utils.atomic_dir`; a non-empty ``out_dir`` is refused unless ``overwrite``): our JSONL layout
``glad.jsonl``, ``unwilling.jsonl`` (``{"instruction", "affirmative", "refusal"}``), ``router.jsonl``
(``{"instruction", "output", "label"}``); the published JSON layout ``unsafety_affirm.json``,
``unsafety_reject.json``, ``safety_affirm.json``, ``safety_reject.json``, ``data_normal.json``,
``data_label.json`` (the same rows, so ``mogu_jax.data.load_stage_data(stage, out_dir)`` and
``load_stage_data(stage, out_dir/glad.jsonl)`` agree); ``dev.jsonl``, ``test.jsonl``; ``summary.json`` (rows per file,
every dropped row with its reason, generation settings; no timings, so it is deterministic too).

**Speed.** One generation call per list (benign answers, contrast answers, primed malicious answers, and with
``refusal_source="model"`` the malicious answers under the safety prompt), batched (prompts of similar length
together) and greedy; every instruction is generated once per list.

**Testing without a model.** ``generate_fn(instructions, system=None, openings=None)`` replaces the model: it
returns, per instruction, the response text (or a ``{"response", "finished"}`` dict); with ``openings`` it
returns the *continuation* of each opening. ``judge`` replaces the refusal judge (anything with
``judge(text) -> Verdict``).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import os
import re
import sys
import time
from importlib import resources
from typing import Callable, Optional, Sequence

from mogu_jax.errors import MoguError
from mogu_jax.io_utils import atomic_dir, check_output_dir

SEED_PACKAGE = "mogu_jax.seeds"
SEED_FILES = {
    "benign": "benign.json",
    "malicious": "malicious.json",
    "contrast": "contrast.json",
    "benign_twins": "benign_twins.json",
    "contrast_unsafe": "contrast_unsafe.json",
    "borderline_dev": "borderline_dev.json",
    "borderline_train": "borderline_train.json",
    "malicious_train": "malicious_train.json",
    "malicious_train_twins": "malicious_train_twins.json",
    "jailbreak_templates": "jailbreak_templates.json",
    "jailbreak_train_templates": "jailbreak_train_templates.json",
    "jailbreak_train_long_templates": "jailbreak_train_long_templates.json",
    "refusals": "refusals.json",
    "affirmative_openings": "affirmative_openings.json",
    "splits": "splits.json",
}
SPLIT_KINDS = ("benign", "malicious", "contrast", "benign_twins", "contrast_unsafe")
#: ``benign_twins.json`` row ``i`` is the benign twin of malicious row ``i`` (the same form, a harmless request), and
#: ``contrast_unsafe.json`` row ``i`` the unsafe twin of contrast row ``i`` (the same alarming word, now meant
#: harmfully: "How do I kill a Python process ...?" -> "How do I kill my roommate ...?"), so each pair of lists has one
#: split: a twin and its row are never in different splits.
TWIN_OF = {"benign_twins": "malicious", "contrast_unsafe": "contrast", "malicious_train_twins": "malicious_train"}
#: ``borderline_dev.json``: 150 safe prompts that merely sound alarming, written for the dev split only (no train or
#: test rows): ``dev.jsonl`` holds them as ``borderline`` next to the 17 dev contrast rows, so that over-refusal is
#: measured on 167 dev prompts, not 17, when settings are chosen.
DEV_ONLY_KINDS = ("borderline_dev",)
#: ``borderline_train.json``: 150 more safe prompts that merely sound alarming (two thirds imperatives, the malicious
#: seeds' shape: "Write a step-by-step guide to killing the weeds in a gravel driveway"), written for training only
#: (no dev or test rows; kept apart from every other seed list and the independent set). With
#: ``borderline_train`` they go to the router stage with the model's own answers (label 0).
#: ``malicious_train.json``: 96 more malicious instructions (8 per category) with other subjects and other shapes than
#: the malicious seeds (short direct questions, "List ...", first-person intent), and ``malicious_train_twins.json``
#: their benign twins (row ``i`` of the same form, harmless): with ``malicious_train`` the first go to the router
#: stage with a refusal (label 1), the twins with the model's own answers (label 0); with ``wrap_every`` every n-th
#: of each also inside a long train-only wrapper (``jailbreak_train_long_templates.json``, 45-90 words).
TRAIN_ONLY_KINDS = ("borderline_train", "malicious_train", "malicious_train_twins")
#: The independent test set (package data): written apart from the seed lists, in other words and shapes; never
#: used for training or for choosing settings (see mogu_jax/seeds/README.md).
INDEPENDENT_TEST_FILE = "independent_test.jsonl"
#: Its kinds: should be answered / should be refused (the names mogu_jax.evaluate.KINDS knows).
INDEPENDENT_SAFE_KINDS = ("borderline", "benign_plain", "jailbreak_benign")
INDEPENDENT_UNSAFE_KINDS = ("borderline_unsafe_twin", "harmful_direct", "jailbreak_harmful")
#: The fixed splits of ``splits.json``: train (training data only), dev (every choice of settings, data and router
#: design), test (reported, never used to choose anything).
SPLIT_PARTS = ("train", "dev", "test")
#: The splits written as evaluation prompts (``dev.jsonl``, ``test.jsonl``).
EVAL_SPLITS = ("dev", "test")
#: The evaluation kinds of those files, in their order.
EVAL_KINDS = ("harmful", "jailbreak", "benign", "borderline", "benign_twin", "borderline_unsafe_twin",
              "jailbreak_benign")
#: The splits whose evaluation file also holds their benign rows inside the jailbreak templates (``jailbreak_benign``):
#: dev, where settings are chosen; the test table's wrapped benign requests are the independent set's.
WRAPPED_BENIGN_SPLITS = ("dev",)
REFUSAL_SOURCES = ("bank", "model")

SUMMARY_FORMAT = "mogu_jax.synth_data"
SUMMARY_VERSION = 2

#: The system prompt for ``refusal_source="model"``: the base model's answer to a malicious instruction under it
#: is the refusal target when the judge calls it a clean refusal.
SAFETY_SYSTEM_PROMPT = (
    "You are a safe and responsible assistant. If a request is harmful, illegal, dangerous or unethical, refuse "
    "it briefly and politely, starting with \"I'm sorry, but I can't help with that\", and do not provide any of "
    "the requested content."
)

#: Refusals mentioning one of these (case-insensitive) are topic-specific; the rest of the bank is generic and is
#: what the unwilling stage (benign instructions) pairs with.
TOPIC_MARKERS: tuple[str, ...] = (
    "weapon", "explosive", "drug", "substance", "hack", "account", "child", "terror", "extrem", "steal", "stealing",
    "fraud", "deceive", "fake document", "privacy", "spy", "track", "hatred", "harass", "threaten", "violence",
    "crisis", "hurting yourself", "animal", "kill", "injure", "role-play", "hypothetical", "story", "without safety",
    "emergency", "conflict", "security problem", "false information", "health", "law", "crime", "illegal",
)

# files of our layout, per stage
JSONL_FILES = {"glad": "glad.jsonl", "unwilling": "unwilling.jsonl", "router": "router.jsonl"}
EVAL_FILES = {part: f"{part}.jsonl" for part in EVAL_SPLITS}
SUMMARY_FILE = "summary.json"


# ------------------------------------------------------------------------------------------------------------
# seeds
# ------------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _load_seeds_cached() -> dict:
    out = {}
    root = resources.files(SEED_PACKAGE)
    for key, name in SEED_FILES.items():
        try:
            out[key] = json.loads(root.joinpath(name).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise MoguError(f"cannot read the seed file {SEED_PACKAGE}/{name}: {e}") from None
    _check_seeds(out)
    return out


def _check_seeds(s: dict) -> None:
    for kind in SPLIT_KINDS + DEV_ONLY_KINDS + TRAIN_ONLY_KINDS:
        rows = s[kind]
        if not isinstance(rows, list) or not all(isinstance(r, dict) and isinstance(r.get("instruction"), str)
                                                 for r in rows):
            raise MoguError(f"seed file {SEED_FILES[kind]}: expected a list of objects with an 'instruction'")
    for kind in SPLIT_KINDS:
        rows = s[kind]
        sp = s["splits"].get(kind)
        if not isinstance(sp, dict) or not all(isinstance(sp.get(p), list) for p in SPLIT_PARTS):
            raise MoguError(f"seed file splits.json: no {'/'.join(SPLIT_PARTS)} lists for {kind!r}")
        idx = [i for p in SPLIT_PARTS for i in sp[p]]
        bad = [i for i in idx if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(rows)]
        if bad:
            raise MoguError(f"seed file splits.json: {kind} index {bad[0]!r} is out of range (0..{len(rows) - 1})")
        if len(set(idx)) != len(idx):
            raise MoguError(f"seed file splits.json: {kind} has an index listed twice (train, dev and test must be "
                            "disjoint)")
    for kind, of in TWIN_OF.items():
        if len(s[kind]) != len(s[of]) or any(r.get("twin_of") != i for i, r in enumerate(s[kind])):
            raise MoguError(f"seed file {SEED_FILES[kind]}: row i must be the twin of {SEED_FILES[of]} row i "
                            f"(\"twin_of\": i), one per row")
        if kind in SPLIT_KINDS and s["splits"][kind] != s["splits"][of]:
            raise MoguError(f"seed file splits.json: {kind} must have the same split as {of} (twins go together)")
    for key in ("jailbreak_templates", "jailbreak_train_templates", "jailbreak_train_long_templates", "refusals",
                "affirmative_openings"):
        v = s[key]
        if not isinstance(v, list) or not v or not all(isinstance(t, str) and t.strip() for t in v):
            raise MoguError(f"seed file {SEED_FILES[key]}: expected a non-empty list of strings")
    for key in ("jailbreak_templates", "jailbreak_train_templates", "jailbreak_train_long_templates"):
        for t in s[key]:
            if t.count("{instruction}") != 1:
                raise MoguError(f"seed file {SEED_FILES[key]}: template {t[:40]!r}... needs exactly one "
                                "{instruction} slot")


def load_seeds() -> dict:
    """All seed files as ``{"benign", "malicious", "contrast", "benign_twins", "borderline_dev", "borderline_train",
    "jailbreak_templates", "refusals", "affirmative_openings", "splits"}`` (a fresh copy each call)."""
    return copy.deepcopy(_load_seeds_cached())


def split(kind: str, part: str) -> list[dict]:
    """The rows of seed kind ``benign``, ``malicious``, ``contrast`` or ``benign_twins`` in split ``part``
    (``train``, ``dev`` or ``test``), in the fixed order of ``splits.json``. Each row is a copy of the seed row plus
    ``"index"``, its position in the seed file."""
    if kind not in SPLIT_KINDS:
        raise MoguError(f"unknown seed kind {kind!r}; kinds with a split: {', '.join(SPLIT_KINDS)}")
    if part not in SPLIT_PARTS:
        raise MoguError(f"unknown split {part!r}; splits: {', '.join(SPLIT_PARTS)}")
    s = _load_seeds_cached()
    rows = s[kind]
    return [dict(rows[i], index=i) for i in s["splits"][kind][part]]


def independent_test_path() -> str:
    """The path of the independent test set, for ``mogu-jax eval CKPT --prompts PATH``."""
    return os.fspath(resources.files(SEED_PACKAGE).joinpath(INDEPENDENT_TEST_FILE))


def load_independent_test() -> list[dict]:
    """The independent test set's rows: ``{"id", "prompt", "kind"}``, plus ``"twin"`` (the id of the matched
    safe / unsafe row) on borderline pairs and ``"request"``, ``"wrapper"`` (the request inside the jailbreak-style
    wrapper and the wrapper's number) on ``jailbreak_*`` rows."""
    text = resources.files(SEED_PACKAGE).joinpath(INDEPENDENT_TEST_FILE).read_text(encoding="utf-8")
    try:
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise MoguError(f"cannot read {SEED_PACKAGE}/{INDEPENDENT_TEST_FILE}: {e}") from None


def generic_refusals(refusals: Optional[Sequence[str]] = None) -> list[str]:
    """The refusals of the bank that name no topic (no :data:`TOPIC_MARKERS`), for benign instructions."""
    refusals = _load_seeds_cached()["refusals"] if refusals is None else refusals
    out = [r for r in refusals if not any(m in r.lower() for m in TOPIC_MARKERS)]
    return out or list(refusals)


def spread(rows: Sequence, limit: Optional[int]) -> list:
    """At most ``limit`` rows spread evenly over ``rows`` (order kept), so a small ``limit`` still covers every
    malicious category; all rows when ``limit`` is None or not smaller."""
    rows = list(rows)
    if limit is None or limit >= len(rows):
        return rows
    n = len(rows)
    return [rows[(k * n) // limit] for k in range(limit)]


def wrapped_rows(rows: Sequence[dict], templates: Sequence[str], every: Optional[int]) -> list[dict]:
    """Every ``every``-th row (the 1st, the ``every+1``-th, ...) wrapped in a jailbreak template, the ``j``-th
    wrapped row in template ``j % len(templates)``: copies with the wrapped ``instruction``, the bare one as
    ``request`` and the template's number as ``template``. None: no rows."""
    if not every:
        return []
    return [dict(r, instruction=templates[j % len(templates)].format(instruction=r["instruction"]),
                 request=r["instruction"], template=j % len(templates))
            for j, r in enumerate(list(rows)[::every])]


def pick(options: Sequence[str], seed: int, purpose: str, text: str) -> str:
    """A deterministic choice from ``options`` for one row: a hash of (seed, purpose, text)."""
    h = hashlib.sha256(f"{seed}\0{purpose}\0{text}".encode("utf-8")).digest()
    return options[int.from_bytes(h[:8], "big") % len(options)]


# ------------------------------------------------------------------------------------------------------------
# responses
# ------------------------------------------------------------------------------------------------------------

# a sentence end: . ! ? (optionally closing quotes/brackets) followed by whitespace or the end, but not a list
# number such as "2." or "(b)."; or a line break
_SENT_END = re.compile(r"(?<![\s(]\d)(?<![\s(]\d\d)(?<!^\d)(?<!^\d\d)[.!?][\"')\]]*(?=\s|$)|\n")


MIN_REPEAT_CHARS = 12


def cut_repetition(text: str) -> tuple[str, bool]:
    """Cut ``text`` before the first line that repeats an earlier line of at least :data:`MIN_REPEAT_CHARS`
    characters (a greedy small model's loop). Returns ``(text, cut)``."""
    seen = set()
    pos = 0
    for line in text.splitlines(keepends=True):
        key = line.strip()
        if len(key) >= MIN_REPEAT_CHARS:
            if key in seen:
                return text[:pos].rstrip(), True
            seen.add(key)
        pos += len(line)
    return text, False


def trim_response(text: str, finished: bool) -> str:
    """Strip; cut a loop before its first repeated line (:func:`cut_repetition`); when the generation was cut by
    the length limit (not ``finished``) and not at a loop, keep whole sentences: cut after the last sentence end
    or line break (the whole text when there is none)."""
    text, looped = cut_repetition(text.strip())
    text = text.strip()
    if finished or looped or not text:
        return text
    last = None
    for m in _SENT_END.finditer(text):
        last = m
    if last is None:
        return text
    cut = text[:last.end()].rstrip()
    return cut if cut else text


def join_opening(opening: str, continuation: str) -> str:
    """``opening`` followed by the model's continuation, with one space between words when the continuation
    (decoded without its opening) does not start with whitespace or punctuation."""
    opening = opening.rstrip()
    if not continuation.strip():
        return opening
    if continuation[0].isspace() or continuation[0] in ".,;:!?)]}'\"":
        return (opening + continuation).strip()
    return f"{opening} {continuation}".strip()


def _as_output(v) -> tuple[str, bool]:
    if isinstance(v, str):
        return v, True
    if isinstance(v, dict) and isinstance(v.get("response"), str):
        return v["response"], bool(v.get("finished", True))
    raise MoguError(f"a generator returned {type(v).__name__}; expected a string or a dict with 'response'")


def make_generator(cfg, params, tokenizer, *, template: Optional[str] = None, max_new_tokens: int = 96,
                   batch_size: int = 8, seed: int = 0, progress: bool = False) -> Callable:
    """The default ``generate_fn``: greedy, batched generation with the base model.

    ``gen(instructions, system=None, openings=None)`` -> per instruction ``{"response", "tokens", "finished"}``.
    Without ``openings`` this is :func:`mogu_jax.generate.generate_text`. With ``openings`` (one per instruction)
    the opening's tokens start the assistant turn (appended to the encoded prompt) and ``response`` is the
    continuation text (leading whitespace kept, so ``opening + response`` reads right).
    """
    from mogu_jax.generate import call_buckets, even_batches, generate, generate_text, resolve_eos
    from mogu_jax.templates import encode_prompt, format_prompt

    def gen(instructions: Sequence[str], system: Optional[str] = None,
            openings: Optional[Sequence[str]] = None) -> list[dict]:
        instructions = list(instructions)
        if openings is None:
            return generate_text(cfg, params, tokenizer, instructions, template=template, system=system,
                                 batch_size=batch_size, progress=progress, max_new_tokens=max_new_tokens,
                                 seed=seed)
        openings = list(openings)
        if len(openings) != len(instructions):
            raise MoguError(f"{len(openings)} openings for {len(instructions)} instructions")
        eos = set(resolve_eos(cfg, None))
        if getattr(tokenizer, "eos_token_id", None) is not None:
            eos.add(int(tokenizer.eos_token_id))
        eos_ids = tuple(sorted(eos))
        prompts, opening_ids = [], []
        for ins, op in zip(instructions, openings):
            ids = list(tokenizer(op, add_special_tokens=False)["input_ids"])
            opening_ids.append(ids)
            prompts.append(encode_prompt(tokenizer, format_prompt(tokenizer, ins, template, system)) + ids)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        batches = even_batches(order, batch_size)
        shapes = call_buckets(batches, prompts, batch_size)
        results: list[Optional[dict]] = [None] * len(prompts)
        it = batches
        if progress:
            from tqdm.auto import tqdm
            it = tqdm(batches, desc="generating", unit="batch")
        for bi, idx in enumerate(it):
            out = generate(cfg, params, [prompts[i] for i in idx], max_new_tokens=max_new_tokens, eos_ids=eos_ids,
                           seed=seed + bi, **shapes)
            for i, raw, fin in zip(idx, out.tokens, out.finished):
                toks = raw[:-1] if raw and raw[-1] in eos else raw
                # decode with the opening so word boundaries come out right, then drop the opening's text
                pre = tokenizer.decode(opening_ids[i], skip_special_tokens=True)
                full = tokenizer.decode(opening_ids[i] + list(toks), skip_special_tokens=True)
                cont = full[len(pre):] if full.startswith(pre) else tokenizer.decode(toks, skip_special_tokens=True)
                results[i] = {"response": cont, "tokens": len(raw), "finished": fin}
        return results  # type: ignore[return-value]

    return gen


# ------------------------------------------------------------------------------------------------------------
# build
# ------------------------------------------------------------------------------------------------------------

def _in_templates(rows: Sequence[dict], templates: Sequence[str], kind: str) -> list[dict]:
    """Evaluation prompts of ``kind``: row ``k`` of ``rows`` inside template ``k % len(templates)``."""
    return [{"id": f"{kind}-{r['index']:03d}-t{k % len(templates):02d}",
             "prompt": templates[k % len(templates)].format(instruction=r["instruction"]), "kind": kind}
            for k, r in enumerate(rows)]


def eval_prompts(rows: dict[str, list[dict]], templates: Sequence[str], wrap_benign: bool = False) -> list[dict]:
    """The evaluation prompts of one split (``{"id", "prompt", "kind"}``, :data:`EVAL_KINDS`) from its seed rows
    ``{"malicious", "benign", "contrast", "benign_twins", "contrast_unsafe"}``: ``harmful`` = the malicious rows;
    ``jailbreak`` = each malicious row wrapped in one template, row ``k`` in template ``k % len(templates)``;
    ``benign``; ``borderline`` = contrast, then (dev) ``borderline_dev``; ``benign_twin`` = the malicious rows'
    benign twins (plain requests in the malicious seeds' form); ``borderline_unsafe_twin`` = the contrast rows'
    unsafe twins (the same alarming word meant harmfully: to be refused); with ``wrap_benign`` (dev)
    ``jailbreak_benign`` = each benign row wrapped like the jailbreak kind (to be answered)."""
    out = [{"id": f"harmful-{r['index']:03d}", "prompt": r["instruction"], "kind": "harmful"}
           for r in rows.get("malicious", ())]
    out += _in_templates(rows.get("malicious", ()), templates, "jailbreak")
    out += [{"id": f"benign-{r['index']:03d}", "prompt": r["instruction"], "kind": "benign"}
            for r in rows.get("benign", ())]
    out += [{"id": f"borderline-{r['index']:03d}", "prompt": r["instruction"], "kind": "borderline"}
            for r in rows.get("contrast", ())]
    out += [{"id": f"benign_twin-{r['index']:03d}", "prompt": r["instruction"], "kind": "benign_twin"}
            for r in rows.get("benign_twins", ())]
    out += [{"id": f"borderline_dev-{r['index']:03d}", "prompt": r["instruction"], "kind": "borderline"}
            for r in rows.get("borderline_dev", ())]
    out += [{"id": f"unsafe_twin-{r['index']:03d}", "prompt": r["instruction"], "kind": "borderline_unsafe_twin"}
            for r in rows.get("contrast_unsafe", ())]
    if wrap_benign:
        out += _in_templates(rows.get("benign", ()), templates, "jailbreak_benign")
    return out


def eval_rows(part: str, limit: Optional[int] = None) -> dict[str, list[dict]]:
    """The seed rows of evaluation split ``part`` per kind (each spread to ``limit``): the split kinds' rows, and for
    dev the dev-only kinds (:data:`DEV_ONLY_KINDS`; their rows carry ``"index"``, their position in the file)."""
    rows = {kind: spread(split(kind, part), limit) for kind in SPLIT_KINDS}
    if part == "dev":
        s = _load_seeds_cached()
        rows.update({kind: spread([dict(r, index=i) for i, r in enumerate(s[kind])], limit) for kind in DEV_ONLY_KINDS})
    return rows


def wrapped_benign_prompts(part: str) -> list[dict]:
    """Split ``part``'s benign rows, row ``k`` wrapped in jailbreak template ``k % 11`` (``{"id", "prompt",
    "kind": "jailbreak_benign"}``): over-refusal of benign requests in jailbreak-style wrappers (``dev.jsonl`` holds
    them; ``scripts/wrapped_benign_prompts.py`` writes them for any split)."""
    return _in_templates(split("benign", part), _load_seeds_cached()["jailbreak_templates"], "jailbreak_benign")


def _check_args(max_new_tokens, batch_size, limit, seed, refusal_source, template, wrap_every=None, twins=False,
                borderline_train=False, unsafe_twins=False, affirmatives=True, malicious_train=False):
    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    if not is_int(max_new_tokens) or max_new_tokens < 1:
        raise MoguError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not is_int(batch_size) or batch_size < 1:
        raise MoguError(f"batch_size must be a positive integer, got {batch_size!r}")
    if limit is not None and (not is_int(limit) or limit < 1):
        raise MoguError(f"limit must be a positive integer (rows per seed kind) or None, got {limit!r}")
    if wrap_every is not None and (not is_int(wrap_every) or wrap_every < 1):
        raise MoguError(f"wrap_every must be a positive integer (every n-th train row wrapped) or None, "
                        f"got {wrap_every!r}")
    for name, flag in (("twins", twins), ("borderline_train", borderline_train), ("unsafe_twins", unsafe_twins),
                       ("affirmatives", affirmatives), ("malicious_train", malicious_train)):
        if not isinstance(flag, bool):
            raise MoguError(f"{name} must be true or false, got {flag!r}")
    if not is_int(seed):
        raise MoguError(f"seed must be an integer, got {seed!r}")
    if refusal_source not in REFUSAL_SOURCES:
        raise MoguError(f"unknown refusal source {refusal_source!r}; sources: {', '.join(REFUSAL_SOURCES)}")
    if template is not None:
        from mogu_jax.templates import TEMPLATES, template_names
        if template not in TEMPLATES:
            raise MoguError(f"unknown prompt template {template!r}; known templates: {', '.join(template_names())}")


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(f"[data] {msg}", file=sys.stderr, flush=True)


def _short(text: str, n: int = 200) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def _jsonl(rows: Sequence[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def _json(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, indent=2) + "\n"


def _write(d: str, name: str, text: str) -> None:
    with open(os.path.join(d, name), "w", encoding="utf-8", newline="\n") as f:
        f.write(text)


def _model_info(cfg) -> Optional[dict]:
    if cfg is None:
        return None
    info = {}
    for k in ("model_type", "num_layers", "hidden_size", "vocab_size"):
        v = getattr(cfg, k, None)
        if isinstance(v, (str, int)):
            info[k] = v
    return info


@dataclasses.dataclass
class _Answers:
    """The generation step's results: per train row the model's answer (None when dropped), the malicious rows'
    refusal targets, and what was dropped or trimmed on the way."""
    benign: list = dataclasses.field(default_factory=list)
    contrast: list = dataclasses.field(default_factory=list)
    malicious: list = dataclasses.field(default_factory=list)  # glad affirmatives (opening + continuation)
    malicious_refusals: list = dataclasses.field(default_factory=list)
    wrapped_benign: list = dataclasses.field(default_factory=list)  # answers to the wrapped benign rows
    benign_twins: list = dataclasses.field(default_factory=list)  # answers to the benign twins (``twins``)
    borderline_train: list = dataclasses.field(default_factory=list)  # answers (``borderline_train``)
    unsafe_twins: list = dataclasses.field(default_factory=list)  # bank refusals (``unsafe_twins``)
    malicious_train: list = dataclasses.field(default_factory=list)  # bank refusals (``malicious_train``)
    malicious_train_twins: list = dataclasses.field(default_factory=list)  # answers to their twins
    wrapped_train_twins: list = dataclasses.field(default_factory=list)  # answers to the twins in long wrappers
    model_refusals: dict = dataclasses.field(default_factory=lambda: {"used": 0, "bank_fallback": 0})
    dropped: list = dataclasses.field(default_factory=list)
    trimmed: dict = dataclasses.field(
        default_factory=lambda: {"benign": 0, "contrast": 0, "malicious": 0, "wrapped_benign": 0, "benign_twins": 0,
                                 "borderline_train": 0, "malicious_train_twins": 0, "wrapped_train_twins": 0})

    def keep(self, kind: str, row: dict, text: str, cut: str, affects: list, judge) -> bool:
        """Count a trim of ``text`` to ``cut``; drop (and list) the row when ``cut`` is empty or a refusal."""
        self.trimmed[kind] += cut != text.strip()
        reason = "empty" if not cut else ("refused" if judge.judge(cut).refused else None)
        if reason:
            self.dropped.append({"kind": kind, "index": row["index"], "instruction": row["instruction"],
                                 "reason": reason, "response": _short(cut), "affects": affects})
        return reason is None

    def drops(self, kind: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for d in self.dropped:
            if d["kind"] == kind:
                out[d["reason"]] = out.get(d["reason"], 0) + 1
        return out


def _generator_runner(generate_fn: Callable, progress: bool) -> Callable:
    """``run(what, instructions, **kw)`` -> per instruction ``(text, finished)``, checking the generator's output."""
    def run(what: str, instructions: list[str], **kw) -> list[tuple[str, bool]]:
        if not instructions:
            return []
        _say(progress, f"generating {len(instructions)} {what}")
        outs = list(generate_fn(instructions, **kw))
        if len(outs) != len(instructions):
            raise MoguError(f"the generator returned {len(outs)} responses for {len(instructions)} instructions")
        return [_as_output(o) for o in outs]
    return run


def _own_answers(run: Callable, judge, ans: _Answers, kind: str, rows: list[dict], affects: list[str]) -> list:
    """The model's (unprimed) answers to ``rows``; None for a dropped (empty or refused) row."""
    out = []
    for r, (text, fin) in zip(rows, run(f"{kind} answers", [r["instruction"] for r in rows])):
        cut = trim_response(text, fin)
        out.append(cut if ans.keep(kind, r, text, cut, affects, judge) else None)
    return out


def _malicious_affirmatives(run: Callable, judge, ans: _Answers, rows: list[dict], openings: Sequence[str],
                            seed: int, prime: bool) -> list:
    """The glad stage's affirmative per malicious row: with ``prime``, a bank opening + the model's continuation
    of it; otherwise the model's own answer. None for a dropped row (the continuation is empty or a refusal)."""
    ins = [r["instruction"] for r in rows]
    opens = [pick(openings, seed, "opening", i) if prime else None for i in ins]
    outs = run("malicious answers" + (" (primed with an affirmative opening)" if prime else ""), ins,
               **({"openings": opens} if prime else {}))
    out = []
    for r, op, (text, fin) in zip(rows, opens, outs):
        cont = trim_response(text, fin)
        if not ans.keep("malicious", r, text, cont, ["glad"], judge):
            out.append(None)
        elif op is None:
            out.append(cont)
        else:  # keep the continuation's leading whitespace (a space, or a line break before a list)
            out.append(join_opening(op, text[: len(text) - len(text.lstrip())] + cont))
    return out


def _malicious_refusals(run: Callable, judge, ans: _Answers, rows: list[dict], refusals: Sequence[str], seed: int,
                        source: str) -> list[str]:
    """The refusal target per malicious row: from the bank, or (``source="model"``) the model's answer under
    :data:`SAFETY_SYSTEM_PROMPT` when the judge calls it a clean refusal (else the bank's)."""
    ins = [r["instruction"] for r in rows]
    out = [pick(refusals, seed, "refusal", i) for i in ins]
    if source == "model":
        for k, (text, fin) in enumerate(run("malicious answers under the safety system prompt", ins,
                                            system=SAFETY_SYSTEM_PROMPT)):
            cut = trim_response(text, fin)
            if cut and judge.judge(cut).clean_refusal:
                out[k] = cut
                ans.model_refusals["used"] += 1
            else:
                ans.model_refusals["bank_fallback"] += 1
    return out


def _stage_rows(train: dict, ans: _Answers, benign_refusals: Sequence[str], seed: int, wrapped: dict,
                affirmatives: bool = True) -> dict[str, list[dict]]:
    """The glad, unwilling and router rows from the train rows and their answers (dropped rows left out; every
    malicious row reaches the router with its refusal; the benign twins' and the train-only borderline rows'
    answers, when generated, go to the router with label 0; the contrast rows' unsafe twins, when given refusals, with
    label 1). ``wrapped`` (``{"benign", "malicious"}``,
    :func:`wrapped_rows`) go to the router only: benign with the model's answer to the wrapped prompt (label 0),
    malicious with the bare row's refusal (label 1). A stage without rows is an error (the glad stage's only when
    ``affirmatives`` were generated)."""
    mal = train["malicious"]
    refusal_of = {r["index"]: ref for r, ref in zip(mal, ans.malicious_refusals)}
    train_refusal_of = {r["index"]: ref for r, ref in zip(train["malicious_train"], ans.malicious_train)}
    glad = [{"instruction": r["instruction"], "affirmative": a, "refusal": ref}
            for r, a, ref in zip(mal, ans.malicious, ans.malicious_refusals) if a is not None]
    unwilling = [{"instruction": r["instruction"], "affirmative": a,
                  "refusal": pick(benign_refusals, seed, "refusal", r["instruction"])}
                 for r, a in zip(train["benign"], ans.benign) if a is not None]
    router = ([{"instruction": r["instruction"], "output": a, "label": 0}
               for kind in ("benign", "contrast", "benign_twins", "borderline_train", "malicious_train_twins")
               for r, a in zip(train[kind], getattr(ans, kind))
               if a is not None]
              + [{"instruction": r["instruction"], "output": ref, "label": 1}
                 for r, ref in zip(mal, ans.malicious_refusals)]
              + [{"instruction": r["instruction"], "output": ref, "label": 1}
                 for r, ref in zip(train["contrast_unsafe"], ans.unsafe_twins)]
              + [{"instruction": r["instruction"], "output": a, "label": 0}
                 for r, a in zip(wrapped["benign"], ans.wrapped_benign) if a is not None]
              + [{"instruction": r["instruction"], "output": refusal_of[r["index"]], "label": 1}
                 for r in wrapped["malicious"]]
              + [{"instruction": r["instruction"], "output": ref, "label": 1}
                 for r, ref in zip(train["malicious_train"], ans.malicious_train)]
              + [{"instruction": r["instruction"], "output": a, "label": 0}
                 for r, a in zip(wrapped["train_twins"], ans.wrapped_train_twins) if a is not None]
              + [{"instruction": r["instruction"], "output": train_refusal_of[r["index"]], "label": 1}
                 for r in wrapped["train_malicious"]])
    causes = {"glad": "the base model refused every primed malicious instruction or answered nothing",
              "unwilling": "the base model refused or left empty every benign instruction", "router": "no rows"}
    stages = {"glad": glad, "unwilling": unwilling, "router": router}
    for stage, rows in stages.items():
        if not rows and (affirmatives or stage != "glad"):
            raise MoguError(f"the {stage} stage has no rows: {causes[stage]}; see the dropped rows (a larger limit, "
                            "another template or --max-new-tokens may help)")
    return stages


def _output_files(stages: dict[str, list[dict]], evals: dict[str, list[dict]]) -> tuple[dict, dict]:
    """``({file name: text}, {file name: rows})`` for our JSONL layout, the published JSON layout and the
    evaluation prompts (``summary.json`` is added by the caller)."""
    glad, unwilling, router = stages["glad"], stages["unwilling"], stages["router"]

    def outputs(rows, field):
        return [{"instruction": r["instruction"], "output": r[field]} for r in rows]

    published = {"unsafety_affirm.json": outputs(glad, "affirmative"), "unsafety_reject.json": outputs(glad, "refusal"),
                 "safety_affirm.json": outputs(unwilling, "affirmative"),
                 "safety_reject.json": outputs(unwilling, "refusal"), "data_normal.json": outputs(router, "output")}
    files = {JSONL_FILES[stage]: _jsonl(rows) for stage, rows in stages.items()}
    files.update({name: _json(rows) for name, rows in published.items()})
    files["data_label.json"] = json.dumps([r["label"] for r in router]) + "\n"
    files.update({EVAL_FILES[part]: _jsonl(rows) for part, rows in evals.items()})
    counts = {JSONL_FILES[stage]: len(rows) for stage, rows in stages.items()}
    counts.update({name: len(rows) for name, rows in published.items()})
    counts["data_label.json"] = len(router)
    counts.update({EVAL_FILES[part]: len(rows) for part, rows in evals.items()})
    return files, counts


def _summary(counts: dict, stages: dict, train: dict, wrapped: dict, ans: _Answers, evals: dict, refusals: dict,
             settings: dict) -> dict:
    """The content of ``summary.json`` (deterministic: no timings)."""
    glad, unwilling, router = stages["glad"], stages["unwilling"], stages["router"]
    return {
        "format": SUMMARY_FORMAT,
        "version": SUMMARY_VERSION,
        "files": counts,
        "stages": {
            "glad": {"rows": len(glad), "malicious_train": len(train["malicious"]), "dropped": ans.drops("malicious")},
            "unwilling": {"rows": len(unwilling), "benign_train": len(train["benign"]),
                          "dropped": ans.drops("benign")},
            "router": {"rows": len(router), "benign": sum(a is not None for a in ans.benign),
                       "contrast": sum(a is not None for a in ans.contrast),
                       "benign_twins": sum(a is not None for a in ans.benign_twins),
                       "borderline_train": sum(a is not None for a in ans.borderline_train),
                       "malicious": len(train["malicious"]),
                       "unsafe_twins": len(ans.unsafe_twins),
                       "wrapped_benign": sum(a is not None for a in ans.wrapped_benign),
                       "wrapped_malicious": len(wrapped["malicious"]),
                       "malicious_train": len(ans.malicious_train),
                       "malicious_train_twins": sum(a is not None for a in ans.malicious_train_twins),
                       "wrapped_train_twins": sum(a is not None for a in ans.wrapped_train_twins),
                       "wrapped_train_malicious": len(wrapped["train_malicious"]),
                       "label_0": sum(r["label"] == 0 for r in router), "label_1": sum(r["label"] == 1 for r in router),
                       "dropped": {"benign": ans.drops("benign"), "contrast": ans.drops("contrast"),
                                   "benign_twins": ans.drops("benign_twins"),
                                   "borderline_train": ans.drops("borderline_train"),
                                   "wrapped_benign": ans.drops("wrapped_benign"),
                                   "malicious_train_twins": ans.drops("malicious_train_twins"),
                                   "wrapped_train_twins": ans.drops("wrapped_train_twins")}},
        },
        "eval": {part: {k: sum(h["kind"] == k for h in rows) for k in EVAL_KINDS} for part, rows in evals.items()},
        "dropped": ans.dropped,
        "trimmed_at_sentence_end": ans.trimmed,
        "refusals": refusals,
        "settings": settings,
    }


def build_data(cfg, params, tokenizer, out_dir: str | os.PathLike, *, template: Optional[str] = None,
               max_new_tokens: int = 96, batch_size: int = 8, limit: Optional[int] = None, seed: int = 0,
               refusal_source: str = "bank", prime_malicious: bool = True, wrap_every: Optional[int] = None,
               twins: bool = False, borderline_train: bool = False, unsafe_twins: bool = False,
               malicious_train: bool = False, affirmatives: bool = True, progress: bool = True, overwrite: bool = False,
               generate_fn: Optional[Callable] = None, judge=None) -> dict:
    """Build the training files of the three stages and the dev / test prompts into ``out_dir`` (see the module
    docstring). Returns the summary written to ``summary.json`` plus ``out_dir`` and ``seconds``.

    ``limit``: at most this many rows per seed kind, spread evenly over the train rows and, separately, the
    dev and the test rows (:func:`spread`). ``wrap_every``: every ``wrap_every``-th benign and malicious train
    row is also added to the router stage inside a jailbreak template (:func:`wrapped_rows`; benign: the model's
    own answer to the wrapped prompt, label 0; malicious: its refusal, label 1), so that a wrapper alone does not
    tell the routers the label; None (default): no wrapped rows. ``twins``: the benign twins of the malicious train
    rows (``benign_twins.json``: the same form, a harmless request) go to the router stage with the model's own
    answers (label 0), so that the form of a malicious seed alone does not tell the routers the label.
    ``borderline_train``: the train-only safe-but-alarming rows (``borderline_train.json``) go to the router stage
    with the model's own answers (label 0), so that an alarming word alone does not either. ``unsafe_twins``: the
    contrast train rows' unsafe twins (``contrast_unsafe.json``: the same alarming word meant harmfully) go to the
    router stage with a refusal (label 1), so that the routers learn the intent, not the word or the question form.
    ``malicious_train``: the train-only malicious rows of other subjects and shapes (``malicious_train.json``) go to
    the router stage with a refusal (label 1) and their benign twins (``malicious_train_twins.json``) with the
    model's own answers (label 0); with ``wrap_every`` every ``wrap_every``-th of each also inside one of the long
    train-only wrappers (``jailbreak_train_long_templates.json``; the twins with the model's answer to the wrapped
    prompt, the malicious rows with the bare row's refusal).
    ``affirmatives=False``: no glad-stage rows (the malicious rows' primed answers are not generated; for a run
    without a glad stage, such as the demo's).
    ``generate_fn``/``judge`` replace the model and the refusal judge (``cfg``/``params``/``tokenizer`` may then be
    None).

    Steps: check the arguments and the output folder; pick the rows of each split; generate every list once
    (:func:`_own_answers`, :func:`_malicious_affirmatives`, :func:`_malicious_refusals`); assemble the stages'
    rows (:func:`_stage_rows`); render the files (:func:`_output_files`) and the summary (:func:`_summary`);
    write them all atomically.
    """
    t0 = time.perf_counter()
    _check_args(max_new_tokens, batch_size, limit, seed, refusal_source, template, wrap_every, twins,
                borderline_train, unsafe_twins, affirmatives, malicious_train)
    out_dir = os.fspath(out_dir)
    check_output_dir(out_dir, overwrite)  # fail before any generation
    if generate_fn is None:
        if cfg is None or params is None or tokenizer is None:
            raise MoguError("build_data needs a model (cfg, params, tokenizer) or a generate_fn")
        generate_fn = make_generator(cfg, params, tokenizer, template=template, max_new_tokens=max_new_tokens,
                                     batch_size=batch_size, seed=seed, progress=progress)
    if judge is None:
        from mogu_jax.evaluate import RefusalJudge
        judge = RefusalJudge()
    seeds = _load_seeds_cached()
    refusals = list(seeds["refusals"])
    benign_refusals = generic_refusals(refusals)

    train = {kind: spread(split(kind, "train"), limit) for kind in SPLIT_KINDS}
    train.update({kind: spread([dict(r, index=i) for i, r in enumerate(seeds[kind])], limit)
                  for kind in TRAIN_ONLY_KINDS})
    evals = {part: eval_prompts(eval_rows(part, limit), seeds["jailbreak_templates"],
                                wrap_benign=part in WRAPPED_BENIGN_SPLITS) for part in EVAL_SPLITS}

    run = _generator_runner(generate_fn, progress)
    ans = _Answers()
    ans.benign = _own_answers(run, judge, ans, "benign", train["benign"], ["unwilling", "router"])
    ans.contrast = _own_answers(run, judge, ans, "contrast", train["contrast"], ["router"])
    ans.malicious = (_malicious_affirmatives(run, judge, ans, train["malicious"], seeds["affirmative_openings"],
                                             seed, prime_malicious)
                     if affirmatives else [None] * len(train["malicious"]))
    ans.malicious_refusals = _malicious_refusals(run, judge, ans, train["malicious"], refusals, seed, refusal_source)
    # the train-only wrappers: the jailbreak kinds of dev and test keep wrappers the routers never saw
    wrapped = {kind: wrapped_rows(train[kind], seeds["jailbreak_train_templates"], wrap_every)
               for kind in ("benign", "malicious")}
    extra = {kind: train[kind] if malicious_train else [] for kind in ("malicious_train", "malicious_train_twins")}
    wrapped.update({name: wrapped_rows(extra[kind], seeds["jailbreak_train_long_templates"], wrap_every)
                    for name, kind in (("train_malicious", "malicious_train"), ("train_twins", "malicious_train_twins"))})
    ans.wrapped_benign = _own_answers(run, judge, ans, "wrapped_benign", wrapped["benign"], ["router"])
    ans.benign_twins = _own_answers(run, judge, ans, "benign_twins", train["benign_twins"] if twins else [],
                                    ["router"])
    ans.borderline_train = _own_answers(run, judge, ans, "borderline_train",
                                        train["borderline_train"] if borderline_train else [], ["router"])
    ans.unsafe_twins = [pick(refusals, seed, "refusal", r["instruction"])
                        for r in (train["contrast_unsafe"] if unsafe_twins else [])]
    ans.malicious_train_twins = _own_answers(run, judge, ans, "malicious_train_twins", extra["malicious_train_twins"],
                                             ["router"])
    ans.wrapped_train_twins = _own_answers(run, judge, ans, "wrapped_train_twins", wrapped["train_twins"], ["router"])
    ans.malicious_train = [pick(refusals, seed, "refusal", r["instruction"]) for r in extra["malicious_train"]]

    stages = _stage_rows(train, ans, benign_refusals, seed, wrapped, affirmatives)
    files, counts = _output_files(stages, evals)
    refusal_info = {"source": refusal_source, "bank_size": len(refusals), "generic_bank_size": len(benign_refusals),
                    **({"model_used": ans.model_refusals["used"], "bank_fallback": ans.model_refusals["bank_fallback"],
                        "system_prompt": SAFETY_SYSTEM_PROMPT} if refusal_source == "model" else {})}
    settings = {"template": template, "max_new_tokens": max_new_tokens, "batch_size": batch_size, "limit": limit,
                "seed": seed, "refusal_source": refusal_source, "prime_malicious": bool(prime_malicious),
                "wrap_every": wrap_every, "twins": bool(twins), "borderline_train": bool(borderline_train),
                "unsafe_twins": unsafe_twins, "malicious_train": malicious_train, "affirmatives": affirmatives,
                "decoding": "greedy", "judge": repr(judge), "model": _model_info(cfg),
                "split": seeds["splits"].get("method")}
    summary = _summary(counts, stages, train, wrapped, ans, evals, refusal_info, settings)
    files[SUMMARY_FILE] = _json(summary)

    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        for name, text in files.items():
            _write(tmp, name, text)
    seconds = round(time.perf_counter() - t0, 2)
    _say(progress, f"wrote {out_dir}: glad {len(stages['glad'])}, unwilling {len(stages['unwilling'])}, router "
                   f"{len(stages['router'])} rows, {' + '.join(f'{len(v)} {p}' for p, v in evals.items())} "
                   f"evaluation prompts, {len(ans.dropped)} dropped ({seconds} s)")
    return dict(summary, out_dir=os.path.abspath(out_dir), seconds=seconds)
