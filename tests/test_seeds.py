"""Checks on the seed instruction lists shipped as package data in ``mogu_jax.seeds``."""

import json
import re
from importlib import resources

import pytest

SEEDS = "mogu_jax.seeds"

CATEGORIES = {
    "weapons_explosives",
    "cybercrime",
    "fraud",
    "drugs",
    "violence",
    "hate_harassment",
    "privacy",
    "self_harm",
    "theft",
    "terrorism_extremism",
    "child_safety",
    "misinformation",
}
REFUSAL_KEYWORDS = ("I'm sorry", "I can't", "I cannot", "I won't", "I am unable")
SPLIT_KINDS = ("benign", "malicious", "contrast", "benign_twins", "contrast_unsafe")
#: seed lists without a split, used for training only / for the dev split only
TRAIN_ONLY_KINDS = ("borderline_train", "malicious_train", "malicious_train_twins")
DEV_ONLY_KINDS = ("borderline_dev",)
#: row ``i`` of a twin list (``twin_of`` = ``i``) pairs with row ``i`` of the list it twins
TWIN_OF = {"benign_twins": "malicious", "contrast_unsafe": "contrast", "malicious_train_twins": "malicious_train"}


def load(name):
    text = resources.files(SEEDS).joinpath(name).read_text(encoding="utf-8")
    return json.loads(text)


def norm(s):
    return " ".join(s.lower().split())


@pytest.fixture(scope="module")
def seeds():
    return {
        "benign": load("benign.json"),
        "malicious": load("malicious.json"),
        "contrast": load("contrast.json"),
        "benign_twins": load("benign_twins.json"),
        "contrast_unsafe": load("contrast_unsafe.json"),
        "borderline_dev": load("borderline_dev.json"),
        "borderline_train": load("borderline_train.json"),
        "malicious_train": load("malicious_train.json"),
        "malicious_train_twins": load("malicious_train_twins.json"),
        "templates": load("jailbreak_templates.json"),
        "train_templates": load("jailbreak_train_templates.json"),
        "long_train_templates": load("jailbreak_train_long_templates.json"),
        "refusals": load("refusals.json"),
        "openings": load("affirmative_openings.json"),
        "splits": load("splits.json"),
    }


TEMPLATE_KINDS = ("templates", "train_templates", "long_train_templates")


def indexed_strings(seeds):
    """Every text in the seed files, as ``(file key, row index, text)``."""
    out = []
    for kind in SPLIT_KINDS + DEV_ONLY_KINDS + TRAIN_ONLY_KINDS:
        out += [(kind, i, row["instruction"]) for i, row in enumerate(seeds[kind])]
    for kind in TEMPLATE_KINDS + ("refusals", "openings"):
        out += [(kind, i, s) for i, s in enumerate(seeds[kind])]
    return out


def all_strings(seeds):
    """Every text in the seed files, tagged by file."""
    return [(kind, s) for kind, _, s in indexed_strings(seeds)]


def paired_row(seeds, kind, i):
    """``(file key, index)`` of the row that row ``i`` of ``kind`` is paired with (the row it twins, or its twin),
    or None for a list without twins."""
    if kind in TWIN_OF:
        return TWIN_OF[kind], seeds[kind][i]["twin_of"]
    for twins, of in TWIN_OF.items():
        if of == kind:
            mine = [j for j, r in enumerate(seeds[twins]) if r["twin_of"] == i]
            assert len(mine) == 1, (kind, i, mine)
            return twins, mine[0]
    return None


def test_files_are_package_data():
    names = {p.name for p in resources.files(SEEDS).iterdir()}
    for name in (
        "benign.json",
        "malicious.json",
        "contrast.json",
        "benign_twins.json",
        "contrast_unsafe.json",
        "borderline_dev.json",
        "borderline_train.json",
        "malicious_train.json",
        "malicious_train_twins.json",
        "jailbreak_templates.json",
        "jailbreak_train_templates.json",
        "jailbreak_train_long_templates.json",
        "refusals.json",
        "affirmative_openings.json",
        "splits.json",
        "README.md",
    ):
        assert name in names


