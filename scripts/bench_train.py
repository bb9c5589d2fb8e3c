#!/usr/bin/env python
"""Training-step throughput of the three MoGU stages: mogu_jax's jitted train step vs a PyTorch + PEFT step.

Both sides run the same weights (SmolLM2-135M-Instruct from the ``smollm2`` alias, the GGUF dequantized to
fp32), the same synthetic batch (default 8 x 256 tokens, every token real, the first ``--prompt-len`` tokens
of each row a "prompt" that the LM loss masks out) and the same compute dtype.

* ours: ``mogu_jax.train.StepFns`` + ``make_optimizer``, set up exactly as ``mogu_jax.trainer.run_stage`` does
  (mesh, tree shardings, optax shardings, state ``{params, opt_state, step}``, frozen ``{"base", ...}``); one
  fused update per step, blocked on its stats (as the trainer does when it logs them).
* reference, glad / unwilling: a transformers ``LlamaForCausalLM`` with a PEFT LoRA (r 8, alpha 16, no dropout)
  on ``o_proj``, the ratio loss (two forwards, per-example mean CE over response tokens), AdamW eps 1e-6.
* reference, router: the same model with every ``o_proj`` wrapped as the MoGU routed projection
  ``(a+b) W_o x + s (a dU(x) + b dG(x))`` (both LoRA branches frozen, two router heads of hidden 512 per layer,
  only the routers trainable), loss ``CE + 2 (mse_a + mse_b)``.

One update = forward, loss, ``loss.backward(); opt.step(); opt.zero_grad()`` (torch) or one ``StepFns.step``
(ours). Warm-up first, then ``--rounds`` rounds that time ``--steps`` updates of ours then ``--steps`` of torch
(interleaved, the machine is shared); the medians per update are compared. tokens/s counts the real tokens an
update processes (pair stages: both sequences of each example).

Each stage runs in every dtype of ``--dtypes`` (default fp32 and bf16, one run), each against torch on the same
dtype (fp32; bf16 = torch autocast bf16), all sides interleaved round by round, and one table puts the fp32 and
bf16 rows side by side. The run starts and ends with the probe's verdict: what ``dtype: auto`` picks on this
CPU (``mogu_jax.precision.auto_choice``, ``$MOGU_JAX_AUTO_DTYPE`` ignored), the bf16/fp32 ratio of its matmul
measured now, and whether the CPU has avx512_bf16 / amx_bf16.

FLOPs: ``mogu_jax.flops.train_step_flops`` (analytic, matmuls only): what our step computes: the LM head from
the first loss position, the shared prefix once per batch, the backward pass only above the lowest trained
layer (the router stage with ``--router-layers``; the layers below cached as ``train.cache_frozen_layers``
does unless ``--no-cache-lower``), the folded router heads, remat's recompute. The peak per dtype is the best
of a few jitted n^3 matmuls in JAX (fp32 HIGHEST; bf16 x bf16 -> fp32), measured in the same run. XLA's own
``cost_analysis()`` of the compiled step is printed beside it (it counts a scanned layer's body once).

    python scripts/bench_train.py                    # all stages, fp32 and bf16, SmolLM2-135M, 8 x 256
    python scripts/bench_train.py --dtypes bfloat16 --stages glad
    python scripts/bench_train.py --stages router --router-layers 15-29   # routers in layers 15-29 only
    python scripts/bench_train.py --remat
    python scripts/bench_train.py --breakdown        # also time the pieces of our step (where the time goes)
    python scripts/bench_train.py --tiny --seq 64    # a random tiny Llama (smoke test)
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

STAGES = ("glad", "unwilling", "router")
LR = {"glad": 5e-5, "unwilling": 5e-5, "router": 5e-4}
ROUTER_LAMBDA = 2.0


# ------------------------------------------------------------------------------------------------- models
def load_models(tiny: bool, dtype: str, remat: bool):
    """(cfg, params, hf_model): ours as run_stage loads it, the HF model from the same source (fp32)."""
    import torch

    if tiny:
        from transformers import LlamaConfig, LlamaForCausalLM

        from mogu_jax.convert.hf import params_from_torch

        torch.manual_seed(0)
        hcfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                           tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
        hf = LlamaForCausalLM(hcfg).eval()
        cfg, params = params_from_torch(hf)
        cfg = cfg.replace(dtype=dtype, remat=remat)
        return cfg, params, hf, "random tiny Llama"
    from transformers import AutoModelForCausalLM

    from mogu_jax import api
    from mogu_jax.convert.gguf import resolve_gguf_path

    cfg, params, _ = api.load("smollm2", dtype=dtype, remat=remat)
    d, gguf = os.path.split(resolve_gguf_path("smollm2"))
    hf = AutoModelForCausalLM.from_pretrained(d, gguf_file=gguf, dtype=torch.float32)
    return cfg, params, hf, "SmolLM2-135M-Instruct (mogu_jax.api.load('smollm2') / transformers gguf_file=)"


# ------------------------------------------------------------------------------------------------ batches
def make_batch(stage: str, b: int, t: int, prompt_len: int, vocab: int, seed: int = 0, shared: int = 0) -> dict:
    """A synthetic batch in the format of mogu_jax.data (every position real, response after the prompt).
    ``shared``: every row starts with the same this many tokens (a chat template's system prompt)."""
    rng = np.random.default_rng(seed)
    head = rng.integers(3, vocab, size=shared).astype(np.int32)

    def seq():
        toks = rng.integers(3, vocab, size=(b, t)).astype(np.int32)
        toks[:, :shared] = head
        plen = rng.integers(max(prompt_len // 2, 1), max(prompt_len, 2), size=b)
        loss = np.arange(t)[None, :] >= plen[:, None]
        return {"tokens": toks, "loss_mask": loss, "attn_mask": np.ones((b, t), bool)}

    if stage == "router":
        out = seq()
        out["label"] = (np.arange(b) % 2).astype(np.int32)
        out["weight"] = np.ones(b, np.float32)
        return out
    return {"affirm": seq(), "refusal": seq(), "weight": np.ones(b, np.float32)}


def batch_rows(stage: str, batch: dict) -> np.ndarray:
    return batch["tokens"] if stage == "router" else batch["affirm"]["tokens"]


def batch_tokens(stage: str, batch: dict) -> int:
    w = batch["weight"]
    if stage == "router":
        return int((batch["attn_mask"] * w[:, None]).sum())
    return int(sum((batch[h]["attn_mask"] * w[:, None]).sum() for h in ("affirm", "refusal")))


# ------------------------------------------------------------------------------------------ ours (mogu_jax)
class Ours:
    """The train step of one stage, set up as mogu_jax.trainer.run_stage does."""

    def __init__(self, cfg, params, stage: str, batch: dict, seed: int = 0, logits_from: int = 0,
                 shared_prefix: tuple = (), router_layers: tuple = (), cache_lower: bool = True):
        import jax

        from mogu_jax import train as T
        from mogu_jax.model import split_params
        from mogu_jax.sharding import make_mesh
        from mogu_jax.trainer import place_state

        self.stage = stage
        base, _ = split_params(params)
        cfg = cfg.replace(lora_rank=8, lora_alpha=16.0, router_hidden=512, router_layers=router_layers)
        self.cfg = cfg
        # the step's backward stops below the lowest trained layer (train.lowest_trained_layer, set in the loss)
        self.frozen_layers = T.lowest_trained_layer(cfg, stage)
        self.lower_cached = bool(cache_lower and self.frozen_layers and cfg.scan_layers)
        if self.lower_cached:  # as run_stage with train.cache_frozen_layers: the lower layers' output, once
            batch = dict(batch, hidden=lower_layers_output(cfg.replace(frozen_layers=self.frozen_layers), base,
                                                           batch))
        frozen = {"base": base}
        if stage == "router":  # trained branches (random, B non-zero so both branches do real work)
            for i, part in enumerate(("glad", "unwilling")):
                br = T.init_trainable(cfg, part, seed + 10 + i)
                r = np.random.default_rng(seed + i)
                br = {"A": np.asarray(br["A"]), "B": (0.01 * r.standard_normal(br["B"].shape)).astype(np.float32)}
                frozen[part] = br
        optim = {"lr": LR[stage], "b1": 0.9, "b2": 0.999, "eps": 1e-6, "weight_decay": 0.0,
                 "schedule": "constant", "warmup_steps": 0, "clip_norm": None}
        mesh = make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
        tx = T.make_optimizer(optim, 1000)
        trainable = T.trainable_dtype_cast(T.init_trainable(cfg, stage, seed), np.float32)
        self.state, self.frozen, state_sh, frozen_sh = place_state(cfg, stage, frozen, trainable, mesh, tx)
        # the LM head from the first loss position on, as run_stage does (StageData.logits_from)
        # and the tokens all rows start with once per batch (StageData.shared_prefix)
        self.fns = T.StepFns(cfg, stage, tx, mesh, state_sh, frozen_sh, ROUTER_LAMBDA, logits_from=logits_from,
                             shared_prefix=shared_prefix)
        self.batch = T.local_batch_to_global(batch, mesh)
        self.n_trainable = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(trainable))
        self.last_loss = None

    def flops(self, stage: str, batch: dict, logits_from: int, prefix: int) -> int:
        """Analytic FLOPs of one update as our step computes it (mogu_jax.flops.train_step_flops)."""
        from mogu_jax.flops import train_step_flops

        rows = batch_rows(stage, batch)
        return train_step_flops(self.cfg.replace(frozen_layers=self.frozen_layers), stage, rows.shape[0],
                                rows.shape[1], prefix, logits_from, lower_cached=self.lower_cached)

    def step(self):
        import jax

        from mogu_jax import train as T

        self.state, stats = self.fns.step(self.state, self.frozen, [self.batch])
        jax.block_until_ready(stats)
        self.last_loss = float(T.host_value(stats["loss"])) / float(T.host_value(stats["weight"]))

    def cost_analysis(self):
        """XLA's cost analysis of the compiled fused step (flops, bytes accessed) and its temp memory."""
        try:
            jitted = self.fns._jit("fused", self.batch)
            compiled = jitted.lower(self.state, self.frozen, self.batch).compile()
            ca = compiled.cost_analysis()
            if isinstance(ca, (list, tuple)):
                ca = ca[0] if ca else None
            ca = dict(ca) if ca else {}
            try:
                ca["temp_bytes"] = compiled.memory_analysis().temp_size_in_bytes
            except Exception:  # noqa: BLE001
                pass
            return ca
        except Exception as e:  # noqa: BLE001 - optional information
            return {"error": f"{type(e).__name__}: {e}"}


def lower_layers_output(cfg, base: dict, batch: dict) -> np.ndarray:
    """The residual stream entering layer ``cfg.frozen_layers`` for the batch's rows (the trainer's
    FrozenLayersCache, computed once outside the timed steps)."""
    import jax

    from mogu_jax.model import lower_hidden

    fn = jax.jit(lambda b, t, m: lower_hidden(cfg, b, t, m))
    return np.asarray(fn(base, batch["tokens"], batch["attn_mask"]), np.float32)


# ---------------------------------------------------------------------------------------------- reference
def torch_batch(batch: dict, stage: str):
    import torch

    def conv(d):
        return {k: torch.from_numpy(np.asarray(v).astype(np.int64 if k == "tokens" else v.dtype)) for k, v in d.items()}

    if stage == "router":
        return conv(batch)
    return {"affirm": conv(batch["affirm"]), "refusal": conv(batch["refusal"]),
            "weight": torch.from_numpy(batch["weight"])}


def torch_token_ce(logits, tokens, loss_mask):
    """Per-example mean CE over the response tokens (position t predicts tokens[t] from logits[t-1])."""
    import torch.nn.functional as F

    lg = logits[:, :-1].float()
    tgt = tokens[:, 1:]
    mask = loss_mask[:, 1:].float()
    nll = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), tgt.reshape(-1), reduction="none").view(tgt.shape)
    return (nll * mask).sum(1) / mask.sum(1).clamp_min(1.0)


