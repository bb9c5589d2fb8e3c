"""Benchmark: conversion wall time and peak memory on a synthetic ~1B-parameter sharded checkpoint.

Builds a Llama-style HF folder (bf16, sharded safetensors + index, TinyLlama-1.1B shapes by default)
with random weights, then runs ``convert hf-to-jax`` and ``convert jax-to-hf`` each in a fresh
process and reports wall time and peak RSS, also as a ratio to the checkpoint's bytes (1.0 = one
full copy of the model in memory). The baseline RSS of a process that only imports mogu_jax is
measured in the same run and reported beside it.

    python scripts/bench_convert.py                 # ~1.1B params, ~2.2 GB bf16
    python scripts/bench_convert.py --layers 2      # quick smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import ml_dtypes
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from mogu_jax.convert.safetensors_io import plan_shards, tensor_nbytes, write_safetensors  # noqa: E402


def build_checkpoint(out: str, layers: int, hidden: int, inter: int, heads: int, kv: int, vocab: int) -> int:
    os.makedirs(out, exist_ok=True)
    hd = hidden // heads
    cfg = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=hidden, intermediate_size=inter,
               num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
               rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=2048, tie_word_embeddings=False,
               torch_dtype="bfloat16", hidden_act="silu")
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    specs = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        specs += [(p + "input_layernorm.weight", (hidden,)), (p + "post_attention_layernorm.weight", (hidden,)),
                  (p + "self_attn.q_proj.weight", (heads * hd, hidden)),
                  (p + "self_attn.k_proj.weight", (kv * hd, hidden)),
                  (p + "self_attn.v_proj.weight", (kv * hd, hidden)),
                  (p + "self_attn.o_proj.weight", (hidden, heads * hd)),
                  (p + "mlp.gate_proj.weight", (inter, hidden)), (p + "mlp.up_proj.weight", (inter, hidden)),
                  (p + "mlp.down_proj.weight", (hidden, inter))]
    specs += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    bf16 = np.dtype(ml_dtypes.bfloat16)
    specs = [(n, s, bf16) for n, s in specs]
    rng = np.random.default_rng(0)
    shards = plan_shards(specs, 1 << 30)
    weight_map, total = {}, 0
    for k, shard in enumerate(shards, 1):
        name = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(os.path.join(out, name), shard,
                          lambda n, _s=dict((a, b) for a, b, _ in shard): (
                              rng.standard_normal(_s[n], dtype=np.float32) * 0.02).astype(bf16))
        for n, s, d in shard:
            weight_map[n] = name
            total += tensor_nbytes(s, d)
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    return total


def run_child(code: str) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of a fresh Python process running ``code``."""
    script = ("import resource, time, sys\nt0 = time.perf_counter()\n" + code +
              "\nprint('RESULT', time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        sys.stderr.write(out.stderr)
        raise SystemExit(f"child failed ({out.returncode})")
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT")][-1]
    _, secs, kb = line.split()
    return float(secs), int(kb) * 1024


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--workdir", default=None, help="where to build the synthetic checkpoint (default: a temp dir)")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()

    work = args.workdir or tempfile.mkdtemp(prefix="mogu-bench-convert-")
    hf, ck, back = (os.path.join(work, n) for n in ("hf", "ck", "hf_back"))
    for d in (ck, back):
        shutil.rmtree(d, ignore_errors=True)
    t = time.perf_counter()
    nbytes = build_checkpoint(hf, args.layers, args.hidden, args.intermediate, args.heads, args.kv_heads, args.vocab)
    n_params = nbytes // 2
    print(f"synthetic checkpoint: {n_params / 1e9:.3f}B params, {nbytes / 2**30:.2f} GiB bf16, "
          f"built in {time.perf_counter() - t:.1f}s at {hf}")

    _, base_rss = run_child("import jax, jax.numpy as jnp; jnp.zeros(1).block_until_ready(); import mogu_jax.api")
    imp_s, imp_rss = run_child(f"from mogu_jax import api; api.convert_hf_to_jax({hf!r}, {ck!r})")
    exp_s, exp_rss = run_child(f"from mogu_jax import api; api.convert_jax_to_hf({ck!r}, {back!r})")

    gib = 2**30
    print()
    print(f"{'step':<12}{'wall s':>9}{'peak RSS GiB':>15}{'RSS/ckpt':>10}{'(RSS-base)/ckpt':>17}")
    print(f"{'baseline':<12}{'':>9}{base_rss / gib:>15.2f}{base_rss / nbytes:>10.2f}{'':>17}")
    for name, s, rss in (("hf-to-jax", imp_s, imp_rss), ("jax-to-hf", exp_s, exp_rss)):
        print(f"{name:<12}{s:>9.1f}{rss / gib:>15.2f}{rss / nbytes:>10.2f}{(rss - base_rss) / nbytes:>17.2f}")
    print(f"\nthroughput: import {nbytes / gib / imp_s:.2f} GiB/s, export {nbytes / gib / exp_s:.2f} GiB/s")
    if not args.keep and not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