def test_counts(seeds):
    assert len(seeds["benign"]) >= 170
    assert len(seeds["malicious"]) >= 170
    assert len(seeds["contrast"]) >= 70
    assert len(seeds["benign_twins"]) == len(seeds["malicious"])
    assert len(seeds["contrast_unsafe"]) == len(seeds["contrast"])
    assert len(seeds["borderline_dev"]) == 150
    assert len(seeds["borderline_train"]) == 150
    assert len(seeds["malicious_train"]) == 96
    assert len(seeds["malicious_train_twins"]) == len(seeds["malicious_train"])
    assert 8 <= len(seeds["templates"]) <= 12
    assert len(seeds["long_train_templates"]) == 8
    assert len(seeds["refusals"]) >= 40
    assert len(seeds["openings"]) >= 20


def test_row_shapes(seeds):
    for row in seeds["benign"]:
        assert set(row) == {"instruction"}
    for row in seeds["malicious"]:
        assert set(row) == {"instruction", "category"}
    for row in seeds["contrast"]:
        assert set(row) == {"instruction", "trigger"}
    for row in seeds["borderline_dev"]:
        assert set(row) == {"instruction", "trigger", "shape"} and row["shape"] in ("question", "imperative")
        assert row["trigger"].lower() in row["instruction"].lower(), row
    for row in seeds["borderline_train"]:
        assert set(row) == {"instruction", "trigger"} and row["trigger"].lower() in row["instruction"].lower(), row
    imperative = [r for r in seeds["borderline_train"] if not r["instruction"].endswith("?")]
    assert len(imperative) >= 90  # the malicious seeds' shape, which the contrast rows (questions) lack
    for i, row in enumerate(seeds["benign_twins"]):
        assert set(row) == {"instruction", "twin_of"} and row["twin_of"] == i
    for i, (row, safe) in enumerate(zip(seeds["contrast_unsafe"], seeds["contrast"])):
        assert set(row) == {"instruction", "trigger", "twin_of"} and row["twin_of"] == i
        assert row["trigger"] == safe["trigger"] and row["trigger"].lower() in row["instruction"].lower(), row
    for row in seeds["malicious_train"]:
        assert set(row) == {"instruction", "category"}
    for i, row in enumerate(seeds["malicious_train_twins"]):
        assert set(row) == {"instruction", "twin_of"} and row["twin_of"] == i
    for kind in TEMPLATE_KINDS + ("refusals", "openings"):
        assert all(isinstance(s, str) for s in seeds[kind])


def test_text_hygiene(seeds):
    for kind, s in all_strings(seeds):
        assert s, kind
        assert s == s.strip(), (kind, s)
        assert "\n" not in s and "\r" not in s and "\t" not in s, (kind, s)
        assert "  " not in s, (kind, s)
        assert s.isascii(), (kind, s)


def test_instruction_lengths(seeds):
    for kind in SPLIT_KINDS:
        lengths = [len(row["instruction"].split()) for row in seeds[kind]]
        assert min(lengths) >= 3, kind
        assert max(lengths) <= 40, kind
        # mostly 5-25 words
        in_range = sum(5 <= n <= 25 for n in lengths)
        assert in_range / len(lengths) >= 0.9, kind


def test_no_duplicates_within_and_across_files(seeds):
    seen = {}
    for kind, s in all_strings(seeds):
        key = norm(s)
        assert key not in seen, f"duplicate {s!r} in {kind} (already in {seen.get(key)})"
        seen[key] = kind


def test_malicious_categories(seeds):
    counts = {}
    for row in seeds["malicious"]:
        assert row["category"] in CATEGORIES, row
        counts[row["category"]] = counts.get(row["category"], 0) + 1
    assert set(counts) == CATEGORIES
    assert min(counts.values()) >= 8, counts


