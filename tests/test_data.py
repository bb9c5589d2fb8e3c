"""Training data pipeline: loaders, validation, tokenisation/masking, buckets, order, resume, multi-host."""

import json

import numpy as np
import pytest

from mogu_jax import data as D
from mogu_jax.errors import MoguError
from mogu_jax.templates import encode_prompt, format_prompt
from tests.tiny_models import make_tokenizer

EOS_ID = 2


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def words(rng, lo, hi):
    return " ".join(f"w{int(i)}" for i in rng.randint(5, 120, size=rng.randint(lo, hi + 1)))


def make_pair_rows(n, seed=0, lo=1, hi=30):
    rng = np.random.RandomState(seed)
    return [{"instruction": words(rng, 1, 6), "affirmative": words(rng, lo, hi), "refusal": words(rng, lo, hi)}
            for _ in range(n)]


def make_router_rows(n, seed=0, lo=1, hi=30):
    rng = np.random.RandomState(seed)
    return [{"instruction": words(rng, 1, 6), "output": words(rng, lo, hi), "label": int(rng.randint(2))}
            for _ in range(n)]


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f)
    return str(path)


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def write_published_pairs(d, rows, names=("affirm.json", "reject.json")):
    a = write_json(d / names[0], [{"instruction": r["instruction"], "output": r["affirmative"]} for r in rows])
    b = write_json(d / names[1], [{"instruction": r["instruction"], "output": r["refusal"]} for r in rows])
    return a, b


def write_published_router(d, rows, names=("data_normal.json", "data_label.json")):
    a = write_json(d / names[0], [{"instruction": r["instruction"], "output": r["output"]} for r in rows])
    b = write_json(d / names[1], [r["label"] for r in rows])
    return a, b


# ------------------------------------------------------------------------------------------------------------
# loading
# ------------------------------------------------------------------------------------------------------------

def test_published_and_jsonl_layouts_load_identical_rows(tmp_path):
    pairs = make_pair_rows(7)
    a, b = write_published_pairs(tmp_path, pairs, D.PUBLISHED_FILES["glad"])
    j = write_jsonl(tmp_path / "glad.jsonl", pairs)
    assert D.load_pairs(a, b) == pairs
    assert D.load_pairs_jsonl(j) == pairs
    assert D.load_stage_data("glad", a, b) == pairs
    assert D.load_stage_data("unwilling", [a, b]) == pairs
    assert D.load_stage_data("glad", j) == pairs
    assert D.load_stage_data("glad", str(tmp_path)) == pairs  # folder with the published names

    router = make_router_rows(9)
    n, l = write_published_router(tmp_path, router)
    rj = write_jsonl(tmp_path / "router.jsonl", router)
    assert D.load_router(n, l) == router
    assert D.load_router_jsonl(rj) == router
    assert D.load_stage_data("router", n, l) == D.load_stage_data("router", rj) == router
    assert D.load_stage_data("router", str(tmp_path)) == router
    # a JSON list in our layout loads too; extra fields are ignored
    extra = [dict(r, source="x") for r in router]
    assert D.load_router_jsonl(write_json(tmp_path / "router_list.json", extra)) == router


def _err(fn, *args, **kwargs):
    with pytest.raises(MoguError) as e:
        fn(*args, **kwargs)
    return str(e.value)


