"""MoGU's trainable parts as functional Flax modules: the two low-rank branches and the per-layer router.

In every routed layer the attention output projection becomes, per token (MOGU_SPEC.md section 1)::

    out = (a + b) * W_o x  +  s * (a * dU(x) + b * dG(x))

where ``x`` is the attention output before the projection, ``dU``/``dG`` the unwilling/glad low-rank
products ``B(A x)`` (:class:`LowRank` returns only that product; the caller combines), ``s`` the LoRA
scaling ``alpha / r`` and ``a``/``b`` the two independent sigmoid heads of :class:`Router`.

Parameters live in their own subtrees, stacked over layers like the base decoder's::

    params = {"base": ..., "glad": {"A": [L, d, r], "B": [L, r, D]}, "unwilling": {...},
              "router": {"unwilling": {"w0", "w1", "b1", "w2", "b2"}, "glad": {...}}}  # [R, ...]

``router`` holds one entry per routed layer (``cfg.router_layer_ids``: all layers by default, a
subset for MoGU v2). The ``unwilling`` router head produces ``a`` (published ``alpha_``), the
``glad`` head ``b`` (``beta_``).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mogu_jax import numerics
from mogu_jax.config import ModelConfig

Array = Any
MODES = ("base", "glad", "unwilling", "routed")
PARTS = ("glad", "unwilling", "router")
BRANCHES = ("glad", "unwilling")


def lora_a_init(key, shape, dtype=jnp.float32):
    """PEFT's default for lora_A: kaiming_uniform(a=sqrt(5)) on [r, in] = U(-1/sqrt(in), 1/sqrt(in))."""
    bound = 1.0 / math.sqrt(shape[0])
    return jax.random.uniform(key, shape, dtype, -bound, bound)


class LowRank(nn.Module):
    """delta(x) = B (A x): only the low-rank product, unscaled, fp32 accumulation."""

    rank: int
    features: int
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.cfg
        a = self.param("A", nn.with_logical_partitioning(lora_a_init, ("heads", "lora_rank")),
                       (x.shape[-1], self.rank), cfg.weight_dtype)
        b = self.param("B", nn.with_logical_partitioning(nn.initializers.zeros, ("lora_rank", "embed")),
                       (self.rank, self.features), cfg.weight_dtype)
        h = numerics.einsum(cfg, "...d,dr->...r", x, a)
        return numerics.einsum(cfg, "...r,rf->...f", h, b)


class RouterHead(nn.Module):
    """sigmoid(W2 (W1 (W0 x) + c1) + c2): three affine maps, no activation between them. -> [..., 1] fp32."""

    hidden: int
    features: int
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.cfg
        init = nn.initializers.normal(0.02)
        pdt = cfg.weight_dtype
        w0 = self.param("w0", nn.with_logical_partitioning(init, ("heads", "router_hidden")),
                        (x.shape[-1], self.hidden), pdt)
        w1 = self.param("w1", nn.with_logical_partitioning(init, ("router_hidden", "embed")),
                        (self.hidden, self.features), pdt)
        b1 = self.param("b1", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)), (self.features,), pdt)
        w2 = self.param("w2", nn.with_logical_partitioning(init, ("embed", "router_out")), (self.features, 1), pdt)
        b2 = self.param("b2", nn.with_logical_partitioning(nn.initializers.zeros, ("router_out",)), (1,), pdt)
        h = numerics.einsum(cfg, "...d,dh->...h", x, w0)
        h = numerics.einsum(cfg, "...h,hf->...f", h, w1) + b1.astype(jnp.float32)
        z = numerics.einsum(cfg, "...f,fo->...o", h, w2) + b2.astype(jnp.float32)
        return jax.nn.sigmoid(z)


class Router(nn.Module):
    """Two independent heads: ``a`` weights the unwilling branch, ``b`` the glad branch."""

    hidden: int
    features: int
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: Array) -> tuple[Array, Array]:
        a = RouterHead(self.hidden, self.features, self.cfg, name="unwilling")(x)
        b = RouterHead(self.hidden, self.features, self.cfg, name="glad")(x)
        return a, b


# ------------------------------------------------------------------------------ functional helpers
def _attn_width(cfg: ModelConfig) -> int:
    return cfg.num_heads * cfg.head_dim


def branch_module(cfg: ModelConfig) -> LowRank:
    return LowRank(cfg.lora_rank, cfg.hidden_size, cfg)


def router_module(cfg: ModelConfig) -> Router:
    return Router(cfg.router_hidden, cfg.hidden_size, cfg)


def _stacked_init(module: nn.Module, width: int, n: int, rng) -> dict:
    keys = jax.random.split(rng, n)
    x = jnp.zeros((1, width), jnp.float32)
    return jax.vmap(lambda k: nn.meta.unbox(module.init(k, x)["params"]))(keys)


def init_branch(cfg: ModelConfig, rng) -> dict:
    """A new adapter (PEFT convention: A random, B zero), stacked over all layers."""
    return _stacked_init(branch_module(cfg), _attn_width(cfg), cfg.num_layers, rng)


