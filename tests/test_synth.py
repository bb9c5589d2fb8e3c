"""``mogu_jax.synth``: seed lists -> the three stages' training files and the dev / test prompts.

Most tests use a stub generator (no model, fast); one small build runs a tiny random Llama end to end."""

import json
import os

import pytest

from mogu_jax import data as D
from mogu_jax import evaluate as E
from mogu_jax import synth as S
from mogu_jax.errors import MoguError

STAGE_FILES = {"glad": "glad.jsonl", "unwilling": "unwilling.jsonl", "router": "router.jsonl"}
ALL_FILES = {"glad.jsonl", "unwilling.jsonl", "router.jsonl", "unsafety_affirm.json", "unsafety_reject.json",
             "safety_affirm.json", "safety_reject.json", "data_normal.json", "data_label.json", "dev.jsonl",
             "test.jsonl", "summary.json"}
REFUSAL = "I'm sorry, but I can't help with that."


class Stub:
    """A fake model: answers every instruction, refuses those in ``refuse``; records its calls."""

    def __init__(self, refuse=(), finished=True, safety_refuses=()):
        self.refuse = set(refuse)
        self.safety_refuses = set(safety_refuses)
        self.finished = finished
        self.calls = []

    def __call__(self, instructions, system=None, openings=None):
        self.calls.append({"n": len(instructions), "system": system, "openings": openings,
                           "instructions": list(instructions)})
        out = []
        for ins in instructions:
            if system is not None:
                text = REFUSAL if ins in self.safety_refuses else "Here you go, the full answer."
            elif ins in self.refuse:
                text = " " + REFUSAL if openings else REFUSAL
            elif openings is not None:
                text = " a plan for it. Step one is easy. Step two is"
            else:
                text = "An answer about it. More detail follows here and"
            out.append({"response": text, "finished": self.finished})
        return out


def build(tmp_path, name="out", stub=None, **kw):
    kw.setdefault("progress", False)
    stub = stub or Stub()
    out = tmp_path / name
    summary = S.build_data(None, None, None, out, generate_fn=stub, **kw)
    return out, summary, stub


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def files_of(d):
    return {n: open(os.path.join(d, n), "rb").read() for n in sorted(os.listdir(d))}


def layouts_agree(out):
    """Both layouts load through mogu_jax.data for every stage, with the same rows; returns them."""
    rows = {}
    for stage, name in STAGE_FILES.items():
        ours = D.load_stage_data(stage, out / name)
        published = D.load_stage_data(stage, out)  # the folder: the published file names
        a, b = D.PUBLISHED_FILES[stage]
        assert D.load_stage_data(stage, out / a, out / b) == published
        assert ours == published
        rows[stage] = ours
    return rows


# ------------------------------------------------------------------------------------------------ seeds
def test_load_seeds_and_split():
    s = S.load_seeds()
    assert set(s) == set(S.SEED_FILES)
    s["refusals"].clear()  # a copy: the next call is unaffected
    assert S.load_seeds()["refusals"]
    sizes = {"benign": (117, 39, 39), "malicious": (108, 36, 36), "contrast": (53, 17, 18)}
    for kind, n in sizes.items():
        parts = [S.split(kind, p) for p in S.SPLIT_PARTS]
        assert tuple(len(p) for p in parts) == n
        idx = [r["index"] for p in parts for r in p]
        assert sorted(idx) == list(range(len(s[kind])))  # disjoint and covering
        assert all(r["instruction"] == s[kind][r["index"]]["instruction"] for p in parts for r in p)
    # dev = the former held-out rows (i % 5 == 4), test carved from the former train rows (i % 5 == 2)
    assert [r["index"] for r in S.split("benign", "dev")][:3] == [4, 9, 14]
    assert [r["index"] for r in S.split("benign", "test")][:3] == [2, 7, 12]
    with pytest.raises(MoguError, match="unknown seed kind"):
        S.split("refusals", "train")
    with pytest.raises(MoguError, match="unknown split"):
        S.split("benign", "heldout")
    generic = S.generic_refusals()
    assert 5 <= len(generic) < len(S.load_seeds()["refusals"])
    assert not any("weapon" in r.lower() or "crisis" in r.lower() for r in generic)