class TorchRouterOProj:
    """Factory of the MoGU routed o_proj as a torch module (built lazily so torch imports stay local)."""

    @staticmethod
    def build(base_linear, d_in: int, d_out: int, rank: int, scale: float, hidden: int, store: list, gen):
        import torch
        from torch import nn

        class Head(nn.Module):
            def __init__(self):
                super().__init__()
                self.linear_0 = nn.Linear(d_in, hidden, bias=False)
                self.linear_1 = nn.Linear(hidden, d_out)
                self.linear_2 = nn.Linear(d_out, 1)
                for lin in (self.linear_0, self.linear_1, self.linear_2):
                    nn.init.normal_(lin.weight, std=0.02, generator=gen)
                    if lin.bias is not None:
                        nn.init.zeros_(lin.bias)

            def forward(self, x):
                return torch.sigmoid(self.linear_2(self.linear_1(self.linear_0(x))))

        class Routed(nn.Module):
            def __init__(self):
                super().__init__()
                self.base = base_linear
                self.alpha_ = Head()
                self.beta_ = Head()
                w = lambda *s: nn.Parameter(0.01 * torch.randn(*s, generator=gen), requires_grad=False)  # noqa: E731
                self.u_A, self.u_B, self.g_A, self.g_B = w(rank, d_in), w(d_out, rank), w(rank, d_in), w(d_out, rank)

            def forward(self, x):
                import torch.nn.functional as F

                base = self.base(x)
                a, b = self.alpha_(x), self.beta_(x)
                du = F.linear(F.linear(x, self.u_A), self.u_B)
                dg = F.linear(F.linear(x, self.g_A), self.g_B)
                store.append((a, b))
                return (a + b) * base + scale * (a * du + b * dg)

        return Routed()


