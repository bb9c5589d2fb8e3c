"""The three MoGU stage losses, per example (MOGU_SPEC.md section 2).

* LM cross-entropy: the mean over the example's response tokens of ``-log p(token)`` (prompt tokens are
  masked out, label -100 in the published code); position t predicts ``tokens[t]`` from ``logits[t-1]``.
* glad: ``CE(affirmative) / CE(refusal)``; unwilling: ``CE(refusal) / CE(affirmative)``.
* router: ``CE(target) + lambda * (mean((alphas - t_a)^2) + mean((betas - t_b)^2))``, the means over all
  routed layers and all real token positions (prompt included, padding never), with t_a = 1, t_b = 0
  for malicious rows (label 1) and t_a = 0, t_b = 1 for benign rows.

A batch's loss is the weighted mean of the per-example losses (``weight`` 0 marks padding rows), which
equals the published micro-batch-1 average with gradient accumulation.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

Array = Any


def token_ce(logits: Array, tokens: Array, loss_mask: Array, start: int = 0) -> Array:
    """Per-example mean CE over ``loss_mask`` positions. logits [B,T-start,V] (fp32; positions ``start``
    onwards, see ``logits_from`` of :func:`mogu_jax.model.forward`), tokens/loss_mask [B,T] -> [B]. With
    ``start`` > 0 no loss may fall at or before position ``start`` (``StageData.logits_from`` ensures it)."""
    return _mean_nll(logits[:, :-1], tokens[:, start + 1:], loss_mask[:, start + 1:])


def _mean_nll(logits: Array, targets: Array, mask: Array) -> Array:
    """Per row, the mean over ``mask`` of ``-log softmax(logits)[target]``: logits [B, N, V], targets/mask [B, N]."""
    logits = logits.astype(jnp.float32)
    mask = mask.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return ((lse - picked) * mask).sum(axis=1) / jnp.maximum(mask.sum(axis=1), 1.0)


def window_ce(logits: Array, tokens: Array, loss_mask: Array, loss_pos: Array, loss_valid: Array) -> Array:
    """:func:`token_ce` with the logits of each row's own positions: logits [B, W, V] at ``loss_pos`` [B, W]
    (:func:`mogu_jax.data.loss_window`), ``loss_valid`` [B, W] False at clipped positions -> [B]. Position t
    predicts ``tokens[t + 1]``; the same per-example mean as :func:`token_ce` when every loss position of a row is
    in its window."""
    targets = jnp.take_along_axis(tokens, loss_pos + 1, axis=1)
    return _mean_nll(logits, targets, jnp.take_along_axis(loss_mask, loss_pos + 1, axis=1) & loss_valid)


def sequence_ce(logits: Array, half: dict, logits_from: int) -> Array:
    """The per-example CE of one batch half (``tokens``, ``loss_mask``; ``loss_pos``/``loss_valid`` when the
    logits are a per-row window, else positions ``logits_from`` onwards)."""
    if "loss_pos" in half:
        return window_ce(logits, half["tokens"], half["loss_mask"], half["loss_pos"], half["loss_valid"])
    return token_ce(logits, half["tokens"], half["loss_mask"], logits_from)


def pair_loss(stage: str, ce_affirm: Array, ce_refusal: Array) -> Array:
    if stage == "glad":
        return ce_affirm / ce_refusal
    if stage == "unwilling":
        return ce_refusal / ce_affirm
    raise ValueError(f"pair loss for stage {stage!r}")


def router_mse(alphas: Array, betas: Array, attn_mask: Array, label: Array) -> tuple[Array, Array]:
    """Per-example mean squared error of a and b against their targets. alphas/betas [R,B,T]."""
    m = attn_mask.astype(jnp.float32)[None]  # [1,B,T]
    t_a = label.astype(jnp.float32)[None, :, None]
    t_b = 1.0 - t_a
    denom = jnp.maximum(m.sum(axis=(0, 2)) * alphas.shape[0], 1.0)
    mse_a = (jnp.square(alphas - t_a) * m).sum(axis=(0, 2)) / denom
    mse_b = (jnp.square(betas - t_b) * m).sum(axis=(0, 2)) / denom
    return mse_a, mse_b


def weighted_mean(x: Array, weight: Array) -> Array:
    return jnp.sum(x * weight) / jnp.maximum(jnp.sum(weight), 1e-9)


def masked_token_mean(values: Array, attn_mask: Array, rows: Array) -> Array:
    """Mean of per-token ``values`` [R,B,T] over real tokens of the selected rows ([B] bool)."""
    m = attn_mask.astype(jnp.float32)[None] * rows.astype(jnp.float32)[None, :, None]
    m = jnp.broadcast_to(m, values.shape)
    return jnp.sum(values * m) / jnp.maximum(jnp.sum(m), 1.0)
