"""Batched KV-cache generation (mogu_jax.generate) and prompt templates (mogu_jax.templates)."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mogu_jax import generate as G  # noqa: E402
from mogu_jax import model as M  # noqa: E402
from mogu_jax import templates as T  # noqa: E402
from mogu_jax.convert.hf import params_from_torch  # noqa: E402
from mogu_jax.errors import MoguError  # noqa: E402

VOCAB = 128
PROMPTS = [[5, 17, 99, 3, 42, 8, 61], [7, 7, 120], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [33]]


@pytest.fixture(scope="module")
def tiny():
    """A random GQA Llama in transformers (the reference) and the same weights as our params."""
    torch.manual_seed(0)
    hcfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, initializer_range=0.1,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    hf = transformers.LlamaForCausalLM(hcfg).eval()
    cfg, params = params_from_torch(hf)
    return cfg, params, hf


def hf_greedy(hf, prompts, max_new, eos=None):
    """HF generate, left-padded with an attention mask; rows cut after their first EOS."""
    width = max(map(len, prompts))
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    att = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.tensor(p)
        att[r, width - len(p):] = 1
    hf.generation_config.eos_token_id = eos
    with torch.inference_mode():
        out = hf.generate(input_ids=ids, attention_mask=att, max_new_tokens=max_new, do_sample=False,
                          pad_token_id=0, eos_token_id=eos)
    rows = []
    for row in out[:, width:].tolist():
        if eos is not None and eos in row:
            row = row[: row.index(eos) + 1]
        rows.append(row)
    return rows


def test_greedy_matches_hf_and_per_row_eos(tiny):
    cfg, params, hf = tiny
    n = 12
    ours = G.generate(cfg, params, PROMPTS, max_new_tokens=n, eos_ids=())
    ref = hf_greedy(hf, PROMPTS, n)
    assert ours.tokens == ref
    assert ours.steps == n and not any(ours.finished)

    # an EOS that some rows emit early and others never: those rows stop, the rest run on
    eos = next((t for t in ref[0][1:6] if any(t not in row for row in ref[1:])), None)
    assert eos is not None, ref
    ours = G.generate(cfg, params, PROMPTS, max_new_tokens=n, eos_ids=(eos,), pad_id=0)
    ref_eos = hf_greedy(hf, PROMPTS, n, eos=eos)
    assert ours.tokens == ref_eos
    assert ours.finished == [eos in row for row in ref_eos]
    assert ours.finished[0] and not all(ours.finished)
    assert all(len(row) == n for row, f in zip(ours.tokens, ours.finished) if not f)


def test_all_rows_stop_early(tiny):
    cfg, params, _ = tiny
    free = G.generate(cfg, params, PROMPTS[:2], max_new_tokens=16, eos_ids=())
    eos = {free.tokens[0][1], free.tokens[1][2]}
    out = G.generate(cfg, params, PROMPTS[:2], max_new_tokens=16, eos_ids=tuple(eos))
    assert all(out.finished)
    assert out.steps == max(len(r) for r in out.tokens) < 16
    for row, ref in zip(out.tokens, free.tokens):
        assert row == ref[: len(row)] and row[-1] in eos


def _reference_forward(params, tokens, positions, kv_mask, cache, cache_index, cfg=None):
    return M.apply(cfg, params, tokens, positions, kv_mask, cache, cache_index, last_only=True)


def test_cached_decoding_equals_full_recomputation(tiny):
    cfg, params, _ = tiny
    n = 10
    out = G.generate(cfg, params, PROMPTS, max_new_tokens=n, eos_ids=(), return_logits=True)
    full = jax.jit(lambda p, t, pos, m: M.apply(cfg, p, t, pos, m)[0][:, -1])
    worst = 0.0
    for i in range(n):
        seqs = [p + row[:i] for p, row in zip(PROMPTS, out.tokens)]
        width = max(map(len, seqs))
        toks = np.zeros((len(seqs), width), np.int32)
        mask = np.zeros((len(seqs), width), bool)
        for r, s in enumerate(seqs):
            toks[r, width - len(s):] = s
            mask[r, width - len(s):] = True
        pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
        ref = np.asarray(full(params, toks, pos, mask))
        got = np.stack([lg[i] for lg in out.logits])
        worst = max(worst, float(np.max(np.abs(got - ref))))
    assert worst <= 1e-4, worst


def test_pluggable_forward_and_scan_model_agree(tiny):
    """A plain forward function (here the stacked-cache base model) runs in the same loop with the same result."""
    import functools

    cfg, params, _ = tiny
    fwd = functools.partial(_reference_forward, cfg=cfg)
    a = G.generate(cfg, params, PROMPTS, max_new_tokens=8, eos_ids=(), forward=fwd)
    b = G.generate(cfg, params, PROMPTS, max_new_tokens=8, eos_ids=(), forward=G.scan_forward(cfg))
    c = G.generate(cfg, params, PROMPTS, max_new_tokens=8, eos_ids=())
    assert a.tokens == b.tokens == c.tokens


def test_no_recompilation_within_buckets(tiny):
    cfg, params, _ = tiny
    G.generate(cfg, params, [[1, 2, 3, 4, 5], [9] * 9], max_new_tokens=10, eos_ids=())
    before = G.compile_count()
    # other prompt lengths, max_new_tokens, sampling settings, EOS ids and pad id in the same buckets
    G.generate(cfg, params, [[3, 4, 5], [6] * 12], max_new_tokens=16, temperature=0.8, top_p=0.9, seed=3,
               eos_ids=(7,))
    G.generate(cfg, params, [[8] * 16, [1]], max_new_tokens=11, temperature=0.0, eos_ids=(2, 5), pad_id=1)
    assert G.compile_count() == before
    G.generate(cfg, params, [[8] * 2], max_new_tokens=3, temperature=1.5, top_p=0.5, seed=9)  # batch bucket 1
    before = G.compile_count()
    G.generate(cfg, params, [[4] * 7], max_new_tokens=9, temperature=0.3)
    assert G.compile_count() == before
    G.generate(cfg, params, [[4] * 65], max_new_tokens=9)  # a longer prompt bucket compiles both again
    assert G.compile_count() == before + 2
    assert G.bucket(3, 16) == 16 and G.bucket(17, 16) == 32 and G.bucket(3, 1) == 4
    # prompt buckets: 2^k and 3 x 2^(k-1) from 32 on (at most a third of a bucket padding)
    assert [G.prompt_bucket(x) for x in (1, 32, 33, 48, 49, 64, 65, 96, 97, 129, 300)] == \
        [32, 32, 48, 48, 64, 64, 96, 96, 128, 192, 384]


def test_forced_tokens_continue_as_the_prompt_plus_them_in_the_same_compilations(tiny):
    """``forced``: the given first tokens, then the model's greedy continuation of prompt + those tokens (per row,
    other counts, none for some rows), in the compilations of the prompts alone; an EOS among them ends the row."""
    cfg, params, _ = tiny
    forced = [[9, 10], [], [3], [100, 101, 102]]
    n = 10
    G.generate(cfg, params, PROMPTS, max_new_tokens=n, eos_ids=())
    before = G.compile_count()
    got = G.generate(cfg, params, PROMPTS, max_new_tokens=n, eos_ids=(), forced=forced)
    assert G.compile_count() == before
    for p, f, row in zip(PROMPTS, forced, got.tokens):
        rest = G.generate(cfg, params, [p + f], max_new_tokens=n - len(f), eos_ids=()).tokens[0]
        assert row == f + rest
    ended = G.generate(cfg, params, PROMPTS[:1], max_new_tokens=n, eos_ids=(10,), forced=forced[:1])
    assert ended.tokens == [[9, 10]] and ended.finished == [True]
    with pytest.raises(MoguError, match="more forced tokens than max_new_tokens=1"):
        G.generate(cfg, params, PROMPTS[:1], max_new_tokens=1, forced=forced[:1])
    with pytest.raises(MoguError, match="1 rows of forced tokens for 4 prompts"):
        G.generate(cfg, params, PROMPTS, max_new_tokens=n, forced=forced[:1])


def test_sampling(tiny):
    cfg, params, _ = tiny
    kw = dict(max_new_tokens=16, eos_ids=())
    a = G.generate(cfg, params, PROMPTS, temperature=5.0, seed=1, **kw)
    b = G.generate(cfg, params, PROMPTS, temperature=5.0, seed=1, **kw)
    c = G.generate(cfg, params, PROMPTS, temperature=5.0, seed=2, **kw)
    assert a.tokens == b.tokens
    assert a.tokens != c.tokens
    greedy = G.generate(cfg, params, PROMPTS, **kw)
    nucleus = G.generate(cfg, params, PROMPTS, temperature=1.0, top_p=1e-6, seed=4, **kw)
    assert nucleus.tokens == greedy.tokens
    assert a.tokens != greedy.tokens


def test_bad_inputs(tiny):
    cfg, params, _ = tiny
    with pytest.raises(MoguError, match="at least one token"):
        G.generate(cfg, params, [[1, 2], []])
    with pytest.raises(MoguError, match="vocabulary"):
        G.generate(cfg, params, [[1, VOCAB]])
    with pytest.raises(MoguError, match="top_p"):
        G.generate(cfg, params, [[1]], top_p=0.0)
    assert G.generate(cfg, params, [[1]], max_new_tokens=0).tokens == [[]]
    assert G.generate(cfg, params, []).tokens == []


# ------------------------------------------------------------------------------------------- templates
LLAMA2_SYS = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being safe. "
    "Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal content. "
    "Please ensure that your responses are socially unbiased and positive in nature.\n\nIf a question does not make "
    "any sense, or is not factually coherent, explain why instead of answering something not correct. If you don't "
    "know the answer to a question, please don't share false information.")


def test_named_templates_exact():
    ins = "Tell me a joke."
    assert T.format_prompt(None, ins, "llama2-chat") == (
        "<s>[INST] <<SYS>>\n" + LLAMA2_SYS + "\n<</SYS>>\n\nTell me a joke.[/INST]")
    assert T.format_prompt(None, ins, "vicuna") == (
        "<s> A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: Tell me a joke. ASSISTANT:")
    assert T.format_prompt(None, ins, "falcon") == "User: Tell me a joke.\n\nAssistant:"
    assert T.format_prompt(None, ins, "llama2-chat", system="Be brief.") == (
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nTell me a joke.[/INST]")
    with pytest.raises(MoguError) as e:
        T.format_prompt(None, ins, "alpaca")
    assert all(name in str(e.value) for name in ("llama2-chat", "vicuna", "falcon"))


@pytest.fixture(scope="module")
def word_tokenizer():
    """A tiny word-level fast tokenizer that adds <s> like Llama's, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = ["<unk>", "<s>", "</s>", "<pad>"] + ["hello", "world", "User:", "Assistant:", "tell", "me", "a", "joke",
                                                 "[INST]", "[/INST]", "hi"]
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>", pad_token="<pad>")
    return fast


