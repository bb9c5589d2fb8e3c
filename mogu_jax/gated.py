"""MoGU's answers under the router-gated handoff, reusing the base model's greedy answers to the same prompts.

Under the router-gated handoff (:class:`mogu_jax.generate.RouterGatedHandoff`) a row whose routers lean benign over
its first ``m`` routed tokens continues with the base model. When those ``m`` tokens are the base model's own first
``m`` (greedy decoding), that continuation is the base model's greedy answer, which an evaluation of base vs MoGU
has already generated. So instead of running the routed and the base model side by side over every row:

1. the first ``m`` routed tokens of every row, with their router weights (the gate);
2. rows the gate keeps routed: routed decoding to the end, in batches of their own;
3. rows it hands off whose routed tokens are the base answer's first ``m``: the base answer;
4. rows it hands off with other tokens: the base model continues the prompt plus those tokens (given to it as
   forced tokens, so in the base answers' prompt buckets and compilations).

The answers are the handoff decoding's (to the rounding of other batch shapes), for about half its compute: the
base model no longer runs beside the routed one, and the routed one stops at the gate for the rows it hands off.
Greedy decoding only (the reuse needs the base answer to be the base model's only continuation).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from mogu_jax.config import ModelConfig
from mogu_jax.errors import MoguError


def gate_keeps(router_a: np.ndarray, threshold: float) -> bool:
    """The router-gated handoff's test for one row: the unwilling weight ``a`` ([m, R]: routed tokens x router
    layers), averaged over the layers and summed over the tokens, reaches ``threshold`` x m."""
    a = np.asarray(router_a, np.float64)
    return a.shape[0] > 0 and float(a.mean(axis=1).sum()) >= threshold * a.shape[0]


def gated_answers(cfg: ModelConfig, params, encoded: Sequence[Sequence[int]], base: Sequence[dict], *,
                  routed_tokens: int, max_new_tokens: int, batch_size: int, eos_ids: Sequence[int],
                  threshold: Optional[float] = None, progress: bool = False) -> list[dict]:
    """MoGU's answers (:func:`mogu_jax.generate.generate_ids` rows: ``ids``, ``finished``, ``router`` of the
    routed tokens) to the prompts ``encoded`` under the router-gated handoff after ``routed_tokens`` tokens, given
    ``base``, the base model's greedy :func:`~mogu_jax.generate.generate_ids` rows for the same prompts and
    ``max_new_tokens``. Every call shares one batch shape and shared prefix (their compilations too)."""
    from mogu_jax.generate import call_buckets, generate_ids, length_batches

    m = int(routed_tokens)
    if not 0 < m < max_new_tokens:
        raise MoguError(f"routed_tokens must be in 1..{max_new_tokens - 1} for the gated handoff, got {m}")
    if len(base) != len(encoded):
        raise MoguError(f"{len(base)} base answers for {len(encoded)} prompts")
    threshold = float(cfg.handoff_threshold if threshold is None else threshold)
    shape = call_buckets(length_batches(encoded, batch_size), encoded, batch_size)  # the base answers' shape
    common = dict(batch_size=batch_size, progress=progress, eos_ids=tuple(eos_ids), **shape)

    first = generate_ids(cfg, params, encoded, mode="routed", max_new_tokens=m, **common)
    out: list[Optional[dict]] = [None] * len(encoded)
    keep, other = [], []
    for i, (f, b) in enumerate(zip(first, base)):
        if f["finished"]:  # ended within the routed tokens: nothing to hand off
            out[i] = f
        elif gate_keeps(f["router"]["a"], threshold):
            keep.append(i)
        elif f["ids"] == b["ids"][:m]:
            out[i] = {**b, "router": f["router"]}
        else:
            other.append(i)
    if keep:
        rows = generate_ids(cfg, params, [encoded[i] for i in keep], mode="routed", max_new_tokens=max_new_tokens,
                            **common)
        for i, r in zip(keep, rows):
            out[i] = {**r, "router": first[i]["router"]}
    if other:  # the routed tokens forced: the base answers' prompt buckets, hence their compilations
        rows = generate_ids(cfg, params, [encoded[i] for i in other], mode="base", max_new_tokens=max_new_tokens,
                            forced=[first[i]["ids"] for i in other], **common)
        for i, r in zip(other, rows):
            out[i] = {**r, "router": first[i]["router"]}
    return out  # type: ignore[return-value]
