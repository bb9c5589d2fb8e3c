"""The attention kernels and a 7B-wide train step on a GPU: cuDNN flash attention against the reference.

Run on a machine with an NVIDIA GPU (it refuses to run elsewhere: the numbers mean nothing on a CPU):

    python scripts/bench_gpu_attention.py [--quick] [--out FILE.json]

1. The attention alone (``mogu_jax.attention``), bf16, Llama-2-7B heads (32 x 128) and a GQA layout (32 q / 8 kv
   heads), causal with a padded row: the error of ``reference_attention`` (``model.attention=xla``), of the cuDNN
   kernel given the padding mask (as a bias), and of our cuDNN path (``model.attention=cudnn``: the rows' key
   lengths when they are right-padded) against an fp32 reference on the valid rows; forward+backward time
   (median of timed runs, one run's ratio) and the compiled temporaries.
2. The glad stage's train step (``train.StepFns``, the step ``mogu-jax train`` runs) on a Llama-2-7B-wide model cut
   to a few layers, bf16, at 2048 and 4096 tokens, with ``model.attention=xla`` and ``cudnn`` on the same inputs:
   the loss of both, the step time, tokens/s and the model FLOPs utilisation (analytic FLOPs), and the compiled
   temporaries. Also which path ``model.attention=auto`` takes there.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mogu_jax import attention as A  # noqa: E402
from mogu_jax.config import ModelConfig  # noqa: E402

GiB = 1024 ** 3


def timed(fn, *args, reps: int = 10) -> float:
    """Median seconds of ``fn(*args)`` after two warm-up calls."""
    for _ in range(2):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def attention_cfg(dtype: str, heads: int, kv_heads: int, dim: int, attention: str) -> ModelConfig:
    return ModelConfig.from_hf(dict(model_type="llama", hidden_size=heads * dim, intermediate_size=4 * heads * dim,
                                    num_hidden_layers=1, num_attention_heads=heads, num_key_value_heads=kv_heads,
                                    vocab_size=256, hidden_act="silu", rms_norm_eps=1e-5)).replace(
        dtype=dtype, attention=attention)


def attention_case(batch: int, t: int, heads: int, kv_heads: int, dim: int = 128) -> dict:
    """One shape: errors against fp32, fwd+bwd times and compiled temporaries of each path."""
    kq, kk, kv, kc = jax.random.split(jax.random.PRNGKey(0), 4)
    q = jax.random.normal(kq, (batch, t, heads, dim), jnp.float32)
    k = jax.random.normal(kk, (batch, kv_heads, t, dim), jnp.float32)
    v = jax.random.normal(kv, (batch, kv_heads, t, dim), jnp.float32)
    ct = jax.random.normal(kc, (batch, t, heads * dim), jnp.float32)
    lengths = np.full((batch,), t, np.int32)
    lengths[-1] = t - t // 8  # one padded row (right padding, as training batches are)
    kv_mask = jnp.arange(t)[None, :] < jnp.asarray(lengths)[:, None]
    mask = (jnp.tril(jnp.ones((t, t), bool))[None] & kv_mask[:, None, :])[:, None]  # [B,1,T,S]
    valid = np.asarray(kv_mask)[:, :, None]

    bf16 = attention_cfg("bfloat16", heads, kv_heads, dim, "xla")
    exact = A.reference_attention(attention_cfg("float32", heads, kv_heads, dim, "xla"), q, k, v, mask)

    def mask_as_bias(q, k, v):  # the kernel given the padding mask itself (cuDNN takes it as a bias)
        out = jax.nn.dot_product_attention(q.astype(jnp.bfloat16), k.transpose(0, 2, 1, 3).astype(jnp.bfloat16),
                                           v.transpose(0, 2, 1, 3).astype(jnp.bfloat16), is_causal=True, mask=mask,
                                           scale=1.0 / math.sqrt(dim), implementation="cudnn")
        return out.astype(jnp.float32).reshape(batch, t, heads * dim)

    paths = {"xla (reference)": lambda q, k, v: A.reference_attention(bf16, q, k, v, mask),
             "cudnn, mask as a bias": mask_as_bias,
             "cudnn (ours: key lengths for right padding)": lambda q, k, v: A.dot_product_attention(
                 bf16, q, k, v, mask, "cudnn")}
    row = {"batch": batch, "length": t, "heads": heads, "kv_heads": kv_heads, "head_dim": dim, "paths": {}}
    for name, f in paths.items():
        r = {}
        try:
            out = jax.jit(f)(q, k, v)
            r["max_err_vs_fp32"] = float(np.max(np.where(valid, np.abs(np.asarray(out) - np.asarray(exact)), 0)))
            loss = jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(f(q, k, v) * ct), argnums=(0, 1, 2)))
            r["fwd_bwd_ms"] = 1e3 * timed(loss, q, k, v)
            mem = loss.lower(q, k, v).compile().memory_analysis()
            r["temp_gib"] = mem.temp_size_in_bytes / GiB if mem is not None else None
        except Exception as e:  # noqa: BLE001 - report and go on: one run must say as much as it can
            r["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        row["paths"][name] = r
        print(f"  attention B={batch} T={t} H={heads} KVH={kv_heads}: {name}: {r}", flush=True)
    ref = row["paths"]["xla (reference)"].get("fwd_bwd_ms")
    for name, r in row["paths"].items():
        if ref and r.get("fwd_bwd_ms"):
            r["speedup_vs_reference"] = ref / r["fwd_bwd_ms"]
    return row


def stage_conf(layers: int, seq: int, batch: int, attention: str, width: int = 0) -> dict:
    from mogu_jax.train_config import load_config

    conf = load_config("glad", os.path.join(REPO, "configs", "llama2-7b-chat.yaml"),
                       [f"data.max_len={seq}", f"model.attention={attention}", "model.dtype=bfloat16",
                        "model.param_dtype=bfloat16", "model.remat=false", "mesh.data=1", "mesh.fsdp=1",
                        "mesh.tensor=1", f"train.batch_size={batch}", f"train.examples_per_update={batch}"])
    arch = dict(conf["model"]["architecture"], num_hidden_layers=layers)
    if width:  # a narrow stand-in (a dry run of this script on a CPU)
        arch.update(hidden_size=width, intermediate_size=2 * width, num_attention_heads=width // 64,
                    num_key_value_heads=width // 64)
    conf["model"]["architecture"] = arch
    return conf


def concrete(tree, key):
    """Random values for an abstract tree (weights ~N(0, 0.02), norm scales 1, integer leaves 0)."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    keys = jax.random.split(key, len(leaves))
    out = []
    for s, k in zip(leaves, keys):
        if not jnp.issubdtype(s.dtype, jnp.floating):
            out.append(jnp.zeros(s.shape, s.dtype))
        elif len(s.shape) == 1:
            out.append(jnp.ones(s.shape, s.dtype))
        else:
            out.append((0.02 * jax.random.normal(k, s.shape, jnp.float32)).astype(s.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


def stage_batch(abstract: dict, vocab: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    b, t = abstract["affirm"]["tokens"].shape

    def seqs():
        lengths = rng.integers(t * 3 // 4, t + 1, size=b)
        attn = np.arange(t)[None, :] < lengths[:, None]
        loss = attn & (np.arange(t)[None, :] >= t // 4)
        return {"tokens": jnp.asarray(rng.integers(0, vocab, size=(b, t)), jnp.int32),
                "loss_mask": jnp.asarray(loss), "attn_mask": jnp.asarray(attn)}
    return {"affirm": seqs(), "refusal": seqs(), "weight": jnp.ones((b,), jnp.float32)}


def train_step_case(layers: int, seq: int, batch: int, width: int = 0) -> dict:
    """The glad step, xla vs cudnn attention, on the same weights and batch."""
    from mogu_jax import plan as PL

    topo = PL.Topology("gpu", "v5e", (1, 1))  # only named in messages: the devices are this machine's GPU
    row = {"layers": layers, "length": seq, "batch": batch, "paths": {}}
    for attention in ("xla", "cudnn"):
        r = {}
        try:
            conf = stage_conf(layers, seq, batch, attention, width)
            cfg = PL.model_config(conf)
            r["auto_takes"] = A.implementation(cfg.replace(attention="auto"))
            low = PL.lower_stage(conf, topo, batch, devices=jax.devices()[:1])
            t0 = time.perf_counter()
            compiled = low.lowered.compile()
            r["compile_s"] = time.perf_counter() - t0
            mem = compiled.memory_analysis()
            r["temp_gib"] = mem.temp_size_in_bytes / GiB
            key = jax.random.PRNGKey(1)
            frozen = concrete(low.trees["frozen"], key)
            trainable = concrete(low.trees["trainable"], jax.random.PRNGKey(2))
            from mogu_jax import train as T

            tx = T.make_optimizer(conf["optim"], 100)
            batch_v = stage_batch(low.trees["batch"], cfg.vocab_size)
            state = {"params": trainable, "opt_state": tx.init(trainable), "step": jnp.zeros((), jnp.int32)}
            state, stats = compiled(state, frozen, batch_v)
            r["first_loss"] = float(stats["loss"])
            times = []
            for _ in range(6):
                t0 = time.perf_counter()
                state, stats = compiled(state, frozen, batch_v)
                jax.block_until_ready(stats["loss"])
                times.append(time.perf_counter() - t0)
            step = statistics.median(times[1:])
            tokens = 2 * batch * seq  # affirm + refusal rows
            r["step_ms"] = 1e3 * step
            r["tokens_per_s"] = tokens / step
            fpt = PL.stage_flops_per_token(cfg, "glad", seq, PL.tree_count(low.trees["trainable"]))
            r["tflops_per_s"] = fpt * tokens / step / 1e12
            del state, frozen
        except Exception as e:  # noqa: BLE001
            r["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            traceback.print_exc()
        row["paths"][attention] = r
        print(f"  glad step layers={layers} T={seq} B={batch}: attention={attention}: {r}", flush=True)
    x, c = row["paths"]["xla"], row["paths"]["cudnn"]
    if x.get("step_ms") and c.get("step_ms"):
        row["cudnn_speedup"] = x["step_ms"] / c["step_ms"]
        row["loss_diff"] = abs(x["first_loss"] - c["first_loss"])
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one attention shape per layout, one train step")
    p.add_argument("--out", help="write the results as JSON")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on any backend (checks this script)")
    args = p.parse_args(argv)
    if jax.default_backend() != "gpu" and not args.dry_run:
        print(f"bench_gpu_attention: needs a GPU (jax backend: {jax.default_backend()})", file=sys.stderr)
        return 2
    dev = jax.devices()[0]
    result = {"device": str(getattr(dev, "device_kind", dev)), "jax": jax.__version__, "attention": [], "train": []}
    print(f"device {result['device']}, jax {jax.__version__}", flush=True)
    shapes = [(2, 128, 4, 2)] if args.dry_run else [(4, 1024, 32, 32), (2, 4096, 32, 8)] if args.quick else [(4, 1024, 32, 32), (2, 4096, 32, 32), (2, 4096, 32, 8),
                                                       (1, 8192, 32, 8)]
    for b, t, h, kvh in shapes:
        result["attention"].append(attention_case(b, t, h, kvh))
    steps = [(4, 4096, 2)] if args.quick else [(4, 2048, 4), (4, 4096, 2)]
    for layers, seq, batch in ([(2, 128, 2)] if args.dry_run else steps):
        result["train"].append(train_step_case(layers, seq, batch, 128 if args.dry_run else 0))
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