def test_encode_prompt_single_bos(word_tokenizer):
    tok = word_tokenizer
    assert T.encode_prompt(tok, "hello world") == [1, 4, 5]
    assert T.encode_prompt(tok, "<s> hello world") == [1, 4, 5]
    assert T.format_prompt(tok, "hello") == "hello"  # no chat template: the raw instruction
    tok2 = transformers.PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, bos_token="<s>",
                                                eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
    tok2.chat_template = ("{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"
                          "{% if add_generation_prompt %} Assistant:{% endif %}")
    assert T.format_prompt(tok2, "hello") == "[INST] hello [/INST] Assistant:"
    assert T.format_prompt(tok2, "hello", "falcon") == "User: hello\n\nAssistant:"


def test_generate_text(tiny, word_tokenizer):
    cfg, params, _ = tiny
    tok = word_tokenizer
    instructions = ["hello world", "tell me a joke", "hi"]
    res = G.generate_text(cfg, params, tok, instructions, template="falcon", batch_size=2, max_new_tokens=5,
                          eos_ids=(), progress=False)
    assert len(res) == 3 and all(r["tokens"] == 5 for r in res)
    for ins, r in zip(instructions, res):
        ids = T.encode_prompt(tok, T.format_prompt(tok, ins, "falcon"))
        want = G.generate(cfg, params, [ids], max_new_tokens=5, eos_ids=()).tokens[0]
        assert r["response"] == tok.decode(want, skip_special_tokens=True)