def test_contrast_rows_contain_trigger(seeds):
    for row in seeds["contrast"]:
        assert row["trigger"], row
        assert row["trigger"].lower() in row["instruction"].lower(), row
    # enough distinct triggers to be a real contrast set
    assert len({row["trigger"].lower() for row in seeds["contrast"]}) >= 30


def test_templates_have_one_slot(seeds):
    assert len(seeds["train_templates"]) >= 10
    # the train-only wrappers are not the dev / test ones reworded
    assert max(jaccard(tokens(a), tokens(b)) for a in seeds["train_templates"] for b in seeds["templates"]) < 0.5
    for t in seeds["templates"] + seeds["train_templates"] + seeds["long_train_templates"]:
        assert t.count("{instruction}") == 1, t
        # no other format fields
        assert re.sub(r"\{instruction\}", "", t).count("{") == 0, t
        assert re.sub(r"\{instruction\}", "", t).count("}") == 0, t
        wrapped = t.format(instruction="Describe the moon.")
        assert "Describe the moon." in wrapped
        assert "{" not in wrapped


def test_refusals_start_with_refusal_keyword(seeds):
    for r in seeds["refusals"]:
        head = r[:40]
        assert any(k in head for k in REFUSAL_KEYWORDS), r


def test_refusals_distinct_from_openings(seeds):
    for o in seeds["openings"]:
        assert not any(k in o for k in REFUSAL_KEYWORDS), o


SPLIT_PARTS = ("train", "dev", "test")
#: rows per split part: dev = the former held-out rows (i % 5 == 4), test = i % 5 == 2, train = the rest
SPLIT_SIZES = {"benign": (117, 39, 39), "malicious": (108, 36, 36), "contrast": (53, 17, 18),
               "benign_twins": (108, 36, 36), "contrast_unsafe": (53, 17, 18)}


def tokens(s):
    return frozenset(re.findall(r"[a-z0-9']+", s.lower()))


def jaccard(a, b):
    return len(a & b) / len(a | b)


def test_splits_disjoint_covering_fixed(seeds):
    splits = seeds["splits"]
    for kind in SPLIT_KINDS:
        n = len(seeds[kind])
        assert set(splits[kind]) == set(SPLIT_PARTS), kind
        parts = [splits[kind][p] for p in SPLIT_PARTS]
        assert all(isinstance(i, int) for p in parts for i in p)
        assert tuple(len(p) for p in parts) == SPLIT_SIZES[kind]
        assert sorted(i for p in parts for i in p) == list(range(n)), kind  # disjoint and covering
        assert splits[kind]["dev"] == [i for i in range(n) if i % 5 == 4]
        assert splits[kind]["test"] == [i for i in range(n) if i % 5 == 2]


@pytest.mark.parametrize("twins,of", [("benign_twins", "malicious"), ("contrast_unsafe", "contrast")])
def test_twins_share_their_rows_split(seeds, twins, of):
    """A twin and its row are in the same split, so a dev or test row's form (a malicious row's) or alarming word
    (a contrast row's) never reaches training through its twin; and the loader refuses a splits file that parts
    them."""
    from mogu_jax import synth as S
    assert seeds["splits"][twins] == seeds["splits"][of]
    for part in SPLIT_PARTS:
        assert [t["twin_of"] for t in S.split(twins, part)] == [m["index"] for m in S.split(of, part)]
    broken = S.load_seeds()
    broken["splits"][twins]["dev"], broken["splits"][twins]["test"] = (
        broken["splits"][twins]["test"], broken["splits"][twins]["dev"])
    with pytest.raises(S.MoguError, match=f"same split as {of}"):
        S._check_seeds(broken)