def test_spread_and_pick():
    assert S.spread(range(10), None) == list(range(10))
    assert S.spread(range(10), 20) == list(range(10))
    assert S.spread(range(10), 3) == [0, 3, 6]
    train = S.split("malicious", "train")
    cats = {r["category"] for r in S.spread(train, 12)}
    assert len(cats) == 12  # a small limit still covers every category
    opts = ["a", "b", "c", "d"]
    assert S.pick(opts, 0, "x", "text") == S.pick(opts, 0, "x", "text")
    assert len({S.pick(opts, seed, "x", "text") for seed in range(20)}) > 1


def test_trim_response():
    assert S.trim_response("  Done here.  ", True) == "Done here."
    # cut by the length limit: keep whole sentences / lines
    assert S.trim_response("First do this. Then do th", False) == "First do this."
    assert S.trim_response("Steps:\n1. Preheat the oven.\n2. Mix the", False) == "Steps:\n1. Preheat the oven."
    assert S.trim_response("no sentence boundary at all", False) == "no sentence boundary at all"
    assert S.trim_response("Ends mid way. Finished anyway", True) == "Ends mid way. Finished anyway"
    # a loop is cut before its first repeated line
    assert S.trim_response("Items:\n- one can of tomatoes\n- one can of tomatoes\n- one", False) == \
        "Items:\n- one can of tomatoes"
    assert S.join_opening("Sure, here is", " how.") == "Sure, here is how."
    assert S.join_opening("Sure, here is", "how.") == "Sure, here is how."
    assert S.join_opening("Sure! Here are the steps:", "\n1. x") == "Sure! Here are the steps:\n1. x"


