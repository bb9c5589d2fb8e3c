#!/usr/bin/env python
"""Greedy generation throughput: mogu_jax (KV cache, on-device loop) vs Hugging Face ``generate`` (torch fp32).

Both run the same weights (SmolLM2-135M-Instruct from the ``smollm2`` alias, a GGUF dequantized to fp32),
greedy, EOS disabled so every row produces exactly ``--new-tokens`` tokens, after one warm-up call each.
Reports tokens/s (generated tokens of all rows / wall time of the whole call, prefill included) at each
batch size: ours in each compute dtype of ``--dtypes`` (default fp32 and bf16, side by side, interleaved), HF in
fp32, and the ratios bf16/fp32 and ours/HF; then the probe's verdict (what ``dtype: auto`` picks on this CPU, the
bf16/fp32 matmul ratio measured now, the CPU's avx512_bf16 / amx_bf16). ``--tiny`` runs a random tiny Llama
instead (a quick smoke check). The routing-cost and pipeline sections run in fp32.

    python scripts/bench_generate.py                 # SmolLM2-135M, batch 1 and 8, 64 new tokens, fp32 and bf16
    python scripts/bench_generate.py --tiny --batches 1 2
    python scripts/bench_generate.py --dtypes float32 --skip-routing --skip-pipeline
    python scripts/bench_generate.py --routing-only --skip-routing --skip-pipeline --skip-hf   # the trunk section
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain why the sky is blue in two sentences.",
    "List three uses of a paperclip.",
    "How do I boil an egg?",
    "Give me a fun fact about octopuses, and explain where it comes from.",
    "Translate 'good morning' into Spanish.",
    "What is 17 times 23?",
]


def load_smollm2():
    """(cfg, params, tokenizer, hf_model, source) for SmolLM2-135M: ours via mogu_jax.api.load."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mogu_jax.convert.gguf import resolve_gguf_path

    path = resolve_gguf_path("smollm2")
    d, gguf = os.path.split(path)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=gguf)
    hf = AutoModelForCausalLM.from_pretrained(d, gguf_file=gguf, dtype=torch.float32).eval()
    from mogu_jax.api import load

    cfg, params, _ = load("smollm2")
    return cfg, params, tok, hf, "mogu_jax.api.load('smollm2')"


def load_tiny():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from mogu_jax.convert.hf import params_from_torch

    torch.manual_seed(0)
    hcfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                       num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512,
                       tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    hf = LlamaForCausalLM(hcfg).eval()
    cfg, params = params_from_torch(hf)
    return cfg, params, None, hf, "random tiny Llama"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="random tiny Llama instead of SmolLM2-135M")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"],
                    help="compute dtypes of ours, side by side (default both); HF runs fp32")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per setting (best is reported)")
    ap.add_argument("--hf-threads", type=int, default=None, help="torch.set_num_threads for HF (default: torch's)")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-routing", action="store_true", help="skip the MoGU routing-cost section")
    ap.add_argument("--routing-only", action="store_true", help="only the MoGU routing-cost section")
    ap.add_argument("--skip-pipeline", action="store_true",
                    help="skip routed generation vs the original PyTorch pipeline")
    ap.add_argument("--skip-trunk", action="store_true",
                    help="skip the handoff with routers in the upper layers: shared trunk vs two whole models")
    args = ap.parse_args(argv)

    import jax
    import torch

    from mogu_jax import generate as G

    if args.hf_threads:
        torch.set_num_threads(args.hf_threads)
    cfg, params, tok, hf, source = load_tiny() if args.tiny else load_smollm2()
    params = jax.device_put(params)
    print(f"model: {'tiny' if args.tiny else 'SmolLM2-135M'} ({source}); jax {jax.__version__} on "
          f"{jax.default_backend()}, torch {torch.__version__} with {torch.get_num_threads()} threads")

    def prompt_ids(b):
        if tok is None:
            rng = np.random.default_rng(0)
            return [rng.integers(3, cfg.vocab_size, size=int(rng.integers(6, 30))).tolist() for _ in range(b)]
        from mogu_jax.templates import encode_prompt, format_prompt

        return [encode_prompt(tok, format_prompt(tok, PROMPTS[i % len(PROMPTS)])) for i in range(b)]

    n_new = args.new_tokens
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    hf.generation_config.do_sample = False
    for k in ("temperature", "top_p", "top_k"):
        setattr(hf.generation_config, k, None)

    cfgs = {dt: cfg.replace(dtype=dt) for dt in dict.fromkeys(args.dtypes)}

    def run_ours(ids, dt):
        out = G.generate(cfgs[dt], params, ids, max_new_tokens=n_new, eos_ids=())
        assert all(len(t) == n_new for t in out.tokens), [len(t) for t in out.tokens]
        return out.tokens

    def run_hf(ids):
        b = len(ids)
        width = max(len(x) for x in ids)
        pad = hf.generation_config.pad_token_id
        inp = torch.full((b, width), pad, dtype=torch.long)
        att = torch.zeros((b, width), dtype=torch.long)
        for r, x in enumerate(ids):
            inp[r, width - len(x):] = torch.tensor(x)
            att[r, width - len(x):] = 1
        with torch.inference_mode():
            out = hf.generate(input_ids=inp, attention_mask=att, max_new_tokens=n_new, min_new_tokens=n_new,
                              do_sample=False)
        assert out.shape[1] - width == n_new
        return out[:, width:].tolist()

    sides = {dt: (lambda ids, dt=dt: run_ours(ids, dt)) for dt in cfgs}
    if not args.skip_hf:
        sides["hf"] = run_hf
    rows = [decode_row(b, prompt_ids(b), sides, n_new, args.repeats)
            for b in ([] if args.routing_only else args.batches)]
    if rows:
        print_decode_table(rows, list(cfgs), n_new)
    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params))
    gbs = read_bandwidth(weight_bytes)
    print(f"memory-bandwidth ceiling at batch 1: every token reads all {weight_bytes / 1e6:.0f} MB of weights; "
          f"this machine reads {gbs:.1f} GB/s (jitted sum over an array that size, best of 10) -> "
          f"<= {gbs * 1e9 / weight_bytes:.1f} tok/s for any implementation")
    if not args.skip_routing:
        bench_routing(cfg, params, prompt_ids, args)
    if not args.skip_pipeline:
        bench_routed_pipeline(cfg, params, hf, prompt_ids, args)
    if not args.skip_trunk:
        bench_shared_trunk(cfg, params, prompt_ids, args)
    from bench_train import probe_verdict  # scripts/ is on sys.path when a script runs

    print(probe_verdict())
    return rows