def test_even_batches_pad_at_most_one_row_per_batch():
    sizes = lambda n, b: [len(x) for x in G.even_batches(range(n), b)]  # noqa: E731
    assert sizes(129, 32) == [26, 26, 26, 26, 25]  # not 4 x 32 + a batch of 32 rows for one prompt
    assert sizes(117, 32) == [30, 30, 30, 27]
    assert sizes(64, 32) == [32, 32] and sizes(5, 8) == [5] and sizes(0, 8) == []
    assert G.call_buckets(G.even_batches(range(129), 32)) == {"min_batch": 26}
    # with the caller's batch size, every call of at least that many rows takes it (calls share compilations)
    assert G.call_buckets(G.even_batches(range(129), 32), batch_size=32) == {"min_batch": 32}
    assert G.call_buckets(G.even_batches(range(5), 32), batch_size=32) == {"min_batch": 5}
    # with the call's prompts: the tokens they all start with, prefilled once per batch from 8 shared tokens on
    assert G.call_buckets([[0, 1]], [[1] * 9 + [2], [1] * 9 + [3, 4]]) == {"min_batch": 2, "shared_prefix": 9}
    assert G.call_buckets([[0, 1]], [[1] * 7 + [2], [1] * 7 + [3]]) == {"min_batch": 2, "shared_prefix": 0}
    assert G.call_buckets([[0]], [[1] * 20]) == {"min_batch": 1, "shared_prefix": 0}  # one prompt: nothing shared
    assert [i for b in G.even_batches(range(50), 7) for i in b] == list(range(50))  # order kept, nothing lost