class Reference:
    """The PyTorch step of one stage (PEFT LoRA for glad / unwilling, the routed MoGU model for router)."""

    def __init__(self, hf_base, stage: str, batch: dict, bf16: bool, seed: int = 0, router_layers: tuple = ()):
        import torch

        self.stage, self.bf16 = stage, bf16
        model = copy.deepcopy(hf_base)
        model.config.use_cache = False
        for p in model.parameters():
            p.requires_grad_(False)
        hcfg = model.config
        d_attn = hcfg.num_attention_heads * getattr(hcfg, "head_dim", hcfg.hidden_size // hcfg.num_attention_heads)
        if stage == "router":
            gen = torch.Generator().manual_seed(seed)
            self.store: list = []
            routed = set(router_layers or range(len(model.model.layers)))
            for layer in (x for i, x in enumerate(model.model.layers) if i in routed):
                layer.self_attn.o_proj = TorchRouterOProj.build(layer.self_attn.o_proj, d_attn, hcfg.hidden_size,
                                                                8, 2.0, 512, self.store, gen)
            trainable = [p for n, p in model.named_parameters() if ".alpha_." in n or ".beta_." in n]
            for p in trainable:
                p.requires_grad_(True)
        else:
            from peft import LoraConfig, get_peft_model

            torch.manual_seed(seed)
            model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, bias="none",
                                                     target_modules=["o_proj"]))
            trainable = [p for p in model.parameters() if p.requires_grad]
        model.train()  # dropout is 0 everywhere, as ours
        self.model = model
        self.n_trainable = sum(p.numel() for p in trainable)
        self.opt = torch.optim.AdamW(trainable, lr=LR[stage], betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0)
        self.batch = torch_batch(batch, stage)
        self.last_loss = None

    def _logits(self, b):
        return self.model(input_ids=b["tokens"], attention_mask=b["attn_mask"].long()).logits

    def loss(self):
        import torch

        b = self.batch
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            if self.stage == "router":
                self.store.clear()
                logits = self._logits(b)
                ce = torch_token_ce(logits, b["tokens"], b["loss_mask"])
                alphas = torch.stack([a[..., 0] for a, _ in self.store]).float()  # [L, B, T]
                betas = torch.stack([bb[..., 0] for _, bb in self.store]).float()
                self.store.clear()
                m = b["attn_mask"].float()[None]
                t_a = b["label"].float()[None, :, None]
                denom = (m.sum((0, 2)) * alphas.shape[0]).clamp_min(1.0)
                mse_a = ((alphas - t_a) ** 2 * m).sum((0, 2)) / denom
                mse_b = ((betas - (1 - t_a)) ** 2 * m).sum((0, 2)) / denom
                per = ce + ROUTER_LAMBDA * (mse_a + mse_b)
            else:
                ce = {h: torch_token_ce(self._logits(b[h]), b[h]["tokens"], b[h]["loss_mask"])
                      for h in ("affirm", "refusal")}
                per = ce["affirm"] / ce["refusal"] if self.stage == "glad" else ce["refusal"] / ce["affirm"]
        w = b["weight"]
        return (per * w).sum() / w.sum()

    def step(self):
        loss = self.loss()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad()
        self.last_loss = float(loss.detach())