# ---------------------------------------------------------------------------------------------- stub builds
def test_full_build_counts_labels_and_layouts(tmp_path):
    seeds = S.load_seeds()
    mal_train, ben_train, con_train = (S.split(k, "train") for k in ("malicious", "benign", "contrast"))
    refuse = {mal_train[0]["instruction"], mal_train[5]["instruction"], ben_train[3]["instruction"],
              con_train[1]["instruction"]}
    out, summary, stub = build(tmp_path, stub=Stub(refuse=refuse))
    assert set(os.listdir(out)) == ALL_FILES
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no temp folder left beside it

    # each list generated once: benign, contrast, malicious (primed); no dev or test row is ever generated
    assert [c["n"] for c in stub.calls] == [117, 53, 108]
    assert stub.calls[2]["openings"] is not None and stub.calls[0]["openings"] is None
    eval_ins = {r["instruction"] for k in S.SPLIT_KINDS for p in S.EVAL_SPLITS for r in S.split(k, p)}
    assert not eval_ins & {i for c in stub.calls for i in c["instructions"]}

    rows = layouts_agree(out)
    assert len(rows["glad"]) == 108 - 2
    assert len(rows["unwilling"]) == 117 - 1
    assert len(rows["router"]) == (117 - 1) + (53 - 1) + 108
    assert summary["files"]["glad.jsonl"] == 106 and summary["files"]["router.jsonl"] == len(rows["router"])
    assert summary["stages"]["glad"]["dropped"] == {"refused": 2}
    assert summary["stages"]["unwilling"]["dropped"] == {"refused": 1}
    assert summary["stages"]["router"]["dropped"] == {"benign": {"refused": 1}, "contrast": {"refused": 1},
                                                      "benign_twins": {}, "borderline_train": {},
                                                      "wrapped_benign": {}, "malicious_train_twins": {},
                                                      "wrapped_train_twins": {}}
    assert sorted(d["instruction"] for d in summary["dropped"]) == sorted(refuse)
    assert all(d["reason"] == "refused" for d in summary["dropped"])
    assert json.load(open(out / "summary.json")) == {k: v for k, v in summary.items()
                                                     if k not in ("out_dir", "seconds")}

    # glad: primed affirmative = a bank opening + the continuation; refusal from the bank
    openings, refusals = seeds["affirmative_openings"], seeds["refusals"]
    for r in rows["glad"]:
        assert any(r["affirmative"].startswith(o + " a plan for it.") for o in openings)
        assert r["affirmative"].endswith("Step two is")  # finished (EOS): kept whole
        assert r["refusal"] in refusals
    # unwilling: the model's own answer, a generic refusal
    generic = S.generic_refusals()
    assert all(r["affirmative"].startswith("An answer about") and r["refusal"] in generic for r in rows["unwilling"])
    # router: benign + contrast answers label 0, malicious train -> refusal, label 1 (all of them, none dropped)
    mal_rows = [r for r in rows["router"] if r["label"] == 1]
    assert [r["instruction"] for r in mal_rows] == [r["instruction"] for r in mal_train]
    assert all(r["output"] in refusals for r in mal_rows)
    glad_ref = {r["instruction"]: r["refusal"] for r in rows["glad"]}
    assert all(glad_ref.get(r["instruction"], r["output"]) == r["output"] for r in mal_rows)
    benign_rows = [r for r in rows["router"] if r["label"] == 0]
    assert {r["instruction"] for r in benign_rows} == (
        {r["instruction"] for r in ben_train + con_train} - refuse)
    assert all(r["output"].startswith("An answer about") for r in benign_rows)
    assert json.load(open(out / "data_label.json")) == [r["label"] for r in rows["router"]]

    # evaluation prompts: one file per split, from that split's rows only
    templates = seeds["jailbreak_templates"]
    assert summary["eval"] == {
        "dev": {"harmful": 36, "jailbreak": 36, "benign": 39, "borderline": 17 + 150, "benign_twin": 36,
                "borderline_unsafe_twin": 17, "jailbreak_benign": 39},
        "test": {"harmful": 36, "jailbreak": 36, "benign": 39, "borderline": 18, "benign_twin": 36,
                 "borderline_unsafe_twin": 18, "jailbreak_benign": 0}}
    ids = set()
    for part in S.EVAL_SPLITS:
        prompts = E.load_prompts(out / f"{part}.jsonl")
        assert summary["files"][f"{part}.jsonl"] == len(prompts)
        by_kind = {k: [h for h in prompts if h["kind"] == k] for k in E.KINDS}
        mal, ben, con = (S.split(k, part) for k in ("malicious", "benign", "contrast"))
        assert [h["prompt"] for h in by_kind["harmful"]] == [r["instruction"] for r in mal]
        assert [h["prompt"] for h in by_kind["benign"]] == [r["instruction"] for r in ben]
        dev_only = [r["instruction"] for r in seeds["borderline_dev"]] if part == "dev" else []
        assert [h["prompt"] for h in by_kind["borderline"]] == [r["instruction"] for r in con] + dev_only
        twins = S.split("benign_twins", part)
        assert [h["prompt"] for h in by_kind["benign_twin"]] == [r["instruction"] for r in twins]
        assert [h["prompt"] for h in by_kind["jailbreak"]] == [
            templates[k % len(templates)].format(instruction=r["instruction"]) for k, r in enumerate(mal)]
        unsafe = S.split("contrast_unsafe", part)
        assert [h["prompt"] for h in by_kind["borderline_unsafe_twin"]] == [r["instruction"] for r in unsafe]
        assert [r["twin_of"] for r in unsafe] == [r["index"] for r in con]
        # dev also holds its benign rows in the jailbreak templates (to be answered); test leaves that kind to the
        # independent set
        assert [h["prompt"] for h in by_kind["jailbreak_benign"]] == ([
            templates[k % len(templates)].format(instruction=r["instruction"]) for k, r in enumerate(ben)]
            if part == "dev" else [])
        ids |= {h["id"] for h in prompts}
    assert len(ids) == summary["files"]["dev.jsonl"] + summary["files"]["test.jsonl"]  # ids unique over both


def test_finished_answers_are_kept_whole(tmp_path):
    _, _, _ = build(tmp_path, "cut", stub=Stub(finished=False), limit=2)
    _, _, _ = build(tmp_path, "whole", stub=Stub(finished=True), limit=2)
    cut = read_jsonl(tmp_path / "cut" / "unwilling.jsonl")
    whole = read_jsonl(tmp_path / "whole" / "unwilling.jsonl")
    assert all(r["affirmative"].endswith("follows here and") for r in whole)
    assert all(r["affirmative"].endswith(".") and "follows here" not in r["affirmative"] for r in cut)
    glad_cut = read_jsonl(tmp_path / "cut" / "glad.jsonl")
    assert all(r["affirmative"].endswith("Step one is easy.") for r in glad_cut)