def test_generate_text_compiles_once_per_prompt_bucket(tiny, word_tokenizer):
    """A call's batches share one batch shape: 6 prompts at batch_size 4 go as two even batches of 3 (not 4 + 2)
    and, in one prompt bucket, compile the prefill and decode once; a longer prompt bucket compiles once more.
    The answers equal one-by-one generation."""
    cfg, params, _ = tiny
    tok = word_tokenizer
    long = " ".join(["hello world"] * 32)
    G.clear_caches()
    before = G.compile_count()
    short = ["hi", "tell me a joke", "hello", "hi hi", "hello world", "me"]
    res = G.generate_text(cfg, params, tok, short, template="falcon", batch_size=4, max_new_tokens=4,
                          eos_ids=(), progress=False)
    assert G.compile_count() == before + 2  # prefill + decode, for both batches of 3 rows
    both = short[:4] + [long, long + " hi"]  # batches: 3 short prompts (bucket 64); 1 short + 2 long (bucket 128)
    res2 = G.generate_text(cfg, params, tok, both, template="falcon", batch_size=4, max_new_tokens=4,
                           eos_ids=(), progress=False)
    assert G.compile_count() == before + 4
    for ins, r in list(zip(short, res)) + list(zip(both, res2)):
        ids = T.encode_prompt(tok, T.format_prompt(tok, ins, "falcon"))
        want = G.generate(cfg, params, [ids], max_new_tokens=4, eos_ids=()).tokens[0]
        assert r["response"] == tok.decode(want, skip_special_tokens=True)