def release_memory() -> None:
    """Give freed heap memory back to the OS between the two sides' steps (glibc keeps it otherwise, and
    ours' and torch's peaks would add up in RSS). Outside the timed regions."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except Exception:  # noqa: BLE001 - not glibc
        pass


# --------------------------------------------------------------------------------------------------- FLOPs
def matmul_peak(dtype_name: str, n: int = 4096, repeats: int = 5) -> float:
    """Best FLOP/s of an n x n x n jitted JAX matmul (fp32 accumulation, HIGHEST precision for fp32)."""
    import jax
    import jax.numpy as jnp

    dt = jnp.dtype(dtype_name)
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(k1, (n, n), jnp.float32).astype(dt)
    b = jax.random.normal(k2, (n, n), jnp.float32).astype(dt)
    prec = jax.lax.Precision.HIGHEST if dt == jnp.float32 else None
    f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32, precision=prec))
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best


# ----------------------------------------------------------------------------------------------- breakdown
def breakdown(ours: Ours, repeats: int = 3) -> list:
    """Time pieces of our step on its batch: forward of the trunk (no logits), forward with logits, logits +
    CE alone, forward+backward (no optimizer), the full step. Returns (name, seconds) rows."""
    import jax
    import jax.numpy as jnp

    from mogu_jax import losses as L
    from mogu_jax.model import forward, mogu_inputs, split_params
    from mogu_jax.train import MODE

    cfg, stage = ours.cfg, ours.stage
    mode = MODE[stage]
    params = {**ours.frozen, stage: ours.state["params"]}
    seqs = [ours.batch] if stage == "router" else [ours.batch["affirm"], ours.batch["refusal"]]
    n_seq = len(seqs)
    s0 = seqs[0]

    def timeit(f, *a):
        jax.block_until_ready(f(*a))
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(f(*a))
            best = min(best, time.perf_counter() - t0)
        return best

    rows = []
    # trunk only: last_only=True computes the logits of one position (the lm head becomes negligible)
    f_trunk = jax.jit(lambda p, b: forward(cfg, p, b["tokens"], kv_mask=b["attn_mask"], mode=mode,
                                           last_only=True).logits)
    rows.append((f"forward, trunk only ({cfg.num_layers} layers, no lm head)", n_seq * timeit(f_trunk, params, s0)))
    f_full = jax.jit(lambda p, b: forward(cfg, p, b["tokens"], kv_mask=b["attn_mask"], mode=mode).logits)
    rows.append(("forward with logits [B,T,V]", n_seq * timeit(f_full, params, s0)))
    x = jax.random.normal(jax.random.PRNGKey(0), s0["tokens"].shape + (cfg.hidden_size,), jnp.float32)
    emb = params["base"]["embedding"]

    def head_ce(x, emb, b):
        from mogu_jax.model import tied_logits
        return L.token_ce(tied_logits(cfg, x, emb), b["tokens"], b["loss_mask"]).sum()

    rows.append(("lm head + CE, forward", n_seq * timeit(jax.jit(head_ce), x, emb, s0)))
    rows.append(("lm head + CE, forward + d/dx", n_seq * timeit(jax.jit(jax.grad(head_ce)), x, emb, s0)))

    def trunk_loss(tr, p, b):
        pp = {**p, stage: tr}
        return forward(cfg, pp, b["tokens"], kv_mask=b["attn_mask"], mode=mode, last_only=True).logits.sum()

    frozen = ours.frozen
    rows.append(("trunk forward + backward (grad wrt trainable)",
                 n_seq * timeit(jax.jit(jax.grad(trunk_loss)), ours.state["params"], frozen, s0)))
    g = jax.jit(lambda tr, fr, b: jax.value_and_grad(ours.fns.loss, has_aux=True)(tr, fr, b))
    rows.append(("loss forward + backward (whole batch)", timeit(g, ours.state["params"], frozen, ours.batch)))

    ours.step()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        ours.step()
        best = min(best, time.perf_counter() - t0)
    rows.append(("full train step (StepFns)", best))
    return rows


# ------------------------------------------------------------------------------------------------- profile
def _category(name: str, op: str) -> str:
    """A coarse bucket for one XLA CPU op of the train step, from its HLO name and op_name metadata."""
    import re

    if re.search(r"_proj/.*dot_general", op) or re.search(r"(dr->|rf->|dh->|hf->|fo->)", op):
        return "projection / LoRA / router matmuls"
    if ("dynamic_update_slice" in op or "dynamic_slice" in op or "dynamic-slice" in name
            or "dynamic-update-slice" in name or name.startswith(("wrapped_broadcast", "copy."))):
        return "scan: residual stacking (zero-init, DUS, DS, copies)"
    if "/attn/" in op and "_proj" not in op:
        return "attention core (QK^T, mask, softmax, PV, transposes)"
    if "btv" in op or "vd->" in op or "logsumexp" in op or "take_along_axis" in op or "log_softmax" in op:
        return "lm head (logits [B,T,V]) + CE"
    if "/mlp/" in op:
        return "MLP elementwise (silu, product)"
    if "norm" in op.lower() or "rsqrt" in op:
        return "norms"
    if "adam" in op.lower() or "optax" in op.lower() or "/update" in op:
        return "optimizer"
    return "other"


def profile_step(ours: Ours, out_dir: str, top: int = 5) -> None:
    """One step of ours under jax.profiler; prints the op time per category and the heaviest ops."""
    import collections
    import glob
    import gzip
    import json
    import re

    import jax

    ours.step()
    jax.profiler.start_trace(out_dir, create_perfetto_trace=True)
    ours.step()
    jax.profiler.stop_trace()
    traces = sorted(glob.glob(os.path.join(out_dir, "plugins", "profile", "*", "perfetto_trace.json.gz")),
                    key=os.path.getmtime)
    if not traces:
        print("    (no perfetto trace written)")
        return
    with gzip.open(traces[-1]) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    dur, cnt = collections.defaultdict(float), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and not e["name"].startswith(("$", "Thunk", "Slinky", "end:", "Pjit", "Common",
                                                                   "Parse", "Allocate", "Handle", "Python", "Wait")):
            dur[e["name"]] += e.get("dur", 0.0)
            cnt[e["name"]] += 1
    hlo = ours.fns._jit("fused", ours.batch).lower(ours.state, ours.frozen, ours.batch).compile().as_text()
    defs = {}
    for line in hlo.split("\n"):
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = ", line)
        if m:
            defs[m.group(1)] = line
    cats: dict = collections.defaultdict(float)
    info = {}
    for n, t in dur.items():
        line = defs.get(n, "")
        op = re.search(r'op_name="([^"]*)"', line)
        op = op.group(1) if op else ""
        c = _category(n, op)
        cats[c] += t
        shape = line.split(" = ", 1)[1].split("(")[0].split(" ")[0] if " = " in line else ""
        info[n] = (shape, op.split("/")[-2:] if op else [], c)
    total = sum(dur.values())
    print(f"    profile ({traces[-1]}): {total / 1e6:.2f} s of op time in one step")
    for c, t in sorted(cats.items(), key=lambda x: -x[1]):
        print(f"      {t / 1e6:7.2f} s {100 * t / total:5.1f}%  {c}")
    with open(os.path.join(out_dir, "step_hlo.txt"), "w") as f:
        f.write(hlo)
    print(f"    heaviest ops per category (total over the step, calls; HLO in {out_dir}/step_hlo.txt):")
    by_cat = collections.defaultdict(list)
    for n, t in dur.items():
        by_cat[info[n][2]].append((t, n))
    for c, _ in sorted(cats.items(), key=lambda x: -x[1]):
        print(f"      {c}:")
        for t, n in sorted(by_cat[c], reverse=True)[:top]:
            shape, op, _ = info[n]
            print(f"        {t / 1e6:7.2f} s x{cnt[n]:<3d} {n:<38s} {shape:<36s} {'/'.join(op)}")


# ---------------------------------------------------------------------------------------- the probe's verdict
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags() -> set:
    """The flags of the first CPU in /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def probe_verdict() -> str:
    """What ``dtype: auto`` picks here (mogu_jax.precision.auto_choice, $MOGU_JAX_AUTO_DTYPE unset for it), the
    bf16/fp32 ratio of the probe's matmul measured now, and the CPU's bf16 instructions."""
    from mogu_jax import precision

    pinned = os.environ.pop(precision.FORCE_ENV, None)
    try:
        choice = precision.auto_choice()
    finally:
        if pinned is not None:
            os.environ[precision.FORCE_ENV] = pinned
    speedup = precision.measure_bf16_speedup()
    flags = cpu_flags()
    have = ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in BF16_FLAGS)
    return (f"probe: dtype auto -> {choice.dtype} ({choice.reason}); measured now: bf16 x bf16 -> fp32 "
            f"{precision.PROBE_SIZE}^3 matmul {speedup:.2f}x the fp32 rate; CPU {precision.cpu_model()!r}: {have}")