def test_limit_spreads_rows(tmp_path):
    out, summary, stub = build(tmp_path, limit=5)
    assert [c["n"] for c in stub.calls] == [5, 5, 5]
    rows = layouts_agree(out)
    assert (len(rows["glad"]), len(rows["unwilling"]), len(rows["router"])) == (5, 5, 15)
    assert sum(r["label"] for r in rows["router"]) == 5
    # dev's borderline: the contrast rows and the dev-only borderline rows, each spread to the limit
    assert summary["eval"] == {p: {"harmful": 5, "jailbreak": 5, "benign": 5, "borderline": 5 * (1 + (p == "dev")),
                                   "benign_twin": 5, "borderline_unsafe_twin": 5, "jailbreak_benign": 5 * (p == "dev")}
                               for p in ("dev", "test")}
    mal_train = S.split("malicious", "train")
    cats = {r["category"] for r in mal_train if r["instruction"] in {g["instruction"] for g in rows["glad"]}}
    assert len(cats) == 5


def test_no_priming(tmp_path):
    out, _, stub = build(tmp_path, limit=3, prime_malicious=False)
    assert all(c["openings"] is None for c in stub.calls)
    assert all(r["affirmative"].startswith("An answer about") for r in read_jsonl(out / "glad.jsonl"))


def test_refusal_source_model(tmp_path):
    mal_train = S.split("malicious", "train")
    train = S.spread(mal_train, 4)
    stub = Stub(safety_refuses={train[0]["instruction"], train[2]["instruction"]})
    out, summary, _ = build(tmp_path, stub=stub, limit=4, refusal_source="model")
    assert [c["system"] for c in stub.calls] == [None, None, None, S.SAFETY_SYSTEM_PROMPT]
    glad = read_jsonl(out / "glad.jsonl")
    bank = S.load_seeds()["refusals"]
    assert [r["refusal"] == REFUSAL for r in glad] == [True, False, True, False]
    assert all(r["refusal"] in bank for r in glad[1::2])  # no clean refusal: the bank
    assert summary["refusals"]["model_used"] == 2 and summary["refusals"]["bank_fallback"] == 2
    router_mal = [r["output"] for r in read_jsonl(out / "router.jsonl") if r["label"] == 1]
    assert router_mal == [r["refusal"] for r in glad]


def test_deterministic_per_seed(tmp_path):
    a, _, _ = build(tmp_path, "a", limit=6, seed=3)
    b, _, _ = build(tmp_path, "b", limit=6, seed=3)
    c, _, _ = build(tmp_path, "c", limit=6, seed=4)
    assert files_of(a) == files_of(b)
    fa, fc = files_of(a), files_of(c)
    assert fa["glad.jsonl"] != fc["glad.jsonl"]  # other openings / refusals
    assert fa["dev.jsonl"] == fc["dev.jsonl"] and fa["test.jsonl"] == fc["test.jsonl"]  # nor do the evaluation sets
    # a row's choices do not depend on limit
    small = {r["instruction"]: r for r in read_jsonl(a / "glad.jsonl")}
    d, _, _ = build(tmp_path, "d", limit=12, seed=3)
    big = {r["instruction"]: r for r in read_jsonl(d / "glad.jsonl")}
    assert all(big[k] == v for k, v in small.items() if k in big)