def test_shared_prefix_prefilled_once_gives_the_same_generation(tiny):
    """Prompts that start with the same 10 tokens (a system prompt): with shared_prefix they are prefilled once
    as one row and the rows continue from the broadcast cache. Tokens, logits and (routed, with the handoff)
    router weights equal the per-row prefill, for the unrolled, scan and routed decode models, at fewer FLOPs;
    a shared_prefix the prompts do not share is refused."""
    from mogu_jax import mogu as mogu_lib

    cfg, params, _ = tiny
    head = [11, 12, 13, 14, 15, 16, 17, 18, 19, 20]
    prompts = [head + p for p in PROMPTS]
    mogu = mogu_lib.init_mogu(cfg, 0, params)
    key = jax.random.PRNGKey(1)
    for name in ("glad", "unwilling"):
        mogu[name]["B"] = 0.1 * jax.random.normal(key, mogu[name]["B"].shape)
    mogu["router"] = jax.tree_util.tree_map(lambda x: x + 0.3 * jax.random.normal(key, x.shape), mogu["router"])
    cases = [(params, {}), (params, {"forward": G.scan_forward(cfg)}),
             (mogu, {"mode": "routed", "routed_tokens": 3}), (mogu, {"mode": "unwilling"})]
    assert G.common_prefix(prompts) == 10 and G.common_prefix([head, head + [1]]) == 9
    for p, kw in cases:
        runs = {}
        for s in (0, 10):
            before = G.FLOPS_DONE[0]
            runs[s] = G.generate(cfg, p, prompts, max_new_tokens=8, eos_ids=(), return_logits=True,
                                 shared_prefix=s, **kw), G.FLOPS_DONE[0] - before
        (a, fa), (b, fb) = runs[0], runs[10]
        assert a.tokens == b.tokens, kw
        for x, y in zip(a.logits, b.logits):
            np.testing.assert_allclose(x, y, atol=1e-4)
        if a.router is not None:
            for x, y in zip(a.router, b.router):
                np.testing.assert_allclose(x["a"], y["a"], atol=1e-5)
        assert fb < fa
    with pytest.raises(MoguError, match="share their first 10 tokens"):
        G.generate(cfg, params, prompts, max_new_tokens=2, shared_prefix=11)


def test_generate_text_prefills_the_system_prompt_once(tiny, word_tokenizer):
    """generate_text finds the tokens every prompt starts with (here a template's system prompt) and prefills
    them once per batch: the same answers as per-row prefill (shared_prefix=0), fewer FLOPs."""
    cfg, params, _ = tiny
    instructions = ["hello world", "tell me a joke", "hi", "hello hello world world"]
    system = "hello world " * 6
    runs = {}
    for kw in ({}, {"shared_prefix": 0}):
        before = G.FLOPS_DONE[0]
        res = G.generate_text(cfg, params, word_tokenizer, instructions, template="vicuna", system=system,
                              batch_size=4, max_new_tokens=5, eos_ids=(), **kw)
        runs[bool(kw)] = [r["response"] for r in res], G.FLOPS_DONE[0] - before
    encoded = [T.encode_prompt(word_tokenizer, T.format_prompt(word_tokenizer, i, "vicuna", system))
               for i in instructions]
    assert G.common_prefix(encoded) >= G.MIN_SHARED_PREFIX
    assert runs[False][0] == runs[True][0] and runs[False][1] < runs[True][1]


def _strong_mogu(cfg, params, seed: int):
    """MoGU params with branches and routers far enough from their init to route differently per row, and prompts
    that share a 10-token head (a system prompt)."""
    from mogu_jax import mogu as mogu_lib

    mogu = mogu_lib.init_mogu(cfg, 0, params)
    key = jax.random.PRNGKey(seed)
    for name in ("glad", "unwilling"):
        mogu[name]["B"] = 0.3 * jax.random.normal(key, mogu[name]["B"].shape)
    mogu["router"] = jax.tree_util.tree_map(lambda x: x + 1.0 * jax.random.normal(key, x.shape), mogu["router"])
    head = [11, 12, 13, 14, 15, 16, 17, 18, 19, 20]
    return mogu, [head + p for p in PROMPTS] + [head + [40, 41, 42], head + [90] * 5]