def init_router(cfg: ModelConfig, rng) -> dict:
    """New routers (weights normal(0.02), zero biases: a = b ~ 0.5), one per routed layer."""
    return _stacked_init(router_module(cfg), _attn_width(cfg), len(cfg.router_layer_ids), rng)


def init_mogu(cfg: ModelConfig, rng, base: dict) -> dict:
    kg, ku, kr = jax.random.split(jax.random.PRNGKey(rng) if isinstance(rng, int) else rng, 3)
    return {"base": base, "glad": init_branch(cfg, kg), "unwilling": init_branch(cfg, ku),
            "router": init_router(cfg, kr)}


def mogu_logical_axes(cfg: ModelConfig) -> dict:
    """Logical axis names (PartitionSpec pytree) of the glad / unwilling / router subtrees."""
    x = jnp.zeros((1, _attn_width(cfg)), jnp.float32)

    def axes(module):
        spec = nn.get_partition_spec(jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), x))["params"])
        return jax.tree_util.tree_map(lambda s: jax.sharding.PartitionSpec("layers", *s), spec,
                                      is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))

    branch = axes(branch_module(cfg))
    return {"glad": branch, "unwilling": branch, "router": axes(router_module(cfg))}


def fold_router(router: dict) -> dict:
    """Fold each head's three affine maps into one: with no activation between them,
    ``W2 (W1 (W0 x) + c1) + c2 = (W0 W1 W2) x + (c1 W2 + c2)`` (kernels [in, out]). Exact maths, a
    ``[d, 2]`` map per layer instead of ``2 * (d*h + h*D + D)`` weights. Returns ``{"v": [..., d, 2],
    "c": [..., 2]}`` (column 0: ``a``, unwilling; 1: ``b``, glad) for a stacked ``[R, ...]`` router or one
    layer's. Differentiable: training folds too (see :func:`router_weights`), so a router costs ~2d FLOPs
    per token instead of ~4hd, while the gradients reach the published parametrisation W0, W1, W2."""
    def one(h):
        w0, w1, w2 = (h[k].astype(jnp.float32) for k in ("w0", "w1", "w2"))
        hi = jax.lax.Precision.HIGHEST
        w12 = jnp.einsum("...hf,...fo->...ho", w1, w2, precision=hi)  # [h, 1] first: never a [d, D] product
        v = jnp.einsum("...dh,...ho->...do", w0, w12, precision=hi)
        c = jnp.einsum("...f,...fo->...o", h["b1"].astype(jnp.float32), w2, precision=hi) + h["b2"].astype(jnp.float32)
        return v, c

    vu, cu = one(router["unwilling"])
    vg, cg = one(router["glad"])
    return {"v": jnp.concatenate([vu, vg], axis=-1), "c": jnp.concatenate([cu, cg], axis=-1)}


def router_weights(cfg: ModelConfig, router: dict, x: Array) -> tuple[Array, Array]:
    """(a, b), each [..., 1] fp32, from one layer's router (published form, folded here, or already folded
    by :func:`fold_router`). The heads are linear up to the sigmoid, so folding first is the same function
    (fp32, ``Precision.HIGHEST``) at a fraction of the cost, in training as in decoding."""
    if "v" not in router:
        router = fold_router(router)
    z = jnp.einsum("...d,do->...o", x.astype(jnp.float32), router["v"],
                   precision=jax.lax.Precision.HIGHEST) + router["c"]
    ab = jax.nn.sigmoid(z)
    return ab[..., 0:1], ab[..., 1:2]


def project(cfg: ModelConfig, mode: str, x: Array, base_out: Array, glad=None, unwilling=None, router=None,
            routed=True):
    """The MoGU output projection for one layer. ``x``: attention output before o_proj [B,T,d];
    ``base_out`` = W_o x (+ bias). Returns (out, a, b); a/b are [B,T] (zeros when not routed). ``routed``:
    whether this layer is one of the MoGU layers (``cfg.router_layer_ids``); in the others every mode is the
    base layer: with MoGU v2's routers in a subset of layers the branches live in those layers too."""
    s = cfg.lora_alpha / cfg.lora_rank
    zeros = jnp.zeros(base_out.shape[:-1], jnp.float32)
    if mode == "base":
        return base_out, zeros, zeros
    if mode in BRANCHES:
        p = glad if mode == "glad" else unwilling
        return jnp.where(routed, base_out + s * branch_module(cfg).apply({"params": p}, x), base_out), zeros, zeros
    if mode != "routed":
        raise ValueError(f"unknown mode {mode!r}; one of {MODES}")
    a, b = router_weights(cfg, router, x)
    d_u = branch_module(cfg).apply({"params": unwilling}, x)
    d_g = branch_module(cfg).apply({"params": glad}, x)
    out = (a + b) * base_out + s * (a * d_u + b * d_g)
    out = jnp.where(routed, out, base_out)
    a, b = a[..., 0], b[..., 0]
    return out, jnp.where(routed, a, 0.0), jnp.where(routed, b, 0.0)