def test_each_stage_file_is_read_once(tmp_path, monkeypatch):
    """Loading reads and parses every file once (no second pass through another library)."""
    import mogu_jax.io_utils as io_utils
    reads = []
    real = io_utils.read_text_file

    def counting(path, *a, **k):
        reads.append(str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(io_utils, "read_text_file", counting)
    rows = make_router_rows(5)
    normal, labels = write_published_router(tmp_path, rows)
    assert D.load_stage_data("router", tmp_path) == rows
    assert sorted(reads) == sorted([normal, labels])
    reads.clear()
    pairs = make_pair_rows(4)
    assert D.load_stage_data("glad", write_jsonl(tmp_path / "glad.jsonl", pairs)) == pairs
    assert reads == [str(tmp_path / "glad.jsonl")]


def test_pair_alignment_errors(tmp_path):
    rows = make_pair_rows(4)
    a, b = write_published_pairs(tmp_path, rows)
    short = write_json(tmp_path / "short.json", [{"instruction": r["instruction"], "output": r["refusal"]}
                                                 for r in rows[:3]])
    msg = _err(D.load_pairs, a, short)
    assert "not row-aligned" in msg and "affirm.json has 4 rows" in msg and "short.json has 3" in msg

    swapped = [{"instruction": r["instruction"], "output": r["refusal"]} for r in rows]
    swapped[2]["instruction"] = "w9 w9 w9"
    msg = _err(D.load_pairs, a, write_json(tmp_path / "swapped.json", swapped))
    assert "row 3 has instruction" in msg and '"w9 w9 w9"' in msg and "swapped.json" in msg
    # whitespace-only differences are the same instruction
    ws = [{"instruction": "  " + r["instruction"] + "\n", "output": r["refusal"]} for r in rows]
    assert D.load_pairs(a, write_json(tmp_path / "ws.json", ws)) == rows


def test_router_label_errors(tmp_path):
    rows = make_router_rows(5)
    n, l = write_published_router(tmp_path, rows)
    msg = _err(D.load_router, n, write_json(tmp_path / "l4.json", [0, 1, 0, 1]))
    assert "l4.json has 4 labels" in msg and "data_normal.json has 5 rows" in msg
    for bad, shown in (([0, 1, 2, 0, 1], "2"), ([0, 1, "1", 0, 1], '"1"'), ([0, 1, True, 0, 1], "true"),
                       ([0, 1, 0.5, 0, 1], "0.5"), ([0, 1, None, 0, 1], "missing")):
        path = write_json(tmp_path / "bad_labels.json", bad)
        msg = _err(D.load_router, n, path)
        assert msg == f"{path}: row 3: label must be 0 (benign) or 1 (malicious), got {shown}"
    msg = _err(D.load_router, n, write_json(tmp_path / "objs.json", [{"label": 0}] * 5))
    assert "row 1: expected a label 0 or 1" in msg
    bad = [dict(r) for r in rows]
    bad[1]["label"] = 3
    path = write_jsonl(tmp_path / "r.jsonl", bad)
    assert _err(D.load_router_jsonl, path) == f"{path}: row 2: label must be 0 (benign) or 1 (malicious), got 3"
    del bad[1]["label"]
    path = write_jsonl(tmp_path / "r2.jsonl", bad)
    assert "r2.jsonl: row 2: missing field 'label'" in _err(D.load_router_jsonl, path)


def test_field_errors(tmp_path):
    rows = make_pair_rows(3)
    bad = [dict(r) for r in rows]
    bad[1]["instruction"] = "   "
    p = write_jsonl(tmp_path / "a.jsonl", bad)
    assert _err(D.load_pairs_jsonl, p) == f"{p}: row 2: empty 'instruction'"
    bad = [dict(r) for r in rows]
    bad[2]["refusal"] = ""
    p = write_jsonl(tmp_path / "b.jsonl", bad)
    assert _err(D.load_pairs_jsonl, p) == f"{p}: row 3: empty 'refusal'"
    bad = [dict(r) for r in rows]
    del bad[0]["refusal"]
    p = write_jsonl(tmp_path / "c.jsonl", bad)
    assert _err(D.load_pairs_jsonl, p).startswith(f"{p}: row 1: missing field 'refusal' (each row needs")
    bad = [dict(r) for r in rows]
    bad[1]["affirmative"] = 5
    p = write_jsonl(tmp_path / "d.jsonl", bad)
    assert _err(D.load_pairs_jsonl, p) == f"{p}: row 2: field 'affirmative' must be a string, got int"
    # published layout: empty output / missing output
    p = write_json(tmp_path / "e.json", [{"instruction": "w5", "output": "w6"}, {"instruction": "w7", "output": " "}])
    assert _err(D.load_pairs, p, p) == f"{p}: row 2: empty 'output'"
    p = write_json(tmp_path / "f.json", [{"instruction": "w5"}])
    assert "f.json: row 1: missing field 'output'" in _err(D.load_pairs, p, p)
    # JSONL row numbers with blank lines also give the line
    p = tmp_path / "g.jsonl"
    p.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(dict(rows[1], instruction="")) + "\n")
    assert _err(D.load_pairs_jsonl, str(p)) == f"{p}: row 2 (line 3): empty 'instruction'"
    # wrong layout for the stage: router rows where pairs are expected
    p = write_jsonl(tmp_path / "h.jsonl", make_router_rows(2))
    assert "row 1: missing field 'affirmative'" in _err(D.load_stage_data, "glad", p)


