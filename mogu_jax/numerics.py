"""Matmuls in the compute dtype with fp32 accumulation, on every backend.

``einsum(cfg, spec, a, b)`` rounds both operands to ``cfg.dtype`` (fp32 or bf16) and accumulates in fp32.
XLA's CPU backend has no bf16 x bf16 -> fp32 dot kernel, so there the rounded operands are carried in fp32:
the result is the same, since the product of two bf16 numbers is exact in fp32 (8-bit significands).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


@functools.lru_cache(maxsize=None)
def _on_cpu() -> bool:
    return jax.default_backend() == "cpu"


def operand(cfg, x):
    y = x.astype(cfg.compute_dtype)
    if y.dtype != jnp.float32 and _on_cpu():
        y = y.astype(jnp.float32)
    return y


def precision(cfg):
    # fp32 compute means true fp32 matmuls on every backend (TPU/GPU would otherwise use bf16 passes)
    if cfg.compute_dtype == jnp.float32 or _on_cpu():
        return jax.lax.Precision.HIGHEST
    return None


def einsum(cfg, spec: str, a, b):
    return jnp.einsum(spec, operand(cfg, a), operand(cfg, b), preferred_element_type=jnp.float32,
                      precision=precision(cfg))