def test_router_gated_handoff_keeps_unwilling_rows_routed(tiny):
    """handoff "router": after m routed tokens a row whose mean unwilling weight a over them reaches the gate stays
    routed (its tokens equal routing every token), every other row continues with the base model (its tokens equal
    the published fixed handoff); with a shared prefix too; FLOPs between the two; a bad handoff is refused."""
    cfg, params, _ = tiny
    mogu, prompts = _strong_mogu(cfg, params, 2)
    m, n = 3, 12
    routed = G.generate(cfg, mogu, prompts, max_new_tokens=n, eos_ids=(), mode="routed")
    fixed = G.generate(cfg, mogu, prompts, max_new_tokens=n, eos_ids=(), mode="routed", routed_tokens=m)
    mean_a = np.asarray([r["a"][:m].mean() for r in routed.router])
    gate = float(np.median(mean_a))
    keep = mean_a >= gate
    assert keep.any() and not keep.all()
    assert [a[:m] for a in routed.tokens] == [a[:m] for a in fixed.tokens]
    assert any(a != b for a, b in zip(routed.tokens, fixed.tokens))
    for shared in (0, 10):
        before = G.FLOPS_DONE[0]
        gated = G.generate(cfg, mogu, prompts, max_new_tokens=n, eos_ids=(), mode="routed", routed_tokens=m,
                           forward=G.RouterGatedHandoff(cfg, threshold=gate), shared_prefix=shared)
        flops = G.FLOPS_DONE[0] - before
        for r, k in enumerate(keep):
            assert gated.tokens[r] == (routed if k else fixed).tokens[r], (r, k, shared)
    before = G.FLOPS_DONE[0]
    G.generate(cfg, mogu, prompts, max_new_tokens=n, eos_ids=(), mode="routed", routed_tokens=m, shared_prefix=10)
    assert flops > G.FLOPS_DONE[0] - before  # both models ran past the m tokens for the kept rows
    with pytest.raises(MoguError, match="handoff must be one of"):
        G.generate(cfg.replace(handoff="sometimes"), mogu, prompts, max_new_tokens=4, mode="routed", routed_tokens=2)


def test_base_mode_shares_compilations_with_the_base_checkpoint(tiny):
    """Base-mode decoding from a MoGU checkpoint (other MoGU settings, glad/unwilling/router parts in the params)
    reuses the compiled decoding of the same base model: no new compilation, the same tokens."""
    from mogu_jax import mogu as mogu_lib

    cfg, params, _ = tiny
    prompts = [[5, 6, 7, 8], [9, 10]]
    want = G.generate(cfg, params, prompts, max_new_tokens=5, eos_ids=())
    mogu_cfg = cfg.replace(handoff="router", routed_tokens=2, handoff_threshold=0.3, router_hidden=16)
    mogu = mogu_lib.init_mogu(mogu_cfg, 0, params)
    before = G.compile_count()
    got = G.generate(mogu_cfg, mogu, prompts, max_new_tokens=5, eos_ids=())
    assert G.compile_count() == before and got.tokens == want.tokens
    G.generate(mogu_cfg, mogu, prompts, max_new_tokens=5, eos_ids=(), mode="routed")
    assert G.compile_count() > before  # the routed model is another program


def _count_dots(fn, *args) -> int:
    def walk(jaxpr):
        n = 0
        for eqn in jaxpr.eqns:
            n += eqn.primitive.name == "dot_general"
            for v in eqn.params.values():
                for sub in (v if isinstance(v, (list, tuple)) else [v]):
                    if hasattr(sub, "jaxpr"):
                        n += walk(sub.jaxpr if hasattr(sub.jaxpr, "eqns") else sub.jaxpr.jaxpr)
        return n
    return walk(jax.make_jaxpr(fn)(*args).jaxpr)


def test_handoff_runs_the_layers_below_the_routers_once(tiny):
    """With routers in a subset of layers (MoGU v2), every layer below the lowest router is the base layer in every
    mode, and the routed and the base model read the same tokens: the handoff models run those layers once for
    both. The published handoff's tokens equal its definition computed separately (the routed tokens, then the
    base model from scratch on prompt + those tokens), the gated handoff's equal the two-model run per row, with a
    shared prefix too, and a decode step has fewer matmuls than two whole models."""
    cfg, params, _ = tiny
    cfg = cfg.replace(router_layers=(1,))
    mogu, prompts = _strong_mogu(cfg, params, 3)
    m, n = 3, 10
    first = G.generate(cfg, mogu, prompts, max_new_tokens=m, eos_ids=(), mode="routed")
    rest = G.generate(cfg, params, [p + f for p, f in zip(prompts, first.tokens)], max_new_tokens=n - m, eos_ids=())
    dm = G.RoutedHandoff(cfg)
    assert dm.trunk == 1 and len(dm.init_cache(1, 8)["trunk"]) == 1 and len(dm.init_cache(1, 8)["base"]) == 1
    for shared in (0, 10):
        fixed = G.generate(cfg, mogu, prompts, max_new_tokens=n, eos_ids=(), mode="routed", routed_tokens=m,
                           shared_prefix=shared)
        assert fixed.tokens == [f + r for f, r in zip(first.tokens, rest.tokens)], shared
    # the two-model run (no shared trunk) as the reference for the gated handoff
    twin = G.RouterGatedHandoff(cfg, threshold=0.5)
    twin.trunk = 0
    shared_trunk = G.RouterGatedHandoff(cfg, threshold=0.5)
    runs = [G.generate(cfg, mogu, prompts, max_new_tokens=n, eos_ids=(), mode="routed", routed_tokens=m,
                       forward=f, shared_prefix=10) for f in (twin, shared_trunk)]
    assert runs[0].tokens == runs[1].tokens
    for x, y in zip(runs[0].router, runs[1].router):
        np.testing.assert_allclose(x["a"], y["a"], atol=1e-6)
    prepared = shared_trunk.prepare(mogu)
    tokens, pos, mask = jnp.asarray([[5]]), jnp.asarray([[3]]), jnp.ones((1, 8), bool)
    counts = [_count_dots(lambda c: f(prepared, tokens, pos, mask, c, 3, step=0, aux=2), f.init_cache(1, 8))
              for f in (twin, shared_trunk)]
    assert counts[1] < counts[0]