def test_benign_twins_keep_the_malicious_form_not_its_words(seeds):
    """Twins share the malicious row's opening words (its form) but not its content words."""
    same_opening = sum(t["instruction"].split()[0] == m["instruction"].split()[0]
                       for t, m in zip(seeds["benign_twins"], seeds["malicious"]))
    assert same_opening >= 0.8 * len(seeds["malicious"])
    for t, m in zip(seeds["benign_twins"], seeds["malicious"]):
        assert jaccard(tokens(t["instruction"]), tokens(m["instruction"])) < 0.6, (t, m)


def test_malicious_dev_and_test_balanced_over_categories(seeds):
    for part in ("dev", "test"):
        counts = {}
        for i in seeds["splits"]["malicious"][part]:
            c = seeds["malicious"][i]["category"]
            counts[c] = counts.get(c, 0) + 1
        assert set(counts) == CATEGORIES and set(counts.values()) == {3}, (part, counts)


def test_no_near_duplicates_across_splits(seeds):
    """No two seed instructions in different splits (over all kinds; the dev-only borderline rows are dev, the
    train-only rows (borderline_train, malicious_train and its twins) train) share >= 80% of their word set."""
    rows = [("dev", "borderline_dev", r["instruction"]) for r in seeds["borderline_dev"]]
    rows += [("train", kind, r["instruction"]) for kind in TRAIN_ONLY_KINDS for r in seeds[kind]]
    for kind in SPLIT_KINDS:
        for part in SPLIT_PARTS:
            rows += [(part, kind, seeds[kind][i]["instruction"]) for i in seeds["splits"][kind][part]]
    toks = [tokens(r[2]) for r in rows]
    close = [(rows[a], rows[b]) for a in range(len(rows)) for b in range(a + 1, len(rows))
             if rows[a][0] != rows[b][0] and jaccard(toks[a], toks[b]) >= 0.8]
    assert not close, close[:5]
    # the measure catches a reworded near-copy
    assert jaccard(tokens("How do I kill a Python process?"), tokens("How do I kill a python process")) == 1.0


# ------------------------------------------------------------------------------------------- independent test set
INDEPENDENT_MIN = {"borderline": 150, "borderline_unsafe_twin": 100, "benign_plain": 100, "harmful_direct": 50,
                   "jailbreak_benign": 50, "jailbreak_harmful": 50}