def test_overwrite_and_atomic(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    stub = Stub()
    with pytest.raises(MoguError, match="overwrite"):
        S.build_data(None, None, None, out, generate_fn=stub, limit=2, progress=False)
    assert stub.calls == []  # refused before any generation
    assert os.listdir(out) == ["keep.txt"]
    S.build_data(None, None, None, out, generate_fn=stub, limit=2, progress=False, overwrite=True)
    assert set(os.listdir(out)) == ALL_FILES  # replaced as a whole

    # a failure mid-way leaves neither the output nor a temp folder
    def boom(instructions, system=None, openings=None):
        if openings is not None:
            raise RuntimeError("model crashed")
        return ["An answer."] * len(instructions)

    with pytest.raises(RuntimeError):
        S.build_data(None, None, None, tmp_path / "new", generate_fn=boom, limit=2, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["out"]
    # an empty existing folder is fine
    (tmp_path / "empty").mkdir()
    build(tmp_path, "empty", limit=1)
    assert set(os.listdir(tmp_path / "empty")) == ALL_FILES


def test_bad_input(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(MoguError, match="not a directory"):
        build(tmp_path, "file", limit=1)
    for kw, msg in [({"limit": 0}, "limit"), ({"batch_size": 0}, "batch_size"), ({"max_new_tokens": 0}, "max_new"),
                    ({"refusal_source": "web"}, "refusal source"), ({"template": "nope"}, "template"),
                    ({"seed": 1.5}, "seed")]:
        with pytest.raises(MoguError, match=msg):
            build(tmp_path, "bad", **kw)
    with pytest.raises(MoguError, match="needs a model"):
        S.build_data(None, None, None, tmp_path / "nomodel", progress=False)
    # a model that refuses everything leaves the glad stage empty: an error, not an empty file
    mal_train = S.split("malicious", "train")
    with pytest.raises(MoguError, match="glad stage has no rows"):
        build(tmp_path, "allrefused", stub=Stub(refuse={r["instruction"] for r in mal_train}), limit=3)
    # a generator that returns the wrong number of rows
    with pytest.raises(MoguError, match="returned 1 responses"):
        S.build_data(None, None, None, tmp_path / "short", generate_fn=lambda ins, **k: ["x"], limit=3,
                     progress=False)
    assert not any(n.startswith(".") or n in ("bad", "allrefused", "short", "nomodel") for n in os.listdir(tmp_path))


# ---------------------------------------------------------------------------------------- tiny real model
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from tiny_models import save_hf

    from mogu_jax import api
    d = tmp_path_factory.mktemp("tiny_llama")
    save_hf("llama_gqa", str(d))
    return api.load(str(d))


def test_tiny_model_build(tiny, tmp_path):
    cfg, params, tok = tiny
    kw = dict(limit=3, max_new_tokens=6, batch_size=4, progress=False, seed=1)
    summary = S.build_data(cfg, params, tok, tmp_path / "a", **kw)
    rows = layouts_agree(tmp_path / "a")
    dropped = {k: sum(v.values()) for k, v in (("glad", summary["stages"]["glad"]["dropped"]),
                                                ("unwilling", summary["stages"]["unwilling"]["dropped"]))}
    assert len(rows["glad"]) == 3 - dropped["glad"] and len(rows["unwilling"]) == 3 - dropped["unwilling"]
    openings = S.load_seeds()["affirmative_openings"]
    for r in rows["glad"]:  # opening + the model's continuation (gibberish words w0..w123)
        op = next(o for o in openings if r["affirmative"].startswith(o + " "))
        assert r["affirmative"][len(op) + 1:].split()[0].startswith("w")
    assert summary["settings"]["model"]["num_layers"] == cfg.num_layers
    # dev's borderline: the contrast rows and the dev-only borderline rows, each spread to the limit
    assert summary["eval"] == {p: {"harmful": 3, "jailbreak": 3, "benign": 3, "borderline": 3 * (1 + (p == "dev")),
                                   "benign_twin": 3, "borderline_unsafe_twin": 3, "jailbreak_benign": 3 * (p == "dev")}
                               for p in ("dev", "test")}
    # greedy: the same seed gives byte-identical files
    S.build_data(cfg, params, tok, tmp_path / "b", **kw)
    assert files_of(tmp_path / "a") == files_of(tmp_path / "b")


# ------------------------------------------------------------------------------------------- wrapped rows
def test_wrap_every_adds_wrapped_rows_of_both_labels_to_the_router_only(tmp_path):
    """``wrap_every``: every n-th benign and malicious train row reaches the router inside one of the train-only
    jailbreak wrappers (not the dev / test jailbreak templates), benign with the model's own answer to the wrapped
    prompt (label 0), malicious with the bare row's refusal (label 1); glad and unwilling are unchanged, and without
    the option nothing is wrapped."""
    templates = S.load_seeds()["jailbreak_train_templates"]
    assert not set(templates) & set(S.load_seeds()["jailbreak_templates"])
    plain, plain_summary, _ = build(tmp_path, "plain", limit=12)
    out, summary, stub = build(tmp_path, "wrapped", limit=12, wrap_every=3)
    for stage in ("glad.jsonl", "unwilling.jsonl"):
        assert read_jsonl(out / stage) == read_jsonl(plain / stage)
    before, after = read_jsonl(plain / "router.jsonl"), read_jsonl(out / "router.jsonl")
    assert after[: len(before)] == before
    extra = after[len(before):]
    benign = S.spread(S.split("benign", "train"), 12)[::3]
    malicious = S.spread(S.split("malicious", "train"), 12)[::3]
    assert [r["label"] for r in extra] == [0] * len(benign) + [1] * len(malicious)
    for j, (r, seed_row) in enumerate(zip(extra, benign + malicious)):
        t = j % len(templates) if j < len(benign) else (j - len(benign)) % len(templates)
        assert r["instruction"] == templates[t].format(instruction=seed_row["instruction"])
    refusal_of = {r["instruction"]: r["output"] for r in before if r["label"] == 1}
    for r, seed_row in zip(extra[len(benign):], malicious):
        assert r["output"] == refusal_of[seed_row["instruction"]]
    # the wrapped benign prompts were generated (one call of their own), the malicious ones need no generation
    wrapped_calls = [c for c in stub.calls if c["instructions"] == [r["instruction"] for r in extra[: len(benign)]]]
    assert len(wrapped_calls) == 1
    assert summary["stages"]["router"]["wrapped_benign"] == len(benign)
    assert summary["stages"]["router"]["wrapped_malicious"] == len(malicious)
    assert plain_summary["stages"]["router"]["wrapped_benign"] == 0 and plain_summary["settings"]["wrap_every"] is None
    layouts_agree(out)


@pytest.mark.parametrize("bad", [0, -2, 1.5, "3", True])
def test_wrap_every_refuses_bad_values(tmp_path, bad):
    with pytest.raises(MoguError, match="wrap_every must be a positive integer"):
        build(tmp_path, wrap_every=bad)
    assert not (tmp_path / "out").exists()


def test_wrapped_benign_prompts_load_as_an_evaluation_kind(tmp_path):
    """The dev file of benign requests in the seed jailbreak templates (README, the demo's levers table): the
    split's benign rows, each inside one template, of a kind the evaluation knows as 'should be answered'."""
    rows = S.wrapped_benign_prompts("dev")
    dev = S.split("benign", "dev")
    templates = S.load_seeds()["jailbreak_templates"]
    assert len(rows) == len(dev) == 39
    for k, (row, seed_row) in enumerate(zip(rows, dev)):
        assert row["prompt"] == templates[k % len(templates)].format(instruction=seed_row["instruction"])
    assert "jailbreak_benign" in E.USABLE_KINDS
    path = tmp_path / "dev_jb_benign.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded = E.load_prompts(str(path))
    assert [r["prompt"] for r in loaded] == [r["prompt"] for r in rows]
    assert {r["kind"] for r in loaded} == {"jailbreak_benign"}


def test_unsafe_twins_reach_the_router_with_refusals(tmp_path):
    """``unsafe_twins``: the contrast train rows' unsafe twins reach the router with a bank refusal (label 1), none
    is generated; the other files are unchanged; without the option none is trained on."""
    plain, plain_summary, _ = build(tmp_path, "plain", limit=12)
    out, summary, stub = build(tmp_path, "unsafe", limit=12, unsafe_twins=True)
    for name in ("glad.jsonl", "unwilling.jsonl", "dev.jsonl", "test.jsonl"):
        assert read_jsonl(out / name) == read_jsonl(plain / name)
    unsafe = S.spread(S.split("contrast_unsafe", "train"), 12)
    assert [u["twin_of"] for u in unsafe] == [c["index"] for c in S.spread(S.split("contrast", "train"), 12)]
    added = [r for r in read_jsonl(out / "router.jsonl") if r not in read_jsonl(plain / "router.jsonl")]
    assert [r["instruction"] for r in added] == [u["instruction"] for u in unsafe]
    assert {r["label"] for r in added} == {1} and all(r["output"] in S.load_seeds()["refusals"] for r in added)
    assert not {u["instruction"] for u in unsafe} & {i for c in stub.calls for i in c["instructions"]}
    assert summary["stages"]["router"]["unsafe_twins"] == len(unsafe) and summary["settings"]["unsafe_twins"]
    assert plain_summary["stages"]["router"]["unsafe_twins"] == 0
    layouts_agree(out)
    with pytest.raises(MoguError, match="unsafe_twins must be true or false"):
        build(tmp_path, "bad", unsafe_twins="yes")


def test_no_affirmatives_skips_the_glad_rows_only(tmp_path):
    """``affirmatives=False`` (a run without a glad stage): the malicious rows' primed answers are not generated
    and the glad files are empty; the unwilling and router files are the same."""
    plain, _, plain_stub = build(tmp_path, "plain", limit=12)
    out, summary, stub = build(tmp_path, "noglad", limit=12, affirmatives=False)
    assert not any(c["openings"] for c in stub.calls) and any(c["openings"] for c in plain_stub.calls)
    assert len(stub.calls) == len(plain_stub.calls) - 1
    assert read_jsonl(out / "glad.jsonl") == [] and summary["stages"]["glad"]["rows"] == 0
    for name in ("unwilling.jsonl", "router.jsonl", "dev.jsonl", "test.jsonl"):
        assert read_jsonl(out / name) == read_jsonl(plain / name)
    assert summary["settings"]["affirmatives"] is False


def test_twins_add_the_benign_twins_to_the_router_only(tmp_path):
    """``twins``: the benign twins of the malicious train rows reach the router with the model's own answers
    (label 0, one generation call of their own); glad and unwilling are unchanged; without the option no twin is
    trained on. The evaluation files hold each split's twins as the ``benign_twin`` kind either way."""
    plain, plain_summary, _ = build(tmp_path, "plain", limit=12)
    out, summary, stub = build(tmp_path, "twins", limit=12, twins=True)
    for stage in ("glad.jsonl", "unwilling.jsonl", "dev.jsonl", "test.jsonl"):
        assert read_jsonl(out / stage) == read_jsonl(plain / stage)
    twins = S.spread(S.split("benign_twins", "train"), 12)
    malicious = S.spread(S.split("malicious", "train"), 12)
    assert [t["twin_of"] for t in twins] == [m["index"] for m in malicious]  # limit keeps the pairs together
    router = read_jsonl(out / "router.jsonl")
    added = [r for r in router if r not in read_jsonl(plain / "router.jsonl")]
    assert [r["instruction"] for r in added] == [t["instruction"] for t in twins]
    assert {r["label"] for r in added} == {0}
    assert len([c for c in stub.calls if c["instructions"] == [t["instruction"] for t in twins]]) == 1
    assert summary["stages"]["router"]["benign_twins"] == len(twins) and summary["settings"]["twins"] is True
    assert plain_summary["stages"]["router"]["benign_twins"] == 0
    assert not any(r["instruction"] in {t["instruction"] for t in S.split("benign_twins", "train")}
                   for r in read_jsonl(plain / "router.jsonl"))
    for part in ("dev", "test"):
        rows = [r for r in read_jsonl(out / f"{part}.jsonl") if r["kind"] == "benign_twin"]
        assert [r["prompt"] for r in rows] == [t["instruction"] for t in S.spread(S.split("benign_twins", part), 12)]
    assert "benign_twin" in E.USABLE_KINDS
    layouts_agree(out)


def test_borderline_train_adds_the_train_only_rows_to_the_router_only(tmp_path):
    """``borderline_train``: the train-only safe-but-alarming rows reach the router with the model's own answers
    (label 0); glad, unwilling and the evaluation files are unchanged; without the option none is trained on, and
    no row of borderline_train.json is in any dev or test file."""
    plain, plain_summary, _ = build(tmp_path, "plain", limit=12)
    out, summary, stub = build(tmp_path, "borderline", limit=12, borderline_train=True)
    for stage in ("glad.jsonl", "unwilling.jsonl", "dev.jsonl", "test.jsonl"):
        assert read_jsonl(out / stage) == read_jsonl(plain / stage)
    rows = S.spread(S.load_seeds()["borderline_train"], 12)
    added = [r for r in read_jsonl(out / "router.jsonl") if r not in read_jsonl(plain / "router.jsonl")]
    assert [r["instruction"] for r in added] == [t["instruction"] for t in rows] and {r["label"] for r in added} == {0}
    assert len([c for c in stub.calls if c["instructions"] == [t["instruction"] for t in rows]]) == 1
    assert summary["stages"]["router"]["borderline_train"] == 12 and summary["settings"]["borderline_train"] is True
    assert plain_summary["stages"]["router"]["borderline_train"] == 0
    every = {r["instruction"] for r in S.load_seeds()["borderline_train"]}
    assert not every & {r["instruction"] for r in read_jsonl(plain / "router.jsonl")}
    assert not every & {r["prompt"] for part in ("dev", "test") for r in read_jsonl(out / f"{part}.jsonl")}
    layouts_agree(out)


def test_malicious_train_adds_the_train_only_rows_and_their_twins(tmp_path):
    """``malicious_train``: the train-only malicious rows reach the router with bank refusals (label 1, none
    generated) and their benign twins with the model's own answers (label 0); with ``wrap_every`` every n-th of each
    also inside a long train-only wrapper (the twin's answer generated for the wrapped prompt, the malicious row with
    the bare row's refusal); glad, unwilling and the evaluation files are unchanged; no row of either file is in a
    dev or test file."""
    plain, plain_summary, _ = build(tmp_path, "plain", limit=12, wrap_every=3)
    out, summary, stub = build(tmp_path, "extra", limit=12, wrap_every=3, malicious_train=True)
    for name in ("glad.jsonl", "unwilling.jsonl", "dev.jsonl", "test.jsonl"):
        assert read_jsonl(out / name) == read_jsonl(plain / name)
    seeds = S.load_seeds()
    mal = S.spread([dict(r, index=i) for i, r in enumerate(seeds["malicious_train"])], 12)
    twins = S.spread([dict(r, index=i) for i, r in enumerate(seeds["malicious_train_twins"])], 12)
    assert [t["twin_of"] for t in twins] == [m["index"] for m in mal]  # limit keeps the pairs together
    long_templates = seeds["jailbreak_train_long_templates"]
    before, after = read_jsonl(plain / "router.jsonl"), read_jsonl(out / "router.jsonl")
    assert [r for r in after if r in before] == before
    added = [r for r in after if r not in before]
    by_text = {r["instruction"]: r for r in added}
    for t in twins:
        assert by_text[t["instruction"]]["label"] == 0
    refusal_of = {}
    for m in mal:
        row = by_text[m["instruction"]]
        assert row["label"] == 1 and row["output"] in seeds["refusals"]
        refusal_of[m["instruction"]] = row["output"]
    wrapped_twins = [long_templates[j % len(long_templates)].format(instruction=t["instruction"])
                     for j, t in enumerate(twins[::3])]
    wrapped_mal = [(long_templates[j % len(long_templates)].format(instruction=m["instruction"]), m["instruction"])
                   for j, m in enumerate(mal[::3])]
    for w in wrapped_twins:
        assert by_text[w]["label"] == 0
    for w, bare in wrapped_mal:
        assert by_text[w]["label"] == 1 and by_text[w]["output"] == refusal_of[bare]
    assert len(added) == len(mal) + len(twins) + len(wrapped_twins) + len(wrapped_mal)
    generated = {i for c in stub.calls for i in c["instructions"]}
    assert {t["instruction"] for t in twins} | set(wrapped_twins) <= generated
    assert not ({m["instruction"] for m in mal} | {w for w, _ in wrapped_mal}) & generated
    r = summary["stages"]["router"]
    assert (r["malicious_train"], r["malicious_train_twins"]) == (len(mal), len(twins))
    assert (r["wrapped_train_twins"], r["wrapped_train_malicious"]) == (len(wrapped_twins), len(wrapped_mal))
    assert summary["settings"]["malicious_train"] is True and plain_summary["stages"]["router"]["malicious_train"] == 0
    every = {r["instruction"] for k in ("malicious_train", "malicious_train_twins") for r in seeds[k]}
    assert not every & {r["instruction"] for r in before}
    assert not every & {r["prompt"] for part in ("dev", "test") for r in read_jsonl(out / f"{part}.jsonl")}
    layouts_agree(out)
    with pytest.raises(MoguError, match="malicious_train must be true or false"):
        build(tmp_path, "bad", malicious_train="yes")


@pytest.mark.parametrize("bad", [1, "yes", None])
def test_twins_refuses_bad_values(tmp_path, bad):
    with pytest.raises(MoguError, match="twins must be true or false"):
        build(tmp_path, twins=bad)
    with pytest.raises(MoguError, match="borderline_train must be true or false"):
        build(tmp_path, borderline_train=bad)
    assert not (tmp_path / "out").exists()