# ------------------------------------------------------------------------------------------------ timing
class Side:
    """One timed train step (ours or torch, on one dtype; or an A/B variant of ours) and its times."""

    def __init__(self, kind: str, dtype: str, runner, what: str = ""):
        self.kind, self.dtype, self.runner, self.what = kind, dtype, runner, what
        self.times: list = []

    def warm(self, n: int) -> None:
        for _ in range(n):
            self.runner.step()
        release_memory()

    def timed(self, steps: int) -> None:
        for _ in range(steps):
            t0 = time.perf_counter()
            self.runner.step()
            self.times.append(time.perf_counter() - t0)
        release_memory()

    @property
    def median(self) -> float:
        return statistics.median(self.times) if self.times else float("nan")

    @property
    def best(self) -> float:
        return min(self.times) if self.times else float("nan")


def parse_layers(text: str) -> tuple:
    """``a-b`` (inclusive) or ``a`` -> the layer ids."""
    try:
        lo, _, hi = text.partition("-")
        lo, hi = int(lo), int(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: use a-b, e.g. 15-29") from None
    if lo < 0 or hi < lo:
        raise argparse.ArgumentTypeError(f"{text!r}: use a-b with 0 <= a <= b")
    return tuple(range(lo, hi + 1))


def stage_sides(args, cfg, params, hf, stage: str, batch: dict, dtype: str):
    """Ours, torch (same dtype) and the A/B variants of ours for one stage and dtype, compiled and warm."""
    from mogu_jax.data import logits_start

    cfg = cfg.replace(dtype=dtype)
    layers = args.router_layers if stage == "router" else ()
    logits_from = 0 if args.full_logits else logits_start(args.prompt_len)
    prefix = tuple(int(x) for x in batch_rows(stage, batch)[0, :min(args.shared_prefix, logits_from)])
    share = prefix if not args.no_share else ()

    def ours_with(c=cfg, lf=logits_from, sp=share):
        return Ours(c, params, stage, batch, logits_from=lf, shared_prefix=sp, router_layers=layers,
                    cache_lower=not args.no_cache_lower)

    t0 = time.perf_counter()
    ours = Side("ours", dtype, ours_with())
    ours.runner.step()  # compile
    info = {"compile": time.perf_counter() - t0, "logits_from": logits_from, "prefix": len(share),
            "flops": ours.runner.flops(stage, batch, logits_from, len(share))}
    ours.warm(args.warmup)
    sides = [ours]
    if not args.skip_torch:
        ref = Side("torch", dtype, Reference(hf, stage, batch, dtype == "bfloat16", router_layers=layers))
        ref.warm(max(args.warmup, 1) + 1)  # torch's first updates are slow (allocator, oneDNN)
        sides.append(ref)
    if args.ab_logits and logits_from:  # no shared prefix there either: it needs the head to start after it
        sides.append(Side("variant", dtype, ours_with(lf=0, sp=()),
                          f"LM head from position {logits_from} (the first loss position) vs on all {args.seq}"
                          + (" (and the shared prefix once per row)" if share else "")))
    if args.ab_prefix and share:
        sides.append(Side("variant", dtype, ours_with(sp=()),
                          f"the {len(share)} tokens all rows start with run once per batch vs once per row"))
    if args.ab_remat and args.remat:
        other = "dots" if args.remat_policy == "nothing" else "nothing"
        sides.append(Side("variant", dtype, ours_with(c=cfg.replace(remat_policy=other)),
                          f"remat policy {args.remat_policy} vs {other}"))
    for v in sides[2 if not args.skip_torch else 1:]:
        v.warm(args.warmup + 1)
    return sides, info


def stage_details(args, stage: str, dtype: str, sides: list, info: dict, tokens: int) -> dict:
    """Print one stage x dtype's details (times, losses, FLOPs, XLA's count, A/B ratios); its table row."""
    ours = sides[0]
    ref = next((s for s in sides if s.kind == "torch"), None)
    tag = f"[{stage} {DTYPE_SHORT[dtype]}]"
    for v in (s for s in sides if s.kind == "variant"):
        print(f"{tag} {v.what}: {ours.median:.2f}s vs {v.median:.2f}s per update = {v.median / ours.median:.2f}x "
              f"(loss {ours.runner.last_loss:.4f} vs {v.runner.last_loss:.4f}, interleaved, median of "
              f"{len(ours.times)})")
    print(f"{tag} compile+first step {info['compile']:.0f}s; per update ours {ours.median:.2f}s "
          f"(all: {', '.join(f'{x:.2f}' for x in ours.times)})"
          + (f", torch {ref.median:.2f}s (all: {', '.join(f'{x:.2f}' for x in ref.times)})" if ref else "")
          + f"; loss ours {ours.runner.last_loss:.4f}" + (f", torch {ref.runner.last_loss:.4f}" if ref else "")
          + f"; trainable ours {ours.runner.n_trainable:,}" + (f", torch {ref.runner.n_trainable:,}" if ref else ""))
    o = ours.runner
    print(f"{tag} analytic FLOPs/update {info['flops'] / 1e9:.2f} G (mogu_jax.flops.train_step_flops: what our "
          f"step computes: LM head from position {info['logits_from']}, {info['prefix']} shared prefix tokens "
          f"once per batch, backward from layer {o.frozen_layers} up"
          + (", layers below cached" if o.lower_cached else "") + (", remat recompute" if o.cfg.remat else "")
          + ")")
    row = {"stage": stage, "dtype": dtype, "tokens": tokens, "ours": tokens / ours.median,
           "torch": tokens / ref.median if ref else float("nan"),
           "ratio": ref.median / ours.median if ref else float("nan"), "gflops": info["flops"] / ours.median / 1e9,
           "best_ours": tokens / ours.best, "best_torch": tokens / ref.best if ref else float("nan")}
    if not args.no_cost_analysis:
        ca = o.cost_analysis()
        if ca and "flops" in ca:
            row["xla_ratio"] = ca["flops"] / info["flops"]
            print(f"{tag} XLA cost_analysis: flops {ca['flops'] / 1e9:.2f} G ({row['xla_ratio']:.2f} x analytic; "
                  f"XLA counts a while loop's body once, not {o.cfg.num_layers} times), bytes accessed "
                  f"{ca.get('bytes accessed', float('nan')) / 1e9:.2f} GB"
                  + (f"; XLA temp memory of the step {ca['temp_bytes'] / 1e9:.2f} GB" if "temp_bytes" in ca else ""))
        else:
            print(f"{tag} XLA cost_analysis unavailable: {ca}")
    if args.profile:
        print(f"{tag} jax.profiler trace of one step of ours:")
        profile_step(o, os.path.join(args.profile, f"{stage}-{dtype}"))
    if args.breakdown:
        print(f"{tag} breakdown of our step (best of 3; pair stages: x2 for the per-sequence pieces):")
        for name, sec in breakdown(o):
            print(f"    {name:<50s} {sec:8.3f} s")
    return row


def print_table(args, rows: list, peaks: dict) -> None:
    print()
    layers = args.router_layers
    print(f"SmolLM2-135M{' (tiny)' if args.tiny else ''}, batch {args.batch} x {args.seq}"
          f"{', remat' if args.remat else ''}"
          + (f", router stage with routers in layers {layers[0]}-{layers[-1]}" if layers else "")
          + f"; median of {args.rounds * args.steps} interleaved updates per side; torch on the same dtype "
          "(bf16: autocast); matmul peaks (JAX, best over the run): "
          + ", ".join(f"{DTYPE_SHORT[k]} {v / 1e9:.0f} GFLOP/s" for k, v in peaks.items()))
    hdr = ("| stage | dtype | ours tok/s | torch tok/s | ratio | ours vs fp32 | achieved GFLOP/s | % of dtype's peak "
           "| XLA/analytic FLOPs |")
    print(hdr)
    print("|" + "---|" * (hdr.count("|") - 1))
    fp32 = {r["stage"]: r["ours"] for r in rows if r["dtype"] == "float32"}
    for r in rows:
        vs = f"{r['ours'] / fp32[r['stage']]:.2f}x" if r["stage"] in fp32 and r["dtype"] != "float32" else "-"
        xla = f"{r['xla_ratio']:.2f}" if "xla_ratio" in r else "n/a"
        print(f"| {r['stage']} | {DTYPE_SHORT[r['dtype']]} | {r['ours']:.0f} | {r['torch']:.0f} | {r['ratio']:.2f}x "
              f"| {vs} | {r['gflops']:.1f} | {100 * r['gflops'] * 1e9 / peaks[r['dtype']]:.1f}% | {xla} |")
    print("ratio = torch time / ours (> 1: ours faster); ours vs fp32 = ours' tok/s in that dtype / in fp32")
    print("\nbest-of (min time) tok/s: " + "; ".join(
        f"{r['stage']} {DTYPE_SHORT[r['dtype']]} ours {r['best_ours']:.0f} / torch {r['best_torch']:.0f}"
        for r in rows))
    print("FLOPs: mogu_jax.flops.train_step_flops (matmuls only, what our step computes)")


# ---------------------------------------------------------------------------------------------------- main
DTYPE_SHORT = {"float32": "fp32", "bfloat16": "bf16"}


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=list(DTYPE_SHORT),
                    help="compute dtypes, each timed against torch on the same dtype (default: both)")
    ap.add_argument("--bf16", action="store_true", help="deprecated: --dtypes bfloat16")
    ap.add_argument("--router-layers", type=parse_layers, default=(), metavar="A-B",
                    help="router stage: routers in layers A..B only (MoGU v2; default all layers)")
    ap.add_argument("--no-cache-lower", action="store_true",
                    help="with --router-layers: run the layers below the lowest router in every step (default: "
                         "their output computed once, as train.cache_frozen_layers)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=64, help="prompt tokens per row (masked out of the LM loss)")
    ap.add_argument("--full-logits", action="store_true",
                    help="ours: the LM head on every position (default: from the first loss position, as training)")
    ap.add_argument("--ab-logits", action="store_true",
                    help="also time ours with the LM head on every position, interleaved, and print the ratio")
    ap.add_argument("--shared-prefix", type=int, default=24, metavar="N",
                    help="every row starts with the same N tokens (default 24: SmolLM2's chat template up to the "
                         "instruction), which ours runs once per batch as training does (capped at the first loss "
                         "position)")
    ap.add_argument("--no-share", action="store_true", help="ours: run the shared prefix once per row")
    ap.add_argument("--ab-prefix", action="store_true",
                    help="also time ours running the shared prefix once per row, interleaved, and print the ratio")
    ap.add_argument("--remat", action="store_true", help="rematerialise the decoder layers (ours; default off)")
    ap.add_argument("--remat-policy", default="nothing", choices=["nothing", "dots"],
                    help="with --remat: what a layer keeps for the backward pass (ours)")
    ap.add_argument("--ab-remat", action="store_true",
                    help="with --remat: also time ours with the other remat policy, interleaved")
    ap.add_argument("--unrolled", action="store_true", help="unrolled layers instead of nn.scan (ours)")
    ap.add_argument("--rounds", type=int, default=4, help="interleaved timing rounds")
    ap.add_argument("--steps", type=int, default=1, help="updates per side per round")
    ap.add_argument("--warmup", type=int, default=1, help="untimed updates per side after compiling")
    ap.add_argument("--peak-n", type=int, default=2048, help="matmul size of the peak measurement (n^3)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: the machine's cores)")
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--no-cost-analysis", action="store_true", help="skip XLA's cost analysis (one more compile)")
    ap.add_argument("--breakdown", action="store_true", help="time the pieces of our step")
    ap.add_argument("--profile", metavar="DIR", default=None,
                    help="trace one step of ours with jax.profiler into DIR and print where the time goes")
    ap.add_argument("--tiny", action="store_true", help="random tiny Llama instead of SmolLM2-135M")
    args = ap.parse_args(argv)
    if args.bf16:
        print("bench_train.py: --bf16 is deprecated, use --dtypes bfloat16", file=sys.stderr)
        args.dtypes = ["bfloat16"]
    args.dtypes = list(dict.fromkeys(args.dtypes))
    if args.router_layers and "router" not in args.stages:
        ap.error("--router-layers times the router stage: add router to --stages")
    return ap, args


def main(argv=None):
    ap, args = parse_args(argv)

    import jax
    import torch

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    t0 = time.perf_counter()
    cfg, params, hf, source = load_models(args.tiny, "float32", args.remat)
    cfg = cfg.replace(scan_layers=not args.unrolled, remat_policy=args.remat_policy)
    if args.router_layers and args.router_layers[-1] >= cfg.num_layers:
        ap.error(f"--router-layers {args.router_layers[0]}-{args.router_layers[-1]}: the model has layers "
                 f"0-{cfg.num_layers - 1}")
    print(f"model: {source}, loaded in {time.perf_counter() - t0:.0f}s")
    print(f"jax {jax.__version__} on {jax.default_backend()} ({jax.device_count()} device(s)), torch "
          f"{torch.__version__} with {torch.get_num_threads()} threads, {os.cpu_count()} CPU cores; "
          f"compute {', '.join(args.dtypes)}{', remat' if args.remat else ''}; batch {args.batch} x {args.seq}")
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())} (the machine is shared)")
    verdict = probe_verdict()
    print(verdict)
    peaks = {dt: matmul_peak(dt, args.peak_n) for dt in args.dtypes}
    print(f"matmul peak (JAX, {args.peak_n}^3, best of 5): "
          + ", ".join(f"{DTYPE_SHORT[k]} {v / 1e9:.0f} GFLOP/s" for k, v in peaks.items()))

    rows = []
    for stage in args.stages:
        batch = make_batch(stage, args.batch, args.seq, args.prompt_len, cfg.vocab_size, seed=1,
                           shared=args.shared_prefix)
        tokens = batch_tokens(stage, batch)
        for k in peaks:  # the peak again before each stage (the machine is shared): keep the best
            peaks[k] = max(peaks[k], matmul_peak(k, args.peak_n))
        per_dtype = {dt: stage_sides(args, cfg, params, hf, stage, batch, dt) for dt in args.dtypes}
        every = [s for dt in args.dtypes for s in per_dtype[dt][0]]
        for _ in range(args.rounds):  # interleaved: ours fp32, torch fp32, (variants), ours bf16, torch bf16, ...
            for side in every:
                side.timed(args.steps)
        for dt in args.dtypes:
            rows.append(stage_details(args, stage, dt, *per_dtype[dt], tokens))
        del per_dtype, every
        import gc
        gc.collect()

    print_table(args, rows, peaks)
    print(verdict)
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
