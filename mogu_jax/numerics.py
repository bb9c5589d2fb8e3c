"""Matmuls in the compute dtype with fp32 accumulation, on every backend.

``einsum(cfg, spec, a, b)`` rounds both operands to ``cfg.dtype`` and accumulates in fp32:

* **float64** (CPU parity checks, needs ``JAX_ENABLE_X64=1``): fp32 weights and activations, every matmul
  accumulated in float64 and rounded once to fp32. XLA:CPU's fp32 dot sums in an order whose rounding error
  shows on models with large activations (SmolLM2's residual entries reach ~2.5e4); this mode removes it, so
  a comparison measures the model, not the accumulation order.
* **fp32**: true fp32 matmuls (``Precision.HIGHEST``, so TPU/GPU do not silently use bf16 passes).
* **bf16**: a mixed-precision matmul: bf16 x bf16 -> fp32 in the forward pass *and* in the backward pass. JAX's
  own transpose of ``einsum(..., preferred_element_type=float32)`` multiplies the fp32 cotangent with the
  operand promoted to fp32, i.e. fp32 matmuls in the backward pass (about 4x slower than bf16 on CPUs with
  AMX/AVX512-BF16 and on every accelerator). :func:`_mixed_einsum` has a custom VJP that rounds the cotangent
  to bf16 and states both transposes as bf16 einsums accumulated in fp32 (the usual mixed-precision recipe:
  activations' gradients in bf16, sums in fp32). Measured on this project's 2-core Xeon (AMX): 670 GFLOP/s vs
  150 for fp32 (``scripts/bench_train.py`` shows the effect on a whole train step). XLA:CPU has this kernel
  only for dots without batch dimensions; batched ones (attention) are carried in fp32 there.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mogu_jax.errors import MoguError


def operand(cfg, x):
    return x.astype(cfg.compute_dtype)


def check_float64(cfg) -> None:
    if cfg.compute_dtype == jnp.float64 and not jax.config.jax_enable_x64:
        raise MoguError("dtype float64 (float64 matmul accumulation) needs JAX's 64-bit mode: set "
                        "JAX_ENABLE_X64=1 in the environment before starting Python")


def einsum(cfg, spec: str, a, b):
    if cfg.compute_dtype == jnp.float64:
        # reference numerics for CPU parity checks: fp32 activations, every matmul accumulated in float64
        check_float64(cfg)
        return jnp.einsum(spec, a.astype(jnp.float64), b.astype(jnp.float64),
                          precision=jax.lax.Precision.HIGHEST).astype(jnp.float32)
    a, b = operand(cfg, a), operand(cfg, b)
    if cfg.compute_dtype == jnp.float32 or (_on_cpu() and _has_batch_dims(spec)):
        # fp32; or bf16 in a batched dot on CPU, where XLA has no bf16 x bf16 -> fp32 kernel: the rounded operands
        # are carried in fp32 (the same result: a product of two bf16 numbers is exact in fp32). Only attention's
        # score/value contractions are batched; their cost is small next to the projections.
        return jnp.einsum(spec, a.astype(jnp.float32), b.astype(jnp.float32), preferred_element_type=jnp.float32,
                          precision=jax.lax.Precision.HIGHEST)
    return _mixed_einsum(spec, a, b)


@functools.lru_cache(maxsize=None)
def _on_cpu() -> bool:
    return jax.default_backend() == "cpu"


def _split(spec: str) -> tuple[str, str, str]:
    inputs, out = spec.replace(" ", "").split("->")
    x, y = inputs.split(",")
    return x, y, out


@functools.lru_cache(maxsize=None)
def _has_batch_dims(spec: str) -> bool:
    x, y, out = _split(spec)
    return any(c in y and c in out for c in x.replace("...", "")) or ("..." in x and "..." in y and "..." in out)


@functools.lru_cache(maxsize=None)
def _transposed_specs(spec: str) -> tuple[str, str]:
    """For ``X,Y->Z``: the specs of dL/dX = ``Z,Y->X`` and dL/dY = ``X,Z->Y``. Valid when every index of an
    operand also appears in the other operand or in the output (true of every matmul in this package)."""
    x, y, out = _split(spec)
    for operand_spec, other in ((x, y + out), (y, x + out)):
        for c in operand_spec.replace("...", ""):
            if c not in other:
                raise ValueError(f"einsum {spec!r}: index {c!r} is summed inside one operand")
    return f"{out},{y}->{x}", f"{x},{out}->{y}"


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _mixed_einsum(spec, a, b):
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _mixed_fwd(spec, a, b):
    return _mixed_einsum(spec, a, b), (a, b)


def _mixed_bwd(spec, res, ct):
    a, b = res
    ct = ct.astype(a.dtype)
    spec_a, spec_b = _transposed_specs(spec)
    da = jnp.einsum(spec_a, ct, b, preferred_element_type=jnp.float32).astype(a.dtype)
    db = jnp.einsum(spec_b, a, ct, preferred_element_type=jnp.float32).astype(b.dtype)
    return da, db


_mixed_einsum.defvjp(_mixed_fwd, _mixed_bwd)