def decode_row(b: int, ids: list, sides: dict, n_new: int, repeats: int) -> dict:
    """tokens/s of each side (ours per dtype, HF) at batch ``b``: one warm-up call each (compiles the buckets),
    then ``repeats`` interleaved rounds, best of them (the machine may be shared); the outputs of the last round."""
    best = {k: float("inf") for k in sides}
    out = {}
    for fn in sides.values():
        fn(ids)
    for _ in range(repeats):
        for k, fn in sides.items():
            t0 = time.perf_counter()
            out[k] = fn(ids)
            best[k] = min(best[k], time.perf_counter() - t0)
    return {"batch": b, "tps": {k: b * n_new / t for k, t in best.items()}, "tokens": out}


def print_decode_table(rows: list, dtypes: list, n_new: int) -> None:
    """Ours per dtype side by side, bf16/fp32, HF fp32, ours/HF and the rows equal to HF (per dtype)."""
    short = {"float32": "fp32", "bfloat16": "bf16"}
    both = "float32" in dtypes and "bfloat16" in dtypes
    has_hf = "hf" in rows[0]["tps"]
    cols = [f"ours {short[d]} tok/s" for d in dtypes] + (["bf16/fp32"] if both else [])
    if has_hf:
        cols += ["HF fp32 tok/s"] + [f"ours {short[d]}/HF" for d in dtypes] + \
            [f"rows equal to HF ({short[d]})" for d in dtypes]
    print(f"\ngreedy, {n_new} new tokens per row, EOS disabled, wall time of the whole call (prefill included); "
          "ours in each compute dtype, HF in fp32")
    print("| batch | " + " | ".join(cols) + " |")
    print("|" + "---|" * (len(cols) + 1))
    for r in rows:
        tps, cells = r["tps"], [f"{r['tps'][d]:.1f}" for d in dtypes]
        if both:
            cells.append(f"{tps['bfloat16'] / tps['float32']:.2f}x")
        if has_hf:
            cells.append(f"{tps['hf']:.1f}")
            cells += [f"{tps[d] / tps['hf']:.2f}x" for d in dtypes]
            ref = r["tokens"]["hf"]
            cells += [f"{sum(o == h for o, h in zip(r['tokens'][d], ref))}/{r['batch']}" for d in dtypes]
        print(f"| {r['batch']} | " + " | ".join(cells) + " |")