def test_gated_answers_equal_the_gated_handoff_at_less_compute(tiny):
    """mogu_jax.gated: the evaluation's MoGU answers under the router-gated handoff, reusing the base model's
    greedy answers, equal the gated handoff decoding of every row (ids, finished, routed tokens' router weights)
    with rows of each kind present (kept routed; handed off on the base answer's own first tokens; handed off on
    other tokens; ended within the routed tokens), for less compute than running both models side by side."""
    from mogu_jax import mogu as mogu_lib
    from mogu_jax.gated import gate_keeps, gated_answers

    cfg, params, _ = tiny
    mogu = mogu_lib.init_mogu(cfg, 0, params)
    key = jax.random.PRNGKey(2)
    mogu["unwilling"]["B"] = 0.01 * jax.random.normal(key, mogu["unwilling"]["B"].shape)  # glad stays zero
    mogu["router"] = jax.tree_util.tree_map(lambda x: x + 0.05 * jax.random.normal(key, x.shape), mogu["router"])
    head = [11, 12, 13, 14, 15, 16, 17, 18, 19, 20]
    prompts = [head + p for p in PROMPTS] + [head + [40 + i, 41, 42 + 3 * i] for i in range(12)]
    m, n, bs = 2, 24, 4
    common = dict(batch_size=bs, max_new_tokens=n)
    probe = G.generate_ids(cfg, mogu, prompts, mode="routed", max_new_tokens=m, batch_size=bs, eos_ids=())
    gate = float(np.median([np.mean(r["router"]["a"]) for r in probe]))
    cfg = cfg.replace(handoff="router", handoff_threshold=gate)
    for eos in ((), (int(probe[0]["ids"][1]),)):
        base = G.generate_ids(cfg, mogu, prompts, mode="base", eos_ids=eos, **common)
        before = G.FLOPS_DONE[0]
        want = G.generate_ids(cfg, mogu, prompts, mode="routed", routed_tokens=m, eos_ids=eos, **common)
        side_by_side = G.FLOPS_DONE[0] - before
        before = G.FLOPS_DONE[0]
        got = gated_answers(cfg, mogu, prompts, base, routed_tokens=m, eos_ids=eos, **common)
        assert G.FLOPS_DONE[0] - before < side_by_side
        for g, w in zip(got, want):
            assert g["ids"] == w["ids"] and g["finished"] == w["finished"]
            np.testing.assert_allclose(g["router"]["a"], w["router"]["a"], atol=1e-5)
        kinds = {"ended" if len(w["ids"]) <= m and w["finished"] else
                 "kept" if gate_keeps(w["router"]["a"], gate) else
                 "reused" if w["ids"][:m] == b["ids"][:m] else "other" for w, b in zip(want, base)}
        assert kinds == ({"kept", "reused", "other"} if not eos else {"kept", "reused", "other", "ended"}), kinds
    with pytest.raises(MoguError, match="routed_tokens must be in 1..23"):
        gated_answers(cfg, mogu, prompts, base, routed_tokens=0, eos_ids=(), **common)
