"""Analytic FLOP counts (matmuls only, 2 FLOPs per multiply-add) of what the model computes: forward tokens,
training steps and generation. XLA's ``cost_analysis()`` counts a scanned layer stack once, so counts are
made from the shapes instead, and :class:`Ledger` adds them up per phase for the demo's summary.

Training step of a stage (frozen base; only the stage's subtree is differentiated):

* forward: every layer for every computed position (the shared prefix once per batch, the rows after it), the
  LM head from ``logits_from``;
* backward, for the differentiated layers only (those above ``cfg.frozen_layers``): the activation gradients of
  every frozen matmul (the same FLOPs as its forward; frozen weights get no weight gradient), twice the forward
  FLOPs of attention's two batched dots, and the trained branch / router weights' own gradients; the LM head's
  activation gradient;
* remat (``cfg.remat``): the forward of the differentiated layers once more.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from mogu_jax.config import ModelConfig
from mogu_jax.train import MODE, PAIR_STAGES  # the stages' modes and which stages run two sequences per example


def _attn_width(cfg: ModelConfig) -> int:
    return cfg.num_heads * cfg.head_dim


def projection_flops(cfg: ModelConfig) -> int:
    """Per token and layer: q, k, v, o projections and the MLP."""
    d, hd = cfg.hidden_size, cfg.head_dim
    qkvo = 2 * d * (cfg.num_heads * hd) * 2 + 2 * 2 * d * (cfg.num_kv_heads * hd)
    mlp = (3 if cfg.gated_mlp else 2) * 2 * d * cfg.intermediate_size
    return qkvo + mlp


def attention_flops(cfg: ModelConfig, keys: int) -> int:
    """Per query token and layer: scores and the weighted sum over ``keys`` positions."""
    return 2 * 2 * _attn_width(cfg) * keys


def mogu_flops(cfg: ModelConfig, mode: str) -> int:
    """Per token and routed layer: the low-rank branches the mode runs and the (folded) router heads."""
    branch = 2 * _attn_width(cfg) * cfg.lora_rank + 2 * cfg.lora_rank * cfg.hidden_size
    if mode in ("glad", "unwilling"):
        return branch
    if mode == "routed":
        return 2 * branch + 2 * 2 * _attn_width(cfg)
    return 0


def head_flops(cfg: ModelConfig) -> int:
    return 2 * cfg.hidden_size * cfg.vocab_size


def layer_flops(cfg: ModelConfig, mode: str, keys: int, layers: Optional[int] = None,
                every_layer: bool = False) -> int:
    """Forward FLOPs of one token through ``layers`` layers (default all), MoGU parts where the mode has them
    (in the MoGU layers, ``cfg.router_layer_ids``, for every mode; ``every_layer``: a scanned stack runs them in
    every layer and masks the others)."""
    n = cfg.num_layers if layers is None else layers
    routed = n if every_layer else min(len(cfg.router_layer_ids), n)
    return n * (projection_flops(cfg) + attention_flops(cfg, keys)) + mogu_flops(cfg, mode) * routed


def router_fold_flops(cfg: ModelConfig, layers: int) -> int:
    """Folding both heads' three maps into one vector per layer (:func:`mogu_jax.mogu.fold_router`), once per
    step, forward and backward."""
    return 3 * layers * 2 * (2 * cfg.router_hidden * _attn_width(cfg) + 2 * cfg.router_hidden * cfg.hidden_size)


def train_step_flops(cfg: ModelConfig, stage: str, batch: int, length: int, prefix: int = 0,
                     logits_from: int = 0, lower_cached: bool = False, head_positions: Optional[int] = None) -> int:
    """One micro-batch of ``batch`` examples padded to ``length`` tokens (pair stages run two sequences per
    example), ``prefix`` shared tokens run once, the LM head from ``logits_from`` (or on ``head_positions``
    positions per sequence: a per-row loss window); ``lower_cached``: the layers below ``cfg.frozen_layers`` are
    not run (their output comes from a cache computed once)."""
    mode = MODE[stage]
    seqs = batch * (2 if stage in PAIR_STAGES else 1)
    tokens = seqs * (length - prefix) + (prefix and (2 if stage in PAIR_STAGES else 1) * prefix)
    lo = min(cfg.frozen_layers, cfg.num_layers)
    hi = cfg.num_layers - lo
    scanned = cfg.scan_layers
    fwd_lo = 0 if lower_cached else tokens * layer_flops(cfg, "base", length, lo)
    if not scanned:  # unrolled: the MoGU parts only in the MoGU layers
        routed_hi = sum(1 for i in cfg.router_layer_ids if i >= lo)
    else:
        routed_hi = hi
    fwd_hi = tokens * (hi * (projection_flops(cfg) + attention_flops(cfg, length)) + mogu_flops(cfg, mode) * routed_hi)
    head = seqs * (length - logits_from if head_positions is None else head_positions) * head_flops(cfg)
    bwd = tokens * (hi * (projection_flops(cfg) + 2 * attention_flops(cfg, length))
                    + 2 * mogu_flops(cfg, mode) * routed_hi) + head
    remat = fwd_hi if cfg.remat else 0
    fold = router_fold_flops(cfg, len(cfg.router_layer_ids)) if mode == "routed" else 0
    return int(fwd_lo + fwd_hi + head + bwd + remat + fold)


def generation_flops(cfg: ModelConfig, mode: str, batch: int, prompt: int, cache: int, steps: int,
                     routed_steps: Optional[int] = None, shared: int = 0) -> int:
    """One :func:`mogu_jax.generate.generate` call as computed: ``batch`` rows (the batch bucket) prefilled
    over ``prompt`` positions (the prompt bucket, causal scores over all of them, the LM head on the last; the
    first ``shared`` positions, the tokens every prompt starts with, once for the whole batch), then ``steps``
    decode steps of one token per row, each attending over the whole ``cache`` (masked). With MoGU's handoff
    (``routed_steps``), the routed model runs the prefill and the first decode steps and the base model runs
    alongside throughout (it takes over after ``routed_steps`` tokens) over the layers from the lowest router up
    (below it both are the same layers, run once: :class:`mogu_jax.generate.RoutedHandoff`)."""
    handoff = mode == "routed" and routed_steps is not None
    unrolled = dict(every_layer=False)
    positions = batch * (prompt - shared) + shared
    prefill = positions * layer_flops(cfg, mode, prompt, **unrolled) + batch * head_flops(cfg)
    decode_mode = layer_flops(cfg, mode, cache, **unrolled) + head_flops(cfg)
    if not handoff:
        return int(prefill + batch * max(steps - 1, 0) * decode_mode)
    upper = cfg.num_layers - min(cfg.router_layer_ids)
    beside = layer_flops(cfg, "base", cache, layers=upper) + head_flops(cfg)  # the base model beside the routed
    base_step = layer_flops(cfg, "base", cache) + head_flops(cfg)
    prefill += positions * layer_flops(cfg, "base", prompt, layers=upper)
    routed = min(max(routed_steps - 1, 0), max(steps - 1, 0))
    return int(prefill + batch * (routed * (decode_mode + beside) + (max(steps - 1, 0) - routed) * base_step))


@dataclasses.dataclass
class Ledger:
    """FLOPs per phase, in the order the phases were first charged."""

    phases: dict = dataclasses.field(default_factory=dict)

    def add(self, phase: str, flops: float) -> None:
        self.phases[phase] = self.phases.get(phase, 0) + int(flops)

    @property
    def total(self) -> int:
        return sum(self.phases.values())

    def format(self) -> str:
        parts = ", ".join(f"{k} {v / 1e12:.2f}" for k, v in self.phases.items())
        return f"compute {self.total / 1e12:.2f} TFLOP ({parts})"