def read_bandwidth(n_bytes: int, repeats: int = 10) -> float:
    """GB/s of a jitted fp32 sum over ``n_bytes`` (the streaming-read rate that bounds batch-1 decoding)."""
    import jax
    import jax.numpy as jnp
    x = jnp.ones((max(n_bytes // 4, 1),), jnp.float32)
    f = jax.jit(jnp.sum)
    f(x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - t)
    del x
    return n_bytes / best / 1e9


def random_mogu(cfg, params):
    """MoGU params on ``params``: small random branches (B), the routers at their init."""
    import jax

    from mogu_jax import mogu as mogu_lib

    full = mogu_lib.init_mogu(cfg, 0, params)
    for name, k in (("glad", 1), ("unwilling", 2)):
        full[name]["B"] = 0.01 * jax.random.normal(jax.random.PRNGKey(k), full[name]["B"].shape)
    return full


def table_head(title: str, header: str, width: int) -> None:
    print(title)
    print(header)
    print("-" * width)


def best_times(runs: dict, repeats: int) -> tuple[dict, dict]:
    """Each of ``runs`` (name -> call) once to warm up (its result kept), then ``repeats`` rounds interleaved:
    (results, best wall time of each)."""
    results = {name: fn() for name, fn in runs.items()}
    times = {}
    for _ in range(repeats):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[name] = min(times.get(name, float("inf")), time.perf_counter() - t0)
    return results, times


def bench_routed_pipeline(cfg, params, hf, prompt_ids, args, m=5):
    """Routed generation (first ``m`` tokens routed, then the base model; ``--new-tokens`` in all), ours vs the
    original pipeline stated in PyTorch on the same weights: ``m`` uncached full forwards of the routed model
    (the authors' inf_mogu.py loop), then HF ``generate`` of the base model on prompt + routed tokens."""
    import torch

    from mogu_jax import generate as G

    full = random_mogu(cfg, params)

    class MoGUProjection(torch.nn.Module):
        """The published MoGU o_proj (the authors' Route_Layer): (a+b) W_o x + s (a dU + b dG)."""

        def __init__(self, o_proj, glad, unwilling, router_u, router_g, s):
            super().__init__()
            self.o_proj, self.enabled = o_proj, True
            self.glad, self.unwilling, self.ru, self.rg, self.s = glad, unwilling, router_u, router_g, s

        @staticmethod
        def head(p, x):
            return torch.sigmoid(((x @ p["w0"]) @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"])

        def forward(self, x):
            base = self.o_proj(x)
            a, b = self.head(self.ru, x), self.head(self.rg, x)
            d_u = (x @ self.unwilling["A"]) @ self.unwilling["B"]
            d_g = (x @ self.glad["A"]) @ self.glad["B"]
            return (a + b) * base + self.s * (a * d_u + b * d_g)

    t = lambda x: torch.tensor(np.asarray(x, np.float32))  # noqa: E731
    s = cfg.lora_alpha / cfg.lora_rank
    wrappers = []
    for i, layer in enumerate(hf.model.layers):
        att = layer.self_attn
        w = MoGUProjection(att.o_proj, {k: t(v[i]) for k, v in full["glad"].items()},
                                 {k: t(v[i]) for k, v in full["unwilling"].items()},
                                 {k: t(v[i]) for k, v in full["router"]["unwilling"].items()},
                                 {k: t(v[i]) for k, v in full["router"]["glad"].items()}, s)
        wrappers.append((att, w))
    n_new = args.new_tokens

    def torch_pipeline(ids):
        outs = []
        for x in ids:  # the published pipeline runs one prompt at a time
            cur = torch.tensor([x], dtype=torch.long)
            for att, w in wrappers:
                att.o_proj = w
            with torch.inference_mode():
                for _ in range(m):
                    logits = hf(cur).logits
                    cur = torch.cat([cur, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
                for att, w in wrappers:
                    att.o_proj = w.o_proj
                out = hf.generate(input_ids=cur, attention_mask=torch.ones_like(cur), max_new_tokens=n_new - m,
                                  min_new_tokens=n_new - m, do_sample=False)
            outs.append(out[0, len(x):].tolist())
        return outs

    def ours(ids):
        return G.generate(cfg, full, ids, max_new_tokens=n_new, eos_ids=(), mode="routed", routed_tokens=m).tokens

    table_head(f"\nrouted generation: {m} routed tokens then the base model, {n_new} new tokens, greedy, fp32;"
               f" best of {args.repeats}",
               f"{'batch':>5} | {'ours tok/s':>10} | {'original pipeline tok/s':>23} | ours/original | rows equal",
               78)
    for b in args.batches:
        ids = prompt_ids(b)
        ours(ids)
        torch_pipeline(ids[:1])  # warm-up
        t_o = t_t = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            got = ours(ids)
            t_o = min(t_o, time.perf_counter() - t0)
            t0 = time.perf_counter()
            ref = torch_pipeline(ids)
            t_t = min(t_t, time.perf_counter() - t0)
        same = sum(a == r for a, r in zip(got, ref))
        print(f"{b:>5} | {b * n_new / t_o:10.1f} | {b * n_new / t_t:23.1f} | {t_t / t_o:13.2f} | {same}/{b}")
    for att, w in wrappers:
        att.o_proj = w.o_proj


def bench_shared_trunk(cfg, params, prompt_ids, args, m=5):
    """The handoffs with routers in the upper layers only (MoGU v2; SmolLM2's demo puts them in 18-29, here the
    upper 40%): the router-gated handoff with ``m`` routed tokens, the layers below the lowest router run once for
    the routed and the base model (ours) vs both models whole (the previous decode model), same run, same tokens."""

    from mogu_jax import generate as G

    lo = cfg.num_layers - max(1, (2 * cfg.num_layers) // 5)
    ucfg = cfg.replace(router_layers=tuple(range(lo, cfg.num_layers)), handoff="router", handoff_threshold=0.5)
    full = random_mogu(ucfg, params)
    shared = G.RouterGatedHandoff(ucfg)
    whole = G.RouterGatedHandoff(ucfg)
    whole.trunk = 0
    n_new = args.new_tokens
    table_head(f"\nthe gated handoff with routers in layers {lo}-{cfg.num_layers - 1}: layers 0-{lo - 1} once for "
               f"both models vs both models whole; {m} routed tokens, {n_new} new tokens, fp32, best of "
               f"{args.repeats}",
               f"{'batch':>5} | {'shared trunk tok/s':>18} | {'two models tok/s':>16} | speed-up | rows equal", 72)
    for b in args.batches:
        ids = prompt_ids(b)
        run = {name: (lambda f=f: G.generate(ucfg, full, ids, max_new_tokens=n_new, eos_ids=(), mode="routed",
                                              routed_tokens=m, forward=f).tokens)
               for name, f in (("shared", shared), ("whole", whole))}
        got, times = best_times(run, args.repeats)
        same = sum(a == w for a, w in zip(got["shared"], got["whole"]))
        print(f"{b:>5} | {b * n_new / times['shared']:18.1f} | {b * n_new / times['whole']:16.1f} | "
              f"{times['whole'] / times['shared']:8.2f} | {same}/{b}")


def bench_routing(cfg, params, prompt_ids, args):
    """The cost of MoGU routing, measured in one run: routed vs base, same weights and shapes.

    * decode: cached greedy generation with every token routed (``mode="routed"``: both branches and the
      router in every layer; the router heads folded into one [d, 2] map, which is exact) vs ``mode="base"``;
    * forward: a full jitted forward over a [8, 256] batch (the training-style pass, published router
      parametrisation, nn.scan over layers) routed vs base.
    """
    import jax
    import jax.numpy as jnp

    from mogu_jax import generate as G
    from mogu_jax.model import forward

    full = random_mogu(cfg, params)
    n_new = args.new_tokens
    table_head(f"\nMoGU routing cost (rank {cfg.lora_rank} branches, router hidden {cfg.router_hidden}, "
               f"routers in all {cfg.num_layers} layers), same run, best of {args.repeats}",
               f"{'what':<28} | {'base':>10} | {'routed':>10} | routed/base time", 72)
    for b in args.batches:
        ids = prompt_ids(b)
        _, times = best_times({mode: (lambda mode=mode: G.generate(cfg, full, ids, max_new_tokens=n_new, eos_ids=(),
                                                                  mode=mode)) for mode in ("base", "routed")},
                              args.repeats)
        tb, tr = (b * n_new / times["base"]), (b * n_new / times["routed"])
        print(f"{'decode tok/s, batch ' + str(b):<28} | {tb:10.1f} | {tr:10.1f} | {times['routed'] / times['base']:.3f}")
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, cfg.vocab_size, size=(8, 256)), jnp.int32)
    fns = {m: jax.jit(lambda p, t, m=m: forward(cfg, p, t, mode=m).logits) for m in ("base", "routed")}
    times = {}
    for m, fn in fns.items():
        fn(full, tokens).block_until_ready()
    for _ in range(args.repeats):
        for m, fn in fns.items():
            t0 = time.perf_counter()
            fn(full, tokens).block_until_ready()
            times[m] = min(times.get(m, float("inf")), time.perf_counter() - t0)
    tps = {m: 8 * 256 / t for m, t in times.items()}
    print(f"{'forward tok/s, 8 x 256':<28} | {tps['base']:10.1f} | {tps['routed']:10.1f} | "
          f"{times['routed'] / times['base']:.3f}")


if __name__ == "__main__":
    main()