def test_file_errors(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('[{"instruction": "w5", "output": "w6"},\n {"instruction": "w7" "output": "w8"}]')
    assert _err(D.load_pairs_jsonl, str(p)).startswith(f"{p}: invalid JSON at line 2 column")
    p = tmp_path / "bad.jsonl"
    p.write_text('{"instruction": "w5", "affirmative": "w6", "refusal": "w7"}\n{"instruction": \n')
    assert _err(D.load_pairs_jsonl, str(p)).startswith(f"{p}: invalid JSON at line 2 column")
    p = tmp_path / "empty.json"
    p.write_text("  \n")
    assert _err(D.load_pairs_jsonl, str(p)) == f"{p}: file is empty"
    p = tmp_path / "emptylist.json"
    p.write_text("[]")
    assert _err(D.load_pairs, str(p), str(p)) == f"{p}: contains no rows"
    p = tmp_path / "nullrow.json"  # pyarrow segfaults on this one; the structural check must catch it first
    p.write_text('[null, {"instruction": "w5", "output": "w6"}]')
    assert _err(D.load_pairs, str(p), str(p)) == f"{p}: row 1: expected a JSON object with fields, got null"
    p = tmp_path / "obj.json"
    p.write_text('{"instruction": "w5",\n "output": "w6"}')
    assert "invalid JSON at line 1" in _err(D.load_pairs, str(p), str(p))
    p = tmp_path / "big.json"  # valid JSON, parsed once: a field the stage does not use is ignored, whatever it holds
    p.write_text('[{"instruction": "w5", "output": "w6", "id": 123456789012345678901234567890}]')
    assert D.load_pairs(str(p), str(p)) == [{"instruction": "w5", "affirmative": "w6", "refusal": "w6"}]
    p = tmp_path / "intins.json"
    p.write_text('[{"instruction": 12345678901234567890123, "output": "w6"}]')
    assert _err(D.load_pairs, str(p), str(p)) == f"{p}: row 1: field 'instruction' must be a string, got int"
    assert _err(D.load_pairs_jsonl, str(tmp_path / "nope.jsonl")) == f"{tmp_path / 'nope.jsonl'}: no such file"


def test_stage_dispatch_errors(tmp_path):
    assert "unknown training stage 'gald'" in _err(D.load_stage_data, "gald", "x")
    assert "got 3 paths" in _err(D.load_stage_data, "glad", "a", "b", "c")
    msg = _err(D.load_stage_data, "router", str(tmp_path))
    assert "data_normal.json and data_label.json" in msg and "missing data_normal.json, data_label.json" in msg


# ------------------------------------------------------------------------------------------------------------
# tokenisation
# ------------------------------------------------------------------------------------------------------------

def test_masking_named_template_no_eos(tok):
    ins, resp = "w10 w11 w12", "w20 w21 w22 w23"
    ex = D.tokenize_example(tok, ins, resp, template="falcon")
    prompt = tok(format_prompt(tok, ins, "falcon"), add_special_tokens=False)["input_ids"]
    resp_ids = tok(resp, add_special_tokens=False)["input_ids"]
    assert len(resp_ids) == 4
    assert ex.tokens.dtype == np.int32 and ex.loss_mask.dtype == bool
    assert ex.tokens.tolist() == prompt + resp_ids
    assert ex.length == len(prompt) + 4 and ex.prompt_len == len(prompt)
    assert ex.loss_mask.tolist() == [False] * len(prompt) + [True] * 4
    assert EOS_ID not in ex.tokens.tolist() and not ex.truncated

    # a template that starts with the BOS text: exactly one BOS
    ex = D.tokenize_example(tok, ins, resp, template="llama2-chat")
    text = format_prompt(tok, ins, "llama2-chat")
    assert text.startswith("<s>[INST] <<SYS>>\n")
    assert ex.tokens.tolist() == encode_prompt(tok, text) + resp_ids
    assert ex.tokens.tolist().count(tok.bos_token_id) == 1 and ex.tokens[0] == tok.bos_token_id
    assert ex.loss_mask.sum() == 4 and ex.loss_mask[-4:].all()


def test_masking_chat_template(tok):
    rows = [{"instruction": "w10 w11", "affirmative": "w30 w31 w32", "refusal": "w40"}]
    data = D.tokenize_stage("glad", rows, tok)  # no template: the tokenizer's chat template
    text = format_prompt(tok, "w10 w11")
    assert text == "user w10 w11 w1 "
    prompt = tok(text, add_special_tokens=False)["input_ids"]
    a, r = data.affirm[0], data.refusal[0]
    assert a.tokens.tolist() == prompt + tok("w30 w31 w32", add_special_tokens=False)["input_ids"]
    assert r.tokens.tolist() == prompt + [tok.convert_tokens_to_ids("w40")]
    assert a.loss_mask.tolist() == [False] * len(prompt) + [True] * 3
    assert r.loss_mask.tolist() == [False] * len(prompt) + [True]


def test_refusal_eos(tok):
    """data.refusal_eos: the refusal targets (pairs' refusal, router label-1 output) end with the tokenizer's EOS
    id exactly when on; nothing else changes."""
    assert tok.eos_token_id == EOS_ID
    pairs = make_pair_rows(6, seed=3)
    router = make_router_rows(12, seed=4)
    assert {r["label"] for r in router} == {0, 1}
    for stage, rows in (("glad", pairs), ("unwilling", pairs), ("router", router)):
        off = D.tokenize_stage(stage, rows, tok, template="falcon")
        on = D.tokenize_stage(stage, rows, tok, template="falcon", refusal_eos=True)
        if stage == "router":
            refusal = [(a, b) for a, b, lab in zip(off.examples, on.examples, off.labels) if lab == 1]
            other = [(a, b) for a, b, lab in zip(off.examples, on.examples, off.labels) if lab == 0]
        else:
            refusal, other = list(zip(off.refusal, on.refusal)), list(zip(off.affirm, on.affirm))
        for a, b in refusal:
            assert a.tokens[-1] != EOS_ID and b.tokens[-1] == EOS_ID
            assert b.tokens.tolist() == a.tokens.tolist() + [EOS_ID]
            assert b.loss_mask.tolist() == a.loss_mask.tolist() + [True]  # the EOS is a predicted target
        for a, b in other:
            assert a.tokens.tolist() == b.tokens.tolist() and EOS_ID not in b.tokens.tolist()
    # off by default (the published setting); a config override turns it on
    from mogu_jax.train_config import load_config
    assert load_config("glad")["data"]["refusal_eos"] is False
    assert load_config("glad", None, ["data.refusal_eos=true"])["data"]["refusal_eos"] is True
    assert "true or false" in _err(lambda: D.tokenize_stage("glad", pairs, tok, refusal_eos="yes"))


def test_truncation_counted_and_fully_cut_response_is_an_error(tok):
    rows = [{"instruction": "w5", "affirmative": "w6 " * n, "refusal": "w7 " * m} for n, m in
            ((3, 3), (20, 2), (30, 40), (1, 1))]
    data = D.tokenize_stage("unwilling", rows, tok, template="falcon", max_len=16)
    p = data.affirm[0].prompt_len
    assert data.num_truncated == 3  # row 2 affirmative, row 3 both halves
    s = data.summary()
    assert s["truncated"] == 3 and s["affirm"]["truncated"] == 2 and s["refusal"]["truncated"] == 1
    assert s["affirm"]["max_length"] == 16
    assert data.affirm[1].length == 16 and data.affirm[1].loss_mask.sum() == 16 - p
    assert data.affirm[1].full_length == p + 20

    long = "w8 " * 20
    msg = _err(lambda: D.tokenize_stage("unwilling", rows[:1] + [dict(rows[0], instruction=long)], tok,
                                        template="falcon", max_len=16, source="safety.jsonl"))
    assert msg.startswith("safety.jsonl: unwilling row 2 (affirmative): the prompt alone is")
    assert "max_len=16" in msg


def test_summary_and_labels(tok):
    rows = make_router_rows(10)
    data = D.tokenize_stage("router", rows, tok, template="vicuna")
    s = data.summary()
    assert s["examples"] == 10 and s["labels"]["malicious"] == sum(r["label"] for r in rows)
    assert s["labels"]["benign"] == 10 - s["labels"]["malicious"]
    assert s["sequences"]["tokens"] == sum(ex.length for ex in data.examples)
    loader = D.StageLoader(data, 4)
    line = D.format_summary(loader.summary())
    assert line.startswith("router: 10 examples; 0 truncated at 1024 tokens") and "3 steps/epoch of 4" in line


# ------------------------------------------------------------------------------------------------------------
# batching, order, resume, multi-host
# ------------------------------------------------------------------------------------------------------------

BUCKETS = (8, 16, 32)


@pytest.fixture(scope="module")
def pair_data(tok):
    return D.tokenize_stage("glad", make_pair_rows(37, seed=1, hi=40), tok, template="falcon", max_len=40)


@pytest.fixture(scope="module")
def router_data(tok):
    return D.tokenize_stage("router", make_router_rows(29, seed=2, hi=40), tok, template="falcon", max_len=40)


def all_batches(loader, n=None):
    out = []
    for b in loader:
        out.append(b)
        if n is not None and len(out) == n:
            break
    return out


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        flat_x = {k: v for k, v in x.items() if not isinstance(v, dict)}
        flat_y = {k: v for k, v in y.items() if not isinstance(v, dict)}
        assert flat_x.keys() == flat_y.keys()
        for k in flat_x:
            np.testing.assert_array_equal(flat_x[k], flat_y[k])
        for k in ("affirm", "refusal"):
            if k in x:
                for f in ("tokens", "loss_mask", "attn_mask"):
                    np.testing.assert_array_equal(x[k][f], y[k][f])


def check_seq(batch_part, seq, rows, weight, buckets, pad_id):
    tokens, lm, am = batch_part["tokens"], batch_part["loss_mask"], batch_part["attn_mask"]
    assert tokens.dtype == np.int32 and lm.dtype == bool and am.dtype == bool
    assert tokens.shape[1] in buckets and tokens.shape == lm.shape == am.shape
    real_max = max(seq[i].length for i, w in zip(rows, weight) if w > 0)
    assert tokens.shape[1] == min(b for b in buckets if b >= real_max)
    for r, i in enumerate(rows):
        ex = seq[i]
        np.testing.assert_array_equal(tokens[r, :ex.length], ex.tokens)
        np.testing.assert_array_equal(lm[r, :ex.length], ex.loss_mask)
        assert am[r, :ex.length].all() and not am[r, ex.length:].any() and not lm[r, ex.length:].any()
        assert (tokens[r, ex.length:] == pad_id).all()
        assert lm[r].any()  # every row, padding rows too, has response tokens


def test_bucket_shapes_and_padding_rows(pair_data, router_data):
    assert D.resolve_buckets(D.DEFAULT_BUCKETS, 300) == (64, 128, 256, 300)
    assert D.resolve_buckets(BUCKETS, 40) == (8, 16, 32, 40)
    buckets = (8, 16, 32, 40)
    loader = D.StageLoader(pair_data, 8, seed=3, buckets=BUCKETS, num_epochs=1)
    assert loader.steps_per_epoch == 5 and loader.num_examples == 37
    shapes = set()
    for step in range(loader.steps_per_epoch):
        idx = loader.batch_indices(0, step)
        b = loader.get_batch(0, step)
        rows = list(idx) + [idx[0]] * (8 - len(idx))
        assert b["weight"].dtype == np.float32 and b["weight"].tolist() == [1.0] * len(idx) + [0.0] * (8 - len(idx))
        for k, seq in (("affirm", pair_data.affirm), ("refusal", pair_data.refusal)):
            assert b[k]["tokens"].shape[0] == 8
            check_seq(b[k], seq, rows, b["weight"], buckets, pair_data.pad_id)
        shapes.add((b["affirm"]["tokens"].shape[1], b["refusal"]["tokens"].shape[1]))
    assert len(idx) == 5  # 37 = 4 * 8 + 5: the short batch is last, padded with weight-0 rows
    assert len(shapes) > 1 and all(s in buckets for sh in shapes for s in sh)

    loader = D.StageLoader(router_data, 8, seed=0, buckets=BUCKETS)
    seen = []
    for step in range(loader.steps_per_epoch):
        idx = loader.batch_indices(0, step)
        b = loader.get_batch(0, step)
        assert set(b) == {"tokens", "loss_mask", "attn_mask", "label", "weight"}
        rows = list(idx) + [idx[0]] * (8 - len(idx))
        check_seq(b, router_data.examples, rows, b["weight"], buckets, router_data.pad_id)
        assert b["label"].dtype == np.int32 and b["label"].tolist() == router_data.labels[rows].tolist()
        seen.extend(idx.tolist())
    assert sorted(seen) == list(range(29))  # every example exactly once per epoch


def test_grouping_reduces_padding(pair_data):
    grouped = D.StageLoader(pair_data, 4, seed=0, buckets=BUCKETS).summary()["epoch0_padding"]
    plain = D.StageLoader(pair_data, 4, seed=0, buckets=BUCKETS, group_batches=1).summary()["epoch0_padding"]
    assert grouped < plain


def test_determinism_and_seed(pair_data):
    a = all_batches(D.StageLoader(pair_data, 8, seed=5, buckets=BUCKETS, num_epochs=2))
    b = all_batches(D.StageLoader(pair_data, 8, seed=5, buckets=BUCKETS, num_epochs=2))
    assert len(a) == 10
    assert_batches_equal(a, b)
    l5, l6 = (D.StageLoader(pair_data, 8, seed=s, buckets=BUCKETS) for s in (5, 6))
    o5 = [l5.batch_indices(0, i).tolist() for i in range(5)]
    assert o5 != [l6.batch_indices(0, i).tolist() for i in range(5)]
    assert o5 != [l5.batch_indices(1, i).tolist() for i in range(5)]  # epochs differ too
    # no shuffle: data order
    l = D.StageLoader(pair_data, 8, shuffle=False)
    assert np.concatenate([l.batch_indices(0, i) for i in range(5)]).tolist() == list(range(37))


def test_exact_resume_across_epoch_boundary(pair_data, router_data):
    for data in (pair_data, router_data):
        kw = dict(seed=11, buckets=BUCKETS, num_epochs=3)
        full = all_batches(D.StageLoader(data, 6, **kw))
        steps = D.StageLoader(data, 6, **kw).steps_per_epoch
        for k in (2, steps - 1, steps, steps + 1):  # within, at and just after the epoch boundary
            first = D.StageLoader(data, 6, **kw)
            head = all_batches(first, k)
            state = json.loads(json.dumps(first.state()))
            resumed = D.StageLoader.from_state(data, state, buckets=BUCKETS, num_epochs=3)
            assert resumed.global_step == k
            assert_batches_equal(head + all_batches(resumed), full)
            other = D.StageLoader(data, 6, **kw).skip_to((state["epoch"], state["step"]))
            assert_batches_equal(all_batches(other), full[k:])


def test_resume_guards(pair_data, router_data):
    l = D.StageLoader(pair_data, 6, seed=1)
    state = l.state()
    assert set(state) >= {"epoch", "step"}
    assert "batch_size=6 but this run has batch_size=4" in _err(D.StageLoader.from_state, pair_data, state,
                                                                 batch_size=4)
    assert "seed=1 but this run has seed=2" in _err(D.StageLoader.from_state, pair_data, state, seed=2)
    assert "differ from the run" in _err(D.StageLoader.from_state, pair_data, state, group_batches=2)
    assert "out of range" in _err(l.skip_to, (0, 99))


@pytest.mark.parametrize("stage_fixture", ["pair_data", "router_data"])
def test_multihost_slices_concatenate_to_single_process_batch(stage_fixture, request):
    data = request.getfixturevalue(stage_fixture)
    kw = dict(seed=4, buckets=BUCKETS, num_epochs=2)
    single = all_batches(D.StageLoader(data, 8, **kw))
    parts = [all_batches(D.StageLoader(data, 8, process_index=p, process_count=2, **kw)) for p in range(2)]
    assert len(parts[0]) == len(parts[1]) == len(single)
    for s, b0, b1 in zip(single, parts[0], parts[1]):
        assert b0["weight"].shape == (4,)
        merged = {}
        for k in s:
            if isinstance(s[k], dict):
                merged[k] = {f: np.concatenate([b0[k][f], b1[k][f]]) for f in s[k]}
            else:
                merged[k] = np.concatenate([b0[k], b1[k]])
        assert_batches_equal([merged], [s])
    # the resume position is global: a 2-process state resumes a 1-process run and vice versa
    l = D.StageLoader(data, 8, process_index=1, process_count=2, **kw)
    all_batches(l, 3)
    assert_batches_equal(all_batches(D.StageLoader.from_state(data, l.state(), buckets=BUCKETS, num_epochs=2)),
                         single[3:])
    msg = _err(lambda: D.StageLoader(data, 6, process_count=4))
    assert "global batch size 6 is not divisible by the process count 4" in msg
    assert "out of range" in _err(lambda: D.StageLoader(data, 8, process_index=2, process_count=2))


def test_balanced_labels(router_data, pair_data):
    """balance_labels: every full batch holds the labels in the data's proportion, each epoch covers every
    example once, the order is a pure function of (seed, epoch), and resuming mid-epoch continues it."""
    labels = np.asarray(router_data.labels)
    share = labels.mean()
    loader = D.StageLoader(router_data, 8, seed=0, buckets=BUCKETS, balance_labels=True)
    for epoch in range(2):
        seen = []
        for step in range(loader.steps_per_epoch):
            idx = loader.batch_indices(epoch, step)
            if len(idx) == 8:
                assert abs(labels[idx].sum() - share * 8) <= 1.0
            seen.extend(idx.tolist())
        assert sorted(seen) == list(range(len(labels)))
    assert not np.array_equal(loader.batch_indices(0, 0), loader.batch_indices(1, 0))
    again = D.StageLoader(router_data, 8, seed=0, buckets=BUCKETS, balance_labels=True)
    assert_batches_equal(all_batches(again, 5), all_batches(loader.skip_to((0, 0)), 5))
    resumed = D.StageLoader.from_state(router_data, loader.skip_to((1, 2)).state(), batch_size=8, seed=0,
                                       buckets=BUCKETS, balance_labels=True)
    assert_batches_equal(all_batches(resumed, 3), all_batches(D.StageLoader(router_data, 8, seed=0, buckets=BUCKETS,
                                                              balance_labels=True).skip_to((1, 2)), 3))
    plain = D.StageLoader(router_data, 8, seed=0, buckets=BUCKETS)
    assert plain.fingerprint() != loader.fingerprint()
    with pytest.raises(MoguError, match="balance_labels needs labelled data"):
        D.StageLoader(pair_data, 8, balance_labels=True)


def test_balanced_labels_per_bucket(tok):
    """balance_labels with rows in two length buckets: no batch mixes buckets (a few long rows do not pad the
    others' batches), each full batch holds its bucket's label proportion, every example comes once per epoch,
    steps_per_epoch counts the batches, and with one bucket the order is the plain interleave of both labels."""
    rng = np.random.RandomState(5)
    short = [{"instruction": words(rng, 1, 3), "output": words(rng, 1, 4), "label": i % 3 == 0} for i in range(37)]
    long = [{"instruction": words(rng, 14, 18), "output": words(rng, 8, 10), "label": i % 2} for i in range(13)]
    rows = [dict(r, label=int(r["label"])) for r in short + long]
    data = D.tokenize_stage("router", rows, tok, template="falcon", max_len=64)
    labels = np.asarray(data.labels)
    lengths = np.asarray([ex.length for ex in data.examples])
    buckets = (16, 64)
    assert lengths[:37].max() <= 16 < lengths[37:].min()
    loader = D.StageLoader(data, 8, seed=0, buckets=buckets, balance_labels=True)
    batches = loader.epoch_batches(0)
    assert loader.steps_per_epoch == len(batches) == -(-37 // 8) + -(-13 // 8)
    assert sorted(np.concatenate(batches).tolist()) == list(range(50))
    for idx in batches:
        long_rows = idx >= 37
        assert long_rows.all() or not long_rows.any()
        if len(idx) == 8:
            part = labels[37:] if long_rows.all() else labels[:37]
            assert abs(labels[idx].sum() - part.mean() * 8) <= 1.0
        assert loader.make_batch(idx)["tokens"].shape[1] == (64 if long_rows.all() else 16)
    # the long bucket's batches are spread over the epoch, not all at its end
    where = [j for j, idx in enumerate(batches) if idx[0] >= 37]
    assert where[0] < len(batches) // 2
    assert loader.fingerprint() != D.StageLoader(data, 8, seed=0, buckets=(64,), balance_labels=True).fingerprint()
    # one bucket: each label's rows shuffled, then interleaved evenly over the epoch
    single = D.StageLoader(data, 8, seed=0, buckets=(64,), balance_labels=True)
    r = np.random.Generator(np.random.PCG64(np.random.SeedSequence([0, 0])))
    idx, key = [], []
    for value in (0, 1):
        part = np.flatnonzero(labels == value)
        part = part[np.argsort(r.random(len(part)), kind="stable")]
        idx.append(part)
        key.append((np.arange(len(part)) + 0.5) / len(part))
    idx, key = np.concatenate(idx), np.concatenate(key)
    order = idx[np.lexsort((idx, key))]
    assert_batches_equal([single.make_batch(b) for b in single.epoch_batches(0)],
                         [single.make_batch(order[i:i + 8]) for i in range(0, 50, 8)])


def test_label_weights_balanced(router_data, pair_data):
    """label_weights="balanced": each example weighs N / (2 N_label), so over an epoch both labels weigh the same;
    padding rows still weigh 0; the batches are otherwise unchanged; bad values and unlabelled data are refused."""
    labels = np.asarray(router_data.labels)
    n1 = int(labels.sum())
    assert 0 < n1 < len(labels) and 2 * n1 != len(labels)  # unbalanced data
    plain = D.StageLoader(router_data, 8, seed=0, buckets=BUCKETS, balance_labels=True)
    weighted = D.StageLoader(router_data, 8, seed=0, buckets=BUCKETS, balance_labels=True, label_weights="balanced")
    totals = {0: 0.0, 1: 0.0}
    for step in range(weighted.steps_per_epoch):
        a, b = plain.get_batch(0, step), weighted.get_batch(0, step)
        np.testing.assert_array_equal(a["tokens"], b["tokens"])
        for w0, w, lab in zip(a["weight"], b["weight"], b["label"]):
            if w0 == 0:
                assert w == 0
                continue
            expected = len(labels) / (2 * (n1 if lab else len(labels) - n1))
            np.testing.assert_allclose(w, expected, rtol=1e-6)
            totals[int(lab)] += float(w)
    np.testing.assert_allclose(totals[0], totals[1], rtol=1e-5)
    assert plain.fingerprint() != weighted.fingerprint()
    with pytest.raises(MoguError, match="label_weights must be null or 'balanced'"):
        D.StageLoader(router_data, 8, label_weights="equal")
    with pytest.raises(MoguError, match="label_weights needs labelled data"):
        D.StageLoader(pair_data, 8, label_weights="balanced")