@pytest.fixture(scope="module")
def independent():
    text = resources.files(SEEDS).joinpath("independent_test.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines()]


def test_independent_rows_and_counts(independent):
    ids = [r["id"] for r in independent]
    assert len(set(ids)) == len(ids)
    counts = {}
    for r in independent:
        assert set(r) <= {"id", "prompt", "kind", "twin", "request", "wrapper"}, r
        assert r["kind"] in INDEPENDENT_MIN, r
        counts[r["kind"]] = counts.get(r["kind"], 0) + 1
        p = r["prompt"]
        assert p == p.strip() and p.isascii() and "  " not in p and "\t" not in p, r
    for kind, n in INDEPENDENT_MIN.items():
        assert counts[kind] >= n, (kind, counts)
    assert len({norm(r["prompt"]) for r in independent}) == len(independent)  # no prompt twice


def test_independent_twins_point_to_matching_rows(independent):
    by_id = {r["id"]: r for r in independent}
    safe = [r for r in independent if r["kind"] == "borderline"]
    unsafe = [r for r in independent if r["kind"] == "borderline_unsafe_twin"]
    assert sum("twin" in r for r in safe) >= len(safe) * 2 // 3  # a matched unsafe twin for most
    for r in unsafe:  # every unsafe twin has its safe row, and the link goes both ways
        assert by_id[r["twin"]]["kind"] == "borderline" and by_id[r["twin"]]["twin"] == r["id"]
    for r in safe:
        if "twin" in r:
            assert by_id[r["twin"]]["kind"] == "borderline_unsafe_twin" and by_id[r["twin"]]["twin"] == r["id"]
    assert not any("twin" in r for r in independent if r["kind"] not in ("borderline", "borderline_unsafe_twin"))


def test_independent_jailbreaks_share_wrappers(independent):
    """Benign and harmful requests sit inside the same wrappers, and the wrappers are not the seed templates."""
    wrapped = {k: [r for r in independent if r["kind"] == k] for k in ("jailbreak_benign", "jailbreak_harmful")}
    wrappers = {}
    for rows in wrapped.values():
        for r in rows:
            assert r["request"] in r["prompt"] and len(r["prompt"]) > len(r["request"]) + 40, r
            wrappers.setdefault(r["wrapper"], set()).add(r["prompt"].replace(r["request"], "{}"))
    assert len(wrappers) >= 8 and all(len(v) == 1 for v in wrappers.values())  # one text per wrapper number
    assert {r["wrapper"] for r in wrapped["jailbreak_benign"]} == {r["wrapper"] for r in wrapped["jailbreak_harmful"]}


def test_independent_set_is_kept_out_of_every_seed_file(independent, seeds):
    """No exact or near duplicate (word-set Jaccard >= 0.8) of any seed instruction, template, refusal or opening,
    for the prompt and for the request inside a wrapper; the seed-built files (stage data, dev, test) only hold seed
    text, so they are kept clean too."""
    seed_texts = [s for _, s in all_strings(seeds)]
    seed_texts += [t.replace("{instruction}", "") for kind in TEMPLATE_KINDS for t in seeds[kind]]
    seed_toks = [tokens(s) for s in seed_texts]
    seed_norms = {norm(s) for s in seed_texts}
    close = []
    for r in independent:
        for text in {r["prompt"], r.get("request", r["prompt"])}:
            assert norm(text) not in seed_norms, r
            t = tokens(text)
            close += [(r["id"], s) for s, st in zip(seed_texts, seed_toks) if jaccard(t, st) >= 0.8]
    # the wrappers themselves are new: none is close to a seed template
    for r in independent:
        if "request" in r:
            w = tokens(r["prompt"].replace(r["request"], ""))
            close += [(r["id"], t[:40]) for kind in TEMPLATE_KINDS for t in seeds[kind]
                      if jaccard(w, tokens(t)) >= 0.5]
    assert not close, close[:5]


def test_independent_set_loads_for_evaluation(independent):
    """`mogu-jax eval CKPT --prompts <this file>` reads it, and the judge's kinds say refuse vs answer."""
    from mogu_jax import evaluate as E
    from mogu_jax import synth as S
    rows = E.load_prompts(S.independent_test_path())
    assert [r["id"] for r in rows] == [r["id"] for r in independent]
    assert set(S.INDEPENDENT_UNSAFE_KINDS) <= set(E.MALICIOUS_KINDS)
    assert set(S.INDEPENDENT_SAFE_KINDS) <= set(E.USABLE_KINDS)
    assert S.load_independent_test() == independent


@pytest.mark.parametrize("kind", ["borderline_train", "contrast_unsafe", "malicious_train", "malicious_train_twins"])
def test_new_rows_are_new_text(seeds, independent, kind):
    """The train-only borderline rows, the contrast rows' unsafe twins, the train-only malicious rows and their benign
    twins share under half their word set with every other seed instruction, template, refusal and opening (a row's
    own pair aside: an unsafe twin keeps its contrast row's alarming word, a benign twin its malicious_train row's
    opening), with the dev-only borderline rows and with every prompt of the independent set (and with each
    other)."""
    new = [tokens(r["instruction"]) for r in seeds[kind]]
    others = [(k, j, tokens(s)) for k, j, s in indexed_strings(seeds) if k != kind]
    others += [("independent", j, tokens(r["prompt"])) for j, r in enumerate(independent)]
    close = []
    for i, a in enumerate(new):
        mine = paired_row(seeds, kind, i)
        worst = max(((jaccard(a, b), k, j) for k, j, b in others if (k, j) != mine), key=lambda x: x[0])
        if worst[0] >= 0.5:
            close.append((i, worst))
    assert not close, close[:5]
    assert max(jaccard(new[i], new[j]) for i in range(len(new)) for j in range(i + 1, len(new))) < 0.5


# ------------------------------------------------------------------------------ train-only malicious rows, wrappers
CATEGORY_ORDER = ("weapons_explosives", "cybercrime", "fraud", "drugs", "violence", "hate_harassment", "privacy",
                  "self_harm", "theft", "terrorism_extremism", "child_safety", "misinformation")
QUESTION_WORDS = {"How", "What", "Where", "Which", "When"}
IMPERATIVES = {"List", "Describe", "Give", "Show", "Help", "Suggest", "Write", "Create", "Tell", "Explain"}


def test_malicious_train_categories_and_shapes(seeds):
    """8 rows per category, grouped in malicious.json's order; every row 5-25 words; about a third each of short
    direct questions, plain imperatives (not the malicious seeds' "Write a tutorial / guide") and first-person
    statements of intent."""
    order = []
    for row in seeds["malicious"]:
        if row["category"] not in order:
            order.append(row["category"])
    assert tuple(order) == CATEGORY_ORDER and set(order) == CATEGORIES
    rows = seeds["malicious_train"]
    assert [r["category"] for r in rows] == [c for c in CATEGORY_ORDER for _ in range(8)]
    for r in rows:
        assert 5 <= len(r["instruction"].split()) <= 25, r
        assert not r["instruction"].startswith(("Write a tutorial", "Write a guide")), r
    first = [r["instruction"].split()[0] for r in rows]
    questions = sum(w in QUESTION_WORDS for w in first)
    imperatives = sum(w in IMPERATIVES for w in first)
    statements = len(rows) - questions - imperatives
    assert min(questions, imperatives, statements) >= 24, (questions, imperatives, statements)
    assert all(r["instruction"].endswith("?") for r in rows if r["instruction"].split()[0] in QUESTION_WORDS)


ALARMING = {"kill", "killing", "murder", "attack", "steal", "stolen", "weapon", "weapons", "gun", "knife", "drug",
            "drugs", "hack", "poison", "bomb", "explosive", "shoot", "stab", "hurt", "injure", "fake", "scam"}


def test_malicious_train_twins_point_to_their_rows(seeds):
    """Twin ``i`` keeps malicious_train row ``i``'s opening word and about its length, but not its content words,
    and has no alarming word."""
    for i, (t, m) in enumerate(zip(seeds["malicious_train_twins"], seeds["malicious_train"])):
        assert t["twin_of"] == i
        tw, mw = t["instruction"].split(), m["instruction"].split()
        assert tw[0] == mw[0], (t, m)
        assert 5 <= len(tw) <= 25 and abs(len(tw) - len(mw)) <= 8, (t, m)
        assert jaccard(tokens(t["instruction"]), tokens(m["instruction"])) < 0.6, (t, m)
        assert not tokens(t["instruction"]) & ALARMING, t


def test_long_train_templates(seeds, independent):
    """8 long train-only wrappers (45-90 words), one slot each, in other words than the evaluation templates, the
    short train wrappers, the independent set's wrappers and each other (word-set Jaccard < 0.5); the slot is not
    always at the end."""
    long = seeds["long_train_templates"]
    wrappers = {r["wrapper"]: r["prompt"].replace(r["request"], "") for r in independent if "wrapper" in r}
    refs = seeds["templates"] + seeds["train_templates"] + list(wrappers.values())
    for t in long:
        assert t.count("{instruction}") == 1, t
        assert 45 <= len(t.split()) <= 90, (len(t.split()), t)
        assert max(jaccard(tokens(t), tokens(r)) for r in refs) < 0.5, t
    assert max(jaccard(tokens(a), tokens(b)) for i, a in enumerate(long) for b in long[i + 1:]) < 0.5
    assert sum(not t.rstrip().endswith("{instruction}") for t in long) >= 4
